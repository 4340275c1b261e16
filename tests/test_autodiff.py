"""Every autodiff transform nn.LSTM supports, plus vmap, which it does not.

Double backward (gradient penalties, Hessian-vector products, gradgradcheck), forward-mode AD
(torch.func.jvp, torch.autograd.forward_ad, jacfwd), jacrev, hessian and is_grads_batched are
compared with native nn.LSTM; vmap (which native lacks) with a Python loop over lstm_ext.
"""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import compare, make_hx, make_input, make_lstm_pair, weighted_sum_loss
from torch.func import functional_call, jacfwd, jacrev, jvp, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

SIZES = dict(input_size=2, hidden_size=3)
SEQ_LEN, BATCH = 3, 2
DROPOUT_SEED = 7

CONFIGS = {
    "layers1": dict(num_layers=1),
    "layers2-bi": dict(num_layers=2, bidirectional=True),
    "layers2-bi-proj": dict(num_layers=2, bidirectional=True, proj_size=2),
    "layers2-nobias-batchfirst": dict(num_layers=2, bias=False, batch_first=True),
    "layers2-proj-dropout": dict(num_layers=2, proj_size=1, dropout=0.5),
}
# How the module is called: with or without hx, unbatched, packed (sorted or not).
CALLS = ["hx", "no_hx", "unbatched", "packed_sorted", "packed_unsorted"]
LENGTHS = {"packed_sorted": [SEQ_LEN, SEQ_LEN - 1], "packed_unsorted": [SEQ_LEN - 2, SEQ_LEN]}
# Each option with each way of calling, without the whole product.
CASES = [
    pytest.param(config, call, id=f"{config}-{call}")
    for index, config in enumerate(CONFIGS)
    for call in (CALLS if config == "layers2-bi-proj" else CALLS[index % 2 :: 2])
]


def module_function(module, call, dtype):
    """``(f, primals)``: ``f(*primals)`` runs ``module`` on (input, [h0, c0], *parameters)
    through functional_call and returns (output, h_n, c_n), the output of packed input as its
    data. Training-mode dropout draws the same masks at every call."""
    unbatched = call == "unbatched"
    torch.manual_seed(1)
    input = make_input(dtype, SEQ_LEN, BATCH, SIZES["input_size"], module.batch_first, unbatched)
    hx = () if call == "no_hx" else make_hx(module, dtype, BATCH, unbatched)
    names = [name for name, _ in module.named_parameters()]
    packed = None
    if call in LENGTHS:  # packed outside f: pack_padded_sequence has no forward-mode derivative
        packed = pack_padded_sequence(input, LENGTHS[call], batch_first=module.batch_first, enforce_sorted=False)
        input = packed.data

    def f(input, *rest):
        states, parameters = rest[: len(hx)], rest[len(hx) :]
        if packed is not None:
            input = packed._replace(data=input)
        torch.manual_seed(DROPOUT_SEED)
        output, (h_n, c_n) = functional_call(
            module, dict(zip(names, parameters)), (input, tuple(states)) if states else (input,)
        )
        return (output.data if packed is not None else output), h_n, c_n

    primals = [input, *hx, *(p.detach() for p in module.parameters())]
    return f, [p.clone().requires_grad_() for p in primals]


def make_case(config, call, dtype=torch.float64):
    native, ext = make_lstm_pair(dtype=dtype, **SIZES, **CONFIGS[config])
    return module_function(native, call, dtype), module_function(ext, call, dtype)


def fixed_weighted_sum(outputs):
    """weighted_sum_loss with its weights drawn now, for functions run under vmap (where a
    random draw raises)."""
    weights = [torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9)) for out in outputs]
    return lambda outputs: sum((out * weight).sum() for out, weight in zip(outputs, weights))


def second_order(f, primals):
    """A gradient penalty: d/dprimals of sum(dL/dprimals²), L a weighted sum of the outputs."""
    grads = torch.autograd.grad(weighted_sum_loss(f(*primals)), primals, create_graph=True)
    penalty = sum(grad.pow(2).sum() for grad in grads)
    return torch.autograd.grad(penalty, primals)


def tangents_like(primals, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in primals]


@pytest.mark.parametrize("config, call", CASES)
def test_gradgradcheck(config, call):
    _, (f, primals) = make_case(config, call)
    assert torch.autograd.gradgradcheck(f, primals, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config, call", CASES)
def test_gradient_penalty_matches_native(config, call, dtype):
    (native_f, native_primals), (ext_f, ext_primals) = make_case(config, call, dtype)
    compare(second_order(ext_f, ext_primals), second_order(native_f, native_primals))


# With only the weights (or only the input) requiring grad, the second-order term must still
# reach every leaf that asks for it.
@pytest.mark.parametrize("differentiable", ["weights", "input"])
def test_gradient_penalty_with_some_leaves_matches_native(differentiable):
    results = []
    for f, primals in make_case("layers2-bi-proj", "hx"):
        chosen = primals[3:] if differentiable == "weights" else primals[:1]
        for primal in primals:
            primal.requires_grad_(any(primal is c for c in chosen))
        grads = torch.autograd.grad(weighted_sum_loss(f(*primals)), chosen, create_graph=True)
        results.append(torch.autograd.grad(sum(grad.pow(2).sum() for grad in grads), chosen))
    compare(results[1], results[0])


@pytest.mark.parametrize("config", ["layers2-bi-proj", "layers2-proj-dropout"])
def test_hessian_vector_product_matches_native(config):
    results = []
    for f, primals in make_case(config, "hx"):
        grads = torch.autograd.grad(weighted_sum_loss(f(*primals)), primals, create_graph=True)
        results.append(torch.autograd.grad(grads, primals, tangents_like(primals)))
    compare(results[1], results[0])


def dual_jvp(f, primals, tangents):
    """(outputs, output tangents) of f through torch.autograd.forward_ad's dual tensors."""
    with forward_ad.dual_level():
        outputs = f(*(forward_ad.make_dual(p.detach(), t) for p, t in zip(primals, tangents)))
        return tuple(zip(*(forward_ad.unpack_dual(out) for out in outputs)))


# Native's oracle is its dual-tensor forward AD: under torch.func.jvp, native fails on packed input.
@pytest.mark.parametrize("config, call", CASES)
def test_torch_func_jvp_matches_native(config, call):
    (native_f, native_primals), (ext_f, ext_primals) = make_case(config, call)
    tangents = tangents_like(ext_primals)
    ext_result = jvp(ext_f, tuple(p.detach() for p in ext_primals), tuple(tangents))
    compare(ext_result, dual_jvp(native_f, native_primals, tangents))


@pytest.mark.parametrize("grad_mode", [True, False])
def test_forward_ad_dual_tensors_match_native(grad_mode):
    (native_f, native_primals), (ext_f, ext_primals) = make_case("layers2-bi-proj", "packed_unsorted")
    tangents = tangents_like(ext_primals)
    with torch.set_grad_enabled(grad_mode):
        compare(dual_jvp(ext_f, ext_primals, tangents), dual_jvp(native_f, native_primals, tangents))


def test_float32_jvp_matches_float64():
    """Native float32 has no forward-mode derivative on CPU (oneDNN lacks one); lstm_ext's
    float32 tangents match its float64 ones within float32's tolerance."""
    (_, _), (f32, _) = make_case("layers2-bi-proj", "hx", torch.float32)
    (_, _), (f64, primals) = make_case("layers2-bi-proj", "hx", torch.float64)
    primals, tangents = tuple(p.detach() for p in primals), tangents_like(primals)
    _, out32 = jvp(f32, tuple(p.float() for p in primals), tuple(t.float() for t in tangents))
    _, out64 = jvp(f64, primals, tuple(tangents))
    compare(out32, tuple(t.float() for t in out64))


TRANSFORMS = {
    "jacrev": lambda f, _: jacrev(f, argnums=(0, 1, 3)),
    "jacfwd": lambda f, _: jacfwd(f, argnums=(0, 1, 3)),
    "hessian": lambda f, loss: torch.func.hessian(lambda *p: loss(f(*p)), argnums=(0, 3)),
}


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("config", ["layers2-bi-proj", "layers2-nobias-batchfirst"])
def test_jacobians_and_hessian_match_native(transform, config):
    (native_f, native_primals), (ext_f, ext_primals) = make_case(config, "hx")
    loss = fixed_weighted_sum(native_f(*native_primals))
    compare(transform(ext_f, loss)(*ext_primals), transform(native_f, loss)(*native_primals))


def test_is_grads_batched_matches_native():
    results = []
    for f, primals in make_case("layers2-bi-proj", "packed_sorted"):
        outputs = f(*primals)
        grad_outputs = [torch.randn(4, *out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
                        for out in outputs]
        results.append(torch.autograd.grad(outputs, primals, grad_outputs, is_grads_batched=True))
    compare(results[1], results[0])


# ---- vmap: native has no batching rule, so a loop over lstm_ext is the oracle ----------------

VMAP = 3


def ext_module(config="layers2-bi-proj", dtype=torch.float64):
    return make_lstm_pair(dtype=dtype, **SIZES, **CONFIGS[config])[1]


def loop(f, in_dims, *args):
    """vmap's meaning: f on each index of the mapped dims, stacked on dim 0."""
    pick = lambda arg, dim, index: arg if dim is None else arg.select(dim, index)  # noqa: E731
    results = [f(*(pick(arg, dim, index) for arg, dim in zip(args, in_dims))) for index in range(VMAP)]
    return tuple(torch.stack(parts) for parts in zip(*results))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("in_dims", [(0, None, None), (2, 1, None), (3, 0, 2)], ids=str)
def test_vmap_over_input_and_states_matches_loop(in_dims, batch_first):
    ext = ext_module()
    ext.batch_first = batch_first
    input = make_input(torch.float64, SEQ_LEN, BATCH, SIZES["input_size"], batch_first)
    h0, c0 = make_hx(ext, torch.float64, BATCH)
    args = [input.unsqueeze(in_dims[0]).expand(*input.shape[: in_dims[0]], VMAP, *input.shape[in_dims[0] :])
            + torch.randn(VMAP, dtype=torch.float64).view(-1, *[1] * (input.dim() - in_dims[0]))]
    args += [state if dim is None else torch.stack([state + index for index in range(VMAP)], dim)
             for state, dim in zip((h0, c0), in_dims[1:])]

    def f(input, h0, c0):
        output, (h_n, c_n) = ext(input, (h0, c0))
        return output, h_n, c_n

    compare(vmap(f, in_dims=in_dims)(*args), loop(f, in_dims, *args))


def test_vmap_over_packed_data_and_nested_vmap_match_loop():
    ext = ext_module()
    packed = pack_padded_sequence(make_input(torch.float64, SEQ_LEN, BATCH, SIZES["input_size"]), [3, 2])
    data = torch.randn(2, VMAP, *packed.data.shape, dtype=torch.float64)
    h0, c0 = make_hx(ext, torch.float64, BATCH)
    args = (packed.batch_sizes, (h0, c0), ext._flat_weights, True, 2, 0.0, False, True)
    f = lambda data: lstm_ext.lstm(data, *args)  # noqa: E731
    inner = lambda data: loop(f, (0,), data)  # noqa: E731
    expected = tuple(torch.stack(parts) for parts in zip(*[inner(outer) for outer in data]))
    compare(vmap(vmap(f))(data), expected)


def test_vmap_over_an_ensemble_matches_loop():
    models = [ext_module() for _ in range(VMAP)]
    for index, model in enumerate(models):
        torch.manual_seed(index)
        model.reset_parameters()
    parameters, buffers = torch.func.stack_module_state(models)
    input = make_input(torch.float64, SEQ_LEN, BATCH, SIZES["input_size"])

    def f(parameters, buffers):
        output, (h_n, c_n) = functional_call(models[0], (parameters, buffers), (input,))
        return output, h_n, c_n

    expected = tuple(torch.stack(parts) for parts in zip(*[f(dict(m.named_parameters()), {}) for m in models]))
    actual = vmap(f)(parameters, buffers)
    compare(actual, expected)
    # Gradients reach the stacked weights as they reach each model's.
    names = list(parameters)
    actual_grads = torch.autograd.grad(weighted_sum_loss(actual), [parameters[n] for n in names])
    expected_grads = torch.autograd.grad(weighted_sum_loss(expected), [p for m in models for p in m.parameters()])
    compare(actual_grads, [torch.stack(expected_grads[i :: len(names)]) for i in range(len(names))])


def test_gradients_through_vmap_match_loop():
    """vmap inside ordinary autograd: the folded call's backward serves every mapped index."""
    results = []
    for batched in (True, False):
        ext = ext_module()
        input = torch.randn(VMAP, SEQ_LEN, BATCH, SIZES["input_size"], dtype=torch.float64, requires_grad=True)
        f = lambda x: ext(x)[0]  # noqa: E731
        outputs = vmap(f)(input) if batched else loop(lambda x: (f(x),), (0,), input)[0]
        weighted_sum_loss([outputs]).backward()
        results.append([input.grad, *(p.grad for p in ext.parameters())])
    compare(results[0], results[1])


def test_per_sample_gradients_match_loop():
    ext = ext_module()
    parameters = {name: p.detach() for name, p in ext.named_parameters()}
    inputs = torch.randn(VMAP, SEQ_LEN, SIZES["input_size"], dtype=torch.float64)  # unbatched samples

    def outputs(parameters, input):
        output, (h_n, c_n) = functional_call(ext, parameters, (input,))
        return output, h_n, c_n

    weighted_sum = fixed_weighted_sum(outputs(parameters, inputs[0]))
    loss = lambda parameters, input: weighted_sum(outputs(parameters, input))  # noqa: E731

    expected = [torch.func.grad(loss)(parameters, input) for input in inputs]
    actual = vmap(torch.func.grad(loss), in_dims=(None, 0))(parameters, inputs)
    compare(actual, {name: torch.stack([g[name] for g in expected]) for name in parameters})


def test_vmap_with_dropout_follows_randomness():
    ext = ext_module("layers2-proj-dropout")
    input = make_input(torch.float64, SEQ_LEN, BATCH, SIZES["input_size"]).expand(VMAP, -1, -1, -1)
    f = lambda x: ext(x)[0]  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(f)(input)
    same = vmap(f, randomness="same")(input)
    torch.manual_seed(0)
    different = vmap(f, randomness="different")(input)
    assert all(torch.equal(same[0], same[index]) for index in range(VMAP))
    assert not torch.equal(different[0], different[1])
    torch.manual_seed(0)
    compare(vmap(f, randomness="different")(input), different)  # reproducible under a seed
