"""Finite-difference checks of lstm_ext.lstm's hand-written backward (float64, tiny sizes)."""

import pytest
import torch
from conftest import leaf_copies, make_hx, make_input, make_lstm_pair, weighted_sum_loss
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

GRADCHECK_SIZES = dict(input_size=2, hidden_size=3)
SEQ_LEN = 3
BATCH = 2
DROPOUT_SEED = 7

GRADCHECK_CONFIGS = [
    pytest.param(dict(num_layers=1, bidirectional=False), id="layers1-uni"),
    pytest.param(dict(num_layers=1, bidirectional=True), id="layers1-bi"),
    pytest.param(dict(num_layers=2, bidirectional=False), id="layers2-uni"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=2), id="layers2-bi-proj"),
    pytest.param(dict(num_layers=2, bidirectional=True, bias=False), id="layers2-bi-nobias"),
    pytest.param(dict(num_layers=2, bidirectional=False, proj_size=1, batch_first=True), id="layers2-uni-proj-batchfirst"),
]


def _lstm_inputs(config, lengths=None):
    """Leaf tensors (input, h0, c0, *flat weights) and an ``lstm_ext.lstm`` closure over them.

    With ``lengths`` the input is packed and the closure uses the packed overload (the
    first leaf is then the packed data).
    """
    dtype = torch.float64
    native, _ = make_lstm_pair(dtype=dtype, **GRADCHECK_SIZES, **config)
    input = make_input(
        dtype, seq_len=SEQ_LEN, batch=BATCH, input_size=GRADCHECK_SIZES["input_size"], batch_first=native.batch_first
    )
    if lengths is None:
        sequence_args, flags = (), (native.batch_first,)
    else:
        packed = pack_padded_sequence(input, lengths, batch_first=native.batch_first)
        input, sequence_args, flags = packed.data, (packed.batch_sizes,), ()
    leaves = leaf_copies([input, *make_hx(native, dtype, batch=BATCH), *native._flat_weights])

    def lstm(input, h0, c0, *weights):
        return lstm_ext.lstm(
            input,
            *sequence_args,
            (h0, c0),
            list(weights),
            native.bias,
            native.num_layers,
            0.0,
            True,
            native.bidirectional,
            *flags,
        )

    return lstm, leaves


@pytest.mark.parametrize("config", GRADCHECK_CONFIGS)
def test_gradcheck_input_hidden_and_weights(config):
    lstm, leaves = _lstm_inputs(config)
    assert torch.autograd.gradcheck(lstm, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# Packed input with bidirectional, projected and batch_first models.
@pytest.mark.parametrize("config", GRADCHECK_CONFIGS[1::2])
def test_gradcheck_packed_sequence(config):
    lstm, leaves = _lstm_inputs(config, lengths=torch.tensor([SEQ_LEN, SEQ_LEN - 2]))
    assert torch.autograd.gradcheck(lstm, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# torch.ops.lstm_ext.forward itself (what a traced or exported graph, or a C++ program, calls) is
# differentiated by its C++ autograd, which keeps a workspace whenever a gradient is needed.
@pytest.mark.parametrize("need_workspace", [False, True], ids=["no_workspace_asked", "workspace_asked"])
@pytest.mark.parametrize("config", [c for c in GRADCHECK_CONFIGS if "batch_first" not in c.values[0]])
def test_gradcheck_the_operator_through_its_cpp_autograd(config, need_workspace):
    forward, leaves = _operator_inputs(config, need_workspace)

    def operator(*leaves):
        output, hy, cy, workspace = forward(*leaves)
        assert bool(workspace) == need_workspace and output.grad_fn is not None
        return output, hy, cy

    assert torch.autograd.gradcheck(operator, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("config", [c for c in GRADCHECK_CONFIGS if "batch_first" not in c.values[0]])
def test_gradgradcheck_the_operator_through_its_cpp_autograd(config):
    """create_graph through the C++ autograd differentiates the recomputation, as lstm_ext.lstm does."""
    forward, leaves = _operator_inputs(config, need_workspace=False)
    assert torch.autograd.gradgradcheck(lambda *leaves: forward(*leaves)[:3], leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def _operator_inputs(config, need_workspace):
    """torch.ops.lstm_ext.forward as a function of the leaves (input, h0, c0, *weights), and the leaves."""
    dtype = torch.float64
    native, _ = make_lstm_pair(dtype=dtype, **GRADCHECK_SIZES, **config)
    input = make_input(dtype, seq_len=SEQ_LEN, batch=BATCH, input_size=GRADCHECK_SIZES["input_size"])
    leaves = leaf_copies([input, *make_hx(native, dtype, batch=BATCH), *native._flat_weights])
    options = (native.bias, native.num_layers, 0.0, True, native.bidirectional, need_workspace)

    def forward(input, h0, c0, *weights):
        return torch.ops.lstm_ext.forward(input, None, h0, c0, weights, *options)

    return forward, leaves


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gradient_penalty_through_the_operator_equals_lstm_ext_lstms(packed):
    """With dropout in training (the recomputation replays the forward's masks) and packed input."""
    dtype = torch.float64
    native, _ = make_lstm_pair(dtype=dtype, **GRADCHECK_SIZES, num_layers=2, bidirectional=True)
    input = make_input(dtype, seq_len=SEQ_LEN, batch=BATCH, input_size=GRADCHECK_SIZES["input_size"])
    batch_sizes = None
    if packed:
        input, batch_sizes = pack_padded_sequence(input, torch.tensor([SEQ_LEN, SEQ_LEN - 2]))[:2]
    leaves = leaf_copies([input, *make_hx(native, dtype, batch=BATCH), *native._flat_weights])
    options = (True, 2, 0.5, True, True)
    sequence = () if batch_sizes is None else (batch_sizes,)
    flags = (False,) if batch_sizes is None else ()

    def function(input, h0, c0, *weights):
        return lstm_ext.lstm(input, *sequence, (h0, c0), list(weights), *options, *flags)

    def operator(input, h0, c0, *weights):
        return torch.ops.lstm_ext.forward(input, batch_sizes, h0, c0, weights, *options, False)[:3]

    penalties = []
    for f in (function, operator):
        torch.manual_seed(DROPOUT_SEED)
        grads = torch.autograd.grad(weighted_sum_loss(f(*leaves)), leaves, create_graph=True)
        penalty = sum(grad.pow(2).sum() for grad in grads)
        penalties.append(torch.autograd.grad(penalty, leaves))
    for from_function, from_operator in zip(*penalties):
        torch.testing.assert_close(from_operator, from_function, rtol=1e-10, atol=1e-10)


def test_batched_gradients_through_the_operator_equal_a_loop():
    dtype = torch.float64
    native, _ = make_lstm_pair(dtype=dtype, **GRADCHECK_SIZES, num_layers=2, bidirectional=True)
    input = make_input(dtype, seq_len=SEQ_LEN, batch=BATCH, input_size=GRADCHECK_SIZES["input_size"])
    input, h0, c0 = leaf_copies([input, *make_hx(native, dtype, batch=BATCH)])
    output = torch.ops.lstm_ext.forward(input, None, h0, c0, native._flat_weights, True, 2, 0.0, True, True, False)[0]
    vectors = torch.randn(4, *output.shape, dtype=dtype)
    batched = torch.autograd.grad(output, (input, h0), vectors, is_grads_batched=True, retain_graph=True)
    looped = [torch.autograd.grad(output, (input, h0), vector, retain_graph=True) for vector in vectors]
    for index, grads in enumerate(zip(*looped)):
        torch.testing.assert_close(batched[index], torch.stack(grads), rtol=1e-10, atol=1e-10)
