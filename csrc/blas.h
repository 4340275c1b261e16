// The one seam between the recurrent loops and BLAS.
//
// The per-step GEMMs are small, and an ATen op call (~3-5 us) costs more than many of them, so
// the loops call BLAS directly on raw row-major pointers. torch's MKL exports the Fortran BLAS
// symbols; they are declared weak so that this library still loads into a torch built without
// them, and then every call goes through ATen ops instead (as it does for bfloat16 and half).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace lstm_ext::blas {

// A row-major matrix view: rows × cols with leading dimension ld (elements between rows).
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, ld;
};

namespace detail {

template <typename T>
at::Tensor as_tensor(Matrix<T> m) {
  return at::from_blob(const_cast<std::remove_const_t<T>*>(m.data), {m.rows, m.cols}, {m.ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<std::remove_const_t<T>>::value));
}

// Column-major BLAS on row-major data: C = A·op(B) is Cᵀ = op(B)ᵀ·Aᵀ.
template <typename T, typename Fn>
bool call_fortran(Fn* fn, bool b_transposed, Matrix<const T> a, Matrix<const T> b, Matrix<T> c, T beta) {
  if (fn == nullptr) return false;
  const char transb_as_a = b_transposed ? 'T' : 'N', trans_a = 'N';
  const int m = static_cast<int>(c.cols), n = static_cast<int>(c.rows), k = static_cast<int>(a.cols);
  const int lda = static_cast<int>(b.ld), ldb = static_cast<int>(a.ld), ldc = static_cast<int>(c.ld);
  const T alpha = 1;
  fn(&transb_as_a, &trans_a, &m, &n, &k, &alpha, b.data, &lda, a.data, &ldb, &beta, c.data, &ldc);
  return true;
}

template <typename T>
void gemm(bool b_transposed, Matrix<const T> a, Matrix<const T> b, Matrix<T> c, T beta) {
  if (c.rows == 0 || c.cols == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (call_fortran<float>(sgemm_, b_transposed, a, b, c, beta)) return;
  } else if constexpr (std::is_same_v<T, double>) {
    if (call_fortran<double>(dgemm_, b_transposed, a, b, c, beta)) return;
  }
  at::Tensor out = as_tensor(c);
  const at::Tensor lhs = as_tensor(a), rhs = b_transposed ? as_tensor(b).t() : as_tensor(b);
  if (beta == T(0)) {
    at::mm_out(out, lhs, rhs);
  } else {
    out.addmm_(lhs, rhs, beta);
  }
}

}  // namespace detail

// C = beta·C + A·Bᵀ, with A [m, k] and B [n, k] (B is a weight stored [out, in]).
template <typename T>
void gemm_nt(Matrix<const T> a, Matrix<const T> b, Matrix<T> c, T beta) {
  detail::gemm<T>(true, a, b, c, beta);
}

// C = beta·C + A·B, with A [m, k] and B [k, n].
template <typename T>
void gemm_nn(Matrix<const T> a, Matrix<const T> b, Matrix<T> c, T beta) {
  detail::gemm<T>(false, a, b, c, beta);
}

}  // namespace lstm_ext::blas
