"""Shared helpers for the lstm_ext test suite.

Native ``torch.nn.LSTM`` / ``torch._VF.lstm`` is the oracle everywhere: tests
build a native module and an ``lstm_ext`` module with identical weights, run
both on identical inputs and compare outputs and gradients.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}

INPUT_SIZE = 3
HIDDEN_SIZE = 4
PROJ_SIZE = 2
# Every structural option at once: two layers, both directions, projections.
FULL_FEATURED = dict(num_layers=2, bidirectional=True, proj_size=PROJ_SIZE)
SEQ_LEN = 5
BATCH = 3

SKIP_JIT_ENV_VAR = "LSTM_EXT_SKIP_JIT"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"jit_build: compiles lstm_ext with torch.utils.cpp_extension.load "
        f"(~1 min); skipped when {SKIP_JIT_ENV_VAR}=1",
    )


@pytest.fixture(params=[1, 2], ids=lambda threads: f"threads{threads}")
def num_threads(request):
    """Runs the test with 1 and with 2 torch threads, restoring the count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def compare(actual, expected, msg=None):
    """assert_close with the tolerance of ``expected``'s dtype; recurses into tuples, lists and dicts."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), msg
        for key in expected:
            compare(actual[key], expected[key], msg=f"{msg or ''}[{key}]")
        return
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), msg
        for index, (a, e) in enumerate(zip(actual, expected)):
            compare(a, e, msg=f"{msg or ''}[{index}]")
        return
    if expected is None:
        assert actual is None, msg
        return
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype], msg=_with_context(msg))


def _with_context(context):
    if context is None:
        return None
    return lambda default_message: f"{context}: {default_message}"


def make_pair(seed=0, dtype=torch.float64, module_class=nn.LSTM, **kwargs):
    """Native module and its lstm_ext twin (same class name) with equal weights via state_dict."""
    ext_class = getattr(lstm_ext, module_class.__name__)
    torch.manual_seed(seed)
    native = module_class(**kwargs).to(dtype)
    ext = ext_class(**kwargs).to(dtype)
    ext.load_state_dict(native.state_dict())
    return native, ext


def make_lstm_pair(seed=0, dtype=torch.float64, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, **kwargs):
    return make_pair(seed, dtype, input_size=input_size, hidden_size=hidden_size, **kwargs)


def make_input(dtype, seq_len=SEQ_LEN, batch=BATCH, input_size=INPUT_SIZE, batch_first=False, unbatched=False):
    if unbatched:
        shape = (seq_len, input_size)
    elif batch_first:
        shape = (batch, seq_len, input_size)
    else:
        shape = (seq_len, batch, input_size)
    return torch.randn(shape, dtype=dtype)


def make_hx(lstm, dtype, batch=BATCH, unbatched=False):
    """(h_0, c_0) with the shapes ``lstm`` expects."""
    num_states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    h_size = lstm.proj_size or lstm.hidden_size
    batch_dims = () if unbatched else (batch,)
    h0 = torch.randn(num_states, *batch_dims, h_size, dtype=dtype)
    c0 = torch.randn(num_states, *batch_dims, lstm.hidden_size, dtype=dtype)
    return h0, c0


def leaf_copies(tensors):
    """Independent leaf tensors requiring grad, so each model gets its own .grad."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def weighted_sum_loss(outputs, seed=1234):
    """Scalar loss sum(w_i * out_i) with reproducible random weights w_i."""
    generator = torch.Generator().manual_seed(seed)
    loss = 0
    for out in outputs:
        weights = torch.randn(out.shape, dtype=out.dtype, generator=generator)
        loss = loss + (out * weights).sum()
    return loss


def run_lstm(module, input, hx=None, lengths=None, loss_terms=(0, 1, 2)):
    """Forward + backward through ``module``.

    With ``lengths`` the padded ``input`` is packed (enforce_sorted=False) and the
    packed output's data is used. The loss weights the outputs selected by
    ``loss_terms`` (indices into (output, h_n, c_n)). Returns ``(outputs, grads)``
    where outputs = (output, h_n, c_n) and grads maps "input", "h0", "c0" (when
    ``hx`` is given) and every parameter name to its gradient.
    """
    input = input.detach().clone().requires_grad_()
    module_input = input
    if lengths is not None:
        module_input = pack_padded_sequence(input, lengths, batch_first=module.batch_first, enforce_sorted=False)
    module.zero_grad(set_to_none=True)
    if hx is None:
        output, (h_n, c_n) = module(module_input)
    else:
        hx = tuple(leaf_copies(hx))
        output, (h_n, c_n) = module(module_input, hx)
    if lengths is not None:
        output = output.data
    outputs = (output, h_n, c_n)
    weighted_sum_loss([outputs[index] for index in loss_terms]).backward()
    grads = {"input": input.grad}
    if hx is not None:
        grads["h0"], grads["c0"] = hx[0].grad, hx[1].grad
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return outputs, grads


def assert_matches_native(native, ext, input, hx=None, seed=None, **run_kwargs):
    """``run_lstm`` on both modules (each right after ``torch.manual_seed(seed)`` when a seed
    is given) and compare (output, h_n, c_n) and every gradient."""
    results = []
    for module in (native, ext):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(run_lstm(module, input, hx, **run_kwargs))
    (native_outputs, native_grads), (ext_outputs, ext_grads) = results
    compare(ext_outputs, native_outputs, msg="(output, h_n, c_n)")
    compare(ext_grads, native_grads, msg="grad")


def assert_same_error(native_call, ext_call):
    """``ext_call`` raises the same exception type with the same message as ``native_call``."""
    with pytest.raises(Exception) as native_error:
        native_call()
    with pytest.raises(Exception) as ext_error:
        ext_call()
    assert type(ext_error.value) is type(native_error.value), (
        f"native raised {type(native_error.value).__name__}: {native_error.value}; "
        f"lstm_ext raised {type(ext_error.value).__name__}: {ext_error.value}"
    )
    assert str(ext_error.value) == str(native_error.value)


# Prepended to subprocess scripts that must use the JIT build: the installed lstm_ext._C and a
# JIT build both register the torch.ops.lstm_ext namespace, so one process can hold only one.
# With _C unimportable, ``import lstm_ext`` builds its operators with ``lstm_ext.load()``.
HIDE_INSTALLED_EXTENSION = 'import sys\nsys.modules["lstm_ext._C"] = None\n'


def run_python(script, extensions_dir, *args):
    """Run ``script`` in a fresh interpreter with TORCH_EXTENSIONS_DIR=extensions_dir; fail unless it succeeds."""
    completed = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        pytest.fail(
            f"subprocess exited with {completed.returncode}\n"
            f"stdout:\n{_head_and_tail(completed.stdout)}\nstderr:\n{_head_and_tail(completed.stderr)}",
            pytrace=False,
        )


def _head_and_tail(text, chars=1500):
    """C++ aborts put the message first, Python tracebacks last: keep both ends."""
    return text if len(text) <= 2 * chars else f"{text[:chars]}\n[...]\n{text[-chars:]}"


@pytest.fixture(scope="session")
def jit_extensions_dir(tmp_path_factory):
    """A TORCH_EXTENSIONS_DIR in which lstm_ext's JIT build is compiled, once per test run."""
    if os.environ.get(SKIP_JIT_ENV_VAR) == "1":
        pytest.skip(f"{SKIP_JIT_ENV_VAR}=1")
    extensions_dir = tmp_path_factory.mktemp("torch_extensions")
    run_python(HIDE_INSTALLED_EXTENSION + "import lstm_ext\n", extensions_dir)
    assert list(extensions_dir.glob("*/*.so")), f"no JIT-built library under {extensions_dir}"
    return extensions_dir
