"""torch.autocast("cpu") with bfloat16 and float16: lstm_ext follows native's cast policy for lstm.

Under autocast the LSTM runs in autocast's dtype whatever mix of float32 weights and
lower-precision activations it gets, returns that dtype, and its gradients reach float32 weights
and the layers before it in their own dtypes. Native (oneDNN on CPU) is the oracle where it runs;
where native takes its ATen loop instead (projections, packed input) it keeps float32 in places,
and lstm_ext is checked against its own float32 result.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext
from conftest import assert_same_error, make_pair

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
# Both run every product in the autocast dtype, in different orders: their distance is a few of
# that dtype's rounding steps (bfloat16 keeps 8 bits, float16 11), more in the gradients.
TOLERANCES = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}
GRAD_TOLERANCES = {torch.bfloat16: dict(atol=6e-2, rtol=6e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}
CONFIGS = {
    "default": {},
    "layers2_bidirectional": dict(num_layers=2, bidirectional=True),
    "batch_first_no_bias": dict(batch_first=True, bias=False),
}


def models(seed=0, **kwargs):
    """A float32 Linear feeding an LSTM, native and lstm_ext with equal weights: ``lstm(linear(x))``."""
    torch.manual_seed(seed)
    linear = nn.Linear(6, 5)
    native, ext = make_pair(seed, torch.float32, input_size=5, hidden_size=7, **kwargs)
    return (nn.Sequential(linear, native), nn.Sequential(linear, ext)), (native, ext)


def run(model, x, dtype, hx=None):
    """Forward under autocast, backward of a float32 loss outside it; returns outputs and gradients."""
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        output, (h_n, c_n) = model[1](model[0](x), hx)
    generator = torch.Generator().manual_seed(1)
    loss = sum((t.float() * torch.randn(t.shape, generator=generator)).sum() for t in (output, h_n, c_n))
    loss.backward()
    grads = {"x": x.grad, **{name: p.grad for name, p in model.named_parameters()}}
    if hx is not None:
        grads["h0"], grads["c0"] = hx[0].grad, hx[1].grad
    return (output, h_n, c_n), grads


def run_native(model, x, dtype, hx=None):
    """run() on native, and whether oneDNN ran it: oneDNN where it takes the call; where it refuses
    the dtype (CPUs without AVX-512 BF16/FP16, or ONEDNN_MAX_CPU_ISA=AVX2), native's ATen loop,
    oneDNN switched off, which keeps float32 where oneDNN's policy casts (float32 input or states)."""
    try:
        return *run(model, x, dtype, hx), True
    except RuntimeError as error:
        if "could not create a primitive descriptor" not in str(error):
            raise
    with torch.backends.mkldnn.flags(enabled=False):
        return *run(model, x, dtype, hx), False


def assert_close_in_dtype(actual, expected, tolerances, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, native {expected.dtype}"
    torch.testing.assert_close(actual.float(), expected.float(), **tolerances, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_lstm_after_a_linear_matches_native_autocast(dtype, config):
    (native, ext), _ = models(**CONFIGS[config])
    shape = (3, 6, 6) if CONFIGS[config].get("batch_first") else (6, 3, 6)
    x = torch.randn(shape)
    native_outputs, native_grads, _ = run_native(native, x, dtype)
    ext_outputs, ext_grads = run(ext, x, dtype)
    for name, a, e in zip(("output", "h_n", "c_n"), ext_outputs, native_outputs):
        assert e.dtype == dtype
        assert_close_in_dtype(a, e, TOLERANCES[dtype], name)
    assert native_grads.keys() == ext_grads.keys()
    for name in native_grads:
        assert_close_in_dtype(ext_grads[name], native_grads[name], GRAD_TOLERANCES[dtype], f"grad {name}")
    assert all(ext_grads[name].dtype == torch.float32 for name in ext_grads)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float32_input_and_states_run_in_bfloat16_like_native(state_dtype):
    """Native's oneDNN LSTM casts a float32 input and hx too; it refuses them under float16 autocast."""
    _, (native, ext) = models(num_layers=2)
    x = torch.randn(6, 3, 5)
    hx = tuple(torch.randn(2, 3, 7, dtype=state_dtype) for _ in range(2))
    native_model, ext_model = nn.Sequential(nn.Identity(), native), nn.Sequential(nn.Identity(), ext)
    native_outputs, native_grads, by_onednn = run_native(native_model, x, torch.bfloat16, hx)
    ext_outputs, ext_grads = run(ext_model, x, torch.bfloat16, hx)
    for name, a, e in zip(("output", "h_n", "c_n"), ext_outputs, native_outputs):
        assert a.dtype == torch.bfloat16, name
        assert_close_in_dtype(a, e if by_onednn else e.to(torch.bfloat16), TOLERANCES[torch.bfloat16], name)
    for name in native_grads:
        assert_close_in_dtype(ext_grads[name], native_grads[name], GRAD_TOLERANCES[torch.bfloat16], f"grad {name}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["proj_size", "packed"])
def test_every_path_runs_in_the_autocast_dtype(dtype, case):
    """Where native takes its ATen loop (which keeps float32 states) lstm_ext stays on the policy:
    checked against lstm_ext's own float32 result."""
    _, (_, ext) = models(**(dict(proj_size=3, bidirectional=True) if case == "proj_size" else {}))
    x = torch.randn(6, 3, 5)
    run_input = pack_padded_sequence(x, [6, 4, 2]) if case == "packed" else x
    reference = ext(run_input)
    with torch.autocast("cpu", dtype=dtype):
        output, (h_n, c_n) = ext(run_input)
    if case == "packed":
        output, reference = output.data, (reference[0].data, reference[1])
    for name, a, e in zip(("output", "h_n", "c_n"), (output, h_n, c_n), (reference[0], *reference[1])):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")
    output.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ext.parameters())


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", ["float32", "autocast"])
def test_lstm_cell_matches_native_autocast(dtype, state_dtype):
    """nn.LSTMCell is not on autocast's list, only its products are: its states keep their dtype."""
    native, ext = make_pair(0, torch.float32, nn.LSTMCell, input_size=5, hidden_size=7)
    x = torch.randn(3, 5)
    states = [torch.randn(3, 7, dtype=torch.float32 if state_dtype == "float32" else dtype) for _ in range(2)]
    results = []
    for cell in (native, ext):
        inputs = [t.clone().requires_grad_() for t in (x, *states)]
        cell.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            h, c = cell(inputs[0], tuple(inputs[1:]))
        (h.float().sum() + 2 * c.float().sum()).backward()
        results.append(((h, c), [t.grad for t in inputs] + [p.grad for p in cell.parameters()]))
    (native_states, native_grads), (ext_states, ext_grads) = results
    for name, a, e in zip(("h", "c"), ext_states, native_states):
        assert_close_in_dtype(a, e, TOLERANCES[dtype], name)
    for index, (a, e) in enumerate(zip(ext_grads, native_grads)):
        assert_close_in_dtype(a, e, GRAD_TOLERANCES[dtype], f"grad {index}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_the_operator_casts_at_the_dispatcher(dtype):
    """torch.ops.lstm_ext.forward itself (a traced or exported graph calls it) has the same policy."""
    _, (_, ext) = models(num_layers=2)
    x = torch.randn(6, 3, 5)
    hx = torch.zeros(2, 3, 7)
    args = (x, None, hx, hx, ext._flat_weights, True, 2, 0.0, False, False)
    with torch.autocast("cpu", dtype=dtype):
        output, hy, cy, workspace = torch.ops.lstm_ext.forward(*args, True)
        expected, *_ = lstm_ext.lstm(x, (hx, hx), ext._flat_weights, True, 2, 0.0, False, False, False)
    assert output.dtype == hy.dtype == cy.dtype == dtype
    # The operator computes bfloat16 and float16 in float32: what it keeps for the backward too.
    assert workspace and all(w.dtype == torch.float32 for w in workspace)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    output.float().sum().backward()
    assert ext.weight_ih_l0.grad.dtype == torch.float32


def test_mismatched_dtypes_outside_autocast_still_raise():
    _, (native, ext) = models()
    x = torch.randn(6, 3, 5, dtype=torch.bfloat16)
    assert_same_error(lambda: native(x), lambda: ext(x))
    hx = torch.zeros(1, 3, 7)
    with pytest.raises(RuntimeError, match="input and weight_ih must have the same dtype, got BFloat16 and Float"):
        lstm_ext.lstm(x, (hx, hx), ext._flat_weights, True, 1, 0.0, False, False, False)


def test_bfloat16_training_loop_tracks_native():
    """A GradScaler-free bfloat16 loop: float32 weights, Adam, the loss falls as native's does."""
    losses = {}
    for flavour in ("native", "lstm_ext"):
        torch.manual_seed(0)
        lstm = (nn.LSTM if flavour == "native" else lstm_ext.LSTM)(8, 16, num_layers=2, batch_first=True)
        model = nn.ModuleDict({"embed": nn.Linear(4, 8), "lstm": lstm, "head": nn.Linear(16, 1)})
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(16, 10, 4, generator=generator)
        target = x.sum(-1, keepdim=True).cumsum(1).tanh()
        losses[flavour] = []
        for _ in range(30):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output, _ = model["lstm"](model["embed"](x))
                loss = nn.functional.mse_loss(model["head"](output).float(), target)
            loss.backward()
            optimizer.step()
            losses[flavour].append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses["lstm_ext"][-1] < 0.5 * losses["lstm_ext"][0]
    torch.testing.assert_close(torch.tensor(losses["lstm_ext"]), torch.tensor(losses["native"]), atol=2e-2, rtol=5e-2)


def test_compiled_under_autocast_matches_eager():
    (_, ext_model), _ = models(num_layers=2)
    x = torch.randn(6, 3, 6)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, _ = ext_model[1](ext_model[0](x))
        return output

    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(step, fullgraph=True)
        output = compiled(x)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, step(x), rtol=0, atol=0)
    output.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ext_model.parameters())
