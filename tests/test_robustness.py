"""Odd but valid input gives native's answer; threads, memory and dtypes hold up (issue 6).

Native torch.nn.LSTM / torch._VF.lstm / torch.lstm_cell is the oracle throughout.
"""

import os
import threading

import pytest
import torch
from conftest import (
    FULL_FEATURED,
    HIDDEN_SIZE,
    INPUT_SIZE,
    TOLERANCES,
    assert_matches_native,
    leaf_copies,
    make_hx,
    make_input,
    make_lstm_pair,
    make_pair,
    weighted_sum_loss,
)
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread unless a test asks for more (the thread tests' num_threads fixture runs
    after this one). On a shared machine a multi-threaded call can wait a whole time slice for
    its second thread at every step, which makes loops of thousands of calls take minutes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def compare_all(actual, expected, msg):
    """assert_close, pairwise, with the tolerance of the expected tensor's dtype."""
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, **TOLERANCES[e.dtype], msg=lambda m: f"{msg}[{index}]: {m}")


# ---- odd layouts -------------------------------------------------------------------------------
# Each layout is a differentiable view of a leaf with the same values as the plain tensor, so
# gradients reach the same leaves in lstm_ext and native. Native gets the view made contiguous:
# its kernels read some inputs raw (batch_sizes, oneDNN weights), and what is tested here is
# lstm_ext's handling of strides, not native's.


def _transposed(leaf):
    """Same shape, reversed (column-major) strides."""
    return leaf.transpose(0, -1).contiguous().transpose(0, -1)


def _strided(leaf):
    """Every other element of a buffer twice as wide: last-dimension stride 2."""
    return torch.stack([leaf, torch.zeros_like(leaf)], -1).select(-1, 0)


def _padded_rows(leaf):
    """Rows of a buffer twice as wide: contiguous rows, each starting a whole row further on."""
    return torch.cat([leaf, torch.zeros_like(leaf)], -1)[..., : leaf.shape[-1]]


def _offset(leaf):
    """Contiguous, but starting one row into its storage."""
    return torch.cat([torch.zeros_like(leaf[:1]), leaf])[1:]


LAYOUTS = {
    "transposed": _transposed,
    "strided": _strided,
    "padded_rows": _padded_rows,
    "offset": _offset,
    "expanded": None,
}


def _leaf_and_view(tensor, layout):
    """(leaf, view): view has ``tensor``'s shape in ``layout``. "expanded" has stride 0 along the
    first dimension: the leaf is ``tensor``'s first row, repeated."""
    if layout == "expanded":
        leaf = tensor[:1].detach().clone().requires_grad_()
        return leaf, leaf.expand(tensor.shape)
    leaf = tensor.detach().clone().requires_grad_()
    return leaf, LAYOUTS[layout](leaf)


def _run_functional(lstm, leaves_and_views, flags):
    """lstm(input, (h0, c0), params, *flags), forward and backward: (outputs, leaf gradients)."""
    leaves, views = zip(*leaves_and_views)
    input, h0, c0, *params = views
    outputs = lstm(input, (h0, c0), list(params), *flags)
    weighted_sum_loss(outputs).backward()
    return outputs, [leaf.grad for leaf in leaves]


# "panels": weights deep and wide enough that packing takes whole square blocks through
# at::vec's transpose (16 float / 8 double lanes) and then an odd remainder of depth.
PANEL_SIZED = dict(input_size=40, hidden_size=24, num_layers=2, bidirectional=True, proj_size=20)
ODD_LAYOUT_SIZES = {
    "tiny": (torch.float64, dict(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, **FULL_FEATURED)),
    "panels-float64": (torch.float64, PANEL_SIZED),
    "panels-float32": (torch.float32, PANEL_SIZED),
}


@pytest.mark.parametrize("target", ["input", "states", "weights", "everything"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("sizes", list(ODD_LAYOUT_SIZES))
def test_odd_layouts_match_native(sizes, layout, target):
    dtype, config = ODD_LAYOUT_SIZES[sizes]
    native_module, _ = make_lstm_pair(dtype=dtype, **config)
    h0, c0 = make_hx(native_module, dtype)
    weight_names = native_module._flat_weights_names
    plain = {"input": make_input(dtype, input_size=config["input_size"]), "h0": h0, "c0": c0}
    plain.update((name, p.detach()) for name, p in zip(weight_names, native_module._flat_weights))
    groups = {"input": ["input"], "states": ["h0", "c0"], "weights": weight_names, "everything": list(plain)}
    flags = (True, 2, 0.0, True, True, False)

    def leaves_and_views(for_native):
        result = []
        for name, tensor in plain.items():
            if name in groups[target]:
                leaf, view = _leaf_and_view(tensor, layout)
                result.append((leaf, view.contiguous() if for_native else view))
            else:
                leaf = tensor.detach().clone().requires_grad_()
                result.append((leaf, leaf))
        return result

    ext_tensors = leaves_and_views(for_native=False)
    assert any(not view.is_contiguous() or view.storage_offset() for _, view in ext_tensors)
    ext_outputs, ext_grads = _run_functional(lstm_ext.lstm, ext_tensors, flags)
    native_outputs, native_grads = _run_functional(torch._VF.lstm, leaves_and_views(for_native=True), flags)
    compare_all(ext_outputs, native_outputs, "(output, h_n, c_n)")
    compare_all(ext_grads, native_grads, "grads of (input, h0, c0, *params)")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_odd_layouts_in_lstm_cell_match_native(layout):
    dtype = torch.float64
    torch.manual_seed(0)
    cell = nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE).to(dtype)
    plain = [
        torch.randn(3, INPUT_SIZE, dtype=dtype),
        torch.randn(3, HIDDEN_SIZE, dtype=dtype),
        torch.randn(3, HIDDEN_SIZE, dtype=dtype),
        *(p.detach() for p in cell.parameters()),
    ]
    results = []
    for lstm_cell, for_native in ((lstm_ext.lstm_cell, False), (torch.lstm_cell, True)):
        leaves, views = zip(*(_leaf_and_view(tensor, layout) for tensor in plain))
        input, h0, c0, *params = (view.contiguous() if for_native else view for view in views)
        outputs = lstm_cell(input, (h0, c0), *params)
        weighted_sum_loss(outputs).backward()
        results.append((outputs, [leaf.grad for leaf in leaves]))
    (ext_outputs, ext_grads), (native_outputs, native_grads) = results
    compare_all(ext_outputs, native_outputs, "(h_1, c_1)")
    compare_all(ext_grads, native_grads, "grads of (input, h0, c0, *params)")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_odd_layout_packed_data_and_batch_sizes_match_native(layout):
    """batch_sizes with stride 2 too: native reads it raw (so it gets the packed original)."""
    dtype = torch.float64
    native_module, _ = make_pair(dtype=dtype, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, bidirectional=True)
    packed = pack_padded_sequence(make_input(dtype), torch.tensor([5, 3, 2]))
    strided_batch_sizes = packed.batch_sizes.repeat_interleave(2)[::2]
    assert torch.equal(strided_batch_sizes, packed.batch_sizes) and strided_batch_sizes.stride() == (2,)
    hx = make_hx(native_module, dtype)
    flags = (True, 1, 0.0, True, True)
    results = []
    for lstm, batch_sizes, for_native in (
        (lstm_ext.lstm, strided_batch_sizes, False),
        (torch._VF.lstm, packed.batch_sizes, True),
    ):
        leaf, data = _leaf_and_view(packed.data, layout)
        params = leaf_copies(native_module._flat_weights)
        outputs = lstm(data.contiguous() if for_native else data, batch_sizes, hx, params, *flags)
        weighted_sum_loss(outputs).backward()
        results.append((outputs, [leaf.grad, *(p.grad for p in params)]))
    (ext_outputs, ext_grads), (native_outputs, native_grads) = results
    compare_all(ext_outputs, native_outputs, "(data, h_n, c_n)")
    compare_all(ext_grads, native_grads, "grads of (data, *params)")


# ---- empty batch and empty cells ---------------------------------------------------------------


# Inference projects the input a chunk of steps at a time (lstm.cpp, kInferenceChunkBytes: 24 MB
# of gates for all directions). Here a step is 128 rows x 1024 gates x 8 bytes = 1 MB a
# direction, so 26 steps run as chunks of 13 and 13 (one direction, dense or packed) or of 9, 9
# and 8 (two directions, dense: the reverse direction's from the last step); packed
# bidirectional input runs in one chunk.
CHUNKED = dict(input_size=8, hidden_size=256, num_layers=2)
CHUNKED_STEPS, CHUNKED_BATCH = 26, 128


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("proj_size", [0, 16], ids=["noproj", "proj"])
def test_inference_in_chunks_of_steps_matches_native(num_threads, proj_size, bidirectional, packed):
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, proj_size=proj_size, bidirectional=bidirectional, **CHUNKED)
    input = make_input(dtype, seq_len=CHUNKED_STEPS, batch=CHUNKED_BATCH, input_size=CHUNKED["input_size"])
    hx = make_hx(native, dtype, batch=CHUNKED_BATCH)
    lengths = torch.randint(1, CHUNKED_STEPS + 1, (CHUNKED_BATCH,), generator=torch.Generator().manual_seed(0))
    lengths[3] = CHUNKED_STEPS
    sequence = pack_padded_sequence(input, lengths, enforce_sorted=False) if packed else input
    with torch.no_grad():
        outputs = []
        for module in (native, ext):
            output, (h_n, c_n) = module(sequence, hx)
            outputs.append((output.data if packed else output, h_n, c_n))
    compare_all(outputs[1], outputs[0], "(output, h_n, c_n)")


@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
def test_zero_batch_matches_native(batch_first, hx_given):
    """B=0: empty output and states, all-zero parameter gradients, like native."""
    dtype = torch.float64
    native, ext = make_lstm_pair(dtype=dtype, batch_first=batch_first, **FULL_FEATURED)
    input = make_input(dtype, batch=0, batch_first=batch_first)
    hx = make_hx(native, dtype, batch=0) if hx_given else None
    assert_matches_native(native, ext, input, hx)
    assert all(p.grad is not None and not p.grad.any() for p in ext.parameters())


@pytest.mark.parametrize(
    "input_size, hidden_size, batch",
    [(INPUT_SIZE, HIDDEN_SIZE, 0), (INPUT_SIZE, 0, 3), (0, HIDDEN_SIZE, 3)],
    ids=["batch-0", "hidden-size-0", "input-size-0"],
)
def test_empty_lstm_cell_matches_native(input_size, hidden_size, batch):
    """nn.LSTMCell accepts zero sizes (nn.LSTM does not), and computes on them."""
    native, ext = make_pair(
        dtype=torch.float64, module_class=nn.LSTMCell, input_size=input_size, hidden_size=hidden_size
    )
    input = torch.randn(batch, input_size, dtype=torch.float64)
    results = []
    for module in (native, ext):
        leaf = input.clone().requires_grad_()
        outputs = module(leaf)
        weighted_sum_loss(outputs).backward()
        results.append((outputs, [leaf.grad, *(p.grad for p in module.parameters())]))
    (ext_outputs, ext_grads), (native_outputs, native_grads) = results
    compare_all(ext_outputs, native_outputs, "(h_1, c_1)")
    compare_all(ext_grads, native_grads, "grads of (input, *params)")


# ---- NaN and Inf -------------------------------------------------------------------------------

# 1e4 overflows exp() in float32 and float64: the gates saturate instead of turning NaN.
SPECIAL_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e4, "-huge": -1e4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("value", list(SPECIAL_VALUES))
@pytest.mark.parametrize("where", ["input", "h0", "c0", "weight_ih_l0", "weight_hh_l1_reverse", "bias_hh_l0"])
def test_nan_and_inf_propagate_like_native(where, value, dtype):
    """One special value in one place: the same NaN positions, and the same values elsewhere
    (Inf included), in the outputs and gradients as native."""
    native, ext = make_pair(
        dtype=dtype, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=2, bidirectional=True
    )
    input = make_input(dtype)
    hx = list(make_hx(native, dtype))
    special = SPECIAL_VALUES[value]
    if where == "input":
        input[2, 1, 0] = special
    elif where in ("h0", "c0"):
        hx[["h0", "c0"].index(where)][1, 2, 3] = special
    else:
        for module in (native, ext):
            with torch.no_grad():
                getattr(module, where).view(-1)[5] = special
    results = []
    for module in (native, ext):
        leaf_input, *leaf_hx = leaf_copies([input, *hx])
        output, (h_n, c_n) = module(leaf_input, tuple(leaf_hx))
        weighted_sum_loss([output, h_n, c_n]).backward()
        grads = [leaf_input.grad, *(h.grad for h in leaf_hx), *(p.grad for p in module.parameters())]
        results.append(([output, h_n, c_n], grads))
    (ext_outputs, ext_grads), (native_outputs, native_grads) = results
    for name, actual, expected in (("output", ext_outputs, native_outputs), ("grad", ext_grads, native_grads)):
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert torch.equal(a.isnan(), e.isnan()), f"{name}[{index}]: NaN positions differ"
            torch.testing.assert_close(a, e, equal_nan=True, **TOLERANCES[dtype], msg=lambda m: f"{name}[{index}]: {m}")


# ---- dtypes ------------------------------------------------------------------------------------

# lstm_ext in the reduced precision types against native in float32 on the same (rounded)
# weights and inputs. Errors are measured as max |x - ref| / (1 + max |ref|) over all outputs
# and, separately, all gradients. Over seeds 0-19 of these cases lstm_ext measured at most
# bfloat16 3.4e-3 (outputs) / 9.1e-3 (gradients) and float16 3.6e-4 / 1.0e-3; native run in the
# same dtype 4.7e-3 / 5.1e-3 and 5.4e-4 / 5.1e-4. That is the precision of the types (bfloat16
# keeps 8 significant bits, an ulp of 2**-8 ~ 4e-3 at 1; float16 11, ~5e-4), though lstm_ext's
# gradients err about twice as much as native's. The bounds leave about 3x headroom.
REDUCED_PRECISION_BOUNDS = {
    torch.bfloat16: dict(outputs=1e-2, grads=3e-2),
    torch.float16: dict(outputs=1e-3, grads=3e-3),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _scaled_error(actual, reference):
    return ((actual.double() - reference.double()).abs().max() / (1 + reference.double().abs().max())).item()


def _run_module(module, input, hx, lengths=None):
    """Forward + backward; returns (outputs, grads of input, hx and parameters)."""
    leaf_input, *leaf_hx = leaf_copies([input, *hx])
    module_input = leaf_input
    if lengths is not None:
        module_input = pack_padded_sequence(leaf_input, lengths, enforce_sorted=False)
    outputs = module(module_input, tuple(leaf_hx))
    if isinstance(module, nn.LSTM):
        output, (h_n, c_n) = outputs
        outputs = [output.data if lengths is not None else output, h_n, c_n]
    # float32 loss weights for every dtype, so all runs get the same upstream gradients.
    weighted_sum_loss([o.float() for o in outputs]).backward()
    return list(outputs), [leaf_input.grad, *(h.grad for h in leaf_hx), *(p.grad for p in module.parameters())]


def _dtype_case(dtype, entry, seed=0):
    """(native, ext, input, hx, lengths) for one dtype test; native is left in ``dtype``."""
    if entry == "cell":
        native, ext = make_pair(seed, dtype, module_class=nn.LSTMCell, input_size=5, hidden_size=8)
        return native, ext, torch.randn(4, 5).to(dtype), [torch.randn(4, 8).to(dtype) for _ in range(2)], None
    native, ext = make_pair(seed, dtype, input_size=5, hidden_size=8, num_layers=2, bidirectional=True, proj_size=3)
    input = make_input(torch.float32, seq_len=7, batch=4, input_size=5).to(dtype)
    hx = [h.to(dtype) for h in make_hx(native, torch.float32, batch=4)]
    lengths = torch.tensor([7, 2, 5, 4]) if entry == "packed" else None
    return native, ext, input, hx, lengths


@pytest.mark.parametrize("entry", ["lstm", "packed", "cell"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_dtypes_forward_and_backward_match_native(dtype, entry):
    reference_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    native, ext, input, hx, lengths = _dtype_case(dtype, entry)
    native.to(reference_dtype)

    ext_outputs, ext_grads = _run_module(ext, input, hx, lengths)
    ref_hx = [h.to(reference_dtype) for h in hx]
    ref_outputs, ref_grads = _run_module(native, input.to(reference_dtype), ref_hx, lengths)

    assert all(t.dtype == dtype for t in ext_outputs + ext_grads)
    if dtype in REDUCED_PRECISION_BOUNDS:
        bounds = REDUCED_PRECISION_BOUNDS[dtype]
        assert max(map(_scaled_error, ext_outputs, ref_outputs)) < bounds["outputs"]
        assert max(map(_scaled_error, ext_grads, ref_grads)) < bounds["grads"]
    else:
        compare_all(ext_outputs, ref_outputs, "outputs")
        compare_all(ext_grads, ref_grads, "grads")


# ---- threads -----------------------------------------------------------------------------------
# Hidden size 64, projection 32 and batch 32 give a direction enough work per step for a team of
# threads (4·64·32·32 = 262k multiply-adds, over twice layer.h's kMinStepWorkPerThread): with
# two torch threads the unidirectional module splits each step's hidden units between them (and
# meets at a spin barrier), the bidirectional one runs its directions at once (threads_per_direction
# and for_each_direction in layer.h).
THREAD_SHAPE = dict(input_size=16, hidden_size=64, num_layers=2, proj_size=32)
PYTHON_THREADS = 6  # seeds 4 and 5: one step of 32 rows, whose products read the weights as stored
CALLS_PER_THREAD = 2


@pytest.fixture(scope="module")
def shared_modules():
    """Modules shared by all Python threads: reading the same weights concurrently is what a
    multi-threaded server does. Gradients are taken with autograd.grad, not accumulated into
    .grad, so calls do not race on it."""
    torch.manual_seed(0)
    return [lstm_ext.LSTM(**THREAD_SHAPE, bidirectional=bidirectional) for bidirectional in (False, True)]


def _thread_job(seed, modules):
    """(module, input, lengths, hx): unidirectional for seeds 0, 1 (mod 4), bidirectional for
    2, 3; packed for even seeds, dense for odd ones; 8 steps below seed 4, one step from it on."""
    module = modules[seed // 2 % 2]
    generator = torch.Generator().manual_seed(seed)
    batch, seq_len = 32, 8 if seed < 4 else 1
    input = torch.randn(seq_len, batch, THREAD_SHAPE["input_size"], generator=generator)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator) if seed % 2 == 0 else None
    states = module.num_layers * (2 if module.bidirectional else 1)
    hx = [torch.randn(states, batch, size, generator=generator) for size in (module.proj_size, module.hidden_size)]
    return module, input, lengths, hx


def _run_job(job):
    module, input, lengths, hx = job
    input, *hx = leaf_copies([input, *hx])
    module_input = input if lengths is None else pack_padded_sequence(input, lengths, enforce_sorted=False)
    output, (h_n, c_n) = module(module_input, tuple(hx))
    outputs = [output if lengths is None else output.data, h_n, c_n]
    grads = torch.autograd.grad(weighted_sum_loss(outputs), [input, *hx, *module.parameters()])
    return [t.detach() for t in outputs] + list(grads)


def _assert_bitwise_equal(actual, expected, msg):
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"{msg}: tensor {index} differs by up to {(a - e).abs().max().item():.3g}"


def test_concurrent_calls_match_sequential_calls(num_threads, shared_modules):
    jobs = [_thread_job(seed, shared_modules) for seed in range(PYTHON_THREADS)]
    expected = [_run_job(job) for job in jobs]
    results = [[] for _ in jobs]
    errors = []

    def worker(index):
        try:
            for _ in range(CALLS_PER_THREAD):
                results[index].append(_run_job(jobs[index]))
        except Exception as error:  # reported below, with its thread
            errors.append((index, error))

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors
    for index, thread_results in enumerate(results):
        assert len(thread_results) == CALLS_PER_THREAD
        for call, result in enumerate(thread_results):
            _assert_bitwise_equal(result, expected[index], f"python thread {index}, call {call}")


@pytest.mark.parametrize("seed", range(4), ids=["uni-packed", "uni-dense", "bi-packed", "bi-dense"])
def test_repeated_calls_are_bitwise_identical(num_threads, shared_modules, seed):
    job = _thread_job(seed, shared_modules)
    first = _run_job(job)
    for repeat in range(2):
        _assert_bitwise_equal(_run_job(job), first, f"repeat {repeat + 1}")


# ---- memory ------------------------------------------------------------------------------------


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


LEAK_SHAPE = dict(input_size=8, hidden_size=32, num_layers=2, bidirectional=True, proj_size=16)
WARMUP_CALLS = 300
CALLS = 2000
# A call on LEAK_SHAPE (seq_len 8, batch 4) saves ~140 KiB of workspace for backward, and its
# outputs and gradients take another ~40 KiB; leaking even 4 KiB a call would grow RSS by 8 MiB
# over CALLS. Without a leak RSS moves by well under 1 MiB once the allocator has warmed up.
MAX_GROWTH = 8 * 2**20


def _leak_workload(kind):
    """A function making one call of the given kind."""
    torch.manual_seed(0)
    if kind == "cell-train":
        cell = lstm_ext.LSTMCell(8, 32)
        cell_input = torch.randn(4, 8, requires_grad=True)
        return lambda: sum(t.sum() for t in cell(cell_input)).backward()
    module = lstm_ext.LSTM(**LEAK_SHAPE)
    input = torch.randn(8, 4, 8, requires_grad=True)

    def train(packed):
        module_input = input
        if packed:
            module_input = pack_padded_sequence(input, torch.tensor([8, 3, 6, 1]), enforce_sorted=False)
        output, (h_n, c_n) = module(module_input)
        (output.data.sum() + h_n.sum() + c_n.sum()).backward()

    def inference():
        with torch.no_grad():
            module(input)

    # Raised after the forward has made contiguous copies of the (transposed) w_hh weights.
    params = [p.t().contiguous().t() if p.dim() == 2 else p for p in module._flat_weights]
    bad_hx = (torch.zeros(4, 5, 16), torch.zeros(4, 5, 32))

    def error():
        with pytest.raises(RuntimeError, match="hx"):
            lstm_ext.lstm(input, bad_hx, params, True, 2, 0.0, True, True, False)

    return {
        "lstm-train": lambda: train(packed=False),
        "packed-train": lambda: train(packed=True),
        "inference": inference,
        "error": error,
    }[kind]


@pytest.mark.parametrize("kind", ["lstm-train", "packed-train", "cell-train", "inference", "error"])
def test_rss_stays_flat_over_many_calls(kind):
    call = _leak_workload(kind)
    for _ in range(WARMUP_CALLS):
        call()
    before = _rss_bytes()
    for _ in range(CALLS):
        call()
    growth = _rss_bytes() - before
    assert growth < MAX_GROWTH, f"RSS grew by {growth / 2**20:.1f} MiB over {CALLS} calls"


class _RecordWorkspaces(TorchDispatchMode):
    """Records the workspace every lstm_ext::forward call returned (the mode sees the call below
    autograd: the one that saves for the backward)."""

    def __init__(self):
        super().__init__()
        self.workspaces = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.ops.lstm_ext.forward.default:
            self.workspaces.append(result[3])
        return result


@pytest.mark.parametrize(
    "backward", [None, "backward", "retain_graph"], ids=["no-backward", "backward", "retained-backward"]
)
def test_workspace_is_freed_with_the_graph(backward):
    module = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2)
    with _RecordWorkspaces() as recorder:
        output, (h_n, c_n) = module(make_input(torch.float32).requires_grad_())
    # gates, ..., then dropout's, recurrent dropout's and zoneout's masks and layer norm's (none here)
    assert [[t.dim() for t in workspace] for workspace in recorder.workspaces] == [[3, 3, 3, 3, 3] + [1] * 8]
    refs = [StorageWeakRef(t.untyped_storage()) for t in recorder.workspaces[0]]
    del recorder
    assert not any(ref.expired() for ref in refs)
    if backward is not None:
        retain = backward == "retain_graph"
        (output.sum() + h_n.sum()).backward(retain_graph=retain)
        # A backward that does not retain the graph frees what it saved at once.
        assert [ref.expired() for ref in refs] == [not retain] * len(refs)
    del output, h_n, c_n
    assert all(ref.expired() for ref in refs)


def _trainable_module():
    return lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2)


def _frozen_module():
    return _trainable_module().requires_grad_(False)


@pytest.mark.parametrize(
    "make_module, input_requires_grad, context, workspace_sizes",
    [
        pytest.param(_trainable_module, True, torch.no_grad, [0], id="no-grad"),
        pytest.param(_trainable_module, True, torch.inference_mode, [0], id="inference-mode"),
        pytest.param(_frozen_module, False, torch.enable_grad, [0], id="nothing-requires-grad"),
        # The contrast, which shows that the recording sees workspaces: training saves all 13.
        pytest.param(_trainable_module, False, torch.enable_grad, [13], id="weights-require-grad"),
        pytest.param(_frozen_module, True, torch.enable_grad, [13], id="input-requires-grad"),
    ],
)
def test_workspace_only_when_something_needs_gradients(make_module, input_requires_grad, context, workspace_sizes):
    module = make_module()
    input = make_input(torch.float32).requires_grad_(input_requires_grad)
    with _RecordWorkspaces() as recorder, context():
        module(input)
    assert [len(workspace) for workspace in recorder.workspaces] == workspace_sizes


def _child_forward():
    torch.manual_seed(0)
    module = lstm_ext.LSTM(64, 96, num_layers=2)
    output, _ = module(torch.randn(30, 8, 64))
    output.sum().backward()
    return output.detach()


def _forward_in_child(queue):
    torch.set_num_threads(1)  # as DataLoader's workers do: the parent's OpenMP pool does not survive fork
    queue.put(_child_forward().numpy())  # pickled whole: a shared tensor would need this process alive


def test_a_forked_child_runs_while_other_threads_call():
    """A child forked (as a DataLoader worker is) while other threads call lstm_ext runs lstm_ext
    itself and matches the parent. (Buffers come from a pool behind a lock, csrc/blas.h BlockPool,
    held across fork by pthread_atfork handlers; a fork inside the lock's few instructions is too
    rare for this test to catch without them, so it checks the fork, not that race.)"""
    expected = _child_forward()
    stop = threading.Event()
    # Training steps of a small cell: two 64 KB weight gradients from the pool per step.
    cell, input = lstm_ext.LSTMCell(64, 64), torch.randn(1, 64)

    def busy():
        while not stop.is_set():
            cell(input)[0].sum().backward()

    threads = [threading.Thread(target=busy) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        context = torch.multiprocessing.get_context("fork")
        for _ in range(10):
            queue = context.Queue()
            child = context.Process(target=_forward_in_child, args=(queue,))
            child.start()
            got = queue.get(timeout=120)
            child.join(timeout=120)
            assert child.exitcode == 0
            compare_all([torch.from_numpy(got)], [expected], "the child's output")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
