// lstm_ext::forward's kernels above its CPU one: what the dispatcher runs before the operator.
//
// AutocastCPU: native's cast policy for lstm (lower_precision_fp, the one of mkldnn_rnn_layer, the
// kernel native's LSTM runs on CPU): every floating point tensor but float64 in autocast's dtype,
// through autocast's weight cache, so the output comes out in that dtype and autograd records the
// casts (gradients reach float32 weights in float32).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace lstm_ext {
namespace {

using at::Tensor;
using at::TensorList;

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

}  // namespace

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) {
  m.impl("forward", &at::autocast::WrapFunction<at::autocast::CastPolicy::lower_precision_fp, c10::DeviceType::CPU,
                                                ForwardSignature, ForwardSignature, &call_forward>::type::call);
}

}  // namespace lstm_ext
