"""Benchmark lstm_ext under the autodiff transforms, against native on the same problems.

Rows (each contender's results are checked against the row's reference first, as in bench.py):

  gradient_penalty  a WGAN-GP-style training step: forward, first-order gradients of a weighted
                    sum of (output, h_n, c_n) with create_graph, then the gradient of
                    loss + sum(grad²) w.r.t. input and weights (double backward).
                    lstm_ext vs native_default and aten_loop.
  jvp               torch.func.jvp with tangents on the input and every weight.
                    lstm_ext vs native_default (where native has forward-mode AD: not float32
                    through oneDNN) and aten_loop.
  vmap_inputs       torch.func.vmap of lstm_ext.lstm over V inputs, against the same call with
                    the V inputs folded into the batch by hand (goal: within 10%).
  ensemble          torch.func.vmap over V stacked models (stack_module_state-style weights),
                    against a Python loop over the V models, lstm_ext and native.
  Each in inference (forward) or training (forward + backward) where that applies.

Timing as bench.py: contenders interleaved in one process, in a seeded random order per
repeat; a sample averages enough calls to last >= 5 ms; a ratio is the median over repeats of
contender / lstm_ext within the repeat (> 1: lstm_ext faster).

    python benchmarks/bench_autodiff.py            # all rows, ~2 min on 2 cores
    python benchmarks/bench_autodiff.py --tiny     # smoke-sized shapes
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import _VF

from bench import MAX_CALLS_PER_SAMPLE, MIN_SAMPLE_S, environment, gc_disabled, load_ext_lstm
from bench_cases import TOLERANCE, Shape, compare, make_problem

VMAP_SIZE = 8
SHAPES = {
    "full": (
        Shape("latency", 20, 4, 64, 64),
        Shape("small", 50, 16, 128, 128),
        Shape("bidir2", 50, 16, 128, 128, layers=2, bidirectional=True),
        Shape("latency_f64", 20, 4, 64, 64, dtype="float64"),
        Shape("small_f64", 50, 16, 128, 128, dtype="float64"),
    ),
    "tiny": (Shape("tiny", 5, 3, 8, 8), Shape("tiny_bidir2_f64", 5, 3, 8, 6, 2, True, dtype="float64")),
}


def lstm_call(lstm, problem, x=None, weights=None, h0=None, c0=None):
    """``lstm`` (torch._VF.lstm's signature) on the problem, with any tensor replaced."""
    s = problem.shape
    x = problem.x if x is None else x
    hx = (problem.h0 if h0 is None else h0, problem.c0 if c0 is None else c0)
    weights = problem.weights if weights is None else weights
    return lstm(x, hx, list(weights), True, s.layers, 0.0, True, s.bidirectional, False)


def weighted_loss(problem, outputs):
    return sum((out * w).sum() for out, w in zip(outputs, problem.loss_weights))


def gradient_penalty(lstm, problem):
    leaves = [t.clone().requires_grad_() for t in (problem.x, *problem.weights)]

    def run():
        loss = weighted_loss(problem, lstm_call(lstm, problem, leaves[0], leaves[1:]))
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(loss + sum(g.pow(2).sum() for g in grads), leaves)

    return run


def jvp(lstm, problem):
    primals = (problem.x, *problem.weights)
    generator = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in primals)
    f = lambda x, *weights: lstm_call(lstm, problem, x, weights)  # noqa: E731
    return lambda: torch.func.jvp(f, primals, tangents)[1]


def vmapped_inputs(lstm, problem, train):
    """vmap over V inputs and initial states; and the same V problems folded into the batch."""
    generator = torch.Generator().manual_seed(2)
    xs, h0s, c0s = (torch.randn(VMAP_SIZE, *t.shape, dtype=t.dtype, generator=generator)
                    for t in (problem.x, problem.h0, problem.c0))
    weights = [w.clone().requires_grad_(train) for w in problem.weights]
    mapped = torch.func.vmap(lambda x, h0, c0: lstm_call(lstm, problem, x, weights, h0, c0))
    # vmap's batching rule puts each sequence's V copies side by side: fold the same way.
    fold = lambda t: t.movedim(0, 2).flatten(1, 2)  # noqa: E731
    folded = lambda: lstm_call(lstm, problem, fold(xs), weights, fold(h0s), fold(c0s))  # noqa: E731

    def unfold(outputs):
        return tuple(out.unflatten(1, (-1, VMAP_SIZE)).movedim(2, 0) for out in outputs)

    return with_backward(lambda: mapped(xs, h0s, c0s), weights, train), \
        with_backward(lambda: unfold(folded()), weights, train)


def ensemble(lstm, problem, train):
    """vmap over V stacked models; and a Python loop over them."""
    generator = torch.Generator().manual_seed(3)
    models = [[torch.randn(w.shape, dtype=w.dtype, generator=generator) * 0.1 for w in problem.weights]
              for _ in range(VMAP_SIZE)]
    stacked = [torch.stack(ws).requires_grad_(train) for ws in zip(*models)]
    models = [[w.requires_grad_(train) for w in ws] for ws in models]
    mapped = torch.func.vmap(lambda *weights: lstm_call(lstm, problem, weights=weights))
    looped = lambda: tuple(torch.stack(parts) for parts in zip(*(lstm_call(lstm, problem, weights=ws)  # noqa: E731
                                                                 for ws in models)))
    return with_backward(lambda: mapped(*stacked), stacked, train), with_backward(looped, models, train)


def with_backward(forward, leaves, train):
    """forward's outputs, and in training the gradients of a weighted sum of them w.r.t. the
    leaves: a list of tensors, or of per-model lists whose gradients are stacked per weight."""
    if not train:
        return lambda: [out.detach() for out in forward()]
    per_model = isinstance(leaves[0], list)
    flat = [w for ws in leaves for w in ws] if per_model else leaves

    def run():
        outputs = forward()
        generator = torch.Generator().manual_seed(4)
        loss = sum((out * torch.randn(out.shape, dtype=out.dtype, generator=generator)).sum() for out in outputs)
        grads = torch.autograd.grad(loss, flat)
        if per_model:
            per = len(leaves[0])
            grads = [torch.stack(grads[i::per]) for i in range(per)]
        return [out.detach() for out in outputs] + list(grads)

    return run


def rows_for(shape, ext_lstm):
    """(row name, mode, reference name, {contender: callable}) for every row of a shape."""
    problem = make_problem(shape)
    aten_loop = lambda *args: no_mkldnn(_VF.lstm, *args)  # noqa: E731
    yield "gradient_penalty", "training", "native_default", {
        "lstm_ext": gradient_penalty(ext_lstm, problem),
        "native_default": gradient_penalty(_VF.lstm, problem),
        "aten_loop": gradient_penalty(aten_loop, problem)}
    # oneDNN's float32 CPU LSTM has no forward-mode derivative: ATen's loop is native there.
    jvp_native = {"aten_loop": jvp(aten_loop, problem)}
    if shape.dtype == "float64":
        jvp_native["native_default"] = jvp(_VF.lstm, problem)
    yield "jvp", "forward-mode", "aten_loop", {"lstm_ext": jvp(ext_lstm, problem), **jvp_native}
    for train in (False, True):
        mode = "training" if train else "inference"
        mapped, folded = vmapped_inputs(ext_lstm, problem, train)
        yield "vmap_inputs", mode, "folded_batch", {"lstm_ext": mapped, "folded_batch": folded}
        mapped, looped = ensemble(ext_lstm, problem, train)
        native_loop = ensemble(_VF.lstm, problem, train)[1]
        yield "ensemble", mode, "loop", {"lstm_ext": mapped, "loop": looped, "native_loop": native_loop}


def no_mkldnn(function, *args):
    with torch.backends.mkldnn.flags(enabled=False):
        return function(*args)


def calls_per_sample(task):
    start = time.perf_counter()
    task()
    return max(1, min(MAX_CALLS_PER_SAMPLE, round(MIN_SAMPLE_S / (time.perf_counter() - start) + 0.5)))


def time_sample(task, n_calls):
    start = time.perf_counter()
    for _ in range(n_calls):
        task()
    return (time.perf_counter() - start) / n_calls


def measure(shape, name, mode, reference, tasks, repeats):
    row = {"row": name, "shape": shape.name, "dims": shape.describe(), "dtype": shape.dtype, "mode": mode,
           "reference": reference, "status": "ok", "error": None, "time_ms": {}, "ratios": {}}
    with gc_disabled():
        contender = reference
        try:  # a crashing contender fails its row, not the run
            expected = [t.detach() for t in tasks[reference]()]
            for contender, task in tasks.items():
                actual = [t.detach() for t in task()]
                err, worst = compare([f"result{i}" for i in range(len(expected))], actual, expected)
                if not err <= TOLERANCE[shape.dtype]:
                    return {**row, "status": "FAILED", "error": f"{contender} {worst} rel err {err:.2e}"}
        except Exception as exc:
            return {**row, "status": "FAILED", "error": f"{contender} raised {type(exc).__name__}: {exc}"}
        n_calls = {c: calls_per_sample(task) for c, task in tasks.items()}
        samples = {c: [] for c in tasks}
        order = random.Random(0)
        for _ in range(repeats):
            for contender in order.sample(list(tasks), len(tasks)):
                samples[contender].append(time_sample(tasks[contender], n_calls[contender]))
    ext = samples["lstm_ext"]
    row["time_ms"] = {c: 1e3 * statistics.median(s) for c, s in samples.items()}
    row["ratios"] = {c: statistics.median(a / b for a, b in zip(s, ext)) for c, s in samples.items() if c != "lstm_ext"}
    return row


def table(rows):
    lines = ["| row | shape | dims | dtype | mode | ext ms | contenders ms | contender / ext | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        others = ", ".join(f"{c} {ms:.4g}" for c, ms in r["time_ms"].items() if c != "lstm_ext")
        ratios = ", ".join(f"{c} {x:.2f}" for c, x in r["ratios"].items())
        ext_ms = f"{r['time_ms']['lstm_ext']:.4g}" if r["time_ms"] else "-"
        lines.append(f"| {r['row']} | {r['shape']} | {r['dims']} | {r['dtype']} | {r['mode']} | {ext_ms} | "
                     f"{others or '-'} | {ratios or '-'} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-sized shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext_lstm, ext_info = load_ext_lstm()
    env = environment(args.threads, ext_info)
    print(f"torch {env['torch']} | {env['cpu']} | threads {args.threads} | lstm_ext: {ext_info}")
    rows = [measure(shape, *row, args.repeats)
            for shape in SHAPES["tiny" if args.tiny else "full"] for row in rows_for(shape, ext_lstm)]
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autodiff.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    for row in rows:
        if row["status"] != "ok":
            print(f"FAILED {row['row']} {row['shape']} {row['mode']}: {row['error']}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
