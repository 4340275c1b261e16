// One direction of one layer run over all time steps: ATen's FullLayer and its packed siblings.
//
// Dense input is the packed layout with every batch size equal, so one FullLayer serves both:
// step t works on rows [offset[t], offset[t] + batch_size[t]) of the flattened [N, *] input.
// Walking forward the batch shrinks and a finished sequence's state rows keep its final state
// (PackedLayer); walking in reverse it grows and a sequence starts from its initial state
// (ReversedPackedLayer).
#pragma once

#include "cells.h"
#include "parallel.h"

#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <vector>

namespace lstm_ext::inline CPU_CAPABILITY {

// The time steps of a batch of sequences, sorted by decreasing length.
struct Steps {
  std::vector<int64_t> batch_sizes;  // rows of each step, non-increasing
  std::vector<int64_t> offsets;      // first row of each step

  static Steps from_batch_sizes(std::vector<int64_t> batch_sizes) {
    Steps steps{std::move(batch_sizes), {}};
    steps.offsets.reserve(steps.batch_sizes.size());
    int64_t row = 0;
    for (int64_t size : steps.batch_sizes) {
      steps.offsets.push_back(row);
      row += size;
    }
    return steps;
  }
  int64_t count() const { return static_cast<int64_t>(batch_sizes.size()); }
  int64_t rows() const { return count() == 0 ? 0 : offsets.back() + batch_sizes.back(); }
  int64_t max_batch() const { return count() == 0 ? 0 : batch_sizes.front(); }
};

// A packed call's batch sizes as the list lstm_ext::forward_differentiable takes (under a transform
// a tensor is wrapped, and a wrapped tensor has no data to read): a view of `contiguous`, which
// holds them and must outlive it. nullopt for dense input.
inline at::OptionalIntArrayRef batch_size_list(const std::optional<Tensor>& batch_sizes, Tensor& contiguous) {
  if (!batch_sizes.has_value()) return std::nullopt;
  contiguous = batch_sizes->contiguous();
  TORCH_CHECK(contiguous.dim() == 1 && contiguous.scalar_type() == at::kLong,
              "lstm_ext: batch_sizes must be a 1-D int64 tensor, got ", contiguous.dim(), "-D ",
              contiguous.scalar_type());
  return at::IntArrayRef(contiguous.data_ptr<int64_t>(), contiguous.numel());
}

// What layer norm (see cells.h) keeps for its backward, one row per input row.
struct LayerNormSaved {
  Tensor input;      // [N, 4H] x̂ = (x W_ihᵀ - mean)·rstd: the input projection normalised, before γ_ih
  Tensor recurrent;  // [N, 4H] the same of h_{t-1} W_hhᵀ
  Tensor cell;       // [N, H]  the same of c̃_t
  Tensor rstd;       // [N, 3]  1/sqrt(var + eps) of the three
};

// What one layer-direction's forward keeps for its backward, one row per input row.
struct DirectionSaved {
  Tensor gates;         // [N, 4H] gate activations i, f, g, o
  Tensor tanh_cells;    // [N, H]  tanh(c_t), or with layer norm tanh(LN(c̃_t))
  Tensor cells_prev;    // [N, H]  c_{t-1}
  Tensor hiddens_prev;  // [N, P]  h_{t-1}
  LayerNormSaved layer_norm;  // undefined without layer norm
};

// ---- layer norm's steps ---------------------------------------------------------------------------
//
// Layer norm's statistics span a row's units, of which a team member owns a slice: after the
// step's product, and again after the pointwise pass, the members meet; then each reads whole
// rows, computes their statistics (the same numbers in every member) and writes its units only.

// The mean and 1/sqrt(var + eps) of v[0, n), the variance from the centred values (as ATen's).
template <typename scalar_t>
std::pair<scalar_t, scalar_t> row_moments(const scalar_t* v, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  const scalar_t mean = at::vec::reduce_all<scalar_t>(add, v, n) / scalar_t(n);
  const auto squared_deviation = [mean](const Vec& x) { return (x - Vec(mean)) * (x - Vec(mean)); };
  const scalar_t var = at::vec::map_reduce_all<scalar_t>(squared_deviation, add, v, n) / scalar_t(n);
  return {mean, scalar_t(1) / std::sqrt(var + scalar_t(kLayerNormEps))};
}

// The input projection's layer norm over rows [0, rows) of gates [rows, 4H], all of a chunk at
// once before the loop: x W_ihᵀ on entry, γ_ih·x̂ + b_ih + b_hh on exit (no biases when b_ih is
// null), x̂ = LN(x W_ihᵀ). x̂ and its 1/sqrt(var + eps) go to saved_normalized [N, 4H] and
// saved_rstd [N, 3] (LayerNormSaved's data) from the chunk's first row, row0, on when they are
// not null.
template <typename scalar_t>
void normalize_input(int64_t rows, int64_t row0, int64_t H, scalar_t* gates, const scalar_t* gain,
                     const scalar_t* b_ih, const scalar_t* b_hh, scalar_t* saved_normalized, scalar_t* saved_rstd) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g = gates + r * 4 * H;
      const auto [mean, rstd] = row_moments(g, 4 * H);
      if (saved_rstd) saved_rstd[(row0 + r) * 3] = rstd;
      pointwise::for_each_chunk<scalar_t>(0, 4 * H, [&](int64_t j, int64_t n) {
        const Vec normalized = (Vec::loadu(g + j, n) - Vec(mean)) * Vec(rstd);
        if (saved_normalized) normalized.store(saved_normalized + (row0 + r) * 4 * H + j, n);
        const Vec bias = b_ih ? Vec::loadu(b_ih + j, n) + Vec::loadu(b_hh + j, n) : Vec(0);
        at::vec::fmadd(Vec::loadu(gain + j, n), normalized, bias).store(g + j, n);
      });
    }
  });
}

// The backward of a row's gates += γ·x̂, x̂ = LN(v) over its 4H columns: from dg = dL/d gates (all
// columns), dv = rstd·(γ·dg − mean(γ·dg) − x̂·mean(γ·dg·x̂)) for the columns of `units` in each
// gate block, and dg·x̂ added to grad_gain's (unless it is null).
template <typename scalar_t>
void gate_norm_backward(int64_t H, UnitSlice units, const scalar_t* dg, const scalar_t* gain,
                        const scalar_t* normalized, scalar_t rstd, scalar_t* dv, scalar_t* grad_gain) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  Vec sum(0), sum_normalized(0);
  pointwise::for_each_chunk<scalar_t>(0, 4 * H, [&](int64_t j, int64_t n) {
    const Vec d = Vec::loadu(gain + j, n) * Vec::loadu(dg + j, n);
    sum = sum + d;
    sum_normalized = at::vec::fmadd(d, Vec::loadu(normalized + j, n), sum_normalized);
  });
  const Vec mean(at::vec::vec_reduce_all<scalar_t>(add, sum) / scalar_t(4 * H));
  const Vec mean_normalized(at::vec::vec_reduce_all<scalar_t>(add, sum_normalized) / scalar_t(4 * H));
  for (int64_t block = 0; block < 4; ++block) {
    pointwise::for_each_chunk<scalar_t>(block * H + units.begin, block * H + units.end, [&](int64_t j, int64_t n) {
      const Vec d = Vec::loadu(dg + j, n), x = Vec::loadu(normalized + j, n);
      (Vec(rstd) * (Vec::loadu(gain + j, n) * d - mean - x * mean_normalized)).store(dv + j, n);
      if (grad_gain) (Vec::loadu(grad_gain + j, n) + d * x).store(grad_gain + j, n);
    });
  }
}

// One layer-direction's layer norm in its recurrent loop, forward and backward. The passes take
// the step's rows of gates, cell and their gradients; `saved_*` are LayerNormSaved's whole data
// (null in inference), indexed from the step's first row, row0.
template <typename scalar_t>
struct LayerNormStep {
  using Vec = at::vec::Vectorized<scalar_t>;
  int64_t H;
  const scalar_t *gain_recurrent, *gain_cell, *bias_cell;  // γ_hh [4H], γ_c [H], β_c [H]
  scalar_t* recurrent;  // [B, 4H] scratch: a step's h_{t-1} W_hhᵀ (forward)
  // [B, H] scratch for inference, where the pointwise pass saves nothing: tanh(LN(c̃_t)), c_{t-1}.
  scalar_t *tanh_cell, *cell_prev;
  scalar_t *saved_recurrent, *saved_cell, *saved_rstd;  // LayerNormSaved's data; null in inference
  // The backward's sums over rows and steps of the gradients of γ_hh [4H], γ_c [H], β_c [H].
  scalar_t* grad_weights;

  // Forward, after the product: gates += γ_hh·x̂ with x̂ = LN(recurrent) of this member's units.
  void add_recurrent(int64_t rows, int64_t row0, UnitSlice units, scalar_t* gates, bool rstd_writer) const {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* v = recurrent + r * 4 * H;
      const auto [mean, rstd] = row_moments(v, 4 * H);
      if (saved_rstd && rstd_writer) saved_rstd[(row0 + r) * 3 + 1] = rstd;
      for (int64_t block = 0; block < 4; ++block) {
        const int64_t offset = block * H;
        pointwise::for_each_chunk<scalar_t>(units.begin, units.end, [&](int64_t j, int64_t n) {
          const Vec normalized = (Vec::loadu(v + offset + j, n) - Vec(mean)) * Vec(rstd);
          if (saved_recurrent) normalized.store(saved_recurrent + (row0 + r) * 4 * H + offset + j, n);
          scalar_t* g = gates + r * 4 * H + offset + j;
          at::vec::fmadd(Vec::loadu(gain_recurrent + offset + j, n), normalized, Vec::loadu(g, n)).store(g, n);
        });
      }
    }
  }

  // Forward, after the pointwise pass: from c̃_t (cell, all units) and σ(o) (gates' last block),
  // h̃_t = σ(o)·tanh(LN(c̃_t)) of this member's units into hidden (and hidden_copy), and
  // tanh(LN(c̃_t)) into tanh_cell when it is not null.
  void hidden_from_cell(int64_t rows, int64_t row0, UnitSlice units, const scalar_t* gates, const scalar_t* cell,
                        Matrix<scalar_t> hidden, Matrix<scalar_t> hidden_copy, scalar_t* tanh_cell,
                        bool rstd_writer) const {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* c = cell + r * H;
      const auto [mean, rstd] = row_moments(c, H);
      if (saved_rstd && rstd_writer) saved_rstd[(row0 + r) * 3 + 2] = rstd;
      pointwise::for_each_chunk<scalar_t>(units.begin, units.end, [&](int64_t j, int64_t n) {
        const Vec normalized = (Vec::loadu(c + j, n) - Vec(mean)) * Vec(rstd);
        if (saved_cell) normalized.store(saved_cell + (row0 + r) * H + j, n);
        const Vec tanh_n = pointwise::tanh(
            at::vec::fmadd(Vec::loadu(gain_cell + j, n), normalized, Vec::loadu(bias_cell + j, n)));
        const Vec h = Vec::loadu(gates + r * 4 * H + 3 * H + j, n) * tanh_n;
        h.store(hidden.data + r * hidden.ld + j, n);
        if (hidden_copy.data) h.store(hidden_copy.data + r * hidden_copy.ld + j, n);
        if (tanh_cell) tanh_n.store(tanh_cell + r * H + j, n);
      });
    }
  }

  // Backward twin of hidden_from_cell. dhidden: dL/dh̃_t of all units. Turns dcell, dL/dc_t of
  // this member's units, into what the cell's backward takes for c̃_t, and keeps zoneout's share
  // of it (cell_keep, when its data is not null) in dcell_kept: the cell's backward adds
  // dhidden·σ(o)·(1 - tanh²) to dcell, the path from h̃_t to c̃_t without layer norm, so that
  // term is taken off and layer norm's path added instead. Adds the gradients of γ_c and β_c.
  void cell_gradient(int64_t rows, int64_t row0, UnitSlice units, Matrix<const scalar_t> dhidden,
                     const scalar_t* gates, const scalar_t* tanh_cell, scalar_t* dcell,
                     Matrix<const scalar_t> cell_keep, scalar_t* dcell_kept) const {
    scalar_t* grad_gain = grad_weights + 4 * H;
    scalar_t* grad_bias = grad_weights + 5 * H;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* dh = dhidden.data + r * dhidden.ld;
      const scalar_t* o = gates + r * 4 * H + 3 * H;
      const scalar_t* t = tanh_cell + r * H;
      const scalar_t* normalized = saved_cell + (row0 + r) * H;
      // dn = dL/d LN(c̃_t), and the sums of γ_c·dn and γ_c·dn·x̂ over the row.
      const auto dn = [&](int64_t j, int64_t n) {
        const Vec tanh_n = Vec::loadu(t + j, n);
        return Vec::loadu(dh + j, n) * Vec::loadu(o + j, n) * (Vec(1) - tanh_n * tanh_n);
      };
      Vec sum(0), sum_normalized(0);
      pointwise::for_each_chunk<scalar_t>(0, H, [&](int64_t j, int64_t n) {
        const Vec d = Vec::loadu(gain_cell + j, n) * dn(j, n);
        sum = sum + d;
        sum_normalized = at::vec::fmadd(d, Vec::loadu(normalized + j, n), sum_normalized);
      });
      const auto add = [](Vec& a, Vec& b) { return a + b; };
      const scalar_t mean = at::vec::vec_reduce_all<scalar_t>(add, sum) / scalar_t(H);
      const scalar_t mean_normalized = at::vec::vec_reduce_all<scalar_t>(add, sum_normalized) / scalar_t(H);
      const Vec rstd(saved_rstd[(row0 + r) * 3 + 2]);
      scalar_t* dc = dcell + r * H;
      const scalar_t* keep = cell_keep.data ? cell_keep.data + r * cell_keep.ld : nullptr;
      pointwise::for_each_chunk<scalar_t>(units.begin, units.end, [&](int64_t j, int64_t n) {
        const Vec d_n = dn(j, n), x = Vec::loadu(normalized + j, n);
        const Vec through_norm =
            rstd * (Vec::loadu(gain_cell + j, n) * d_n - Vec(mean) - x * Vec(mean_normalized));
        Vec dc_t = Vec::loadu(dc + j, n);
        if (keep) {  // zoneout: k·dL/dc_t goes straight to c_{t-1}, the rest through c̃_t
          const Vec k = Vec::loadu(keep + j, n);
          (k * dc_t).store(dcell_kept + r * H + j, n);
          dc_t = (Vec(1) - k) * dc_t;
        }
        (dc_t + through_norm - d_n).store(dc + j, n);
        (Vec::loadu(grad_gain + j, n) + d_n * x).store(grad_gain + j, n);
        (Vec::loadu(grad_bias + j, n) + d_n).store(grad_bias + j, n);
      });
    }
  }

  // Backward twin of add_recurrent: from dgates, dL/d(pre-activations) of all columns, the
  // gradient of h_{t-1} W_hhᵀ for this member's columns into drecurrent, and of γ_hh.
  void recurrent_gradient(int64_t rows, int64_t row0, UnitSlice units, const scalar_t* dgates,
                          scalar_t* drecurrent) const {
    for (int64_t r = 0; r < rows; ++r) {
      gate_norm_backward(H, units, dgates + r * 4 * H, gain_recurrent, saved_recurrent + (row0 + r) * 4 * H,
                         saved_rstd[(row0 + r) * 3 + 1], drecurrent + r * 4 * H, grad_weights);
    }
  }
};

// Backward twin of normalize_input, rows [0, rows): dinput = dL/d(x W_ihᵀ) [rows, 4H] from dgates
// = dL/d(pre-activations); γ_ih's gradient, Σ dgates·x̂ over rows, is the caller's.
template <typename scalar_t>
void normalize_input_backward(int64_t rows, int64_t H, const scalar_t* dgates, const scalar_t* gain,
                              const scalar_t* normalized, const scalar_t* rstd, scalar_t* dinput) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      gate_norm_backward<scalar_t>(H, {0, H}, dgates + r * 4 * H, gain, normalized + r * 4 * H, rstd[r * 3],
                                   dinput + r * 4 * H, nullptr);
    }
  });
}

// Zoneout's share k of the previous state in the new one, per row and unit: [N, H] for c and
// [N, P] for h (in training zoneout's masks; in eval its constants, expanded: stride 0 over
// rows), or undefined without zoneout.
struct Zoneout {
  Tensor cell_keep, hidden_keep;

  template <typename scalar_t>
  Matrix<const scalar_t> cell() const { return as_matrix<scalar_t>(cell_keep); }
  template <typename scalar_t>
  Matrix<const scalar_t> hidden() const { return as_matrix<scalar_t>(hidden_keep); }

 private:
  template <typename scalar_t>
  static Matrix<const scalar_t> as_matrix(const Tensor& keep) {
    if (!keep.defined()) return {nullptr, 0, 0, 0};
    return {keep.data_ptr<scalar_t>(), keep.size(0), keep.size(1), keep.stride(0)};
  }
};

// m's rows from `row` on (null data stays null).
template <typename T>
Matrix<T> at_row(Matrix<T> m, int64_t row) {
  return m.data ? Matrix<T>{m.data + row * m.ld, m.rows - row, m.cols, m.ld} : m;
}

// Below this many multiply-adds per thread, splitting a step costs more than it saves. Measured
// on 2 threads, the latency shape's 65k-multiply-add step runs 1.25-1.4x faster split; only while
// another process takes CPU time from the partner thread does one thread win (by ~1.1x).
constexpr int64_t kMinStepWorkPerThread = 1 << 15;
// Below this many multiply-adds in a whole direction, starting a second thread does not pay,
// unless W_hh is too big for one core's cache (blas::kernel::kSplitWeightBytes).
constexpr int64_t kMinDirectionWork = 1 << 20;

// How many threads run a layer: directions run concurrently when they are big enough, and each
// direction's steps are split between threads when a step is big enough.
template <typename scalar_t>
int layer_threads(const Steps& steps, int64_t num_directions, int64_t H, int64_t P) {
  const int64_t available = at::get_num_threads();
  const bool big_weight = 4 * H * P * int64_t(sizeof(scalar_t)) >= blas::kernel::kSplitWeightBytes;
  if (available < 2 || (steps.rows() * 4 * H * P < kMinDirectionWork && !big_weight)) {
    return 1;
  }
  const int64_t per_direction = std::max<int64_t>(1, available / num_directions);
  const int64_t split = std::clamp<int64_t>(steps.max_batch() * 4 * H * P / kMinStepWorkPerThread, 1, per_direction);
  return static_cast<int>(num_directions * split);
}

// Runs run_direction(d, member) for each of num_directions directions on up to `threads`
// threads. Two directions are independent, so with two threads or more each gets half the team.
template <typename RunDirection>
void for_each_direction(int64_t num_directions, int threads, const RunDirection& run_direction) {
  std::array<SpinBarrier, 2> barriers;
  run_on_threads(threads, [&](int thread, int team_size) {
    if (num_directions == 2 && team_size >= 2) {
      const int d = thread % 2;
      TeamMember member{thread / 2, team_size / 2 + (d < team_size % 2 ? 1 : 0), &barriers[d]};
      barriers[d].set_size(member.size);
      run_direction(d, member);
      return;
    }
    TeamMember member{thread, team_size, &barriers[0]};
    barriers[0].set_size(team_size);
    for (int d = 0; d < num_directions; ++d) run_direction(d, member);
  });
}

// A thread's share of units or columns starts a vector and a weight panel.
template <typename scalar_t>
constexpr int64_t kShareAlign =
    std::max<int64_t>(at::vec::Vectorized<scalar_t>::size(), blas::PackedWeight<scalar_t>::kPanelWidth);

// ---- a step's rows: recurrent dropout's mask, the saved h_{t-1}, zoneout --------------------------
//
// A step's h_{t-1} comes in two parts (FullLayer::hidden_prev): the previous step's output rows,
// then the initial state's rows of the sequences that start at this step.

// h_{t-1} times recurrent dropout's scaled keep-mask [rows, P], all columns, into masked
// [rows, P]: the two parts as the product sees them.
template <typename scalar_t>
std::pair<Matrix<const scalar_t>, Matrix<const scalar_t>> mask_hidden_prev(Matrix<const scalar_t> from_output,
                                                                            Matrix<const scalar_t> from_hx,
                                                                            const scalar_t* mask, scalar_t* masked,
                                                                            int64_t P) {
  int64_t row = 0;  // of the step, and of the mask
  for (const auto& part : {from_output, from_hx}) {
    for (int64_t r = 0; r < part.rows; ++r, ++row) {
      scalar_t* out = masked + row * P;
      for (int64_t j = 0; j < P; ++j) out[j] = part.data[r * part.ld + j] * mask[row * P + j];
    }
  }
  return {{masked, from_output.rows, P, P}, {masked + from_output.rows * P, from_hx.rows, P, P}};
}

// Columns [col_begin, col_end) of h_{t-1}'s two parts into saved [rows, P], for dW_hh.
template <typename scalar_t>
void save_hidden_prev(Matrix<const scalar_t> from_output, Matrix<const scalar_t> from_hx, int64_t col_begin,
                      int64_t col_end, scalar_t* saved, int64_t P) {
  // Not with no columns: memcpy must not be given the null data of an empty tensor (P == 0).
  for (const auto& part : {from_output, from_hx}) {
    for (int64_t r = 0; r < part.rows && col_end > col_begin; ++r, saved += P) {
      std::memcpy(saved + col_begin, part.data + r * part.ld + col_begin, (col_end - col_begin) * sizeof(scalar_t));
    }
  }
}

// Zoneout of a state, columns [begin, end) of a step's rows: s_t = k·s_{t-1} + (1 - k)·s̃_t, with
// keep [rows, *] (k), prev_row(r) row r of s_{t-1}, and next (row stride ld) holding s̃_t.
template <typename scalar_t, typename PrevRow>
void zone_out(int64_t rows, int64_t begin, int64_t end, Matrix<const scalar_t> keep, const PrevRow& prev_row,
              scalar_t* next, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* k = keep.data + r * keep.ld;
    const scalar_t* prev = prev_row(r);
    scalar_t* s = next + r * ld;
    for (int64_t j = begin; j < end; ++j) s[j] = k[j] * prev[j] + (scalar_t(1) - k[j]) * s[j];
  }
}

// ---- FullLayer: one direction over all steps ------------------------------------------------------

struct FullLayer {
  const Steps& steps;
  bool reverse;  // walk the steps last to first

  int64_t step_at(int64_t k) const { return reverse ? steps.count() - 1 - k : k; }
  // The rows [begin, end) of the steps walked k_begin .. k_end - 1: consecutive either way.
  std::pair<int64_t, int64_t> rows_walked(int64_t k_begin, int64_t k_end) const {
    const int64_t first = std::min(step_at(k_begin), step_at(k_end - 1));
    const int64_t last = std::max(step_at(k_begin), step_at(k_end - 1));
    return {steps.offsets[first], steps.offsets[last] + steps.batch_sizes[last]};
  }
  // Whether the k-th step walked takes W_hh's blocks last to first: alternating from step to
  // step, forward and backward alike (see PackedWeight::multiply).
  static bool walks_w_hh_descending(int64_t k) { return k % 2 == 1; }

  // h_{t-1} of the k-th step walked: its first rows are the previous step's output rows, the
  // rest (sequences that start here, walking in reverse) the initial state hx.
  template <typename scalar_t>
  std::pair<Matrix<const scalar_t>, Matrix<const scalar_t>> hidden_prev(int64_t k, Matrix<const scalar_t> output,
                                                                        const scalar_t* hx, int64_t P) const {
    const int64_t rows = steps.batch_sizes[step_at(k)];
    const int64_t from_output = k == 0 ? 0 : std::min(rows, steps.batch_sizes[step_at(k - 1)]);
    const scalar_t* prev_rows = k == 0 ? output.data : output.data + steps.offsets[step_at(k - 1)] * output.ld;
    return {{prev_rows, from_output, P, output.ld}, {hx + from_output * P, rows - from_output, P, P}};
  }

  // One team member's part of the forward over the steps walked k_begin .. k_end - 1 (a later
  // call goes on from the state this one leaves), on raw memory: the caller makes no tensor view
  // per call. gates holds the input projection of their rows, rows_walked(k_begin, k_end), and is
  // left holding the activations. hx [B, P] is the initial hidden state; h [B, P] receives the
  // last step's; c [B, H] holds the cell state on entry and on exit. output [N, P] (row-strided:
  // this direction's columns of the layer output) receives h_t. h_pre [B, H] is scratch for the
  // hidden state before the projection (null without one). recurrent_mask [B, P] (recurrent
  // dropout's scaled keep-mask, or null) multiplies h_{t-1} in the
  // recurrent product only; the saved h_{t-1} is the masked one, which dW_hh needs. zoneout
  // (undefined tensors without): the share k of the previous state in the new one, per row
  // [N, H] for c and [N, P] for h (zoneout's masks in training, the constants expanded in eval).
  // layer_norm: its step (null without layer norm; then gates holds the input projection
  // normalised, with the biases).
  template <typename Cell, typename scalar_t>
  void forward(const CellParams& params, const PackedCell<scalar_t>& weights, int64_t k_begin, int64_t k_end,
               scalar_t* gate_data, const scalar_t* hx_data, scalar_t* h_data, scalar_t* c_data,
               Matrix<scalar_t> output, const DirectionSaved* saved, scalar_t* h_pre_data, const scalar_t* mask,
               const Zoneout& zoneout, const LayerNormStep<scalar_t>* layer_norm, TeamMember team) const {
    const int64_t H = params.hidden_size(), P = params.output_size(), ld = output.ld;
    const auto [unit_begin, unit_end] = team.share(H, kShareAlign<scalar_t>);
    const UnitSlice units{unit_begin, unit_end};
    const auto [col_begin, col_end] = team.share(P, kShareAlign<scalar_t>);
    const bool projected = params.has_projection();
    const int64_t gates_row0 = rows_walked(k_begin, k_end).first;
    scalar_t* out = output.data;
    const auto unit_weights = CellPointwise<Cell>::template weight_data<scalar_t>(params);
    // The masked h_{t-1}, all its columns: every member's gates need all of them.
    std::vector<scalar_t> masked_hidden(mask ? steps.max_batch() * P : 0);
    const Matrix<const scalar_t> cell_keep = zoneout.cell<scalar_t>(), hidden_keep = zoneout.hidden<scalar_t>();
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int64_t t = step_at(k), rows = steps.batch_sizes[t], row0 = steps.offsets[t];
      scalar_t* g = gate_data + (row0 - gates_row0) * 4 * H;
      const auto [prev_output, prev_hx] = hidden_prev<scalar_t>(k, {out, 0, P, ld}, hx_data, P);
      const auto [from_output, from_hx] =
          mask ? mask_hidden_prev<scalar_t>(prev_output, prev_hx, mask, masked_hidden.data(), P)
               : std::pair{prev_output, prev_hx};
      StepSaved<scalar_t> step_saved;
      if (layer_norm && !saved) step_saved = {layer_norm->tanh_cell, layer_norm->cell_prev};
      if (saved) {
        save_hidden_prev<scalar_t>(from_output, from_hx, col_begin, col_end,
                                   saved->hiddens_prev.data_ptr<scalar_t>() + row0 * P, P);
        step_saved = {saved->tanh_cells.data_ptr<scalar_t>() + row0 * H,
                      saved->cells_prev.data_ptr<scalar_t>() + row0 * H};
      }
      const bool descending = walks_w_hh_descending(k);
      // Layer norm takes the product apart from the gates, normalises it, then adds it.
      scalar_t* product = layer_norm ? layer_norm->recurrent : g;
      matmul_hh<scalar_t>(from_output, weights.recurrent, H, units, product, descending, !layer_norm);
      matmul_hh<scalar_t>(from_hx, weights.recurrent, H, units, product + from_output.rows * 4 * H, descending,
                          !layer_norm);
      if (layer_norm) {
        team.sync();
        layer_norm->add_recurrent(rows, row0, units, g, team.rank == 0);
      }
      const Matrix<const scalar_t> step_cell_keep = at_row(cell_keep, row0);
      const int64_t cols = col_end - col_begin;
      scalar_t* out_step = out + row0 * ld + col_begin;
      // Zoneout of h, this member's columns, in the output rows (h_{t-1} unmasked).
      const auto zone_out_hidden = [&] {
        if (!hidden_keep.data) return;
        const auto prev_row = [&](int64_t r) {
          return r < prev_output.rows ? prev_output.data + r * prev_output.ld
                                      : prev_hx.data + (r - prev_output.rows) * P;
        };
        zone_out<scalar_t>(rows, col_begin, col_end, at_row(hidden_keep, row0), prev_row, out + row0 * ld, ld);
      };
      const Matrix<scalar_t> hidden = projected ? Matrix<scalar_t>{h_pre_data, rows, H, H}
                                                : Matrix<scalar_t>{h_data, rows, P, P};
      const Matrix<scalar_t> hidden_copy = projected ? Matrix<scalar_t>{} : Matrix<scalar_t>{out + row0 * ld, rows, P, ld};
      // With layer norm, h̃_t and zoneout's c_t come after the pass, from c̃_t.
      CellPointwise<Cell>::forward(rows, H, units, g, c_data, hidden, hidden_copy, step_saved, unit_weights,
                                   layer_norm ? Matrix<const scalar_t>{} : step_cell_keep);
      if (layer_norm) {
        team.sync();
        layer_norm->hidden_from_cell(rows, row0, units, g, c_data, hidden, hidden_copy, step_saved.tanh_cell,
                                     team.rank == 0);
        if (step_cell_keep.data) {
          team.sync();  // every member has read c̃_t
          const auto prev_row = [&](int64_t r) { return step_saved.cell_prev + r * H; };
          zone_out<scalar_t>(rows, units.begin, units.end, step_cell_keep, prev_row, c_data, H);
        }
      }
      if (!projected) {
        if (hidden_keep.data) {
          zone_out_hidden();
          for (int64_t r = 0; r < rows; ++r) {
            std::memcpy(h_data + r * P + col_begin, out_step + r * ld, cols * sizeof(scalar_t));
          }
        }
        team.sync();
        continue;
      }
      team.sync();
      weights.projection->multiply({h_pre_data, rows, H, H}, col_begin, {out_step, rows, cols, ld}, false);
      zone_out_hidden();
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(h_data + r * P + col_begin, out_step + r * ld, cols * sizeof(scalar_t));
      }
      team.sync();
    }
  }

  // The forward as ATen ops on whole tensors, differentiable by every autograd transform (double
  // backward, forward mode, vmap): what those recompute through, since forward and backward
  // above write raw memory. x [N, I] is the layer input (the packed rows), h0 [B, P] and
  // c0 [B, H] the initial state. Returns the output rows [N, P] and the final h and c.
  template <typename Cell>
  std::tuple<Tensor, Tensor, Tensor> forward_differentiable(const CellParams& params, const Tensor& x,
                                                           const Tensor& h0, const Tensor& c0,
                                                           const Tensor& recurrent_mask,
                                                           const Zoneout& zoneout) const {
    const int64_t H = params.hidden_size();
    typename Cell::template Weights<Tensor> unit_weights;
    std::copy(params.unit_weights.begin(), params.unit_weights.end(), unit_weights.begin());
    const bool normalized = !params.layer_norm.empty();  // layer norm (see cells.h)
    const Tensor bias = params.b_ih.defined() ? params.b_ih + params.b_hh : Tensor();
    Tensor gates_x = at::linear(x, params.w_ih, normalized ? Tensor() : bias);
    if (normalized) {
      gates_x = at::layer_norm(gates_x, {4 * H}, params.layer_norm[0], {}, kLayerNormEps);
      if (bias.defined()) gates_x = gates_x + bias;
    }
    const int64_t first_rows = steps.batch_sizes[step_at(0)];
    Tensor h = h0.narrow(0, 0, first_rows), c = c0.narrow(0, 0, first_rows);
    std::vector<Tensor> outputs(steps.count()), finished_h, finished_c;
    for (int64_t k = 0; k < steps.count(); ++k) {
      const int64_t t = step_at(k), rows = steps.batch_sizes[t];
      if (rows < h.size(0)) {  // walking forward, sequences end: their rows keep their final state
        finished_h.push_back(h.narrow(0, rows, h.size(0) - rows));
        finished_c.push_back(c.narrow(0, rows, c.size(0) - rows));
        h = h.narrow(0, 0, rows);
        c = c.narrow(0, 0, rows);
      } else if (rows > h.size(0)) {  // walking in reverse, sequences start from the initial state
        h = at::cat({h, h0.narrow(0, h.size(0), rows - h.size(0))});
        c = at::cat({c, c0.narrow(0, c.size(0), rows - c.size(0))});
      }
      const Tensor h_in = recurrent_mask.defined() ? h * recurrent_mask.narrow(0, 0, rows) : h;
      const Tensor step_x = gates_x.narrow(0, steps.offsets[t], rows);
      const Tensor gates =
          normalized ? step_x + at::layer_norm(at::mm(h_in, params.w_hh.t()), {4 * H}, params.layer_norm[1], {},
                                               kLayerNormEps)
                     : at::addmm(step_x, h_in, params.w_hh.t());
      const Tensor pre = gates.view({rows, 4, H});
      const Values<Tensor> v = Cell::template forward<Tensor>(
          {pre.select(1, 0), pre.select(1, 1), pre.select(1, 2), pre.select(1, 3)}, c, unit_weights);
      // With layer norm, h_t = σ(o)·tanh(LN(c_t)) in place of the cell's σ(o)·tanh(c_t).
      const Tensor hidden_pre =
          normalized
              ? v.o * at::layer_norm(v.cell, {H}, params.layer_norm[2], params.layer_norm[3], kLayerNormEps).tanh()
              : v.hidden;
      const Tensor hidden = params.has_projection() ? at::matmul(hidden_pre, params.w_hr.t()) : hidden_pre;
      const auto zone_out = [&](const Tensor& keep, const Tensor& previous, const Tensor& next) {
        if (!keep.defined()) return next;
        const Tensor k = keep.narrow(0, steps.offsets[t], rows);
        return k * previous + (1 - k) * next;
      };
      c = zone_out(zoneout.cell_keep, c, v.cell);
      h = zone_out(zoneout.hidden_keep, h, hidden);
      outputs[t] = h;
    }
    // The final states in the batch's order: the longest sequences' rows first.
    finished_h.push_back(h);
    finished_c.push_back(c);
    std::reverse(finished_h.begin(), finished_h.end());
    std::reverse(finished_c.begin(), finished_c.end());
    return {at::cat(outputs), at::cat(finished_h), at::cat(finished_c)};
  }

  // One team member's part of the backward twin, over the steps in the opposite order.
  // grad_output [N, P] (row-strided, or undefined for zeros) is dL/d output. dh [B, P] and
  // dc [B, H] hold the gradients of the final states on entry and of the initial states on exit.
  // Writes dL/d(pre-activation gates) into dgates [N, 4H] and, with a projection, dL/dh_t into
  // dh_rows [N, P], and sums the gradients of the cell's extra weights into grad_unit_weights
  // [K, H] (zeros on entry). dh_pre [B, H] is scratch. recurrent_mask, zoneout: the forward's.
  // layer_norm: its step (null without layer norm); then dL/d(h_{t-1} W_hhᵀ) goes to
  // drecurrent [N, 4H], and dgates stays dL/d(pre-activations).
  template <typename Cell, typename scalar_t>
  void backward(const CellParams& params, const PackedCell<scalar_t>& weights, const DirectionSaved& saved,
                const Tensor& grad_output, const Tensor& dh, const Tensor& dc, const Tensor& dgates,
                const Tensor& dh_rows, const Tensor& dh_pre, const Tensor& grad_unit_weights,
                const Tensor& recurrent_mask, const Zoneout& zoneout, const LayerNormStep<scalar_t>* layer_norm,
                const Tensor& drecurrent, TeamMember team) const {
    const int64_t H = params.hidden_size(), P = params.output_size();
    const auto [unit_begin, unit_end] = team.share(H, kShareAlign<scalar_t>);
    const UnitSlice units{unit_begin, unit_end};
    const auto [col_begin, col_end] = team.share(P, kShareAlign<scalar_t>);
    const int64_t cols = col_end - col_begin;
    const bool projected = params.has_projection();
    const scalar_t* grad_out = grad_output.defined() ? grad_output.data_ptr<scalar_t>() : nullptr;
    const int64_t grad_ld = grad_output.defined() ? grad_output.stride(0) : 0;
    const scalar_t* gates = saved.gates.data_ptr<scalar_t>();
    const scalar_t* tanh_cells = saved.tanh_cells.data_ptr<scalar_t>();
    const scalar_t* cells_prev = saved.cells_prev.data_ptr<scalar_t>();
    scalar_t* dh_data = dh.data_ptr<scalar_t>();
    scalar_t* dc_data = dc.data_ptr<scalar_t>();
    scalar_t* dgate_data = dgates.data_ptr<scalar_t>();
    scalar_t* dh_rows_data = projected ? dh_rows.data_ptr<scalar_t>() : nullptr;
    scalar_t* dh_pre_data = projected ? dh_pre.data_ptr<scalar_t>() : nullptr;
    const auto unit_weights = CellPointwise<Cell>::template weight_data<scalar_t>(params);
    scalar_t* grad_unit_weight_data = grad_unit_weights.defined() ? grad_unit_weights.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask = recurrent_mask.defined() ? recurrent_mask.data_ptr<scalar_t>() : nullptr;
    const Matrix<const scalar_t> cell_keep = zoneout.cell<scalar_t>(), hidden_keep = zoneout.hidden<scalar_t>();
    // Zoneout's share k·dL/dh_t of a step's rows, which goes straight to dL/dh_{t-1}.
    std::vector<scalar_t> dh_kept(hidden_keep.data ? steps.max_batch() * P : 0);
    // The same of dL/dc_t with layer norm (without, the cell's backward pass splits it itself).
    std::vector<scalar_t> dc_kept(layer_norm && cell_keep.data ? steps.max_batch() * H : 0);
    scalar_t* drecurrent_data = layer_norm ? drecurrent.data_ptr<scalar_t>() : nullptr;
    for (int64_t k = steps.count() - 1; k >= 0; --k) {
      const int64_t t = step_at(k), rows = steps.batch_sizes[t], row0 = steps.offsets[t];
      // dL/dh_t = (from later steps) + (from the layer output); this member owns columns [col_begin, col_end).
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* dh_r = dh_data + r * P;
        if (grad_out) {
          const scalar_t* g = grad_out + (row0 + r) * grad_ld;
          for (int64_t j = col_begin; j < col_end; ++j) dh_r[j] += g[j];
        }
        if (hidden_keep.data) {  // dL/dh̃_t = (1 - k)·dL/dh_t
          const scalar_t* keep = hidden_keep.data + (row0 + r) * hidden_keep.ld;
          for (int64_t j = col_begin; j < col_end; ++j) {
            dh_kept[r * P + j] = keep[j] * dh_r[j];
            dh_r[j] *= scalar_t(1) - keep[j];
          }
        }
        if (dh_rows_data) std::memcpy(dh_rows_data + (row0 + r) * P + col_begin, dh_r + col_begin, cols * sizeof(scalar_t));
      }
      Matrix<const scalar_t> dhidden{dh_data, rows, P, P};
      if (projected) {
        team.sync();
        weights.projection->multiply(dhidden, units.begin, {dh_pre_data + units.begin, rows, units.size(), H}, false);
        dhidden = {dh_pre_data, rows, H, H};
      }
      scalar_t* dg = dgate_data + row0 * 4 * H;
      const scalar_t* step_gates = gates + row0 * 4 * H;
      if (layer_norm) {
        team.sync();  // dL/dh̃_t of every unit
        layer_norm->cell_gradient(rows, row0, units, dhidden, step_gates, tanh_cells + row0 * H, dc_data,
                                  at_row(cell_keep, row0), dc_kept.data());
      }
      CellPointwise<Cell>::backward(rows, H, units, dhidden, dc_data, step_gates, tanh_cells + row0 * H,
                                    cells_prev + row0 * H, dg, unit_weights, grad_unit_weight_data,
                                    layer_norm ? Matrix<const scalar_t>{} : at_row(cell_keep, row0));
      team.sync();
      // The product's side: dL/d(h_{t-1} W_hhᵀ), through layer norm's recurrent LN if any.
      const scalar_t* dproduct = dg;
      if (layer_norm) {
        for (int64_t r = 0; r < rows && !dc_kept.empty(); ++r) {
          for (int64_t j = units.begin; j < units.end; ++j) dc_data[r * H + j] += dc_kept[r * H + j];
        }
        layer_norm->recurrent_gradient(rows, row0, units, dg, drecurrent_data + row0 * 4 * H);
        team.sync();
        dproduct = drecurrent_data + row0 * 4 * H;
      }
      // dL/dh_{t-1} = dproduct · W_hh, this member's columns, alternating the walk over W_hh.
      weights.recurrent.multiply({dproduct, rows, 4 * H, 4 * H}, col_begin, {dh_data + col_begin, rows, cols, P},
                                 false, nullptr, walks_w_hh_descending(k));
      for (int64_t r = 0; r < rows && mask; ++r) {
        for (int64_t j = col_begin; j < col_end; ++j) dh_data[r * P + j] *= mask[r * P + j];
      }
      for (int64_t r = 0; r < rows && hidden_keep.data; ++r) {
        for (int64_t j = col_begin; j < col_end; ++j) dh_data[r * P + j] += dh_kept[r * P + j];
      }
    }
  }
};

}  // namespace lstm_ext
