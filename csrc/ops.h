// The operators' signatures and kernels, and lstm_ext::forward as a C++ call through the
// dispatcher: every kernel above the CPU one applies (autograd, autocast, Python dispatch modes),
// as for torch.ops.lstm_ext.forward from Python.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace lstm_ext {

// ---- the workspace: what lstm_ext::forward keeps for lstm_ext::backward --------------------------
//
// A fixed list of tensors, so that the operators' schemas do not depend on the configuration; an
// entry that a configuration does not keep is [0]. L layers, D directions, c = layer * D +
// direction, N rows (T·B, or packed rows), B batch, H hidden, P output (proj_size, else H).
// Named once, here: lstm.cpp's Workspace allocates it from workspace_shapes and reads it by these
// names, the recomputed backward (dispatch.cpp) replays its masks by them, and functional.py's
// fake implementation takes its shapes from workspace_shapes through lstm_ext._C (module.cpp).
enum WorkspaceEntry : size_t {
  kGates,                // [L*D, N, 4H] the gates after their activations
  kTanhCells,            // [L*D, N, H] tanh(c_t)
  kCellsPrev,            // [L*D, N, H] c_{t-1}
  kHiddensPrev,          // [L*D, N, P] h_{t-1} masked by recurrent dropout, as the product saw it
  kLayerInputs,          // [L-1, N, D*P] the inputs of layers 1.., after dropout
  kDropoutMasks,         // [L-1, N, D*P] dropout's scaled keep-masks (training, dropout, L > 1)
  kRecurrentMasks,       // [L*D, B, P] recurrent dropout's scaled keep-masks (training)
  kZoneoutCellMasks,     // [L*D, N, H] zoneout's masks of c (training)
  kZoneoutHiddenMasks,   // [L*D, N, P] zoneout's masks of h (training)
  kLayerNormInputs,      // [L*D, N, 4H] layer norm's LayerNormSaved (layer.h), with layer norm
  kLayerNormRecurrents,  // [L*D, N, 4H]
  kLayerNormCells,       // [L*D, N, H]
  kLayerNormRstds,       // [L*D, N, 3]
  kWorkspaceEntries
};

// The type a call computes in and keeps its workspace in: bfloat16 and float16 in float (the
// precision seam, see blas.h).
inline at::ScalarType compute_type(at::ScalarType input) { return at::toOpMathType(input); }

// The shape of each entry (indexed by WorkspaceEntry) for a call's arguments. Int is int64_t in
// the operator, c10::SymInt in the fake implementation, whose sizes may be symbols
// (torch.compile's dynamic shapes, torch.export).
template <typename Int>
std::vector<std::vector<Int>> workspace_shapes(int64_t num_layers, bool bidirectional, const Int& rows,
                                               const Int& batch, const Int& hidden, const Int& proj, double dropout,
                                               bool train, double recurrent_dropout, at::ArrayRef<double> zoneout,
                                               bool layer_norm) {
  const int64_t D = bidirectional ? 2 : 1;
  const Int cells(num_layers * D), between(num_layers - 1), width = proj * D;
  const bool zoneout_on = std::any_of(zoneout.begin(), zoneout.end(), [](double z) { return z > 0; });
  std::vector<std::vector<Int>> shapes(kWorkspaceEntries);
  const auto keep = [&](WorkspaceEntry entry, bool kept, std::vector<Int> shape) {
    shapes[entry] = kept ? std::move(shape) : std::vector<Int>{Int(0)};
  };
  keep(kGates, true, {cells, rows, hidden * 4});
  keep(kTanhCells, true, {cells, rows, hidden});
  keep(kCellsPrev, true, {cells, rows, hidden});
  keep(kHiddensPrev, true, {cells, rows, proj});
  keep(kLayerInputs, true, {between, rows, width});
  keep(kDropoutMasks, dropout > 0 && train && num_layers > 1, {between, rows, width});
  keep(kRecurrentMasks, recurrent_dropout > 0 && train, {cells, batch, proj});
  keep(kZoneoutCellMasks, zoneout_on && train, {cells, rows, hidden});
  keep(kZoneoutHiddenMasks, zoneout_on && train, {cells, rows, proj});
  keep(kLayerNormInputs, layer_norm, {cells, rows, hidden * 4});
  keep(kLayerNormRecurrents, layer_norm, {cells, rows, hidden * 4});
  keep(kLayerNormCells, layer_norm, {cells, rows, hidden});
  keep(kLayerNormRstds, layer_norm, {cells, rows, Int(3)});
  return shapes;
}

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
// ATen's (kernels.cpp, simd_avx2.cpp, simd_avx512.cpp). ops.cpp registers the set
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
