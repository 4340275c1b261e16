"""``LSTM`` and ``LSTMCell``: ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` running lstm_ext's operator.

Only ``forward`` differs, and only in which operator it calls. Each ``forward`` here *is* the
installed torch's own ``forward`` code (argument validation, error messages, unbatched input,
omitted ``hx``, ``PackedSequence`` sorting), run with its ``_VF`` global pointing at
:mod:`lstm_ext.functional` instead of ``torch._VF``. Parameters, initialisation, ``state_dict``
and ``repr`` are inherited. So the module matches native by construction, not by a copy of it.

A cell variant (keyword-only options of ``LSTM``, see :mod:`lstm_ext.cells`) adds its parameters
after each layer-direction's native ones, in ``_flat_weights`` too, which then is a
:class:`functional.CellWeights` naming the variant: nn.LSTM's forward hands it to
:func:`functional.lstm` as it is. ``LSTMCell`` has no such list, so a variant cell's forward
spells native's steps out (``_variant_cell_forward``).
"""

import math
import types

import torch
from torch import nn, serialization
from torch.nn.modules import rnn as _native_rnn

from . import cells, functional

_VF = types.SimpleNamespace(lstm=functional.lstm, lstm_cell=functional.lstm_cell)


def _with_lstm_ext_ops(native_forward):
    """``native_forward``'s code, calling lstm_ext's ops where it called ``torch._VF``."""
    forward = types.FunctionType(
        native_forward.__code__,
        {**vars(_native_rnn), "_VF": _VF},
        native_forward.__name__,
        native_forward.__defaults__,
        native_forward.__closure__,
    )
    forward.__doc__ = native_forward.__doc__
    forward.__qualname__ = native_forward.__qualname__
    return forward


def _variant_options(
    module, peephole=False, cell="lstm", layer_norm=False, recurrent_dropout=0.0, weight_drop=0.0, zoneout=0.0
):
    """The variant options, checked: (the operators' cell name, recurrent_dropout, weight_drop, (z_c, z_h))."""
    for name, flag in (("peephole", peephole), ("layer_norm", layer_norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"lstm_ext.{module}: {name} must be a bool, got {type(flag).__name__}")
    if not isinstance(cell, str):
        raise TypeError(f"lstm_ext.{module}: cell must be a str, got {type(cell).__name__}")
    inner, named_layer_norm = cells.split(cell)  # raises ValueError for an unknown cell
    if peephole and inner != "lstm":
        raise ValueError(f"lstm_ext.{module}: peephole=True and cell={cell!r} name two cells")
    cell = cells.join("peephole" if peephole else inner, layer_norm or named_layer_norm)
    if isinstance(zoneout, (tuple, list)) and len(zoneout) != 2:
        raise ValueError(f"lstm_ext.{module}: zoneout must be a number or a pair (z_c, z_h), got {len(zoneout)} values")
    zoneout = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
    probabilities = [("recurrent_dropout", recurrent_dropout), ("weight_drop", weight_drop)]
    for name, p in probabilities + [("zoneout", z) for z in zoneout]:
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"lstm_ext.{module}: {name} must be a number, got {type(p).__name__}")
        if not 0 <= p <= 1:
            raise ValueError(f"lstm_ext.{module}: {name} must be in [0, 1], got {p}")
    return cell, float(recurrent_dropout), float(weight_drop), tuple(map(float, zoneout))


def _cell_parameter(module, init, size):
    """A new [size·hidden_size] parameter, like the module's weights: drawn as nn.LSTM draws them,
    or filled with ``init``."""
    like = module.weight_hh_l0 if isinstance(module, nn.LSTM) else module.weight_hh
    value = torch.empty(size * module.hidden_size, dtype=like.dtype, device=like.device)
    bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    with torch.no_grad():
        value.uniform_(-bound, bound) if init is None else value.fill_(init)
    return nn.Parameter(value)


class LSTM(nn.LSTM):
    """Drop-in for :class:`torch.nn.LSTM` (same constructor, parameters and ``state_dict``).

    Keyword-only cell variants, all off by default (then the module is exactly nn.LSTM):

    ``layer_norm=True`` (Ba, Kiros & Hinton 2016): the gate pre-activations are
    LN(x W_ihᵀ; γ_ih) + LN(h W_hhᵀ; γ_hh) + b_ih + b_hh (each over the 4H gate columns) and
    h_t = σ(o)·tanh(LN(c_t; γ_c, β_c)) (over H; the carried c_t is not normalised), with
    LN(v; γ, β) = γ·(v - mean(v)) / sqrt(var(v) + 1e-5) + β. Parameters ``ln_weight_ih_l{k}``,
    ``ln_weight_hh_l{k}`` [4·hidden_size], ``ln_weight_c_l{k}``, ``ln_bias_c_l{k}`` [hidden_size]
    (initialised to 1, 1, 1, 0), before any other cell's parameters.

    ``peephole=True``: the i and f gates see c_{t-1}, the o gate c_t, through per-unit weights
    ``weight_ci_l{k}``, ``weight_cf_l{k}``, ``weight_co_l{k}`` [hidden_size].

    ``recurrent_dropout=p`` (training only): one keep-mask per layer-direction and forward call,
    [batch, P] ~ Bernoulli(1 - p), multiplies h_{t-1} / (1 - p) in the recurrent product at
    every step; the carried state is not masked.

    ``weight_drop=p`` (training only): DropConnect on W_hh, one mask of its shape per
    layer-direction and forward call; every step uses W_hh ⊙ M / (1 - p).

    ``zoneout=z`` or ``(z_c, z_h)``: c_t = d·c_{t-1} + (1 - d)·c̃_t and h_t = d'·h_{t-1} +
    (1 - d')·h̃_t (h̃ after the projection), c̃, h̃ the cell's own new states; in training
    d ~ Bernoulli(z_c), d' ~ Bernoulli(z_h) per step, row and unit, in eval d = z_c, d' = z_h.

    ``cell="..."``: any cell of :mod:`lstm_ext.cells` by name (``peephole=True`` is
    ``cell="peephole"``, ``layer_norm=True`` prefixes ``layer_norm+``). ``self.cell`` is the
    name the operators take, e.g. ``"layer_norm+peephole"``.

    Masks come from torch's default generator, in the order given in :func:`functional.lstm`.
    """

    forward = _with_lstm_ext_ops(nn.LSTM.forward)

    def __init__(
        self, *args, peephole: bool = False, layer_norm: bool = False, recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0, zoneout: float | tuple[float, float] = 0.0, cell: str = "lstm", **kwargs,
    ):
        options = _variant_options("LSTM", peephole, cell, layer_norm, recurrent_dropout, weight_drop, zoneout)
        super().__init__(*args, **kwargs)
        self.cell, self.recurrent_dropout, self.weight_drop, self.zoneout = options
        if self.cell != "lstm":
            self._add_cell_parameters()
        self._init_flat_weights()

    def _is_plain(self):
        """Whether the module is exactly nn.LSTM (also while nn.LSTM's __init__ runs)."""
        return not any(getattr(self, name, None) for name in ("recurrent_dropout", "weight_drop")) and (
            getattr(self, "cell", "lstm") == "lstm" and not any(getattr(self, "zoneout", ()))
        )

    def _add_cell_parameters(self):
        """Registers the cell's parameters after each layer-direction's native ones (state_dict
        order), drawn layer-direction by layer-direction in cells.parameters' order."""
        ordered, all_weights = {}, []
        for names in self._all_weights:
            suffix = names[0][len("weight_ih") :]
            extra = [(name + suffix, _cell_parameter(self, *how)) for name, *how in cells.parameters(self.cell)]
            ordered.update({name: self._parameters[name] for name in names})
            ordered.update(extra)
            all_weights.append([*names, *(name for name, _ in extra)])
        self._parameters.clear()
        self._parameters.update(ordered)
        self._all_weights = all_weights
        self._flat_weights_names = [name for names in all_weights for name in names]

    def _weights_have_changed(self):
        # nn.RNNBase's check, run by every forward, with its getattr(self, name) read from
        # _parameters where that is what getattr finds (no class attribute, such as a
        # parametrization's property, and no instance attribute by that name): two
        # Module.__getattr__ calls per weight cost a T=1 call ~4 us.
        parameters, attributes, cls = self._parameters, self.__dict__, type(self)
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names, strict=True):
            if name in parameters and name not in attributes and not hasattr(cls, name):
                weight = parameters[name]
            else:
                weight = getattr(self, name) if hasattr(self, name) else None
            if weight is not None and ref is not None and ref() is not weight:
                return True
        return False

    def _init_flat_weights(self):
        super()._init_flat_weights()
        if not self._is_plain():
            self._flat_weights = functional.CellWeights(
                self._flat_weights, self.cell, self.recurrent_dropout, self.weight_drop, self.zoneout
            )

    # A checkpoint holds a variant's flat weights as a plain list, as nn.LSTM's: torch.load's
    # weights_only unpickler builds lists, not functional.CellWeights, which loading wraps again.
    def __getstate__(self):
        state = super().__getstate__()
        state["_flat_weights"] = list(state["_flat_weights"])
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_flat_weights()

    def extra_repr(self):
        variant = [f"cell={self.cell}"] if self.cell != "lstm" else []
        zoneout = self.zoneout if any(self.zoneout) else 0
        options = dict(recurrent_dropout=self.recurrent_dropout, weight_drop=self.weight_drop, zoneout=zoneout)
        variant += [f"{name}={value}" for name, value in options.items() if value]
        return ", ".join([super().extra_repr(), *variant])


class LSTMCell(nn.LSTMCell):
    """Drop-in for :class:`torch.nn.LSTMCell`.

    Keyword-only variants, as :class:`LSTM`'s, off by default: ``layer_norm=True`` (parameters
    ``ln_weight_ih``, ``ln_weight_hh``, ``ln_weight_c``, ``ln_bias_c``), ``peephole=True``
    (``weight_ci``, ``weight_cf``, ``weight_co`` [hidden_size]), each after the native ones,
    ``zoneout=z`` or ``(z_c, z_h)`` (masks drawn at each call in training) and ``cell="..."``.
    """

    def __init__(self, *args, peephole: bool = False, layer_norm: bool = False,
                 zoneout: float | tuple[float, float] = 0.0, cell: str = "lstm", **kwargs):
        options = _variant_options("LSTMCell", peephole, cell, layer_norm, zoneout=zoneout)
        super().__init__(*args, **kwargs)
        self.cell, _, _, self.zoneout = options
        for name, *how in cells.parameters(self.cell):
            self.register_parameter(name, _cell_parameter(self, *how))

    def forward(self, input, hx=None):
        if self.cell == "lstm" and not any(self.zoneout):
            return _plain_cell_forward(self, input, hx)
        return _variant_cell_forward(self, input, hx)

    forward.__doc__ = nn.LSTMCell.forward.__doc__

    def extra_repr(self):
        variant = [f"cell={self.cell}"] if self.cell != "lstm" else []
        variant += [f"zoneout={self.zoneout}"] if any(self.zoneout) else []
        return ", ".join([super().extra_repr(), *variant])


_plain_cell_forward = _with_lstm_ext_ops(nn.LSTMCell.forward)


def _variant_cell_forward(self, input, hx=None):
    """nn.LSTMCell.forward's steps with the module's variant: native's checks, unbatched input and
    omitted hx, then lstm_cell with the cell's parameters. Spelled out rather than run as native's
    code: that code could take the variant only through a _VF made at each call, which
    torch.compile cannot trace."""
    if input.dim() not in (1, 2):
        raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for index, value in enumerate(hx if hx is not None else ()):
        if value.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    if hx is None:
        zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        hx = (zeros, zeros)
    elif not is_batched:
        hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    cell_params = [getattr(self, name) for name, *_ in cells.parameters(self.cell)]
    h, c = functional.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                cell=self.cell, cell_params=cell_params, zoneout=self.zoneout, train=self.training)
    return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


# torch.load's default (weights_only) unpickler builds only allow-listed classes. A script that
# allow-lists nn.LSTM to load a whole-model checkpoint must load it with these drop-ins in it too.
serialization.add_safe_globals([LSTM, LSTMCell])
