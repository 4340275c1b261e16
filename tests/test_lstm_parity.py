"""lstm_ext.LSTM / lstm_ext.lstm against torch.nn.LSTM / torch._VF.lstm: values and gradients."""

import itertools

import pytest
import torch
from conftest import (
    PROJ_SIZE,
    assert_matches_native,
    compare,
    leaf_copies,
    make_hx,
    make_input,
    make_lstm_pair,
    weighted_sum_loss,
)
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

NUM_LAYERS = [1, 2, 3]
BIDIRECTIONAL = [False, True]
PROJ_SIZES = [0, PROJ_SIZE]
BIAS = [True, False]
BATCH_FIRST = [False, True]
HX_GIVEN = [True, False]
UNBATCHED = [False, True]

FULL_PRODUCT = list(
    itertools.product(NUM_LAYERS, BIDIRECTIONAL, PROJ_SIZES, BIAS, BATCH_FIRST, HX_GIVEN, UNBATCHED)
)


def _case_id(case):
    num_layers, bidirectional, proj_size, bias, batch_first, hx_given, unbatched = case
    return "-".join(
        [
            f"layers{num_layers}",
            "bi" if bidirectional else "uni",
            f"proj{proj_size}",
            "bias" if bias else "nobias",
            "batchfirst" if batch_first else "seqfirst",
            "hx" if hx_given else "nohx",
            "unbatched" if unbatched else "batched",
        ]
    )


PARITY_CASES = [
    pytest.param(dtype, *case, id=f"{str(dtype).removeprefix('torch.')}-{_case_id(case)}")
    for dtype in (torch.float64, torch.float32)
    for case in FULL_PRODUCT
]


@pytest.mark.parametrize(
    "dtype, num_layers, bidirectional, proj_size, bias, batch_first, hx_given, unbatched", PARITY_CASES
)
def test_module_forward_and_gradients_match_native(
    dtype, num_layers, bidirectional, proj_size, bias, batch_first, hx_given, unbatched
):
    native, ext = make_lstm_pair(
        dtype=dtype,
        num_layers=num_layers,
        bidirectional=bidirectional,
        proj_size=proj_size,
        bias=bias,
        batch_first=batch_first,
    )
    input = make_input(dtype, batch_first=batch_first, unbatched=unbatched)
    hx = make_hx(native, dtype, unbatched=unbatched) if hx_given else None

    assert_matches_native(native, ext, input, hx)


@pytest.mark.parametrize("seq_len, batch", [(1, 3), (5, 1), (1, 1)], ids=["seq1", "batch1", "seq1-batch1"])
@pytest.mark.parametrize("proj_size", PROJ_SIZES, ids=lambda p: f"proj{p}")
@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL, ids=["uni", "bi"])
def test_degenerate_lengths_match_native(seq_len, batch, proj_size, bidirectional):
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    input = make_input(dtype, seq_len=seq_len, batch=batch)
    hx = make_hx(native, dtype, batch=batch)

    assert_matches_native(native, ext, input, hx)


@pytest.mark.parametrize("grad_disabling_context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("hx_given", HX_GIVEN, ids=["hx", "nohx"])
@pytest.mark.parametrize(
    "num_layers, bidirectional, proj_size",
    [(1, False, 0), (2, True, 0), (3, True, PROJ_SIZE)],
    ids=["layers1-uni", "layers2-bi", "layers3-bi-proj"],
)
def test_inference_path_matches_native_and_grad_mode(
    grad_disabling_context, hx_given, num_layers, bidirectional, proj_size
):
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size)
    input = make_input(dtype)
    args = (input, make_hx(native, dtype)) if hx_given else (input,)

    with grad_disabling_context():
        native_output, native_hidden = native(*args)
        ext_output, ext_hidden = ext(*args)
    grad_mode_output, grad_mode_hidden = ext(*args)

    assert not ext_output.requires_grad
    compare((ext_output, *ext_hidden), (native_output, *native_hidden))
    compare((ext_output, *ext_hidden), (grad_mode_output.detach(), *(h.detach() for h in grad_mode_hidden)))


@pytest.mark.parametrize("proj_size", PROJ_SIZES, ids=lambda p: f"proj{p}")
@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL, ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", BATCH_FIRST, ids=["seqfirst", "batchfirst"])
def test_packed_sequence_module_matches_native(proj_size, bidirectional, batch_first):
    dtype = torch.float64
    native, ext = make_lstm_pair(
        dtype=dtype, num_layers=2, bidirectional=bidirectional, proj_size=proj_size, batch_first=batch_first
    )
    input = make_input(dtype, batch=4, batch_first=batch_first)
    hx = make_hx(native, dtype, batch=4)
    unsorted_lengths = torch.tensor([3, 5, 1, 4])

    assert_matches_native(native, ext, input, hx, lengths=unsorted_lengths)


FUNCTIONAL_CONFIGS = [
    pytest.param(1, False, 0, True, False, True, id="layers1-uni-bias-seqfirst"),
    pytest.param(2, True, 0, True, True, True, id="layers2-bi-bias-batchfirst"),
    pytest.param(2, True, PROJ_SIZE, False, False, True, id="layers2-bi-proj-nobias"),
    pytest.param(3, False, PROJ_SIZE, True, True, True, id="layers3-uni-proj-batchfirst"),
    pytest.param(2, True, PROJ_SIZE, True, False, False, id="layers2-bi-proj-eval"),
]


def _run_functional(lstm_fn, input, batch_sizes, hx, params, *flags):
    """Call ``lstm_fn`` (dense form when ``batch_sizes`` is None, else packed form) on fresh
    leaves and backprop a weighted loss; returns (outputs, grads of (input, h0, c0, *params))."""
    input, h0, c0, *params = leaf_copies([input, *hx, *params])
    sequence_args = (input,) if batch_sizes is None else (input, batch_sizes)
    outputs = lstm_fn(*sequence_args, (h0, c0), params, *flags)
    weighted_sum_loss(outputs).backward()
    return outputs, [leaf.grad for leaf in (input, h0, c0, *params)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("num_layers, bidirectional, proj_size, bias, batch_first, train", FUNCTIONAL_CONFIGS)
def test_functional_lstm_matches_vf_lstm(dtype, num_layers, bidirectional, proj_size, bias, batch_first, train):
    native, _ = make_lstm_pair(
        dtype=dtype, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size, bias=bias
    )
    input = make_input(dtype, batch_first=batch_first)
    hx = make_hx(native, dtype)
    flags = (bias, num_layers, 0.0, train, bidirectional, batch_first)

    vf_outputs, vf_grads = _run_functional(torch._VF.lstm, input, None, hx, native._flat_weights, *flags)
    ext_outputs, ext_grads = _run_functional(lstm_ext.lstm, input, None, hx, native._flat_weights, *flags)

    compare(ext_outputs, vf_outputs, msg="(output, h_n, c_n)")
    compare(ext_grads, vf_grads, msg="grads of (input, h0, c0, *params)")


@pytest.mark.parametrize("proj_size", PROJ_SIZES, ids=lambda p: f"proj{p}")
@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL, ids=["uni", "bi"])
def test_functional_packed_lstm_matches_vf_lstm(proj_size, bidirectional):
    dtype = torch.float64
    num_layers = 2
    native, _ = make_lstm_pair(dtype=dtype, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size)
    packed = pack_padded_sequence(make_input(dtype, batch=3), torch.tensor([5, 3, 2]))
    hx = make_hx(native, dtype)
    flags = (True, num_layers, 0.0, True, bidirectional)
    sequence = (packed.data, packed.batch_sizes)

    vf_outputs, vf_grads = _run_functional(torch._VF.lstm, *sequence, hx, native._flat_weights, *flags)
    ext_outputs, ext_grads = _run_functional(lstm_ext.lstm, *sequence, hx, native._flat_weights, *flags)

    compare(ext_outputs, vf_outputs, msg="(output data, h_n, c_n)")
    compare(ext_grads, vf_grads, msg="grads of (data, h0, c0, *params)")


@pytest.mark.parametrize(
    "input_size, hidden_size, proj_size, seq_len, batch",
    [(1, 1, 0, 4, 2), (7, 3, 0, 6, 5), (5, 6, 1, 3, 2), (2, 8, 7, 9, 3), (16, 32, 8, 20, 4)],
    ids=lambda size: str(size),
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_varied_sizes_match_native(dtype, input_size, hidden_size, proj_size, seq_len, batch):
    native, ext = make_lstm_pair(
        dtype=dtype,
        input_size=input_size,
        hidden_size=hidden_size,
        proj_size=proj_size,
        num_layers=2,
        bidirectional=True,
    )
    input = make_input(dtype, seq_len=seq_len, batch=batch, input_size=input_size)
    hx = make_hx(native, dtype, batch=batch)

    assert_matches_native(native, ext, input, hx)


@pytest.mark.parametrize("loss_terms", [(0,), (1,), (2,), (1, 2)], ids=["output", "h_n", "c_n", "h_n+c_n"])
@pytest.mark.parametrize("proj_size", PROJ_SIZES, ids=lambda p: f"proj{p}")
def test_gradients_when_loss_uses_only_some_outputs(loss_terms, proj_size):
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, num_layers=2, bidirectional=True, proj_size=proj_size)
    input = make_input(dtype)
    hx = make_hx(native, dtype)

    assert_matches_native(native, ext, input, hx, loss_terms=loss_terms)


def test_non_contiguous_input_and_hidden_match_native():
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, num_layers=2, bidirectional=True, proj_size=PROJ_SIZE)
    input = make_input(dtype, batch_first=True).transpose(0, 1)
    # Dense but permuted, so the clones made before the forward keep these strides.
    hx = tuple(state.transpose(0, 1).contiguous().transpose(0, 1) for state in make_hx(native, dtype))
    assert not any(tensor.is_contiguous() for tensor in (input, *hx))
    assert all(tensor.clone().stride() == tensor.stride() for tensor in (input, *hx))

    assert_matches_native(native, ext, input, hx)
