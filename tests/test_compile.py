"""lstm_ext's operators under torch.library.opcheck, torch.compile, torch.export and torch.jit.trace.

Compiled and exported runs are checked against native eager ``nn.LSTM`` / ``torch._VF.lstm``
(values and gradients). Dynamo refuses every ``nn.LSTM`` instance, ``lstm_ext.LSTM`` included,
unless ``torch._dynamo.config.allow_rnn`` is set, so module tests run under that patch (as the
README tells users to); the functional ``lstm_ext.lstm`` needs no flag.
"""

import pytest
import torch
import torch._dynamo
from conftest import (
    FULL_FEATURED,
    BATCH,
    HIDDEN_SIZE,
    INPUT_SIZE,
    SEQ_LEN,
    assert_matches_native,
    compare,
    leaf_copies,
    make_hx,
    make_input,
    make_lstm_pair,
    weighted_sum_loss,
)
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim
from torch.library import opcheck
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

DTYPE = torch.float64
# Packed batch of BATCH sequences of lengths 4, 3 and 2 (so batch_sizes[0] == BATCH).
PACKED_BATCH_SIZES = [3, 3, 2, 1]
LENGTHS = torch.tensor([SEQ_LEN, 2, SEQ_LEN - 1])
RNN_REFUSAL = "Attempted to wrap RNN, GRU, or LSTM"
allow_rnn = torch._dynamo.config.patch(allow_rnn=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no frame cached by an earlier test, and no test reaches
    the recompile limit (past which dynamo silently runs eager)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Model(nn.Module):
    """A user model holding an LSTM, compiled with ``Model.compile``.

    Dynamo traces the frame of this ``forward`` and inlines the LSTM. (Compiling a bare LSTM
    with ``nn.Module.compile`` traces neither ``_call_impl`` nor the LSTM's ``forward``: both
    code objects live in torch.nn, on dynamo's skip list, so only ``lstm_ext.lstm`` would be.)
    ``run_lstm`` reads ``batch_first`` to pack the input.
    """

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        self.batch_first = lstm.batch_first

    def forward(self, input, hx=None):
        return self.lstm(input, hx)


def compiled_model_pair(backend, dynamic=None, **config):
    """Native model (eager) and lstm_ext model compiled fullgraph by ``backend`` (a counter)."""
    native, ext = make_lstm_pair(**config)
    native_model, ext_model = Model(native), Model(ext)
    ext_model.compile(backend=backend, fullgraph=True, dynamic=dynamic)
    return native_model, ext_model


def outputs_and_grads(fn, tensors):
    """``fn(*leaves)`` on leaf copies of ``tensors`` (lists of tensors stay lists), then the
    gradient of a weighted sum of its outputs with respect to every leaf."""
    leaves = [leaf_copies(t) if isinstance(t, list) else leaf_copies([t])[0] for t in tensors]
    outputs = fn(*leaves)
    flat_leaves = [leaf for t in leaves for leaf in (t if isinstance(t, list) else [t])]
    grads = torch.autograd.grad(weighted_sum_loss(outputs), flat_leaves)
    return outputs, grads


# ---- torch.library.opcheck -------------------------------------------------------------------


def forward_op_args(num_layers=1, bidirectional=False, proj_size=0, bias=True, packed=False, requires_grad=True):
    """Arguments of ``torch.ops.lstm_ext.forward`` for an LSTM of this configuration.

    With ``requires_grad`` the tensors require grad and the op keeps a workspace, as
    ``lstm_ext.lstm`` calls it for training; without, it keeps none, as for inference.
    """
    _, ext = make_lstm_pair(num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size, bias=bias)
    if packed:
        batch_sizes = torch.tensor(PACKED_BATCH_SIZES)
        input = torch.randn(sum(PACKED_BATCH_SIZES), INPUT_SIZE, dtype=DTYPE)
    else:
        batch_sizes = None
        input = make_input(DTYPE)
    h0, c0 = make_hx(ext, DTYPE)
    tensors = [input, h0, c0, *ext._flat_weights]
    tensors = [t.detach().clone().requires_grad_(requires_grad) for t in tensors]
    input, h0, c0, *params = tensors
    return (input, batch_sizes, h0, c0, params, bias, num_layers, 0.0, False, bidirectional, requires_grad)


OPCHECK_CONFIGS = {
    "uni": dict(),
    "uni-inference": dict(requires_grad=False),
    "no-bias": dict(bias=False),
    "bi-2layers-proj": FULL_FEATURED,
    "bi-2layers-proj-inference": dict(FULL_FEATURED, requires_grad=False),
    "packed": dict(packed=True),
    "packed-bi-2layers-proj": dict(FULL_FEATURED, packed=True),
}


@pytest.mark.parametrize("config", OPCHECK_CONFIGS.values(), ids=OPCHECK_CONFIGS.keys())
def test_opcheck_forward(config):
    opcheck(torch.ops.lstm_ext.forward.default, forward_op_args(**config))


BACKWARD_GRADS = {
    "all": (True, True, True),
    "output-only": (True, False, False),
    "states-only": (False, True, True),
}


@pytest.mark.parametrize("grads_given", BACKWARD_GRADS.values(), ids=BACKWARD_GRADS.keys())
@pytest.mark.parametrize(
    "config", [dict(), dict(FULL_FEATURED, packed=True)], ids=["uni", "packed-bi-2layers-proj"]
)
def test_opcheck_backward_with_workspace_of_a_real_forward(config, grads_given):
    args = forward_op_args(**config)
    input, batch_sizes, h0, c0, params, has_biases, num_layers, _, _, bidirectional, _ = args
    output, hy, cy, workspace = torch.ops.lstm_ext.forward(*args)
    assert workspace, "a forward on tensors requiring grad keeps a workspace"
    grads = [torch.randn_like(t) if given else None for t, given in zip((output, hy, cy), grads_given)]
    detached = [t.detach() for t in (input, h0, c0)]
    backward_args = (
        detached[0], batch_sizes, *detached[1:], [p.detach() for p in params], [w.detach() for w in workspace],
        *grads, has_biases, num_layers, bidirectional,
    )  # fmt: skip
    opcheck(torch.ops.lstm_ext.backward.default, backward_args)


# ---- torch.compile of the module (under allow_rnn) ----------------------------------------------

COMPILE_CASES = [
    # backend, module config, pass (h_0, c_0), lengths to pack the input with (None: dense)
    pytest.param("aot_eager", dict(), False, None, id="aot_eager-defaults"),
    pytest.param("aot_eager", dict(FULL_FEATURED, batch_first=True), True, None, id="aot_eager-bi-proj-batchfirst-hx"),
    pytest.param("aot_eager", FULL_FEATURED, False, LENGTHS, id="aot_eager-packed-bi-proj"),
    # The one inductor test: the slowest backend (C++ kernels; ~20 s on a cold 2-core machine).
    pytest.param("inductor", dict(FULL_FEATURED, batch_first=True), True, None, id="inductor-bi-proj-batchfirst-hx"),
]


@pytest.mark.parametrize("backend, config, hx_given, lengths", COMPILE_CASES)
def test_compiled_module_matches_native_eager(backend, config, hx_given, lengths):
    counter = CompileCounterWithBackend(backend)
    native, ext = compiled_model_pair(counter, **config)
    input = make_input(DTYPE, batch_first=config.get("batch_first", False))
    hx = make_hx(native.lstm, DTYPE) if hx_given else None
    with allow_rnn:
        assert_matches_native(native, ext, input, hx, lengths=lengths)
    assert counter.frame_count >= 1, "the module ran without being compiled"


DYNAMIC_MODES = {
    # mode: (torch.compile's dynamic, mark the warm-up input's dims dynamic, warm-up (seq_len, batch))
    "dynamic=True": (True, False, [(SEQ_LEN, 6)]),
    "mark_dynamic": (None, True, [(SEQ_LEN, 6)]),
    # Default automatic dynamic: the first shape compiles static, the second recompiles dynamic.
    "automatic": (None, False, [(SEQ_LEN, 6), (SEQ_LEN + 2, 8)]),
}
# Sizes after the warm-up: none is 0 or 1 (which dynamo always specializes on).
NEW_SHAPES = [(SEQ_LEN + 1, 2), (2, 5), (3, BATCH)]


@pytest.mark.parametrize("mode", DYNAMIC_MODES.values(), ids=DYNAMIC_MODES.keys())
def test_dynamic_shapes_compile_once_for_new_sequence_lengths_and_batches(mode):
    """The warm-up calls as the checked calls do (input requiring grad, a guard), with sizes
    unlike each other and every module size: dynamo gives equal sizes one symbol (duck
    sizing), which a later shape would break."""
    dynamic, mark_dynamic, warm_up_shapes = mode
    counter = CompileCounterWithBackend("aot_eager")
    native, ext = compiled_model_pair(counter, dynamic, **FULL_FEATURED)
    with allow_rnn:
        for seq_len, batch in warm_up_shapes:
            input = make_input(DTYPE, seq_len=seq_len, batch=batch).requires_grad_()
            if mark_dynamic:
                torch._dynamo.mark_dynamic(input, 0)
                torch._dynamo.mark_dynamic(input, 1)
            ext(input)
        frames_after_warm_up = counter.frame_count
        assert frames_after_warm_up >= 1
        for seq_len, batch in NEW_SHAPES:
            assert_matches_native(native, ext, make_input(DTYPE, seq_len=seq_len, batch=batch))
    assert counter.frame_count == frames_after_warm_up, "a new sequence length or batch size recompiled"


# ---- what lstm_ext adds over native under torch.compile -----------------------------------------


@pytest.mark.parametrize("module_class", [nn.LSTM, lstm_ext.LSTM], ids=["native", "lstm_ext"])
def test_lstm_modules_are_refused_by_dynamo_without_allow_rnn(module_class):
    """Why the README has users patch allow_rnn: dynamo refuses any nn.LSTM instance."""
    model = Model(module_class(INPUT_SIZE, HIDDEN_SIZE).to(DTYPE))
    model.compile(fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(allow_rnn=False), pytest.raises(torch._dynamo.exc.Unsupported, match=RNN_REFUSAL):
        model(make_input(DTYPE))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_functional_lstm_compiles_fullgraph_without_allow_rnn(packed):
    args = forward_op_args(**FULL_FEATURED, packed=packed)
    input, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, _ = args
    options = (has_biases, num_layers, dropout, train, bidirectional)

    def call(lstm, input, h0, c0, params):
        if packed:
            return lstm(input, batch_sizes, (h0, c0), params, *options)
        return lstm(input, (h0, c0), params, *options, False)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda *tensors: call(lstm_ext.lstm, *tensors), fullgraph=True, backend=counter)
    tensors = [input, h0, c0, params]
    with torch._dynamo.config.patch(allow_rnn=False):
        actual = outputs_and_grads(compiled, tensors)
    expected = outputs_and_grads(lambda *t: call(torch._VF.lstm, *t), tensors)
    assert counter.frame_count == 1
    compare(actual, expected)


def test_packed_sequence_compiles_fullgraph_with_lstm_ext_but_not_native():
    """Native's packed LSTM decomposes into ops on data-dependent sizes, which fullgraph rejects;
    lstm_ext's operator has a fake implementation for packed input."""
    counter = CompileCounterWithBackend("aot_eager")
    native, ext = compiled_model_pair(counter, **FULL_FEATURED)
    native_compiled = torch.compile(native, fullgraph=True, backend="aot_eager")
    input = make_input(DTYPE)
    with allow_rnn:
        with pytest.raises(torch._dynamo.exc.UserError, match="data-dependent"):
            native_compiled(pack_padded_sequence(input, LENGTHS, enforce_sorted=False))
        assert_matches_native(native, ext, input, lengths=LENGTHS)
    assert counter.frame_count >= 1


# ---- torch.export -------------------------------------------------------------------------------


# nn.LSTM's own warning (native export warns the same): export sees _flat_weights reassigned.
@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights")
@pytest.mark.parametrize(
    "config", [dict(), dict(FULL_FEATURED, batch_first=True)], ids=["defaults", "bi-proj-batchfirst"]
)
def test_exported_module_matches_native_on_new_shapes(config):
    native, ext = make_lstm_pair(**config)
    batch_first = config.get("batch_first", False)
    example = make_input(DTYPE, batch_first=batch_first)
    exported = torch.export.export(ext, (example,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    assert torch.ops.lstm_ext.forward.default in {node.target for node in exported.graph.nodes}
    module = exported.module()
    for seq_len, batch in [(SEQ_LEN, BATCH), *NEW_SHAPES]:
        input = make_input(DTYPE, seq_len=seq_len, batch=batch, batch_first=batch_first)
        assert_matches_native(native, module, input)


@pytest.mark.parametrize(
    "config", [dict(), dict(FULL_FEATURED, batch_first=True)], ids=["defaults", "bi-proj-batchfirst"]
)
def test_traced_module_matches_native_on_new_shapes_before_and_after_save_and_load(config, tmp_path):
    native, ext = make_lstm_pair(**config)
    batch_first = config.get("batch_first", False)
    traced = torch.jit.trace(ext, make_input(DTYPE, batch_first=batch_first))
    assert "lstm_ext::forward" in str(traced.graph)
    torch.jit.save(traced, tmp_path / "lstm.pt")
    for module in (traced, torch.jit.load(tmp_path / "lstm.pt")):
        for seq_len, batch in [(SEQ_LEN, BATCH), *NEW_SHAPES]:
            input = make_input(DTYPE, seq_len=seq_len, batch=batch, batch_first=batch_first)
            assert_matches_native(native, module, input)
