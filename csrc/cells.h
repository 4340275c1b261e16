// The cell variants, and the list the operators pick a cell from by name.
//
// Each is a struct of the cell concept (see cell.h): its name, how many extra weights of H values
// each layer-direction has, its pointwise forward and, beside it, the backward twin. Adding a
// cell takes a struct here, its entry in `Cells` below and its weights' names in
// lstm_ext/cells.py (README, "Writing your own cell").
#pragma once

#include "cell.h"

#include <string>
#include <string_view>
#include <tuple>

namespace lstm_ext::inline CPU_CAPABILITY {

// Peephole connections (Gers, Schraudolph & Schmidhuber 2002): the input and forget gates see
// c_{t-1}, the output gate sees c_t, each through a weight per unit (p_i, p_f, p_o).
struct PeepholeCell {
  static constexpr const char* kName = "peephole";
  static constexpr int kUnitWeights = 3;  // p_i, p_f, p_o
  template <typename V>
  using Weights = UnitWeights<V, kUnitWeights>;

  template <typename V>
  static Values<V> forward(const Gates<V>& pre, const V& cell_prev, const Weights<V>& p) {
    const V i = pointwise::sigmoid(pointwise::fmadd(p[0], cell_prev, pre.i));
    const V f = pointwise::sigmoid(pointwise::fmadd(p[1], cell_prev, pre.f));
    const V z = pointwise::tanh(pre.g);
    const V cell = pointwise::fmadd(f, cell_prev, i * z);
    const V o = pointwise::sigmoid(pointwise::fmadd(p[2], cell, pre.o));
    const V tanh_cell = pointwise::tanh(cell);
    return {i, f, z, o, cell, tanh_cell, o * tanh_cell};
  }

  // As the plain cell's, plus: c_t reaches the loss through o as well (p_o), c_{t-1} through
  // i and f (p_i, p_f).
  template <typename V>
  static StepGradients<V, kUnitWeights> backward(const Saved<V>& s, const Weights<V>& p, const V& dhidden,
                                                 const V& dcell) {
    const V one(1);
    const V cell = pointwise::fmadd(s.f, s.cell_prev, s.i * s.z);
    const V d_o = dhidden * s.tanh_cell * s.o * (one - s.o);
    const V dc_total =
        pointwise::fmadd(d_o, p[2], pointwise::fmadd(dhidden * s.o, one - s.tanh_cell * s.tanh_cell, dcell));
    const V d_i = dc_total * s.z * s.i * (one - s.i), d_f = dc_total * s.cell_prev * s.f * (one - s.f);
    return {{d_i, d_f, dc_total * s.i * (one - s.z * s.z), d_o},
            pointwise::fmadd(d_f, p[1], pointwise::fmadd(d_i, p[0], dc_total * s.f)),
            {d_i * s.cell_prev, d_f * s.cell_prev, d_o * cell}};
  }
};

// Coupled input and forget gates (CIFG; Greff et al. 2017): f = 1 - i. The forget gate's
// pre-activations, and so its rows of the weights, are unused.
struct CIFGCell {
  static constexpr const char* kName = "cifg";
  static constexpr int kUnitWeights = 0;
  template <typename V>
  using Weights = UnitWeights<V, kUnitWeights>;

  template <typename V>
  static Values<V> forward(const Gates<V>& pre, const V& cell_prev, const Weights<V>&) {
    const V i = pointwise::sigmoid(pre.i), f = pointwise::one_minus(i);
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
    return {{dc_total * (s.z - s.cell_prev) * s.i * (one - s.i), V(0), dc_total * s.i * (one - s.z * s.z),
             dhidden * s.tanh_cell * s.o * (one - s.o)},
            dc_total * s.f,
            {}};
  }
};

// Every cell the operators know, by kName.
using Cells = std::tuple<LSTMCell, PeepholeCell, CIFGCell>;

// Layer normalisation (Ba, Kiros & Hinton 2016) around any cell, named "layer_norm" (around the
// plain cell) or "layer_norm+<cell>": the gate pre-activations are
// LN(x W_ihᵀ; γ_ih) + LN(h W_hhᵀ; γ_hh) + b_ih + b_hh and the hidden state σ(o)·tanh(LN(c_t); γ_c, β_c).
// Not a cell of the concept: its statistics span a row's units, which the fused passes split
// among threads. Its four weights, γ_ih [4H], γ_hh [4H], γ_c [H], β_c [H], come first among a
// layer-direction's cell parameters (CellParams::layer_norm).
constexpr std::string_view kLayerNorm = "layer_norm";
constexpr int kLayerNormWeights = 4;
constexpr double kLayerNormEps = 1e-5;

// A cell's name split into whether it is layer-normalised and the cell of the concept inside.
struct CellName {
  bool layer_norm;
  std::string_view cell;

  static CellName parse(std::string_view name) {
    if (name == kLayerNorm) return {true, LSTMCell::kName};
    if (name.size() > kLayerNorm.size() && name.substr(0, kLayerNorm.size()) == kLayerNorm &&
        name[kLayerNorm.size()] == '+') {
      return {true, name.substr(kLayerNorm.size() + 1)};
    }
    return {false, name};
  }
};

// Calls body.template operator()<Cell>() for the cell named `name` (inside any layer norm).
template <typename Body>
void with_cell(std::string_view name, const Body& body) {
  const std::string_view cell = CellName::parse(name).cell;
  bool found = false;
  std::string known;
  std::apply(
      [&](auto... cells) {
        ([&] {
          using Cell = decltype(cells);
          known += (known.empty() ? "" : ", ") + std::string(Cell::kName);
          if (!found && cell == Cell::kName) {
            found = true;
            body.template operator()<Cell>();
          }
        }(), ...);
      },
      Cells{});
  TORCH_CHECK(found, "lstm_ext: unknown cell '", name, "'; the cells are ", known, ", each also as layer_norm+<cell>");
}

// How many extra weights a layer-direction of the cell named `name` has: its cell's, of H values
// each, after layer norm's four.
inline int unit_weight_count(std::string_view name) {
  int count = CellName::parse(name).layer_norm ? kLayerNormWeights : 0;
  with_cell(name, [&]<typename Cell>() { count += Cell::kUnitWeights; });
  return count;
}

}  // namespace lstm_ext
