// One direction of one layer run over all time steps: ATen's FullLayer and its packed siblings.
//
// Dense input is the packed layout with every batch size equal, so one FullLayer serves both:
// step t works on rows [offset[t], offset[t] + batch_size[t]) of the flattened [N, *] input.
// States live in [B, *] buffers of which a step touches the first batch_size[t] rows. Walking
// forward the batch shrinks and a finished sequence's rows keep its final state (PackedLayer);
// walking in reverse it grows and a sequence starts from its initial state (ReversedPackedLayer).
#pragma once

#include "cell.h"

#include <cstring>
#include <vector>

namespace lstm_ext {

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

// What one layer-direction's forward keeps for its backward, one row per input row.
struct DirectionSaved {
  Tensor gates;         // [N, 4H] gate activations i, f, g, o
  Tensor tanh_cells;    // [N, H]  tanh(c_t)
  Tensor cells_prev;    // [N, H]  c_{t-1}
  Tensor hiddens_prev;  // [N, P]  h_{t-1}
};

struct FullLayer {
  const Steps& steps;
  bool reverse;  // walk the steps last to first

  int64_t step_at(int64_t k) const { return reverse ? steps.count() - 1 - k : k; }

  // gates [N, 4H] holds the input projection of every row and is left holding the activations.
  // h [B, P] and c [B, H] hold the initial states on entry and the final ones on exit.
  // output [N, P] (row-strided, the layer output columns of this direction) receives h_t.
  template <typename scalar_t>
  void forward(const CellParams& params, const Tensor& gates, const Tensor& h, const Tensor& c,
               const Tensor& output, const DirectionSaved* saved) const {
    const int64_t H = params.hidden_size(), P = params.output_size();
    const Tensor h_pre = params.has_projection() ? at::empty({steps.max_batch(), H}, h.options()) : Tensor();
    scalar_t* const out = output.data_ptr<scalar_t>();
    const int64_t out_stride = output.stride(0);
    for (int64_t k = 0; k < steps.count(); ++k) {
      const int64_t t = step_at(k), rows = steps.batch_sizes[t], row0 = steps.offsets[t];
      Tensor h_rows = h.narrow(0, 0, rows);
      Tensor gate_rows = gates.narrow(0, row0, rows);
      StepSaved<scalar_t> step_saved;
      if (saved) {
        std::memcpy(saved->hiddens_prev.data_ptr<scalar_t>() + row0 * P, h.data_ptr<scalar_t>(),
                    rows * P * sizeof(scalar_t));
        step_saved = {saved->tanh_cells.data_ptr<scalar_t>() + row0 * H,
                      saved->cells_prev.data_ptr<scalar_t>() + row0 * H};
      }
      params.matmul_hh_add_(gate_rows, h_rows);
      if (!params.has_projection()) {
        LSTMCell::forward_pointwise<scalar_t>(rows, H, gate_rows.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                                              {h.data_ptr<scalar_t>(), P}, {out + row0 * out_stride, out_stride},
                                              step_saved);
      } else {
        LSTMCell::forward_pointwise<scalar_t>(rows, H, gate_rows.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                                              {h_pre.data_ptr<scalar_t>(), H}, {}, step_saved);
        params.matmul_hr_out(h_rows, h_pre.narrow(0, 0, rows));
        output.narrow(0, row0, rows).copy_(h_rows);
      }
    }
  }

  // Backward twin of forward, over the steps in the opposite order. grad_output [N, P]
  // (row-strided, or undefined for zeros) is dL/d output. dh [B, P] and dc [B, H] hold the
  // gradients of the final states on entry and of the initial states on exit. Writes the
  // gradient of the pre-activation gates into dgates [N, 4H] and, with a projection, dL/dh_t
  // into dh_rows [N, P].
  template <typename scalar_t>
  void backward(const CellParams& params, const DirectionSaved& saved, const Tensor& grad_output,
                const Tensor& dh, const Tensor& dc, const Tensor& dgates, const Tensor& dh_rows) const {
    const int64_t H = params.hidden_size(), P = params.output_size();
    const Tensor dh_pre = params.has_projection() ? at::empty({steps.max_batch(), H}, dh.options()) : Tensor();
    scalar_t* const dh_data = dh.data_ptr<scalar_t>();
    for (int64_t k = steps.count() - 1; k >= 0; --k) {
      const int64_t t = step_at(k), rows = steps.batch_sizes[t], row0 = steps.offsets[t];
      if (grad_output.defined()) {
        const scalar_t* g = grad_output.data_ptr<scalar_t>() + row0 * grad_output.stride(0);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < P; ++j) dh_data[r * P + j] += g[r * grad_output.stride(0) + j];
        }
      }
      Tensor dh_step = dh.narrow(0, 0, rows);
      const scalar_t* dhidden = dh_data;
      if (params.has_projection()) {
        std::memcpy(dh_rows.data_ptr<scalar_t>() + row0 * P, dh_data, rows * P * sizeof(scalar_t));
        Tensor dh_pre_step = dh_pre.narrow(0, 0, rows);
        at::mm_out(dh_pre_step, dh_step, params.w_hr);
        dhidden = dh_pre.data_ptr<scalar_t>();
      }
      Tensor dgate_rows = dgates.narrow(0, row0, rows);
      LSTMCell::backward_pointwise<scalar_t>(
          rows, H, dhidden, dc.data_ptr<scalar_t>(), saved.gates.data_ptr<scalar_t>() + row0 * 4 * H,
          saved.tanh_cells.data_ptr<scalar_t>() + row0 * H, saved.cells_prev.data_ptr<scalar_t>() + row0 * H,
          dgate_rows.data_ptr<scalar_t>());
      at::mm_out(dh_step, dgate_rows, params.w_hh);
    }
  }
};

}  // namespace lstm_ext
