// The Python module lstm_ext._C. Importing it loads this library, whose static initialisers
// register the operators with the dispatcher (lstm.cpp, dispatch.cpp); Python calls them as
// torch.ops.lstm_ext.*.
//
// Its first two functions are lstm_ext.lstm's and lstm_ext.lstm_cell's eager calls (functional.py): the
// same operator, called through the dispatcher from C++, so that autograd is dispatch.cpp's C++
// LSTMFunction. From Python, torch.ops boxes every argument and an autograd.Function runs its
// bookkeeping in Python: most of a decoding step's call at small sizes. recomputed_backward is
// dispatch.cpp's, for functional.py's autograd.Function under create_graph: one of it, in C++.
#include <torch/extension.h>

#include "ops.h"

#include <string>
#include <tuple>
#include <vector>

namespace lstm_ext {
namespace {

using at::Tensor;

// Every tensor dense and on the input's device: a meta tensor among CPU ones would send the call
// to the shape-only kernel. The checks and messages of functional.py's _check_tensors, which the
// calls that cannot come here (traced, compiled) run.
void check_tensors(const Tensor& input, std::initializer_list<at::TensorList> lists) {
  TORCH_CHECK_NOT_IMPLEMENTED(input.is_cpu() || input.is_meta(), "lstm_ext runs on CPU only, got input on ",
                              input.device(), "; use torch.nn.LSTM there");
  for (const at::TensorList list : lists) {
    for (const Tensor& t : list) {
      TORCH_CHECK(t.device() == input.device(),
                  "lstm_ext: input, hidden states and parameters must be on one device, got input on ",
                  input.device(), " and a tensor on ", t.device());
      TORCH_CHECK(t.layout() == at::kStrided, "lstm_ext: expected dense (strided) tensors, got one with layout ",
                  t.layout());
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const std::optional<Tensor>& batch_sizes,
                                           const Tensor& hx, const Tensor& cx, const std::vector<Tensor>& params,
                                           bool has_biases, int64_t num_layers, double dropout, bool train,
                                           bool bidirectional, const std::string& cell,
                                           const std::vector<Tensor>& cell_params, double recurrent_dropout,
                                           const std::vector<double>& zoneout) {
  check_tensors(input, {at::TensorList(input), hx, cx, params, cell_params});
  TORCH_CHECK(!batch_sizes.has_value() || batch_sizes->is_cpu(),
              "lstm_ext: batch_sizes must be a CPU tensor, got one on ",
              batch_sizes.has_value() ? batch_sizes->device() : at::Device(at::kCPU));
  // A gradient needs no workspace returned: the Autograd kernel keeps it for the backward.
  auto [output, hy, cy, workspace] =
      call_forward(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                   /*need_workspace=*/false, cell, cell_params, recurrent_dropout, zoneout);
  return {output, hy, cy};
}

// The plain cell's step on [B, I]: a one-step, one-layer forward.
std::tuple<Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                                     const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                     const std::optional<Tensor>& b_hh) {
  const bool has_biases = b_ih.has_value();
  std::vector<Tensor> params{w_ih, w_hh};
  if (has_biases) params.insert(params.end(), {*b_ih, *b_hh});
  check_tensors(input, {at::TensorList(input), hx, cx, params});
  return call_step(input, hx, cx, params, has_biases);
}

// recomputed_backward (ops.h) for functional.py's _LSTMFunction; None for an absent gradient.
std::vector<std::optional<Tensor>> recompute_backward(const std::vector<Tensor>& leaves, int64_t num_params,
                                                      const std::optional<Tensor>& batch_sizes,
                                                      const std::vector<Tensor>& workspace, bool has_biases,
                                                      int64_t num_layers, bool bidirectional, const std::string& cell,
                                                      double recurrent_dropout, const std::vector<double>& zoneout,
                                                      const std::vector<std::optional<Tensor>>& grads) {
  std::vector<Tensor> given;
  for (const std::optional<Tensor>& grad : grads) given.push_back(grad.value_or(Tensor()));
  std::vector<std::optional<Tensor>> result;
  for (Tensor& grad : recomputed_backward(leaves, num_params, batch_sizes, workspace, has_biases, num_layers,
                                          bidirectional, cell, recurrent_dropout, zoneout, given)) {
    result.push_back(grad.defined() ? std::optional<Tensor>(std::move(grad)) : std::nullopt);
  }
  return result;
}

// The workspace's type and the shapes of its entries (ops.h) for the fake implementation, whose
// sizes may be symbols: pure shape arithmetic, on Python's SymInts.
std::tuple<at::ScalarType, std::vector<std::vector<c10::SymInt>>> workspace_layout(
    at::ScalarType input, int64_t num_layers, bool bidirectional, const c10::SymInt& rows, const c10::SymInt& batch,
    const c10::SymInt& hidden, const c10::SymInt& proj, double dropout, bool train, double recurrent_dropout,
    const std::vector<double>& zoneout, bool layer_norm) {
  return {compute_type(input), workspace_shapes<c10::SymInt>(num_layers, bidirectional, rows, batch, hidden, proj,
                                                             dropout, train, recurrent_dropout, zoneout, layer_norm)};
}

}  // namespace
}  // namespace lstm_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lstm_ext operators, registered as torch.ops.lstm_ext.*, and the eager entries of lstm_ext.functional";
  // Without the GIL, as torch.ops calls run: other Python threads step their own decoders meanwhile.
  const auto without_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("forward", &lstm_ext::forward, without_gil);
  m.def("lstm_cell", &lstm_ext::lstm_cell, without_gil);
  // Without the GIL also because the autograd engine it runs refuses a caller holding it.
  m.def("recomputed_backward", &lstm_ext::recompute_backward, without_gil,
        "The backward by differentiating lstm_ext::forward_differentiable (see csrc/ops.h)");
  // With the GIL: symbolic sizes compute in Python.
  m.def("workspace_layout", &lstm_ext::workspace_layout,
        "(dtype, shapes) of lstm_ext::forward's workspace for a call (see csrc/ops.h)");
  m.def("kernels_capability", &lstm_ext::kernels_capability,
        "The instruction set whose kernels run: DEFAULT, AVX2 or AVX512 (see csrc/ops.cpp)");
}
