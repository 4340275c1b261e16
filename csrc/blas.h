// The one seam between the recurrent loops and matrix products.
//
// Every product in the loops multiplies by a weight that stays fixed for a whole call, so the
// weight is packed once per call into column panels and then reused for every step (and for all
// rows of the input projection). For float and double the products run our own register-blocked
// at::vec kernel over those panels: it skips the per-call packing a BLAS does and, on this
// project's AVX2 machines, beats MKL's sgemm on the small-M recurrent shapes. The reduced
// floating types go through ATen ops on a view of the unpacked weight instead.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lstm_ext::blas {

// A row-major matrix view: rows × cols with leading dimension ld (elements between rows).
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, ld;
};

// A 2-D tensor whose rows are contiguous, as a Matrix.
template <typename T>
Matrix<T> as_matrix(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1));
  return {t.data_ptr<std::remove_const_t<T>>(), t.size(0), t.size(1), t.stride(0)};
}

template <typename T>
constexpr bool kOwnKernel = std::is_same_v<T, float> || std::is_same_v<T, double>;

namespace kernel {

template <typename T>
using Vec = at::vec::Vectorized<T>;
// Columns per panel: two vectors, so a row of a 6-row tile fills two accumulators.
template <typename T>
constexpr int64_t kPanelWidth = 2 * Vec<T>::size();
// Rows per register tile: 6 rows × 2 vectors = 12 accumulators, plus 2 for the panel row and
// 1 for the broadcast of A, out of AVX2's 16 registers.
constexpr int64_t kTileRows = 6;
// Depth of the panel slice kept in L1 while the tiles of a row block stream past it.
constexpr int64_t kDepthBlock = 256;
// Rows whose A slice ([rows, kDepthBlock]) stays in L2 while every panel streams past it.
constexpr int64_t kRowBlock = 96;

// c[Rows, Panels·width] += a[Rows, depth] · (Panels consecutive panels, `depth` deep). With few
// rows, several panels at once keep enough independent accumulators to hide the FMA latency.
template <typename T, int Rows, int Panels>
inline void tile(const T* a, int64_t lda, const T* panels, int64_t panel_stride, int64_t depth, T* c, int64_t ldc) {
  constexpr int64_t L = Vec<T>::size(), W = kPanelWidth<T>, Cols = 2 * Panels;
  Vec<T> acc[Rows][Cols];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) acc[i][j] = Vec<T>::loadu(c + i * ldc + j * L);
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec<T> b[Cols];
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) b[j] = Vec<T>::loadu(panels + (j / 2) * panel_stride + k * W + (j % 2) * L);
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      const Vec<T> a_ik(a[i * lda + k]);
#pragma GCC unroll 8
      for (int j = 0; j < Cols; ++j) acc[i][j] = at::vec::fmadd(a_ik, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) acc[i][j].store(c + i * ldc + j * L);
  }
}

template <typename T, int Panels>
inline void tile_rows(int64_t rows, const T* a, int64_t lda, const T* panels, int64_t panel_stride, int64_t depth,
                      T* c, int64_t ldc) {
  switch (rows) {
    case 1: return tile<T, 1, Panels>(a, lda, panels, panel_stride, depth, c, ldc);
    case 2: return tile<T, 2, Panels>(a, lda, panels, panel_stride, depth, c, ldc);
    case 3: return tile<T, 3, Panels>(a, lda, panels, panel_stride, depth, c, ldc);
    case 4: return tile<T, 4, Panels>(a, lda, panels, panel_stride, depth, c, ldc);
    case 5: return tile<T, 5, Panels>(a, lda, panels, panel_stride, depth, c, ldc);
    default: return tile<T, 6, Panels>(a, lda, panels, panel_stride, depth, c, ldc);
  }
}

// c[rows, panel_count·width] += a[rows, depth] · panels, in tiles of kTileRows rows.
template <typename T>
inline void tiles(int64_t rows, int64_t panel_count, const T* a, int64_t lda, const T* panels,
                  int64_t panel_stride, int64_t depth, T* c, int64_t ldc) {
  constexpr int64_t W = kPanelWidth<T>;
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int64_t n = std::min(kTileRows, rows - r);
    const T* a_r = a + r * lda;
    T* c_r = c + r * ldc;
    int64_t p = 0;
    // Fewer than three rows: walk four (one row) or two (two rows) panels at once.
    const auto panel = [&](int64_t q) { return panels + q * panel_stride; };
    if (n == 1) {
      for (; p + 4 <= panel_count; p += 4) tile<T, 1, 4>(a_r, lda, panel(p), panel_stride, depth, c_r + p * W, ldc);
    } else if (n == 2) {
      for (; p + 2 <= panel_count; p += 2) tile<T, 2, 2>(a_r, lda, panel(p), panel_stride, depth, c_r + p * W, ldc);
    }
    for (; p < panel_count; ++p) tile_rows<T, 1>(n, a_r, lda, panel(p), panel_stride, depth, c_r + p * W, ldc);
  }
}

}  // namespace kernel

// A weight W [n, k] used as the right operand of C = A·Wᵀ for a whole call, packed into panels
// of kPanelWidth consecutive rows of W (columns of C), each stored depth-major: panel[k][lane].
// W's rows are cut into groups (the four gate blocks of W_hh) so that no panel straddles two:
// a thread owning a slice of every gate block then owns whole panels.
template <typename T>
class PackedWeight {
 public:
  static constexpr int64_t kPanelWidth = kOwnKernel<T> ? kernel::kPanelWidth<T> : 1;

  // weight: a [n, k] view, any strides (a weight [k, n] transposed, for C = A·B).
  PackedWeight(const at::Tensor& weight, int64_t group) : k_(weight.size(1)), group_(group) {
    if constexpr (!kOwnKernel<T>) {
      unpacked_ = weight;
    } else {
      const T* data = weight.data_ptr<T>();
      const int64_t n = weight.size(0), k = k_, row_stride = weight.stride(0), col_stride = weight.stride(1);
      const int64_t W = kPanelWidth, per_group = panels_per_group(), panels = group == 0 ? 0 : n / group * per_group;
      panels_ = at::empty({panels, k, W}, weight.options());
      T* out = panels_.data_ptr<T>();
      // Threads only for big weights; reads run along whichever of W's axes is contiguous.
      at::parallel_for(0, panels, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, k * W)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t first = (p / per_group) * group + (p % per_group) * W;
          const int64_t width = std::min(W, (p / per_group + 1) * group - first);
          const T* src = data + first * row_stride;
          T* panel = out + p * k * W;
          if (width < W) std::fill(panel, panel + k * W, T(0));
          if (col_stride <= row_stride) {
            for (int64_t lane = 0; lane < width; ++lane) {
              for (int64_t j = 0; j < k; ++j) panel[j * W + lane] = src[lane * row_stride + j * col_stride];
            }
          } else {
            for (int64_t j = 0; j < k; ++j) {
              for (int64_t lane = 0; lane < width; ++lane) {
                panel[j * W + lane] = src[lane * row_stride + j * col_stride];
              }
            }
          }
        }
      });
    }
  }
  // For C = A·Wᵀ with a weight W [n, k] as torch stores it.
  static PackedWeight rows_of(const at::Tensor& weight, int64_t group) { return PackedWeight(weight, group); }
  // For C = A·W with a weight W [k, n].
  static PackedWeight columns_of(const at::Tensor& weight, int64_t group) { return PackedWeight(weight.t(), group); }

  // C = A · W[first_col : first_col + C.cols]ᵀ, plus C when `accumulate`, plus bias (indexed
  // like C's columns) when given. The columns must lie in one group and first_col must start a
  // panel. Never throws for float and double (it runs inside the step loop's thread team).
  void multiply(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate, const T* bias = nullptr) const {
    if (c.rows == 0 || c.cols == 0) return;
    if constexpr (!kOwnKernel<T>) {
      multiply_aten(a, first_col, c, accumulate, bias);
    } else {
      for (int64_t r = 0; r < c.rows; r += kernel::kRowBlock) {
        const int64_t rows = std::min(kernel::kRowBlock, c.rows - r);
        multiply_block({a.data + r * a.ld, rows, a.cols, a.ld}, first_col, {c.data + r * c.ld, rows, c.cols, c.ld},
                       accumulate, bias);
      }
    }
  }

  // multiply() over many rows, split between torch's threads.
  void multiply_parallel(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate,
                         const T* bias = nullptr) const {
    if constexpr (!kOwnKernel<T>) return multiply(a, first_col, c, accumulate, bias);  // ATen threads itself
    const int64_t grain = std::max<int64_t>(kernel::kRowBlock / 4, (1 << 20) / std::max<int64_t>(1, c.cols * k_));
    at::parallel_for(0, c.rows, grain, [&](int64_t begin, int64_t end) {
      multiply({a.data + begin * a.ld, end - begin, a.cols, a.ld}, first_col,
               {c.data + begin * c.ld, end - begin, c.cols, c.ld}, accumulate, bias);
    });
  }

 private:
  int64_t panels_per_group() const { return (group_ + kPanelWidth - 1) / kPanelWidth; }

  void multiply_block(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate, const T* bias) const {
    constexpr int64_t W = kPanelWidth;
    if (!accumulate) {
      for (int64_t r = 0; r < c.rows; ++r) {
        T* row = c.data + r * c.ld;
        if (bias) {
          std::memcpy(row, bias, c.cols * sizeof(T));
        } else {
          std::fill(row, row + c.cols, T(0));
        }
      }
    }
    const int64_t group = first_col / group_, within = first_col % group_;
    const T* panels = panels_.data_ptr<T>() + (group * panels_per_group() + within / W) * k_ * W;
    const int64_t full = c.cols / W, rest = c.cols % W;
    for (int64_t k0 = 0; k0 < k_; k0 += kernel::kDepthBlock) {
      const int64_t depth = std::min(kernel::kDepthBlock, k_ - k0);
      const T* a_k = a.data + k0;
      const T* panels_k = panels + k0 * W;
      kernel::tiles<T>(c.rows, full, a_k, a.ld, panels_k, k_ * W, depth, c.data, c.ld);
      if (rest > 0) {
        // The group's last, narrower panel: through a full-width scratch tile.
        T scratch[kernel::kTileRows * W];
        for (int64_t r = 0; r < c.rows; r += kernel::kTileRows) {
          const int64_t rows = std::min(kernel::kTileRows, c.rows - r);
          T* c_r = c.data + r * c.ld + full * W;
          for (int64_t i = 0; i < rows; ++i) {
            std::memcpy(scratch + i * W, c_r + i * c.ld, rest * sizeof(T));
          }
          kernel::tile_rows<T, 1>(rows, a_k + r * a.ld, a.ld, panels_k + full * k_ * W, k_ * W, depth, scratch, W);
          for (int64_t i = 0; i < rows; ++i) std::memcpy(c_r + i * c.ld, scratch + i * W, rest * sizeof(T));
        }
      }
    }
  }

  void multiply_aten(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate, const T* bias) const {
    const auto as_tensor = [&](auto m) {
      return at::from_blob(const_cast<T*>(m.data), {m.rows, m.cols}, {m.ld, 1}, unpacked_.options());
    };
    at::Tensor out = as_tensor(c);
    const at::Tensor lhs = as_tensor(a), rhs = unpacked_.narrow(0, first_col, c.cols).t();
    if (accumulate) {
      out.addmm_(lhs, rhs);
    } else if (bias) {
      at::addmm_out(out, at::from_blob(const_cast<T*>(bias), {c.cols}, unpacked_.options()), lhs, rhs);
    } else {
      at::mm_out(out, lhs, rhs);
    }
  }

  int64_t k_, group_;
  at::Tensor panels_;    // [panels, k, kPanelWidth] (float, double)
  at::Tensor unpacked_;  // [n, k] view of the weight (other types)
};

}  // namespace lstm_ext::blas
