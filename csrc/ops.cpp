// The operators: their schemas, and the CPU kernels of the best instruction set this CPU has.
//
// lstm.cpp is compiled once per capability of ATen's (kernels.cpp, simd_*.cpp), and the choice is made when
// the library loads, by at::get_cpu_capability(), as ATen's DispatchStub chooses its own kernels:
// one build runs on every x86-64 CPU and uses the widest vectors it has. ATEN_CPU_CAPABILITY
// (default, avx2, avx512) forces a lower capability, for ATen and lstm_ext alike.
#include <ATen/Version.h>
#include <torch/library.h>

#include "ops.h"

#include <string>

namespace lstm_ext {
namespace {

struct Chosen {
  const char* capability;
  Kernels kernels;
};

const Chosen& chosen() {
  static const Chosen chosen = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Chosen{"AVX512", avx512_kernels()};
    if (capability == "AVX2") return Chosen{"AVX2", avx2_kernels()};
    return Chosen{"DEFAULT", default_kernels()};
  }();
  return chosen;
}

}  // namespace

const char* kernels_capability() { return chosen().capability; }

TORCH_LIBRARY(lstm_ext, m) {
  m.def(
      "forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor[] params, bool has_biases, "
      "int num_layers, float dropout, bool train, bool bidirectional, bool need_workspace, str cell=\"lstm\", "
      "Tensor[]? cell_params=None, float recurrent_dropout=0., float[] zoneout=[]) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor[] workspace)");
  m.def(
      "backward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor[] params, Tensor[] workspace, "
      "Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, bool has_biases, int num_layers, bool bidirectional, "
      "str cell=\"lstm\", Tensor[]? cell_params=None, float[] zoneout=[]) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_params)");
  m.def(
      "forward_differentiable(Tensor input, int[]? batch_sizes, Tensor hx, Tensor cx, Tensor[] params, "
      "bool has_biases, int num_layers, float dropout, bool train, bool bidirectional, Tensor? dropout_masks, "
      "str cell=\"lstm\", Tensor[]? cell_params=None, float recurrent_dropout=0., Tensor? recurrent_masks=None, "
      "float[] zoneout=[], Tensor[]? zoneout_masks=None) "
      "-> (Tensor output, Tensor hy, Tensor cy)");
  m.def(
      "quantized_forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor[] params, Tensor[] scales, "
      "bool has_biases, int num_layers, bool bidirectional) -> (Tensor output, Tensor hy, Tensor cy)");
}

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("forward", chosen().kernels.forward);
  m.impl("backward", chosen().kernels.backward);
  m.impl("quantized_forward", chosen().kernels.quantized_forward);
}

TORCH_LIBRARY_IMPL(lstm_ext, CompositeImplicitAutograd, m) {
  m.impl("forward_differentiable", chosen().kernels.forward_differentiable);
}

// Under vmap, too, it decomposes into ATen ops (which have batching rules).
TORCH_LIBRARY_IMPL(lstm_ext, FuncTorchBatchedDecomposition, m) {
  m.impl("forward_differentiable", chosen().kernels.forward_differentiable);
}

}  // namespace lstm_ext
