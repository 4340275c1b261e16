// lstm_ext::forward's kernels above its CPU one: what the dispatcher runs before the operator.
//
// Autograd: the hand-written backward, lstm_ext::backward, as a C++ autograd Function, so that the
// operator is differentiable without Python (a libtorch program, a traced or exported graph run
// from C++). lstm_ext.lstm in Python runs its own autograd.Function (functional.py) and calls the
// operator below this kernel.
//
// AutocastCPU: native's cast policy for lstm (lower_precision_fp, the one of mkldnn_rnn_layer, the
// kernel native's LSTM runs on CPU): every floating point tensor but float64 in autocast's dtype,
// through autocast's weight cache, so the output comes out in that dtype and autograd records the
// casts (gradients reach float32 weights in float32).
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace lstm_ext {
namespace {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, TensorList, bool, int64_t, double,
    bool, bool, bool);

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> call_forward(
    const Tensor& input, const std::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lstm_ext::forward", "").typed<ForwardSignature>();
  return op.call(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                 need_workspace);
}

using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, TensorList, TensorList,
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, bool, int64_t, bool);

std::optional<Tensor> defined_or_none(const Tensor& grad) {
  return grad.defined() ? std::optional<Tensor>(grad) : std::nullopt;
}

// forward's outputs are (output, hy, cy, workspace...); the workspace is what the backward reads.
class LSTMFunction : public torch::autograd::Function<LSTMFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& batch_sizes,
                               const Tensor& hx, const Tensor& cx, TensorList params, bool has_biases,
                               int64_t num_layers, double dropout, bool train, bool bidirectional) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, cy, workspace] = call_forward(input, batch_sizes, hx, cx, params, has_biases, num_layers,
                                                    dropout, train, bidirectional, /*need_workspace=*/true);
    ctx->mark_non_differentiable(workspace);
    // Outputs without a gradient (the workspace, often h_n and c_n) reach the backward undefined,
    // which it reads as zeros, instead of as zero tensors autograd would fill.
    ctx->set_materialize_grads(false);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["num_params"] = static_cast<int64_t>(params.size());
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    variable_list saved{input, hx, cx};
    saved.insert(saved.end(), params.begin(), params.end());
    saved.insert(saved.end(), workspace.begin(), workspace.end());
    ctx->save_for_backward(saved);
    variable_list outputs{output, hy, cy};
    outputs.insert(outputs.end(), workspace.begin(), workspace.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lstm_ext::backward", "").typed<BackwardSignature>();
    const variable_list saved = ctx->get_saved_variables();
    const int64_t num_params = ctx->saved_data["num_params"].toInt();
    const TensorList params = TensorList(saved).slice(3, num_params);
    const TensorList workspace = TensorList(saved).slice(3 + num_params);
    const auto call_backward = [&] {
      return op.call(saved[0], ctx->saved_data["batch_sizes"].toOptional<Tensor>(), saved[1], saved[2], params,
                     workspace, defined_or_none(grads[0]), defined_or_none(grads[1]), defined_or_none(grads[2]),
                     ctx->saved_data["has_biases"].toBool(), ctx->saved_data["num_layers"].toInt(),
                     ctx->saved_data["bidirectional"].toBool());
    };
    // Under create_graph the backward is an operator autograd sees (lstm_ext::backward's own
    // autograd decides what its gradient is); otherwise it runs below autograd, as a plain kernel.
    auto [grad_input, grad_hx, grad_cx, grad_params] = [&] {
      if (torch::autograd::GradMode::is_enabled()) return call_backward();
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return call_backward();
    }();
    // One gradient per forward argument: none for batch_sizes and the five options.
    variable_list result{grad_input, Tensor(), grad_hx, grad_cx};
    result.insert(result.end(), grad_params.begin(), grad_params.end());
    result.resize(result.size() + 5);
    return result;
  }
};

// The Autograd kernel: LSTMFunction whenever a gradient will be needed, the workspace returned as
// the caller asked; else straight to the operator below autograd.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> autograd_forward(
    const Tensor& input, const std::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace) {
  const auto requires_grad = [](const Tensor& t) { return t.requires_grad(); };
  const bool needs_gradient =
      torch::autograd::GradMode::is_enabled() &&
      (input.requires_grad() || hx.requires_grad() || cx.requires_grad() ||
       std::any_of(params.begin(), params.end(), requires_grad));
  if (!needs_gradient) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                        need_workspace);
  }
  variable_list outputs =
      LSTMFunction::apply(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional);
  std::vector<Tensor> workspace = need_workspace ? std::vector<Tensor>(outputs.begin() + 3, outputs.end())
                                                 : std::vector<Tensor>{};
  return {outputs[0], outputs[1], outputs[2], std::move(workspace)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("forward", &autograd_forward);
}

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) {
  m.impl("forward", &at::autocast::WrapFunction<at::autocast::CastPolicy::lower_precision_fp, c10::DeviceType::CPU,
                                                ForwardSignature, ForwardSignature, &call_forward>::type::call);
}

}  // namespace lstm_ext
