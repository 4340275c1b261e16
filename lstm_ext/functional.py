"""The functional API: ``lstm`` (both overloads of ``torch._VF.lstm``) and ``lstm_cell``.

The C++ operators do the work (with their autograd and autocast kernels, csrc/dispatch.cpp); this
module only adapts arguments, sends eager calls to them through ``lstm_ext._C`` (C++ all the way,
csrc/module.cpp), runs a leaner autograd.Function around the calls it traces, and wires the fake
(shape-only) implementations through ``torch.library``, so autograd, ``torch.compile`` and
``torch.library.opcheck`` see ordinary dispatcher ops.
"""

import enum
import inspect
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import _C, cells

_ops = torch.ops.lstm_ext


def lstm(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """Drop-in for ``torch._VF.lstm``, with the same two overloads.

    Dense: ``lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``.
    Packed: ``lstm(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)``.
    Returns ``(output, h_n, c_n)``.

    Keyword-only, the variants (see lstm_ext.LSTM): ``cell`` names a cell (see
    :mod:`lstm_ext.cells`) and ``cell_params`` gives its extra parameters, layer-direction by
    layer-direction; ``recurrent_dropout`` and ``weight_drop`` are probabilities, applied when
    ``train``; ``zoneout`` is ``(z_c, z_h)`` (masks when ``train``, else the constants).
    ``params`` may also be a module's :class:`CellWeights`, which carries them all.

    Random draws, from torch's default generator, in this order: weight drop's masks of W_hh
    (one per layer-direction, in nn.LSTM's order), then per layer and direction as the layer
    starts, recurrent dropout's mask [B, P] and zoneout's masks of c [N, H] and of h [N, P] (N the
    rows of all steps), then dropout's mask after the layer.
    """
    packed = "batch_sizes" in kwargs or (len(args) > 1 and isinstance(args[1], Tensor))
    return (lstm_packed if packed else lstm_dense)(*args, **kwargs)


def lstm_dense(
    input: Tensor,
    hx: Sequence[Tensor],
    params: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    **variant,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch._VF.lstm`` on a padded ``[T, B, I]`` (or ``[B, T, I]``) input."""
    h0, c0 = _unpack_hidden(hx)
    params, cell_args = _split_variant(params, train, num_layers, bidirectional, variant)
    if batch_first:
        if input.dim() != 3:
            raise RuntimeError(f"lstm_ext: expected 3-D [B, T, I] input with batch_first=True, got {input.dim()}-D")
        input = input.transpose(0, 1)
    options = (has_biases, num_layers, dropout, train, bidirectional)
    output, hy, cy = _forward(input, None, h0, c0, params, *options, cell_args)
    if batch_first:
        output = output.transpose(0, 1)
    return output, hy, cy


def lstm_packed(
    data: Tensor,
    batch_sizes: Tensor,
    hx: Sequence[Tensor],
    params: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    **variant,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch._VF.lstm`` on packed data ``[N, I]`` with ``batch_sizes`` (as in ``PackedSequence``)."""
    h0, c0 = _unpack_hidden(hx)
    params, cell_args = _split_variant(params, train, num_layers, bidirectional, variant)
    return _forward(data, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, cell_args)


class CellWeights(list):
    """A module's flat weight list (``_flat_weights``) with a cell variant's parameters after each
    layer-direction's native ones, and the variant's options: how lstm_ext.LSTM hands them to
    :func:`lstm` through nn.LSTM's own forward code."""

    def __init__(self, weights, cell="lstm", recurrent_dropout=0.0, weight_drop=0.0, zoneout=(0.0, 0.0)):
        super().__init__(weights)
        self.cell, self.recurrent_dropout, self.weight_drop = cell, recurrent_dropout, weight_drop
        self.zoneout = zoneout


def _split_variant(params, train, num_layers, bidirectional, variant):
    """_variant_args, skipped for the plain LSTM: every call passes here (~1 us of a T=1 call)."""
    if not variant and not isinstance(params, CellWeights):
        return params, ()
    return _variant_args(params, train, num_layers, bidirectional, **variant)


def _variant_args(
    params, train, num_layers, bidirectional, cell="lstm", cell_params=(), recurrent_dropout=0.0, weight_drop=0.0,
    zoneout=(0.0, 0.0),
):
    """(nn.LSTM's params, weight-dropped in training; the forward operator's trailing arguments
    (cell, cell_params, recurrent_dropout, zoneout): none for the plain LSTM)."""
    layer_directions = num_layers * (2 if bidirectional else 1)
    if isinstance(params, CellWeights):
        cell, recurrent_dropout, weight_drop = params.cell, params.recurrent_dropout, params.weight_drop
        zoneout = params.zoneout
        per_cell, extra = len(params) // layer_directions, cells.parameter_count(params.cell)
        chunks = [params[i : i + per_cell] for i in range(0, len(params), per_cell)]
        params = [p for chunk in chunks for p in chunk[: per_cell - extra]]
        cell_params = [p for chunk in chunks for p in chunk[per_cell - extra :]]
    if weight_drop > 0 and train:
        params = list(params)
        per_cell = len(params) // layer_directions
        for index in range(1, len(params), per_cell):  # W_hh, the second weight of each layer-direction
            w_hh = params[index]
            keep = torch.zeros_like(w_hh) if weight_drop == 1 else torch.empty_like(w_hh).bernoulli_(1 - weight_drop)
            params[index] = w_hh * (keep if weight_drop == 1 else keep / (1 - weight_drop))
    zoneout = [float(z) for z in ((zoneout, zoneout) if isinstance(zoneout, (int, float)) else zoneout)]
    if cell == "lstm" and not cell_params and not (recurrent_dropout > 0 and train) and not any(zoneout):
        return params, ()
    return params, (cell, list(cell_params), float(recurrent_dropout), zoneout)


def lstm_cell(
    input: Tensor,
    hx: Sequence[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    train: bool = False,
    **variant,
) -> tuple[Tensor, Tensor]:
    """Drop-in for ``torch.lstm_cell``: one step on ``[B, I]``, returns ``(h_1, c_1)``.

    Keyword-only: a variant's ``cell``, ``cell_params`` and ``zoneout``, as :func:`lstm`'s, and
    ``train`` (zoneout's masks, else its constants)."""
    h0, c0 = _unpack_hidden(hx, "lstm_cell")
    has_biases = b_ih is not None
    if has_biases != (b_hh is not None):
        raise RuntimeError("lstm_ext.lstm_cell: b_ih and b_hh must both be given or both be None")
    params = [w_ih, w_hh, b_ih, b_hh] if has_biases else [w_ih, w_hh]
    params, cell_args = _split_variant(params, train, 1, False, variant)
    try:
        # A step straight to lstm_ext._C, unless autocast casts its states (through the operator's
        # AutocastCPU kernel: _forward, then the states' dtype below).
        if not cell_args and not _is_autocast_enabled("cpu") and _runs_in_cpp(input, h0, c0, *params):
            return _C.lstm_cell(input, h0, c0, w_ih, w_hh, b_ih, b_hh)
        _, hy, cy = _forward(input.unsqueeze(0), None, h0.unsqueeze(0), c0.unsqueeze(0), params, has_biases, 1, 0.0,
                             train, False, cell_args)
    except RuntimeError:
        # The operator checks every shape; ATen's messages for the cell come from the checks here,
        # run only when it failed: they cost a decoding step ~10% of its time.
        _check_cell_args(input, h0, c0, w_ih, w_hh)
        raise
    if _is_autocast_enabled("cpu"):
        # Native's lstm_cell is not on autocast's list, only its matrix products are: the new
        # states come out in the type of the cell state's update, f * c0 + i * g.
        state_dtype = torch.promote_types(torch.get_autocast_dtype("cpu"), c0.dtype)
        return hy[0].to(state_dtype), cy[0].to(state_dtype)
    return hy[0], cy[0]


def _unpack_hidden(hx: Sequence[Tensor], op: str = "lstm") -> tuple[Tensor, Tensor]:
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states")
    return hx[0], hx[1]


def _check_cell_args(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor) -> None:
    """The checks and messages of ATen's check_rnn_cell_forward_input/hidden."""
    if input.dim() != 2:
        raise RuntimeError(f"lstm_cell: expected input of 2 dimensions [batch, input_size], got {input.dim()}")
    for name, weight in (("weight_ih", w_ih), ("weight_hh", w_hh)):
        if weight.dim() != 2:
            raise RuntimeError(f"lstm_cell: expected {name} of 2 dimensions, got {weight.dim()}")
    if input.size(1) != w_ih.size(1):
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {w_ih.size(1)}")
    for index, (state, size) in enumerate(((h0, w_hh.size(1)), (c0, w_hh.size(0) // 4))):
        if state.dim() != 2:
            raise RuntimeError(f"lstm_cell: expected hidden{index} of 2 dimensions, got {state.dim()}")
        if input.size(0) != state.size(0):
            raise RuntimeError(
                f"Input batch size {input.size(0)} doesn't match hidden{index} batch size {state.size(0)}"
            )
        if state.size(1) != size:
            raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got {state.size(1)}, expected {size}")


class Route(enum.Enum):
    """Where a call of :func:`lstm` goes: :func:`_route` picks the first row that fits, ``_forward``
    runs it. (``lstm_cell`` sends its plain eager steps to ``lstm_ext._C.lstm_cell``, the rest here.)

    | route | taken when | runs | why |
    | --- | --- | --- | --- |
    | CPP | eager: not compiling or tracing, no functorch transform, no forward-mode dual level, no ``__torch_function__``; not a variant under autocast | ``lstm_ext._C.forward`` (csrc/module.cpp): the operator from C++, autograd its C++ Function, autocast its AutocastCPU kernel | nothing boxed by ``torch.ops``, no autograd bookkeeping in Python: most of a decoding step's cost; that kernel does not cast a variant's optional cell parameters, so a variant under autocast casts in Python below |
    | DIFFERENTIABLE | forward-mode tangents, or a torch.func transform that differentiates (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``vmap(grad)``...) | ``lstm_ext::forward_differentiable`` | ATen ops that every transform knows; under torch.func an autograd.Function's backward sees its saved tensors unwrapped |
    | VMAP | vmap and no other transform | ``lstm_ext::forward`` through the dispatcher | its batching rule (below) folds the mapped dim into the batch: one call, V times the batch |
    | TRACED | ``torch.jit.trace`` | ``lstm_ext::forward`` with a workspace | the graph records the dispatcher op (its autograd is C++), the same in every grad mode: the tracer's check traces again under no_grad, and a traced module may be trained |
    | FUNCTION | a gradient will be needed (compiled, under autocast, with a ``__torch_function__``) | ``_LSTMFunction``: ``lstm_ext::forward`` and ``lstm_ext::backward`` | a fraction of the cost of the autograd wrapper ``torch.library`` would put around the operator; torch.compile traces it |
    | NO_GRAD | otherwise | ``lstm_ext::forward`` below its Autograd key, no workspace | nothing to differentiate: skips the Python wrapper on the Autograd key (see _below_autograd) |
    """

    CPP = "cpp"
    DIFFERENTIABLE = "differentiable"
    VMAP = "vmap"
    TRACED = "traced"
    FUNCTION = "function"
    NO_GRAD = "no_grad"


# The route of every eager call, a decoding step's included, as a global: a member looked up on
# its Enum class costs ~0.1 us (of a ~11 us step).
_CPP = Route.CPP


def _route(cell_args, *tensors) -> Route:
    """The :class:`Route` of a call on these tensors (input, states, weights, cell parameters)."""
    if not (cell_args and _is_autocast_enabled("cpu")) and _runs_in_cpp(*tensors):
        return _CPP
    transform = _transform_of(*tensors)
    if transform is not None:
        return transform
    if torch.jit.is_tracing():
        return Route.TRACED
    if _needs_grad(*tensors):
        return Route.FUNCTION
    return Route.NO_GRAD


def _forward(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional, cell_args=()):
    """The call on its :class:`Route`. cell_args: () for the plain LSTM, else (cell, cell_params,
    recurrent_dropout, zoneout), the forward operator's trailing arguments (see _backward_tail,
    _differentiable_tail)."""
    params = list(params)
    cell_params = cell_args[1] if cell_args else []
    route = _route(cell_args, input, hx, cx, *params, *cell_params)
    if route is _CPP:
        variant = cell_args or ("lstm", [], 0.0, [])
        return _C.forward(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional,
                          *variant)
    _check_tensors(input, batch_sizes, hx, cx, *params, *cell_params)
    if torch.is_autocast_enabled("cpu"):
        input, hx, cx, *cast = _autocast(input, hx, cx, *params, *cell_params)
        params, cell_params = cast[: len(params)], cast[len(params) :]
        cell_args = (cell_args[0], cell_params, *cell_args[2:]) if cell_args else ()
    options = (has_biases, num_layers, float(dropout), train, bidirectional)
    if route is Route.DIFFERENTIABLE:
        args = (input, _as_list(batch_sizes), hx, cx, params, *options, None, *_differentiable_tail(cell_args))
        return _ops.forward_differentiable(*args)
    if route is Route.VMAP:
        need_workspace = torch.is_grad_enabled() and any(
            map(_requires_grad_below_vmap, (input, hx, cx, *params, *cell_params))
        )
        output, hy, cy, _ = _ops.forward(input, batch_sizes, hx, cx, params, *options, need_workspace, *cell_args)
    elif route is Route.TRACED:
        output, hy, cy, _ = _ops.forward(input, batch_sizes, hx, cx, params, *options, True, *cell_args)
    elif route is Route.FUNCTION:
        variant = (cell_args[0], *cell_args[2:]) if cell_args else None
        output, hy, cy, *_workspace = _apply(
            _LSTMFunction, input, batch_sizes, hx, cx, options, variant, len(params), *params, *cell_params
        )
    else:
        args = (input, batch_sizes, hx, cx, params, *options, False, *cell_args)
        output, hy, cy, _ = _below_autograd(_ops.forward, *args)
    return output, hy, cy


def _runs_in_cpp(*tensors) -> bool:
    """Whether an eager call goes straight to ``lstm_ext._C`` (csrc/module.cpp), which calls the
    operator through the dispatcher from C++, autograd included: nothing around the call that this
    module handles itself (a transform, forward-mode AD, tracing, compiling, a ``__torch_function__``).
    Under autocast the operator's AutocastCPU kernel casts through autocast's weight cache: a
    decoding loop casts its weights once, not at every step."""
    return not (
        _is_compiling()
        or _functorch_transforms_active()
        or forward_ad._current_level >= 0
        or _is_tracing()
        or _has_torch_function(tensors)
    )


# _runs_in_cpp's checks, looked up once: it runs on every decoding step. (_is_tracing is
# torch.jit.is_tracing without its TorchScript branch, which an eager caller never takes.)
_is_compiling = torch.compiler.is_compiling
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_is_autocast_enabled = torch.is_autocast_enabled
_is_tracing = torch._C._is_tracing
_has_torch_function = torch._C._has_torch_function


def _check_tensors(input, batch_sizes, *tensors):
    """Input, states and parameters dense on one device (csrc/module.cpp's check_tensors, for the
    calls that do not go there)."""
    if input.device.type not in ("cpu", "meta"):
        raise NotImplementedError(f"lstm_ext runs on CPU only, got input on {input.device}; use torch.nn.LSTM there")
    for tensor in (input, *tensors):
        # One meta tensor among CPU ones would send the call to the shape-only implementation.
        if tensor.device != input.device:
            raise RuntimeError(
                "lstm_ext: input, hidden states and parameters must be on one device, "
                f"got input on {input.device} and a tensor on {tensor.device}"
            )
        if tensor.layout != torch.strided:
            raise RuntimeError(f"lstm_ext: expected dense (strided) tensors, got one with layout {tensor.layout}")
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(f"lstm_ext: batch_sizes must be a CPU tensor, got one on {batch_sizes.device}")



def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _autocast(*tensors):
    """What the operator's AutocastCPU kernel does (dispatch.cpp), done here where autograd records
    the casts: the autograd.Function below calls the operator with its inputs' autograd cut off.
    Native's policy: floating point tensors but float64 in autocast's dtype."""
    dtype = torch.get_autocast_dtype("cpu")
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def _transform_of(*tensors) -> Route | None:
    """The route the autodiff transforms around a call demand: ``Route.VMAP`` (vmap alone),
    ``Route.DIFFERENTIABLE`` (forward-mode tangents, or a torch.func transform that
    differentiates), or None (no transform)."""
    if torch.compiler.is_compiling():
        return None
    # Tangents exist only inside a dual level (torch.func.jvp enters one too): outside, the
    # per-tensor look for them is skipped.
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return Route.DIFFERENTIABLE
    if not torch._C._are_functorch_transforms_active():
        return None
    kinds = {interpreter.key() for interpreter in torch._C._functorch.get_interpreter_stack()}
    return Route.VMAP if kinds == {_TransformType.Vmap} else Route.DIFFERENTIABLE


_TransformType = torch._C._functorch.TransformType


def _requires_grad_below_vmap(tensor):
    """Whether the tensor a vmap wraps requires grad (the wrapper itself never says so)."""
    while torch._C._functorch.is_batchedtensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor.requires_grad


def _as_list(batch_sizes):
    return None if batch_sizes is None else batch_sizes.tolist()


def _below_autograd(op, *args):
    """Calls ``op`` past its Autograd dispatch key, for callers that need no autograd from it.

    lstm_ext::backward's kernel there is the Python wrapper that ``torch.library.register_autograd``
    installs, ~25 us a call even when it only passes the call on: a tenth of a small shape's forward.
    Under torch.compile the call is traced as it is.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---- autograd: the hand-written backward operator ------------------------------------------------


def _apply(function, *args):
    """``function.apply(*args)``, less what ``Function.apply`` does in Python before its C++ base.

    Without functorch transforms (and outside torch.compile, which traces ``apply`` itself) that
    is binding the arguments to ``forward``'s signature for ``setup_context`` (which gets them
    as they are: ``forward`` has no defaults) and unwrapping dead functorch wrappers (kept):
    ~10 us, a third of a decoding step's call.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*torch._functorch.utils.unwrap_dead_wrappers(args))


class _LSTMFunction(torch.autograd.Function):
    """lstm_ext::forward with its backward twin, lstm_ext::backward.

    What ``lstm_ext.lstm`` runs where its call does not go to ``lstm_ext._C`` (compiled, under
    autocast, with a ``__torch_function__``; see _runs_in_cpp): a plain autograd.Function costs a
    fraction of the generic wrapper that ``torch.library.register_autograd`` would put around the
    operator. Eager calls, and callers of ``torch.ops.lstm_ext.forward``, get the same backward
    from the operator's C++ autograd (csrc/dispatch.cpp).
    """

    @staticmethod
    def forward(input, batch_sizes, hx, cx, options, variant, num_params, *params):
        params, cell_args = params[:num_params], _cell_args(variant, params[num_params:])
        args = (input, batch_sizes, hx, cx, params, *options, True, *cell_args)
        output, hy, cy, workspace = _below_autograd(_ops.forward, *args)
        return output, hy, cy, *workspace

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, hx, cx, options, variant, num_params, *params = inputs
        has_biases, num_layers, _dropout, _train, bidirectional = options
        ctx.mark_non_differentiable(*output[3:])
        cell_args = _cell_args(variant, params[num_params:])
        options = (has_biases, num_layers, bidirectional)
        _save_for_backward(ctx, input, batch_sizes, hx, cx, params[:num_params], output[3:], options, cell_args)

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy, *_grad_workspace):
        grad_input, grad_hx, grad_cx, grad_params = _run_backward(ctx, grad_output, grad_hy, grad_cy)
        return grad_input, None, grad_hx, grad_cx, None, None, None, *grad_params


# Function.apply binds each call's arguments to forward's signature (for setup_context), and
# inspect.signature would build that signature again every time: ~30 us, a tenth of a small
# shape's forward. A function's __signature__ is what inspect.signature returns as it is.
_LSTMFunction.forward.__signature__ = inspect.signature(_LSTMFunction.forward)


def _cell_args(variant, cell_params):
    """cell_args from (cell, recurrent_dropout, zoneout) or None, and cell_params."""
    return () if variant is None else (variant[0], list(cell_params), *variant[1:])


def _backward_tail(cell_args):
    """The backward operator's trailing arguments: (cell, cell_params, zoneout)."""
    return (*cell_args[:2], cell_args[3]) if cell_args else ()


def _differentiable_tail(cell_args):
    """forward_differentiable's trailing arguments (no masks to replay: it draws its own)."""
    if not cell_args:
        return ()
    cell, cell_params, recurrent_dropout, zoneout = cell_args
    return cell, cell_params, recurrent_dropout, None, zoneout, None


def _save_for_backward(ctx, input, batch_sizes, hx, cx, params, workspace, options, cell_args):
    # Outputs without a gradient (the workspace always, often h_n and c_n) reach the backward as
    # None, which it reads as zeros, instead of as zero tensors autograd would fill: the
    # workspace alone is several times the size of the output.
    ctx.set_materialize_grads(False)
    cell, cell_params, *dropouts = cell_args or (None, [])
    ctx.num_params = len(params) + len(cell_params)
    ctx.num_cell_params = len(cell_params)
    ctx.options = options
    ctx.variant = None if cell is None else (cell, *dropouts)
    ctx.save_for_backward(input, batch_sizes, hx, cx, *params, *cell_params, *workspace)


def _run_backward(ctx, grad_output, grad_hy, grad_cy):
    input, batch_sizes, hx, cx, *rest = ctx.saved_tensors
    params, workspace = rest[: ctx.num_params], rest[ctx.num_params :]
    native = len(params) - ctx.num_cell_params
    params, cell_args = params[:native], _cell_args(ctx.variant, params[native:])
    if not workspace:
        raise RuntimeError("lstm_ext: the forward saved nothing for backward (it ran with need_workspace=False)")
    grads = (grad_output, grad_hy, grad_cy)
    if torch.is_grad_enabled() or any(_is_batched(g) for g in grads):
        # create_graph (double backward) or batched gradients (is_grads_batched): the
        # hand-written backward has no derivative and no batching rule, so differentiate the
        # differentiable recomputation instead: the C++ one (csrc/dispatch.cpp), as the
        # operator's own autograd does.
        cell, cell_params, recurrent_dropout, zoneout = cell_args or ("lstm", [], 0.0, [])
        grad_input, grad_hx, grad_cx, *grad_params = _C.recomputed_backward(
            [input, hx, cx, *params, *cell_params], len(params), batch_sizes, workspace, *ctx.options, cell,
            recurrent_dropout, zoneout, grads,
        )
        return grad_input, grad_hx, grad_cx, grad_params
    args = (input, batch_sizes, hx, cx, params, workspace, grad_output, grad_hy, grad_cy, *ctx.options)
    args = (*args, *_backward_tail(cell_args))
    grad_input, grad_hx, grad_cx, grad_params = _below_autograd(_ops.backward, *args)
    return grad_input, grad_hx, grad_cx, grad_params


def _is_batched(tensor):
    return (
        tensor is not None
        and not torch.compiler.is_compiling()
        and torch._C._functorch.is_legacy_batchedtensor(tensor)
    )


def _backward_not_differentiable(ctx, *grads):
    raise RuntimeError(
        "lstm_ext::backward is not differentiable: differentiate lstm_ext::forward with create_graph=True, "
        "which recomputes through lstm_ext::forward_differentiable"
    )


torch.library.register_autograd("lstm_ext::backward", _backward_not_differentiable)


# ---- fake implementations: shapes only, for torch.compile and opcheck ---------------------------


@torch.library.register_fake("lstm_ext::forward")
def _forward_fake(
    input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional, need_workspace,
    cell="lstm", cell_params=None, recurrent_dropout=0.0, zoneout=(),
):
    directions = 2 if bidirectional else 1
    hidden, proj = cx.shape[-1], hx.shape[-1]
    output = input.new_empty((*input.shape[:-1], directions * proj))
    workspace = []
    if need_workspace:
        # Its type and shapes from the C++ definition (csrc/ops.h): shape arithmetic only, on
        # symbolic sizes too.
        rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
        dtype, shapes = _C.workspace_layout(
            input.dtype, num_layers, bidirectional, rows, hx.shape[1], hidden, proj, dropout, train,
            recurrent_dropout, list(zoneout), cells.is_layer_normalised(cell),
        )
        workspace = [input.new_empty(shape, dtype=dtype) for shape in shapes]
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), workspace


@torch.library.register_fake("lstm_ext::backward")
def _backward_fake(
    input, batch_sizes, hx, cx, params, workspace, grad_output, grad_hy, grad_cy, has_biases, num_layers, bidirectional,
    cell="lstm", cell_params=None, zoneout=(),
):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(hx, memory_format=torch.contiguous_format),
        torch.empty_like(cx, memory_format=torch.contiguous_format),
        [torch.empty_like(p, memory_format=torch.contiguous_format) for p in (*params, *(cell_params or ()))],
    )


# ---- vmap: the batching rule of the fast operator ---------------------------------------------


@torch.library.register_vmap("lstm_ext::forward")
def _forward_vmap(info, in_dims, input, batch_sizes, hx, cx, params, *options):
    """vmap over inputs and states folds the mapped dim into the batch: one call with a V times
    larger batch, each sequence's V copies side by side, so that packed batch sizes stay sorted
    (V·batch_sizes). Batched weights (an ensemble) or dropout under ``randomness="same"`` run
    the operator once per mapped index."""
    input_dim, _, hx_dim, cx_dim, params_dims, *_ = in_dims
    _, num_layers, dropout, train, *_ = options
    recurrent_dropout = options[8] if len(options) > 8 else 0.0
    zoneout = options[9] if len(options) > 9 else ()
    random = (dropout > 0 and num_layers > 1 or recurrent_dropout > 0 or any(zoneout)) and train
    if random and info.randomness == "error":
        raise RuntimeError(
            "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
            "'different' randomness flags on vmap or perform the randomness operation out of vmap"
        )
    batched_weights = any(dim is not None for dim in (*params_dims, *_cell_params_dims(in_dims)))
    if batched_weights or (random and info.randomness == "same"):
        return _forward_vmap_loop(info, in_dims, input, batch_sizes, hx, cx, params, options, random)
    V, batch = info.batch_size, input.dim() - 2 if input_dim is None else input.dim() - 3  # input's batch dim

    def fold(tensor, dim, batch_dim):
        """The mapped dim (V copies where the tensor has none) moved after batch_dim, merged into it."""
        if dim is None:
            shape = tensor.shape
            tensor = tensor.unsqueeze(batch_dim + 1).expand(*shape[: batch_dim + 1], V, *shape[batch_dim + 1 :])
        else:
            tensor = tensor.movedim(dim, batch_dim + 1)
        return tensor.flatten(batch_dim, batch_dim + 1)

    folded_sizes = None if batch_sizes is None else batch_sizes * V
    output, hy, cy, workspace = _ops.forward(
        fold(input, input_dim, batch), folded_sizes, fold(hx, hx_dim, 1), fold(cx, cx_dim, 1), params, *options
    )
    unfold = lambda tensor, batch_dim: tensor.unflatten(batch_dim, (-1, V))  # noqa: E731
    # The workspace is the folded call's, read only by that call's own backward below vmap.
    return (unfold(output, batch), unfold(hy, 1), unfold(cy, 1), workspace), (batch + 1, 2, 2, [None] * len(workspace))


def _cell_params_dims(in_dims):
    """The in_dims of a call's cell_params, when it has some."""
    return (in_dims[12] or []) if len(in_dims) > 12 else []


def _forward_vmap_loop(info, in_dims, input, batch_sizes, hx, cx, params, options, random):
    input_dim, _, hx_dim, cx_dim, params_dims, *_ = in_dims
    cell_params_dims = _cell_params_dims(in_dims)
    pick = lambda tensor, dim, index: tensor if dim is None else tensor.select(dim, index)  # noqa: E731
    rng_state = torch.get_rng_state() if random else None  # randomness="same": every index draws alike
    results = []
    for index in range(info.batch_size):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        weights = [pick(weight, dim, index) for weight, dim in zip(params, params_dims)]
        index_options = options
        if cell_params_dims:
            cell_weights = [pick(weight, dim, index) for weight, dim in zip(options[7], cell_params_dims)]
            index_options = (*options[:7], cell_weights, *options[8:])
        results.append(
            _ops.forward(
                pick(input, input_dim, index), batch_sizes, pick(hx, hx_dim, index), pick(cx, cx_dim, index),
                weights, *index_options
            )
        )
    output, hy, cy, _ = zip(*results)
    # No workspace: each call's own backward, below vmap, keeps its own; stacking them would copy
    # several times the outputs for nothing to read.
    return (torch.stack(output), torch.stack(hy), torch.stack(cy), []), (0, 0, 0, [])
