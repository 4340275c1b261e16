// The operators' signatures and kernels, and lstm_ext::forward as a C++ call through the
// dispatcher: every kernel above the CPU one applies (autograd, autocast, Python dispatch modes),
// as for torch.ops.lstm_ext.forward from Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lstm_ext {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::TensorList, bool,
    int64_t, double, bool, bool, bool, c10::string_view, std::optional<at::TensorList>, double,
    at::ArrayRef<double>);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::TensorList,
    at::TensorList, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, int64_t, bool, c10::string_view, std::optional<at::TensorList>,
    at::ArrayRef<double>);
using ForwardDifferentiableSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::OptionalIntArrayRef, const at::Tensor&, const at::Tensor&, at::TensorList, bool, int64_t,
    double, bool, bool, const std::optional<at::Tensor>&, c10::string_view, std::optional<at::TensorList>, double,
    const std::optional<at::Tensor>&, at::ArrayRef<double>, std::optional<at::TensorList>);
using QuantizedForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::TensorList,
    at::TensorList, bool, int64_t, bool);

// The operators' CPU kernels for one instruction set: lstm.cpp, compiled once per capability of
// ATen's (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp). ops.cpp registers the set
// of the best capability the CPU has, as at::get_cpu_capability() reports it.
struct Kernels {
  ForwardSignature* forward;
  BackwardSignature* backward;
  ForwardDifferentiableSignature* forward_differentiable;
  QuantizedForwardSignature* quantized_forward;
};
Kernels default_kernels();
Kernels avx2_kernels();
Kernels avx512_kernels();

// The capability whose kernels run: "DEFAULT", "AVX2" or "AVX512".
const char* kernels_capability();

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> call_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace, c10::string_view cell, std::optional<at::TensorList> cell_params, double recurrent_dropout,
    at::ArrayRef<double> zoneout);

// The backward as autograd through lstm_ext::forward_differentiable, replaying the forward's masks
// from `workspace` (dispatch.cpp): what both autograd Functions (dispatch.cpp's, functional.py's
// through lstm_ext._C) run under create_graph or for batched gradients. `leaves` are input, hx,
// cx, the num_params weights, then the cell parameters; `grads` those of output, hy and cy
// (undefined: none). Returns one gradient per leaf, undefined where it does not require grad.
std::vector<at::Tensor> recomputed_backward(const std::vector<at::Tensor>& leaves, int64_t num_params,
                                            const std::optional<at::Tensor>& batch_sizes, at::TensorList workspace,
                                            bool has_biases, int64_t num_layers, bool bidirectional,
                                            c10::string_view cell, double recurrent_dropout,
                                            at::ArrayRef<double> zoneout, const std::vector<at::Tensor>& grads);

// One step of the plain cell on [B, *] input and states: lstm_ext::forward on one step of one
// layer, its new (hy, cy) as [B, *]. Autograd records it as one node (dispatch.cpp's
// LSTMFunction), where views around the operator's call would add five.
std::tuple<at::Tensor, at::Tensor> call_step(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                             at::TensorList params, bool has_biases);

}  // namespace lstm_ext
