"""Fuzzing (issue 6): random valid configurations against native, and random malformed calls.

The malformed calls run in child processes (this file run as a script), a batch per process, so
that a crash fails the test with the case that caused it instead of killing the test run.
"""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import assert_matches_native, make_hx, make_input, make_lstm_pair
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

# ---- valid configurations against native --------------------------------------------------------


@st.composite
def lstm_configurations(draw):
    hidden_size = draw(st.integers(1, 6))
    return dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden_size,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden_size - 1)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
    )


@settings(max_examples=60, deadline=None, database=None)
@given(
    config=lstm_configurations(),
    seq_len=st.integers(1, 6),
    batch=st.integers(1, 4),
    form=st.sampled_from(["dense", "packed", "unbatched"]),
    hx_given=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_configurations_match_native(config, seq_len, batch, form, hx_given, seed, data):
    dtype = torch.float64
    native, ext = make_lstm_pair(seed=seed, dtype=dtype, **config)
    unbatched = form == "unbatched"
    input = make_input(
        dtype,
        seq_len=seq_len,
        batch=batch,
        input_size=config["input_size"],
        batch_first=config["batch_first"],
        unbatched=unbatched,
    )
    hx = make_hx(native, dtype, batch=batch, unbatched=unbatched) if hx_given else None
    lengths = None
    if form == "packed":
        lengths = data.draw(st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch), label="lengths")
    assert_matches_native(native, ext, input, hx, lengths=lengths)


# ---- malformed calls, in child processes ---------------------------------------------------------
# A case is JSON: the entry point, a valid configuration, and a mutation that makes the call
# invalid, with a seed for the mutation's own choices (which tensor, which dimension, ...).
# Every mutation here is invalid by construction; native rejects (or crashes on) each of them.

DTYPE = torch.float64
COMMON_MUTATIONS = [
    "input_dims",
    "input_size",
    "input_dtype",
    "state_shape",
    "state_dtype",
    "state_count",
    "param_shape",
    "param_dtype",
    "on_meta",
]
STACK_MUTATIONS = ["param_count", "num_layers", "has_biases", "dropout"]
BATCH_SIZES_MUTATIONS = [
    f"batch_sizes_{how}"
    for how in (
        "increasing", "zero", "negative", "int32", "float", "2d", "empty", "rows_short", "rows_extra", "overflow"
    )
]
MUTATIONS = {
    "dense": COMMON_MUTATIONS + STACK_MUTATIONS + ["seq_len_zero"],
    "packed": COMMON_MUTATIONS + STACK_MUTATIONS + BATCH_SIZES_MUTATIONS,
    "cell": COMMON_MUTATIONS,
}


@st.composite
def malformed_cases(draw):
    entry = draw(st.sampled_from(sorted(MUTATIONS)))
    hidden_size = draw(st.integers(1, 4))
    config = dict(
        input_size=draw(st.integers(1, 4)),
        hidden_size=hidden_size,
        batch=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
    )
    if entry != "cell":
        config.update(
            seq_len=draw(st.integers(1, 4)),
            num_layers=draw(st.integers(1, 2)),
            bidirectional=draw(st.booleans()),
            proj_size=draw(st.integers(0, hidden_size - 1)),
            batch_first=entry == "dense" and draw(st.booleans()),
        )
    mutation = draw(st.sampled_from(MUTATIONS[entry]))
    return dict(entry=entry, config=config, mutation=mutation, seed=draw(st.integers(0, 2**16)))


def _every_mutation_once():
    """One case per entry point and mutation: an explicit example, so that every kind is tried
    on every run whatever hypothesis draws."""
    stack = dict(
        input_size=3, hidden_size=4, seq_len=3, batch=2, bias=True, num_layers=2, bidirectional=True, proj_size=2
    )
    configs = {
        "dense": dict(stack, batch_first=False),
        "packed": dict(stack, batch_first=False),
        "cell": dict(input_size=3, hidden_size=4, batch=2, bias=True),
    }
    return [
        dict(entry=entry, config=configs[entry], mutation=mutation, seed=0)
        for entry, mutations in MUTATIONS.items()
        for mutation in mutations
    ]


def _valid_arguments(entry, config):
    """The arguments of a valid call, as a dict of mutable pieces."""
    torch.manual_seed(0)
    I, H, B = config["input_size"], config["hidden_size"], config["batch"]
    if entry == "cell":
        cell = nn.LSTMCell(I, H, bias=config["bias"]).to(DTYPE)
        return dict(
            input=torch.randn(B, I, dtype=DTYPE),
            hx=[torch.randn(B, H, dtype=DTYPE) for _ in range(2)],
            params=[p.detach() for p in cell.parameters()],
        )
    module = nn.LSTM(
        I,
        H,
        config["num_layers"],
        bias=config["bias"],
        bidirectional=config["bidirectional"],
        proj_size=config["proj_size"],
    ).to(DTYPE)
    T = config["seq_len"]
    args = dict(
        hx=list(make_hx(module, DTYPE, batch=B)),
        params=[p.detach() for p in module._flat_weights],
        has_biases=config["bias"],
        num_layers=config["num_layers"],
        dropout=0.0,
        train=True,
        bidirectional=config["bidirectional"],
    )
    input = make_input(DTYPE, seq_len=T, batch=B, input_size=I)
    if entry == "dense":
        batch_first = config["batch_first"]
        return dict(args, input=input.transpose(0, 1).contiguous() if batch_first else input, batch_first=batch_first)
    lengths = sorted(random.Random(0).choices(range(1, T + 1), k=B - 1) + [T], reverse=True)
    packed = pack_padded_sequence(input, lengths)
    return dict(args, input=packed.data, batch_sizes=packed.batch_sizes)


def _resized(tensor, rng):
    """A tensor with one dimension of a different size (possibly 0)."""
    dim = rng.randrange(tensor.dim())
    shape = list(tensor.shape)
    shape[dim] = rng.choice([size for size in range(shape[dim] + 3) if size != shape[dim]])
    return torch.zeros(shape, dtype=tensor.dtype)


def _reshaped(tensor, rng):
    how = rng.choice(["resize", "add_dim", "drop_dim", "0-dim"] if tensor.dim() else ["add_dim"])
    if how == "resize":
        return _resized(tensor, rng)
    if how == "add_dim":
        return tensor.unsqueeze(rng.randrange(tensor.dim() + 1))
    if how == "drop_dim":  # every dimension of a valid tensor here has size 1 or more
        return tensor.select(rng.randrange(tensor.dim()), 0)
    return tensor.new_tensor(1.0)


OTHER_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.complex128]


def _spoil_batch_sizes(args, how):
    sizes, data = args["batch_sizes"], args["input"]
    if how == "increasing":  # a longer last step, with its rows: the sum still matches
        extra = int(sizes[0]) + 1
        sizes = torch.cat([sizes, sizes.new_tensor([extra])])
        data = torch.cat([data, data.new_zeros(extra, data.shape[1])])
    elif how in ("zero", "negative"):
        sizes = torch.cat([sizes, sizes.new_tensor([0 if how == "zero" else -1])])
    elif how in ("int32", "float"):
        sizes = sizes.to(torch.int32 if how == "int32" else torch.float32)
    elif how == "2d":
        sizes = sizes[None]
    elif how == "empty":
        sizes, data = sizes[:0], data[:0]
    elif how == "rows_short":
        data = data[:-1]
    elif how == "rows_extra":
        data = torch.cat([data, data[:1]])
    else:  # overflow: wraps around to one row in int64
        sizes, data = torch.tensor([2**63 - 1, 2**63 - 1, 3]), data[:1]
    args["batch_sizes"], args["input"] = sizes, data


def _spoil(entry, args, mutation, rng):
    """Applies ``mutation`` to the valid arguments ``args``."""
    if mutation == "input_dims":
        valid = 3 if entry == "dense" else 2
        ndim = rng.choice([n for n in range(5) if n != valid])
        args["input"] = torch.randn([rng.randint(1, 3) for _ in range(ndim)], dtype=DTYPE)
    elif mutation == "input_size":
        size = args["input"].shape[-1]
        new_size = rng.choice([s for s in range(size + 3) if s != size])
        args["input"] = torch.randn(*args["input"].shape[:-1], new_size, dtype=DTYPE)
    elif mutation == "input_dtype":
        args["input"] = args["input"].to(rng.choice(OTHER_DTYPES))
    elif mutation == "state_shape":
        which = rng.randrange(2)
        args["hx"][which] = _reshaped(args["hx"][which], rng)
    elif mutation == "state_dtype":
        which = rng.randrange(2)
        args["hx"][which] = args["hx"][which].to(rng.choice(OTHER_DTYPES))
    elif mutation == "state_count":
        args["hx"] = rng.choice([[], args["hx"][:1], args["hx"] + args["hx"][:1]])
    elif mutation == "param_shape":
        index = rng.randrange(len(args["params"]))
        args["params"][index] = _reshaped(args["params"][index], rng)
    elif mutation == "param_dtype":
        index = rng.randrange(len(args["params"]))
        args["params"][index] = args["params"][index].to(rng.choice(OTHER_DTYPES))
    elif mutation == "on_meta":
        # A meta tensor among CPU ones: a shape-only implementation must not answer the call.
        key = rng.choice(["input", "hx", "params"] + (["batch_sizes"] if entry == "packed" else []))
        if key in ("hx", "params"):
            index = rng.randrange(len(args[key]))
            args[key][index] = args[key][index].to("meta")
        else:
            args[key] = args[key].to("meta")
    elif mutation == "param_count":
        params = args["params"]
        if rng.random() < 0.5:
            args["params"] = params[: rng.randrange(len(params))]
        else:
            args["params"] = params + rng.choices(params, k=rng.randint(1, 3))
    elif mutation == "num_layers":
        layers = args["num_layers"]
        args["num_layers"] = rng.choice([0, -1, layers + 1] + ([layers - 1] if layers > 1 else []))
    elif mutation == "has_biases":
        args["has_biases"] = not args["has_biases"]
    elif mutation == "dropout":
        args["dropout"] = rng.choice([-0.5, 1.5, math.nan, math.inf, -math.inf])
    elif mutation == "seq_len_zero":
        args["input"] = args["input"].narrow(1 if args["batch_first"] else 0, 0, 0)
    elif mutation in BATCH_SIZES_MUTATIONS:
        _spoil_batch_sizes(args, mutation.removeprefix("batch_sizes_"))
    else:
        raise AssertionError(f"unknown mutation {mutation}")


def _call(entry, args):
    if entry == "cell":
        return lstm_ext.lstm_cell(args["input"], tuple(args["hx"]), *args["params"])
    flags = (args["has_biases"], args["num_layers"], args["dropout"], args["train"], args["bidirectional"])
    if entry == "dense":
        return lstm_ext.lstm(args["input"], tuple(args["hx"]), args["params"], *flags, args["batch_first"])
    return lstm_ext.lstm(args["input"], args["batch_sizes"], tuple(args["hx"]), args["params"], *flags)


def _run_cases_from_stdin():
    """Child process: run the JSON list of cases on stdin, one JSON line per event on stdout."""
    for index, case in enumerate(json.load(sys.stdin)):
        print(json.dumps(dict(case=index, started=True)), flush=True)
        args = _valid_arguments(case["entry"], case["config"])
        _spoil(case["entry"], args, case["mutation"], random.Random(case["seed"]))
        try:
            result = _call(case["entry"], args)
        except Exception as error:  # any Python exception is the wanted outcome
            outcome = dict(raised=type(error).__name__, message=str(error)[:300])
        else:
            outcome = dict(returned=[f"{t.device.type} {list(t.shape)}" for t in result])
        print(json.dumps(dict(case=index, **outcome)), flush=True)


def _run_in_child(cases):
    """Runs ``cases`` in a child process; returns (exit code, events by case, stderr)."""
    # The child must import the lstm_ext this process tests (python -m pytest finds it through the
    # working directory, a script does not).
    package_root = os.path.dirname(os.path.dirname(lstm_ext.__file__))
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": python_path},
    )
    events = {}
    for line in completed.stdout.splitlines():
        if not line.startswith('{"case"'):  # anything else a library prints
            continue
        event = json.loads(line)
        events.setdefault(event.pop("case"), {}).update(event)
    return completed.returncode, events, completed.stderr


# Each example costs a child process (~2 s), so few examples of many cases each; no shrinking
# (it would re-run the batch dozens of times), as the failure names the offending cases itself.
@settings(max_examples=3, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
@example(cases=_every_mutation_once())
@given(cases=st.lists(malformed_cases(), min_size=40, max_size=40))
def test_malformed_calls_raise_python_exceptions(cases):
    returncode, events, stderr = _run_in_child(cases)
    if returncode != 0:
        started = [index for index, event in events.items() if "raised" not in event and "returned" not in event]
        culprit = cases[started[-1]] if started else None
        pytest.fail(
            f"child exited with {returncode} during case {culprit}\nstderr tail:\n{stderr[-3000:]}", pytrace=False
        )
    returned = [(cases[index], event["returned"]) for index, event in sorted(events.items()) if "returned" in event]
    assert not returned, "malformed calls returned instead of raising:\n" + "\n".join(map(str, returned))
    assert len(events) == len(cases) and all("raised" in event for event in events.values())


if __name__ == "__main__":
    _run_cases_from_stdin()
