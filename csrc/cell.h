// The LSTM cell: one layer-direction's weights and one time step, forward and backward.
//
// Mirrors CellParams / LSTMCell in aten/src/ATen/native/RNN.cpp, but a step works in place on
// preallocated rows and on a slice of the hidden units, so that the threads of a team can share
// a step: the recurrent GEMM accumulates into the slice's gate columns, then one fused,
// vectorized pointwise pass applies the activations and writes the new state.
#pragma once

#include "blas.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>
#include <optional>
#include <vector>

namespace lstm_ext::inline CPU_CAPABILITY {

using at::Tensor;
using blas::Matrix;

// Weights of one layer and direction: w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H] (optional),
// w_hr [P, H] (optional; without it P == H). Gate rows are ordered i, f, g, o as in ATen.
struct CellParams {
  Tensor w_ih, w_hh, b_ih, b_hh, w_hr;
  std::vector<Tensor> unit_weights;  // the cell's extra weights, [H] each (see the cell concept)
  std::vector<Tensor> layer_norm;    // γ_ih [4H], γ_hh [4H], γ_c [H], β_c [H], or none (see cells.h)
  // The per-row scales of int8 weight matrices (w = q·scale), else undefined (see blas.h).
  Tensor w_ih_scale, w_hh_scale, w_hr_scale;

  int64_t hidden_size() const { return w_hh.size(0) / 4; }
  int64_t output_size() const { return w_hr.defined() ? w_hr.size(0) : hidden_size(); }
  bool has_projection() const { return w_hr.defined(); }
};

// One cell's weights packed once per call for all its products (see blas.h). The forward
// multiplies by W_ih, W_hh and W_hr transposed, the backward by the weights themselves; each
// packing cuts its columns into the groups a thread's share is taken from. A call over few rows
// (a decoding step; see for_forward and for_backward) reads the weights as stored instead.
template <typename scalar_t>
struct PackedCell {
  using Weight = blas::PackedWeight<scalar_t>;
  Weight input, recurrent;
  std::optional<Weight> projection;
  Tensor bias;  // b_ih + b_hh, for the forward of a cell with biases
  // Or, in a call over few rows, the two biases, added row by row (no tensor op per call).
  Tensor bias_ih, bias_hh;

  // Calls over more rows pack the weights; fewer read them as stored (see PackedWeight).
  static constexpr int64_t kMaxUnpackedRows = blas::kernel::kMaxWeightMajorRows;

  static PackedCell for_forward(const CellParams& p, int64_t rows) {
    const int64_t H = p.hidden_size(), P = p.output_size();
    const bool pack = rows > kMaxUnpackedRows;
    PackedCell cell{Weight::rows_of(p.w_ih, 4 * H, pack, p.w_ih_scale), Weight::rows_of(p.w_hh, H, pack, p.w_hh_scale),
                    p.has_projection() ? std::optional<Weight>(Weight::rows_of(p.w_hr, P, pack, p.w_hr_scale))
                                       : std::nullopt};
    if (p.b_ih.defined() && pack) {
      cell.bias = (p.b_ih + p.b_hh).contiguous();
    } else if (p.b_ih.defined()) {
      cell.bias_ih = p.b_ih.contiguous();
      cell.bias_hh = p.b_hh.contiguous();
    }
    return cell;
  }
  static PackedCell for_backward(const CellParams& p, int64_t rows) {
    const int64_t H = p.hidden_size(), P = p.output_size();
    const bool pack = rows > kMaxUnpackedRows;
    return {Weight::columns_of(p.w_ih, p.w_ih.size(1), pack), Weight::columns_of(p.w_hh, P, pack),
            p.has_projection() ? std::optional<Weight>(Weight::columns_of(p.w_hr, H, pack)) : std::nullopt,
            Tensor()};
  }

  // The input projection of x's rows [begin, end) at once, one product: their x W_ihᵀ + b_ih + b_hh
  // into gates' first end - begin rows.
  void project_input(const Tensor& x, int64_t begin, int64_t end, const Tensor& gates) const {
    const blas::Matrix<const scalar_t> in = blas::as_matrix<const scalar_t>(x);
    const blas::Matrix<scalar_t> out = blas::as_matrix<scalar_t>(gates);
    const bool biases_per_row = bias_ih.defined();
    if (biases_per_row) {
      const scalar_t* b_ih = bias_ih.data_ptr<scalar_t>();
      const scalar_t* b_hh = bias_hh.data_ptr<scalar_t>();
      for (int64_t r = 0; r < end - begin; ++r) {
        scalar_t* row = out.data + r * out.ld;
        for (int64_t j = 0; j < out.cols; ++j) row[j] = b_ih[j] + b_hh[j];
      }
    }
    input.multiply_parallel({in.data + begin * in.ld, end - begin, in.cols, in.ld}, 0,
                            {out.data, end - begin, out.cols, out.ld}, /*accumulate=*/biases_per_row,
                            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr);
  }
  // Its backward twin (on a PackedCell for_backward): grad_x = dgates · W_ih, or += with `accumulate`.
  void input_gradient(const Tensor& dgates, const Tensor& grad_x, bool accumulate) const {
    input.multiply_parallel(blas::as_matrix<const scalar_t>(dgates), 0, blas::as_matrix<scalar_t>(grad_x), accumulate);
  }

  // The weights' side of both products, over every row at once: grad_w_ih = dgatesᵀ·x and
  // grad_w_hh = dgatesᵀ·h_prev, in one pass over dgates.
  static void weight_gradients(const Tensor& dgates, const Tensor& x, const Tensor& h_prev, const Tensor& grad_w_ih,
                               const Tensor& grad_w_hh) {
    using blas::as_matrix;
    blas::multiply_transposed<scalar_t>(as_matrix<const scalar_t>(dgates),
                                        {{as_matrix<const scalar_t>(x), as_matrix<scalar_t>(grad_w_ih)},
                                         {as_matrix<const scalar_t>(h_prev), as_matrix<scalar_t>(grad_w_hh)}});
  }
  // One weight's alone: grad_w = doutᵀ·in, dout [N, *] the gradient of the product's output rows
  // and in [N, *] its input rows (the projection's: dL/dh_t and h_t before it; with layer norm,
  // W_ih's and W_hh's, whose products' gradients differ).
  static void weight_gradient(const Tensor& dout, const Tensor& in, const Tensor& grad_w) {
    using blas::as_matrix;
    blas::multiply_transposed<scalar_t>(as_matrix<const scalar_t>(dout),
                                        {{as_matrix<const scalar_t>(in), as_matrix<scalar_t>(grad_w)}});
  }
};

// The hidden units [begin, end) that one thread owns within a step.
struct UnitSlice {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

// What the forward step keeps for its backward twin, [rows, H] each (null in inference).
template <typename scalar_t>
struct StepSaved {
  scalar_t* tanh_cell = nullptr;  // tanh(c_t)
  scalar_t* cell_prev = nullptr;  // c_{t-1}
};

namespace pointwise {

#if defined(CPU_CAPABILITY_AVX2)
// exp and expm1 for float64 activations, inline (AVX2 builds; AVX-512 builds call Sleef's
// eight-lane ones): Sleef's 1-ulp exp is an out-of-line call that
// spills every live register around it, and its expm1 costs several exps. Same method:
// n = round(x/ln2), r = x - n·ln2 in two parts, expm1(r) by its Taylor polynomial of degree 13
// (truncation 5e-18 on |r| <= ln2/2) evaluated by Estrin's scheme, so that the five
// activations of a step overlap; 2^n from n's bits.
struct ReducedExp {
  __m256d expm1_r;    // expm1(r)
  __m256i n_shifted;  // the bits of n + 1.5·2^52: n in the low mantissa bits

  // 2^(n + offset), for n + offset in the normal range.
  __m256d pow2(int64_t offset) const {
    return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(n_shifted, _mm256_set1_epi64x(1023 + offset)), 52));
  }
};

// For x in [lo, hi], or NaN: max/min return their second operand when one is NaN, so NaN
// flows through the arithmetic to the result.
inline ReducedExp reduce_exp(__m256d x, double lo, double hi) {
  x = _mm256_min_pd(_mm256_set1_pd(hi), _mm256_max_pd(_mm256_set1_pd(lo), x));
  const __m256d shifter = _mm256_set1_pd(0x1.8p52);
  const __m256d n_shifted = _mm256_fmadd_pd(x, _mm256_set1_pd(1.4426950408889634), shifter);
  const __m256d n = _mm256_sub_pd(n_shifted, shifter);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180559945286227e-01), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(2.31904681384629955842e-17), r);
  const auto c = [](double value) { return _mm256_set1_pd(value); };
  const auto pair = [&](double lo, double hi) { return _mm256_fmadd_pd(c(hi), r, c(lo)); };
  const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2), r8 = _mm256_mul_pd(r4, r4);
  const __m256d low = _mm256_fmadd_pd(
      r4, _mm256_fmadd_pd(r2, pair(1.0 / 720, 1.0 / 5040), pair(1.0 / 24, 1.0 / 120)),
      _mm256_fmadd_pd(r2, pair(0.5, 1.0 / 6), r));
  const __m256d high = _mm256_fmadd_pd(
      r4, pair(1.0 / 479001600, 1.0 / 6227020800),
      _mm256_fmadd_pd(r2, pair(1.0 / 3628800, 1.0 / 39916800), pair(1.0 / 40320, 1.0 / 362880)));
  return {_mm256_fmadd_pd(r8, high, low), _mm256_castpd_si256(n_shifted)};
}

// exp(x), clamped to [exp(-708), exp(709.79)]: the activations only add it to 1, where the
// clamp changes nothing. 2^(n-1)·(2 + 2·expm1(r)), as 2^n overflows at n = 1024.
inline at::vec::Vectorized<double> exp_inline(const at::vec::Vectorized<double>& x) {
  const ReducedExp e = reduce_exp(x, -708.0, 709.79);
  const __m256d half_scale = e.pow2(-1);
  const __m256d half = _mm256_fmadd_pd(e.expm1_r, half_scale, half_scale);
  return _mm256_add_pd(half, half);
}

// expm1(x), clamped to [expm1(-708), expm1(709)] = [-1, 8.2e307]: 2^n·expm1(r) + (2^n - 1),
// exact where n = 0 (|x| < ln2/2), which is what tanh(x) = expm1(2x) / (expm1(2x) + 2) needs.
inline at::vec::Vectorized<double> expm1_inline(const at::vec::Vectorized<double>& x) {
  const ReducedExp e = reduce_exp(x, -708.0, 709.0);
  const __m256d scale = e.pow2(0);
  return _mm256_fmadd_pd(e.expm1_r, scale, _mm256_sub_pd(scale, _mm256_set1_pd(1.0)));
}
#endif

// float32 takes at::vec's inline polynomial exp (about 20 ulp, several times cheaper than Sleef's
// 1-ulp call): the activations are most of a small step's time, and 20 ulp is far inside float32's
// tolerance. float64 keeps a ~1-ulp exp so that results stay within ~1e-12 of native.
template <typename V>
inline V exp_for_activation(const V& x) {
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    // The polynomial loses NaN (it clamps its input first); put it back.
    return V::blendv(x.exp_u20(), x, x.isnan());
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    return exp_inline(x);
#else
    return x.exp();
#endif
  }
}

template <typename V>
inline V sigmoid(const V& x) {
  return (V(1) + exp_for_activation(x.neg())).reciprocal();
}

template <typename V>
inline V tanh(const V& x) {
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return V(2) * sigmoid(x + x) - V(1);  // tanh(x) = 2·sigmoid(2x) - 1
  } else {
    // One expm1 and one division, a few ulp everywhere: expm1 keeps small x's digits, where
    // 1 - 2 / (exp(2x) + 1) would cancel. Clamped at 709, expm1 stays finite and gives ±1 past
    // tanh's saturation.
#if defined(CPU_CAPABILITY_AVX2)
    const V e = expm1_inline(x + x);
#else
    const V e = at::vec::minimum(x + x, V(709.0)).expm1();
#endif
    return e / (e + V(2));
  }
}

// The differentiable recomputation (see FullLayer::forward_differentiable) runs the same cell
// math on whole tensors, through ATen ops that every autograd transform knows.
inline Tensor sigmoid(const Tensor& x) { return x.sigmoid(); }
inline Tensor tanh(const Tensor& x) { return x.tanh(); }

// a·b + c: one fused instruction on vectors; the tensor form stays differentiable.
template <typename V>
inline V fmadd(const V& a, const V& b, const V& c) {
  if constexpr (std::is_same_v<V, Tensor>) {
    return at::addcmul(c, a, b);
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

// 1 - x, for every kind of value.
template <typename V>
inline V one_minus(const V& x) {
  if constexpr (std::is_same_v<V, Tensor>) {
    return 1 - x;
  } else {
    return V(1) - x;
  }
}

// Calls body(j, count) over [begin, end) in vector-sized chunks (the last may be shorter).
template <typename scalar_t, typename Body>
inline void for_each_chunk(int64_t begin, int64_t end, const Body& body) {
  constexpr int64_t width = at::vec::Vectorized<scalar_t>::size();
  for (int64_t j = begin; j < end; j += width) body(j, std::min(width, end - j));
}

}  // namespace pointwise

// ---- the cell concept ----------------------------------------------------------------------------
//
// A cell is a struct with
//   kName         the name the operators and Python know it by (`cell="..."`);
//   kUnitWeights  how many extra weights of H values each layer-direction has (peepholes: 3);
//   forward<V>    the step's pointwise math from the gate pre-activations and c_{t-1};
//   backward<V>   its backward twin: the gradients of the pre-activations, of c_{t-1} and of
//                 the extra weights, from what the step kept (Saved) and dL/dh_t, dL/dc_t.
// Both are templates over the value type V: at::vec vectors in the fast passes below, and whole
// tensors (forward only) in the differentiable recomputation that higher-order and forward-mode autodiff and vmap go through.
// Everything else (products, threads, layers, workspace, autograd) is the same for every cell.

// The four gate blocks, in ATen's order i, f, g, o: pre-activations, or their gradients.
template <typename V>
struct Gates {
  V i, f, g, o;
};

// One step's values for some units: the gate activations, the new cell state, its tanh and the
// new hidden state (before any projection).
template <typename V>
struct Values {
  V i, f, z, o, cell, tanh_cell, hidden;
};

// What a backward step reads for some units: the gate activations, tanh(c_t) and c_{t-1}.
template <typename V>
struct Saved {
  V i, f, z, o, tanh_cell, cell_prev;
};

// A cell's extra weights of H values each, as values of V for some units.
template <typename V, int Count>
using UnitWeights = std::array<V, Count>;

// A backward step's gradients for some units: of the gate pre-activations, of c_{t-1}, and of
// each extra weight (this step's and these rows' share, summed over all of them by the caller).
template <typename V, int Count>
struct StepGradients {
  Gates<V> pre;
  V cell_prev;
  UnitWeights<V, Count> weights;
};

// The plain LSTM cell, as ATen's: c_t = σ(f)·c_{t-1} + σ(i)·tanh(g), h_t = σ(o)·tanh(c_t).
struct LSTMCell {
  static constexpr const char* kName = "lstm";
  static constexpr int kUnitWeights = 0;
  template <typename V>
  using Weights = UnitWeights<V, kUnitWeights>;

  template <typename V>
  static Values<V> forward(const Gates<V>& pre, const V& cell_prev, const Weights<V>&) {
    const V i = pointwise::sigmoid(pre.i), f = pointwise::sigmoid(pre.f);
    const V z = pointwise::tanh(pre.g), o = pointwise::sigmoid(pre.o);
    const V cell = pointwise::fmadd(f, cell_prev, i * z);
    const V tanh_cell = pointwise::tanh(cell);
    return {i, f, z, o, cell, tanh_cell, o * tanh_cell};
  }

  template <typename V>
  static StepGradients<V, kUnitWeights> backward(const Saved<V>& s, const Weights<V>&, const V& dhidden,
                                                 const V& dcell) {
    const V one(1);
    const V dc_total = pointwise::fmadd(dhidden * s.o, one - s.tanh_cell * s.tanh_cell, dcell);
    return {{dc_total * s.z * s.i * (one - s.i), dc_total * s.cell_prev * s.f * (one - s.f),
             dc_total * s.i * (one - s.z * s.z), dhidden * s.tanh_cell * s.o * (one - s.o)},
            dc_total * s.f,
            {}};
  }
};

// The fast passes of a cell over rows and a slice of units: loads, Cell::forward or
// Cell::backward, stores, vectorized (float and double: the reduced types compute in float).
template <typename Cell>
struct CellPointwise {
  static constexpr int K = Cell::kUnitWeights;
  template <typename scalar_t>
  using WeightData = std::array<const scalar_t*, K>;

  template <typename scalar_t>
  static WeightData<scalar_t> weight_data(const CellParams& params) {
    WeightData<scalar_t> data;
    for (int k = 0; k < K; ++k) data[k] = params.unit_weights[k].data_ptr<scalar_t>();
    return data;
  }

  // Forward pointwise for rows [0, rows) and the units of `units`. gates [rows, 4H] holds the
  // pre-activations (x W_ihᵀ + h W_hhᵀ + biases) and is overwritten with the activations, which
  // the backward reuses. cell [rows, H] is c_{t-1} on entry and c_t on exit. h_t goes to
  // `hidden` and, when its data is not null, to `hidden_copy`. weights: the cell's extra weights.
  // cell_keep [rows, H] (when its data is not null; ld 0 for one row for all): zoneout's share
  // k of c_{t-1} in c_t = k·c_{t-1} + (1 - k)·c̃_t, c̃_t the cell's own new state.
  template <typename scalar_t>
  static void forward(int64_t rows, int64_t H, UnitSlice units, scalar_t* gates, scalar_t* cell,
                      Matrix<scalar_t> hidden, Matrix<scalar_t> hidden_copy, StepSaved<scalar_t> saved,
                      const WeightData<scalar_t>& weights, Matrix<const scalar_t> cell_keep) {
    // Zoneout's pass is another instantiation: the one without keeps the plain loop's code.
    if (cell_keep.data) {
      forward_rows<scalar_t, true>(rows, H, units, gates, cell, hidden, hidden_copy, saved, weights, cell_keep);
    } else {
      forward_rows<scalar_t, false>(rows, H, units, gates, cell, hidden, hidden_copy, saved, weights, cell_keep);
    }
  }

  // Backward twin of forward. dhidden [rows, ld] is dL/dh_t (before the projection); dcell
  // [rows, H] is dL/dc_t from later steps on entry and dL/dc_{t-1} on exit. Writes
  // dL/d(pre-activation gates) into dgates [rows, 4H] and adds the extra weights' gradients of
  // these rows into grad_weights [K, H]. cell_keep: the forward's.
  template <typename scalar_t>
  static void backward(int64_t rows, int64_t H, UnitSlice units, Matrix<const scalar_t> dhidden, scalar_t* dcell,
                       const scalar_t* gates, const scalar_t* tanh_cell, const scalar_t* cell_prev, scalar_t* dgates,
                       const WeightData<scalar_t>& weights, scalar_t* grad_weights,
                       Matrix<const scalar_t> cell_keep) {
    if (cell_keep.data) {
      backward_rows<scalar_t, true>(rows, H, units, dhidden, dcell, gates, tanh_cell, cell_prev, dgates, weights,
                                    grad_weights, cell_keep);
    } else {
      backward_rows<scalar_t, false>(rows, H, units, dhidden, dcell, gates, tanh_cell, cell_prev, dgates, weights,
                                     grad_weights, cell_keep);
    }
  }

 private:
  template <typename scalar_t, bool kZoneout>
  static void forward_rows(int64_t rows, int64_t H, UnitSlice units, scalar_t* gates, scalar_t* cell,
                           Matrix<scalar_t> hidden, Matrix<scalar_t> hidden_copy, StepSaved<scalar_t> saved,
                           const WeightData<scalar_t>& weights, Matrix<const scalar_t> cell_keep) {
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* g = gates + r * 4 * H;
      scalar_t* c = cell + r * H;
      scalar_t* h = hidden.data + r * hidden.ld;
      scalar_t* h2 = hidden_copy.data ? hidden_copy.data + r * hidden_copy.ld : nullptr;
      scalar_t* tanh_c_out = saved.tanh_cell ? saved.tanh_cell + r * H : nullptr;
      scalar_t* c_prev_out = saved.cell_prev ? saved.cell_prev + r * H : nullptr;
      const scalar_t* keep = cell_keep.data ? cell_keep.data + r * cell_keep.ld : nullptr;
      using Vec = at::vec::Vectorized<scalar_t>;
      pointwise::for_each_chunk<scalar_t>(units.begin, units.end, [&](int64_t j, int64_t n) {
        const Vec c_prev = Vec::loadu(c + j, n);
        typename Cell::template Weights<Vec> w;
        for (int k = 0; k < K; ++k) w[k] = Vec::loadu(weights[k] + j, n);
        const Values<Vec> v = Cell::template forward<Vec>(
            {Vec::loadu(g + j, n), Vec::loadu(g + H + j, n), Vec::loadu(g + 2 * H + j, n),
             Vec::loadu(g + 3 * H + j, n)},
            c_prev, w);
        v.i.store(g + j, n);
        v.f.store(g + H + j, n);
        v.z.store(g + 2 * H + j, n);
        v.o.store(g + 3 * H + j, n);
        if constexpr (kZoneout) {
          const Vec k = Vec::loadu(keep + j, n);
          at::vec::fmadd(k, c_prev, (Vec(1) - k) * v.cell).store(c + j, n);
        } else {
          v.cell.store(c + j, n);
        }
        v.hidden.store(h + j, n);
        if (h2) v.hidden.store(h2 + j, n);
        if (tanh_c_out) {
          v.tanh_cell.store(tanh_c_out + j, n);
          c_prev.store(c_prev_out + j, n);
        }
      });
    }
  }

  template <typename scalar_t, bool kZoneout>
  static void backward_rows(int64_t rows, int64_t H, UnitSlice units, Matrix<const scalar_t> dhidden, scalar_t* dcell,
                            const scalar_t* gates, const scalar_t* tanh_cell, const scalar_t* cell_prev,
                            scalar_t* dgates, const WeightData<scalar_t>& weights,
                            scalar_t* grad_weights, Matrix<const scalar_t> cell_keep) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* g = gates + r * 4 * H;
      const scalar_t* dh = dhidden.data + r * dhidden.ld;
      const scalar_t* tc = tanh_cell + r * H;
      const scalar_t* cp = cell_prev + r * H;
      scalar_t* dc = dcell + r * H;
      scalar_t* dg = dgates + r * 4 * H;
      const scalar_t* keep = cell_keep.data ? cell_keep.data + r * cell_keep.ld : nullptr;
      using Vec = at::vec::Vectorized<scalar_t>;
      pointwise::for_each_chunk<scalar_t>(units.begin, units.end, [&](int64_t j, int64_t n) {
        typename Cell::template Weights<Vec> w;
        for (int k = 0; k < K; ++k) w[k] = Vec::loadu(weights[k] + j, n);
        const Saved<Vec> s{Vec::loadu(g + j, n),     Vec::loadu(g + H + j, n), Vec::loadu(g + 2 * H + j, n),
                           Vec::loadu(g + 3 * H + j, n), Vec::loadu(tc + j, n),   Vec::loadu(cp + j, n)};
        // With zoneout, dL/dc_t splits into its shares through c̃_t and straight to c_{t-1}.
        const Vec dc_t = Vec::loadu(dc + j, n), k = kZoneout ? Vec::loadu(keep + j, n) : Vec(0);
        const auto d =
            Cell::template backward<Vec>(s, w, Vec::loadu(dh + j, n), kZoneout ? (Vec(1) - k) * dc_t : dc_t);
        d.pre.i.store(dg + j, n);
        d.pre.f.store(dg + H + j, n);
        d.pre.g.store(dg + 2 * H + j, n);
        d.pre.o.store(dg + 3 * H + j, n);
        (kZoneout ? at::vec::fmadd(k, dc_t, d.cell_prev) : d.cell_prev).store(dc + j, n);
        for (int k = 0; k < K; ++k) {
          scalar_t* grad = grad_weights + k * H + j;
          (Vec::loadu(grad, n) + d.weights[k]).store(grad, n);
        }
      });
    }
  }

};

// gates[:, gate columns of units] (+)= h · W_hh[rows of units]ᵀ, for h [rows, P]: one product
// per gate block. `descending` walks W_hh backwards (blocks and depth; see PackedWeight::multiply).
template <typename scalar_t>
void matmul_hh(Matrix<const scalar_t> h, const blas::PackedWeight<scalar_t>& w_hh, int64_t H, UnitSlice units,
               scalar_t* gates, bool descending, bool accumulate) {
  for (int64_t i = 0; i < 4; ++i) {
    const int64_t col = (descending ? 3 - i : i) * H + units.begin;
    w_hh.multiply(h, col, {gates + col, h.rows, units.size(), 4 * H}, accumulate, nullptr, descending);
  }
}

}  // namespace lstm_ext
