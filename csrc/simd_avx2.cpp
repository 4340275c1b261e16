// lstm.cpp for CPUs with AVX2, FMA and F16C (ATen's AVX2 capability). The target applies to
// every function below it, the included headers' too; the macros select at::vec's AVX2 vectors
// and the AVX2 paths of blas.h and cell.h.
#pragma GCC target("avx2,fma,f16c")
// What -mavx2 -mfma -mf16c would define, and the pragma does not: sleef.h declares its 8-lane
// functions (at::vec's exp, log, ...) only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_DEFAULT
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "lstm.cpp"

namespace lstm_ext {
Kernels avx2_kernels() { return AVX2::kernels(); }
}  // namespace lstm_ext
