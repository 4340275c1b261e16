"""lstm_ext.LSTM under PyTorch's module machinery, against native nn.LSTM put through the same.

torch.func (functional_call and grad; the other transforms are in test_autodiff.py),
parametrizations, torch.save / torch.load, copy.deepcopy and dtype conversion. Comparing
gradients of every parameter also checks that the module's ``_flat_weights`` (what forward
hands the operator) are its current parameters.
"""

import copy

import pytest
import torch
from conftest import (
    FULL_FEATURED,
    assert_matches_native,
    compare,
    make_hx,
    make_input,
    make_lstm_pair,
    weighted_sum_loss,
)
from torch.func import functional_call
from torch.nn.utils import parametrizations

import lstm_ext

DTYPE = torch.float64
CONFIGS = {"defaults": dict(), "bi-2layers-proj": FULL_FEATURED}


def functional_call_outputs_and_grads(module, parameters, input):
    """(output, h_n, c_n) of ``module`` run with ``parameters`` swapped in, and the gradient
    of a weighted sum of them with respect to each swapped-in parameter."""
    leaves = {name: p.detach().clone().requires_grad_() for name, p in parameters.items()}
    output, (h_n, c_n) = functional_call(module, leaves, (input,))
    outputs = (output, h_n, c_n)
    grads = torch.autograd.grad(weighted_sum_loss(outputs), list(leaves.values()))
    return outputs, dict(zip(leaves, grads))


@pytest.mark.parametrize("swapped", ["all", "weight_hh_l0"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_functional_call_with_swapped_parameters_matches_native(config, swapped):
    native, ext = make_lstm_pair(**config)
    _, other = make_lstm_pair(seed=1, **config)
    parameters = {name: p for name, p in other.named_parameters() if swapped in ("all", name)}
    input = make_input(DTYPE)
    compare(
        functional_call_outputs_and_grads(ext, parameters, input),
        functional_call_outputs_and_grads(native, parameters, input),
    )
    # Afterwards the module runs on its own parameters again.
    assert_matches_native(native, ext, input)


def test_torch_func_grad_of_functional_call_matches_native():
    native, ext = make_lstm_pair(**FULL_FEATURED)
    input = make_input(DTYPE)
    parameters = {name: p.detach() for name, p in native.named_parameters()}

    def grads(module):
        def loss(parameters):
            output, (h_n, c_n) = functional_call(module, parameters, (input,))
            return weighted_sum_loss([output, h_n, c_n])

        return torch.func.grad(loss)(parameters)

    compare(grads(ext), grads(native))


@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_hr_l1_reverse"])
def test_weight_norm_parametrization_matches_native(name):
    native, ext = make_lstm_pair(**FULL_FEATURED)
    for module in (native, ext):
        parametrizations.weight_norm(module, name)
        magnitude = getattr(module.parametrizations, name).original0
        with torch.no_grad():  # away from weight_norm's initial value, which reproduces the weight
            magnitude.mul_(torch.linspace(0.5, 1.5, magnitude.numel(), dtype=DTYPE).view_as(magnitude))
    assert type(ext).__name__ == "ParametrizedLSTM" and isinstance(ext, lstm_ext.LSTM)
    # The gradients compared include the parametrization's original0 (g) and original1 (v).
    assert_matches_native(native, ext, make_input(DTYPE), make_hx(native, DTYPE))


@pytest.mark.parametrize("saved", ["module", "state_dict"])
def test_save_and_load_matches_native(tmp_path, saved):
    native, ext = make_lstm_pair(**FULL_FEATURED)
    path = tmp_path / "lstm.pt"
    if saved == "module":
        torch.save(ext, path)
        loaded = torch.load(path, weights_only=False)
    else:
        torch.save(ext.state_dict(), path)
        _, loaded = make_lstm_pair(seed=1, **FULL_FEATURED)
        loaded.load_state_dict(torch.load(path))
    assert type(loaded) is lstm_ext.LSTM
    assert_matches_native(native, loaded, make_input(DTYPE))


def test_deepcopy_is_independent_and_matches_native():
    native, ext = make_lstm_pair(**FULL_FEATURED)
    copied = copy.deepcopy(ext)
    with torch.no_grad():  # the original changes, the copy must not
        for p in ext.parameters():
            p.add_(1.0)
    assert type(copied) is lstm_ext.LSTM
    assert_matches_native(native, copied, make_input(DTYPE))


CONVERSIONS = {
    "to(dtype)": lambda module: module.to(torch.float64),
    "to(dtype=dtype)": lambda module: module.to(dtype=torch.float64),
    "to(tensor)": lambda module: module.to(torch.zeros((), dtype=torch.float64)),
}


@pytest.mark.parametrize("convert", CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_to_float64_matches_native(convert):
    native, ext = make_lstm_pair(dtype=torch.float32, **FULL_FEATURED)
    native, ext = convert(native), convert(ext)
    assert all(p.dtype == torch.float64 for p in ext.parameters())
    assert_matches_native(native, ext, make_input(torch.float64), make_hx(native, torch.float64))
