// lstm_ext::forward's kernels above its CPU one: what the dispatcher runs before the operator.
//
// Autograd: the hand-written backward, lstm_ext::backward, as a C++ autograd Function, so that the
// operator is differentiable without Python (a libtorch program, a traced or exported graph run
// from C++, and lstm_ext.lstm's eager calls, which come through lstm_ext._C: module.cpp). Under
// create_graph, and for batched gradients, it differentiates the recomputation
// lstm_ext::forward_differentiable instead. What torch.compile traces, and calls under autocast or
// a __torch_function__, run functional.py's autograd.Function instead: the same backward, with
// the operator called below this kernel.
//
// AutocastCPU: native's cast policy for lstm (lower_precision_fp, the one of mkldnn_rnn_layer, the
// kernel native's LSTM runs on CPU): every floating point tensor but float64 in autocast's dtype,
// through autocast's weight cache, so the output comes out in that dtype and autograd records the
// casts (gradients reach float32 weights in float32).
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "layer.h"
#include "ops.h"

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace lstm_ext {

using at::Tensor;
using at::TensorList;

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> call_forward(
    const Tensor& input, const std::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace, c10::string_view cell, std::optional<TensorList> cell_params, double recurrent_dropout,
    at::ArrayRef<double> zoneout) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lstm_ext::forward", "").typed<ForwardSignature>();
  return op.call(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                 need_workspace, cell, cell_params, recurrent_dropout, zoneout);
}

// The backward as autograd through lstm_ext::forward_differentiable, replaying the forward's
// masks (the workspace's: dropout's, recurrent dropout's, zoneout's; see ops.h): differentiable
// itself when grad mode is on (create_graph). The gradients of input, hx, cx, each weight and
// each cell parameter (leaves in that order, num_params weights), undefined where that one does
// not require grad. The one recomputed backward: this file's LSTMFunction and functional.py's
// _LSTMFunction (through lstm_ext._C, module.cpp) both call it.
std::vector<Tensor> recomputed_backward(const std::vector<Tensor>& leaves, int64_t num_params,
                                        const std::optional<Tensor>& batch_sizes, TensorList workspace,
                                        bool has_biases, int64_t num_layers, bool bidirectional,
                                        c10::string_view cell, double recurrent_dropout, at::ArrayRef<double> zoneout,
                                        const std::vector<Tensor>& grads) {
  using torch::autograd::variable_list;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::forward_differentiable", "")
                             .typed<ForwardDifferentiableSignature>();
  const bool create_graph = torch::autograd::GradMode::is_enabled();
  Tensor sizes;
  const at::OptionalIntArrayRef size_list = batch_size_list(batch_sizes, sizes);
  variable_list used_outputs, used_grads, wanted;
  {
    torch::autograd::AutoGradMode enable_grad(true);
    const TensorList all(leaves);
    const Tensor zoneout_masks[] = {workspace[kZoneoutCellMasks], workspace[kZoneoutHiddenMasks]};
    const auto [output, hy, cy] =
        op.call(leaves[0], size_list, leaves[1], leaves[2], all.slice(3, num_params), has_biases, num_layers, 0.0,
                false, bidirectional, workspace[kDropoutMasks], cell, all.slice(3 + num_params), recurrent_dropout,
                workspace[kRecurrentMasks], zoneout, zoneout_masks);
    const Tensor outputs[] = {output, hy, cy};
    for (size_t i = 0; i < 3; ++i) {
      if (grads[i].defined()) {
        used_outputs.push_back(outputs[i]);
        used_grads.push_back(grads[i]);
      }
    }
  }
  for (const Tensor& leaf : leaves) {
    if (leaf.requires_grad()) wanted.push_back(leaf);
  }
  const variable_list found =
      used_outputs.empty() || wanted.empty()
          ? variable_list(wanted.size())
          : torch::autograd::grad(used_outputs, wanted, used_grads, std::nullopt, create_graph, /*allow_unused=*/true);
  variable_list result;
  size_t next = 0;
  for (const Tensor& leaf : leaves) result.push_back(leaf.requires_grad() ? found[next++] : Tensor());
  return result;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A cell variant's name and options, as the operators take them after their plain-LSTM arguments.
struct Variant {
  std::string cell;
  double recurrent_dropout;
  std::vector<double> zoneout;
};

std::optional<Tensor> defined_or_none(const Tensor& grad) {
  return grad.defined() ? std::optional<Tensor>(grad) : std::nullopt;
}

// A step's [B, *] tensor as the operator's one-step [1, B, *] (undefined stays undefined).
Tensor as_sequence(const Tensor& t, bool step) { return step && t.defined() ? t.unsqueeze(0) : t; }

// A one-step [1, B, *] state as [B, *]. Not a view: a step's new state is a tensor of its own
// to autograd (an output of a custom Function may not be a view), as native lstm_cell's is.
Tensor step_state(const Tensor& state) { return at::_unsafe_view(state, state.sizes().slice(1)); }

bool needs_gradient(const Tensor& input, const Tensor& hx, const Tensor& cx, TensorList params,
                    TensorList cell_params) {
  const auto requires_grad = [](const Tensor& t) { return t.requires_grad(); };
  return torch::autograd::GradMode::is_enabled() &&
         (input.requires_grad() || hx.requires_grad() || cx.requires_grad() ||
          std::any_of(params.begin(), params.end(), requires_grad) ||
          std::any_of(cell_params.begin(), cell_params.end(), requires_grad));
}

// forward's outputs are (output, hy, cy), then the workspace when the caller asked for it; the backward
// reads the workspace it saved. A `step` (call_step) takes input, hx and cx as [B, *] and returns
// (hy, cy) as [B, *]: the operator's [1, B, *] views are made inside, where autograd does not see
// them, so that a decoding step is one autograd node, not six (five views around the call).
class LSTMFunction : public torch::autograd::Function<LSTMFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& batch_sizes,
                               const Tensor& hx, const Tensor& cx, TensorList params, bool has_biases,
                               int64_t num_layers, double dropout, bool train, bool bidirectional,
                               c10::string_view cell, TensorList cell_params, double recurrent_dropout,
                               at::ArrayRef<double> zoneout, bool return_workspace, bool step) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, cy, workspace] =
        call_forward(as_sequence(input, step), batch_sizes, as_sequence(hx, step), as_sequence(cx, step), params,
                     has_biases, num_layers, dropout, train, bidirectional, /*need_workspace=*/true, cell,
                     cell_params, recurrent_dropout, zoneout);
    // Outputs without a gradient (the workspace, often h_n and c_n) reach the backward undefined,
    // which it reads as zeros, instead of as zero tensors autograd would fill.
    ctx->set_materialize_grads(false);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["num_params"] = static_cast<int64_t>(params.size());
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    ctx->saved_data["cell"] = std::string(cell);
    ctx->saved_data["recurrent_dropout"] = recurrent_dropout;
    ctx->saved_data["zoneout"] = zoneout.vec();
    ctx->saved_data["step"] = step;
    variable_list saved{input, hx, cx};
    saved.insert(saved.end(), params.begin(), params.end());
    saved.insert(saved.end(), cell_params.begin(), cell_params.end());
    ctx->saved_data["num_cell_params"] = static_cast<int64_t>(cell_params.size());
    saved.insert(saved.end(), workspace.begin(), workspace.end());
    ctx->save_for_backward(saved);
    if (step) return {step_state(hy), step_state(cy)};
    variable_list outputs{output, hy, cy};
    // The workspace as outputs only for a caller that asked for it: each output costs autograd's
    // bookkeeping, a tenth of a decoding step's call.
    if (return_workspace) {
      ctx->mark_non_differentiable(workspace);
      outputs.insert(outputs.end(), workspace.begin(), workspace.end());
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lstm_ext::backward", "").typed<BackwardSignature>();
    variable_list saved = ctx->get_saved_variables();
    // create_graph (double backward) or batched gradients (is_grads_batched): the hand-written
    // backward has no derivative and no batching rule, so differentiate the recomputation.
    const auto batched = [](const Tensor& g) { return at::isBatchedTensor(g); };
    const bool recompute =
        torch::autograd::GradMode::is_enabled() || std::any_of(grads.begin(), grads.end(), batched);
    const bool step = ctx->saved_data["step"].toBool();
    if (step) {
      // The operator's shapes; differentiable views where the recomputation differentiates
      // through them. A step's output is its hy, whose gradient arrives as hy's.
      torch::autograd::AutoGradMode views_differentiable(recompute);
      for (size_t i = 0; i < 3; ++i) saved[i] = saved[i].unsqueeze(0);
      grads = {Tensor(), as_sequence(grads[0], true), as_sequence(grads[1], true)};
    }
    const int64_t num_params = ctx->saved_data["num_params"].toInt();
    const int64_t num_cell_params = ctx->saved_data["num_cell_params"].toInt();
    const TensorList params = TensorList(saved).slice(3, num_params);
    const TensorList cell_params = TensorList(saved).slice(3 + num_params, num_cell_params);
    const TensorList workspace = TensorList(saved).slice(3 + num_params + num_cell_params);
    const Variant variant{ctx->saved_data["cell"].toStringRef(), ctx->saved_data["recurrent_dropout"].toDouble(),
                          ctx->saved_data["zoneout"].toDoubleVector()};
    const std::optional<Tensor> batch_sizes = ctx->saved_data["batch_sizes"].toOptional<Tensor>();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool bidirectional = ctx->saved_data["bidirectional"].toBool();
    // The gradients of input, hx, cx, the weights and the cell parameters, in that order.
    variable_list result;
    if (recompute) {
      const variable_list leaves(saved.begin(), saved.begin() + 3 + num_params + num_cell_params);
      result = recomputed_backward(leaves, num_params, batch_sizes, workspace, has_biases, num_layers, bidirectional,
                                   variant.cell, variant.recurrent_dropout, variant.zoneout, grads);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [grad_input, grad_hx, grad_cx, grad_params] =
          op.call(saved[0], batch_sizes, saved[1], saved[2], params, workspace, defined_or_none(grads[0]),
                  defined_or_none(grads[1]), defined_or_none(grads[2]), has_biases, num_layers, bidirectional,
                  variant.cell, cell_params, variant.zoneout);
      result = {grad_input, grad_hx, grad_cx};
      result.insert(result.end(), grad_params.begin(), grad_params.end());
    }
    for (size_t i = 0; i < 3 && step; ++i) {
      if (result[i].defined()) result[i] = result[i].squeeze(0);
    }
    // One gradient per forward argument (each tensor of a list its own): none for batch_sizes,
    // the five options, the cell's name, recurrent_dropout, zoneout, return_workspace and step.
    const auto cell_grads = result.end() - num_cell_params;
    variable_list per_argument(result.begin(), result.begin() + 1);
    per_argument.push_back(Tensor());
    per_argument.insert(per_argument.end(), result.begin() + 1, cell_grads);
    per_argument.resize(per_argument.size() + 6);
    per_argument.insert(per_argument.end(), cell_grads, result.end());
    per_argument.resize(per_argument.size() + 4);
    return per_argument;
  }
};

// The Autograd kernel: LSTMFunction whenever a gradient will be needed, the workspace returned as
// the caller asked; else straight to the operator below autograd.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> autograd_forward(
    const Tensor& input, const std::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace, c10::string_view cell, std::optional<TensorList> cell_params, double recurrent_dropout,
    at::ArrayRef<double> zoneout) {
  const TensorList cell_weights = cell_params.value_or(TensorList());
  if (!needs_gradient(input, hx, cx, params, cell_weights)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                        need_workspace, cell, cell_params, recurrent_dropout, zoneout);
  }
  variable_list outputs =
      LSTMFunction::apply(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                          cell, cell_weights, recurrent_dropout, zoneout, /*return_workspace=*/need_workspace,
                          /*step=*/false);
  return {outputs[0], outputs[1], outputs[2], std::vector<Tensor>(outputs.begin() + 3, outputs.end())};
}

}  // namespace

std::tuple<Tensor, Tensor> call_step(const Tensor& input, const Tensor& hx, const Tensor& cx, TensorList params,
                                     bool has_biases) {
  if (needs_gradient(input, hx, cx, params, {})) {
    const variable_list outputs =
        LSTMFunction::apply(input, std::nullopt, hx, cx, params, has_biases, 1, 0.0, false, false, "lstm",
                            TensorList(), 0.0, at::ArrayRef<double>(), /*return_workspace=*/false, /*step=*/true);
    return {outputs[0], outputs[1]};
  }
  // Nothing to differentiate: straight past autograd, as autograd_forward sends such a call,
  // rather than through it to ask needs_gradient again.
  const Tensor x = as_sequence(input, true), h0 = as_sequence(hx, true), c0 = as_sequence(cx, true);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [output, hy, cy, workspace] = call_forward(x, std::nullopt, h0, c0, params, has_biases, 1, 0.0, false, false,
                                                  /*need_workspace=*/false, "lstm", std::nullopt, 0.0, {});
  return {step_state(hy), step_state(cy)};
}

TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("forward", &autograd_forward);
}

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) {
  m.impl("forward", &at::autocast::WrapFunction<at::autocast::CastPolicy::lower_precision_fp, c10::DeviceType::CPU,
                                                ForwardSignature, ForwardSignature, &call_forward>::type::call);
}

}  // namespace lstm_ext
