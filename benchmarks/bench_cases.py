"""Shapes, seeded problems, contenders and correctness checks for bench.py.

A *problem* is one shape materialised with seeded tensors (input, initial
state, flat LSTM weights, loss weights). A *contender* turns a problem into a
`Call`: a zero-argument forward closure plus the leaves gradients are taken
for. Training-mode calls get freshly cloned leaves every time, so no contender
can reuse anything (e.g. packed weights) computed for another call.
"""

import contextlib
import math
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import pack_padded_sequence

# bfloat16 and float16 against native in the same dtype: a few roundings of an 8 (11) bit mantissa apart.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "bfloat16": 5e-2, "float16": 1e-2}
# Reduced-precision rows: every contender is compared with native float32 on the same (rounded) values.
REDUCED = ("bfloat16", "float16")
# What native's oneDNN raises for an LSTM it has no kernel for (bfloat16/float16 on CPUs without AVX-512 BF16/FP16).
ONEDNN_REFUSAL = "could not create a primitive descriptor"


@dataclass(frozen=True)
class Shape:
    """One benchmark shape; input is time-major (T, B, I)."""

    name: str
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    dtype: str = "float32"
    cell_loop: bool = False  # also time the hand-written nn.LSTMCell loop

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def describe(self) -> str:
        text = f"T{self.T} B{self.B} I{self.I} H{self.H}"
        if self.layers > 1:
            text += f" L{self.layers}"
        if self.bidirectional:
            text += " bi"
        if self.packed:
            text += " packed"
        return text


@dataclass
class Problem:
    """Seeded tensors for one shape, shared read-only by every contender."""

    shape: Shape
    x: Tensor  # (T, B, I) padded input, or (tokens, I) packed data
    batch_sizes: Tensor | None  # None for padded input
    h0: Tensor
    c0: Tensor
    weights: list
    weight_names: list
    loss_weights: tuple  # multipliers for (output, h_n, c_n)

    @property
    def tokens(self) -> int:
        return self.x.shape[0] if self.batch_sizes is not None else self.shape.T * self.shape.B

    @cached_property
    def float32(self) -> "Problem":
        """The same values widened to float32 (exactly: the bfloat16/float16-rounded weights and inputs)."""
        wide = lambda t: t.float()  # noqa: E731
        return replace(self, shape=replace(self.shape, dtype="float32"), x=wide(self.x), h0=wide(self.h0),
                       c0=wide(self.c0), weights=[wide(w) for w in self.weights],
                       loss_weights=tuple(map(wide, self.loss_weights)))


@dataclass
class Call:
    """A ready-to-run forward pass and the leaves to differentiate."""

    forward: Callable[[], tuple]
    leaves: list
    loss_weights: tuple | None = None  # the problem's, unless the call runs on other values (Widened)


def make_problem(shape: Shape, seed: int = 0) -> Problem:
    """Build the seeded input, state, weights and loss weights for `shape`."""
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    module = nn.LSTM(shape.I, shape.H, shape.layers, bidirectional=shape.bidirectional, dtype=dtype)
    state_shape = (shape.layers * shape.directions, shape.B, shape.H)
    x = torch.randn(shape.T, shape.B, shape.I, dtype=dtype)
    batch_sizes = None
    if shape.packed:
        x, batch_sizes = pack_padded_sequence(x, packed_lengths(shape))[:2]
    out_shape = (*x.shape[:-1], shape.directions * shape.H)
    return Problem(
        shape=shape,
        x=x,
        batch_sizes=batch_sizes,
        h0=torch.randn(state_shape, dtype=dtype),
        c0=torch.randn(state_shape, dtype=dtype),
        weights=[w.detach() for w in module._flat_weights],
        weight_names=list(module._flat_weights_names),
        loss_weights=tuple(torch.randn(s, dtype=dtype) for s in (out_shape, state_shape, state_shape)),
    )


def packed_lengths(shape: Shape) -> Tensor:
    """Sequence lengths uniform in [T/4, T], sorted descending; the longest is pinned to T."""
    lengths = torch.randint(math.ceil(shape.T / 4), shape.T + 1, (shape.B,))
    lengths = lengths.sort(descending=True).values
    lengths[0] = shape.T
    return lengths


def forward_flops(shape: Shape, tokens: int) -> int:
    """GEMM flops of one forward pass: 2*4H*(in+H) per token, layer and direction."""
    flops, in_size = 0, shape.I
    for _ in range(shape.layers):
        flops += shape.directions * tokens * 2 * 4 * shape.H * (in_size + shape.H)
        in_size = shape.directions * shape.H
    return flops


class Contender:
    """Something that computes torch._VF.lstm's result for a problem."""

    name = ""

    def applies(self, shape: Shape) -> bool:
        return True

    def context(self):
        """Context entered around a batch of timed calls (not per call)."""
        return contextlib.nullcontext()

    def make_call(self, problem: Problem, train: bool) -> Call:
        raise NotImplementedError


class FunctionalLSTM(Contender):
    """A function with torch._VF.lstm's signature (dense and packed overloads)."""

    def __init__(self, name: str, lstm: Callable, mkldnn: bool = True):
        self.name = name
        self.lstm = lstm
        self.mkldnn = mkldnn

    def context(self):
        if self.mkldnn:
            return contextlib.nullcontext()
        return torch.backends.mkldnn.flags(enabled=False)

    def make_call(self, problem: Problem, train: bool) -> Call:
        s = problem.shape
        x, weights = problem.x, problem.weights
        if train:
            x = x.clone().requires_grad_()
            weights = [w.clone().requires_grad_() for w in weights]
        hx = (problem.h0, problem.c0)
        if problem.batch_sizes is None:
            args = (x, hx, weights, True, s.layers, 0.0, train, s.bidirectional, False)
        else:
            args = (x, problem.batch_sizes, hx, weights, True, s.layers, 0.0, train, s.bidirectional)
        return Call(lambda: self.lstm(*args), [x, *weights])


class CellLoop(Contender):
    """The Python loop over nn.LSTMCell that people write by hand (padded input only)."""

    name = "cell_loop"

    def applies(self, shape: Shape) -> bool:
        return shape.cell_loop and not shape.packed

    def make_call(self, problem: Problem, train: bool) -> Call:
        s = problem.shape
        x = problem.x.clone().requires_grad_() if train else problem.x
        cells = []
        for k in range(s.layers * s.directions):
            in_size = s.I if k < s.directions else s.directions * s.H
            cells.append(make_cell(in_size, s.H, problem.weights[4 * k:4 * k + 4], train))
        leaves = [x] + [p for cell in cells for p in cell.parameters()]
        return Call(lambda: cell_loop(x, problem.h0, problem.c0, cells, s), leaves)


class Widened(Contender):
    """A contender run on the reduced-precision problem's values widened to float32 (reduced rows only):
    "lstm_ext float32 on the same values", whose time over lstm_ext's in the reduced dtype is the cost or
    gain of the narrow type."""

    def __init__(self, name: str, inner: Contender):
        self.name = name
        self.inner = inner

    def applies(self, shape: Shape) -> bool:
        return shape.dtype in REDUCED and self.inner.applies(shape)

    def context(self):
        return self.inner.context()

    def make_call(self, problem: Problem, train: bool) -> Call:
        wide = problem.float32
        call = self.inner.make_call(wide, train)
        return replace(call, loss_weights=wide.loss_weights)


REFUSED = "oneDNN refused: ATen loop"


def engine_of(run: Callable[[], object], other: str = "ATen loop") -> tuple:
    """(mkldnn, label): how native ran in `run()`, which calls it once as by default.

    `run()` runs under the legacy autograd profiler: "oneDNN" if it called aten::mkldnn_rnn_layer,
    else `other` (ATen picks its own loop for float64, packed input, and bfloat16/float16 where
    oneDNN has no kernel for them). Where oneDNN raises instead (ONEDNN_REFUSAL), native is to run
    its ATen loop with oneDNN switched off: (False, REFUSED).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.profiler_legacy.profile() as prof:
                run()
    except RuntimeError as exc:
        if ONEDNN_REFUSAL not in str(exc):
            raise
        return False, REFUSED
    ran = {event.name for event in prof.function_events}
    return True, "oneDNN" if any(name.startswith("aten::mkldnn_rnn") for name in ran) else other


def native_engine(problem: Problem, train: bool) -> tuple:
    """engine_of native torch._VF.lstm on `problem`."""
    call = FunctionalLSTM("native_default", _VF.lstm).make_call(problem, train)

    def run():
        with torch.inference_mode(not train):
            step(call, train, problem.loss_weights)

    return engine_of(run)


def make_cell(in_size: int, hidden: int, weights: list, requires_grad: bool) -> nn.LSTMCell:
    """An nn.LSTMCell holding copies of (w_ih, w_hh, b_ih, b_hh)."""
    cell = nn.utils.skip_init(nn.LSTMCell, in_size, hidden, dtype=weights[0].dtype)
    with torch.no_grad():
        for param, w in zip(cell.parameters(), weights):
            param.copy_(w)
    return cell.requires_grad_(requires_grad)


def cell_loop(x: Tensor, h0: Tensor, c0: Tensor, cells: list, s: Shape) -> tuple:
    """Run stacked (bi)directional LSTM layers step by step with nn.LSTMCell."""
    h_n, c_n = [], []
    for layer in range(s.layers):
        outputs = []
        for direction in range(s.directions):
            k = layer * s.directions + direction
            h, c = h0[k], c0[k]
            steps = range(s.T) if direction == 0 else reversed(range(s.T))
            ys = [None] * s.T
            for t in steps:
                h, c = cells[k](x[t], (h, c))
                ys[t] = h
            outputs.append(torch.stack(ys))
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return x, torch.stack(h_n), torch.stack(c_n)


def make_contenders(ext_lstm: Callable) -> list:
    """lstm_ext first (the reference for ratios), then native default, ATen loop, cell loop, and on
    reduced-precision rows lstm_ext on the values widened to float32."""
    ext = FunctionalLSTM("lstm_ext", ext_lstm)
    return [
        ext,
        FunctionalLSTM("native_default", _VF.lstm),
        FunctionalLSTM("aten_loop", _VF.lstm, mkldnn=False),
        CellLoop(),
        Widened("lstm_ext_f32", ext),
    ]


def step(call: Call, train: bool, loss_weights: tuple) -> list:
    """One forward (inference) or forward + backward (training) pass.

    Returns the outputs, followed by the leaf gradients when training.
    """
    outputs = call.forward()
    if not train:
        return list(outputs)
    if call.loss_weights is not None:
        loss_weights = call.loss_weights
    loss = sum((out * w).sum() for out, w in zip(outputs, loss_weights))
    grads = torch.autograd.grad(loss, call.leaves)
    return [out.detach() for out in outputs] + list(grads)


def result_names(problem: Problem, train: bool) -> list:
    names = ["output", "h_n", "c_n"]
    if train:
        names += ["grad_input"] + [f"grad_{n}" for n in problem.weight_names]
    return names


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max|actual - expected| / max|expected|; inf on shape mismatch or non-finite values."""
    if actual.shape != expected.shape:
        return math.inf
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    err /= max(scale, torch.finfo(expected.dtype).tiny)
    return err if math.isfinite(err) else math.inf


def compare(names: list, actual: list, expected: list) -> tuple:
    """Worst relative error over all results and the name of the worst result."""
    if len(actual) != len(expected):
        return math.inf, f"{len(actual)} results instead of {len(expected)}"
    errors = [(relative_error(a, e), n) for n, a, e in zip(names, actual, expected)]
    return max(errors, key=lambda pair: pair[0])
