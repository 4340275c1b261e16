"""Cell variants (lstm_ext/cells.py, csrc/cells.h) against a plain PyTorch loop of their math.

The reference runs each sequence on its own, step by step, with ATen ops, from the module's own
parameters: dense, packed (sorted or not), both directions, projections and stacked layers then
need nothing of lstm_ext. float64 to 1e-10, forward and every gradient.
"""

import copy
import itertools
import re
import types
from pathlib import Path

import pytest
import torch
from conftest import compare, weighted_sum_loss
from torch.func import jvp
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

ROOT = Path(__file__).resolve().parent.parent
INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE = 3, 4, 2
SEQ_LEN, BATCH = 5, 3
CALLS = ["hx", "no_hx", "unbatched", "packed_sorted", "packed_unsorted"]
LENGTHS = {"packed_sorted": [5, 4, 2], "packed_unsorted": [2, 5, 4]}
VARIANTS = {
    "peephole": dict(peephole=True),
    "cifg": dict(cell="cifg"),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "weight_drop": dict(weight_drop=0.4),
    "zoneout": dict(zoneout=(0.3, 0.6)),
    "all": dict(peephole=True, recurrent_dropout=0.5, weight_drop=0.25, zoneout=0.2),
    "layer_norm": dict(layer_norm=True),
    "layer_norm_cifg": dict(layer_norm=True, cell="cifg"),
    "layer_norm_all": dict(layer_norm=True, peephole=True, recurrent_dropout=0.5, weight_drop=0.25, zoneout=0.2),
}


# ---- the reference: the math, one sequence and one step at a time ------------------------


def layer_norm(v, weight, bias=None):
    """LN(v; γ, β) = γ ⊙ (v − mean(v)) / sqrt(var(v) + 1e-5) + β over v's last dimension, biased variance."""
    centered = v - v.mean(-1, keepdim=True)
    normalized = weight * centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5)
    return normalized if bias is None else normalized + bias


def reference_step(module, layer, suffix, x, h, c, masks, t):
    """Step t of one layer-direction on x [I], h [P], c [H]: returns (h_t, c_t). masks (or None):
    the layer-direction's scaled keep-masks of W_hh ("weight") and of h_{t-1} ("recurrent"), and
    zoneout's shares of c_{t-1} and h_{t-1} at each step ("cell_keep", "hidden_keep")."""
    weight = lambda name: getattr(module, f"{name}_l{layer}{suffix}")  # noqa: E731
    w_hh, h_in, h_prev, c_prev = weight("weight_hh"), h, h, c
    if masks is not None:
        w_hh, h_in = w_hh * masks["weight"], h * masks["recurrent"]
    cell, normalized = lstm_ext.cells.split(module.cell)
    if normalized:
        gates = layer_norm(weight("weight_ih") @ x, weight("ln_weight_ih")) + layer_norm(
            w_hh @ h_in, weight("ln_weight_hh")
        )
    else:
        gates = weight("weight_ih") @ x + w_hh @ h_in
    if module.bias:
        gates = gates + weight("bias_ih") + weight("bias_hh")
    i, f, g, o = gates.chunk(4)
    if cell == "peephole":
        i, f = i + weight("weight_ci") * c, f + weight("weight_cf") * c
    f = 1 - torch.sigmoid(i) if cell == "cifg" else torch.sigmoid(f)
    c = f * c + torch.sigmoid(i) * torch.tanh(g)
    if cell == "peephole":
        o = o + weight("weight_co") * c
    h = torch.sigmoid(o) * torch.tanh(layer_norm(c, weight("ln_weight_c"), weight("ln_bias_c")) if normalized else c)
    if module.proj_size:
        h = weight("weight_hr") @ h
    if masks is not None:
        keep_c, keep_h = masks["cell_keep"][t], masks["hidden_keep"][t]
        c, h = keep_c * c_prev + (1 - keep_c) * c, keep_h * h_prev + (1 - keep_h) * h
    return h, c


def reference_sequence(module, x, h0, c0, masks):
    """The stack on one sequence x [T, I] from h0 [L*D, P], c0 [L*D, H] (dropout off), masks
    per layer-direction (or None): (output [T, D*P], h_n, c_n)."""
    directions = 2 if module.bidirectional else 1
    hy, cy = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            h, c, steps = h0[index], c0[index], [None] * len(x)
            order = range(len(x) - 1, -1, -1) if direction else range(len(x))
            for t in order:
                suffix = "_reverse" if direction else ""
                h, c = reference_step(module, layer, suffix, x[t], h, c, masks and masks[index], t)
                steps[t] = h
            outputs.append(torch.stack(steps))
            hy.append(h)
            cy.append(c)
        x = torch.cat(outputs, -1)
    return x, torch.stack(hy), torch.stack(cy)


def reference(module, input, hx, lengths, masks=None):
    """(output [T, B, D*P] zero-padded, h_n, c_n) for input [T, B, I] (time-major here) and each
    sequence's length. masks: from draw_masks, or None."""
    outputs, hy, cy = [], [], []
    for b, length in enumerate(lengths):
        # "weight" is per layer-direction, the others per sequence.
        sequence_masks = masks and [{name: m[name] if name == "weight" else m[name][b] for name in m} for m in masks]
        output, h, c = reference_sequence(module, input[:length, b], hx[0][:, b], hx[1][:, b], sequence_masks)
        outputs.append(torch.nn.functional.pad(output, (0, 0, 0, input.size(0) - length)))
        hy.append(h)
        cy.append(c)
    return torch.stack(outputs, 1), torch.stack(hy, 1), torch.stack(cy, 1)


def draw_masks(module, lengths, order, dtype=torch.float64):
    """What a forward of ``module`` on sequences of these lengths draws (in training, in the
    documented order: W_hh's masks per layer-direction, then per layer-direction recurrent
    dropout's and zoneout's) or, in eval, uses instead. Per layer-direction: "weight" [4H, P] and,
    for each sequence b, "recurrent" [P] (scaled keep-masks), "cell_keep" [T, H] and
    "hidden_keep" [T, P] (zoneout's shares of the previous states). ``order[b]`` is sequence b's
    row in the operator's batch, sorted by decreasing length."""
    directions = 2 if module.bidirectional else 1
    states, H, P = module.num_layers * directions, module.hidden_size, module.proj_size or module.hidden_size
    T, B, N = max(lengths), len(lengths), sum(lengths)
    offsets = torch.tensor([0] + [sum(length > t for length in lengths) for t in range(T)]).cumsum(0)
    training, (z_c, z_h) = module.training, module.zoneout

    def keep_mask(shape, p):
        if p == 0 or not training:
            return torch.ones(shape, dtype=torch.float64)
        if p == 1:
            return torch.zeros(shape, dtype=torch.float64)
        return torch.empty(shape, dtype=dtype).bernoulli_(1 - p).double() / (1 - p)

    def per_sequence(packed_rows):  # [N, *] in the operator's row order -> [B, T, *]
        return torch.stack([packed_rows[(offsets[:-1] + order[b]).clamp(max=N - 1)] for b in range(B)])

    weights = [keep_mask((4 * H, P), module.weight_drop) for _ in range(states)]
    masks = []
    for weight in weights:
        recurrent = keep_mask((B, P), module.recurrent_dropout)[order]
        if training and (z_c or z_h):
            cell_keep = torch.empty(N, H, dtype=dtype).bernoulli_(z_c).double()
            hidden_keep = torch.empty(N, P, dtype=dtype).bernoulli_(z_h).double()
        else:
            cell_keep = torch.full((N, H), z_c, dtype=torch.float64)
            hidden_keep = torch.full((N, P), z_h, dtype=torch.float64)
        masks.append(dict(weight=weight, recurrent=recurrent, cell_keep=per_sequence(cell_keep),
                          hidden_keep=per_sequence(hidden_keep)))
    return masks


# ---- running the module as a user would --------------------------------------------------------


def make_module(variant, dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    return lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, **VARIANTS[variant], **config).to(dtype)


def run_both(module, call, dtype=torch.float64, seed=11):
    """((output, h_n, c_n), grads) of the module (its masks drawn right after manual_seed(seed))
    and of the reference, on the same leaves."""
    torch.manual_seed(1)
    directions = 2 if module.bidirectional else 1
    states = module.num_layers * directions
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=dtype)
    h0 = torch.randn(states, BATCH, module.proj_size or HIDDEN_SIZE, dtype=dtype)
    c0 = torch.randn(states, BATCH, HIDDEN_SIZE, dtype=dtype)
    if call == "no_hx":
        h0, c0 = torch.zeros_like(h0), torch.zeros_like(c0)
    if call == "unbatched":
        input, h0, c0 = input[:, :1], h0[:, :1], c0[:, :1]
    lengths = LENGTHS.get(call, [input.size(0)] * input.size(1))
    results = []
    for run in ("module", "reference"):
        leaves = [t.clone().requires_grad_() for t in (input, h0, c0)]
        x, h, c = leaves
        if run == "reference":
            torch.manual_seed(seed)
            order = torch.argsort(torch.tensor(lengths), descending=True, stable=True).argsort()
            masks = draw_masks(module, lengths, order)
            output, h_n, c_n = reference(module, x, (h, c), lengths, masks)
            if call in LENGTHS:
                output = pack_padded_sequence(output, lengths, enforce_sorted=False).data
            elif module.batch_first:
                output = output.transpose(0, 1)
        else:
            module_input = x.transpose(0, 1) if module.batch_first else x
            hx = (h, c)
            if call in LENGTHS:
                module_input = pack_padded_sequence(module_input, lengths, module.batch_first, enforce_sorted=False)
            if call == "unbatched":
                module_input, hx = module_input.select(1 - module.batch_first, 0), (h[:, 0], c[:, 0])
            torch.manual_seed(seed)
            output, (h_n, c_n) = module(module_input, None if call == "no_hx" else hx)
            if call in LENGTHS:
                output = output.data
            if call == "unbatched":
                output, h_n, c_n = output.unsqueeze(1 - module.batch_first), h_n.unsqueeze(1), c_n.unsqueeze(1)
        outputs = (output, h_n, c_n)
        wanted = [x, *(() if call == "no_hx" else (h, c)), *module.parameters()]
        grads = torch.autograd.grad(weighted_sum_loss(outputs), wanted, allow_unused=True)
        results.append((outputs, grads))
    return results


CONFIGS = [
    dict(num_layers=layers, bidirectional=bidirectional, proj_size=proj, bias=bias, batch_first=batch_first)
    for layers, bidirectional, proj, bias, batch_first in itertools.product(
        [1, 2], [False, True], [0, PROJ_SIZE], [True, False], [False, True]
    )
]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_loop(variant, config, call):
    module = make_module(variant, **config)
    (outputs, grads), (expected_outputs, expected_grads) = run_both(module, call)
    compare(outputs, expected_outputs, msg="(output, h_n, c_n)")
    compare(grads, expected_grads, msg="grads of (input, [h0, c0], *parameters)")


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_and_threads_match_reference_loop(variant, threads, bidirectional):
    """float32 and a size the threads split: on two threads each direction gets one, one
    direction's steps are split between both (the passes over a slice of units)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        module = lstm_ext.LSTM(16, 64, num_layers=2, bidirectional=bidirectional, **VARIANTS[variant])
        input = torch.randn(20, 16, 16, requires_grad=True)
        torch.manual_seed(5)
        output, (h_n, c_n) = module(input)
        # The loss's weights drawn in float64 for both: randn draws other numbers in float32.
        loss = weighted_sum_loss([t.double() for t in (output, h_n, c_n)])
        grads = torch.autograd.grad(loss, [input, *module.parameters()])
        expected = module.double()
        expected_input = input.detach().double().requires_grad_()
        zeros = torch.zeros(2 * (1 + bidirectional), 16, 64, dtype=torch.float64)
        torch.manual_seed(5)
        masks = draw_masks(expected, [20] * 16, torch.arange(16), torch.float32)
        ref = reference(expected, expected_input, (zeros, zeros), [20] * 16, masks)
        expected_grads = torch.autograd.grad(weighted_sum_loss(ref), [expected_input, *expected.parameters()])
        if "layer_norm" in variant:
            # Normalising divides by a row's spread, which float32 rounds: here float32's own loop
            # of the math is 4e-5 from float64's in the output and 1e-4 of the largest value in
            # the input's gradient; lstm_ext 2e-5 in both. So: within 1e-4 of the largest value.
            for actual, expected in zip((output, h_n, c_n, *grads), (*ref, *expected_grads)):
                assert (actual.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
        else:
            compare((output, h_n, c_n), tuple(t.float() for t in ref))
            compare(grads, [g.float() for g in expected_grads])
    finally:
        torch.set_num_threads(previous)


# ---- autodiff beyond the first order: through the differentiable recomputation -----------------


def functional_case(variant, packed=False, train=True):
    """(f, primals): f(input, h0, c0, *params, *cell_params) is lstm_ext.lstm, given the variant
    by keyword, on a bidirectional two-layer stack with projections. A variant that draws masks
    draws them from the default generator as it stands (see seeded)."""
    module = make_module(variant, num_layers=2, bidirectional=True, proj_size=PROJ_SIZE)
    torch.manual_seed(2)
    input = torch.randn(SEQ_LEN - 2, 2, INPUT_SIZE, dtype=torch.float64)
    h0 = torch.randn(4, 2, PROJ_SIZE, dtype=torch.float64)
    c0 = torch.randn(4, 2, HIDDEN_SIZE, dtype=torch.float64)
    native = [name for names in torch.nn.LSTM(1, 2, 2, bidirectional=True, proj_size=1)._all_weights for name in names]
    names = [name for name, _ in module.named_parameters()]
    weights = [getattr(module, name) for name in sorted(names, key=lambda name: name not in native)]
    num_native, cell = len(native), module.cell
    dropouts = dict(recurrent_dropout=module.recurrent_dropout, weight_drop=module.weight_drop)
    batch_sizes = torch.tensor([2, 2, 1]) if packed else None

    def f(input, h0, c0, *weights):
        params, cell_params = weights[:num_native], weights[num_native:]
        options = dict(cell=cell, cell_params=cell_params, **dropouts)
        if packed:
            return lstm_ext.lstm(input, batch_sizes, (h0, c0), params, True, 2, 0.0, train, True, **options)
        return lstm_ext.lstm(input, (h0, c0), params, True, 2, 0.0, train, True, False, **options)

    if packed:
        input = input.flatten(0, 1)[:5]
    primals = [t.detach().clone().requires_grad_() for t in (input, h0, c0, *weights)]
    return f, primals


def seeded(f, seed=7):
    """f with the same masks at every call."""
    return lambda *args: (torch.manual_seed(seed), f(*args))[1]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant, packed):
    f, primals = functional_case(variant, packed)
    assert torch.autograd.gradcheck(seeded(f), primals)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradgradcheck(variant):
    f, primals = functional_case(variant)
    assert torch.autograd.gradgradcheck(seeded(f), primals, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jvp_matches_reference_loop(variant):
    module = make_module(variant, num_layers=2, bidirectional=True, proj_size=PROJ_SIZE)
    torch.manual_seed(3)
    input = torch.randn(SEQ_LEN, 2, INPUT_SIZE, dtype=torch.float64)
    h0 = torch.randn(4, 2, PROJ_SIZE, dtype=torch.float64)
    c0 = torch.randn(4, 2, HIDDEN_SIZE, dtype=torch.float64)
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach() for p in module.parameters()]
    tangents = [torch.randn_like(t) for t in (input, h0, c0, *params)]

    def run(use_reference):
        def f(input, h0, c0, *params):
            state = dict(zip(names, params))
            torch.manual_seed(7)
            if use_reference:
                masks = draw_masks(module, [SEQ_LEN] * 2, torch.arange(2))
                with torch.nn.utils.stateless._reparametrize_module(module, state):
                    return reference(module, input, (h0, c0), [SEQ_LEN] * 2, masks)
            output, (h_n, c_n) = torch.func.functional_call(module, state, (input, (h0, c0)))
            return output, h_n, c_n

        return jvp(f, (input, h0, c0, *params), tuple(tangents))

    compare(run(False), run(True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_matches_a_loop(variant):
    """In eval: vmap of a variant that draws masks is vmap's randomness rules, not the cell's."""
    f, primals = functional_case(variant, train=False)
    input, h0, c0, *weights = (p.detach() for p in primals)
    inputs = torch.stack([input, input.flip(0), input * 2])
    batched = torch.vmap(lambda x: f(x, h0, c0, *weights))(inputs)
    looped = [torch.stack(parts) for parts in zip(*(f(x, h0, c0, *weights) for x in inputs))]
    compare(list(batched), looped)


# ---- the module's parameters, options and state_dict -------------------------------------------


def test_defaults_are_exactly_nn_lstm():
    torch.manual_seed(0)
    native = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    torch.manual_seed(0)
    ext = lstm_ext.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, peephole=False)
    assert list(ext.state_dict()) == list(native.state_dict())
    compare(ext.state_dict(), native.state_dict())
    assert type(ext._flat_weights) is list


def test_peephole_parameters_follow_each_layer_direction():
    module = lstm_ext.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, peephole=True)
    names = list(module.state_dict())
    assert names[:8] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
        "weight_ci_l0", "weight_cf_l0", "weight_co_l0",
    ]
    assert names[-3:] == ["weight_ci_l1_reverse", "weight_cf_l1_reverse", "weight_co_l1_reverse"]
    assert module.weight_co_l1_reverse.shape == (4,)
    bound = 1 / 4**0.5
    assert all(p.abs().max() <= bound for name, p in module.named_parameters() if "_c" in name)


@pytest.mark.parametrize("options", [dict(layer_norm=True), dict(layer_norm=True, peephole=True)])
def test_layer_norm_parameters_follow_each_layer_direction(options):
    module = lstm_ext.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, **options)
    assert module.cell == ("layer_norm+peephole" if options.get("peephole") else "layer_norm")
    names = list(module.state_dict())
    layer_norm = ["ln_weight_ih_l0", "ln_weight_hh_l0", "ln_weight_c_l0", "ln_bias_c_l0"]
    peephole = ["weight_ci_l0", "weight_cf_l0", "weight_co_l0"] if options.get("peephole") else []
    per_direction = 5 + len(layer_norm) + len(peephole)
    assert names[:per_direction] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0", *layer_norm, *peephole
    ]
    assert names[per_direction] == "weight_ih_l0_reverse" and len(names) == 4 * per_direction
    for suffix in ("_l0", "_l1_reverse"):
        for name, value, size in [("ln_weight_ih", 1, 16), ("ln_weight_hh", 1, 16), ("ln_weight_c", 1, 4),
                                  ("ln_bias_c", 0, 4)]:
            assert torch.equal(getattr(module, name + suffix), torch.full((size,), float(value)))
    cell = lstm_ext.LSTMCell(3, 4, **options)
    assert [name for name, _ in cell.named_parameters()][4:] == [name[:-3] for name in layer_norm + peephole]
    assert cell.ln_weight_ih.shape == (16,) and torch.equal(cell.ln_bias_c, torch.zeros(4))


@pytest.mark.parametrize("value", [1, "yes", None])
def test_layer_norm_must_be_a_bool(value):
    for module in (lstm_ext.LSTM, lstm_ext.LSTMCell):
        with pytest.raises(TypeError, match="layer_norm must be a bool"):
            module(3, 4, layer_norm=value)


def test_layer_norm_is_the_cell_name_prefix():
    assert lstm_ext.LSTM(3, 4, cell="layer_norm+cifg").cell == "layer_norm+cifg"
    assert lstm_ext.LSTM(3, 4, cell="cifg", layer_norm=True).cell == "layer_norm+cifg"
    for cell in ("layer_norm+", "layer_norm+layer_norm", "layer_norm+nope"):
        with pytest.raises(ValueError, match="unknown cell"):
            lstm_ext.LSTM(3, 4, cell=cell)


def test_layer_norm_in_bfloat16_runs_the_fused_passes():
    """bfloat16 and float16 compute in float32, layer norm too: the fused passes keep a float32
    workspace, and the hand-written backward's gradients follow the float64 reference's."""
    f, primals = functional_case("layer_norm")
    input, h0, c0, *weights = [p.detach().bfloat16().requires_grad_() for p in primals]
    params, cell_params = weights[:-16], weights[-16:]
    args = (input, None, h0, c0, params, True, 2, 0.0, True, True)
    output, hy, cy, workspace = torch.ops.lstm_ext.forward(*args, True, "layer_norm", cell_params)
    assert output.dtype == torch.bfloat16 and workspace and all(w.dtype == torch.float32 for w in workspace)
    # The oracle: the same math in float64 on the bfloat16-rounded values.
    rounded = [p.detach().double().requires_grad_() for p in (input, h0, c0, *weights)]
    expected = f(*rounded)[0]
    torch.testing.assert_close(output.double(), expected, atol=2e-2, rtol=2e-2)
    grad_output = torch.randn(output.shape, dtype=torch.float64).bfloat16()
    grads = torch.autograd.grad(output, [input, h0, c0, *weights], grad_output)
    expected_grads = torch.autograd.grad(expected, rounded, grad_output.double())
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.double(), expected_grad, atol=2e-2, rtol=2e-2)


def test_layer_norm_under_autocast_follows_float32():
    """bfloat16 under autocast, gradients reaching the float32 parameters."""
    torch.manual_seed(0)
    module = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, layer_norm=True, peephole=True)
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE)
    expected = module(input)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module(input)[0]
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, atol=5e-2, rtol=5e-2)
    output.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())


def test_opcheck_forward_with_layer_norm():
    f, primals = functional_case("layer_norm_all")
    input, h0, c0, *weights = primals
    params, cell_params = weights[:-28], weights[-28:]
    for need_workspace in (False, True):
        args = (input, None, h0, c0, params, True, 2, 0.0, False, True, need_workspace, "layer_norm+peephole",
                cell_params, 0.0, [0.2, 0.2])
        torch.library.opcheck(torch.ops.lstm_ext.forward, args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip(variant, tmp_path):
    source = make_module(variant, num_layers=2, bidirectional=True)
    torch.save(source.state_dict(), tmp_path / "state.pt")
    target = make_module(variant, seed=5, num_layers=2, bidirectional=True)
    target.load_state_dict(torch.load(tmp_path / "state.pt"))
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    compare(target.eval()(input), source.eval()(input))


@pytest.mark.parametrize("variant", ["peephole", "all", "layer_norm"])
def test_loading_another_variants_state_dict_raises(variant):
    plain = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE).double()
    module = make_module(variant)
    with pytest.raises(RuntimeError, match="Missing key.*weight_c"):
        module.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key.*weight_c"):
        plain.load_state_dict(module.state_dict())


def test_loading_peepholes_into_layer_norm_raises():
    with pytest.raises(RuntimeError, match="(?s)Missing key.*ln_weight_ih_l0.*Unexpected key.*weight_ci_l0"):
        make_module("layer_norm").load_state_dict(make_module("peephole").state_dict())


@pytest.mark.parametrize("value", [1, "yes", None])
def test_peephole_must_be_a_bool(value):
    with pytest.raises(TypeError, match="peephole must be a bool"):
        lstm_ext.LSTM(3, 4, peephole=value)


def test_module_moves_with_its_cell_parameters():
    module = lstm_ext.LSTM(3, 4, peephole=True).double()
    assert module.weight_ci_l0.dtype == torch.float64
    assert isinstance(module._flat_weights, lstm_ext.functional.CellWeights)
    assert module(torch.randn(2, 1, 3, dtype=torch.float64))[0].dtype == torch.float64


def test_unknown_cell_raises():
    input, h0, c0 = torch.randn(2, 1, 3), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    params = [torch.randn(16, 3), torch.randn(16, 4)]
    with pytest.raises(RuntimeError, match="unknown cell 'nope'; the cells are lstm, peephole, cifg"):
        lstm_ext.lstm(input, (h0, c0), params, False, 1, 0.0, False, False, False, cell="nope")


def test_wrong_count_of_cell_params_raises():
    input, h0, c0 = torch.randn(2, 1, 3), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    params = [torch.randn(16, 3), torch.randn(16, 4)]
    with pytest.raises(RuntimeError, match="expected 3 cell parameters"):
        lstm_ext.lstm(input, (h0, c0), params, False, 1, 0.0, False, False, False, cell="peephole",
                      cell_params=[torch.randn(4)])


@pytest.mark.parametrize("variant", ["all", "layer_norm_all"])
@pytest.mark.parametrize("packed", [False, True])
def test_functional_form_compiles_fullgraph(packed, variant):
    f, primals = functional_case(variant, packed)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    outputs = compiled(*primals)
    grads = torch.autograd.grad(weighted_sum_loss(outputs), primals)
    torch.manual_seed(7)
    expected = f(*primals)
    compare(outputs, expected)
    compare(grads, torch.autograd.grad(weighted_sum_loss(expected), primals))


def test_opcheck_forward_with_a_cell():
    f, primals = functional_case("peephole")
    input, h0, c0, *weights = primals
    params, cell_params = weights[:-12], weights[-12:]
    args = (input, None, h0, c0, params, True, 2, 0.0, True, True, True, "peephole", cell_params)
    torch.library.opcheck(torch.ops.lstm_ext.forward, args)


# ---- recurrent dropout and weight drop: training only, seeded, edge values ---------------------

DROPS = ["recurrent_dropout", "weight_drop"]


def dropout_module(**options):
    torch.manual_seed(0)
    return lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, **options).double()


def plain_twin(module):
    plain = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True).double()
    plain.load_state_dict(module.state_dict())
    return plain


@pytest.mark.parametrize("name", DROPS)
def test_dropouts_are_no_ops_in_eval(name):
    module = dropout_module(**{name: 0.5}).eval()
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    torch.testing.assert_close(module(input), plain_twin(module).eval()(input), rtol=0, atol=0)


@pytest.mark.parametrize("name", DROPS)
def test_dropouts_are_reproducible_under_a_seed(name):
    module = dropout_module(**{name: 0.5})
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(module(input)[0])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("name", DROPS)
def test_dropping_everything_is_a_zero_recurrent_weight(name):
    """p = 1: the recurrent product is zero, and so is W_hh's gradient."""
    module = dropout_module(**{name: 1.0})
    plain = plain_twin(module)
    with torch.no_grad():
        for weight_name, weight in plain.named_parameters():
            if weight_name.startswith("weight_hh"):
                weight.zero_()
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    output, (h_n, c_n) = module(input)
    compare((output, h_n, c_n), (lambda o: (o[0], *o[1]))(plain(input)))
    weighted_sum_loss((output, h_n, c_n)).backward()
    for weight_name, weight in module.named_parameters():
        if weight_name.startswith("weight_hh"):
            assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("name", DROPS)
@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError), (True, TypeError)])
def test_invalid_dropouts_raise_at_construction(name, value, error):
    with pytest.raises(error, match=name):
        lstm_ext.LSTM(3, 4, **{name: value})


def test_invalid_cell_raises_at_construction():
    with pytest.raises(ValueError, match="unknown cell 'nope'"):
        lstm_ext.LSTM(3, 4, cell="nope")
    with pytest.raises(TypeError, match="cell must be a str"):
        lstm_ext.LSTM(3, 4, cell=1)


# ---- the guide, "Writing your own cell" (docs/cells.md) -----------------------------------------


def test_guides_example_is_the_code_the_extension_is_built_from():
    """The guide's C++ is verbatim in csrc/cells.h (so cell="cifg", tested against its math with
    every other variant above, is the guide's example), and its line count is the one it states."""
    guide = (ROOT / "docs" / "cells.md").read_text()
    cells_h = (ROOT / "csrc" / "cells.h").read_text()
    struct, registration = re.findall(r"```cpp\n(.*?)```", guide, re.S)
    assert "struct CIFGCell" in struct
    assert struct in cells_h
    assert registration in cells_h
    assert f"{len(struct.splitlines())} lines of C++" in " ".join(guide.split())
    assert '"cifg": ()' in (ROOT / "lstm_ext" / "cells.py").read_text()


# ---- zoneout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["hx", "packed_unsorted"])
@pytest.mark.parametrize("config", [dict(num_layers=1), dict(num_layers=2, bidirectional=True, proj_size=PROJ_SIZE)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_matches_reference_loop(variant, config, call):
    """In eval, zoneout's formula with its constants; the dropouts off."""
    module = make_module(variant, **config).eval()
    (outputs, grads), (expected_outputs, expected_grads) = run_both(module, call)
    compare(outputs, expected_outputs, msg="(output, h_n, c_n)")
    compare(grads, expected_grads, msg="grads")


def test_zoneout_one_freezes_the_state():
    module = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, zoneout=1.0).double()
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    h0, c0 = (torch.randn(2, BATCH, HIDDEN_SIZE, dtype=torch.float64) for _ in range(2))
    for mode in (module.train, module.eval):
        mode()
        output, (h_n, c_n) = module(input, (h0, c0))
        assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
        assert torch.equal(output, h0[1].expand_as(output))


@pytest.mark.parametrize("z_c, z_h", [(0.3, 0.7), (0.8, 0.1)])
def test_zoneout_keeps_each_unit_with_its_probability(z_c, z_h):
    """In training, the fraction of units whose state stays from one step to the next."""
    torch.manual_seed(0)
    module = lstm_ext.LSTM(8, 64, zoneout=(z_c, z_h)).double()
    input = torch.randn(40, 64, 8, dtype=torch.float64)
    output, _ = module(input)
    kept_h = (output[1:] == output[:-1]).double().mean().item()
    assert abs(kept_h - z_h) < 0.01
    # c is not returned per step: a one-step run from a known c0, many times over.
    c0 = torch.randn(1, 4096, 64, dtype=torch.float64)
    _, (_, c_1) = module(torch.randn(1, 4096, 8, dtype=torch.float64), (torch.zeros_like(c0), c0))
    assert abs((c_1 == c0).double().mean().item() - z_c) < 0.01


@pytest.mark.parametrize(
    "value, error",
    [(-0.1, ValueError), ((0.1, 1.2), ValueError), ((0.1, 0.2, 0.3), ValueError), ("0.5", TypeError),
     ((0.1, None), TypeError)],
)
def test_invalid_zoneout_raises_at_construction(value, error):
    with pytest.raises(error, match="zoneout"):
        lstm_ext.LSTM(3, 4, zoneout=value)


# ---- lstm_ext.LSTMCell's variants: one step -------------------------------------------------------

CELL_VARIANTS = {
    "peephole": dict(peephole=True),
    "cifg": dict(cell="cifg"),
    "zoneout": dict(zoneout=(0.3, 0.6)),
    "peephole+zoneout": dict(peephole=True, zoneout=0.4),
    "layer_norm": dict(layer_norm=True),
    "layer_norm+peephole+zoneout": dict(layer_norm=True, peephole=True, zoneout=0.4),
}


def reference_cell_step(cell, x, h, c):
    """One step of an LSTMCell through reference_step, row by row, with zoneout's masks drawn as
    the operator draws them (c's [B, H], then h's) or its constants in eval."""
    native = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    names = [*native, *(name for name, *_ in lstm_ext.cells.parameters(cell.cell))]
    as_layer = types.SimpleNamespace(cell=cell.cell, bias=cell.bias, proj_size=0)
    for name in names:
        setattr(as_layer, f"{name}_l0", getattr(cell, name))
    z_c, z_h = cell.zoneout
    if cell.training and (z_c or z_h):
        keep_c, keep_h = torch.empty_like(c).bernoulli_(z_c), torch.empty_like(h).bernoulli_(z_h)
    else:
        keep_c, keep_h = torch.full_like(c, z_c), torch.full_like(h, z_h)
    rows = []
    for b in range(x.size(0)):
        masks = dict(weight=1, recurrent=1, cell_keep=keep_c[b : b + 1], hidden_keep=keep_h[b : b + 1])
        rows.append(reference_step(as_layer, 0, "", x[b], h[b], c[b], masks, 0))
    return tuple(torch.stack(parts) for parts in zip(*rows))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("variant", CELL_VARIANTS)
def test_lstm_cell_matches_reference_step(variant, train, bias):
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, bias=bias, **CELL_VARIANTS[variant]).double().train(train)
    inputs = [torch.randn(BATCH, size, dtype=torch.float64) for size in (INPUT_SIZE, HIDDEN_SIZE, HIDDEN_SIZE)]
    results = []
    for step in (lambda x, h, c: cell(x, (h, c)), lambda x, h, c: reference_cell_step(cell, x, h, c)):
        x, h, c = leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(4)
        outputs = step(x, h, c)
        results.append((outputs, torch.autograd.grad(weighted_sum_loss(outputs), [*leaves, *cell.parameters()])))
    compare(results[0], results[1])


def test_lstm_cell_variant_parameters_state_dict_and_copies():
    cell = lstm_ext.LSTMCell(3, 4, peephole=True, zoneout=0.25).double().eval()
    native = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert list(cell.state_dict()) == [*native, "weight_ci", "weight_cf", "weight_co"]
    twin = copy.deepcopy(cell)
    with torch.no_grad():
        twin.weight_co.add_(1)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert not torch.equal(twin(x)[0], cell(x)[0])  # the copy's forward reads the copy's parameters
    plain = lstm_ext.LSTMCell(3, 4)
    assert list(plain.state_dict()) == list(torch.nn.LSTMCell(3, 4).state_dict())
    assert "forward" not in vars(plain)


@pytest.mark.parametrize("variant", ["peephole+zoneout", "layer_norm+peephole+zoneout"])
def test_lstm_cell_variant_compiles_fullgraph(variant):
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, **CELL_VARIANTS[variant]).double().eval()
    x, h, c = (torch.randn(BATCH, size, dtype=torch.float64) for size in (INPUT_SIZE, HIDDEN_SIZE, HIDDEN_SIZE))
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    compare(compiled(x, (h, c)), cell(x, (h, c)))
    compare(compiled(x[0]), cell(x[0]))


def test_lstm_cell_variant_takes_unbatched_input_and_no_hx():
    cell = lstm_ext.LSTMCell(3, 4, peephole=True, zoneout=0.25).double().eval()
    x = torch.randn(3, dtype=torch.float64)
    h1, c1 = cell(x)
    zeros = torch.zeros(1, 4, dtype=torch.float64)
    expected = cell(x[None], (zeros, zeros))
    compare((h1, c1), (expected[0][0], expected[1][0]))


# ---- export and ensembles ----------------------------------------------------------------------


@pytest.mark.parametrize("layer_norm", [False, True])
def test_exported_variant_matches_eager(layer_norm):
    module = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, peephole=True, zoneout=0.2, layer_norm=layer_norm)
    module = module.double().eval()
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    exported = torch.export.export(module, (input,))
    new_input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)
    compare(exported.module()(new_input), module(new_input))


def test_ensemble_vmap_over_variant_parameters_matches_a_loop():
    torch.manual_seed(0)
    models = [lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, peephole=True).double().eval() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    input = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64)

    def run(params, buffers):
        return torch.func.functional_call(models[0], (params, buffers), (input,))[0]

    compare(torch.vmap(run)(params, buffers), torch.stack([model(input)[0] for model in models]))
