"""Inter-layer dropout of lstm_ext.LSTM: eval/train semantics, RNG parity with native, mask statistics."""

import pytest
import torch
from conftest import PROJ_SIZE, assert_matches_native, compare, make_hx, make_input, make_lstm_pair, run_lstm
from torch import nn

import lstm_ext

DROPOUT = 0.5
DROPOUT_SEED = 7

DROPOUT_CONFIGS = [
    pytest.param(dict(num_layers=1), id="layers1"),
    pytest.param(dict(num_layers=2), id="layers2"),
    pytest.param(dict(num_layers=3, bidirectional=True), id="layers3-bi"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=PROJ_SIZE), id="layers2-bi-proj"),
    pytest.param(dict(num_layers=3, proj_size=PROJ_SIZE, batch_first=True), id="layers3-proj-batchfirst"),
    pytest.param(dict(num_layers=2, bidirectional=True, bias=False), id="layers2-bi-nobias"),
]

# nn.LSTM warns that dropout has no effect when num_layers == 1; that is the point of that case.
pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout after all but last recurrent layer")


def _make_dropout_pair(dtype=torch.float64, **config):
    return make_lstm_pair(dtype=dtype, dropout=DROPOUT, **config)


def _run_seeded(module, input, hx):
    torch.manual_seed(DROPOUT_SEED)
    return run_lstm(module, input, hx)


@pytest.mark.parametrize("config", DROPOUT_CONFIGS)
def test_eval_mode_matches_native(config):
    native, ext = _make_dropout_pair(**config)
    native.eval()
    ext.eval()
    input = make_input(torch.float64, batch_first=native.batch_first)
    hx = make_hx(native, torch.float64)

    assert_matches_native(native, ext, input, hx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", DROPOUT_CONFIGS)
def test_train_mode_matches_native_under_same_seed(config, dtype):
    native, ext = _make_dropout_pair(dtype=dtype, **config)
    input = make_input(dtype, batch_first=native.batch_first)
    hx = make_hx(native, dtype)

    assert_matches_native(native, ext, input, hx, seed=DROPOUT_SEED)


def test_unbatched_train_mode_matches_native_under_same_seed():
    native, ext = _make_dropout_pair(num_layers=2, bidirectional=True)
    input = make_input(torch.float64, unbatched=True)
    hx = make_hx(native, torch.float64, unbatched=True)

    assert_matches_native(native, ext, input, hx, seed=DROPOUT_SEED)


def test_train_mode_is_reproducible_and_differs_from_eval():
    _, ext = _make_dropout_pair(num_layers=3, bidirectional=True)
    input = make_input(torch.float64)
    hx = make_hx(ext, torch.float64)

    first_outputs, first_grads = _run_seeded(ext, input, hx)
    second_outputs, second_grads = _run_seeded(ext, input, hx)
    ext.eval()
    eval_outputs, _ = run_lstm(ext, input, hx)

    torch.testing.assert_close(second_outputs, first_outputs, atol=0, rtol=0)
    torch.testing.assert_close(second_grads, first_grads, atol=0, rtol=0)
    assert not torch.allclose(first_outputs[0], eval_outputs[0])
    assert all(grad.isfinite().all() for grad in first_grads.values())


def _make_mask_revealing_second_layer(lstm):
    """Rewire layer 1 so that unit j of its output is exactly zero iff its input j is zero.

    With W_hh = 0, forget gate forced to 0 and the other gates reading input j alone,
    c_j = sigmoid(x_j) * tanh(x_j) and h_j = sigmoid(x_j) * tanh(c_j) = f(x_j), f(0) = 0.
    """
    hidden_size = lstm.hidden_size
    identity = torch.eye(hidden_size, dtype=lstm.weight_ih_l1.dtype)
    with torch.no_grad():
        lstm.weight_ih_l1.copy_(torch.cat([identity, torch.zeros_like(identity), identity, identity]))
        lstm.weight_hh_l1.zero_()
        lstm.bias_hh_l1.zero_()
        lstm.bias_ih_l1.zero_()
        lstm.bias_ih_l1[hidden_size : 2 * hidden_size] = -1e4


def _revealed_unit_response(x):
    return torch.sigmoid(x) * torch.tanh(torch.sigmoid(x) * torch.tanh(x))


@pytest.mark.parametrize("dropout", [0.25, 0.6])
def test_dropped_fraction_is_p_and_kept_units_are_rescaled(dropout):
    input_size, hidden_size = 8, 64
    torch.manual_seed(0)
    ext = lstm_ext.LSTM(input_size, hidden_size, num_layers=2, dropout=dropout).double()
    _make_mask_revealing_second_layer(ext)
    first_layer = nn.LSTM(input_size, hidden_size).double()
    first_layer.load_state_dict({name: p for name, p in ext.state_dict().items() if name.endswith("_l0")})
    input = make_input(torch.float64, seq_len=10, batch=8, input_size=input_size)

    with torch.no_grad():
        output, _ = ext(input)
        first_layer_output, _ = first_layer(input)

    dropped = output == 0
    assert dropped.double().mean().item() == pytest.approx(dropout, abs=0.03)
    expected_kept = _revealed_unit_response(first_layer_output / (1 - dropout))
    compare(output[~dropped], expected_kept[~dropped])
