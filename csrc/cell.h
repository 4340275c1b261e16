// The LSTM cell: one layer-direction's weights and one time step, forward and backward.
//
// Mirrors CellParams / LSTMCell in aten/src/ATen/native/RNN.cpp, but each step works in place on
// preallocated rows: the recurrent GEMM accumulates into the gate rows, then one fused pointwise
// pass applies the activations and writes the new state.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace lstm_ext {

using at::Tensor;

// Weights of one layer and direction: w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H] (optional),
// w_hr [P, H] (optional; without it P == H).
struct CellParams {
  Tensor w_ih, w_hh, b_ih, b_hh, w_hr;

  int64_t hidden_size() const { return w_hh.size(0) / 4; }
  int64_t output_size() const { return w_hr.defined() ? w_hr.size(0) : hidden_size(); }
  bool has_projection() const { return w_hr.defined(); }

  // The input projection of every row at once: x W_ihᵀ + b_ih + b_hh, [N, 4H], written into out.
  void linear_ih_out(Tensor& out, const Tensor& x) const {
    if (b_ih.defined()) {
      at::addmm_out(out, b_ih + b_hh, x, w_ih.t());
    } else {
      at::mm_out(out, x, w_ih.t());
    }
  }
  // gates += h W_hhᵀ
  void matmul_hh_add_(Tensor& gates, const Tensor& h) const { gates.addmm_(h, w_hh.t()); }
  // out = h_pre W_hrᵀ
  void matmul_hr_out(Tensor& out, const Tensor& h_pre) const { at::mm_out(out, h_pre, w_hr.t()); }
};

// Rows of a step smaller than this are done on one thread: spawning costs more than it saves.
constexpr int64_t kPointwiseGrain = 1 << 14;

template <typename opmath_t>
inline opmath_t sigmoid(opmath_t x) {
  return opmath_t(1) / (opmath_t(1) + std::exp(-x));
}

// Where a step's hidden output goes: a row-strided matrix.
template <typename scalar_t>
struct RowsOut {
  scalar_t* data = nullptr;
  int64_t stride = 0;
};

// What the forward step keeps for its backward twin, one row per batch entry (null in inference).
template <typename scalar_t>
struct StepSaved {
  scalar_t* tanh_cell = nullptr;  // tanh(c_t) [rows, H]
  scalar_t* cell_prev = nullptr;  // c_{t-1}   [rows, H]
};

struct LSTMCell {
  // One step, pointwise part. gates [rows, 4H] holds the pre-activations x W_ihᵀ + h W_hhᵀ + biases
  // (order i, f, g, o) and is overwritten with the activations, which the backward reuses.
  // cell [rows, H] is c_{t-1} on entry and c_t on exit. h_t = o * tanh(c_t) goes to `hidden`
  // and, when given, to `hidden_copy` too (the layer output).
  template <typename scalar_t>
  static void forward_pointwise(int64_t rows, int64_t H, scalar_t* gates, scalar_t* cell,
                                RowsOut<scalar_t> hidden, RowsOut<scalar_t> hidden_copy,
                                StepSaved<scalar_t> saved) {
    using opmath_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, rows, std::max<int64_t>(1, kPointwiseGrain / (4 * H)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* g = gates + r * 4 * H;
        scalar_t* c = cell + r * H;
        scalar_t* h = hidden.data + r * hidden.stride;
        scalar_t* h2 = hidden_copy.data ? hidden_copy.data + r * hidden_copy.stride : nullptr;
        scalar_t* tanh_c_saved = saved.tanh_cell ? saved.tanh_cell + r * H : nullptr;
        scalar_t* c_prev_saved = saved.cell_prev ? saved.cell_prev + r * H : nullptr;
        for (int64_t j = 0; j < H; ++j) {
          const opmath_t i = sigmoid<opmath_t>(g[j]);
          const opmath_t f = sigmoid<opmath_t>(g[H + j]);
          const opmath_t z = std::tanh(opmath_t(g[2 * H + j]));
          const opmath_t o = sigmoid<opmath_t>(g[3 * H + j]);
          const opmath_t c_prev = c[j];
          const opmath_t c_new = f * c_prev + i * z;
          const opmath_t tanh_c = std::tanh(c_new);
          const opmath_t h_new = o * tanh_c;
          g[j] = i;
          g[H + j] = f;
          g[2 * H + j] = z;
          g[3 * H + j] = o;
          c[j] = c_new;
          h[j] = h_new;
          if (h2) h2[j] = h_new;
          if (tanh_c_saved) {
            tanh_c_saved[j] = tanh_c;
            c_prev_saved[j] = c_prev;
          }
        }
      }
    });
  }

  // Backward twin of forward_pointwise. dhidden [rows, H] is dL/dh_t (before the projection);
  // dcell [rows, H] is dL/dc_t from later steps on entry and dL/dc_{t-1} on exit.
  // Writes dL/d(pre-activation gates) into dgates [rows, 4H].
  template <typename scalar_t>
  static void backward_pointwise(int64_t rows, int64_t H, const scalar_t* dhidden, scalar_t* dcell,
                                 const scalar_t* gates, const scalar_t* tanh_cell,
                                 const scalar_t* cell_prev, scalar_t* dgates) {
    using opmath_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, rows, std::max<int64_t>(1, kPointwiseGrain / (4 * H)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = gates + r * 4 * H;
        const scalar_t* dh = dhidden + r * H;
        const scalar_t* tc = tanh_cell + r * H;
        const scalar_t* cp = cell_prev + r * H;
        scalar_t* dc = dcell + r * H;
        scalar_t* dg = dgates + r * 4 * H;
        for (int64_t j = 0; j < H; ++j) {
          const opmath_t i = g[j], f = g[H + j], z = g[2 * H + j], o = g[3 * H + j];
          const opmath_t tanh_c = tc[j];
          const opmath_t dh_j = dh[j];
          const opmath_t dc_total = opmath_t(dc[j]) + dh_j * o * (opmath_t(1) - tanh_c * tanh_c);
          dg[j] = dc_total * z * i * (opmath_t(1) - i);
          dg[H + j] = dc_total * opmath_t(cp[j]) * f * (opmath_t(1) - f);
          dg[2 * H + j] = dc_total * i * (opmath_t(1) - z * z);
          dg[3 * H + j] = dh_j * tanh_c * o * (opmath_t(1) - o);
          dc[j] = dc_total * f;
        }
      }
    });
  }
};

}  // namespace lstm_ext
