// lstm_ext::forward as a C++ call through the dispatcher: every kernel above the CPU one applies
// (autograd, autocast, Python dispatch modes), as for torch.ops.lstm_ext.forward from Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lstm_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> call_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace, c10::string_view cell, std::optional<at::TensorList> cell_params, double recurrent_dropout,
    at::ArrayRef<double> zoneout);

// One step of the plain cell on [B, *] input and states: lstm_ext::forward on one step of one
// layer, its new (hy, cy) as [B, *]. Autograd records it as one node (dispatch.cpp's
// LSTMFunction), where views around the operator's call would add five.
std::tuple<at::Tensor, at::Tensor> call_step(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                             at::TensorList params, bool has_biases);

}  // namespace lstm_ext
