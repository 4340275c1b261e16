"""The functional API: ``lstm`` (both overloads of ``torch._VF.lstm``) and ``lstm_cell``.

The C++ operators do the work (with their autograd and autocast kernels, csrc/dispatch.cpp); this
module only adapts arguments, runs a leaner autograd.Function around them, and wires the fake
(shape-only) implementations through ``torch.library``, so autograd, ``torch.compile`` and
``torch.library.opcheck`` see ordinary dispatcher ops.
"""

import inspect
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

_ops = torch.ops.lstm_ext


def lstm(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """Drop-in for ``torch._VF.lstm``, with the same two overloads.

    Dense: ``lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``.
    Packed: ``lstm(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)``.
    Returns ``(output, h_n, c_n)``.
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch._VF.lstm`` on a padded ``[T, B, I]`` (or ``[B, T, I]``) input."""
    h0, c0 = _unpack_hidden(hx)
    if batch_first:
        if input.dim() != 3:
            raise RuntimeError(f"lstm_ext: expected 3-D [B, T, I] input with batch_first=True, got {input.dim()}-D")
        input = input.transpose(0, 1)
    output, hy, cy = _forward(input, None, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional)
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch._VF.lstm`` on packed data ``[N, I]`` with ``batch_sizes`` (as in ``PackedSequence``)."""
    h0, c0 = _unpack_hidden(hx)
    return _forward(data, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional)


def lstm_cell(
    input: Tensor,
    hx: Sequence[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop-in for ``torch.lstm_cell``: one step on ``[B, I]``, returns ``(h_1, c_1)``."""
    h0, c0 = _unpack_hidden(hx, "lstm_cell")
    has_biases = b_ih is not None
    if has_biases != (b_hh is not None):
        raise RuntimeError("lstm_ext.lstm_cell: b_ih and b_hh must both be given or both be None")
    params = [w_ih, w_hh, b_ih, b_hh] if has_biases else [w_ih, w_hh]
    try:
        _, hy, cy = _forward(input.unsqueeze(0), None, h0.unsqueeze(0), c0.unsqueeze(0), params, has_biases, 1, 0.0,
                             False, False)
    except RuntimeError:
        # The operator checks every shape; ATen's messages for the cell come from the checks here,
        # run only when it failed: they cost a decoding step ~10% of its time.
        _check_cell_args(input, h0, c0, w_ih, w_hh)
        raise
    if torch.is_autocast_enabled("cpu"):
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


def _forward(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional):
    params = list(params)
    if input.device.type not in ("cpu", "meta"):
        raise NotImplementedError(f"lstm_ext runs on CPU only, got input on {input.device}; use torch.nn.LSTM there")
    for tensor in (input, hx, cx, *params):
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
    if torch.is_autocast_enabled("cpu"):
        input, hx, cx, *params = _autocast(input, hx, cx, *params)
    options = (has_biases, num_layers, float(dropout), train, bidirectional)
    transform = _transform_of(input, hx, cx, *params)
    if transform == "differentiable":
        return _ops.forward_differentiable(input, _as_list(batch_sizes), hx, cx, params, *options, None)
    if transform == "vmap":
        # Through the dispatcher, to the batching rule registered below.
        need_workspace = torch.is_grad_enabled() and any(map(_requires_grad_below_vmap, (input, hx, cx, *params)))
        output, hy, cy, _ = _ops.forward(input, batch_sizes, hx, cx, params, *options, need_workspace)
        return output, hy, cy
    if torch.jit.is_tracing():
        # The graph records the dispatcher op (its autograd is C++), not a Python
        # autograd.Function it could not save, and the same op whatever the grad mode:
        # the tracer's check traces again under no_grad, and the traced module may be trained.
        output, hy, cy, _ = _ops.forward(input, batch_sizes, hx, cx, params, *options, True)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (input, hx, cx, *params)):
        output, hy, cy, *_workspace = _apply(_LSTMFunction, input, batch_sizes, hx, cx, options, *params)
    else:
        output, hy, cy, _ = _below_autograd(_ops.forward, input, batch_sizes, hx, cx, params, *options, False)
    return output, hy, cy


def _autocast(*tensors):
    """What the operator's AutocastCPU kernel does (dispatch.cpp), done here where autograd records
    the casts: the autograd.Function below calls the operator with its inputs' autograd cut off.
    Native's policy: floating point tensors but float64 in autocast's dtype."""
    dtype = torch.get_autocast_dtype("cpu")
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def _transform_of(*tensors) -> str | None:
    """How a call must run under the autodiff transforms around it.

    ``None``: the fast operator with its hand-written backward (no transform).
    ``"vmap"``: only vmap; the operator's batching rule folds the mapped dim into the batch.
    ``"differentiable"``: forward-mode AD or any torch.func transform that differentiates
    (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap(grad)``...):
    lstm_ext::forward_differentiable, ATen ops that every transform knows. (Under torch.func
    an autograd.Function's backward sees its saved tensors unwrapped, so a recomputation
    there could not carry the transform's derivatives.)
    """
    if torch.compiler.is_compiling():
        return None
    # Tangents exist only inside a dual level (torch.func.jvp enters one too): outside, the
    # per-tensor look for them is skipped.
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return "differentiable"
    if not torch._C._are_functorch_transforms_active():
        return None
    kinds = {interpreter.key() for interpreter in torch._C._functorch.get_interpreter_stack()}
    return "vmap" if kinds == {_TransformType.Vmap} else "differentiable"


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

    What ``lstm_ext.lstm`` runs: a plain autograd.Function costs a fraction of the generic
    wrapper that ``torch.library.register_autograd`` would put around the operator. Callers of
    ``torch.ops.lstm_ext.forward`` get the same backward from the operator's C++ autograd.
    """

    @staticmethod
    def forward(input, batch_sizes, hx, cx, options, *params):
        output, hy, cy, workspace = _below_autograd(_ops.forward, input, batch_sizes, hx, cx, params, *options, True)
        return output, hy, cy, *workspace

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, hx, cx, (has_biases, num_layers, _dropout, _train, bidirectional), *params = inputs
        ctx.mark_non_differentiable(*output[3:])
        _save_for_backward(ctx, input, batch_sizes, hx, cx, params, output[3:], (has_biases, num_layers, bidirectional))

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy, *_grad_workspace):
        grad_input, grad_hx, grad_cx, grad_params = _run_backward(ctx, grad_output, grad_hy, grad_cy)
        return grad_input, None, grad_hx, grad_cx, None, *grad_params


# Function.apply binds each call's arguments to forward's signature (for setup_context), and
# inspect.signature would build that signature again every time: ~30 us, a tenth of a small
# shape's forward. A function's __signature__ is what inspect.signature returns as it is.
_LSTMFunction.forward.__signature__ = inspect.signature(_LSTMFunction.forward)


def _save_for_backward(ctx, input, batch_sizes, hx, cx, params, workspace, options):
    # Outputs without a gradient (the workspace always, often h_n and c_n) reach the backward as
    # None, which it reads as zeros, instead of as zero tensors autograd would fill: the
    # workspace alone is several times the size of the output.
    ctx.set_materialize_grads(False)
    ctx.num_params = len(params)
    ctx.options = options
    ctx.save_for_backward(input, batch_sizes, hx, cx, *params, *workspace)


def _run_backward(ctx, grad_output, grad_hy, grad_cy):
    input, batch_sizes, hx, cx, *rest = ctx.saved_tensors
    params, workspace = rest[: ctx.num_params], rest[ctx.num_params :]
    if not workspace:
        raise RuntimeError("lstm_ext: the forward saved nothing for backward (it ran with need_workspace=False)")
    grads = (grad_output, grad_hy, grad_cy)
    if torch.is_grad_enabled() or any(_is_batched(g) for g in grads):
        # create_graph (double backward) or batched gradients (is_grads_batched): the
        # hand-written backward has no derivative and no batching rule, so differentiate the
        # differentiable recomputation instead.
        return _recomputed_backward(input, batch_sizes, hx, cx, params, workspace[-1], ctx.options, grads)
    args = (input, batch_sizes, hx, cx, params, workspace, grad_output, grad_hy, grad_cy, *ctx.options)
    grad_input, grad_hx, grad_cx, grad_params = _below_autograd(_ops.backward, *args)
    return grad_input, grad_hx, grad_cx, grad_params


def _is_batched(tensor):
    return (
        tensor is not None
        and not torch.compiler.is_compiling()
        and torch._C._functorch.is_legacy_batchedtensor(tensor)
    )


def _recomputed_backward(input, batch_sizes, hx, cx, params, dropout_masks, options, grads):
    """The backward as autograd through lstm_ext::forward_differentiable, replaying the forward's
    dropout masks: differentiable itself when grad mode is on (create_graph)."""
    has_biases, num_layers, bidirectional = options
    with torch.enable_grad():
        outputs = _ops.forward_differentiable(
            input, _as_list(batch_sizes), hx, cx, params, has_biases, num_layers, 0.0, False, bidirectional,
            dropout_masks,
        )
    used = [(output, grad) for output, grad in zip(outputs, grads) if grad is not None]
    leaves = (input, hx, cx, *params)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    found = iter(
        torch.autograd.grad(
            [output for output, _ in used],
            wanted,
            [grad for _, grad in used],
            create_graph=torch.is_grad_enabled(),
            allow_unused=True,
        )
        if used and wanted
        else [None] * len(wanted)
    )
    grad_input, grad_hx, grad_cx, *grad_params = [next(found) if leaf.requires_grad else None for leaf in leaves]
    return grad_input, grad_hx, grad_cx, grad_params


def _backward_not_differentiable(ctx, *grads):
    raise RuntimeError(
        "lstm_ext::backward is not differentiable: differentiate lstm_ext::forward with create_graph=True, "
        "which recomputes through lstm_ext::forward_differentiable"
    )


torch.library.register_autograd("lstm_ext::backward", _backward_not_differentiable)


# ---- fake implementations: shapes only, for torch.compile and opcheck ---------------------------


@torch.library.register_fake("lstm_ext::forward")
def _forward_fake(input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional, need_workspace):
    directions = 2 if bidirectional else 1
    hidden, proj = cx.shape[-1], hx.shape[-1]
    output = input.new_empty((*input.shape[:-1], directions * proj))
    workspace = []
    if need_workspace:
        rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
        cells, between, width = num_layers * directions, num_layers - 1, directions * proj
        with_dropout = dropout > 0 and train and num_layers > 1
        workspace = [
            input.new_empty((cells, rows, 4 * hidden)),
            input.new_empty((cells, rows, hidden)),
            input.new_empty((cells, rows, hidden)),
            input.new_empty((cells, rows, proj)),
            input.new_empty((between, rows, width)),
            input.new_empty((between, rows, width) if with_dropout else (0,)),
        ]
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), workspace


@torch.library.register_fake("lstm_ext::backward")
def _backward_fake(input, batch_sizes, hx, cx, params, workspace, grad_output, grad_hy, grad_cy, has_biases, num_layers, bidirectional):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(hx, memory_format=torch.contiguous_format),
        torch.empty_like(cx, memory_format=torch.contiguous_format),
        [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params],
    )


# ---- vmap: the batching rule of the fast operator ---------------------------------------------


@torch.library.register_vmap("lstm_ext::forward")
def _forward_vmap(info, in_dims, input, batch_sizes, hx, cx, params, *options):
    """vmap over inputs and states folds the mapped dim into the batch: one call with a V times
    larger batch, each sequence's V copies side by side, so that packed batch sizes stay sorted
    (V·batch_sizes). Batched weights (an ensemble) or dropout under ``randomness="same"`` run
    the operator once per mapped index."""
    input_dim, _, hx_dim, cx_dim, params_dims, *_ = in_dims
    has_biases, num_layers, dropout, train, bidirectional, need_workspace = options
    random = dropout > 0 and train and num_layers > 1
    if random and info.randomness == "error":
        raise RuntimeError(
            "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
            "'different' randomness flags on vmap or perform the randomness operation out of vmap"
        )
    if any(dim is not None for dim in params_dims) or (random and info.randomness == "same"):
        return _forward_vmap_loop(info, in_dims, input, batch_sizes, hx, cx, params, options, random)
    V, batch = info.batch_size, input.dim() - 2 if input_dim is None else input.dim() - 3  # input's batch dim

    def fold(tensor, dim, batch_dim):
        tensor = tensor.unsqueeze(batch_dim + 1).expand(
            *tensor.shape[: batch_dim + 1], V, *tensor.shape[batch_dim + 1 :]
        ) if dim is None else tensor.movedim(dim, batch_dim + 1)
        return tensor.flatten(batch_dim, batch_dim + 1)

    folded_sizes = None if batch_sizes is None else batch_sizes * V
    output, hy, cy, workspace = _ops.forward(
        fold(input, input_dim, batch), folded_sizes, fold(hx, hx_dim, 1), fold(cx, cx_dim, 1), params, *options
    )
    unfold = lambda tensor, batch_dim: tensor.unflatten(batch_dim, (-1, V))  # noqa: E731
    # The workspace is the folded call's, read only by that call's own backward below vmap.
    return (unfold(output, batch), unfold(hy, 1), unfold(cy, 1), workspace), (batch + 1, 2, 2, [None] * len(workspace))


def _forward_vmap_loop(info, in_dims, input, batch_sizes, hx, cx, params, options, random):
    input_dim, _, hx_dim, cx_dim, params_dims, *_ = in_dims
    pick = lambda tensor, dim, index: tensor if dim is None else tensor.select(dim, index)  # noqa: E731
    rng_state = torch.get_rng_state() if random else None  # randomness="same": every index draws alike
    results = []
    for index in range(info.batch_size):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        weights = [pick(weight, dim, index) for weight, dim in zip(params, params_dims)]
        results.append(
            _ops.forward(
                pick(input, input_dim, index), batch_sizes, pick(hx, hx_dim, index), pick(cx, cx_dim, index),
                weights, *options
            )
        )
    output, hy, cy, workspace = zip(*results)
    stacked_workspace = [torch.stack(parts) for parts in zip(*workspace)]
    return (torch.stack(output), torch.stack(hy), torch.stack(cy), stacked_workspace), (
        0, 0, 0, [0] * len(stacked_workspace)
    )
