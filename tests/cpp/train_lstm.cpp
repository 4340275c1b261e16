// lstm_ext from C++ alone: this program loads libtorch and the lstm_ext library, no Python.
//
// It differentiates lstm_ext::forward through the operator's C++ autograd and checks
//   1. its gradients equal those of libtorch's own LSTM (at::lstm: ATen's operator and its
//      autograd) on the same weights, in float64; the Python suite checks the Python path's
//      gradients against the same oracle, so the two paths agree with each other;
//   2. a few steps of SGD on a tiny sequence regression lower the loss.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kSteps = 7, kBatch = 3, kInput = 4, kHidden = 5, kProj = 3, kLayers = 2;

std::tuple<Tensor, Tensor, Tensor> lstm_ext_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                    const std::vector<Tensor>& params, bool bidirectional) {
  // The schema's trailing arguments name a cell variant: here the plain LSTM.
  using Signature = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(
      const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, at::TensorList, bool, int64_t,
      double, bool, bool, bool, c10::string_view, std::optional<at::TensorList>, double, at::ArrayRef<double>);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lstm_ext::forward", "").typed<Signature>();
  auto [output, hy, cy, workspace] =
      op.call(x, std::nullopt, h0, c0, params, /*has_biases=*/true, kLayers, /*dropout=*/0.0, /*train=*/true,
              bidirectional, /*need_workspace=*/false, /*cell=*/"lstm", /*cell_params=*/std::nullopt,
              /*recurrent_dropout=*/0.0, /*zoneout=*/{});
  return {output, hy, cy};
}

// Weights in nn.LSTM's _flat_weights order: per layer and direction w_ih, w_hh, b_ih, b_hh[, w_hr].
std::vector<Tensor> make_params(bool bidirectional, int64_t proj, at::ScalarType dtype) {
  const int64_t directions = bidirectional ? 2 : 1, out = proj > 0 ? proj : kHidden;
  std::vector<Tensor> params;
  for (int64_t layer = 0; layer < kLayers; ++layer) {
    for (int64_t d = 0; d < directions; ++d) {
      const int64_t in = layer == 0 ? kInput : directions * out;
      for (auto shape : {std::vector<int64_t>{4 * kHidden, in}, {4 * kHidden, out}, {4 * kHidden}, {4 * kHidden}}) {
        params.push_back(at::rand(shape, at::dtype(dtype)).sub_(0.5).requires_grad_());
      }
      if (proj > 0) params.push_back(at::rand({proj, kHidden}, at::dtype(dtype)).sub_(0.5).requires_grad_());
    }
  }
  return params;
}

bool check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
  return ok;
}

// Gradients of a weighted sum of (output, h_n, c_n) with respect to x, h0, c0 and every weight.
std::vector<Tensor> gradients(const std::tuple<Tensor, Tensor, Tensor>& outputs, const std::vector<Tensor>& inputs) {
  const auto& [output, hy, cy] = outputs;
  const Tensor loss = (output * output.detach().cos()).sum() + (hy * 2).sum() + (cy * cy).sum();
  return torch::autograd::grad({loss}, inputs);
}

bool gradients_match_native(bool bidirectional, int64_t proj) {
  const int64_t directions = bidirectional ? 2 : 1;
  const auto f64 = at::dtype(at::kDouble);
  const Tensor x = at::randn({kSteps, kBatch, kInput}, f64).requires_grad_();
  const Tensor h0 = at::randn({kLayers * directions, kBatch, proj > 0 ? proj : kHidden}, f64).requires_grad_();
  const Tensor c0 = at::randn({kLayers * directions, kBatch, kHidden}, f64).requires_grad_();
  const std::vector<Tensor> params = make_params(bidirectional, proj, at::kDouble);
  std::vector<Tensor> inputs{x, h0, c0};
  inputs.insert(inputs.end(), params.begin(), params.end());

  const auto ext = lstm_ext_forward(x, h0, c0, params, bidirectional);
  const auto native = at::lstm(x, {h0, c0}, params, /*has_biases=*/true, kLayers, /*dropout=*/0.0, /*train=*/true,
                               bidirectional, /*batch_first=*/false);
  bool ok = std::get<0>(ext).allclose(std::get<0>(native), 1e-10, 1e-10) &&
            std::get<1>(ext).allclose(std::get<1>(native), 1e-10, 1e-10) &&
            std::get<2>(ext).allclose(std::get<2>(native), 1e-10, 1e-10);
  const std::vector<Tensor> ext_grads = gradients(ext, inputs), native_grads = gradients(native, inputs);
  for (size_t i = 0; i < inputs.size(); ++i) ok = ok && ext_grads[i].allclose(native_grads[i], 1e-10, 1e-10);
  return ok;
}

// A tiny regression (the tanh of the running sum of the input's features) trained with SGD.
bool training_lowers_the_loss() {
  const auto f32 = at::dtype(at::kFloat);
  const Tensor x = at::randn({kSteps, kBatch, kInput}, f32);
  const Tensor target = x.sum(2, /*keepdim=*/true).cumsum(0).tanh();
  const Tensor zeros = at::zeros({kLayers, kBatch, kHidden}, f32);
  std::vector<Tensor> params = make_params(/*bidirectional=*/false, /*proj=*/0, at::kFloat);
  const Tensor head = (at::rand({1, kHidden}, f32) - 0.5).requires_grad_();
  params.push_back(head);
  const std::vector<Tensor> lstm_params(params.begin(), params.end() - 1);
  float first = 0, last = 0;
  for (int step = 0; step < 100; ++step) {
    const Tensor output = std::get<0>(lstm_ext_forward(x, zeros, zeros, lstm_params, /*bidirectional=*/false));
    const Tensor loss = (at::matmul(output, head.t()) - target).pow(2).mean();
    const std::vector<Tensor> grads = torch::autograd::grad({loss}, params);
    {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) params[i].sub_(grads[i], /*alpha=*/0.5);
    }
    (step == 0 ? first : last) = loss.item<float>();
  }
  std::printf("loss %.4f -> %.4f\n", first, last);
  return last < 0.5f * first;
}

}  // namespace

int main() {
  at::manual_seed(0);
  bool ok = check(gradients_match_native(/*bidirectional=*/true, /*proj=*/0), "gradients equal at::lstm's");
  ok = check(gradients_match_native(/*bidirectional=*/true, kProj), "with projections too") && ok;
  ok = check(training_lowers_the_loss(), "training lowers the loss") && ok;
  return ok ? 0 : 1;
}
