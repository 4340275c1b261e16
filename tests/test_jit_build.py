"""The JIT path (lstm_ext.load: torch.utils.cpp_extension.load of the same sources) matches the
installed build. Skipped with LSTM_EXT_SKIP_JIT=1; the build takes about a minute.

The installed lstm_ext._C and a JIT build register the same torch.ops.lstm_ext namespace, so the
JIT build runs in a subprocess that hides _C (see conftest.HIDE_INSTALLED_EXTENSION).
"""

import inspect

import pytest
import torch
from conftest import HIDE_INSTALLED_EXTENSION, PROJ_SIZE, compare, make_hx, make_input, make_lstm_pair, run_python

import lstm_ext

pytestmark = pytest.mark.jit_build


def run_cases(lstm, cases):
    """(outputs, grads of every tensor argument) of ``lstm`` for each saved case; also run by the subprocess."""
    results = []
    for case in cases:
        sequence, (h0, c0), params = (
            [t.clone().requires_grad_() if t.is_floating_point() else t for t in tensors]
            for tensors in (case["sequence"], case["hx"], case["params"])
        )
        outputs = lstm(*sequence, (h0, c0), params, *case["flags"])
        torch.autograd.backward(outputs, case["output_grads"])
        leaves = [t for t in (*sequence, h0, c0, *params) if t.requires_grad]
        results.append((outputs, [leaf.grad for leaf in leaves]))
    return results


JIT_WORKER = (
    HIDE_INSTALLED_EXTENSION
    + "import torch\nimport lstm_ext\n\n"
    + inspect.getsource(run_cases)
    + "\ntorch.save(run_cases(lstm_ext.lstm, torch.load(sys.argv[1])), sys.argv[2])\n"
)


def _case(num_layers, bidirectional, proj_size, bias, batch_first, packed):
    dtype = torch.float64
    native, _ = make_lstm_pair(
        dtype=dtype, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size, bias=bias
    )
    input = make_input(dtype, batch_first=batch_first)
    hx = list(make_hx(native, dtype))
    params = [p.detach() for p in native._flat_weights]
    with torch.no_grad():
        if packed:
            packed_input = torch.nn.utils.rnn.pack_padded_sequence(input, torch.tensor([5, 4, 2]))
            sequence = [packed_input.data, packed_input.batch_sizes]
            flags = (bias, num_layers, 0.0, True, bidirectional)
        else:
            sequence = [input]
            flags = (bias, num_layers, 0.0, True, bidirectional, batch_first)
        outputs = torch._VF.lstm(*sequence, hx, params, *flags)
    return dict(
        sequence=sequence, hx=hx, params=params, flags=flags, output_grads=[torch.randn_like(t) for t in outputs]
    )


def test_jit_build_matches_installed_extension(jit_extensions_dir, tmp_path):
    cases = [
        _case(num_layers=2, bidirectional=True, proj_size=PROJ_SIZE, bias=True, batch_first=False, packed=False),
        _case(num_layers=1, bidirectional=False, proj_size=0, bias=False, batch_first=True, packed=False),
        _case(num_layers=2, bidirectional=True, proj_size=0, bias=True, batch_first=False, packed=True),
    ]
    torch.save(cases, tmp_path / "cases.pt")

    run_python(JIT_WORKER, jit_extensions_dir, tmp_path / "cases.pt", tmp_path / "jit_results.pt")

    compare(torch.load(tmp_path / "jit_results.pt"), run_cases(lstm_ext.lstm, cases))


def test_load_after_import_raises_instead_of_registering_twice():
    # A second library registering torch.ops.lstm_ext would abort the process.
    with pytest.raises(RuntimeError, match="already loaded"):
        lstm_ext.load()
    input, h0, c0 = torch.randn(4, 2, 3), torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)
    params = [torch.randn(20, 3), torch.randn(20, 5)]
    args = (input, (h0, c0), params, False, 1, 0.0, False, False, False)
    torch.testing.assert_close(lstm_ext.lstm(*args), torch._VF.lstm(*args))
