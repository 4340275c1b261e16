"""Step-by-step decoding against native: a loop of LSTMCell calls and a loop of LSTM calls with T=1.

A decoder calls the cell once per token with the state fed back and trains by BPTT through the
Python loop. Values and gradients of such loops must match native nn.LSTMCell / nn.LSTM. Small
calls read the weights as stored (nothing is kept between calls); the tests below also cover what
a cache of weights would get wrong: weights changed in place between calls (an optimizer step,
``w.add_`` under no_grad), weights shared by two modules, weight_norm's recomputed weight, dtype
moves, load_state_dict, and calls from several Python threads at once.
"""

import threading

import pytest
import torch
from conftest import compare
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext

INPUT_SIZE = 7
STEPS = 5
LOOPS = ("cell", "t1")
MODULES = {"cell": (nn.LSTMCell, lstm_ext.LSTMCell), "t1": (nn.LSTM, lstm_ext.LSTM)}


def make_pair(loop, dtype=torch.float64, hidden_size=16, **kwargs):
    """A native module and an lstm_ext module with the same weights."""
    native_class, ext_class = MODULES[loop]
    native = native_class(INPUT_SIZE, hidden_size, dtype=dtype, **kwargs)
    ext = ext_class(INPUT_SIZE, hidden_size, dtype=dtype, **kwargs)
    ext.load_state_dict(native.state_dict())
    return native, ext


def initial_state(module, batch, dtype):
    """(h0, c0) as the loop feeds them: [B, P] and [B, H] for cells, [L, B, P] and [L, B, H] for LSTMs."""
    if isinstance(module, nn.LSTMCell):
        return torch.randn(batch, module.hidden_size, dtype=dtype), torch.randn(batch, module.hidden_size, dtype=dtype)
    layers, proj = module.num_layers, module.proj_size or module.hidden_size
    return torch.randn(layers, batch, proj, dtype=dtype), torch.randn(layers, batch, module.hidden_size, dtype=dtype)


def decode(module, xs, state):
    """The loop: every step's output stacked, and the final state."""
    h, c = state
    outputs = []
    for x in xs:
        if isinstance(module, nn.LSTMCell):
            h, c = module(x, (h, c))
            outputs.append(h)
        else:
            y, (h, c) = module(x.unsqueeze(0), (h, c))
            outputs.append(y[0])
    return torch.stack(outputs), h, c


def decode_with_grads(module, xs, state, loss_weights):
    """Outputs of the loop, and the gradients of a weighted sum of them for the input, state and weights."""
    xs, h0, c0 = (t.detach().clone().requires_grad_() for t in (xs, *state))
    outputs = decode(module, xs, (h0, c0))
    loss = sum((out * w).sum() for out, w in zip(outputs, loss_weights))
    leaves = {"input": xs, "h0": h0, "c0": c0, **dict(module.named_parameters())}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [out.detach() for out in outputs], dict(zip(leaves, grads))


CONFIGS = {
    "cell": ("cell", {}),
    "cell_nobias": ("cell", {"bias": False}),
    "t1": ("t1", {}),
    "t1_2layers_proj": ("t1", {"num_layers": 2, "proj_size": 4}),
}


@pytest.mark.parametrize("hidden_size", [6, 16, 33])
@pytest.mark.parametrize("batch", [1, 3, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_decoder_loop_matches_native(num_threads, config, dtype, batch, hidden_size):
    loop, kwargs = config
    torch.manual_seed(0)
    native, ext = make_pair(loop, dtype, hidden_size, **kwargs)
    xs = torch.randn(STEPS, batch, INPUT_SIZE, dtype=dtype)
    state = initial_state(native, batch, dtype)
    outputs = decode(native, xs, state)
    loss_weights = [torch.randn_like(out) for out in outputs]

    with torch.inference_mode():
        compare(decode(ext, xs, state), decode(native, xs, state), msg="inference")
    ext_outputs, ext_grads = decode_with_grads(ext, xs, state, loss_weights)
    native_outputs, native_grads = decode_with_grads(native, xs, state, loss_weights)
    compare(ext_outputs, native_outputs, msg="outputs")
    compare(ext_grads, native_grads, msg="grads")


def test_functional_lstm_cell_loop_matches_torch_lstm_cell():
    torch.manual_seed(0)
    native, _ = make_pair("cell")
    weights = [p.detach() for p in native.parameters()]
    xs = torch.randn(STEPS, 4, INPUT_SIZE, dtype=torch.float64)
    results = []
    for lstm_cell in (lstm_ext.lstm_cell, torch.lstm_cell):
        h = c = torch.zeros(4, 16, dtype=torch.float64)
        for x in xs:
            h, c = lstm_cell(x, (h, c), *weights)
        results.append((h, c))
    compare(*results)


def _step_outputs(native, ext, xs, state):
    """Both modules' loop outputs (inference), compared."""
    with torch.no_grad():
        compare(decode(ext, xs, state), decode(native, xs, state))


@pytest.mark.parametrize("loop", LOOPS)
def test_optimizer_steps_between_calls(loop):
    torch.manual_seed(0)
    native, ext = make_pair(loop)
    xs = torch.randn(STEPS, 3, INPUT_SIZE, dtype=torch.float64)
    state = initial_state(native, 3, torch.float64)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (native, ext)]
    for _ in range(3):
        results = []
        for module, optimizer in zip((native, ext), optimizers):
            outputs = decode(module, xs, state)
            outputs[0].square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            results.append(outputs)
        compare(results[1], results[0])
    _step_outputs(native, ext, xs, state)


@pytest.mark.parametrize("loop", LOOPS)
def test_in_place_updates_between_calls(loop):
    torch.manual_seed(0)
    native, ext = make_pair(loop)
    xs = torch.randn(STEPS, 2, INPUT_SIZE, dtype=torch.float64)
    state = initial_state(native, 2, torch.float64)
    for k in range(3):
        _step_outputs(native, ext, xs, state)
        delta = {name: torch.randn_like(p) for name, p in native.named_parameters()}
        with torch.no_grad():
            for module in (native, ext):
                for name, p in module.named_parameters():
                    p.add_(delta[name])
    _step_outputs(native, ext, xs, state)


@pytest.mark.parametrize("loop", LOOPS)
def test_modules_sharing_a_weight(loop):
    torch.manual_seed(0)
    native_a, ext_a = make_pair(loop)
    native_b, ext_b = make_pair(loop)
    name = "weight_hh" if loop == "cell" else "weight_hh_l0"
    setattr(native_b, name, getattr(native_a, name))
    setattr(ext_b, name, getattr(ext_a, name))
    xs = torch.randn(STEPS, 2, INPUT_SIZE, dtype=torch.float64)
    state = initial_state(native_a, 2, torch.float64)
    for _ in range(2):
        _step_outputs(native_a, ext_a, xs, state)
        _step_outputs(native_b, ext_b, xs, state)
        with torch.no_grad():
            getattr(native_a, name).mul_(-1.5)
            getattr(ext_a, name).mul_(-1.5)  # through module a: module b must see it too


@pytest.mark.parametrize("loop", LOOPS)
def test_weight_norm_recomputed_weight(loop):
    torch.manual_seed(0)
    native, ext = make_pair(loop)
    name = "weight_hh" if loop == "cell" else "weight_hh_l0"
    for module in (native, ext):
        nn.utils.parametrizations.weight_norm(module, name)
    if loop == "t1":  # nn.LSTM keeps a list of its weights: refresh it, as nn.LSTM's own users must
        for module in (native, ext):
            module._init_flat_weights()
    xs = torch.randn(STEPS, 2, INPUT_SIZE, dtype=torch.float64)
    state = initial_state(native, 2, torch.float64)
    for _ in range(2):
        _step_outputs(native, ext, xs, state)
        with torch.no_grad():
            for module in (native, ext):
                getattr(module.parametrizations, name).original0.mul_(0.5)


@pytest.mark.parametrize("loop", LOOPS)
def test_dtype_moves_and_load_state_dict_between_calls(loop):
    torch.manual_seed(0)
    native, ext = make_pair(loop, dtype=torch.float32)
    xs = torch.randn(STEPS, 2, INPUT_SIZE)
    state = initial_state(native, 2, torch.float32)
    _step_outputs(native, ext, xs, state)
    native.double()
    ext.double()
    state64 = tuple(s.double() for s in state)
    _step_outputs(native, ext, xs.double(), state64)
    other, _ = make_pair(loop)
    native.load_state_dict(other.state_dict())
    ext.load_state_dict(other.state_dict())
    _step_outputs(native, ext, xs.double(), state64)
    native.float()
    ext.float()
    _step_outputs(native, ext, xs, state)


@pytest.mark.parametrize("batch", [2, 32], ids=["unpacked", "packed"])
@pytest.mark.parametrize("loop", LOOPS)
def test_calls_from_several_threads(loop, batch):
    """Threads stepping their own modules (and two one module) at once: packed calls (more than
    16 rows of small weights) also share the pool of panel memory (csrc/blas.h BlockPool)."""
    torch.manual_seed(0)
    pairs = [make_pair(loop) for _ in range(3)]
    pairs.append(pairs[0])  # two threads on one module
    xs = [torch.randn(STEPS, batch, INPUT_SIZE, dtype=torch.float64) for _ in pairs]
    states = [initial_state(native, batch, torch.float64) for native, _ in pairs]
    with torch.no_grad():
        expected = [decode(native, x, s) for (native, _), x, s in zip(pairs, xs, states)]
    results = [None] * len(pairs)

    def run(i):
        with torch.no_grad():
            results[i] = [decode(pairs[i][1], xs[i], states[i]) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result, want in zip(results, expected):
        for outputs in result:
            compare(outputs, want)


@pytest.mark.parametrize("loop", LOOPS)
def test_weight_gradients_in_reused_memory(loop):
    """Weight gradients of 64 KB and more come from a pool of memory (csrc/blas.h BlockPool) that
    the next backward reuses once they are freed: training steps of several sizes in turn, their
    gradients freed after each (zero_grad), match native every time, and a gradient is an ordinary
    tensor (resizable storage, shareable)."""
    torch.manual_seed(0)
    native, ext = make_pair(loop, hidden_size=96)
    for batch in (1, 5, 1, 2):
        xs = torch.randn(STEPS, batch, INPUT_SIZE, dtype=torch.float64)
        state = initial_state(native, batch, torch.float64)
        for module in (native, ext):
            module.zero_grad(set_to_none=True)
            outputs = decode(module, xs, state)
            (outputs[0].square().sum() + outputs[2].sum()).backward()
        for (name, want), got in zip(native.named_parameters(), ext.parameters()):
            compare(got.grad, want.grad, msg=name)
    grad = ext.weight_hh.grad if loop == "cell" else ext.weight_hh_l0.grad
    assert grad.nbytes >= 64 << 10 and grad.untyped_storage().resizable()
    values = grad.clone()
    grad.share_memory_()
    assert grad.is_shared() and torch.equal(grad, values)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("loop", LOOPS)
def test_eager_calls_go_through_the_dispatcher(loop, train):
    """Eager calls reach the operator from C++ (lstm_ext._C), through the dispatcher: a dispatch
    mode sees the forward, and the backward of the C++ autograd, with native's results."""
    native, ext = make_pair(loop)
    xs = torch.randn(STEPS, 2, INPUT_SIZE, dtype=torch.float64)
    state = initial_state(native, 2, torch.float64)
    loss_weights = torch.randn(STEPS, 2, native.hidden_size, dtype=torch.float64)
    recorder = _RecordOps()
    with recorder:
        got = decode_with_grads(ext, xs, state, loss_weights) if train else decode(ext, xs, state)
    compare(got, decode_with_grads(native, xs, state, loss_weights) if train else decode(native, xs, state))
    assert recorder.ops.count("lstm_ext.forward.default") == STEPS
    assert recorder.ops.count("lstm_ext.backward.default") == (STEPS if train else 0)


def test_torch_function_modes_see_the_call():
    """A __torch_function__ mode sees the operator's call, as for any torch.ops call: such calls
    do not take the C++ entry, which Python's torch function handling would not see."""
    seen = []

    class RecordFunctions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    native, ext = make_pair("cell")
    x = torch.randn(2, INPUT_SIZE, dtype=torch.float64)
    with RecordFunctions(), torch.no_grad():
        got = ext(x)
    compare(got, native(x))
    assert any(name.startswith("lstm_ext.forward") for name in seen)


def _one_step_gradients(module, x, state, how):
    """Gradients of one step for the input, state and weights: plain; of a gradient's norm (double
    backward); batched over two gradient directions (is_grads_batched); after doubling h in place."""
    h, c = module(x, state)
    leaves = [x, *state, *module.parameters()]
    if how == "in_place":
        h.mul_(2)
    if how == "batched":
        directions = torch.stack([torch.ones_like(h), torch.arange(h.numel(), dtype=h.dtype).view_as(h)])
        return torch.autograd.grad(h, leaves, directions, is_grads_batched=True)
    grads = torch.autograd.grad((h * h).sum() + c.sum(), leaves, create_graph=how == "double")
    if how == "double":
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    return grads


@pytest.mark.parametrize("how", ["plain", "double", "batched", "in_place"])
def test_an_eager_step_is_one_autograd_node(how):
    """An eager LSTMCell step is one node of the autograd graph, the operator's C++ autograd
    Function, with no views of the operator's [1, B, *] shapes around it (five more nodes per
    step); h and c are tensors of their own, as native's. Its gradients match native's, also
    differentiated again, batched, and after an in-place update of h."""
    torch.manual_seed(0)
    native, ext = make_pair("cell")
    x = torch.randn(3, INPUT_SIZE, dtype=torch.float64, requires_grad=True)
    state = tuple(t.requires_grad_() for t in initial_state(native, 3, torch.float64))
    h, c = ext(x, state)
    assert h.grad_fn is c.grad_fn and not h._is_view() and not c._is_view()
    assert {type(fn).__name__ for fn, _ in h.grad_fn.next_functions} == {"AccumulateGrad"}
    compare(_one_step_gradients(ext, x, state, how), _one_step_gradients(native, x, state, how))
