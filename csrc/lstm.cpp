// The layer stack and the operators' CPU kernels: lstm_ext::forward and its hand-written
// lstm_ext::backward, quantized_forward, and the differentiable recomputation.
//
// Compiled once per instruction set (kernels.cpp, simd_*.cpp define CPU_CAPABILITY and the target, as
// ATen compiles its kernels): everything here lives in lstm_ext::CPU_CAPABILITY.
//
// Mirrors apply_layer_stack / _lstm_impl in aten/src/ATen/native/RNN.cpp. A layer runs one
// FullLayer per direction (the reverse one walks the steps backwards, which is all ATen's
// FullBidirectionalLayer and ReversedPackedLayer add) and writes both into one [N, D*P] output.
#include "cells.h"
#include "layer.h"
#include "ops.h"

#include <ATen/Dispatch.h>

#include <tuple>

namespace lstm_ext::inline CPU_CAPABILITY {
namespace {

using at::TensorList;

// The shape of the whole stack, read off the arguments.
struct StackShape {
  int64_t num_layers;
  int64_t num_directions;
  int64_t input_size;
  int64_t hidden_size;
  int64_t output_size;  // P: proj_size, or hidden_size without projections
  bool dense;           // [T, B, I] input, else packed [N, I] with batch_sizes
};

int64_t params_per_cell(bool has_biases, bool has_projections) {
  return 2 + (has_biases ? 2 : 0) + (has_projections ? 1 : 0);
}

// Splits the flat weight list (nn.LSTM's _flat_weights order) into one CellParams per layer-direction,
// and the cell's extra weights (unit_weight_count(cell) per layer-direction, in the same order:
// layer norm's first) among them.
std::vector<CellParams> gather_params(TensorList params, bool has_biases, int64_t cells,
                                      std::optional<TensorList> given_cell_params, c10::string_view cell_name) {
  const int64_t unit_weights = unit_weight_count(cell_name);
  const int64_t layer_norm_weights = CellName::parse(cell_name).layer_norm ? kLayerNormWeights : 0;
  const TensorList cell_params = given_cell_params.value_or(TensorList());
  const bool has_projections = params.size() == static_cast<size_t>(cells * params_per_cell(has_biases, true));
  TORCH_CHECK(has_projections || params.size() == static_cast<size_t>(cells * params_per_cell(has_biases, false)),
              "lstm_ext: got an incorrect number of RNN parameters: expected ",
              cells * params_per_cell(has_biases, false), " (or ", cells * params_per_cell(has_biases, true),
              " with projections) for ", cells, " layer-directions with has_biases=", has_biases, ", got ",
              params.size());
  const int64_t per_cell = params_per_cell(has_biases, has_projections);
  // The sizes of a layer-direction are read off its weights: check their dimensions first.
  const char* names[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
  for (int64_t k = 0; k < static_cast<int64_t>(params.size()); ++k) {
    const int64_t slot = k % per_cell;
    const bool is_weight = slot < 2 || (has_projections && slot == per_cell - 1);
    const char* name = has_projections && slot == per_cell - 1 ? "weight_hr" : names[slot];
    TORCH_CHECK(params[k].dim() == (is_weight ? 2 : 1), "lstm_ext: expected ", name, " of layer-direction ",
                k / per_cell, " to be ", is_weight ? 2 : 1, "-D, got ", params[k].dim(), "-D");
  }
  TORCH_CHECK(cell_params.size() == static_cast<size_t>(cells * unit_weights), "lstm_ext: expected ",
              cells * unit_weights, " cell parameters (", unit_weights, " for each of ", cells,
              " layer-directions), got ", cell_params.size());
  std::vector<CellParams> result;
  result.reserve(cells);
  for (int64_t i = 0; i < cells; ++i) {
    const Tensor* p = params.data() + i * per_cell;
    CellParams cell{p[0], p[1].contiguous()};  // the recurrent loop reads w_hh and w_hr raw
    if (has_biases) {
      cell.b_ih = p[2];
      cell.b_hh = p[3];
    }
    if (has_projections) cell.w_hr = p[per_cell - 1].contiguous();
    for (int64_t k = 0; k < unit_weights; ++k) {
      (k < layer_norm_weights ? cell.layer_norm : cell.unit_weights)
          .push_back(cell_params[i * unit_weights + k].contiguous());
    }
    result.push_back(std::move(cell));
  }
  return result;
}

// The steps of packed input from its batch sizes, checked against the input's rows.
Steps packed_steps(const Tensor& input, std::vector<int64_t> values) {
  int64_t rows = 0;  // checked against the input before each addition, so it cannot overflow
  for (size_t t = 0; t < values.size(); ++t) {
    TORCH_CHECK(values[t] > 0, "lstm_ext: batch_sizes must be positive, got ", values[t], " at step ", t);
    TORCH_CHECK(t == 0 || values[t] <= values[t - 1],
                "lstm_ext: batch_sizes must be non-increasing (sequences sorted by decreasing length), got ",
                values[t - 1], " then ", values[t], " at step ", t);
    TORCH_CHECK(values[t] <= input.size(0) - rows, "lstm_ext: batch_sizes sum to more than the ", input.size(0),
                " rows of the packed input");
    rows += values[t];
  }
  TORCH_CHECK(!values.empty(), "Expected sequence length to be larger than 0 in RNN");
  Steps steps = Steps::from_batch_sizes(std::move(values));
  TORCH_CHECK(steps.rows() == input.size(0), "lstm_ext: batch_sizes sum to ", steps.rows(),
              " but the packed input has ", input.size(0), " rows");
  return steps;
}

Steps make_steps(const Tensor& input, const std::optional<Tensor>& batch_sizes) {
  if (!batch_sizes.has_value()) {
    return Steps::from_batch_sizes(std::vector<int64_t>(input.size(0), input.size(1)));
  }
  const Tensor& sizes = *batch_sizes;
  TORCH_CHECK(sizes.device().is_cpu(), "lstm_ext: batch_sizes must be a CPU tensor, got one on ", sizes.device());
  TORCH_CHECK(sizes.dim() == 1 && sizes.scalar_type() == at::kLong,
              "lstm_ext: batch_sizes must be a 1-D int64 tensor, got ", sizes.dim(), "-D ", sizes.scalar_type());
  const Tensor contiguous = sizes.contiguous();
  const int64_t* data = contiguous.data_ptr<int64_t>();
  return packed_steps(input, std::vector<int64_t>(data, data + contiguous.numel()));
}

void check_same_device_and_dtype(const Tensor& input, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "lstm_ext: input and ", name,
              " are not on the same device, found input on ", input.device(), " and ", name, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "lstm_ext: input and ", name,
              " must have the same dtype, got ", input.scalar_type(), " and ", t.scalar_type());
}

void check_state(const Tensor& state, const char* name, int64_t cells, int64_t batch, int64_t size) {
  TORCH_CHECK(state.dim() == 3 && state.size(0) == cells && state.size(1) == batch && state.size(2) == size,
              "lstm_ext: expected ", name, " of size [", cells, ", ", batch, ", ", size, "], got ", state.sizes());
}

void check_input(const Tensor& input, bool packed) {
  TORCH_CHECK(input.device().is_cpu(), "lstm_ext: only CPU tensors are supported, got input on ", input.device());
  const bool dense = !packed;
  TORCH_CHECK(input.dim() == (dense ? 3 : 2), "lstm_ext: expected ", dense ? "3-D [T, B, I]" : "2-D packed [N, I]",
              " input, got ", input.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "lstm_ext: expected a floating point input, got ",
              input.scalar_type());
  TORCH_CHECK(!dense || input.size(0) > 0, "Expected sequence length to be larger than 0 in RNN");
}

// narrow_weights: the weight matrices may be stored in another type than the input's (quantized).
StackShape check_forward_args(const Tensor& input, const Steps& steps, const Tensor& hx, const Tensor& cx,
                              const std::vector<CellParams>& cells, int64_t num_layers, bool bidirectional,
                              double dropout, bool narrow_weights = false) {
  const bool dense = input.dim() == 3;
  TORCH_CHECK(dropout >= 0 && dropout <= 1, "dropout probability has to be between 0 and 1, but got ", dropout);
  const CellParams& first = cells.front();
  StackShape shape{num_layers, bidirectional ? 2 : 1, input.size(-1), first.hidden_size(), first.output_size(), dense};
  for (size_t i = 0; i < cells.size(); ++i) {
    const CellParams& cell = cells[i];
    const int64_t layer = static_cast<int64_t>(i) / shape.num_directions;
    const int64_t in = layer == 0 ? shape.input_size : shape.num_directions * shape.output_size;
    const int64_t H = shape.hidden_size, P = shape.output_size;
    auto check = [&](const Tensor& w, at::IntArrayRef expected, const char* name, bool matrix = false) {
      if (!(narrow_weights && matrix)) check_same_device_and_dtype(input, w, name);
      TORCH_CHECK(w.sizes() == expected, "lstm_ext: expected ", name, " of layer-direction ", i, " to have size ",
                  expected, ", got ", w.sizes());
    };
    check(cell.w_ih, {4 * H, in}, "weight_ih", true);
    check(cell.w_hh, {4 * H, P}, "weight_hh", true);
    if (cell.b_ih.defined()) {
      check(cell.b_ih, {4 * H}, "bias_ih");
      check(cell.b_hh, {4 * H}, "bias_hh");
    }
    if (cell.w_hr.defined()) check(cell.w_hr, {P, H}, "weight_hr", true);
    for (const Tensor& w : cell.unit_weights) check(w, {H}, "cell parameter");
    if (!cell.layer_norm.empty()) {
      check(cell.layer_norm[0], {4 * H}, "ln_weight_ih");
      check(cell.layer_norm[1], {4 * H}, "ln_weight_hh");
      check(cell.layer_norm[2], {H}, "ln_weight_c");
      check(cell.layer_norm[3], {H}, "ln_bias_c");
    }
  }
  check_same_device_and_dtype(input, hx, "hx");
  check_same_device_and_dtype(input, cx, "cx");
  const int64_t total = num_layers * shape.num_directions, batch = dense ? input.size(1) : steps.max_batch();
  check_state(hx, "hx", total, batch, shape.output_size);
  check_state(cx, "cx", total, batch, shape.hidden_size);
  return shape;
}

// The workspace (its entries named in ops.h), read by name: ws[kGates], ws[kDropoutMasks], ...
struct Workspace {
  std::vector<Tensor> entries;  // indexed by WorkspaceEntry

  static Workspace allocate(const StackShape& s, int64_t rows, int64_t batch, double dropout, bool train,
                            double recurrent_dropout, at::ArrayRef<double> zoneout, bool layer_norm,
                            const at::TensorOptions& opts) {
    Workspace ws;
    for (const std::vector<int64_t>& shape :
         workspace_shapes<int64_t>(s.num_layers, s.num_directions == 2, rows, batch, s.hidden_size, s.output_size,
                                   dropout, train, recurrent_dropout, zoneout, layer_norm)) {
      ws.entries.push_back(blas::BlockPool::empty(shape, opts));
    }
    return ws;
  }
  static Workspace from_list(TensorList list) {
    TORCH_CHECK(list.size() == kWorkspaceEntries,
                "lstm_ext: the workspace is empty: the forward ran without saving for backward");
    return {list.vec()};
  }
  const Tensor& operator[](WorkspaceEntry entry) const { return entries[entry]; }
  bool kept(WorkspaceEntry entry) const { return entries[entry].numel() > 0; }
  Tensor recurrent_mask(int64_t cell) const { return kept(kRecurrentMasks) ? entries[kRecurrentMasks][cell] : Tensor(); }
  DirectionSaved direction(int64_t cell) const {
    const auto of = [&](WorkspaceEntry entry) { return entries[entry][cell]; };
    LayerNormSaved layer_norm;
    if (kept(kLayerNormRstds)) {
      layer_norm = {of(kLayerNormInputs), of(kLayerNormRecurrents), of(kLayerNormCells), of(kLayerNormRstds)};
    }
    return {of(kGates), of(kTanhCells), of(kCellsPrev), of(kHiddensPrev), layer_norm};
  }
};

// ---- zoneout ----------------------------------------------------------------------------------

// zoneout: [] (none) or [z_c, z_h].
bool check_zoneout(at::ArrayRef<double> zoneout) {
  TORCH_CHECK(zoneout.empty() || zoneout.size() == 2, "lstm_ext: zoneout must be [] or [z_c, z_h], got ",
              zoneout.size(), " values");
  for (double z : zoneout) TORCH_CHECK(z >= 0 && z <= 1, "zoneout probability has to be between 0 and 1, but got ", z);
  return !zoneout.empty() && (zoneout[0] > 0 || zoneout[1] > 0);
}

// Zoneout in eval: the constants z_c and z_h, expanded over the N rows.
Zoneout constant_zoneout(at::ArrayRef<double> zoneout, int64_t N, int64_t H, int64_t P, const at::TensorOptions& opts) {
  return {at::full({1, H}, zoneout[0], opts).expand({N, H}), at::full({1, P}, zoneout[1], opts).expand({N, P})};
}

// Zoneout in training: masks d ~ Bernoulli(z) per step, row and unit, drawn into cell_mask [N, H]
// and then hidden_mask [N, P].
Zoneout draw_zoneout(at::ArrayRef<double> zoneout, Tensor cell_mask, Tensor hidden_mask) {
  return {cell_mask.bernoulli_(zoneout[0]), hidden_mask.bernoulli_(zoneout[1])};
}

// ---- forward ----------------------------------------------------------------------------------

// Fills `mask` with dropout's scaled keep-mask between layers: the same RNG draws as ATen's
// dropout, so a seed gives native's masks.
Tensor draw_dropout_mask(Tensor mask, double dropout) {
  return dropout == 1 ? mask.zero_() : mask.bernoulli_(1 - dropout).div_(1 - dropout);
}

// Inference projects the input in chunks of steps of at most this many bytes of gates (all
// directions together): one buffer, reused from chunk to chunk and (BlockPool) from call to call,
// whose size does not grow with the sequence. (A whole sequence's gates, 52 MB for the large
// shape, freed to glibc went back to the OS and page-faulted in again at the next call: 5.5 ms,
// 1.06x its inference.) Smaller chunks cost more than they save: each projection between chunks
// evicts part of W_hh (the wide shape's 16 MB, 0.98x).
constexpr int64_t kInferenceChunkBytes = 24 << 20;

// Steps per chunk: as few chunks as keep each within kInferenceChunkBytes, of equal size. Packed
// bidirectional input runs in one chunk: a chunk's steps walked forward are its longest, walked in
// reverse its shortest, and the direction with fewer rows would wait for the other at every chunk
// (the packed_bidir shape 0.80x in two chunks).
int64_t inference_chunk_steps(const Steps& steps, int64_t num_directions, int64_t gate_bytes_per_row) {
  if (num_directions == 2 && steps.batch_sizes.front() != steps.batch_sizes.back()) return steps.count();
  const int64_t bytes = steps.rows() * gate_bytes_per_row;
  const int64_t chunks =
      std::clamp<int64_t>((bytes + kInferenceChunkBytes - 1) / kInferenceChunkBytes, 1, steps.count());
  return (steps.count() + chunks - 1) / chunks;
}

std::tuple<Tensor, Tensor, Tensor> lstm_forward_differentiable(
    const Tensor& input, at::OptionalIntArrayRef batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    const std::optional<Tensor>& dropout_masks, c10::string_view cell, std::optional<TensorList> cell_params,
    double recurrent_dropout, const std::optional<Tensor>& recurrent_masks, at::ArrayRef<double> zoneout,
    std::optional<TensorList> zoneout_masks);

// ---- layer norm -----------------------------------------------------------------------------------

template <typename scalar_t>
scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// Layer norm's step for a layer-direction: its weights, its scratch ([B, 6H]: the recurrent
// product [B, 4H], then tanh(LN(c̃_t)) and c_{t-1} [B, H] in inference), what the forward keeps
// (undefined in inference), and the gradients of γ_hh, γ_c, β_c ([6H], zeros; undefined in the
// forward).
template <typename scalar_t>
LayerNormStep<scalar_t> layer_norm_step(const CellParams& params, const Tensor& scratch, const LayerNormSaved& saved,
                                        const Tensor& grad_weights = Tensor()) {
  const int64_t H = params.hidden_size();
  const auto data = data_or_null<scalar_t>;
  scalar_t* scratch_data = data(scratch);
  return {H,
          params.layer_norm[1].data_ptr<scalar_t>(),
          params.layer_norm[2].data_ptr<scalar_t>(),
          params.layer_norm[3].data_ptr<scalar_t>(),
          scratch_data,
          scratch_data ? scratch_data + scratch.size(0) * 4 * H : nullptr,
          scratch_data ? scratch_data + scratch.size(0) * 5 * H : nullptr,
          data(saved.recurrent),
          data(saved.cell),
          data(saved.rstd),
          data(grad_weights)};
}

// ---- precision ------------------------------------------------------------------------------------

// The type a call computes in (ops.h). Its input, states and small parameters are converted once
// per call; the products read the weight matrices as given (narrow), and the outputs go back to
// the input's type.
at::ScalarType compute_type(const Tensor& input) { return lstm_ext::compute_type(input.scalar_type()); }

// t in `type`, contiguous. The float <-> bfloat16/float16 conversions of a narrow call's small
// tensors (input, states, biases, outputs of a step) run as a plain vectorized loop rather than
// ATen's copy, whose dispatch and TensorIterator cost ~2 us a tensor: 8 of them made a T=1 B8
// H256 step 0.90x float32's speed. Large tensors keep ATen's copy, which gains nothing from the
// loop (dispatch is a fraction of their time) and runs on every thread. The same values (rounded
// to nearest even).
Tensor converted(const Tensor& t, at::ScalarType type) {
  constexpr int64_t kMaxLoopElements = 1 << 16;
  const at::ScalarType from = t.scalar_type();
  const bool widen = type == at::kFloat && at::isReducedFloatingType(from);
  const bool narrow = from == at::kFloat && at::isReducedFloatingType(type);
  if (!t.is_contiguous() || !(widen || narrow) || t.numel() > kMaxLoopElements) return t.to(type).contiguous();
  Tensor out = at::empty(t.sizes(), t.options().dtype(type));
  AT_DISPATCH_REDUCED_FLOATING_TYPES(widen ? from : type, "lstm_ext_converted", [&] {
    if (widen) {
      blas::kernel::convert_rows(t.const_data_ptr<scalar_t>(), 0, 1, t.numel(), out.data_ptr<float>(), 0);
    } else {
      at::vec::convert(t.const_data_ptr<float>(), out.data_ptr<scalar_t>(), t.numel());
    }
  });
  return out;
}

// p with everything but its weight matrices in `type`.
CellParams with_small_params_in(CellParams p, at::ScalarType type) {
  const auto convert = [&](Tensor& t) {
    if (t.defined()) t = converted(t, type);
  };
  convert(p.b_ih);
  convert(p.b_hh);
  for (Tensor& t : p.unit_weights) convert(t);
  for (Tensor& t : p.layer_norm) convert(t);
  return p;
}

// t in `type`, a copy even when it is already (the backward writes into it), contiguous.
Tensor contiguous_copy(const Tensor& t, at::ScalarType type) {
  return t.to(type, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

// The stack's forward on checked arguments: lstm_forward's and quantized_forward's.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> forward_stack(
    const Tensor& input, const Steps& steps, const StackShape& s, const Tensor& hx, const Tensor& cx,
    std::vector<CellParams> cells, double dropout, bool train, bool need_workspace, c10::string_view cell,
    double recurrent_dropout, at::ArrayRef<double> zoneout) {
  const int64_t num_layers = s.num_layers, D = s.num_directions;
  const int64_t N = steps.rows(), H = s.hidden_size, P = s.output_size;
  const at::ScalarType compute = compute_type(input);
  if (compute != input.scalar_type()) {
    for (CellParams& c : cells) c = with_small_params_in(std::move(c), compute);
  }
  const at::TensorOptions opts = input.options().dtype(compute).memory_format(at::MemoryFormat::Contiguous);
  const bool apply_dropout = dropout > 0 && train && num_layers > 1;
  TORCH_CHECK(recurrent_dropout >= 0 && recurrent_dropout <= 1,
              "recurrent_dropout probability has to be between 0 and 1, but got ", recurrent_dropout);
  const bool apply_recurrent_dropout = recurrent_dropout > 0 && train;
  const bool apply_zoneout = check_zoneout(zoneout);
  const bool layer_norm = CellName::parse(cell).layer_norm;

  const Tensor h0 = converted(hx, compute), c0 = converted(cx, compute);
  // Every row of hy is written (each sequence has a step); cy carries the state from c0 in place.
  // A raw copy: clone's TensorIterator costs a decoding step more than the copy itself.
  Tensor hy = at::empty_like(h0), cy = at::empty_like(c0);
  if (c0.numel() > 0) std::memcpy(cy.data_ptr(), c0.const_data_ptr(), c0.nbytes());
  const int64_t B = steps.max_batch();
  Workspace ws = need_workspace ? Workspace::allocate(s, N, B, dropout, train, recurrent_dropout, zoneout, layer_norm,
                                                     opts)
                                : Workspace{};
  // Layer norm's scratch per direction: a step's recurrent product [B, 4H], and in inference
  // tanh(LN(c̃_t)) and c_{t-1} [B, H] (see LayerNormStep).
  const Tensor norm_scratch = layer_norm ? at::empty({D, B, 6 * H}, opts) : Tensor();
  const Zoneout eval_zoneout = apply_zoneout && !train ? constant_zoneout(zoneout, N, H, P, opts) : Zoneout{};
  // Inference projects the input a chunk of steps at a time into one buffer per direction, reused
  // across chunks and layers (see kInferenceChunkBytes).
  const int64_t chunk_steps =
      need_workspace ? steps.count() : inference_chunk_steps(steps, D, D * 4 * H * int64_t(c10::elementSize(compute)));
  std::vector<Tensor> scratch_gates;
  if (!need_workspace) {
    const int64_t rows = std::min(N, chunk_steps * steps.max_batch());
    for (int64_t d = 0; d < D; ++d) scratch_gates.push_back(blas::BlockPool::empty({rows, 4 * H}, opts));
  }
  const Tensor h_pre = cells.front().has_projection() ? at::empty({D, steps.max_batch(), H}, opts) : Tensor();

  Tensor layer_input = converted(input.reshape({N, s.input_size}), compute);
  Tensor layer_output;
  AT_DISPATCH_FLOATING_TYPES(compute, "lstm_ext::forward", [&] {
    with_cell(cell, [&]<typename Cell>() {
      const int threads = layer_threads<scalar_t>(steps, D, H, P);
      for (int64_t l = 0; l < num_layers; ++l) {
        const bool last = l == num_layers - 1;
        layer_output = need_workspace && !last ? ws[kLayerInputs][l] : blas::BlockPool::empty({N, D * P}, opts);
        // The threads below touch raw memory only, at these offsets: no tensor view per call.
        scalar_t* output_data = layer_output.data_ptr<scalar_t>();
        std::vector<Tensor> gates, recurrent_masks;
        std::vector<Zoneout> zoneouts;
        std::vector<DirectionSaved> saved;
        std::vector<PackedCell<scalar_t>> weights;
        std::vector<LayerNormStep<scalar_t>> norms;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t c = l * D + d;
          saved.push_back(need_workspace ? ws.direction(c) : DirectionSaved{});
          if (layer_norm) {
            // The input projection without the biases, which come after its layer norm.
            CellParams unbiased = cells[c];
            unbiased.b_ih = unbiased.b_hh = Tensor();
            weights.push_back(PackedCell<scalar_t>::for_forward(unbiased, N));
            norms.push_back(layer_norm_step<scalar_t>(cells[c], norm_scratch[d], saved[d].layer_norm));
          } else {
            weights.push_back(PackedCell<scalar_t>::for_forward(cells[c], N));
          }
          gates.push_back(need_workspace ? ws[kGates][c] : scratch_gates[d]);
          // Recurrent dropout's mask [B, P], drawn as dropout's, per layer-direction as its layer starts.
          Tensor recurrent_mask;
          if (apply_recurrent_dropout) {
            recurrent_mask = need_workspace ? ws[kRecurrentMasks][c] : at::empty({B, P}, opts);
            draw_dropout_mask(recurrent_mask, recurrent_dropout);
          }
          recurrent_masks.push_back(recurrent_mask);
          // Zoneout's masks [N, H] and [N, P] in training, drawn next.
          if (!apply_zoneout || !train) {
            zoneouts.push_back(eval_zoneout);
          } else if (need_workspace) {
            zoneouts.push_back(draw_zoneout(zoneout, ws[kZoneoutCellMasks][c], ws[kZoneoutHiddenMasks][c]));
          } else {
            zoneouts.push_back(
                draw_zoneout(zoneout, blas::BlockPool::empty({N, H}, opts), blas::BlockPool::empty({N, P}, opts)));
          }
        }
        for (int64_t k0 = 0; k0 < steps.count(); k0 += chunk_steps) {
          const int64_t k1 = std::min(k0 + chunk_steps, steps.count());
          for (int64_t d = 0; d < D; ++d) {
            const auto [row_begin, row_end] = FullLayer{steps, d == 1}.rows_walked(k0, k1);
            weights[d].project_input(layer_input, row_begin, row_end, gates[d]);
            if (layer_norm) {
              const CellParams& cell = cells[l * D + d];
              const auto data = data_or_null<scalar_t>;
              normalize_input<scalar_t>(row_end - row_begin, row_begin, H, gates[d].data_ptr<scalar_t>(),
                                        cell.layer_norm[0].data_ptr<scalar_t>(), data(cell.b_ih), data(cell.b_hh),
                                        data(saved[d].layer_norm.input), data(saved[d].layer_norm.rstd));
            }
          }
          for_each_direction(D, threads, [&](int d, TeamMember member) {
            const int64_t c = l * D + d;
            FullLayer{steps, d == 1}.forward<Cell, scalar_t>(
                cells[c], weights[d], k0, k1, gates[d].data_ptr<scalar_t>(), h0.data_ptr<scalar_t>() + c * B * P,
                hy.data_ptr<scalar_t>() + c * B * P, cy.data_ptr<scalar_t>() + c * B * H,
                {output_data + d * P, N, P, D * P}, need_workspace ? &saved[d] : nullptr,
                h_pre.defined() ? h_pre.data_ptr<scalar_t>() + d * B * H : nullptr,
                data_or_null<scalar_t>(recurrent_masks[d]), zoneouts[d],
                layer_norm ? &norms[d] : nullptr, member);
          });
        }
        if (apply_dropout && !last) {
          Tensor mask = need_workspace ? ws[kDropoutMasks][l] : blas::BlockPool::empty(layer_output.sizes(), opts);
          layer_output.mul_(draw_dropout_mask(mask, dropout));
        }
        layer_input = layer_output;
      }
    });
  });
  Tensor output = s.dense ? layer_output.view({input.size(0), input.size(1), D * P}) : layer_output;
  const at::ScalarType type = input.scalar_type();
  return {converted(output, type), converted(hy, type), converted(cy, type), std::move(ws.entries)};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_forward(
    const Tensor& input, const std::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    bool need_workspace, c10::string_view cell, std::optional<TensorList> cell_params, double recurrent_dropout,
    at::ArrayRef<double> zoneout) {
  TORCH_CHECK(num_layers > 0, "lstm_ext: num_layers must be positive, got ", num_layers);
  std::vector<CellParams> cells = gather_params(params, has_biases, num_layers * (bidirectional ? 2 : 1), cell_params, cell);
  check_input(input, batch_sizes.has_value());
  const Steps steps = make_steps(input, batch_sizes);
  const StackShape s = check_forward_args(input, steps, hx, cx, cells, num_layers, bidirectional, dropout);
  return forward_stack(input, steps, s, hx, cx, std::move(cells), dropout, train, need_workspace, cell,
                       recurrent_dropout, zoneout);
}

// Inference with quantized weights (RNN.cpp's QuantizedCellParamsDynamic and QuantizedCellParamsFP16):
// params as lstm_forward's, the weight matrices all int8, with `scales` (one [rows] float32 tensor
// per matrix, w = q·scale row by row, in the matrices' order), or all float16 (no scales). The
// input, states and biases are float32; the products read the narrow weights (see blas.h).
std::tuple<Tensor, Tensor, Tensor> quantized_forward(const Tensor& input, const std::optional<Tensor>& batch_sizes,
                                                     const Tensor& hx, const Tensor& cx, TensorList params,
                                                     TensorList scales, bool has_biases, int64_t num_layers,
                                                     bool bidirectional) {
  TORCH_CHECK(num_layers > 0, "lstm_ext: num_layers must be positive, got ", num_layers);
  std::vector<CellParams> cells = gather_params(params, has_biases, num_layers * (bidirectional ? 2 : 1), {}, "lstm");
  check_input(input, batch_sizes.has_value());
  TORCH_CHECK(input.scalar_type() == at::kFloat, "lstm_ext: a quantized LSTM takes float32 input, got ",
              input.scalar_type());
  const at::ScalarType stored = cells.front().w_ih.scalar_type();
  TORCH_CHECK(stored == at::kChar || stored == at::kHalf,
              "lstm_ext: quantized weights are int8 (with scales) or float16, got ", stored);
  const size_t matrices = cells.size() * (cells.front().has_projection() ? 3 : 2);
  TORCH_CHECK(scales.size() == (stored == at::kChar ? matrices : 0), "lstm_ext: expected ",
              stored == at::kChar ? matrices : 0, " weight scales for ", stored, " weights, got ", scales.size());
  size_t next = 0;
  const auto attach = [&](const Tensor& w, Tensor& scale, const char* name) {
    TORCH_CHECK(w.scalar_type() == stored, "lstm_ext: every quantized weight has one type, got ", name, " in ",
                w.scalar_type(), " after ", stored);
    if (stored != at::kChar) return;
    scale = scales[next++];
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == w.size(0),
                "lstm_ext: expected the scales of ", name, " to be a float32 tensor of ", w.size(0),
                " values, got ", scale.scalar_type(), " of size ", scale.sizes());
  };
  for (CellParams& cell : cells) {
    attach(cell.w_ih, cell.w_ih_scale, "weight_ih");
    attach(cell.w_hh, cell.w_hh_scale, "weight_hh");
    if (cell.has_projection()) attach(cell.w_hr, cell.w_hr_scale, "weight_hr");
  }
  const Steps steps = make_steps(input, batch_sizes);
  const StackShape s = check_forward_args(input, steps, hx, cx, cells, num_layers, bidirectional, 0.0,
                                          /*narrow_weights=*/true);
  auto [output, hy, cy, workspace] = forward_stack(input, steps, s, hx, cx, std::move(cells), 0.0, false,
                                                   /*need_workspace=*/false, "lstm", 0.0, {});
  return {output, hy, cy};
}

// ---- backward ---------------------------------------------------------------------------------

// A gradient the backward adds into, in `type`: a copy of `grad`, or zeros shaped like `like`.
Tensor grad_or_zeros(const std::optional<Tensor>& grad, const Tensor& like, at::ScalarType type) {
  return grad.has_value() && grad->defined() ? contiguous_copy(*grad, type) : at::zeros(like.sizes(), like.options().dtype(type));
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_backward(
    const Tensor& input, const std::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, TensorList workspace, const std::optional<Tensor>& grad_output,
    const std::optional<Tensor>& grad_hy, const std::optional<Tensor>& grad_cy, bool has_biases, int64_t num_layers,
    bool bidirectional, c10::string_view cell, std::optional<TensorList> cell_params, at::ArrayRef<double> zoneout) {
  const int64_t D = bidirectional ? 2 : 1;
  const bool layer_norm = CellName::parse(cell).layer_norm;
  // A layer-direction's cell parameters: layer norm's, then the cell's own.
  const int64_t unit_weights = unit_weight_count(cell), norm_weights = layer_norm ? kLayerNormWeights : 0;
  const at::ScalarType compute = compute_type(input);
  std::vector<CellParams> cells = gather_params(params, has_biases, num_layers * D, cell_params, cell);
  if (compute != input.scalar_type()) {
    for (CellParams& c : cells) c = with_small_params_in(std::move(c), compute);
  }
  const at::TensorOptions opts = hx.options().dtype(compute);
  const Workspace ws = Workspace::from_list(workspace);
  const Steps steps = make_steps(input, batch_sizes);
  const int64_t N = steps.rows(), H = cells.front().hidden_size(), P = cells.front().output_size();
  const int64_t per_cell = params.size() / cells.size();

  Tensor grad_hx = grad_or_zeros(grad_hy, hx, compute), grad_cx = grad_or_zeros(grad_cy, cx, compute);
  // The gradients of params, then of cell_params.
  std::vector<Tensor> grad_params(params.size() + cells.size() * unit_weights);
  Tensor grad_layer_output;  // dL/d(output of the current layer), [N, D*P]; undefined means zeros
  if (grad_output.has_value() && grad_output->defined()) {
    grad_layer_output = grad_output->reshape({N, D * P}).to(compute).contiguous();
  }
  const Tensor dh_pre = cells.front().has_projection() ? at::empty({D, steps.max_batch(), H}, opts) : Tensor();
  // One set for all layers: fresh buffers this big cost their page faults again in every layer.
  const Tensor all_dgates = blas::BlockPool::empty({D, N, 4 * H}, opts);
  // Without its masks in the workspace, the forward ran zoneout in eval.
  const Zoneout eval_zoneout = check_zoneout(zoneout) && !ws.kept(kZoneoutCellMasks)
                                   ? constant_zoneout(zoneout, N, H, P, opts)
                                   : Zoneout{};
  const Tensor all_dh_rows =
      cells.front().has_projection() ? blas::BlockPool::empty({D, N, P}, opts) : Tensor();
  // Layer norm's: dL/d(h_{t-1} W_hhᵀ) of every row, and the gradients of γ_hh, γ_c, β_c.
  const Tensor all_drecurrent = layer_norm ? blas::BlockPool::empty({D, N, 4 * H}, opts) : Tensor();
  Tensor grad_input;
  AT_DISPATCH_FLOATING_TYPES(compute, "lstm_ext::backward", [&] {
    with_cell(cell, [&]<typename Cell>() {
      const int threads = layer_threads<scalar_t>(steps, D, H, P);
      for (int64_t l = num_layers - 1; l >= 0; --l) {
        const Tensor layer_input = l == 0 ? input.reshape({N, input.size(-1)}).to(compute).contiguous()
                                          : ws[kLayerInputs][l - 1];
        std::vector<Tensor> dgates, dh_rows, grad_outs, dhs, dcs, dh_pres, grad_unit_weights, recurrent_masks;
        std::vector<Zoneout> zoneouts;
        std::vector<DirectionSaved> saved;
        std::vector<PackedCell<scalar_t>> weights;
        std::vector<LayerNormStep<scalar_t>> norms;
        std::vector<Tensor> norm_grads;  // layer norm's γ_hh [4H], γ_c [H], β_c [H]
        for (int64_t d = 0; d < D; ++d) {
          const int64_t c = l * D + d;
          weights.push_back(PackedCell<scalar_t>::for_backward(cells[c], N));
          saved.push_back(ws.direction(c));
          if (layer_norm) {
            norm_grads.push_back(at::zeros({6 * H}, opts));
            norms.push_back(layer_norm_step<scalar_t>(cells[c], Tensor(), saved[d].layer_norm, norm_grads[d]));
          }
          dgates.push_back(all_dgates[d]);
          dh_rows.push_back(all_dh_rows.defined() ? all_dh_rows[d] : Tensor());
          grad_outs.push_back(grad_layer_output.defined() ? grad_layer_output.narrow(1, d * P, P) : Tensor());
          dhs.push_back(grad_hx[c]);
          dcs.push_back(grad_cx[c]);
          dh_pres.push_back(dh_pre.defined() ? dh_pre[d] : Tensor());
          recurrent_masks.push_back(ws.recurrent_mask(c));
          zoneouts.push_back(ws.kept(kZoneoutCellMasks)
                                 ? Zoneout{ws[kZoneoutCellMasks][c], ws[kZoneoutHiddenMasks][c]}
                                 : eval_zoneout);
          grad_unit_weights.push_back(
              Cell::kUnitWeights > 0
                  ? at::zeros({Cell::kUnitWeights, H}, opts)
                  : Tensor());
        }
        for_each_direction(D, threads, [&](int d, TeamMember member) {
          FullLayer{steps, d == 1}.backward<Cell, scalar_t>(
              cells[l * D + d], weights[d], saved[d], grad_outs[d], dhs[d], dcs[d], dgates[d], dh_rows[d], dh_pres[d],
              grad_unit_weights[d], recurrent_masks[d], zoneouts[d], layer_norm ? &norms[d] : nullptr,
              layer_norm ? all_drecurrent[d] : Tensor(), member);
        });
        // Weight gradients as a few GEMMs over all steps at once.
        Tensor grad_layer_input = blas::BlockPool::empty({N, layer_input.size(1)}, opts);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t c = l * D + d;
          const CellParams& cell = cells[c];
          Tensor* grads = grad_params.data() + c * per_cell;
          Tensor* grad_cell_params = grad_params.data() + params.size() + c * unit_weights;
          grads[0] = blas::BlockPool::empty(cell.w_ih.sizes(), opts);
          grads[1] = blas::BlockPool::empty(cell.w_hh.sizes(), opts);
          // The gradient of x W_ihᵀ: the pre-activations', or with layer norm its input LN's.
          Tensor dinput = dgates[d];
          if (layer_norm) {
            const LayerNormSaved& kept = saved[d].layer_norm;
            dinput = blas::BlockPool::empty(dgates[d].sizes(), dgates[d].options());
            normalize_input_backward<scalar_t>(N, H, dgates[d].data_ptr<scalar_t>(),
                                               cell.layer_norm[0].data_ptr<scalar_t>(),
                                               kept.input.data_ptr<scalar_t>(), kept.rstd.data_ptr<scalar_t>(),
                                               dinput.data_ptr<scalar_t>());
            grad_cell_params[0] = (dgates[d] * kept.input).sum(0);
            for (int64_t k = 1; k < kLayerNormWeights; ++k) {
              grad_cell_params[k] = norm_grads[d].narrow(0, k == 1 ? 0 : (k + 2) * H, k == 1 ? 4 * H : H);
            }
            PackedCell<scalar_t>::weight_gradient(dinput, layer_input, grads[0]);
            PackedCell<scalar_t>::weight_gradient(all_drecurrent[d], saved[d].hiddens_prev, grads[1]);
          } else {
            PackedCell<scalar_t>::weight_gradients(dgates[d], layer_input, saved[d].hiddens_prev, grads[0], grads[1]);
          }
          if (cell.b_ih.defined()) {
            grads[2] = dgates[d].sum(0);
            grads[3] = grads[2].clone();
          }
          if (cell.has_projection()) {
            const Tensor hidden_pre = saved[d].gates.narrow(1, 3 * H, H) * saved[d].tanh_cells;
            grads[per_cell - 1] = blas::BlockPool::empty(cell.w_hr.sizes(), opts);
            PackedCell<scalar_t>::weight_gradient(dh_rows[d], hidden_pre, grads[per_cell - 1]);
          }
          for (int64_t k = 0; k < Cell::kUnitWeights; ++k) {
            grad_cell_params[norm_weights + k] = grad_unit_weights[d][k];
          }
          weights[d].input_gradient(dinput, grad_layer_input, /*accumulate=*/d > 0);
        }
        if (l > 0 && ws.kept(kDropoutMasks)) grad_layer_input.mul_(ws[kDropoutMasks][l - 1]);
        grad_layer_output = grad_layer_input;
      }
      grad_input = grad_layer_output.view(input.sizes());
    });
  });
  // Each gradient in its argument's type (computed in `compute`).
  const TensorList cell_weights = cell_params.value_or(TensorList());
  for (size_t k = 0; k < grad_params.size(); ++k) {
    const Tensor& argument = k < params.size() ? params[k] : cell_weights[k - params.size()];
    if (grad_params[k].defined()) grad_params[k] = grad_params[k].to(argument.scalar_type());
  }
  return {grad_input.to(input.scalar_type()), grad_hx.to(hx.scalar_type()), grad_cx.to(cx.scalar_type()), grad_params};
}

// ---- differentiable recomputation ---------------------------------------------------------------

// lstm_forward's numbers as ATen ops (FullLayer::forward_differentiable per layer-direction),
// registered as CompositeImplicitAutograd: double backward, forward-mode AD and the torch.func
// transforms differentiate or batch it op by op, where the fast operators have only their
// hand-written first-order backward. Its batch sizes are a list, not a tensor: a transform
// wraps every tensor argument, and a wrapped tensor has no data to read. `dropout_masks`
// ([L-1, N, D*P], from the forward's workspace) replays a forward's dropout; without them,
// dropout in training draws new masks.
std::tuple<Tensor, Tensor, Tensor> lstm_forward_differentiable(
    const Tensor& input, at::OptionalIntArrayRef batch_sizes, const Tensor& hx, const Tensor& cx,
    TensorList params, bool has_biases, int64_t num_layers, double dropout, bool train, bool bidirectional,
    const std::optional<Tensor>& dropout_masks, c10::string_view cell, std::optional<TensorList> cell_params,
    double recurrent_dropout, const std::optional<Tensor>& recurrent_masks, at::ArrayRef<double> zoneout,
    std::optional<TensorList> zoneout_masks) {
  TORCH_CHECK(num_layers > 0, "lstm_ext: num_layers must be positive, got ", num_layers);
  const int64_t D = bidirectional ? 2 : 1;
  const std::vector<CellParams> cells =
      gather_params(params, has_biases, num_layers * D, cell_params, cell);
  check_input(input, batch_sizes.has_value());
  const Steps steps = batch_sizes.has_value() ? packed_steps(input, batch_sizes->vec()) : make_steps(input, {});
  const StackShape s = check_forward_args(input, steps, hx, cx, cells, num_layers, bidirectional, dropout);
  const bool replay = dropout_masks.has_value() && dropout_masks->numel() > 0;
  const bool apply_dropout = replay || (dropout > 0 && train && num_layers > 1);
  const bool replay_recurrent = recurrent_masks.has_value() && recurrent_masks->numel() > 0;
  const bool apply_recurrent_dropout = replay_recurrent || (recurrent_dropout > 0 && train);
  const bool apply_zoneout = check_zoneout(zoneout);
  const bool replay_zoneout =
      zoneout_masks.has_value() && zoneout_masks->size() == 2 && (*zoneout_masks)[0].numel() > 0;
  const int64_t N = steps.rows(), H = s.hidden_size, P = s.output_size;
  const Zoneout eval_zoneout = apply_zoneout && !train && !replay_zoneout
                                   ? constant_zoneout(zoneout, N, H, P, input.options())
                                   : Zoneout{};
  Tensor layer_input = input.reshape({steps.rows(), s.input_size});
  std::vector<Tensor> hy, cy;
  for (int64_t l = 0; l < num_layers; ++l) {
    std::vector<Tensor> outputs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = l * D + d;
      Tensor recurrent_mask;
      if (apply_recurrent_dropout) {
        recurrent_mask = replay_recurrent ? (*recurrent_masks)[c].to(input.scalar_type())
                                          : draw_dropout_mask(at::empty({steps.max_batch(), s.output_size},
                                                                        input.options()), recurrent_dropout);
      }
      Zoneout zone = eval_zoneout;
      if (replay_zoneout) {
        zone = {(*zoneout_masks)[0][c].to(input.scalar_type()), (*zoneout_masks)[1][c].to(input.scalar_type())};
      } else if (apply_zoneout && train) {
        zone = draw_zoneout(zoneout, at::empty({N, H}, input.options()), at::empty({N, P}, input.options()));
      }
      std::tuple<Tensor, Tensor, Tensor> result;
      with_cell(cell, [&]<typename Cell>() {
        result = FullLayer{steps, d == 1}.forward_differentiable<Cell>(cells[c], layer_input, hx[c], cx[c],
                                                                       recurrent_mask, zone);
      });
      auto [output, h, c_last] = std::move(result);
      outputs.push_back(std::move(output));
      hy.push_back(std::move(h));
      cy.push_back(std::move(c_last));
    }
    layer_input = D == 1 ? outputs.front() : at::cat(outputs, 1);
    if (apply_dropout && l < num_layers - 1) {
      layer_input =
          layer_input * (replay ? (*dropout_masks)[l].to(input.scalar_type())
                                : draw_dropout_mask(at::empty_like(layer_input), dropout));
    }
  }
  const Tensor output = s.dense ? layer_input.view({input.size(0), input.size(1), -1}) : layer_input;
  return {output, at::stack(hy), at::stack(cy)};
}

}  // namespace

// This capability's kernels (see ops.h).
Kernels kernels() {
  return {&lstm_forward, &lstm_backward, &lstm_forward_differentiable, &quantized_forward};
}

}  // namespace lstm_ext
