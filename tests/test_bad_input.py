"""Bad input raises a clear Python exception from every entry point, never a crash (issue 6).

Native is the oracle where its own validation catches the problem: lstm_ext raises the same
exception type, and through the modules the same message too (that is what users see and match
on). On much of this input native's functional ops do not validate at all: they segfault or
corrupt the heap (an hx with the wrong batch size, a 2-D input, empty packed batch_sizes),
silently compute garbage (a weight of the wrong shape, an input_size mismatch, a 0 in
batch_sizes), or fail deep inside a kernel with a message about something else ("mat1 and mat2
must have the same dtype", "select(): index 2 out of range"). Those cases never run native
in-process; lstm_ext must raise a RuntimeError or ValueError whose message names the problem.
"""

import math

import pytest
import torch
from conftest import BATCH, HIDDEN_SIZE, INPUT_SIZE, PROJ_SIZE, SEQ_LEN, make_hx, make_input
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_ext

DTYPE = torch.float64
NUM_LAYERS = 2
# Two layers, two directions: per layer-direction the params are w_ih, w_hh, b_ih, b_hh (, w_hr).
LAYER1_WEIGHT_IH = 2 * 4  # index of weight_ih_l1 in the flat list without projections
CLEAR_ERRORS = (RuntimeError, ValueError)


def _dense_args(proj_size=0):
    """Valid arguments of the dense ``lstm(input, hx, params, ...)``, by name, for cases to spoil."""
    torch.manual_seed(0)
    module = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS, bidirectional=True, proj_size=proj_size).to(DTYPE)
    return dict(
        input=make_input(DTYPE),
        hx=list(make_hx(module, DTYPE)),
        params=list(module._flat_weights),
        has_biases=True,
        num_layers=NUM_LAYERS,
        dropout=0.0,
        train=True,
        bidirectional=True,
        batch_first=False,
    )


def _shared_args(args):
    """The arguments both _VF.lstm overloads take, in their order, from hx to bidirectional."""
    names = ("params", "has_biases", "num_layers", "dropout", "train", "bidirectional")
    return (tuple(args["hx"]), *(args[name] for name in names))


def _call_dense(lstm, args):
    return lstm(args["input"], *_shared_args(args), args["batch_first"])


def _set(key, make):
    """A case that replaces ``args[key]`` with ``make(args)``."""

    def spoil(args):
        args[key] = make(args)

    return spoil


def _set_item(key, index, make):
    """A case that replaces ``args[key][index]`` with ``make(that item)``."""

    def spoil(args):
        args[key][index] = make(args[key][index])

    return spoil


def _batch_first_1d_input(args):
    args["batch_first"] = True
    args["input"] = args["input"][0, 0]


def _seq_len_zero_batch_first(args):
    args["batch_first"] = True
    args["input"] = args["input"].transpose(0, 1)[:, :0]


# (case, message pattern, configuration): lstm_ext must raise a clear error; native is not run.
DENSE_CASES = [
    pytest.param(_set("input", lambda a: a["input"][0]), "3-D", {}, id="2d-input"),
    pytest.param(_set("input", lambda a: a["input"][None]), "3-D", {}, id="4d-input"),
    # batch_first transposes the input before anything checks it.
    pytest.param(_batch_first_1d_input, "3-D", {}, id="1d-input-batch-first"),
    pytest.param(
        _set("input", lambda a: torch.randn(SEQ_LEN, BATCH, INPUT_SIZE + 1, dtype=DTYPE)),
        "weight_ih",
        {},
        id="input-size-mismatch",
    ),
    pytest.param(_set("input", lambda a: a["input"].long()), "floating point", {}, id="integer-input"),
    pytest.param(_set("input", lambda a: a["input"].to(torch.complex128)), "floating point", {}, id="complex-input"),
    pytest.param(_set("input", lambda a: a["input"].to_sparse()), "layout", {}, id="sparse-input"),
    pytest.param(_set_item("hx", 0, lambda h: h.to_sparse()), "layout", {}, id="sparse-hx"),
    pytest.param(_set_item("params", 0, lambda w: w.to_sparse()), "layout", {}, id="sparse-weight"),
    pytest.param(_set_item("hx", 0, lambda h: h[:, :-1]), "hx", {}, id="hx-batch-mismatch"),
    pytest.param(_set_item("hx", 0, lambda h: h[0]), "hx", {}, id="hx-2d"),
    pytest.param(_set_item("hx", 0, lambda h: h[:-1]), "hx", {}, id="hx-too-few-layers"),
    pytest.param(_set_item("hx", 0, lambda h: h[..., :-1]), "hx", {}, id="hx-wrong-hidden-size"),
    pytest.param(_set_item("hx", 1, lambda c: c[..., :-1]), "cx", {}, id="cx-wrong-hidden-size"),
    pytest.param(_set_item("hx", 1, lambda c: c[:, :-1]), "cx", {}, id="cx-batch-mismatch"),
    pytest.param(_set_item("hx", 0, lambda h: h.float()), "dtype", {}, id="hx-float32"),
    pytest.param(_set_item("hx", 1, lambda c: c.float()), "dtype", {}, id="cx-float32"),
    pytest.param(
        _set_item("hx", 0, lambda h: torch.zeros(*h.shape[:-1], HIDDEN_SIZE, dtype=DTYPE)),
        "hx",
        dict(proj_size=PROJ_SIZE),
        id="hx-of-hidden-size-with-projections",
    ),
    pytest.param(_set("params", lambda a: a["params"][:-1]), "number of RNN parameters", {}, id="one-param-missing"),
    pytest.param(
        _set("params", lambda a: a["params"] + a["params"][:1]), "number of RNN parameters", {}, id="one-param-extra"
    ),
    pytest.param(_set("params", lambda a: []), "number of RNN parameters", {}, id="no-params"),
    pytest.param(_set("num_layers", lambda a: 3), "number of RNN parameters", {}, id="num-layers-mismatch"),
    pytest.param(_set("has_biases", lambda a: False), "number of RNN parameters", {}, id="has-biases-mismatch"),
    pytest.param(_set("num_layers", lambda a: 0), "num_layers", {}, id="num-layers-zero"),
    pytest.param(_set_item("params", 1, lambda w: w.float()), "dtype", {}, id="float32-weight"),
    pytest.param(_set_item("params", 1, lambda w: w[:, :-1]), "weight_hh", {}, id="weight-hh-wrong-width"),
    pytest.param(_set_item("params", 0, lambda w: w[:-4]), "weight_ih", {}, id="weight-ih-wrong-rows"),
    pytest.param(_set_item("params", 2, lambda b: b[:-1]), "bias_ih", {}, id="bias-wrong-size"),
    pytest.param(
        _set_item("params", LAYER1_WEIGHT_IH, lambda w: w[:, :-1]), "weight_ih", {}, id="layer1-weight-ih-wrong-width"
    ),
    # The shape of a layer-direction is read off its w_hh (and w_hr): a 0-dim one must be named,
    # not surface as "Dimension specified as 0 but tensor has no dimensions".
    pytest.param(_set_item("params", 1, lambda w: w.new_tensor(1.0)), "weight_hh", {}, id="0-dim-weight-hh"),
    pytest.param(
        _set_item("params", 4, lambda w: w[:, :-1]), "weight_hr", dict(proj_size=PROJ_SIZE), id="weight-hr-wrong-shape"
    ),
    pytest.param(
        _set_item("params", 4, lambda w: w.new_tensor(1.0)),
        "weight_hr",
        dict(proj_size=PROJ_SIZE),
        id="0-dim-weight-hr",
    ),
    # Native checks dropout only when it applies it (train, dropout > 0, two layers or more), and
    # NaN > 0 is false, so it silently runs without dropout.
    pytest.param(_set("dropout", lambda a: math.nan), "dropout", {}, id="dropout-nan"),
]


@pytest.mark.parametrize("spoil, message, config", DENSE_CASES)
def test_functional_lstm_raises_clear_error(spoil, message, config):
    args = _dense_args(**config)
    spoil(args)
    with pytest.raises(CLEAR_ERRORS, match=message):
        _call_dense(lstm_ext.lstm, args)


# Cases native's own argument checks catch before computing anything: same exception type and
# message from lstm_ext.
NATIVE_CHECKED_DENSE_CASES = [
    pytest.param(_set("input", lambda a: a["input"][:0]), id="seq-len-0"),
    pytest.param(_seq_len_zero_batch_first, id="seq-len-0-batch-first"),
    pytest.param(_set("dropout", lambda a: 1.5), id="dropout-above-1"),
    pytest.param(_set("dropout", lambda a: -0.5), id="dropout-negative"),
    pytest.param(_set("hx", lambda a: a["hx"] + a["hx"][:1]), id="three-hidden-states"),
    pytest.param(_set("hx", lambda a: a["hx"][:1]), id="one-hidden-state"),
]


@pytest.mark.parametrize("spoil", NATIVE_CHECKED_DENSE_CASES)
def test_functional_lstm_raises_native_error(spoil):
    args = _dense_args()
    spoil(args)
    with pytest.raises(Exception) as native_error:
        _call_dense(torch._VF.lstm, args)
    with pytest.raises(type(native_error.value)) as ext_error:
        _call_dense(lstm_ext.lstm, args)
    assert str(ext_error.value) == str(native_error.value)


# ---- packed form -------------------------------------------------------------------------------

LENGTHS = [5, 3, 2]  # batch_sizes [3, 3, 2, 1, 1]: 10 rows


def _packed_args():
    args = _dense_args()
    packed = pack_padded_sequence(make_input(DTYPE, batch=len(LENGTHS)), LENGTHS)
    del args["input"], args["batch_first"]
    return dict(args, data=packed.data, batch_sizes=packed.batch_sizes)


def _call_packed(lstm, args):
    return lstm(args["data"], args["batch_sizes"], *_shared_args(args))


def _batch_sizes(*sizes, dtype=torch.long):
    return _set("batch_sizes", lambda a: torch.tensor(sizes, dtype=dtype))


def _empty_sequence(args):
    args["data"] = args["data"][:0]
    args["batch_sizes"] = args["batch_sizes"][:0]


def _overflowing_batch_sizes(args):
    # Sums to 2**64 + 1: one row once the int64 sum wraps around.
    args["data"] = args["data"][:1]
    args["batch_sizes"] = torch.tensor([2**63 - 1, 2**63 - 1, 3])


# Native is never run on these: empty batch_sizes segfault it, and the others compute garbage or
# fail in a kernel (batch_sizes is trusted).
PACKED_CASES = [
    pytest.param(_batch_sizes(1, 1, 2, 3, 3), "non-increasing", id="increasing"),
    pytest.param(_batch_sizes(3, 3, 2, 1, 0), "positive", id="contains-zero"),
    pytest.param(_batch_sizes(3, 3, 2, 1, -1), "positive", id="negative"),
    pytest.param(_batch_sizes(3, 3, 2, 2, 1), "sum", id="sum-above-rows"),
    pytest.param(_batch_sizes(3, 3, 2, 1), "sum", id="sum-below-rows"),
    pytest.param(_batch_sizes(3, 3, 2, 1, 1, dtype=torch.int32), "int64", id="int32"),
    pytest.param(_batch_sizes(3, 3, 2, 1, 1, dtype=torch.float32), "int64", id="float32"),
    pytest.param(_set("batch_sizes", lambda a: a["batch_sizes"][None]), "1-D", id="2d"),
    pytest.param(_empty_sequence, "sequence length", id="empty"),
    pytest.param(_overflowing_batch_sizes, "batch_sizes", id="sum-overflows-int64"),
    pytest.param(_set("data", lambda a: a["data"][:, None]), "2-D", id="3d-data"),
    pytest.param(_set_item("hx", 0, lambda h: h[:, :-1]), "hx", id="hx-batch-below-first-batch-size"),
    pytest.param(
        _set("hx", lambda a: [torch.cat([s, s[:, :1]], 1) for s in a["hx"]]), "hx", id="hx-batch-above-first-batch-size"
    ),
    # A meta batch_sizes sends the call to the shape-only implementation, which returns
    # uninitialised CPU tensors instead of the result.
    pytest.param(_set("batch_sizes", lambda a: a["batch_sizes"].to("meta")), "meta|device", id="batch-sizes-on-meta"),
]


@pytest.mark.parametrize("spoil, message", PACKED_CASES)
def test_functional_packed_lstm_raises_clear_error(spoil, message):
    args = _packed_args()
    spoil(args)
    with pytest.raises(CLEAR_ERRORS, match=message):
        _call_packed(lstm_ext.lstm, args)


# ---- lstm_cell ---------------------------------------------------------------------------------


def _cell_args():
    torch.manual_seed(0)
    cell = nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE).to(DTYPE)
    return dict(
        input=torch.randn(BATCH, INPUT_SIZE, dtype=DTYPE),
        hx=[torch.randn(BATCH, HIDDEN_SIZE, dtype=DTYPE) for _ in range(2)],
        params=[cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh],
    )


def _call_cell(lstm_cell, args):
    return lstm_cell(args["input"], tuple(args["hx"]), *args["params"])


# Native's checks (check_rnn_cell_forward_input/hidden, the hidden state count): same error.
NATIVE_CHECKED_CELL_CASES = [
    pytest.param(_set("input", lambda a: a["input"][:, :-1]), id="input-size-mismatch"),
    pytest.param(_set_item("hx", 0, lambda h: h[:-1]), id="hx-batch-mismatch"),
    pytest.param(_set_item("hx", 1, lambda c: c[:-1]), id="cx-batch-mismatch"),
    pytest.param(_set_item("hx", 0, lambda h: h[:, :-1]), id="hx-wrong-hidden-size"),
    pytest.param(_set_item("hx", 1, lambda c: c[:, :-1]), id="cx-wrong-hidden-size"),
    pytest.param(_set("hx", lambda a: a["hx"] + a["hx"][:1]), id="three-hidden-states"),
]


@pytest.mark.parametrize("spoil", NATIVE_CHECKED_CELL_CASES)
def test_functional_lstm_cell_raises_native_error(spoil):
    args = _cell_args()
    spoil(args)
    with pytest.raises(Exception) as native_error:
        _call_cell(torch.lstm_cell, args)
    with pytest.raises(type(native_error.value)) as ext_error:
        _call_cell(lstm_ext.lstm_cell, args)
    assert str(ext_error.value) == str(native_error.value)


# Native misreports these (a 3-D input as "inconsistent input_size", a 1-D hx as a batch
# mismatch), fails in a kernel, or computes anyway (a float32 cx is silently promoted).
CELL_CASES = [
    pytest.param(_set("input", lambda a: a["input"][0]), "2 dimensions", id="1d-input"),
    pytest.param(_set("input", lambda a: a["input"][None]), "2 dimensions", id="3d-input"),
    pytest.param(_set_item("hx", 0, lambda h: h[0]), "hidden0 of 2 dimensions", id="1d-hx"),
    pytest.param(_set_item("hx", 1, lambda c: c[None]), "hidden1 of 2 dimensions", id="3d-cx"),
    pytest.param(_set("input", lambda a: a["input"].long()), "floating point", id="integer-input"),
    pytest.param(_set_item("hx", 0, lambda h: h.float()), "dtype", id="hx-float32"),
    pytest.param(_set_item("hx", 1, lambda c: c.float()), "dtype", id="cx-float32"),
    pytest.param(_set_item("params", 0, lambda w: w.float()), "dtype", id="float32-weight"),
    pytest.param(_set_item("params", 0, lambda w: w[:-4]), "weight_ih", id="weight-ih-wrong-rows"),
    pytest.param(_set_item("params", 3, lambda b: b[:-1]), "bias_hh", id="bias-wrong-size"),
    pytest.param(_set_item("params", 0, lambda w: w[:, 0]), "weight_ih", id="1d-weight-ih"),
    pytest.param(_set_item("params", 0, lambda w: w.to("meta")), "device", id="weight-on-meta"),
]


@pytest.mark.parametrize("spoil, message", CELL_CASES)
def test_functional_lstm_cell_raises_clear_error(spoil, message):
    args = _cell_args()
    spoil(args)
    with pytest.raises(CLEAR_ERRORS, match=message):
        _call_cell(lstm_ext.lstm_cell, args)


# ---- devices -----------------------------------------------------------------------------------


# A meta tensor among CPU ones sends the call to the shape-only implementation: without a device
# check lstm_ext returns uninitialised memory as the result. Native checks devices first.
@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(_set("input", lambda a: a["input"].to("meta")), id="input"),
        pytest.param(_set_item("hx", 0, lambda h: h.to("meta")), id="hx"),
        pytest.param(_set_item("hx", 1, lambda c: c.to("meta")), id="cx"),
        pytest.param(_set_item("params", 0, lambda w: w.to("meta")), id="weight"),
    ],
)
def test_one_tensor_on_meta_raises_like_native(spoil):
    args = _dense_args()
    spoil(args)
    with pytest.raises(Exception) as native_error:
        _call_dense(torch._VF.lstm, args)
    with pytest.raises(type(native_error.value), match="device"):
        _call_dense(lstm_ext.lstm, args)


def test_all_meta_tensors_give_native_shapes():
    """On meta (shapes only, as when tracing) lstm_ext propagates the shapes native does."""
    args = _dense_args(proj_size=PROJ_SIZE)
    meta_args = dict(
        args,
        input=args["input"].to("meta"),
        hx=[h.to("meta") for h in args["hx"]],
        params=[p.to("meta") for p in args["params"]],
    )
    native = _call_dense(torch._VF.lstm, meta_args)
    ext = _call_dense(lstm_ext.lstm, meta_args)
    assert [(t.device.type, t.shape, t.dtype) for t in ext] == [(t.device.type, t.shape, t.dtype) for t in native]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_raise_not_implemented():
    module = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE).cuda()
    with pytest.raises(NotImplementedError, match="CPU"):
        module(torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, device="cuda"))


# ---- modules -----------------------------------------------------------------------------------


def _module_pair(module_class, **kwargs):
    torch.manual_seed(0)
    native = module_class(**kwargs).to(DTYPE)
    ext = getattr(lstm_ext, module_class.__name__)(**kwargs).to(DTYPE)
    ext.load_state_dict(native.state_dict())
    return native, ext


LSTM_CONFIG = dict(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS, bidirectional=True)
CELL_CONFIG = dict(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE)


def _lstm_hx(batch=BATCH):
    return tuple(torch.randn(2 * NUM_LAYERS, batch, HIDDEN_SIZE, dtype=DTYPE) for _ in range(2))


def _cell_hx(batch=BATCH):
    return tuple(torch.randn(batch, HIDDEN_SIZE, dtype=DTYPE) for _ in range(2))


def _with_hx(hx, index, change):
    hx = list(hx)
    hx[index] = change(hx[index])
    return tuple(hx)


# (module class, configuration, arguments of the call). Native's module checks (nn.LSTM's
# forward, and torch.lstm_cell's checks under nn.LSTMCell) raise these; users see and match on
# their messages, so lstm_ext's must be the same.
NATIVE_CHECKED_MODULE_CALLS = [
    pytest.param(nn.LSTM, LSTM_CONFIG, lambda: (make_input(DTYPE, seq_len=0),), id="lstm-seq-len-0"),
    pytest.param(
        nn.LSTM, LSTM_CONFIG, lambda: (make_input(DTYPE, seq_len=0, unbatched=True),), id="lstm-unbatched-seq-len-0"
    ),
    pytest.param(
        nn.LSTM,
        dict(LSTM_CONFIG, batch_first=True),
        lambda: (make_input(DTYPE, seq_len=0, batch_first=True),),
        id="lstm-batch-first-seq-len-0",
    ),
    pytest.param(
        nn.LSTM, LSTM_CONFIG, lambda: (make_input(DTYPE), _lstm_hx() + _lstm_hx()[:1]), id="lstm-three-hidden-states"
    ),
    pytest.param(
        nn.LSTMCell,
        CELL_CONFIG,
        lambda: (torch.randn(BATCH, INPUT_SIZE, dtype=DTYPE), _cell_hx() + _cell_hx()[:1]),
        id="cell-three-hidden-states",
    ),
    pytest.param(
        nn.LSTMCell,
        CELL_CONFIG,
        lambda: (torch.randn(BATCH, INPUT_SIZE + 1, dtype=DTYPE),),
        id="cell-input-size-mismatch",
    ),
    pytest.param(
        nn.LSTMCell,
        CELL_CONFIG,
        lambda: (torch.randn(BATCH, INPUT_SIZE, dtype=DTYPE), _with_hx(_cell_hx(), 0, lambda h: h[:-1])),
        id="cell-hx-batch-mismatch",
    ),
    pytest.param(
        nn.LSTMCell,
        CELL_CONFIG,
        lambda: (torch.randn(BATCH, INPUT_SIZE, dtype=DTYPE), _with_hx(_cell_hx(), 1, lambda c: c[:, :-1])),
        id="cell-cx-wrong-hidden-size",
    ),
]


@pytest.mark.parametrize("module_class, config, make_args", NATIVE_CHECKED_MODULE_CALLS)
def test_module_raises_native_error(module_class, config, make_args):
    native, ext = _module_pair(module_class, **config)
    args = make_args()
    with pytest.raises(Exception) as native_error:
        native(*args)
    with pytest.raises(type(native_error.value)) as ext_error:
        ext(*args)
    assert str(ext_error.value) == str(native_error.value)


# Native's modules fail on these inside a kernel ("mat1 and mat2 must have the same dtype") or
# misreport them (a 1-D hx next to a 2-D input as "Input batch size 3 doesn't match hidden0 batch
# size 4"), so the exception type must match but the message should name the actual problem.
MISREPORTED_MODULE_CALLS = [
    pytest.param(
        nn.LSTMCell,
        CELL_CONFIG,
        lambda: (torch.randn(BATCH, INPUT_SIZE, dtype=DTYPE), _with_hx(_cell_hx(), 0, lambda h: h[0])),
        "hidden0 of 2 dimensions",
        id="cell-batched-input-unbatched-hx",
    ),
    pytest.param(
        nn.LSTMCell,
        CELL_CONFIG,
        lambda: (torch.randn(BATCH, INPUT_SIZE, dtype=DTYPE), _with_hx(_cell_hx(), 0, torch.Tensor.float)),
        "dtype",
        id="cell-hx-float32",
    ),
    pytest.param(
        nn.LSTMCell, CELL_CONFIG, lambda: (torch.randn(BATCH, INPUT_SIZE),), "dtype", id="cell-float32-input"
    ),
]


@pytest.mark.parametrize("module_class, config, make_args, message", MISREPORTED_MODULE_CALLS)
def test_module_raises_native_error_type_naming_the_problem(module_class, config, make_args, message):
    native, ext = _module_pair(module_class, **config)
    args = make_args()
    with pytest.raises(Exception) as native_error:
        native(*args)
    with pytest.raises(type(native_error.value), match=message):
        ext(*args)


def test_module_with_mixed_dtype_parameters_raises_like_native():
    native, ext = _module_pair(nn.LSTM, **LSTM_CONFIG)
    for module in (native, ext):
        module.weight_hh_l1.data = module.weight_hh_l1.data.float()
    input = make_input(DTYPE)
    with pytest.raises(Exception) as native_error:
        native(input)
    with pytest.raises(type(native_error.value), match="dtype"):
        ext(input)


def _with_reshaped_weight(module):
    module.weight_hh_l1.data = torch.randn(4 * HIDDEN_SIZE, HIDDEN_SIZE - 1, dtype=DTYPE)
    return module


def _packed(batch_sizes, rows=None, dtype=torch.long):
    """A hand-built PackedSequence; ``rows`` defaults to what batch_sizes sums to."""
    rows = sum(batch_sizes) if rows is None else rows
    return PackedSequence(torch.randn(rows, INPUT_SIZE, dtype=DTYPE), torch.tensor(batch_sizes, dtype=dtype))


# Native is not run on these. nn.LSTM reads a weight of the wrong shape out of bounds and returns
# garbage; it trusts a PackedSequence's batch_sizes and never checks hx for packed input; with a
# float32 hx it fails in a kernel, or (cx, no projections) converts it on the oneDNN path.
@pytest.mark.parametrize(
    "spoil_module, make_args, message",
    [
        pytest.param(_with_reshaped_weight, lambda: (make_input(DTYPE),), "weight_hh", id="reshaped-weight"),
        pytest.param(
            None, lambda: (make_input(DTYPE), _with_hx(_lstm_hx(), 0, torch.Tensor.float)), "dtype", id="hx-float32"
        ),
        pytest.param(
            None, lambda: (make_input(DTYPE), _with_hx(_lstm_hx(), 1, torch.Tensor.float)), "dtype", id="cx-float32"
        ),
        pytest.param(None, lambda: (_packed([1, 2, 3]),), "non-increasing", id="packed-increasing"),
        pytest.param(None, lambda: (_packed([3, 2, 0]),), "positive", id="packed-contains-zero"),
        pytest.param(None, lambda: (_packed([3, 2, 1], rows=5),), "sum", id="packed-sum-above-rows"),
        pytest.param(None, lambda: (_packed([3, 2, 1], dtype=torch.int32),), "int64", id="packed-int32"),
        pytest.param(None, lambda: (_packed([3, 2, 1]), _lstm_hx(batch=2)), "hx", id="packed-hx-batch-mismatch"),
    ],
)
def test_lstm_module_raises_clear_error(spoil_module, make_args, message):
    _, ext = _module_pair(nn.LSTM, **LSTM_CONFIG)
    if spoil_module is not None:
        spoil_module(ext)
    with pytest.raises(CLEAR_ERRORS, match=message):
        ext(*make_args())


# The constructors are inherited; these pin down that they keep rejecting what native rejects.
@pytest.mark.parametrize(
    "module_class, kwargs",
    [
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=0), id="lstm-hidden-0"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=-1), id="lstm-hidden-negative"),
        pytest.param(nn.LSTM, dict(input_size=0, hidden_size=4), id="lstm-input-0"),
        pytest.param(nn.LSTM, dict(input_size=-1, hidden_size=4), id="lstm-input-negative"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, num_layers=0), id="lstm-layers-0"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, num_layers=-1), id="lstm-layers-negative"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, proj_size=4), id="lstm-proj-equals-hidden"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, proj_size=5), id="lstm-proj-above-hidden"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, proj_size=-1), id="lstm-proj-negative"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, dropout=1.5), id="lstm-dropout-above-1"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4, dropout=-0.1), id="lstm-dropout-negative"),
        pytest.param(nn.LSTM, dict(input_size=3, hidden_size=4.0), id="lstm-float-hidden-size"),
        pytest.param(nn.LSTMCell, dict(input_size=3, hidden_size=-1), id="cell-hidden-negative"),
        pytest.param(nn.LSTMCell, dict(input_size=-1, hidden_size=4), id="cell-input-negative"),
    ],
)
def test_constructor_rejects_like_native(module_class, kwargs):
    ext_class = getattr(lstm_ext, module_class.__name__)
    with pytest.raises(Exception) as native_error:
        module_class(**kwargs)
    with pytest.raises(type(native_error.value)) as ext_error:
        ext_class(**kwargs)
    assert str(ext_error.value) == str(native_error.value)
