"""PackedSequence input: lstm_ext against native on variable-length batches.

The packed path is the general one in lstm_ext (dense input is packed input whose batch sizes
are all equal), so these cases exercise the shrinking batch (forward direction), the growing
batch (reverse direction) and the per-sequence final states.
"""

import itertools

import pytest
import torch
from torch import _VF
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_ext
from conftest import INPUT_SIZE, assert_matches_native, compare, leaf_copies, make_hx, make_input, make_lstm_pair

LENGTHS = {
    "mixed": [5, 2, 4, 1, 3],
    "all_equal": [4, 4, 4, 4, 4],
    "all_one": [1, 1, 1, 1, 1],
    "one_long": [1, 5, 1, 1, 1],
}
CONFIGS = [
    dict(num_layers=layers, bidirectional=bidirectional, proj_size=proj_size, bias=bias)
    for layers, bidirectional, proj_size, bias in itertools.product((1, 2), (False, True), (0, 2), (True, False))
]


def config_id(config):
    return "-".join(f"{key}={value}" for key, value in config.items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_unsorted_packed_matches_native(dtype, config, lengths):
    native, ext = make_lstm_pair(dtype=dtype, **config)
    input = make_input(dtype, seq_len=max(lengths), batch=len(lengths))
    hx = make_hx(native, dtype, batch=len(lengths))
    assert_matches_native(native, ext, input, hx, lengths=torch.tensor(lengths))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_module_options(batch_first, with_hx):
    native, ext = make_lstm_pair(num_layers=2, bidirectional=True, batch_first=batch_first)
    lengths = torch.tensor(LENGTHS["mixed"])
    input = make_input(torch.float64, seq_len=5, batch=5, batch_first=batch_first)
    hx = make_hx(native, torch.float64, batch=5) if with_hx else None
    assert_matches_native(native, ext, input, hx, lengths=lengths)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_sorted_packed_output_is_a_packed_sequence(dtype, bidirectional):
    native, ext = make_lstm_pair(dtype=dtype, num_layers=2, bidirectional=bidirectional)
    lengths = sorted(LENGTHS["mixed"], reverse=True)
    packed = pack_padded_sequence(make_input(dtype, seq_len=5, batch=5), lengths)
    (native_output, native_state), (ext_output, ext_state) = native(packed), ext(packed)
    assert type(ext_output) is type(native_output)
    assert torch.equal(ext_output.batch_sizes, native_output.batch_sizes)
    assert ext_output.sorted_indices is None and ext_output.unsorted_indices is None
    compare((ext_output.data, *ext_state), (native_output.data, *native_state))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_functional_packed_overload_matches_vf(bidirectional, proj_size):
    native, _ = make_lstm_pair(num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    packed = pack_padded_sequence(make_input(torch.float64, seq_len=5, batch=5), sorted(LENGTHS["mixed"], reverse=True))
    h0, c0 = make_hx(native, torch.float64, batch=5)
    results = []
    for lstm in (_VF.lstm, lstm_ext.lstm):
        data, *weights = leaf_copies([packed.data, *native._flat_weights])
        state = leaf_copies([h0, c0])
        output, h_n, c_n = lstm(data, packed.batch_sizes, state, weights, True, 2, 0.0, False, bidirectional)
        (output.sin().sum() + h_n.cos().sum() + (c_n * c_n).sum()).backward()
        results.append([output, h_n, c_n, data.grad, state[0].grad, state[1].grad, *[w.grad for w in weights]])
    compare(results[1], results[0])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_each_sequence_alone_equals_its_slice_of_the_packed_run(bidirectional):
    _, ext = make_lstm_pair(num_layers=2, bidirectional=bidirectional, proj_size=2)
    lengths = LENGTHS["mixed"]
    input = make_input(torch.float64, seq_len=max(lengths), batch=len(lengths))
    packed_output, (h_n, c_n) = ext(pack_padded_sequence(input, torch.tensor(lengths), enforce_sorted=False))
    padded_output, _ = pad_packed_sequence(packed_output)
    for index, length in enumerate(lengths):
        alone_output, (alone_h, alone_c) = ext(input[:length, index])
        compare(padded_output[:length, index], alone_output)
        compare(h_n[:, index], alone_h)
        compare(c_n[:, index], alone_c)
    assert torch.all(padded_output[max(lengths) :] == 0)


def test_packed_equals_dense_when_all_lengths_are_equal():
    _, ext = make_lstm_pair(num_layers=2, bidirectional=True)
    input = make_input(torch.float64, seq_len=4, batch=3)
    dense_output, dense_state = ext(input)
    packed_output, packed_state = ext(pack_padded_sequence(input, [4, 4, 4]))
    compare(packed_output.data, dense_output.reshape(-1, dense_output.shape[-1]))
    compare(packed_state, dense_state)


@pytest.mark.parametrize(
    "batch_sizes, message",
    [
        ([1, 2, 2], "non-increasing"),
        ([2, 2, 1], "sum to 5"),
        ([2, 2, 2, 0], "positive"),
    ],
)
def test_malformed_batch_sizes_raise(batch_sizes, message):
    native, _ = make_lstm_pair()
    data = torch.randn(6, INPUT_SIZE, dtype=torch.float64)
    h0, c0 = make_hx(native, torch.float64, batch=max(batch_sizes))
    with pytest.raises(RuntimeError, match=message):
        lstm_ext.lstm(data, torch.tensor(batch_sizes), (h0, c0), native._flat_weights, True, 1, 0.0, False, False)
