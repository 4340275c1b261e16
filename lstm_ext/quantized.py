"""Dynamic quantization: int8 or float16 weights, float32 inputs, outputs and states, inference only.

``lstm_ext.quantize_dynamic(model, dtype)`` returns ``model`` (a copy unless ``inplace``) with every
``nn.LSTM`` / ``nn.LSTMCell`` / ``lstm_ext.LSTM`` / ``lstm_ext.LSTMCell`` replaced by
:class:`QuantizedLSTM` / :class:`QuantizedLSTMCell` (also ``lstm_ext.quantized.LSTM`` /
``lstm_ext.quantized.LSTMCell``), which run the C++ operator ``lstm_ext::quantized_forward``.

Weights are quantized once, when the module is made (:meth:`QuantizedLSTM.from_float`):

- ``dtype=torch.qint8`` (or ``torch.int8``): each weight matrix (``weight_ih``, ``weight_hh``,
  ``weight_hr``) becomes a plain ``torch.int8`` tensor ``q`` and a float32 per-row scale,
  symmetric: ``w ≈ q * scale[:, None]``, ``scale = max|w_row| / 127`` (1 for a row of zeros),
  ``q = round(w / scale).clamp(-127, 127)``. The state_dict names them as nn.LSTM names its
  weights, the scale with ``_scale`` appended (``weight_ih_l0``, ``weight_ih_l0_scale``, ...).
- ``dtype=torch.float16``: the weight matrices are stored in half precision, no scales.

Biases stay float32. Everything is a buffer: the module has no parameters (it does not train).
With int8 weights the operator quantizes each product's input dynamically, row by row, and
multiplies in integers (docs/precision.md); float16 weights multiply in float32.

torch's own ``torch.ao.quantization.quantize_dynamic`` can make these modules through its public
``mapping`` argument: each class has the ``from_float(mod, use_precomputed_fake_quant=False)``
torch calls, which reads the dtype from the qconfig torch attached::

    torch.ao.quantization.quantize_dynamic(
        model, {nn.LSTM, lstm_ext.LSTM}, dtype=torch.qint8,
        mapping={nn.LSTM: lstm_ext.quantized.LSTM, lstm_ext.LSTM: lstm_ext.quantized.LSTM})

(torch matches types exactly, so list lstm_ext's classes too if the model has them.)

The forward contract is nn.LSTM's / nn.LSTMCell's (batch_first, unbatched input, omitted hx,
``PackedSequence`` sorted or not, proj_size, bias=False, layers, directions), with native's
input checks; ``dropout`` does nothing (inference); the input must be float32 (under autocast
it is cast to float32) and the outputs are float32. A backward through the outputs raises.
ONNX export raises: quantize the float model's ONNX file with ONNX Runtime instead.
"""

import copy
import warnings

import torch
from torch import Tensor, nn, serialization
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import functional
from .modules import LSTM as _ExtLSTM
from .modules import LSTMCell as _ExtLSTMCell

try:  # the flags behind torch.onnx.is_in_onnx_export(), see _exporting_to_onnx
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _onnx_globals
except ImportError:  # pragma: no cover  (another torch: is_in_onnx_export() alone)
    _onnx_flags = _onnx_globals = None

_OP_NAME = "lstm_ext::quantized_forward"

ONNX_MESSAGE = (
    "lstm_ext: a quantized LSTM does not export to ONNX (ONNX has no operator for its int8 / float16 weights). "
    "Export the float model instead (before lstm_ext.quantize_dynamic), then quantize the ONNX file with "
    "ONNX Runtime: onnxruntime.quantization.quantize_dynamic(float_model.onnx, quantized_model.onnx, "
    "weight_type=QuantType.QInt8), which turns its LSTM nodes into DynamicQuantizeLSTM."
)
BACKWARD_MESSAGE = (
    "lstm_ext: quantized LSTM is inference-only: it has no backward. Train the float model "
    "(torch.nn.LSTM / lstm_ext.LSTM) and quantize it afterwards, or run the quantized model under torch.no_grad()."
)

# The largest finite float16: larger weights saturate to it, as torch's float16 quantization does.
_FLOAT16_MAX = torch.finfo(torch.float16).max


def _exporting_to_onnx():
    """torch.onnx.is_in_onnx_export(), read from its flags, without its two imports per call. Traced
    by dynamo, only the dynamo exporter's flag, a module global that dynamo reads as it is: the
    dynamo ONNX exporter also captures the model with torch.export's strict (dynamo) tracer, which
    takes is_in_onnx_export() for the constant False (and the TorchScript exporter's flag is a
    property dynamo does not trace)."""
    if _onnx_flags is None:
        return torch.onnx.is_in_onnx_export()
    if torch.compiler.is_compiling():
        return _onnx_flags._is_onnx_exporting
    return _onnx_globals.in_onnx_export or _onnx_flags._is_onnx_exporting


def _quantization_dtype(dtype, who="lstm_ext.quantize_dynamic"):
    """``torch.qint8`` (for ``torch.qint8`` or ``torch.int8``) or ``torch.float16``; ValueError otherwise."""
    if dtype in (torch.qint8, torch.int8):
        return torch.qint8
    if dtype == torch.float16:
        return torch.float16
    raise ValueError(
        f"{who}: dtype must be torch.qint8 (or torch.int8) for int8 weights or torch.float16 for "
        f"float16 weights, got {dtype}"
    )


def _storage_dtype(dtype):
    """The dtype the weight matrices are stored in for a quantization dtype."""
    return torch.int8 if dtype == torch.qint8 else torch.float16


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [rows, cols], scale float32 [rows]): symmetric per-row int8, ``weight ≈ q * scale[:, None]``."""
    weight = weight.detach().to(torch.float32)
    if weight.shape[1] == 0:
        return torch.zeros(weight.shape, dtype=torch.int8), torch.ones(weight.shape[0])
    largest = weight.abs().amax(dim=1)
    scale = torch.where(largest > 0, largest / 127, torch.ones_like(largest))
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _half_weight(weight: Tensor) -> Tensor:
    weight = weight.detach()
    if weight.numel() and weight.abs().max() > _FLOAT16_MAX:
        warnings.warn(
            "lstm_ext.quantize_dynamic: weights beyond float16's range saturate to +-65504", RuntimeWarning,
            stacklevel=4,
        )
        weight = weight.clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
    return weight.to(torch.float16).clone(memory_format=torch.contiguous_format)


def _dtype_of_qconfig(mod):
    """The dtype of the weight observer torch.ao's quantize_dynamic attached to ``mod`` (qint8 if none)."""
    qconfig = getattr(mod, "qconfig", None)
    if qconfig is None:
        return torch.qint8
    return _quantization_dtype(qconfig.weight().dtype, "lstm_ext.quantized: the qconfig's weight observer")


def _check_plain(mod, name):
    """ValueError for an lstm_ext module with a cell variant: quantization covers the plain LSTM cell."""
    where = f" ({name})" if name else ""
    kind = type(mod).__name__
    if isinstance(mod, _ExtLSTM):
        native = _native_names(mod)
        variant = (
            isinstance(mod._flat_weights, functional.CellWeights)
            or not mod._is_plain()
            or mod._flat_weights_names != native
            or bool(set(mod._parameters) - set(native))
        )
    elif isinstance(mod, _ExtLSTMCell):
        native = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
        variant = getattr(mod, "cell", "lstm") != "lstm" or any(getattr(mod, "zoneout", ())) or bool(
            set(mod._parameters) - native
        )
    else:
        return
    if variant:
        options = mod.extra_repr()
        raise ValueError(
            f"lstm_ext.quantize_dynamic: the {kind}{where} is a cell variant ({options}); quantization covers "
            "the plain LSTM cell only (no layer norm, peepholes, zoneout, recurrent dropout or weight drop)"
        )


def _native_names(mod):
    """nn.LSTM's flat weight names for ``mod``'s configuration."""
    names = []
    for layer in range(mod.num_layers):
        for suffix in ("", "_reverse")[: 2 if mod.bidirectional else 1]:
            cell = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if mod.bias else [])
            cell += ["weight_hr"] if mod.proj_size > 0 else []
            names += [f"{name}_l{layer}{suffix}" for name in cell]
    return names


def _is_weight(name):
    return name.startswith("weight_")


class _Quantized(nn.Module):
    """What both modules share: the buffers, their dtypes, ``from_float``'s filling, ``repr``."""

    def _register_weights(self, shapes, dtype):
        """Zero buffers (scales 1) named and shaped as nn.LSTM's parameters, in their order."""
        self.dtype = _quantization_dtype(dtype, f"lstm_ext.quantized.{type(self).__name__}")
        storage = _storage_dtype(self.dtype)
        self._flat_weights_names = list(shapes)
        self._scale_names = []
        for name, shape in shapes.items():
            if _is_weight(name):
                self.register_buffer(name, torch.zeros(shape, dtype=storage))
                if storage == torch.int8:
                    self.register_buffer(name + "_scale", torch.ones(shape[0]))
                    self._scale_names.append(name + "_scale")
            else:
                self.register_buffer(name, torch.zeros(shape))

    def _set_weights(self, mod):
        """Quantizes the float module's weights (parametrized or not) into the buffers."""
        with torch.no_grad():
            for name in self._flat_weights_names:
                weight = getattr(mod, name)
                if not _is_weight(name):
                    self._buffers[name] = weight.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
                elif self.dtype == torch.qint8:
                    self._buffers[name], self._buffers[name + "_scale"] = quantize_weight(weight)
                else:
                    self._buffers[name] = _half_weight(weight)

    def _flat_params(self):
        buffers = self._buffers
        return [buffers[name] for name in self._flat_weights_names], [buffers[name] for name in self._scale_names]

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; a cast (.float(), .double(), .half(), .to(dtype)) leaves
        # them in the dtypes the operator takes: int8 or float16 weights, float32 scales and biases.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, new in self._buffers.items():
            old = before.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _quantization_repr(self):
        return f"dtype={self.dtype}"


class QuantizedLSTM(_Quantized):
    """:class:`torch.nn.LSTM` with int8 (per-row scales) or float16 weights, inference only.

    Made by :func:`quantize_dynamic` or :meth:`from_float`; the constructor (nn.LSTM's arguments
    and ``dtype=torch.qint8 | torch.float16``) makes zero weights to fill with ``load_state_dict``.
    """

    # nn.LSTM's checks and their messages, on the same attributes (check_input is ours: the
    # weights' dtype is not the input's).
    get_expected_hidden_size = nn.LSTM.get_expected_hidden_size
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_hidden_size = nn.LSTM.check_hidden_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(
        self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
        bidirectional=False, proj_size=0, dtype=torch.qint8,
    ):
        super().__init__()
        # nn.LSTM's own checks of the arguments, and its parameters' names and shapes, on no memory.
        like = nn.LSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                       device="meta")
        for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                     "proj_size"):
            setattr(self, name, getattr(like, name))
        self._register_weights({name: getattr(like, name).shape for name in like._flat_weights_names}, dtype)

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False, *, dtype=None):
        """The quantized copy of an ``nn.LSTM`` (or a plain ``lstm_ext.LSTM``).

        ``dtype``: ``torch.qint8`` / ``torch.int8`` or ``torch.float16``; by default the dtype of
        the qconfig torch.ao's ``quantize_dynamic`` attached to ``mod``, else ``torch.qint8``.
        ``use_precomputed_fake_quant`` is torch.ao's argument, unused (dynamic quantization)."""
        if not isinstance(mod, nn.LSTM):
            raise TypeError(f"lstm_ext.quantized.LSTM.from_float: expected an nn.LSTM, got {type(mod).__name__}")
        _check_plain(mod, "")
        dtype = _dtype_of_qconfig(mod) if dtype is None else _quantization_dtype(dtype)
        quantized = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias, mod.batch_first, mod.dropout,
                        mod.bidirectional, mod.proj_size, dtype=dtype)
        quantized._set_weights(mod)
        return quantized

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        """nn.LSTM's check_input, with float32 in place of the weights' dtype."""
        if input.dtype != torch.float32 and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match the quantized LSTM's activation dtype "
                f"(torch.float32). Convert input: input.to(torch.float32)"
            )
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}"
            )

    def forward(self, input, hx=None):
        """nn.LSTM.forward's steps (the installed torch's, written out), on the quantized operator."""
        if _exporting_to_onnx():
            raise RuntimeError(ONNX_MESSAGE)
        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if hx is None:
                hx = self._zero_state(input, num_directions, max_batch_size, real_hidden_size)
                self.check_input(input, batch_sizes)
            else:
                self.check_forward_args(input, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                hx = self._zero_state(input, num_directions, max_batch_size, real_hidden_size)
                self.check_forward_args(input, hx, batch_sizes)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should "
                            f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should "
                            f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)
            if self.batch_first:
                input = input.transpose(0, 1)

        params, scales = self._flat_params()
        output, hy, cy = _quantized_forward(
            input, batch_sizes, hx[0], hx[1], params, scales, self.bias, self.num_layers, self.bidirectional
        )
        hidden = (hy, cy)
        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _zero_state(self, input, num_directions, batch, real_hidden_size):
        h_zeros = torch.zeros(self.num_layers * num_directions, batch, real_hidden_size, device=input.device)
        c_zeros = torch.zeros(self.num_layers * num_directions, batch, self.hidden_size, device=input.device)
        return h_zeros, c_zeros

    def extra_repr(self):
        return f"{nn.LSTM.extra_repr(self)}, {self._quantization_repr()}"


class QuantizedLSTMCell(_Quantized):
    """:class:`torch.nn.LSTMCell` with int8 (per-row scales) or float16 weights, inference only."""

    def __init__(self, input_size, hidden_size, bias=True, dtype=torch.qint8):
        super().__init__()
        like = nn.LSTMCell(input_size, hidden_size, bias, device="meta")
        self.input_size, self.hidden_size, self.bias = like.input_size, like.hidden_size, like.bias
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
        self._register_weights({name: getattr(like, name).shape for name in names}, dtype)

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False, *, dtype=None):
        """The quantized copy of an ``nn.LSTMCell`` (or a plain ``lstm_ext.LSTMCell``); ``dtype`` as
        :meth:`QuantizedLSTM.from_float`'s."""
        if not isinstance(mod, nn.LSTMCell):
            raise TypeError(
                f"lstm_ext.quantized.LSTMCell.from_float: expected an nn.LSTMCell, got {type(mod).__name__}"
            )
        _check_plain(mod, "")
        dtype = _dtype_of_qconfig(mod) if dtype is None else _quantization_dtype(dtype)
        quantized = cls(mod.input_size, mod.hidden_size, mod.bias, dtype=dtype)
        quantized._set_weights(mod)
        return quantized

    def forward(self, input, hx=None):
        """nn.LSTMCell.forward's steps, on the quantized operator (one step of one layer)."""
        if _exporting_to_onnx():
            raise RuntimeError(ONNX_MESSAGE)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, device=input.device)
            hx = (zeros, zeros)
        else:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not is_batched else hx
        h0, c0 = functional._unpack_hidden(hx, "lstm_cell")
        if input.dtype != torch.float32 and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"LSTMCell input dtype ({input.dtype}) does not match the quantized LSTMCell's activation dtype "
                f"(torch.float32). Convert input: input.to(torch.float32)"
            )
        params, scales = self._flat_params()
        batch, hidden = input.size(0), self.hidden_size
        if input.dim() != 2 or input.size(1) != self.input_size or h0.shape != (batch, hidden) or c0.shape != (
            batch, hidden
        ):
            functional._check_cell_args(input, h0, c0, params[0], params[1])  # ATen's messages for the cell
        _, hy, cy = _quantized_forward(
            input.unsqueeze(0), None, h0.unsqueeze(0), c0.unsqueeze(0), params, scales, self.bias, 1, False
        )
        ret = (hy[0], cy[0])
        if not is_batched:
            ret = (ret[0].squeeze(0), ret[1].squeeze(0))
        return ret

    def extra_repr(self):
        return f"{nn.LSTMCell.extra_repr(self)}, {self._quantization_repr()}"


# The names the brief of lstm_ext.quantize_dynamic uses: lstm_ext.quantized.LSTM / .LSTMCell.
LSTM = QuantizedLSTM
LSTMCell = QuantizedLSTMCell


def _quantized_forward(input, batch_sizes, hx, cx, params, scales, has_biases, num_layers, bidirectional):
    """The operator, cast to float32 under autocast, behind an autograd.Function whose backward
    raises when an input or a state needs a gradient."""
    if torch._C._is_any_autocast_enabled():
        input, hx, cx = (t.to(torch.float32) for t in (input, hx, cx))
    args = (input, batch_sizes, hx, cx, params, scales, has_biases, num_layers, bidirectional)
    if torch.is_grad_enabled() and (input.requires_grad or hx.requires_grad or cx.requires_grad):
        return _InferenceOnly.apply(*args)
    return torch.ops.lstm_ext.quantized_forward(*args)


class _InferenceOnly(torch.autograd.Function):
    """The quantized operator inside autograd's graph, so that a backward reaches it and raises."""

    @staticmethod
    def forward(ctx, *args):
        return torch.ops.lstm_ext.quantized_forward(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(BACKWARD_MESSAGE)


# ---- quantize_dynamic -------------------------------------------------------------------------

_QUANTIZED = {nn.LSTM: QuantizedLSTM, _ExtLSTM: QuantizedLSTM, nn.LSTMCell: QuantizedLSTMCell,
              _ExtLSTMCell: QuantizedLSTMCell}


def quantize_dynamic(model: nn.Module, dtype=torch.qint8, inplace: bool = False) -> nn.Module:
    """``model`` with every ``nn.LSTM``, ``nn.LSTMCell``, ``lstm_ext.LSTM`` and ``lstm_ext.LSTMCell``
    (``model`` itself too) replaced by lstm_ext's quantized, inference-only modules.

    ``dtype``: ``torch.qint8`` (or ``torch.int8``): int8 weights with per-row scales;
    ``torch.float16``: float16 weights. Other dtypes raise ValueError. As torch.ao's
    ``quantize_dynamic``: a deep copy unless ``inplace=True``, and the result is put in eval mode.
    Types match exactly (a subclass of nn.LSTM is left alone, as torch does); forward hooks and
    pre-hooks of a replaced module move to its replacement. An lstm_ext module with a cell variant
    raises ValueError: quantization covers the plain LSTM cell.
    """
    dtype = _quantization_dtype(dtype)
    # Checked before anything is copied or changed, so that a failure leaves ``model`` as it was.
    for name, module in model.named_modules():
        if parametrize.type_before_parametrizations(module) in _QUANTIZED:
            _check_plain(module, name or "the model")
    if not inplace:
        model = copy.deepcopy(model)
    model = _swap(model, dtype)
    model.eval()
    return model


def _swap(module, dtype):
    quantized = _QUANTIZED.get(parametrize.type_before_parametrizations(module))
    if quantized is not None:
        new = quantized.from_float(module, dtype=dtype)
        for hook in module._forward_pre_hooks.values():
            new.register_forward_pre_hook(hook)
        for hook in module._forward_hooks.values():
            new.register_forward_hook(hook)
        return new
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _swap(child, dtype)
            if new is not child:
                module._modules[name] = new
    return module


# ---- the operator's fake (shape-only) implementation, for torch.compile and torch.export -------


def _quantized_forward_fake(input, batch_sizes, hx, cx, params, scales, has_biases, num_layers, bidirectional):
    directions = 2 if bidirectional else 1
    output = input.new_empty((*input.shape[:-1], directions * hx.shape[-1]), dtype=torch.float32)
    return output, hx.new_empty(hx.shape, dtype=torch.float32), cx.new_empty(cx.shape, dtype=torch.float32)


def _register_fake():
    """Registers the fake implementation once the operator exists (a build without it still imports)."""
    if hasattr(torch.ops.lstm_ext, "quantized_forward"):
        torch.library.register_fake(_OP_NAME)(_quantized_forward_fake)


_register_fake()

# torch.load's default (weights_only) unpickler builds only allow-listed classes.
serialization.add_safe_globals([QuantizedLSTM, QuantizedLSTMCell])
