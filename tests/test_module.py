"""lstm_ext.LSTM as a drop-in nn.LSTM: import, class, parameters, state_dict, errors, training, conversions."""

import sys

import pytest
import torch
from conftest import (
    FULL_FEATURED,
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    PROJ_SIZE,
    SEQ_LEN,
    assert_matches_native,
    assert_same_error,
    compare,
    make_hx,
    make_input,
    make_lstm_pair,
    run_python,
)
from torch import nn

import lstm_ext


def test_importing_lstm_ext_before_torch_takes_the_installed_extension(tmp_path):
    # _C finds libc10 only once torch is loaded: a fresh interpreter whose first import is
    # lstm_ext must still import _C, not compile a JIT build (nor fail, installed without sources).
    if "lstm_ext._C" not in sys.modules:
        pytest.skip("this environment has no installed lstm_ext._C (the suite runs on a JIT build)")
    run_python("import sys, lstm_ext\nassert 'lstm_ext._C' in sys.modules, 'no lstm_ext._C imported'\n", tmp_path)
    assert not list(tmp_path.iterdir()), "a JIT build was compiled"


def test_lstm_is_a_subclass_of_nn_lstm():
    assert issubclass(lstm_ext.LSTM, nn.LSTM)


def test_parameter_names_and_shapes_match_native():
    native, ext = make_lstm_pair(**FULL_FEATURED)
    native_shapes = [(name, p.shape) for name, p in native.named_parameters()]
    ext_shapes = [(name, p.shape) for name, p in ext.named_parameters()]
    assert ext_shapes == native_shapes
    assert "weight_hh_l0_reverse" in dict(ext_shapes)
    assert "weight_hr_l1" in dict(ext_shapes)


@pytest.mark.parametrize("direction", ["native_to_ext", "ext_to_native"])
def test_state_dict_loads_both_ways(direction):
    dtype = torch.float64
    torch.manual_seed(0)
    native = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **FULL_FEATURED).to(dtype)
    ext = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, **FULL_FEATURED).to(dtype)
    source, target = (native, ext) if direction == "native_to_ext" else (ext, native)

    target.load_state_dict(source.state_dict())

    compare(target.state_dict(), source.state_dict())
    assert_matches_native(native, ext, make_input(dtype))


def _hx_with_shapes(h_shape, c_shape):
    return torch.randn(h_shape, dtype=torch.float64), torch.randn(c_shape, dtype=torch.float64)


NUM_STATES = 2 * FULL_FEATURED["num_layers"]
GOOD_H = (NUM_STATES, BATCH, PROJ_SIZE)
GOOD_C = (NUM_STATES, BATCH, HIDDEN_SIZE)

BAD_CALLS = [
    pytest.param(lambda: (torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, 1, dtype=torch.float64),), id="4d-input"),
    pytest.param(lambda: (torch.randn(SEQ_LEN, dtype=torch.float64),), id="1d-input"),
    pytest.param(lambda: (torch.randn(SEQ_LEN, BATCH, INPUT_SIZE + 1, dtype=torch.float64),), id="input-size-mismatch"),
    pytest.param(lambda: (torch.randn(SEQ_LEN, BATCH, INPUT_SIZE),), id="float32-input-float64-weights"),
    pytest.param(
        lambda: (torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64), _hx_with_shapes(GOOD_C, GOOD_C)),
        id="h0-shape-mismatch",
    ),
    pytest.param(
        lambda: (torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64), _hx_with_shapes(GOOD_H, GOOD_H)),
        id="c0-shape-mismatch",
    ),
    pytest.param(
        lambda: (
            torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64),
            _hx_with_shapes((NUM_STATES, BATCH + 1, PROJ_SIZE), (NUM_STATES, BATCH + 1, HIDDEN_SIZE)),
        ),
        id="hx-batch-mismatch",
    ),
    pytest.param(
        lambda: (torch.randn(SEQ_LEN, INPUT_SIZE, dtype=torch.float64), _hx_with_shapes(GOOD_H, GOOD_C)),
        id="unbatched-input-batched-hx",
    ),
    pytest.param(
        lambda: (
            torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, dtype=torch.float64),
            _hx_with_shapes(GOOD_H[::2], GOOD_C[::2]),
        ),
        id="batched-input-unbatched-hx",
    ),
]


@pytest.mark.parametrize("make_args", BAD_CALLS)
def test_bad_input_raises_same_error_as_native(make_args):
    native, ext = make_lstm_pair(**FULL_FEATURED)
    args = make_args()
    assert_same_error(lambda: native(*args), lambda: ext(*args))


def test_sgd_training_follows_native_loss_curve():
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, num_layers=2, bidirectional=True)
    input = make_input(dtype)
    target = torch.randn(SEQ_LEN, BATCH, 2 * HIDDEN_SIZE, dtype=dtype)

    def train(model, steps=50):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            output, _ = model(input)
            loss = nn.functional.mse_loss(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    native_losses = train(native)
    ext_losses = train(ext)

    assert native_losses[-1] < native_losses[0]
    torch.testing.assert_close(ext_losses, native_losses, atol=1e-9, rtol=1e-9)
    compare(dict(ext.named_parameters()), dict(native.named_parameters()))


@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.5, proj_size=PROJ_SIZE, bias=False)],
    ids=["defaults", "all-options"],
)
def test_repr_matches_native_apart_from_class_name(config):
    native, ext = make_lstm_pair(**config)
    native_class_name = type(native).__name__
    ext_class_name = type(ext).__name__
    assert repr(ext).removeprefix(ext_class_name) == repr(native).removeprefix(native_class_name)


def test_dtype_conversions_keep_matching_native():
    native, ext = make_lstm_pair(dtype=torch.float32, **FULL_FEATURED)
    for dtype, convert in [(torch.float64, nn.Module.double), (torch.float32, nn.Module.float)]:
        convert(native)
        convert(ext)
        assert all(p.dtype == dtype for p in ext.parameters())
        assert_matches_native(native, ext, make_input(dtype), make_hx(native, dtype))


def test_flatten_parameters_keeps_matching_native():
    native, ext = make_lstm_pair(**FULL_FEATURED)
    ext.flatten_parameters()
    assert_matches_native(native, ext, make_input(torch.float64))


def _swap_by_functional_call(module, name, weight):
    return lambda *args: torch.func.functional_call(module, {name: weight}, args)


def _swap_by_parametrization(module, name, weight):
    class Scaled(nn.Module):
        def forward(self, value):
            return value * 0.5

    torch.nn.utils.parametrize.register_parametrization(module, name, Scaled())
    return module


def _swap_by_plain_attribute(module, name, weight):
    delattr(module, name)
    setattr(module, name, weight)
    return module


def _swap_by_new_parameter(module, name, weight):
    setattr(module, name, nn.Parameter(weight))
    return module


WEIGHT_SWAPS = {
    "functional_call": _swap_by_functional_call,
    "parametrization": _swap_by_parametrization,
    "plain_attribute": _swap_by_plain_attribute,
    "new_parameter": _swap_by_new_parameter,
}


@pytest.mark.parametrize("swap", WEIGHT_SWAPS.values(), ids=WEIGHT_SWAPS.keys())
def test_a_weight_found_elsewhere_than_its_parameter_is_used(swap):
    """nn.LSTM's forward refreshes its weight list from getattr(module, name) when that is no
    longer the listed weight; lstm_ext.LSTM reads _parameters directly where getattr would find
    them there, so a weight met anywhere else (functional_call's, a parametrization's property,
    a plain attribute, a new Parameter) must still be the one used, as native's."""
    native, ext = make_lstm_pair()
    weight = torch.randn_like(native.weight_hh_l0)
    input, hx = make_input(torch.float64), make_hx(native, torch.float64)
    outputs = [swap(module, "weight_hh_l0", weight)(input, hx) for module in (native, ext)]
    compare(outputs[1], outputs[0])
    unchanged, _ = make_lstm_pair()[0](input, hx)
    assert not torch.allclose(outputs[0][0], unchanged)
