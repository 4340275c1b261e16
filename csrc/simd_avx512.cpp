// lstm.cpp for CPUs with AVX-512 (F, BW, VL, DQ; ATen's AVX512 capability). The target applies to
// every function below it, the included headers' too; the macros select at::vec's AVX-512 vectors
// and the AVX-512 paths of blas.h and cell.h.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// What -mavx512f ... -mf16c would define, and the pragma does not: sleef.h declares its 16-lane
// functions (at::vec's exp, log, ...) only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_DEFAULT
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "lstm.cpp"

namespace lstm_ext {
Kernels avx512_kernels() { return AVX512::kernels(); }
}  // namespace lstm_ext
