"""Shapes aimed at the edges of the packed-weight product kernel (csrc/blas.h).

Each case forces one path of the kernel's blocking and is compared with native, forward and
backward: products deeper than one depth block (input, hidden or projection size above 256),
more rows than one row block (T·B above 96), batches that leave 1-, 2- and 3-row tiles (the
1- and 2-row tiles walk several panels at once), hidden sizes that are and are not whole
panels (16 float / 8 double columns), with and without projections, split between threads.
The same cases reach the weight gradients' transposed product (dgatesᵀ·x): more steps·batch
than one depth block (many_rows), more gate rows than one row block (deep_hidden), input and
hidden sizes that leave a narrow last panel.

Every case runs twice: over a few steps, whose few rows read the weights as stored (forward as
cᵀ = W·aᵀ or by dot products along the weight's rows, backward by its rows as panels), and over
enough steps to pack them.
"""

import pytest
import torch

import lstm_ext

from conftest import assert_matches_native, make_hx, make_input, make_lstm_pair, run_lstm

SEQ_LEN = 4
MAX_UNPACKED_ROWS = 64  # PackedCell::kMaxUnpackedRows: calls over more rows (steps · batch) pack the weights

CASES = {
    "deep_input": dict(input_size=300, hidden_size=16, batch=2),
    "deep_hidden": dict(input_size=5, hidden_size=264, batch=3),
    "deep_projection": dict(input_size=5, hidden_size=272, proj_size=40, batch=7),
    "whole_panels_one_row": dict(input_size=8, hidden_size=64, batch=1),
    "ragged_panels_two_rows": dict(input_size=8, hidden_size=70, batch=2),
    "many_rows": dict(input_size=9, hidden_size=33, batch=97),
    "panel_narrower_than_a_vector": dict(input_size=3, hidden_size=3, proj_size=2, batch=13),
}


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_edges_match_native(num_threads, dtype, bidirectional, case, packed):
    case = dict(case)
    batch = case.pop("batch")
    seq_len = max(SEQ_LEN, MAX_UNPACKED_ROWS // batch + 1) if packed else SEQ_LEN
    native, ext = make_lstm_pair(dtype=dtype, bidirectional=bidirectional, **case)
    input = make_input(dtype, seq_len=seq_len, batch=batch, input_size=case["input_size"])
    assert_matches_native(native, ext, input, make_hx(native, dtype, batch=batch))


WEIGHT_MAJOR_CASES = {
    "ragged_gate_blocks": dict(input_size=300, hidden_size=70),
    "deep_hidden": dict(input_size=20, hidden_size=264),
    "projection": dict(input_size=300, hidden_size=70, proj_size=40),
}


@pytest.mark.parametrize("batch", [9, 17, 33, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", WEIGHT_MAJOR_CASES.values(), ids=WEIGHT_MAJOR_CASES.keys())
def test_a_step_of_a_few_dozen_rows_matches_native(num_threads, dtype, case, batch):
    # One step of 17-64 rows (9-64 in double) multiplies by the unpacked weights as cᵀ = W·aᵀ
    # (blas.h: weight_major_products): batches that fill part of a panel (32 float / 16 double
    # lanes), one, and two or more, with gate blocks that are not whole tiles and depths past one
    # depth block.
    native, ext = make_lstm_pair(dtype=dtype, bidirectional=True, **case)
    input = make_input(dtype, seq_len=1, batch=batch, input_size=case["input_size"])
    assert_matches_native(native, ext, input, make_hx(native, dtype, batch=batch))


@pytest.mark.parametrize("batch", [1, 20, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_step_of_no_input_features_adds_only_the_biases(num_threads, dtype, batch):
    # torch.lstm takes an input of no features (nn.LSTM refuses input_size=0): whichever product
    # its rows take (dot products, weight-major, packed), x·W_ihᵀ adds nothing. A call with
    # features first leaves its products' scratch memory holding numbers.
    hidden = 24
    weights = [torch.randn(4 * hidden, 0, dtype=dtype), torch.randn(4 * hidden, hidden, dtype=dtype),
               torch.randn(4 * hidden, dtype=dtype), torch.randn(4 * hidden, dtype=dtype)]
    hx = (torch.randn(1, batch, hidden, dtype=dtype), torch.randn(1, batch, hidden, dtype=dtype))
    options = (True, 1, 0.0, False, False, False)
    with_features = [torch.randn(4 * hidden, 5, dtype=dtype), *weights[1:]]
    lstm_ext.lstm(torch.randn(1, batch, 5, dtype=dtype), hx, with_features, *options)
    input = torch.randn(1, batch, 0, dtype=dtype)
    for actual, expected in zip(lstm_ext.lstm(input, hx, weights, *options), torch._VF.lstm(input, hx, weights, *options)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_step_over_a_weight_past_a_cores_cache_matches_native(num_threads, dtype, batch):
    # Weights of 1 MB or more (blas.h: kSplitWeightBytes): a step of a few rows splits the input
    # projection, the recurrent product and the weight gradients between threads whatever its
    # arithmetic, in uneven shares here (260 and 182 units are not whole panels).
    hidden = 260 if dtype == torch.float32 else 182
    native, ext = make_lstm_pair(dtype=dtype, input_size=hidden, hidden_size=hidden)
    input = make_input(dtype, seq_len=1, batch=batch, input_size=hidden)
    assert_matches_native(native, ext, input, make_hx(native, dtype, batch=batch))


@pytest.mark.parametrize("proj_size", [0, 40], ids=["noproj", "proj"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_results_are_bitwise_repeatable(num_threads, dtype, proj_size):
    # Big enough to split steps, directions and the weight gradients between threads, with
    # products deeper than one depth block (walked in alternating order from step to step).
    _, ext = make_lstm_pair(dtype=dtype, input_size=300, hidden_size=272, proj_size=proj_size, num_layers=2,
                            bidirectional=True)
    input = make_input(dtype, seq_len=5, batch=20, input_size=300)
    hx = make_hx(ext, dtype, batch=20)
    (outputs, grads), (outputs_again, grads_again) = run_lstm(ext, input, hx), run_lstm(ext, input, hx)
    for first, second in zip(outputs, outputs_again):
        assert torch.equal(first, second)
    assert grads.keys() == grads_again.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_again[name]), name
