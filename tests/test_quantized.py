"""lstm_ext.quantize_dynamic and lstm_ext.quantized.LSTM / LSTMCell (issue 26).

Two oracles:

(a) the LSTM's math, a plain PyTorch loop in float64 (``reference``), on the weights the quantized
    module stands for: q·scale for int8, the float16 weights as floats. lstm_ext's output must
    match it closely: float16 weights to ~1e-5 (float32 arithmetic); int8 within a tolerance that
    allows the kernel to quantize its activations too (see ``check_int8``).
(b) the float model: lstm_ext's error against float32 is at most 1.5x the error of torch's own
    dynamic quantization (``torch.ao.quantization.quantize_dynamic``) on the same model and inputs.

Every test skips while the operator ``lstm_ext::quantized_forward`` is not in the build.
"""

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_ext
from lstm_ext import quantized

if not hasattr(torch.ops.lstm_ext, "quantized_forward"):
    pytest.skip(
        "lstm_ext::quantized_forward is not in this build of lstm_ext._C yet (issue 26's C++ operator)",
        allow_module_level=True,
    )

DTYPES = [torch.qint8, torch.float16]
INPUT, HIDDEN, PROJ, STEPS, BATCH = 5, 8, 3, 6, 4
LENGTHS_SORTED = [6, 5, 3, 1]
LENGTHS_UNSORTED = [3, 6, 1, 5]


def dtype_id(dtype):
    return "int8" if dtype == torch.qint8 else "fp16"


def float_lstm(seed=0, **options):
    torch.manual_seed(seed)
    module = nn.LSTM(options.pop("input_size", INPUT), options.pop("hidden_size", HIDDEN), **options)
    with torch.no_grad():  # biases larger than nn.LSTM's default draw, so that a dropped bias shows
        for name, p in module.named_parameters():
            if name.startswith("bias"):
                p.uniform_(-0.5, 0.5)
    return module


def float_cell(seed=0, bias=True, input_size=INPUT, hidden_size=HIDDEN):
    torch.manual_seed(seed)
    return nn.LSTMCell(input_size, hidden_size, bias=bias)


# ---- oracle (a): the LSTM's math in float64 on the dequantized weights -------------------------


def dequantized(module):
    """{name: float64 weight}: what the quantized module's weights stand for (from its state_dict)."""
    state = module.state_dict()
    weights = {}
    for name, value in state.items():
        if name.endswith("_scale"):
            continue
        value = value.double()
        if name + "_scale" in state:
            value = value * state[name + "_scale"].double()[:, None]
        weights[name] = value
    return weights


def reference_sequence(weights, num_layers, bidirectional, x, h0, c0):
    """One sequence x [L, I] from states h0 [layers·D, P], c0 [layers·D, H]: (out [L, D·P], h_n, c_n)."""
    directions = 2 if bidirectional else 1
    layer_input, h_n, c_n = x, [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = weights["weight_ih" + suffix], weights["weight_hh" + suffix]
            bias = weights["bias_ih" + suffix] + weights["bias_hh" + suffix] if "bias_ih" + suffix in weights else 0
            w_hr = weights.get("weight_hr" + suffix)
            h, c = h0[layer * directions + direction], c0[layer * directions + direction]
            steps = range(len(x) - 1, -1, -1) if direction else range(len(x))
            out = [None] * len(x)
            for t in steps:
                i, f, g, o = (layer_input[t] @ w_ih.T + h @ w_hh.T + bias).chunk(4)
                c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                h = o.sigmoid() * c.tanh()
                if w_hr is not None:
                    h = h @ w_hr.T
                out[t] = h
            outputs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=-1)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def reference(module, sequences, h0, c0):
    """Per sequence (output [L_b, D·P]) and the final states [layers·D, B, *], in float64."""
    weights = dequantized(module)
    layers, bidirectional = getattr(module, "num_layers", 1), getattr(module, "bidirectional", False)
    results = [
        reference_sequence(weights, layers, bidirectional, x.double(), h0[:, b].double(), c0[:, b].double())
        for b, x in enumerate(sequences)
    ]
    return [r[0] for r in results], torch.stack([r[1] for r in results], 1), torch.stack([r[2] for r in results], 1)


def check_int8(actual, expected, what=""):
    """int8 weights: the operator may also quantize its activations dynamically (the inputs of each
    product: x_t, h_t), to 8 bits per row, symmetric: each value then moves by at most half a step,
    max|row| / 254 (0.4% of the row's largest value). A gate pre-activation sums K such products
    with errors of random sign, with |w| <= ~1/sqrt(H) here, so its error is ~0.4%·sqrt(K/H)·max|a|
    ~ 1e-3, and sigmoid / tanh (slope <= 1) and the cell's contracting update (f < 1) keep the
    states' error of that order over the steps. Max error: 2e-2 of the larger of 1 and the
    reference's magnitude (10x headroom); mean error 4x smaller. A misplaced scale (per column,
    transposed, a missing bias, a wrong gate) moves outputs by 0.1-1."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    magnitude = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs()
    assert error.max().item() <= 2e-2 * magnitude, f"{what}: max error {error.max().item():.3g}"
    assert error.mean().item() <= 5e-3 * magnitude, f"{what}: mean error {error.mean().item():.3g}"


def check(actual, expected, dtype, what=""):
    if dtype == torch.qint8:
        check_int8(actual, expected, what)
    else:  # float16 weights, float32 arithmetic against float64: float32 rounding only
        torch.testing.assert_close(actual.double(), expected.double(), atol=1e-5, rtol=1e-5, msg=what)


# ---- running a module on one kind of input, in one uniform form ---------------------------------

MODES = ["dense", "dense_hx", "unbatched", "unbatched_hx", "packed_sorted", "packed_unsorted", "packed_unsorted_hx"]


def make_inputs(mode, module, seed=1, steps=STEPS, batch=BATCH):
    """(sequences [B of [L_b, I]], h0 [layers·D, B, P], c0 [layers·D, B, H], hx given or not)."""
    torch.manual_seed(seed)
    directions = 2 if module.bidirectional else 1
    states = module.num_layers * directions
    real = module.proj_size or module.hidden_size
    if mode.startswith("unbatched"):
        batch = 1
    lengths = (
        LENGTHS_SORTED if mode.startswith("packed_sorted") else LENGTHS_UNSORTED if mode.startswith("packed") else None
    )
    lengths = lengths or [steps] * batch
    sequences = [torch.randn(length, module.input_size) for length in lengths]
    given = mode.endswith("_hx")
    h0 = torch.randn(states, len(lengths), real) * 0.5 if given else torch.zeros(states, len(lengths), real)
    c0 = torch.randn(states, len(lengths), module.hidden_size) if given else torch.zeros(states, len(lengths),
                                                                                         module.hidden_size)
    return sequences, h0, c0, given


def run(module, mode, sequences, h0, c0, given):
    """The module on ``sequences`` in ``mode``: (per-sequence outputs, h_n [layers·D, B, P], c_n)."""
    padded = nn.utils.rnn.pad_sequence(sequences)  # [T, B, I]
    hx = (h0, c0) if given else None
    if mode.startswith("packed"):
        lengths = torch.tensor([len(s) for s in sequences])
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=mode.startswith("packed_sorted"))
        output, (h_n, c_n) = module(packed, hx)
        assert isinstance(output, PackedSequence)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            got, want = getattr(output, name), getattr(packed, name)
            assert (got is None and want is None) or torch.equal(got, want), name
        unpacked, out_lengths = pad_packed_sequence(output)
        assert torch.equal(out_lengths, lengths)
        return [unpacked[: len(s), b] for b, s in enumerate(sequences)], h_n, c_n
    if mode.startswith("unbatched"):
        x = sequences[0]
        output, (h_n, c_n) = module(x, (h0[:, 0], c0[:, 0]) if given else None)
        assert output.dim() == 2 and h_n.dim() == 2 and c_n.dim() == 2
        return [output], h_n.unsqueeze(1), c_n.unsqueeze(1)
    x = padded.transpose(0, 1) if module.batch_first else padded
    output, (h_n, c_n) = module(x, hx)
    if module.batch_first:
        output = output.transpose(0, 1)
    return [output[:, b] for b in range(len(sequences))], h_n, c_n


def check_against_reference(qmodule, mode, dtype, seed=1):
    sequences, h0, c0, given = make_inputs(mode, qmodule, seed)
    with torch.no_grad():
        outputs, h_n, c_n = run(qmodule, mode, sequences, h0, c0, given)
    expected, h_ref, c_ref = reference(qmodule, sequences, h0, c0)
    assert all(o.dtype == torch.float32 for o in (*outputs, h_n, c_n))
    directions = 2 if qmodule.bidirectional else 1
    real = qmodule.proj_size or qmodule.hidden_size
    assert h_n.shape == (qmodule.num_layers * directions, len(sequences), real)
    assert c_n.shape == (qmodule.num_layers * directions, len(sequences), qmodule.hidden_size)
    for b, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        check(got, want, dtype, f"output of sequence {b}")
    check(h_n, h_ref, dtype, "h_n")
    check(c_n, c_ref, dtype, "c_n")


# ---- oracle (a): every structural option, every kind of input ------------------------------------

STRUCTURES = [
    dict(num_layers=layers, bidirectional=bidirectional, bias=bias, proj_size=proj, batch_first=batch_first)
    for layers, bidirectional, bias, proj, batch_first in itertools.product(
        (1, 2), (False, True), (True, False), (0, PROJ), (False, True)
    )
]


def structure_id(options):
    return "-".join(
        [f"L{options['num_layers']}", "bi" if options["bidirectional"] else "uni"]
        + (["nobias"] if not options["bias"] else [])
        + ([f"proj{options['proj_size']}"] if options["proj_size"] else [])
        + (["batch_first"] if options["batch_first"] else [])
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", STRUCTURES, ids=structure_id)
def test_structures_match_the_math(options, dtype):
    qmodule = lstm_ext.quantize_dynamic(float_lstm(**options), dtype)
    assert isinstance(qmodule, quantized.LSTM)
    check_against_reference(qmodule, "dense_hx", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(num_layers=2, bidirectional=True, proj_size=PROJ), dict(bias=False, batch_first=True)],
    ids=["plain", "L2-bi-proj", "nobias-batch_first"],
)
def test_inputs_match_the_math(options, mode, dtype):
    qmodule = lstm_ext.quantize_dynamic(float_lstm(**options), dtype)
    check_against_reference(qmodule, mode, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, proj_size=PROJ)], ids=["plain", "L2-proj"])
def test_steps_of_one(options, dtype):
    """A decoder's loop: T=1 calls carrying (h, c), against the whole sequence's math."""
    qmodule = lstm_ext.quantize_dynamic(float_lstm(**options), dtype)
    sequences, h0, c0, _ = make_inputs("dense_hx", qmodule)
    x = torch.stack(sequences, 1)  # [T, B, I]
    state, outputs = (h0, c0), []
    with torch.no_grad():
        for t in range(len(x)):
            output, state = qmodule(x[t : t + 1], state)
            assert output.shape[0] == 1
            outputs.append(output[0])
    expected, h_ref, c_ref = reference(qmodule, sequences, h0, c0)
    for b in range(x.shape[1]):
        check(torch.stack(outputs)[:, b], expected[b], dtype, f"sequence {b}")
    check(state[0], h_ref, dtype, "h_n")
    check(state[1], c_ref, dtype, "c_n")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cell_matches_the_math(batched, hx_given, bias, dtype):
    qcell = lstm_ext.quantize_dynamic(float_cell(bias=bias), dtype)
    assert isinstance(qcell, quantized.LSTMCell)
    torch.manual_seed(2)
    batch = BATCH if batched else 1
    x = torch.randn(batch, INPUT)
    h0 = torch.randn(batch, HIDDEN) * 0.5 if hx_given else torch.zeros(batch, HIDDEN)
    c0 = torch.randn(batch, HIDDEN) if hx_given else torch.zeros(batch, HIDDEN)
    with torch.no_grad():
        if batched:
            h, c = qcell(x, (h0, c0) if hx_given else None)
        else:
            h, c = qcell(x[0], (h0[0], c0[0]) if hx_given else None)
            assert h.shape == c.shape == (HIDDEN,)
            h, c = h.unsqueeze(0), c.unsqueeze(0)
    weights = {name + "_l0": value for name, value in dequantized(qcell).items()}
    for b in range(batch):
        _, h_ref, c_ref = reference_sequence(weights, 1, False, x[b : b + 1].double(), h0[b : b + 1].double(),
                                             c0[b : b + 1].double())
        check(h[b], h_ref[0], dtype, "h")
        check(c[b], c_ref[0], dtype, "c")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cell_steps(dtype):
    """A decoder's loop of LSTMCell steps against the sequence's math."""
    qcell = lstm_ext.quantize_dynamic(float_cell(), dtype)
    torch.manual_seed(3)
    x = torch.randn(STEPS, BATCH, INPUT)
    h, c = torch.zeros(BATCH, HIDDEN), torch.zeros(BATCH, HIDDEN)
    outputs = []
    with torch.no_grad():
        for t in range(STEPS):
            h, c = qcell(x[t], (h, c))
            outputs.append(h)
    weights = {name + "_l0": value for name, value in dequantized(qcell).items()}
    zeros = torch.zeros(1, HIDDEN, dtype=torch.float64)
    for b in range(BATCH):
        expected, _, c_ref = reference_sequence(weights, 1, False, x[:, b].double(), zeros, zeros)
        check(torch.stack(outputs)[:, b], expected, dtype, f"sequence {b}")
        check(c[b], c_ref[0], dtype, f"c of sequence {b}")


# ---- oracle (b): no worse than torch's dynamic quantization against float32 ----------------------


class Holder(nn.Module):
    """torch.ao's quantize_dynamic swaps children only: the LSTM goes in a container."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def torch_quantized(module, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        holder = torch.ao.quantization.quantize_dynamic(Holder(module), {type(module)}, dtype=dtype)
    assert type(holder.module) is not type(module)
    return holder.module


def flat(result):
    """All the numbers of an LSTM's or a cell's result, as one float64 vector."""
    if isinstance(result, PackedSequence):
        return result.data.double().flatten()
    if isinstance(result, torch.Tensor):
        return result.double().flatten()
    return torch.cat([flat(r) for r in result])


def errors_against_float(module, dtype, *inputs):
    """(lstm_ext's max error, torch's max error) against the float module on the same inputs."""
    ours, theirs = lstm_ext.quantize_dynamic(module, dtype), torch_quantized(module, dtype)
    with torch.no_grad():
        expected = flat(module(*inputs))
        return tuple((flat(candidate(*inputs)) - expected).abs().max().item() for candidate in (ours, theirs))


# torch's dynamic LSTM has no projections and needs biases: those compare with oracle (a) only.
TORCH_CASES = {
    "plain": (dict(), "dense"),
    "L2-bi": (dict(num_layers=2, bidirectional=True), "dense_hx"),
    "batch_first": (dict(batch_first=True), "dense"),
    "packed_unsorted": (dict(bidirectional=True), "packed"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_no_worse_than_torch(case, dtype):
    options, mode = TORCH_CASES[case]
    module = float_lstm(input_size=32, hidden_size=64, **options).eval()
    torch.manual_seed(4)
    steps, batch = 16, 8
    x = torch.randn(steps, batch, 32)
    if module.batch_first:
        x = x.transpose(0, 1).contiguous()
    inputs = (x,)
    if mode == "dense_hx":
        states = module.num_layers * (2 if module.bidirectional else 1)
        inputs = (x, (torch.randn(states, batch, 64) * 0.5, torch.randn(states, batch, 64)))
    elif mode == "packed":
        lengths = torch.tensor([16, 3, 9, 16, 1, 12, 7, 10])
        inputs = (pack_padded_sequence(x, lengths, enforce_sorted=False),)
    ours, theirs = errors_against_float(module, dtype, *inputs)
    assert theirs > 0, "torch's quantized LSTM was not quantized"
    assert ours <= 1.5 * theirs, f"lstm_ext's error {ours:.3g} vs torch's {theirs:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cell_no_worse_than_torch(dtype):
    module = float_cell(input_size=32, hidden_size=64)
    torch.manual_seed(5)
    x, state = torch.randn(8, 32), (torch.randn(8, 64) * 0.5, torch.randn(8, 64))
    ours, theirs = errors_against_float(module, dtype, x, state)
    assert theirs > 0
    assert ours <= 1.5 * theirs, f"lstm_ext's error {ours:.3g} vs torch's {theirs:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_decoding_steps_no_worse_than_torch(dtype):
    """T=1 calls, as a streaming model makes them."""
    module = float_lstm(input_size=32, hidden_size=64).eval()
    ours, theirs = lstm_ext.quantize_dynamic(module, dtype), torch_quantized(module, dtype)
    torch.manual_seed(6)
    x = torch.randn(12, 4, 32)
    errors = {}
    with torch.no_grad():
        for name, candidate in (("ours", ours), ("torch", theirs)):
            state_f = state_q = None
            worst = 0.0
            for t in range(len(x)):
                out_f, state_f = module(x[t : t + 1], state_f)
                out_q, state_q = candidate(x[t : t + 1], state_q)
                worst = max(worst, (flat((out_q, state_q)) - flat((out_f, state_f))).abs().max().item())
            errors[name] = worst
    assert errors["torch"] > 0
    assert errors["ours"] <= 1.5 * errors["torch"], errors


# ---- int8: the integer products, exactly ------------------------------------------------------------


def quantized_rows(a):
    """a's rows [N, K] (float32) quantized as the kernel does: symmetric, q = round(a / s) with
    s = max|a_row| / 127, in float32 (q = 0 for a row of zeros)."""
    scale = a.abs().amax(dim=1) / 127
    return torch.round(a / torch.where(scale > 0, scale, 1)[:, None]), scale


def integer_product(a, q_w, w_scale):
    """a·wᵀ as the issue states it: a's rows quantized dynamically, the int8 products summed exactly
    (integers in float64), then scaled by the row's and the weight row's scales."""
    q_a, a_scale = quantized_rows(a)
    return (q_a.double() @ q_w.double().T) * a_scale.double()[:, None] * w_scale.double()[None, :]


@pytest.mark.parametrize(
    "batch, input_size, hidden_size",
    [(4, 5, 8), (80, 37, 20), (3, 1101, 33), (70, 1101, 40)],
    ids=["few_rows", "packed_odd_sizes", "two_depth_blocks", "packed_two_depth_blocks"],
)
def test_int8_step_is_the_stated_math(batch, input_size, hidden_size):
    """One step (T=1, given float32 x, h0 and c0, so the reference quantizes the very same values):
    the gates are the integer products of x and h0 quantized per row, plus the biases, to float32
    rounding. Few rows read the weights as stored; more than 64 use int8 panels; a depth over 1024
    is summed in blocks; sizes that fill no vector or panel leave remainders."""
    module = float_lstm(input_size=input_size, hidden_size=hidden_size)
    qmodule = lstm_ext.quantize_dynamic(module, torch.qint8)
    torch.manual_seed(8)
    x = torch.randn(1, batch, input_size)
    h0, c0 = torch.randn(1, batch, hidden_size) * 0.5, torch.randn(1, batch, hidden_size)
    x[0, 1] = 0  # a row of zeros quantizes to zeros
    with torch.no_grad():
        output, (h_n, c_n) = qmodule(x, (h0, c0))
    state = qmodule.state_dict()
    gates = (
        integer_product(x[0], state["weight_ih_l0"], state["weight_ih_l0_scale"])
        + integer_product(h0[0], state["weight_hh_l0"], state["weight_hh_l0_scale"])
        + state["bias_ih_l0"].double()
        + state["bias_hh_l0"].double()
    )
    i, f, g, o = gates.chunk(4, dim=1)
    c = f.sigmoid() * c0[0].double() + i.sigmoid() * g.tanh()
    h = o.sigmoid() * c.tanh()
    torch.testing.assert_close(c_n[0].double(), c, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(h_n[0].double(), h, atol=2e-6, rtol=1e-5)
    assert torch.equal(output[0], h_n[0])


def test_int8_non_finite_input_gives_non_finite_output():
    """A row with an infinity or a NaN has no scale to quantize by: its products are NaN (float
    products would be non-finite too), and the other rows are untouched."""
    qmodule = lstm_ext.quantize_dynamic(float_lstm(), torch.qint8)
    torch.manual_seed(9)
    x = torch.randn(3, 4, INPUT)
    with torch.no_grad():
        clean, _ = qmodule(x)
        x[1, 0, 2], x[0, 2, 0] = float("inf"), float("nan")
        dirty, _ = qmodule(x)
    assert torch.isnan(dirty[1:, 0]).all() and torch.isnan(dirty[:, 2]).all()
    assert torch.equal(dirty[:, [1, 3]], clean[:, [1, 3]]) and torch.equal(dirty[0, 0], clean[0, 0])


# ---- the weights ---------------------------------------------------------------------------------


def test_int8_weights_follow_the_convention():
    """Symmetric per row: |q| <= 127, each nonzero row reaches 127, scale = max|w_row| / 127, w within
    half a step of q·scale; a row of zeros: q 0, scale 1."""
    module = float_lstm(num_layers=2, proj_size=PROJ)
    with torch.no_grad():
        module.weight_hh_l1[3].zero_()
    qmodule = lstm_ext.quantize_dynamic(module)
    state = qmodule.state_dict()
    for name in module._flat_weights_names:
        w = getattr(module, name).detach()
        if not name.startswith("weight"):
            assert state[name].dtype == torch.float32 and torch.equal(state[name], w)
            continue
        q, scale = state[name], state[name + "_scale"]
        assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
        assert scale.shape == (w.shape[0],)
        zero = (w == 0).all(dim=1)
        assert q.abs().max() <= 127
        assert torch.equal(q.abs().amax(dim=1)[~zero], torch.full((int((~zero).sum()),), 127, dtype=torch.int8))
        assert torch.all(q[zero] == 0) and torch.all(scale[zero] == 1)
        torch.testing.assert_close(scale[~zero], w.abs().amax(dim=1)[~zero] / 127)
        assert torch.all((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 * (1 + 1e-5))
    assert bool((module.weight_hh_l1[3] == 0).all())


def test_float16_weights():
    module = float_lstm(bidirectional=True, proj_size=PROJ)
    state = lstm_ext.quantize_dynamic(module, torch.float16).state_dict()
    assert list(state) == module._flat_weights_names
    for name in module._flat_weights_names:
        w = getattr(module, name).detach()
        expected = w.half() if name.startswith("weight") else w
        assert state[name].dtype == expected.dtype and torch.equal(state[name], expected), name


def test_float16_saturates_with_a_warning():
    module = float_lstm()
    with torch.no_grad():
        module.weight_ih_l0[0, 0] = 1e6
    with pytest.warns(RuntimeWarning, match="saturate"):
        state = lstm_ext.quantize_dynamic(module, torch.float16).state_dict()
    assert state["weight_ih_l0"][0, 0].item() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_parametrized_lstm(dtype):
    """A parametrized nn.LSTM (weight norm) is replaced too, with the weights its parametrization makes."""
    module = float_lstm()
    torch.nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
    with torch.no_grad():
        module.parametrizations.weight_hh_l0.original0.mul_(2)  # the made weight != the stored original1
        effective = module.weight_hh_l0.clone()
    qmodule = lstm_ext.quantize_dynamic(nn.Sequential(module), dtype)[0]
    assert type(qmodule) is quantized.LSTM
    tolerance = 1e-3 * effective.abs().max().item() if dtype == torch.float16 else None
    got = dequantized(qmodule)["weight_hh_l0"].float()
    if tolerance is None:  # int8: within half a step of each row's scale
        tolerance = (qmodule.weight_hh_l0_scale[:, None] / 2 * (1 + 1e-5)).expand_as(got)
    assert torch.all((got - effective).abs() <= tolerance)
    check_against_reference(qmodule, "dense_hx", dtype)


def test_state_dict_names():
    module = float_lstm(num_layers=2, bidirectional=True, proj_size=PROJ)
    int8 = lstm_ext.quantize_dynamic(module, torch.int8).state_dict()
    names = [[name, name + "_scale"] if name.startswith("weight") else [name] for name in module._flat_weights_names]
    assert list(int8) == [n for group in names for n in group]


# ---- quantize_dynamic ------------------------------------------------------------------------------


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = float_lstm(num_layers=2, bidirectional=True)
        self.ext = lstm_ext.LSTM(2 * HIDDEN, HIDDEN, batch_first=False)
        self.decoder = nn.ModuleDict({"cell": float_cell(input_size=HIDDEN), "ext_cell": lstm_ext.LSTMCell(HIDDEN, 6)})
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x):
        y, _ = self.encoder(x)
        y, _ = self.ext(y)
        h, _ = self.decoder["cell"](y[-1])
        h2, _ = self.decoder["ext_cell"](h)
        return self.head(h), h2


def snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("dtype", [torch.qint8, torch.int8, torch.float16], ids=["qint8", "int8", "float16"])
def test_quantize_dynamic_replaces_every_lstm(dtype):
    model = Model()
    before = snapshot(model)
    qmodel = lstm_ext.quantize_dynamic(model, dtype)
    assert qmodel is not model and not qmodel.training
    assert type(qmodel.encoder) is quantized.LSTM and type(qmodel.ext) is quantized.LSTM
    assert type(qmodel.decoder["cell"]) is quantized.LSTMCell and type(qmodel.decoder["ext_cell"]) is quantized.LSTMCell
    assert type(qmodel.head) is nn.Linear
    expected_dtype = torch.float16 if dtype == torch.float16 else torch.qint8
    assert all(m.dtype == expected_dtype for m in qmodel.modules() if isinstance(m, quantized._Quantized))
    # The float model is untouched: same modules, bitwise the same weights.
    after = snapshot(model)
    assert after[1] == before[1]
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    with torch.no_grad():
        x = torch.randn(STEPS, BATCH, INPUT)
        out, out2 = qmodel(x)
        ref, ref2 = model(x)
    assert out.shape == ref.shape and out2.shape == ref2.shape
    assert (out - ref).abs().max() < 0.1


def test_quantize_dynamic_inplace():
    model = Model()
    encoder = model.encoder
    result = lstm_ext.quantize_dynamic(model, inplace=True)
    assert result is model and type(model.encoder) is quantized.LSTM and model.encoder is not encoder


@pytest.mark.parametrize("kind", ["nn.LSTM", "lstm_ext.LSTM", "nn.LSTMCell", "lstm_ext.LSTMCell"])
def test_quantize_dynamic_of_a_module_itself(kind):
    module = {"nn.LSTM": nn.LSTM, "lstm_ext.LSTM": lstm_ext.LSTM, "nn.LSTMCell": nn.LSTMCell,
              "lstm_ext.LSTMCell": lstm_ext.LSTMCell}[kind](INPUT, HIDDEN)
    quantized_module = lstm_ext.quantize_dynamic(module, torch.float16)
    assert type(quantized_module) is (quantized.LSTMCell if "Cell" in kind else quantized.LSTM)
    assert type(module).__name__ == kind.split(".")[1]  # the float module stays


def test_quantize_dynamic_keeps_hooks():
    model = Model()
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append("post"))
    model.encoder.register_forward_pre_hook(lambda *_: calls.append("pre"))
    qmodel = lstm_ext.quantize_dynamic(model)
    with torch.no_grad():
        qmodel(torch.randn(STEPS, BATCH, INPUT))
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.quint8, torch.quint4x2, torch.int16, "int8"])
def test_other_dtypes_raise(dtype):
    with pytest.raises(ValueError, match="dtype must be torch.qint8"):
        lstm_ext.quantize_dynamic(Model(), dtype)
    with pytest.raises(ValueError, match="dtype must be torch.qint8"):
        quantized.LSTM(INPUT, HIDDEN, dtype=dtype)


VARIANTS = {
    "peephole": lambda: lstm_ext.LSTM(INPUT, HIDDEN, peephole=True),
    "layer_norm": lambda: lstm_ext.LSTM(INPUT, HIDDEN, layer_norm=True),
    "zoneout": lambda: lstm_ext.LSTM(INPUT, HIDDEN, zoneout=0.1),
    "recurrent_dropout": lambda: lstm_ext.LSTM(INPUT, HIDDEN, recurrent_dropout=0.2),
    "weight_drop": lambda: lstm_ext.LSTM(INPUT, HIDDEN, weight_drop=0.2),
    "cifg": lambda: lstm_ext.LSTM(INPUT, HIDDEN, cell="cifg"),
    "cell_peephole": lambda: lstm_ext.LSTMCell(INPUT, HIDDEN, peephole=True),
    "cell_layer_norm": lambda: lstm_ext.LSTMCell(INPUT, HIDDEN, layer_norm=True),
    "cell_zoneout": lambda: lstm_ext.LSTMCell(INPUT, HIDDEN, zoneout=0.3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cell_variants_raise(variant):
    model = nn.Sequential(nn.Linear(INPUT, INPUT), VARIANTS[variant]())
    before = snapshot(model)
    with pytest.raises(ValueError, match="plain LSTM cell"):
        lstm_ext.quantize_dynamic(model, inplace=True)
    after = snapshot(model)  # nothing replaced, nothing changed
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    with pytest.raises(ValueError, match="plain LSTM cell"):
        lstm_ext.quantize_dynamic(model[1])


def test_plain_lstm_ext_modules_are_not_variants():
    """The variant check does not refuse what is exactly nn.LSTM (all options, every layer)."""
    module = lstm_ext.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ, bias=False)
    assert type(lstm_ext.quantize_dynamic(module)) is quantized.LSTM


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_torch_ao_quantize_dynamic_with_mapping(dtype):
    """torch's own quantize_dynamic makes lstm_ext's modules through its mapping (from_float)."""
    model = Model()
    mapping = {nn.LSTM: quantized.LSTM, lstm_ext.LSTM: quantized.LSTM, nn.LSTMCell: quantized.LSTMCell,
               lstm_ext.LSTMCell: quantized.LSTMCell}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        via_torch = torch.ao.quantization.quantize_dynamic(model, set(mapping), dtype=dtype, mapping=mapping)
    ours = lstm_ext.quantize_dynamic(model, dtype)
    for name in ("encoder", "ext", "decoder.cell", "decoder.ext_cell"):
        module = via_torch.get_submodule(name)
        assert type(module) is type(ours.get_submodule(name)) and module.dtype == dtype, name
    assert type(via_torch.head) is nn.Linear
    a, b = via_torch.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        x = torch.randn(STEPS, BATCH, INPUT)
        assert all(torch.equal(p, q) for p, q in zip(via_torch(x), ours(x)))


def test_from_float_rejects_other_modules():
    with pytest.raises(TypeError, match="expected an nn.LSTM"):
        quantized.LSTM.from_float(nn.GRU(INPUT, HIDDEN))
    with pytest.raises(TypeError, match="expected an nn.LSTMCell"):
        quantized.LSTMCell.from_float(nn.LSTM(INPUT, HIDDEN))


# ---- state_dict, save / load, module behaviour ----------------------------------------------------


def outputs_of(module, x, hx=None):
    with torch.no_grad():
        output, (h, c) = module(x, hx) if hx is not None else module(x)
    return output, h, c


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_state_dict_round_trip(dtype):
    options = dict(num_layers=2, bidirectional=True, proj_size=PROJ, batch_first=True)
    qmodule = lstm_ext.quantize_dynamic(float_lstm(**options), dtype)
    fresh = quantized.LSTM(INPUT, HIDDEN, dtype=dtype, **options)
    x = torch.randn(BATCH, STEPS, INPUT)
    assert not torch.equal(outputs_of(fresh, x)[0], outputs_of(qmodule, x)[0])
    fresh.load_state_dict(qmodule.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(outputs_of(fresh, x), outputs_of(qmodule, x)))
    state = fresh.state_dict()
    weight_dtype = torch.int8 if dtype == torch.qint8 else torch.float16
    for name, value in state.items():
        assert value.dtype == (weight_dtype if name.startswith("weight") and "_scale" not in name else torch.float32)
    # The other dtype's state_dict does not load: its keys differ (scales).
    other = quantized.LSTM(INPUT, HIDDEN, dtype=torch.float16 if dtype == torch.qint8 else torch.qint8, **options)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        other.load_state_dict(state)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cell_state_dict_round_trip(dtype):
    qcell = lstm_ext.quantize_dynamic(float_cell(), dtype)
    fresh = quantized.LSTMCell(INPUT, HIDDEN, dtype=dtype)
    fresh.load_state_dict(qcell.state_dict())
    x = torch.randn(BATCH, INPUT)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh(x), qcell(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_save_load_weights_only(dtype):
    model = lstm_ext.quantize_dynamic(nn.Sequential(float_lstm(bidirectional=True)), dtype)
    cell = lstm_ext.quantize_dynamic(float_cell(), dtype)
    x = torch.randn(STEPS, BATCH, INPUT)
    for whole in (model[0], cell):
        buffer = io.BytesIO()
        torch.save(whole, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert type(loaded) is type(whole) and loaded.dtype == dtype
        with torch.no_grad():
            inputs = x if whole is model[0] else x[0]
            a, b = loaded(inputs), whole(inputs)
            assert torch.equal(flat(a), flat(b))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([nn.Sequential]):
        loaded = torch.load(buffer, weights_only=True)
    with torch.no_grad():
        assert torch.equal(flat(loaded(x)), flat(model(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_repr_says_dtype(dtype):
    text = repr(lstm_ext.quantize_dynamic(nn.Sequential(float_lstm(num_layers=2), float_cell()), dtype))
    assert f"QuantizedLSTM({INPUT}, {HIDDEN}, num_layers=2, dtype={dtype})" in text
    assert f"QuantizedLSTMCell({INPUT}, {HIDDEN}, dtype={dtype})" in text


def test_casts_keep_the_weights():
    """.float() / .double() / .half() of a model leave the quantized weights as the operator takes them."""
    for dtype in DTYPES:
        qmodule = lstm_ext.quantize_dynamic(float_lstm(), dtype)
        x = torch.randn(STEPS, BATCH, INPUT)
        before = outputs_of(qmodule, x)
        state = {k: v.clone() for k, v in qmodule.state_dict().items()}
        for cast in ("half", "double", "float"):
            getattr(qmodule, cast)()
        after = qmodule.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in state.items())
        assert all(torch.equal(a, b) for a, b in zip(outputs_of(qmodule, x), before))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_training_mode_runs_inference_math(dtype):
    qmodule = lstm_ext.quantize_dynamic(float_lstm(num_layers=2, dropout=0.5), dtype)
    x = torch.randn(STEPS, BATCH, INPUT)
    evaluated = outputs_of(qmodule, x)
    qmodule.train()
    assert all(torch.equal(a, b) for a, b in zip(outputs_of(qmodule, x), evaluated))


def test_no_parameters():
    qmodule = lstm_ext.quantize_dynamic(float_lstm())
    assert list(qmodule.parameters()) == []


# ---- inference only ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("what", ["input", "hx", "cell_input", "cell_hx"])
def test_backward_raises(what, dtype):
    if what.startswith("cell"):
        module = lstm_ext.quantize_dynamic(float_cell(), dtype)
        x, hx = torch.randn(BATCH, INPUT), (torch.zeros(BATCH, HIDDEN), torch.zeros(BATCH, HIDDEN))
    else:
        module = lstm_ext.quantize_dynamic(float_lstm(num_layers=2), dtype)
        x = torch.randn(STEPS, BATCH, INPUT)
        hx = (torch.zeros(2, BATCH, HIDDEN), torch.zeros(2, BATCH, HIDDEN))
    if what.endswith("input"):
        x.requires_grad_()
    else:
        hx[0].requires_grad_()
    result = module(x, hx)
    first = result[0]
    assert first.requires_grad
    with pytest.raises(RuntimeError, match="lstm_ext: quantized LSTM is inference-only"):
        first.sum().backward()
    # The same numbers as without autograd, and no graph under no_grad.
    with torch.no_grad():
        plain = module(x, hx)
    assert not plain[0].requires_grad
    assert torch.equal(flat(plain), flat(result).detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_autocast_runs_in_float32(dtype):
    """Under CPU autocast a bfloat16 input (from the layer before) is taken as float32; outputs are float32."""
    qmodule = lstm_ext.quantize_dynamic(float_lstm(), dtype)
    qcell = lstm_ext.quantize_dynamic(float_cell(), dtype)
    x = torch.randn(STEPS, BATCH, INPUT).bfloat16()
    with torch.no_grad():
        expected = (qmodule(x.float()), qcell(x[0].float()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = (qmodule(x), qcell(x[0]))
    assert all(t.dtype == torch.float32 for t in (got[0][0], *got[0][1], *got[1]))
    assert torch.equal(flat(got), flat(expected))


# ---- validation: native's errors -------------------------------------------------------------------


def error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return type(error), str(error)
    return None


@pytest.mark.parametrize("options", [dict(), dict(batch_first=True, num_layers=2, proj_size=PROJ)],
                         ids=["plain", "batch_first-L2-proj"])
def test_errors_match_native(options):
    native = float_lstm(**options)
    qmodule = lstm_ext.quantize_dynamic(native)
    layers, real = native.num_layers, native.proj_size or HIDDEN
    good_h, good_c = torch.zeros(layers, BATCH, real), torch.zeros(layers, BATCH, HIDDEN)
    x = torch.randn(STEPS, BATCH, INPUT)
    bad_calls = {
        "4d_input": lambda m: m(torch.randn(2, STEPS, BATCH, INPUT)),
        "1d_input": lambda m: m(torch.randn(INPUT)),
        "input_size": lambda m: m(torch.randn(STEPS, BATCH, INPUT + 1)),
        "hx_batch": lambda m: m(x, (torch.zeros(layers, BATCH + 1, real), good_c)),
        "hx_size": lambda m: m(x, (torch.zeros(layers, BATCH, real + 1), good_c)),
        "cx_size": lambda m: m(x, (good_h, torch.zeros(layers, BATCH, HIDDEN + 1))),
        "hx_2d_for_batched": lambda m: m(x, (good_h[0], good_c[0])),
        "hx_3d_for_unbatched": lambda m: m(x[:, 0], (good_h, good_c)),
        "hx_layers": lambda m: m(x, (torch.zeros(layers + 1, BATCH, real), good_c)),
    }
    for name, call in bad_calls.items():
        expected = error_of(lambda: call(native))
        assert expected is not None, name
        assert error_of(lambda: call(qmodule)) == expected, name


def test_non_float32_input_raises():
    qmodule = lstm_ext.quantize_dynamic(float_lstm())
    with pytest.raises(ValueError, match="torch.float32"):
        qmodule(torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64))
    qcell = lstm_ext.quantize_dynamic(float_cell())
    with pytest.raises(ValueError, match="torch.float32"):
        qcell(torch.randn(BATCH, INPUT, dtype=torch.float64))


def test_cell_errors_match_native():
    native = float_cell()
    qcell = lstm_ext.quantize_dynamic(native)
    x, h = torch.randn(BATCH, INPUT), torch.zeros(BATCH, HIDDEN)
    bad_calls = {
        "3d_input": lambda m: m(torch.randn(1, BATCH, INPUT)),
        "3d_hx": lambda m: m(x, (h[None], h)),
        "input_size": lambda m: m(torch.randn(BATCH, INPUT + 1)),
        "hx_batch": lambda m: m(x, (torch.zeros(BATCH + 1, HIDDEN), h)),
        "cx_batch": lambda m: m(x, (h, torch.zeros(BATCH + 1, HIDDEN))),
        "hx_size": lambda m: m(x, (torch.zeros(BATCH, HIDDEN + 1), h)),
    }
    for name, call in bad_calls.items():
        expected = error_of(lambda: call(native))
        assert expected is not None, name
        assert error_of(lambda: call(qcell)) == expected, name


# ---- threads, compile, export, ONNX -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_thread_count_changes_nothing(dtype):
    qmodule = lstm_ext.quantize_dynamic(
        float_lstm(input_size=64, hidden_size=128, num_layers=2, bidirectional=True), dtype
    )
    torch.manual_seed(7)
    x = torch.randn(12, 16, 64)
    lengths = torch.tensor([12, 5, 9, 12, 1, 7, 3, 11, 12, 2, 8, 6, 4, 10, 12, 9])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    qcell = lstm_ext.quantize_dynamic(float_cell(input_size=64, hidden_size=128), dtype)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results.append(flat((qmodule(x), qmodule(packed), qmodule(x[:1]), qcell(x[0]))))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compile(dtype):
    model = lstm_ext.quantize_dynamic(
        nn.Sequential(float_lstm(num_layers=2, bidirectional=True, proj_size=PROJ, batch_first=True)), dtype
    )[0]
    qcell = lstm_ext.quantize_dynamic(float_cell(), dtype)
    x = torch.randn(BATCH, STEPS, INPUT)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        assert torch.equal(flat(compiled(x)), flat(model(x)))
        compiled_cell = torch.compile(qcell, fullgraph=True)
        assert torch.equal(flat(compiled_cell(x[:, 0])), flat(qcell(x[:, 0])))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_export(dtype):
    model = lstm_ext.quantize_dynamic(float_lstm(num_layers=2, bidirectional=True, proj_size=PROJ), dtype)
    x = torch.randn(STEPS, BATCH, INPUT)
    hx = (torch.randn(4, BATCH, PROJ), torch.randn(4, BATCH, HIDDEN))
    exported = torch.export.export(model, (x, hx))
    assert any("quantized_forward" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        assert torch.equal(flat(exported.module()(x, hx)), flat(model(x, hx)))
    qcell = lstm_ext.quantize_dynamic(float_cell(), dtype)
    exported_cell = torch.export.export(qcell, (x[0],))
    with torch.no_grad():
        assert torch.equal(flat(exported_cell.module()(x[0])), flat(qcell(x[0])))


def message_chain(error):
    texts = []
    while error is not None and len(texts) < 10:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_raises(dynamo, tmp_path):
    pytest.importorskip("onnx")
    model = lstm_ext.quantize_dynamic(nn.Sequential(float_lstm()), torch.qint8)
    with pytest.raises(Exception) as raised:  # noqa: B017  (each exporter wraps it its own way)
        torch.onnx.export(model, (torch.randn(STEPS, BATCH, INPUT),), str(tmp_path / "model.onnx"), dynamo=dynamo)
    text = message_chain(raised.value)
    assert "lstm_ext: a quantized LSTM does not export to ONNX" in text
    assert "onnxruntime.quantization.quantize_dynamic" in text
    assert not (tmp_path / "model.onnx").exists()
    # The float model still exports (the way the message points to).
    if not dynamo:
        torch.onnx.export(float_lstm(), (torch.randn(STEPS, BATCH, INPUT),), str(tmp_path / "float.onnx"),
                          dynamo=False)
        assert (tmp_path / "float.onnx").exists()


def test_deepcopy():
    qmodule = lstm_ext.quantize_dynamic(float_lstm())
    clone = copy.deepcopy(qmodule)
    x = torch.randn(STEPS, BATCH, INPUT)
    assert all(torch.equal(a, b) for a, b in zip(outputs_of(clone, x), outputs_of(qmodule, x)))
