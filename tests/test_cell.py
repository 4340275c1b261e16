"""lstm_ext.lstm_cell / lstm_ext.LSTMCell against torch.lstm_cell / nn.LSTMCell (float64)."""

import pytest
import torch
from conftest import (
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    assert_same_error,
    compare,
    leaf_copies,
    make_pair,
    weighted_sum_loss,
)
from torch import Tensor, nn

import lstm_ext

DTYPE = torch.float64


def _random(*shape):
    return torch.randn(shape, dtype=DTYPE)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_functional_lstm_cell_matches_torch_lstm_cell(bias):
    torch.manual_seed(0)
    gates = 4 * HIDDEN_SIZE
    tensors = [_random(BATCH, INPUT_SIZE), _random(BATCH, HIDDEN_SIZE), _random(BATCH, HIDDEN_SIZE)]
    tensors += [_random(gates, INPUT_SIZE), _random(gates, HIDDEN_SIZE)]
    if bias:
        tensors += [_random(gates), _random(gates)]

    def run(lstm_cell):
        input, h, c, *weights = leaves = leaf_copies(tensors)
        outputs = lstm_cell(input, (h, c), *weights)
        weighted_sum_loss(outputs).backward()
        return outputs, [leaf.grad for leaf in leaves]

    ext_outputs, ext_grads = run(lstm_ext.lstm_cell)
    native_outputs, native_grads = run(torch.lstm_cell)

    compare(ext_outputs, native_outputs, msg="(h_1, c_1)")
    compare(ext_grads, native_grads, msg="grads of (input, h, c, *weights)")


def _run_cell(cell, input, hx):
    input, *hx = leaf_copies([input, *hx])
    cell.zero_grad(set_to_none=True)
    outputs = cell(input, tuple(hx)) if hx else cell(input)
    weighted_sum_loss(outputs).backward()
    grads = {"input": input.grad, **{name: p.grad for name, p in cell.named_parameters()}}
    if hx:
        grads["h"], grads["c"] = hx[0].grad, hx[1].grad
    return outputs, grads


def test_lstm_cell_is_a_subclass_of_nn_lstm_cell():
    assert issubclass(lstm_ext.LSTMCell, nn.LSTMCell)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_lstm_cell_module_matches_native(bias, hx_given, unbatched):
    native, ext = make_pair(
        dtype=DTYPE, module_class=nn.LSTMCell, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, bias=bias
    )
    batch_dims = () if unbatched else (BATCH,)
    input = _random(*batch_dims, INPUT_SIZE)
    hx = [_random(*batch_dims, HIDDEN_SIZE), _random(*batch_dims, HIDDEN_SIZE)] if hx_given else []

    ext_outputs, ext_grads = _run_cell(ext, input, hx)
    native_outputs, native_grads = _run_cell(native, input, hx)

    compare(ext_outputs, native_outputs, msg="(h_1, c_1)")
    compare(ext_grads, native_grads, msg="grad")


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda: (_random(BATCH, INPUT_SIZE + 1),), id="input-size-mismatch"),
        pytest.param(lambda: (_random(2, BATCH, INPUT_SIZE),), id="3d-input"),
        pytest.param(
            lambda: (_random(BATCH, INPUT_SIZE), (_random(BATCH, HIDDEN_SIZE + 1), _random(BATCH, HIDDEN_SIZE))),
            id="h-size-mismatch",
        ),
    ],
)
def test_lstm_cell_bad_input_raises_same_error_as_native(make_args):
    native, ext = make_pair(dtype=DTYPE, module_class=nn.LSTMCell, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE)
    args = make_args()
    assert_same_error(lambda: native(*args), lambda: ext(*args))


# The cell's activations are ours (csrc/cell.h), not ATen's: float64 inlines its own exp and
# expm1, and computes tanh as expm1(2x) / (expm1(2x) + 2).
# Saturating the other gates routes one activation of x straight to the new cell state: the
# input and forget gates at 1 / 0 give c' = tanh(x); the candidate gate at 1 gives c' = sigmoid(x).
# The relative error is held to a few ulp over the whole range, tanh from 1e-300 up to where it
# rounds to ±1, sigmoid down to 1e-308 (where exp(-x) nears overflow). float32 trades accuracy
# for speed (exp_u20) and is held to its tolerance only.
_SATURATED = 1e4  # sigmoid(±1e4) is exactly 1 / 0, tanh(1e4) exactly 1
_ACTIVATION_TOLERANCES = pytest.mark.parametrize(
    "dtype, rtol, atol",
    [(torch.float64, 8 * 2.0**-52, 0.0), (torch.float32, 1e-6, 1e-6)],
    ids=["float64", "float32"],
)


def _cell_state_through(gate: int, x: Tensor) -> Tensor:
    """c' of one unit whose `gate` (i, f, g, o = 0..3) sees x and the others saturate: c' = i·g."""
    weight = torch.zeros(4, 1, dtype=x.dtype)
    weight[gate] = 1.0
    bias = torch.tensor([_SATURATED, -_SATURATED, _SATURATED, _SATURATED], dtype=x.dtype)
    bias[gate] = 0.0
    zeros = torch.zeros(x.numel(), 1, dtype=x.dtype)
    _, c = lstm_ext.lstm_cell(x[:, None], (zeros, zeros), weight, torch.zeros(4, 1, dtype=x.dtype), bias, torch.zeros_like(bias))
    return c[:, 0]


@_ACTIVATION_TOLERANCES
def test_cell_tanh_matches_torch_tanh_across_magnitudes(dtype, rtol, atol):
    magnitudes = torch.logspace(-300 if dtype == torch.float64 else -30, 1.3, 4000, dtype=dtype)
    x = torch.cat([torch.linspace(-25, 25, 100001, dtype=dtype), magnitudes, -magnitudes])
    torch.testing.assert_close(_cell_state_through(2, x), torch.tanh(x), rtol=rtol, atol=atol)


@_ACTIVATION_TOLERANCES
def test_cell_sigmoid_matches_torch_sigmoid_across_magnitudes(dtype, rtol, atol):
    limit = 709 if dtype == torch.float64 else 87  # exp(limit) still finite
    x = torch.cat([torch.linspace(-limit, limit, 200001, dtype=dtype), torch.linspace(-1, 1, 10001, dtype=dtype)])
    torch.testing.assert_close(_cell_state_through(0, x), torch.sigmoid(x), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cell_activations_saturate_and_keep_nan(dtype):
    # Not ±inf: the zero weights of the other gates would make them NaN before any activation.
    big = torch.finfo(dtype).max
    x = torch.tensor([-big, -800.0, -745.0, 745.0, 800.0, big, float("nan")], dtype=dtype)
    for gate, activation in ((0, torch.sigmoid), (2, torch.tanh)):
        torch.testing.assert_close(_cell_state_through(gate, x), activation(x), rtol=0, atol=0, equal_nan=True)
