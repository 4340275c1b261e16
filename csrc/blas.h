// The one seam between the recurrent loops and matrix products.
//
// Every product in the loops multiplies by a weight that stays fixed for a whole call, so the
// weight is packed once per call into column panels and then reused for every step (and for all
// rows of the input projection). The products run our own register-blocked at::vec kernel over
// those panels, in float or double (AVX-512 or AVX2, as built): it skips the per-call packing a
// BLAS does and beats MKL's sgemm on the small-M recurrent shapes.
//
// The precision seam: a weight may be stored in a narrower type than the arithmetic (bfloat16,
// float16, or int8 with a scale per row), as RNN.cpp's quantized CellParams are. Products always
// run in float: packing converts the weight once, and a call that reads the weight as stored (a
// decoding step, bound by reading it) converts it block by block in L1, so that only the narrow
// bytes come from memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

namespace lstm_ext::inline CPU_CAPABILITY::blas {

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

// One product of multiply_transposed: c [m, n] = aᵀ·b for b [k, n].
template <typename T>
struct TransposedProduct {
  Matrix<const T> b;
  Matrix<T> c;
};

namespace kernel {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// A loaded vector held in a register. The compiler otherwise folds the load into each FMA that
// uses the vector, one load per use: a 3 × 8 tile of dot products then issued 27 loads per 24
// FMAs rather than 11, and waited on them.
template <typename T>
inline Vec<T> in_register(Vec<T> v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using Raw = std::conditional_t<std::is_same_v<T, float>, __m512, __m512d>;
#else
  using Raw = std::conditional_t<std::is_same_v<T, float>, __m256, __m256d>;
#endif
  Raw raw = v;
  asm("" : "+v"(raw));
  return raw;
#else
  return v;
#endif
}
// A vector of floats from Vectorized<float>::size() weights stored as S (bfloat16, float16): one
// widening instruction or two per vector (F16C's vcvtph2ps for float16).
template <typename S>
inline Vec<float> load_as_float(const S* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#else
  float values[Vec<float>::size()];
  for (int64_t i = 0; i < Vec<float>::size(); ++i) values[i] = static_cast<float>(p[i]);
  return Vec<float>::loadu(values);
#endif
}

// A vector of T from n <= Vec<T>::size() weights stored as S, the lanes past n zeros.
template <typename T, typename S>
inline Vec<T> load_weights(const S* p, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    return Vec<T>::loadu(p, n);
  } else {
    if (n == Vec<float>::size()) return load_as_float(p);
    S part[Vec<float>::size()];
    std::memset(part, 0, sizeof(part));
    std::copy(p, p + n, part);
    return load_as_float(part);
  }
}

// dst[r, j] = float(src[r, j]) for rows × depth elements: a block of a weight stored as S, made
// ready for the float kernels.
template <typename S>
void convert_rows(const S* src, int64_t ld_src, int64_t rows, int64_t depth, float* dst, int64_t ld_dst) {
  constexpr int64_t L = Vec<float>::size();
  for (int64_t r = 0; r < rows; ++r) {
    const S* in = src + r * ld_src;
    float* out = dst + r * ld_dst;
    int64_t j = 0;
    for (; j + L <= depth; j += L) load_as_float(in + j).store(out + j);
    for (; j < depth; ++j) out[j] = static_cast<float>(in[j]);
  }
}

// Columns per panel: two vectors, so a row of a 6-row tile fills two accumulators.
template <typename T>
constexpr int64_t kPanelWidth = 2 * Vec<T>::size();
// Rows per register tile: 6 rows × 2 vectors = 12 accumulators, plus 2 for the panel row and
// 1 for the broadcast of A, out of AVX2's 16 registers (AVX-512 has 32, and twice the width).
constexpr int64_t kTileRows = 6;
// Depth of the panel slice kept in L1 while the tiles of a row block stream past it.
constexpr int64_t kDepthBlock = 256;
// Rows whose A slice ([rows, kDepthBlock]) stays in L2 while every panel streams past it.
constexpr int64_t kRowBlock = 96;

// A weight of this many bytes or more (a core's L2 here) is read from memory by a step over few
// rows, whose arithmetic is a fraction of that reading: such a step splits its columns between
// threads whatever its arithmetic, so that each core reads, and keeps in its cache, only its
// share. An LSTMCell step at B1 H256 (two 1 MB weights), 2 threads: 36 -> 23 us.
constexpr int64_t kSplitWeightBytes = 1 << 20;

// A parallel loop's grain over `items`: `grain`, or at most an even share per thread when the
// loop reads or writes `bytes` of weights or more (kSplitWeightBytes).
inline int64_t split_grain(int64_t grain, int64_t items, int64_t bytes) {
  if (bytes < kSplitWeightBytes) return grain;
  const int64_t threads = at::get_num_threads();
  return std::min(grain, (items + threads - 1) / threads);
}

// Rows of a product per task when its rows are split between threads: at least ~1M multiply-adds
// (cols · depth per row), so that small products stay on one thread.
inline int64_t row_grain(int64_t cols, int64_t depth) {
  return std::max<int64_t>(kRowBlock / 4, (1 << 20) / std::max<int64_t>(1, cols * depth));
}

// The left operand A as the kernel reads it: element (r, k) is data[r * row_stride + k *
// depth_stride] within a tile, and the tile of row r0 starts at data + r0 * tile_step. Either a
// row-major matrix, or a block packed tile by tile ([tiles][depth][kTileRows]) so that a
// transposed A also reads contiguously.
template <typename T>
struct Left {
  const T* data;
  int64_t tile_step, row_stride, depth_stride;

  static Left row_major(const T* data, int64_t ld) { return {data, ld, ld, 1}; }
  static Left packed(const T* data, int64_t depth) { return {data, depth, 1, kTileRows}; }
  Left tile(int64_t r0) const { return {data + r0 * tile_step, tile_step, row_stride, depth_stride}; }
};

// The right operand B, kPanelWidth columns at a time: element (k, lane) of panel q is
// data[q * panel_stride + k * depth_stride + lane], packed panels ([panels][depth][width], a
// narrow last panel zero-padded).
template <typename T>
struct Right {
  const T* data;
  int64_t panel_stride, depth_stride;

  static Right packed(const T* data, int64_t depth) { return {data, depth * kPanelWidth<T>, kPanelWidth<T>}; }
  Right panel(int64_t q) const { return {data + q * panel_stride, panel_stride, depth_stride}; }
};

// c[Rows, Panels·width] += a[Rows, depth] · (Panels consecutive panels of b, `depth` deep), or = without
// `add_to_c`. With few rows, several panels at once keep enough independent accumulators to hide the
// FMA latency.
template <typename T, int Rows, int Panels>
inline void tile(Left<T> a, Right<T> b, int64_t depth, T* c, int64_t ldc, bool add_to_c) {
  constexpr int64_t L = Vec<T>::size(), Cols = 2 * Panels;
  Vec<T> acc[Rows][Cols];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) acc[i][j] = add_to_c ? Vec<T>::loadu(c + i * ldc + j * L) : Vec<T>(T(0));
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec<T> b_k[Cols];
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) {
      b_k[j] = Vec<T>::loadu(b.data + (j / 2) * b.panel_stride + k * b.depth_stride + (j % 2) * L);
    }
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      const Vec<T> a_ik(a.data[i * a.row_stride + k * a.depth_stride]);
#pragma GCC unroll 8
      for (int j = 0; j < Cols; ++j) acc[i][j] = at::vec::fmadd(a_ik, b_k[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) acc[i][j].store(c + i * ldc + j * L);
  }
}

template <typename T, int Panels>
inline void tile_rows(int64_t rows, Left<T> a, Right<T> b, int64_t depth, T* c, int64_t ldc, bool add_to_c) {
  switch (rows) {
    case 1: return tile<T, 1, Panels>(a, b, depth, c, ldc, add_to_c);
    case 2: return tile<T, 2, Panels>(a, b, depth, c, ldc, add_to_c);
    case 3: return tile<T, 3, Panels>(a, b, depth, c, ldc, add_to_c);
    case 4: return tile<T, 4, Panels>(a, b, depth, c, ldc, add_to_c);
    case 5: return tile<T, 5, Panels>(a, b, depth, c, ldc, add_to_c);
    default: return tile<T, 6, Panels>(a, b, depth, c, ldc, add_to_c);
  }
}

// c[rows, cols] += a[rows, depth] · b[depth, cols] (= without `add_to_c`), in tiles of kTileRows rows. b
// must be readable a whole panel wide: when cols is not a whole number of panels, its last panel's
// columns go through a full-width scratch tile.
template <typename T>
inline void tiles(int64_t rows, int64_t cols, Left<T> a, Right<T> b, int64_t depth, T* c, int64_t ldc,
                  bool add_to_c = true) {
  constexpr int64_t W = kPanelWidth<T>;
  const int64_t full = cols / W, rest = cols % W;
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int64_t n = std::min(kTileRows, rows - r);
    const Left<T> a_r = a.tile(r);
    T* c_r = c + r * ldc;
    int64_t p = 0;
    // Fewer than three rows: walk four (one row) or two (two rows) panels at once.
    if (n == 1) {
      for (; p + 4 <= full; p += 4) tile<T, 1, 4>(a_r, b.panel(p), depth, c_r + p * W, ldc, add_to_c);
    } else if (n == 2) {
      for (; p + 2 <= full; p += 2) tile<T, 2, 2>(a_r, b.panel(p), depth, c_r + p * W, ldc, add_to_c);
    }
    for (; p < full; ++p) tile_rows<T, 1>(n, a_r, b.panel(p), depth, c_r + p * W, ldc, add_to_c);
    if (rest > 0) {
      T scratch[kTileRows * W];
      T* c_rest = c_r + full * W;
      for (int64_t i = 0; i < n; ++i) std::memcpy(scratch + i * W, c_rest + i * ldc, rest * sizeof(T));
      tile_rows<T, 1>(n, a_r, b.panel(full), depth, scratch, W, add_to_c);
      for (int64_t i = 0; i < n; ++i) std::memcpy(c_rest + i * ldc, scratch + i * W, rest * sizeof(T));
    }
  }
}

// Four accumulators' lane sums added to out[0, count), count <= 4: four dot products finished at once.
template <typename T>
inline void add_lane_sums(const Vec<T>* acc, T* out, int64_t count) {
  T sums[4];
#if defined(CPU_CAPABILITY_AVX512)
  // Transposing adds: the four vectors are summed into one, lane groups interleaved, rather than
  // reduced one by one (13 instructions for the four sums, not 32).
  if constexpr (std::is_same_v<T, float>) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    // Each 128-bit lane now holds partial sums [a, b, c, d].
    const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                      _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    if (count == 4) return _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), quad));
    _mm_storeu_ps(sums, quad);
  } else {
    // Each 128-bit lane of ab holds partial sums [a, b], of cd [c, d].
    const __m512d ab = _mm512_add_pd(_mm512_unpacklo_pd(acc[0], acc[1]), _mm512_unpackhi_pd(acc[0], acc[1]));
    const __m512d cd = _mm512_add_pd(_mm512_unpacklo_pd(acc[2], acc[3]), _mm512_unpackhi_pd(acc[2], acc[3]));
    // [ab0 + ab1, ab2 + ab3, cd0 + cd1, cd2 + cd3] by 128-bit lanes, then the halves' pairs.
    const __m512d pairs =
        _mm512_add_pd(_mm512_shuffle_f64x2(ab, cd, 0b10001000), _mm512_shuffle_f64x2(ab, cd, 0b11011101));
    const __m512d quads = _mm512_add_pd(_mm512_shuffle_f64x2(pairs, pairs, 0b00001000),
                                        _mm512_shuffle_f64x2(pairs, pairs, 0b00001101));
    const __m256d quad = _mm512_castpd512_pd256(quads);
    if (count == 4) return _mm256_storeu_pd(out, _mm256_add_pd(_mm256_loadu_pd(out), quad));
    _mm256_storeu_pd(sums, quad);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
    if (count == 4) return _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), quad));
    _mm_storeu_ps(sums, quad);
  } else {
    const __m256d ab = _mm256_hadd_pd(acc[0], acc[1]), cd = _mm256_hadd_pd(acc[2], acc[3]);
    const __m256d quad = _mm256_add_pd(_mm256_permute2f128_pd(ab, cd, 0x20), _mm256_permute2f128_pd(ab, cd, 0x31));
    if (count == 4) return _mm256_storeu_pd(out, _mm256_add_pd(_mm256_loadu_pd(out), quad));
    _mm256_storeu_pd(sums, quad);
  }
#else
  for (int j = 0; j < 4; ++j) {
    T lanes[Vec<T>::size()];
    acc[j].store(lanes);
    sums[j] = std::accumulate(lanes, lanes + Vec<T>::size(), T(0));
  }
#endif
  for (int64_t j = 0; j < count; ++j) out[j] += sums[j];
}

// c[Rows, cols] += a[Rows, depth] · w[cols, depth]ᵀ for cols <= Cols (a multiple of 4), w's rows ldw
// apart: Rows × Cols dot products along depth, w read as stored.
// A weight stored as S (T float), converted in registers: a step over one to three rows reads each
// weight once, and storing it converted to read it back would cost more than the products.
template <typename T, int Rows, int Cols, typename S = T>
inline void dot_tile(const T* a, int64_t lda, const S* w, int64_t ldw, int64_t depth, int64_t cols, T* c,
                     int64_t ldc) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc[Rows][Cols];
  const S* w_rows[Cols];
#pragma GCC unroll 8
  for (int j = 0; j < Cols; ++j) {
    w_rows[j] = w + std::min<int64_t>(j, cols - 1) * ldw;  // past cols: a row again, summed but never stored
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) acc[i][j] = Vec<T>(T(0));
  }
  const auto step = [&](int64_t k, int64_t n) {
    Vec<T> a_k[Rows];
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) a_k[i] = Vec<T>::loadu(a + i * lda + k, n);
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) {
      const Vec<T> w_k = in_register<T>(load_weights<T>(w_rows[j] + k, n));
#pragma GCC unroll 8
      for (int i = 0; i < Rows; ++i) acc[i][j] = at::vec::fmadd(a_k[i], w_k, acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + L <= depth; k += L) step(k, L);
  if (k < depth) step(k, depth - k);  // masked loads: the lanes past depth are zeros
  for (int i = 0; i < Rows; ++i) {
    for (int j = 0; j < Cols && j < cols; j += 4) {
      add_lane_sums<T>(acc[i] + j, c + i * ldc + j, std::min<int64_t>(4, cols - j));
    }
  }
}

// Columns of a dot tile over several rows: each row of a, read from L2 when a is large, feeds that
// many sums per load. Eight with AVX-512's 32 registers (3 × 8 accumulators), four with AVX2's 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kDotCols = 8;
#else
constexpr int kDotCols = 4;
#endif

// c[rows, cols] += a[rows, depth] · w[cols, depth]ᵀ for a weight whose rows (ldw apart) are contiguous, read
// as stored: no packing. A block of kDotCols of w's rows stays in L1 while every row of a passes it.
template <typename T, typename S = T>
void dot_products(Matrix<const T> a, const S* w, int64_t ldw, Matrix<T> c) {
  if (c.rows == 1) {  // eight columns at once: eight independent sums hide the FMA latency
    for (int64_t j = 0; j < c.cols; j += 8) {
      dot_tile<T, 1, 8, S>(a.data, a.ld, w + j * ldw, ldw, a.cols, std::min<int64_t>(8, c.cols - j), c.data + j, c.ld);
    }
    return;
  }
  for (int64_t j = 0; j < c.cols; j += kDotCols) {
    const int64_t cols = std::min<int64_t>(kDotCols, c.cols - j);
    for (int64_t r = 0; r < c.rows; r += 3) {
      const T* a_r = a.data + r * a.ld;
      T* c_r = c.data + r * c.ld + j;
      switch (std::min<int64_t>(3, c.rows - r)) {
        case 1: dot_tile<T, 1, kDotCols, S>(a_r, a.ld, w + j * ldw, ldw, a.cols, cols, c_r, c.ld); break;
        case 2: dot_tile<T, 2, kDotCols, S>(a_r, a.ld, w + j * ldw, ldw, a.cols, cols, c_r, c.ld); break;
        default: dot_tile<T, 3, kDotCols, S>(a_r, a.ld, w + j * ldw, ldw, a.cols, cols, c_r, c.ld);
      }
    }
  }
}

// dot_products for a weight stored as S. Over one row tile (up to three rows) each weight is read
// once, converted in registers; over more, a block of w's rows at a time is converted into L1
// once for all of them (a stack block: no allocation inside the step loop's team). An LSTM step
// at B1 H1024, one thread, bfloat16 weights: 0.6x float32's speed converted in L1, 1.25x in
// registers (AMD EPYC, AVX2).
template <typename S>
void converted_dot_products(Matrix<const float> a, const S* w, int64_t ldw, Matrix<float> c) {
  if (c.rows <= 3) return dot_products<float, S>(a, w, ldw, c);
  constexpr int64_t kRows = 8, kDepth = 512;
  alignas(64) float block[kRows * kDepth];
  for (int64_t j = 0; j < c.cols; j += kRows) {
    const int64_t cols = std::min(kRows, c.cols - j);
    for (int64_t k0 = 0; k0 < a.cols; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, a.cols - k0);
      convert_rows(w + j * ldw + k0, ldw, cols, depth, block, depth);
      dot_products<float>({a.data + k0, a.rows, depth, a.ld}, block, depth, {c.data + j, c.rows, cols, c.ld});
    }
  }
}

// c[rows, cols] += a[rows, depth] · b[depth, cols] for a row-major b (rows ldb apart) read as stored: its
// column panels are b's own columns, ldb apart in depth. No packing.
template <typename T>
void rows_times(Matrix<const T> a, const T* b, int64_t ldb, Matrix<T> c) {
  constexpr int64_t W = kPanelWidth<T>;
  const int64_t full = c.cols / W * W;
  // A depth block at a time, as the packed product: its slice of b stays cached while every row passes.
  for (int64_t k0 = 0; k0 < a.cols; k0 += kDepthBlock) {
    tiles<T>(c.rows, full, Left<T>::row_major(a.data + k0, a.ld), Right<T>{b + k0 * ldb, W, ldb},
             std::min(kDepthBlock, a.cols - k0), c.data, c.ld);
  }
  // The columns past the last whole panel: tiles would read a whole panel, past the end of b's rows.
  for (int64_t r = 0; r < c.rows; ++r) {
    const T* a_r = a.data + r * a.ld;
    T* c_r = c.data + r * c.ld;
    for (int64_t j = full; j < c.cols; j += Vec<T>::size()) {
      const int64_t n = std::min<int64_t>(Vec<T>::size(), c.cols - j);
      Vec<T> acc = Vec<T>::loadu(c_r + j, n);
      for (int64_t k = 0; k < a.cols; ++k) acc = at::vec::fmadd(Vec<T>(a_r[k]), Vec<T>::loadu(b + k * ldb + j, n), acc);
      acc.store(c_r + j, n);
    }
  }
}

// A panel of `width` (<= kPanelWidth) consecutive rows of a matrix whose elements are row_stride
// and col_stride apart, depth-major: panel[k][lane] = src[lane][k], the lanes past width zeros.
template <typename T>
void pack_panel(const T* src, int64_t row_stride, int64_t col_stride, int64_t width, int64_t depth, T* panel) {
  constexpr int64_t W = kPanelWidth<T>;
  if (width < W) std::fill(panel, panel + depth * W, T(0));
  int64_t j0 = 0;
  if (col_stride == 1) {  // square blocks through at::vec's in-register transpose, then the odd depth one by one
    for (; j0 + W <= depth; j0 += W) at::vec::transpose_mxn<T>(src + j0, row_stride, panel + j0 * W, W, width, W);
  }
  for (int64_t lane = 0; lane < width; ++lane) {
    for (int64_t j = j0; j < depth; ++j) panel[j * W + lane] = src[lane * row_stride + j * col_stride];
  }
}

// dst[j, i] += src[i, j] for src [rows, cols].
template <typename T>
void add_transposed(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 32;
  alignas(64) T block[kBlock * kBlock];
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t m = std::min(kBlock, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t n = std::min(kBlock, cols - j0);
      at::vec::transpose_mxn<T>(src + i0 * ld_src + j0, ld_src, block, kBlock, m, n);
      for (int64_t j = 0; j < n; ++j) {
        T* out = dst + (j0 + j) * ld_dst + i0;
        for (int64_t i = 0; i < m; i += Vec<T>::size()) {
          const int64_t count = std::min<int64_t>(Vec<T>::size(), m - i);
          (Vec<T>::loadu(out + i, count) + Vec<T>::loadu(block + j * kBlock + i, count)).store(out + i, count);
        }
      }
    }
  }
}

// `count` elements of memory kept by the calling thread from call to call (a decoding step
// allocates nothing), or null where it cannot grow to that: the products run inside the step
// loop's thread team, where an exception would leave the other members waiting at a barrier.
// Each slot is its own memory.
template <typename T, int kSlot = 0>
T* thread_scratch(size_t count) {
  thread_local std::vector<T> scratch;
  if (scratch.size() < count) {
    try {
      scratch.resize(count);
    } catch (const std::bad_alloc&) {
      return nullptr;
    }
  }
  return scratch.data();
}

// Rows of a product that weight_major_products takes: two float panels, four double ones. Fewer
// than half a panel leave most lanes idle, and dot products win (an LSTM step at B16 H256, one
// thread: 130 us by dot products, 190 us weight-major).
constexpr int64_t kMaxWeightMajorRows = 64;
template <typename T>
constexpr int64_t kMinWeightMajorRows = kPanelWidth<T> / 2 + 1;

// c[rows, cols] += a[rows, depth] · w[cols, depth]ᵀ for a few rows (<= kMaxWeightMajorRows) and a weight
// whose rows (ldw apart) are contiguous, as cᵀ = w·aᵀ: w's rows are the tile kernel's broadcast side,
// read as stored, and aᵀ its panels. Only a is packed, not the weight (cols / rows times bigger):
// a decoding step at B32 H256 spent a quarter of its time packing W_ih and W_hh. A weight stored
// as S (T float) is converted a block at a time.
template <typename T, typename S = T>
void weight_major_products(Matrix<const T> a, const S* w, int64_t ldw, Matrix<T> c) {
  constexpr int64_t W = kPanelWidth<T>, kMaxLanes = kMaxWeightMajorRows;
  // Columns of c per pass: cᵀ's block [kChunk, lanes] (24 KB) stays in L1 over every depth block.
  constexpr int64_t kChunk = (24 << 10) / (kMaxLanes * sizeof(T)) / kTileRows * kTileRows;
  const int64_t depth = a.cols, panels = (c.rows + W - 1) / W, lanes = panels * W;
  if (depth == 0) return;  // a product of nothing adds nothing (no depth block would write cᵀ's block)
  constexpr bool kConverted = !std::is_same_v<S, T>;
  const auto fall_back = [&] {  // no memory to pack a in: dot products, which never throw
    if constexpr (kConverted) {
      converted_dot_products<S>(a, w, ldw, c);
    } else {
      dot_products<T>(a, w, ldw, c);
    }
  };
  T* a_panels = thread_scratch<T>(panels * depth * W);
  T* w_block = kConverted ? thread_scratch<T, 1>(kChunk * kDepthBlock) : nullptr;
  if (!a_panels || (kConverted && !w_block)) return fall_back();
  for (int64_t q = 0; q < panels; ++q) {
    pack_panel(a.data + q * W * a.ld, a.ld, int64_t(1), std::min(W, c.rows - q * W), depth, a_panels + q * depth * W);
  }
  alignas(64) T transposed[kChunk * kMaxLanes];
  for (int64_t n0 = 0; n0 < c.cols; n0 += kChunk) {
    const int64_t n = std::min(kChunk, c.cols - n0);
    for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
      const int64_t block_depth = std::min(kDepthBlock, depth - k0);
      Left<T> w_rows;
      if constexpr (kConverted) {
        convert_rows(w + n0 * ldw + k0, ldw, n, block_depth, w_block, block_depth);
        w_rows = Left<T>::row_major(w_block, block_depth);
      } else {
        w_rows = Left<T>::row_major(w + n0 * ldw + k0, ldw);
      }
      tiles<T>(n, lanes, w_rows, Right<T>::packed(a_panels + k0 * W, depth), block_depth, transposed, lanes,
               /*add_to_c=*/k0 > 0);
    }
    add_transposed(transposed, lanes, n, c.rows, c.data + n0, c.ld);
  }
}

// multiply_transposed below, on our kernel. For each block of depth, each thread packs the
// block of every b into panels, then walks its rows of c: every block of a is packed once,
// transposed into tiles, for all products.
template <typename T>
void multiply_transposed(Matrix<const T> a, const std::vector<TransposedProduct<T>>& products) {
  constexpr int64_t W = kPanelWidth<T>;
  const auto panel_count = [](int64_t cols) { return (cols + W - 1) / W; };
  int64_t columns = 0, panels = 0;
  for (const TransposedProduct<T>& p : products) {
    columns += p.c.cols;
    panels += panel_count(p.c.cols);
  }
  // Few rows whose gradients fill a big weight: every thread writes its share.
  const int64_t grain = split_grain(row_grain(columns, a.rows), a.cols, a.cols * columns * int64_t(sizeof(T)));
  at::parallel_for(0, a.cols, grain, [&](int64_t begin, int64_t end) {
    // Sized for the depth there is: a decoding step's few rows need a fraction of a depth block.
    const int64_t max_depth = std::min(kDepthBlock, a.rows);
    std::vector<T> packed_a(kRowBlock * max_depth), packed_b(panels * max_depth * W);
    if (a.rows == 0) {  // no depth block writes c: an empty batch's gradients are zeros
      for (const TransposedProduct<T>& p : products) {
        for (int64_t r = begin; r < end; ++r) std::fill_n(p.c.data + r * p.c.ld, p.c.cols, T(0));
      }
    }
    for (int64_t k0 = 0; k0 < a.rows; k0 += kDepthBlock) {
      const int64_t depth = std::min(kDepthBlock, a.rows - k0);
      T* b_panels = packed_b.data();
      for (const TransposedProduct<T>& p : products) {
        for (int64_t q = 0; q < panel_count(p.c.cols); ++q) {
          const int64_t width = std::min(W, p.c.cols - q * W);
          T* panel = b_panels + q * depth * W;
          const T* src = p.b.data + k0 * p.b.ld + q * W;
          if (width == W) {  // a constant size, which the compiler copies inline (no libc call per row)
            for (int64_t j = 0; j < depth; ++j) std::memcpy(panel + j * W, src + j * p.b.ld, W * sizeof(T));
          } else {
            for (int64_t j = 0; j < depth; ++j) {
              std::memcpy(panel + j * W, src + j * p.b.ld, width * sizeof(T));
              std::fill(panel + j * W + width, panel + (j + 1) * W, T(0));
            }
          }
        }
        b_panels += panel_count(p.c.cols) * depth * W;
      }
      for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, end - r0);
        for (int64_t j = 0; j < depth; ++j) {
          const T* src = a.data + (k0 + j) * a.ld + r0;
          // a's rows are far apart: fetch two rows ahead, or each row waits on memory.
          if (j + 2 < depth) {
            for (int64_t i = 0; i < rows; i += 64 / sizeof(T)) __builtin_prefetch(src + 2 * a.ld + i);
          }
          for (int64_t t = 0; t < rows; t += kTileRows) {
            T* dst = packed_a.data() + t * depth + j * kTileRows;
            for (int64_t lane = 0; lane < std::min(kTileRows, rows - t); ++lane) dst[lane] = src[t + lane];
          }
        }
        const Left<T> a_block = Left<T>::packed(packed_a.data(), depth);
        const T* b_block = packed_b.data();
        for (const TransposedProduct<T>& p : products) {
          // The first depth block writes c (no zeroing pass first: at one row, it was most of the work).
          tiles<T>(rows, p.c.cols, a_block, Right<T>::packed(b_block, depth), depth, p.c.data + r0 * p.c.ld, p.c.ld,
                   /*add_to_c=*/k0 > 0);
          b_block += panel_count(p.c.cols) * depth * W;
        }
      }
    }
  });
}

// ---- int8 weights: products in integers ---------------------------------------------------------
//
// An int8 weight (w = q·scale, a scale per row) multiplies activations quantized on the fly, as
// RNN.cpp's QuantizedCellParamsDynamic has fbgemm do: each row of a, symmetric to [-127, 127] with
// scale max|a_r| / 127 (a row's own scale, so no row's result depends on the batch beside it).
// Sums over a depth block (kInt8DepthBlock) are exact in int32 and added to c scaled, with one
// rounding: every instruction set, thread count and route (packed or read as stored) gives the
// same bits.
//
// vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16, saturating: it is given
// |q| (at most 128) and a·sign(q) (at most 127 in size), so a pair never exceeds 2·128·127 < 2^15
// and nothing saturates, on any CPU, with all 8 bits of both operands (fbgemm's AVX2 path gives up
// one bit of the activations instead; ONNX Runtime's saturates). With vpmaddwd widening the pairs,
// AMD EPYC (Zen 3) runs 1.5x the multiply-adds of float FMAs (72 against 48 a nanosecond).

// Columns of an int8 panel: two vectors of 8 int32 sums (AVX2's; AVX-512 CPUs run the same code).
constexpr int64_t kInt8PanelWidth = 16;
// Depth summed in int32 before scaling into c: |sum| <= 1024·128·127 < 2^31, and a panel's slice
// (16 KB) stays in L1 while the row tiles pass it.
constexpr int64_t kInt8DepthBlock = 1024;
// Rows quantized at a time, into a stack block (32 KB: no allocation inside the step loop's team).
constexpr int64_t kInt8RowBlock = 32;
// Rows per int8 register tile: 4 rows × 2 vectors = 8 accumulators, plus the panel's two vectors,
// their magnitudes, the broadcast row, a product and the ones of vpmaddwd: AVX2's 16 registers.
// Six rows (as the float tile) spilled two accumulators to the stack in the inner loop.
constexpr int64_t kInt8TileRows = 4;
// Quantized rows are padded with zeros to a whole number of these (one AVX2 vector of bytes).
constexpr int64_t kInt8Chunk = 32;

// scales[r] = max|a_r| / 127: 0 for a row of zeros, NaN for a row with an infinity or a NaN (its
// products are then NaN, as float products would make them non-finite).
inline void quantization_scales(Matrix<const float> a, float* scales) {
  constexpr int64_t L = Vec<float>::size();
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* row = a.data + r * a.ld;
    Vec<float> max_abs(0.0f);
    int64_t k = 0;
    for (; k + L <= a.cols; k += L) max_abs = at::vec::maximum(max_abs, Vec<float>::loadu(row + k).abs());
    float lanes[L], largest = 0;
    max_abs.store(lanes);
    for (int64_t l = 0; l < L; ++l) largest = lanes[l] != lanes[l] || lanes[l] > largest ? lanes[l] : largest;
    for (; k < a.cols; ++k) largest = row[k] != row[k] || std::abs(row[k]) > largest ? std::abs(row[k]) : largest;
    scales[r] = std::isfinite(largest) ? largest / 127.0f : std::numeric_limits<float>::quiet_NaN();
  }
}

// q[r, k] = round(a[r, k] / scales[r]) for a block of a's rows, zeros past a.cols up to ldq. A
// division, not a product by 1 / scale, which overflows for a row of subnormals; clamped, as a
// subnormal scale is coarse enough to round past 127. The vector and scalar paths give the same
// integers (each value is divided, rounded to nearest even and clamped alike).
inline void quantize_rows(Matrix<const float> a, const float* scales, int8_t* q, int64_t ldq) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* row = a.data + r * a.ld;
    int8_t* out = q + r * ldq;
    std::memset(out, 0, ldq);
    const float scale = scales[r];
    if (!(scale > 0)) continue;  // zeros (a row of zeros), or NaN scale: the products are 0 · NaN
    int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const __m256 divisor = _mm256_set1_ps(scale), low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
    const auto quantized = [&](const float* p) {
      const __m256 rounded =
          _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm256_cvtps_epi32(_mm256_max_ps(low, _mm256_min_ps(high, rounded)));
    };
    // 32 values a time: packed to int16 then int8 within 128-bit lanes (never saturating), then
    // their 4-byte groups put back in order.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; k + 32 <= a.cols; k += 32) {
      const __m256i low_words = _mm256_packs_epi32(quantized(row + k), quantized(row + k + 8));
      const __m256i high_words = _mm256_packs_epi32(quantized(row + k + 16), quantized(row + k + 24));
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(low_words, high_words), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), bytes);
    }
#endif
    for (; k < a.cols; ++k) out[k] = static_cast<int8_t>(std::clamp(std::nearbyint(row[k] / scale), -127.0f, 127.0f));
  }
}

// c[i, j] += sums[i][j] · (col_scales[j] · row_scales[i]) for j < cols: the one rounding of a depth
// block's exact sums, in scalar code on every instruction set (an explicit fma: the same bits).
template <int Rows, int Cols>
inline void add_scaled(const int32_t (&sums)[Rows][Cols], const float* row_scales, const float* col_scales,
                       int64_t cols, float* c, int64_t ldc) {
  for (int i = 0; i < Rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      float& out = c[i * ldc + j];
      out = std::fma(static_cast<float>(sums[i][j]), col_scales[j] * row_scales[i], out);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Eight int32 sums of four products q_w·a each (see the section's comment): w's magnitudes
// `magnitude` (|w|), its signs given to a.
inline __m256i add_products(__m256i sum, __m256i a, __m256i w, __m256i magnitude) {
  const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(a, w));
  return _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

// The sums q[Rows, 4·quads] · panel for one int8 panel ([quads][kInt8PanelWidth][4]: four
// consecutive depths of a column in each 32-bit lane), added scaled to c[Rows, cols].
template <int Rows>
inline void int8_tile(const int8_t* q, int64_t ldq, const int8_t* panel, int64_t quads, const float* row_scales,
                      const float* col_scales, int64_t cols, float* c, int64_t ldc) {
  constexpr int64_t W = kInt8PanelWidth;
  int32_t sums[Rows][W];
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  __m256i acc[Rows][2];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t j = 0; j < quads; ++j) {
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + j * 4 * W));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + j * 4 * W + 32));
    const __m256i m0 = _mm256_abs_epi8(w0), m1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      int32_t quad;
      std::memcpy(&quad, q + i * ldq + 4 * j, sizeof(quad));
      const __m256i a = _mm256_set1_epi32(quad);
      acc[i][0] = add_products(acc[i][0], a, w0, m0);
      acc[i][1] = add_products(acc[i][1], a, w1, m1);
    }
  }
  if (cols == W) {  // add_scaled's arithmetic, 8 lanes at a time: the same bits
    for (int i = 0; i < Rows; ++i) {
      for (int h = 0; h < 2; ++h) {
        float* out = c + i * ldc + 8 * h;
        const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(col_scales + 8 * h), _mm256_set1_ps(row_scales[i]));
        _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][h]), scale, _mm256_loadu_ps(out)));
      }
    }
    return;
  }
  for (int i = 0; i < Rows; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[i]), acc[i][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[i] + 8), acc[i][1]);
  }
#else
  for (int i = 0; i < Rows; ++i) std::fill_n(sums[i], W, 0);
  for (int64_t j = 0; j < quads; ++j) {
    for (int i = 0; i < Rows; ++i) {
      const int8_t* a = q + i * ldq + 4 * j;
      for (int64_t lane = 0; lane < W; ++lane) {
        const int8_t* w = panel + (j * W + lane) * 4;
        sums[i][lane] += a[0] * w[0] + a[1] * w[1] + a[2] * w[2] + a[3] * w[3];
      }
    }
  }
#endif
  add_scaled<Rows, W>(sums, row_scales, col_scales, cols, c, ldc);
}

// The sums q[Rows, depth] · w[Cols, depth]ᵀ for a weight read as stored (rows ldw apart; past cols,
// the last row again, summed but never stored), added scaled to c[Rows, cols]. q is zero past
// depth up to a whole chunk.
template <int Rows, int Cols>
inline void int8_dot_tile(const int8_t* q, int64_t ldq, const int8_t* w, int64_t ldw, int64_t depth,
                          const float* row_scales, const float* col_scales, int64_t cols, float* c, int64_t ldc) {
  const int8_t* w_rows[Cols];
  for (int j = 0; j < Cols; ++j) w_rows[j] = w + std::min<int64_t>(j, cols - 1) * ldw;
  int32_t sums[Rows][Cols];
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  __m256i acc[Rows][Cols];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) acc[i][j] = _mm256_setzero_si256();
  }
  const auto step = [&](int64_t k, bool whole) {
    __m256i a[Rows];
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * ldq + k));
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) {
      __m256i w_k;
      if (whole) {
        w_k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_rows[j] + k));
        // The next tile's rows, as far ahead: a weight row of a few KB ends before the hardware
        // prefetcher ramps up (an LSTM step at B1 H1024, one thread: 1.0 -> 0.83 ms).
        __builtin_prefetch(w_rows[j] + Cols * ldw + k);
      } else {  // the row's last bytes: never read past them (q's zeros cancel the rest)
        alignas(32) int8_t part[kInt8Chunk] = {};
        std::memcpy(part, w_rows[j] + k, depth - k);
        w_k = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
      }
      const __m256i magnitude = _mm256_abs_epi8(w_k);
#pragma GCC unroll 8
      for (int i = 0; i < Rows; ++i) acc[i][j] = add_products(acc[i][j], a[i], w_k, magnitude);
    }
  };
  int64_t k = 0;
  for (; k + kInt8Chunk <= depth; k += kInt8Chunk) step(k, true);
  if (k < depth) step(k, false);
  for (int i = 0; i < Rows; ++i) {
    for (int j = 0; j < Cols; ++j) {
      const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc[i][j]), _mm256_extracti128_si256(acc[i][j], 1));
      const __m128i pairs = _mm_hadd_epi32(half, half);
      sums[i][j] = _mm_cvtsi128_si32(_mm_hadd_epi32(pairs, pairs));
    }
  }
#else
  for (int i = 0; i < Rows; ++i) {
    for (int j = 0; j < Cols; ++j) {
      int32_t sum = 0;
      for (int64_t k = 0; k < depth; ++k) sum += q[i * ldq + k] * w_rows[j][k];
      sums[i][j] = sum;
    }
  }
#endif
  add_scaled<Rows, Cols>(sums, row_scales, col_scales, cols, c, ldc);
}

// c[rows, cols] += a[rows, depth] · wᵀ for an int8 weight w [cols, depth]: a's rows quantized a
// block at a time, and `block(q, ldq, r0, rows, k0, depth, row_scales)` adding the block's scaled
// sums to c's rows [r0, r0 + rows). Blocks of depth go first to last, for every route alike.
template <typename Block>
void int8_products(Matrix<const float> a, Block&& block) {
  alignas(64) int8_t q[kInt8RowBlock * kInt8DepthBlock];
  float row_scales[kInt8RowBlock];
  for (int64_t r0 = 0; r0 < a.rows; r0 += kInt8RowBlock) {
    const int64_t rows = std::min(kInt8RowBlock, a.rows - r0);
    const float* a_rows = a.data + r0 * a.ld;
    quantization_scales({a_rows, rows, a.cols, a.ld}, row_scales);
    for (int64_t k0 = 0; k0 < a.cols; k0 += kInt8DepthBlock) {
      const int64_t depth = std::min(kInt8DepthBlock, a.cols - k0);
      const int64_t ldq = (depth + kInt8Chunk - 1) / kInt8Chunk * kInt8Chunk;
      quantize_rows({a_rows + k0, rows, depth, a.ld}, row_scales, q, ldq);
      block(q, ldq, r0, rows, k0, depth, row_scales);
    }
  }
}

// The dot tiles of one quantized block of rows (q [rows, depth], zero past depth) against w's rows
// read as stored, Cols of them at a time, added scaled to c.
template <int Cols>
void int8_dot_block(const int8_t* q, int64_t ldq, const int8_t* w, int64_t ldw, int64_t depth,
                    const float* row_scales, const float* col_scales, Matrix<float> c) {
  for (int64_t j = 0; j < c.cols; j += Cols) {
    const int64_t cols = std::min<int64_t>(Cols, c.cols - j);
    for (int64_t r = 0; r < c.rows; r += 3) {
      const int8_t* q_r = q + r * ldq;
      float* c_r = c.data + r * c.ld + j;
      const float* s_r = row_scales + r;
      switch (std::min<int64_t>(3, c.rows - r)) {
        case 1: int8_dot_tile<1, Cols>(q_r, ldq, w + j * ldw, ldw, depth, s_r, col_scales + j, cols, c_r, c.ld); break;
        case 2: int8_dot_tile<2, Cols>(q_r, ldq, w + j * ldw, ldw, depth, s_r, col_scales + j, cols, c_r, c.ld); break;
        default: int8_dot_tile<3, Cols>(q_r, ldq, w + j * ldw, ldw, depth, s_r, col_scales + j, cols, c_r, c.ld);
      }
    }
  }
}

// c += a · wᵀ for an int8 weight w [c.cols, a.cols] read as stored (rows ldw apart), w = q·scale
// with col_scales [c.cols]: no packing, for few rows. One row takes eight of w's rows at a time
// (more reads in flight from memory), more rows four (each row of q feeds four sums per load).
inline void int8_dot_products(Matrix<const float> a, const int8_t* w, int64_t ldw, const float* col_scales,
                              Matrix<float> c) {
  int8_products(a, [&](const int8_t* q, int64_t ldq, int64_t r0, int64_t rows, int64_t k0, int64_t depth,
                       const float* row_scales) {
    const Matrix<float> c_rows{c.data + r0 * c.ld, rows, c.cols, c.ld};
    if (rows == 1) return int8_dot_block<8>(q, ldq, w + k0, ldw, depth, row_scales, col_scales, c_rows);
    int8_dot_block<4>(q, ldq, w + k0, ldw, depth, row_scales, col_scales, c_rows);
  });
}

// c += a · wᵀ for an int8 weight packed into consecutive panels (see PackedWeight), total_quads
// deep, with their columns' scales panel_scales [panels][kInt8PanelWidth].
inline void int8_panel_products(Matrix<const float> a, const int8_t* panels, int64_t total_quads,
                                const float* panel_scales, Matrix<float> c) {
  constexpr int64_t W = kInt8PanelWidth;
  int8_products(a, [&](const int8_t* q, int64_t ldq, int64_t r0, int64_t rows, int64_t k0, int64_t depth,
                       const float* row_scales) {
    const int64_t quads = (depth + 3) / 4;
    for (int64_t p = 0; p * W < c.cols; ++p) {
      const int8_t* panel = panels + (p * total_quads + k0 / 4) * 4 * W;
      const float* col_scales = panel_scales + p * W;
      const int64_t cols = std::min(W, c.cols - p * W);
      for (int64_t r = 0; r < rows; r += kInt8TileRows) {
        const int8_t* q_r = q + r * ldq;
        float* c_r = c.data + (r0 + r) * c.ld + p * W;
        const float* s_r = row_scales + r;
        switch (std::min(kInt8TileRows, rows - r)) {
          case 1: int8_tile<1>(q_r, ldq, panel, quads, s_r, col_scales, cols, c_r, c.ld); break;
          case 2: int8_tile<2>(q_r, ldq, panel, quads, s_r, col_scales, cols, c_r, c.ld); break;
          case 3: int8_tile<3>(q_r, ldq, panel, quads, s_r, col_scales, cols, c_r, c.ld); break;
          default: int8_tile<4>(q_r, ldq, panel, quads, s_r, col_scales, cols, c_r, c.ld);
        }
      }
    }
  });
}

}  // namespace kernel

// The one instance of a process-wide cache (its lock: a member mutex_). Never destroyed: a tensor
// freed while the process exits may still give memory back to it. Its lock is held across fork,
// as malloc holds its own: a child forked (a DataLoader worker) while another thread held it
// would otherwise find it taken for good.
template <typename Cache>
Cache& process_wide() {
  static Cache* instance = [] {
#if !defined(_WIN32)
    pthread_atfork([] { process_wide<Cache>().mutex_.lock(); }, [] { process_wide<Cache>().mutex_.unlock(); },
                   [] { process_wide<Cache>().mutex_.unlock(); });
#endif
    return new Cache();
  }();
  return *instance;
}

// Memory reused from call to call, for the buffers every call allocates anew at the same sizes:
// packed panels, the operator's outputs and workspace, the backward's buffers and weight
// gradients. Freed blocks of at least kMinBytes go back to this pool (up to kMaxBytes in all, the
// oldest handed to free() first) rather than to malloc, which hands a block back to the OS once
// the heap's top is free: the next call then page-faults it in again. That cost more than the
// work itself: an LSTMCell step at B32 H256 with packed weights, inference, 1.75 ms faulting and
// 0.25 ms reusing; a training step at B1 H1024, whose two 16 MB weight gradients are freed
// together (native frees one at a time), 2.5x native's time. kMaxBytes holds what a training
// call of the benchmark's large shapes frees (T100 B64 H512: ~170 MB). Only memory is reused,
// never contents. An allocator, so its tensors are ordinary ones (resizable, shareable).
class BlockPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(64) << 10;
  static constexpr size_t kMaxBytes = size_t(256) << 20;

  // An uninitialised contiguous tensor on the pool's memory.
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::detail::empty_generic(sizes, &instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }

  at::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes) {
      void* data = c10::alloc_cpu(bytes);
      return {data, data, &c10::free_cpu, at::Device(at::kCPU)};
    }
    Block* block = new Block(take(bytes));
    return {block->data, block, &release, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  friend BlockPool& process_wide<BlockPool>();
  static BlockPool& instance() { return process_wide<BlockPool>(); }

  static void release(void* context) {
    std::unique_ptr<Block> block(static_cast<Block*>(context));
    instance().give_back(*block);
  }

  // The smallest free block that holds `bytes` and wastes at most a quarter of them, the most
  // recently freed of equal ones (still in cache, as malloc's reuse would be), else a new one.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.rend();
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        const bool fits = it->bytes >= bytes && it->bytes - bytes <= bytes / 4;
        if (fits && (best == free_.rend() || it->bytes < best->bytes)) best = it;
      }
      if (best != free_.rend()) {
        const Block block = *best;
        free_bytes_ -= block.bytes;
        free_.erase(std::next(best).base());
        return block;
      }
    }
    return {c10::alloc_cpu(bytes), bytes};
  }

  void give_back(Block block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);
      free_bytes_ += block.bytes;
      while (free_bytes_ > kMaxBytes) {
        evicted.push_back(free_.front());
        free_bytes_ -= free_.front().bytes;
        free_.erase(free_.begin());
      }
    }
    for (const Block& b : evicted) c10::free_cpu(b.data);
  }

  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
  size_t free_bytes_ = 0;
};

// bfloat16 and float16 weights that fit a core's L2 as floats, kept converted from call to call.
// Such a weight stays in the cache as floats, so a step gains nothing by reading fewer bytes, and
// converting it at every call costs more than the step's products. An entry holds its weight (its
// memory cannot be reused while the entry lives) and is found only by the same elements at the
// same version (an in-place change makes a new entry): nothing can be stale. Up to kMaxBytes of
// floats, the least recently used dropped first.
class WidenedWeights {
 public:
  static constexpr size_t kMaxBytes = size_t(32) << 20;

  // weight [n, k] (any strides) in float.
  static at::Tensor get(const at::Tensor& weight) {
    Entry wanted{weight, weight._version(), at::Tensor()};
    WidenedWeights& cache = instance();
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      for (auto it = cache.entries_.begin(); it != cache.entries_.end(); ++it) {
        if (it->same_as(wanted)) {
          std::rotate(it, std::next(it), cache.entries_.end());  // most recently used last
          return cache.entries_.back().widened;
        }
      }
    }
    wanted.widened = weight.to(at::kFloat).contiguous();
    std::vector<Entry> dropped;  // freed outside the lock
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.entries_.push_back(wanted);
      cache.bytes_ += wanted.widened.nbytes();
      while (cache.bytes_ > kMaxBytes && cache.entries_.size() > 1) {
        cache.bytes_ -= cache.entries_.front().widened.nbytes();
        dropped.push_back(std::move(cache.entries_.front()));
        cache.entries_.erase(cache.entries_.begin());
      }
    }
    return wanted.widened;
  }

 private:
  struct Entry {
    at::Tensor weight;
    uint32_t version;
    at::Tensor widened;

    // The same elements at the same version: views of one memory (a weight transposed for the
    // backward is a new view at every call) match as well as the tensors themselves.
    bool same_as(const Entry& other) const {
      return weight.const_data_ptr() == other.weight.const_data_ptr() &&
             weight.scalar_type() == other.weight.scalar_type() && weight.sizes() == other.weight.sizes() &&
             weight.strides() == other.weight.strides() && version == other.version;
    }
  };

  friend WidenedWeights& process_wide<WidenedWeights>();
  static WidenedWeights& instance() { return process_wide<WidenedWeights>(); }

  std::mutex mutex_;
  std::vector<Entry> entries_;  // least recently used first
  size_t bytes_ = 0;
};

// A weight W [n, k] used as the right operand of C = A·Wᵀ for a whole call, packed into panels
// of kPanelWidth consecutive rows of W (columns of C), each stored depth-major: panel[k][lane].
// W's rows are cut into groups (the four gate blocks of W_hh) so that no panel straddles two:
// a thread owning a slice of every gate block then owns whole panels.
//
// A call that multiplies few rows by W (one decoding step) would spend more on packing than on
// its arithmetic: it reads W as stored instead (not packed). Where W's rows are contiguous, as
// cᵀ = W·aᵀ with a packed (weight_major_products), or by dot products along k for the fewest rows;
// where its columns are, by W's own rows as panels. Nothing but the panels' memory (BlockPool) is
// kept between calls, so nothing can be stale.
template <typename T>
class PackedWeight {
 public:
  static constexpr int64_t kPanelWidth = kernel::kPanelWidth<T>;

  // weight: a [n, k] view, any strides (a weight [k, n] transposed, for C = A·B), stored as T or,
  // for T float, as bfloat16, float16, or int8 with `scales` [n] (w = q·scale, row by row). `pack`:
  // whether packing pays for this call (many rows); a weight with neither axis contiguous is
  // packed anyway. An int8 weight multiplies in integers, packed into int8 panels or read as
  // stored (kernel::int8_products). A bfloat16 or float16 weight read by its rows stays narrow;
  // packed, or read by its columns, it is converted first (its panels are floats).
  PackedWeight(const at::Tensor& weight, int64_t group, bool pack = true, const at::Tensor& scales = {})
      : k_(weight.size(1)), group_(group) {
    const bool narrow = weight.scalar_type() != c10::CppTypeToScalarType<T>::value;
    TORCH_INTERNAL_ASSERT(!narrow || (std::is_same_v<T, float>), "lstm_ext: narrow weights multiply in float");
    TORCH_INTERNAL_ASSERT(scales.defined() == (weight.scalar_type() == at::kChar), "lstm_ext: int8 weights need scales");
    if (weight.scalar_type() == at::kChar) {
      if (!pack && reads_rows(weight)) {
        unpacked_ = weight;
        scales_ = scales.contiguous();
      } else {
        pack_int8(weight, scales.contiguous());
      }
      return;
    }
    if (narrow && !pack && reads_rows(weight) && !fits_a_cores_cache(weight)) {
      unpacked_ = weight;
      return;
    }
    const at::Tensor w = narrow ? widened(weight) : weight;
    if (!pack && (reads_rows(w) || reads_columns(w))) {
      unpacked_ = w;
    } else {
      const T* data = w.data_ptr<T>();
      const int64_t n = w.size(0), k = k_, row_stride = w.stride(0), col_stride = w.stride(1);
      const int64_t W = kPanelWidth, panels = panel_count(n, W);
      panels_ = BlockPool::empty({panels, k, W}, w.options());
      T* out = panels_.data_ptr<T>();
      // Threads only for big weights; reads run along whichever of W's axes is contiguous.
      constexpr int64_t kGrain = 1 << 16;
      if (col_stride <= row_stride) {
        at::parallel_for(0, panels, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, k * W)),
                         [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            kernel::pack_panel(data + first_row_of_panel(p, W) * row_stride, row_stride, col_stride,
                               rows_in_panel(p, W), k, out + p * k * W);
          }
        });
      } else {
        // W's columns are contiguous (a [k, n] weight transposed): each column feeds every panel.
        std::vector<int64_t> firsts(panels), widths(panels);
        for (int64_t p = 0; p < panels; ++p) {
          firsts[p] = first_row_of_panel(p, W);
          widths[p] = rows_in_panel(p, W);
        }
        at::parallel_for(0, k, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n)), [&](int64_t begin, int64_t end) {
          for (int64_t j = begin; j < end; ++j) {
            const T* src = data + j * col_stride;
            for (int64_t p = 0; p < panels; ++p) {
              T* dst = out + (p * k + j) * W;
              if (row_stride == 1) {
                std::memcpy(dst, src + firsts[p], widths[p] * sizeof(T));
              } else {
                for (int64_t lane = 0; lane < widths[p]; ++lane) dst[lane] = src[(firsts[p] + lane) * row_stride];
              }
              std::fill(dst + widths[p], dst + W, T(0));
            }
          }
        });
      }
    }
  }
  // For C = A·Wᵀ with a weight W [n, k] as torch stores it (int8: with its scales [n]).
  static PackedWeight rows_of(const at::Tensor& weight, int64_t group, bool pack = true,
                              const at::Tensor& scales = {}) {
    return PackedWeight(weight, group, pack, scales);
  }
  // For C = A·W with a weight W [k, n].
  static PackedWeight columns_of(const at::Tensor& weight, int64_t group, bool pack = true) {
    return PackedWeight(weight.t(), group, pack);
  }

  // C = A · W[first_col : first_col + C.cols]ᵀ, plus C when `accumulate`, plus bias (indexed
  // like C's columns) when given. The columns must lie in one group and first_col must start a
  // panel. Never throws for float and double (it runs inside the step loop's thread team).
  // `descending` walks W's depth blocks last to first. The recurrent loops alternate it from
  // step to step: a weight slightly too big for the cache then starts each step on the blocks
  // the last step touched last, still cached, where a fixed order would find each block just
  // evicted (the wide shape's 16 MB W_hh in a 16 MB L3: ~5% of its training time).
  void multiply(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate, const T* bias = nullptr,
                bool descending = false) const {
    if (c.rows == 0 || c.cols == 0) return;
    if (stored_type() == at::kChar) {
      start_rows(c, accumulate, bias);
      if constexpr (std::is_same_v<T, float>) multiply_int8(a, first_col, c);
    } else if (!panels_.defined() && stored_type() != c10::CppTypeToScalarType<T>::value) {
      start_rows(c, accumulate, bias);
      if constexpr (std::is_same_v<T, float>) multiply_narrow(a, first_col, c);
    } else if (!panels_.defined()) {
      start_rows(c, accumulate, bias);
      const T* w = unpacked_.data_ptr<T>() + first_col * unpacked_.stride(0);
      if (reads_rows(unpacked_) && c.rows >= kernel::kMinWeightMajorRows<T> && c.rows <= kernel::kMaxWeightMajorRows) {
        kernel::weight_major_products<T>(a, w, unpacked_.stride(0), c);
      } else if (reads_rows(unpacked_)) {
        kernel::dot_products<T>(a, w, unpacked_.stride(0), c);
      } else {
        kernel::rows_times<T>(a, w, unpacked_.stride(1), c);
      }
    } else {
      for (int64_t r = 0; r < c.rows; r += kernel::kRowBlock) {
        const int64_t rows = std::min(kernel::kRowBlock, c.rows - r);
        multiply_block({a.data + r * a.ld, rows, a.cols, a.ld}, first_col, {c.data + r * c.ld, rows, c.cols, c.ld},
                       accumulate, bias, descending);
      }
    }
  }

  // multiply() over many rows, split between torch's threads.
  void multiply_parallel(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate,
                         const T* bias = nullptr) const {
    if (!panels_.defined()) {
      // Few rows: split the columns instead, whole panels of ~1M multiply-adds each, or an even
      // share of a weight too big for one core's cache.
      const int64_t panels = (c.cols + kPanelWidth - 1) / kPanelWidth;
      const int64_t grain = kernel::split_grain(
          std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, c.rows * kPanelWidth * k_)), panels,
          c.cols * k_ * int64_t(unpacked_.element_size()));
      return at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
        const int64_t col = begin * kPanelWidth, cols = std::min(end * kPanelWidth, c.cols) - col;
        multiply(a, first_col + col, {c.data + col, c.rows, cols, c.ld}, accumulate, bias ? bias + col : nullptr);
      });
    }
    at::parallel_for(0, c.rows, kernel::row_grain(c.cols, k_), [&](int64_t begin, int64_t end) {
      multiply({a.data + begin * a.ld, end - begin, a.cols, a.ld}, first_col,
               {c.data + begin * c.ld, end - begin, c.cols, c.ld}, accumulate, bias);
    });
  }

 private:
  // The type of the weight as the products read it: of its panels when packed.
  at::ScalarType stored_type() const { return (panels_.defined() ? panels_ : unpacked_).scalar_type(); }
  // Panels of `width` rows of W: each group of rows is cut into its own, so that none straddles two.
  int64_t panels_per_group(int64_t width = kPanelWidth) const { return (group_ + width - 1) / width; }
  int64_t panel_count(int64_t rows, int64_t width) const {
    return group_ == 0 ? 0 : rows / group_ * panels_per_group(width);
  }
  int64_t first_row_of_panel(int64_t p, int64_t width) const {
    return (p / panels_per_group(width)) * group_ + (p % panels_per_group(width)) * width;
  }
  int64_t rows_in_panel(int64_t p, int64_t width) const {
    return std::min(width, (p / panels_per_group(width) + 1) * group_ - first_row_of_panel(p, width));
  }
  // Whether W's rows (for dot products) or its columns (as panels) are contiguous.
  static bool reads_rows(const at::Tensor& w) { return w.stride(1) == 1 || w.size(1) <= 1; }
  static bool reads_columns(const at::Tensor& w) { return w.stride(0) == 1 || w.size(0) <= 1; }

  // C's rows before the kernels add to them: kept, the bias, or zeros.
  static void start_rows(Matrix<T> c, bool accumulate, const T* bias) {
    if (accumulate) return;
    for (int64_t r = 0; r < c.rows; ++r) {
      T* row = c.data + r * c.ld;
      if (bias) {
        std::memcpy(row, bias, c.cols * sizeof(T));
      } else {
        std::fill(row, row + c.cols, T(0));
      }
    }
  }

  void multiply_block(Matrix<const T> a, int64_t first_col, Matrix<T> c, bool accumulate, const T* bias,
                      bool descending) const {
    start_rows(c, accumulate, bias);
    constexpr int64_t W = kPanelWidth;
    const int64_t group = first_col / group_, within = first_col % group_;
    const T* panels = panels_.data_ptr<T>() + (group * panels_per_group() + within / W) * k_ * W;
    const int64_t blocks = (k_ + kernel::kDepthBlock - 1) / kernel::kDepthBlock;
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t k0 = (descending ? blocks - 1 - i : i) * kernel::kDepthBlock;
      const int64_t depth = std::min(kernel::kDepthBlock, k_ - k0);
      kernel::tiles<T>(c.rows, c.cols, kernel::Left<T>::row_major(a.data + k0, a.ld),
                       kernel::Right<T>::packed(panels + k0 * W, k_), depth, c.data, c.ld);
    }
  }

  // Whether a weight's floats fit a core's L2 (kSplitWeightBytes): then it is read widened.
  static bool fits_a_cores_cache(const at::Tensor& weight) {
    return weight.numel() * int64_t(sizeof(float)) <= kernel::kSplitWeightBytes;
  }

  // A bfloat16 or float16 weight in T (float): what packing and the column reads work on, and
  // what a small weight is read as (kept between calls: WidenedWeights).
  static at::Tensor widened(const at::Tensor& weight) {
    if (fits_a_cores_cache(weight)) return WidenedWeights::get(weight);
    return weight.to(c10::CppTypeToScalarType<T>::value);
  }

  // The unpacked products of a bfloat16 or float16 weight (float arithmetic), converted as its
  // rows are read.
  void multiply_narrow(Matrix<const float> a, int64_t first_col, Matrix<float> c) const {
    const int64_t ld = unpacked_.stride(0);
    const auto run = [&](const auto* stored) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(stored)>>;
      const S* w = stored + first_col * ld;
      if (c.rows >= kernel::kMinWeightMajorRows<float> && c.rows <= kernel::kMaxWeightMajorRows) {
        kernel::weight_major_products<float, S>(a, w, ld, c);
      } else {
        kernel::converted_dot_products<S>(a, w, ld, c);
      }
    };
    if (stored_type() == at::kBFloat16) return run(unpacked_.const_data_ptr<c10::BFloat16>());
    run(unpacked_.const_data_ptr<c10::Half>());
  }

  // An int8 weight's panels [panels][quads][kInt8PanelWidth][4] (four consecutive depths of a row
  // of W in each 32-bit lane; zeros past k and past the group) and their rows' scales
  // [panels][kInt8PanelWidth] (zeros past the group).
  void pack_int8(const at::Tensor& weight, const at::Tensor& scales) {
    constexpr int64_t W = kernel::kInt8PanelWidth;
    const int64_t quads = (k_ + 3) / 4, panels = panel_count(weight.size(0), W);
    const int64_t row_stride = weight.stride(0), col_stride = weight.stride(1);
    panels_ = BlockPool::empty({panels, quads, W, 4}, weight.options());
    scales_ = at::zeros({panels, W}, scales.options());
    const int8_t* data = weight.const_data_ptr<int8_t>();
    const float* row_scales = scales.const_data_ptr<float>();
    int8_t* out = panels_.data_ptr<int8_t>();
    float* out_scales = scales_.data_ptr<float>();
    at::parallel_for(0, panels, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, k_ * W)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int8_t* panel = out + p * quads * W * 4;
        std::memset(panel, 0, quads * W * 4);
        const int64_t first = first_row_of_panel(p, W);
        for (int64_t lane = 0; lane < rows_in_panel(p, W); ++lane) {
          const int8_t* row = data + (first + lane) * row_stride;
          out_scales[p * W + lane] = row_scales[first + lane];
          for (int64_t k = 0; k < k_; ++k) panel[((k / 4) * W + lane) * 4 + k % 4] = row[k * col_stride];
        }
      }
    });
  }

  // The products of an int8 weight, in integers: its panels, or its rows as stored.
  void multiply_int8(Matrix<const float> a, int64_t first_col, Matrix<float> c) const {
    if (!panels_.defined()) {
      const int64_t ld = unpacked_.stride(0);
      return kernel::int8_dot_products(a, unpacked_.const_data_ptr<int8_t>() + first_col * ld, ld,
                                       scales_.const_data_ptr<float>() + first_col, c);
    }
    constexpr int64_t W = kernel::kInt8PanelWidth;
    const int64_t quads = panels_.size(1);
    const int64_t first_panel = first_col / group_ * panels_per_group(W) + first_col % group_ / W;
    kernel::int8_panel_products(a, panels_.const_data_ptr<int8_t>() + first_panel * quads * W * 4, quads,
                                scales_.const_data_ptr<float>() + first_panel * W, c);
  }

  int64_t k_, group_;
  at::Tensor panels_;    // [panels, k, kPanelWidth] in T, or int8 [panels, quads, kInt8PanelWidth, 4]
  at::Tensor unpacked_;  // [n, k] view of the weight, when not packed (T, or narrow read by rows)
  at::Tensor scales_;    // int8 weights' scales: [n] for unpacked_, [panels, kInt8PanelWidth] for panels_
};

// Every product's c [m, n] = aᵀ·b for a [k, m] and its b [k, n], all row-major: the weight
// gradients dgatesᵀ·x and dgatesᵀ·h_prev, which share a and are computed in one pass over it.
template <typename T>
void multiply_transposed(Matrix<const T> a, const std::vector<TransposedProduct<T>>& products) {
  kernel::multiply_transposed(a, products);
}

}  // namespace lstm_ext::blas
