"""Benchmark lstm_ext's cell variants against the same cell as a PyTorch loop over time.

Rows: each variant on each shape (one layer, one direction, float32), inference (forward under
torch.inference_mode) and training (forward + backward of a weighted sum of output, h_n and c_n,
gradients of the input and every parameter). Contenders, timed in one process, round-robin in a
seeded random order, median of repeats (each sample averages enough calls to last >= 5 ms). On
one thread (--threads 1) the clock is the process's CPU time, which other processes on a busy
machine do not inflate; otherwise wall time:

  lstm_ext       lstm_ext.LSTM with the variant's option
  plain          lstm_ext.LSTM without it (the goal: the variant within 1.3x of this)
  loop           the variant's math as a loop of ATen ops over steps (x·W_ihᵀ for all steps in
                 one product, as people write it), autograd for training
  compiled loop  the same loop under torch.compile (with --compiled: each row compiles it first)

Before timing, the loop's outputs are checked against lstm_ext's in float64 (eval for the
variants that drop, where both are deterministic).

    python benchmarks/bench_cells.py                       # every variant and shape
    python benchmarks/bench_cells.py --variants peephole --shapes 50,16,128 --repeats 5
    python benchmarks/bench_cells.py --compiled --threads 1 --repeats 5
"""

import argparse
import gc
import random
import statistics
import time

import torch
import torch.nn.functional as F

import lstm_ext

SHAPES = [(50, 16, 128), (100, 32, 256), (200, 4, 64)]  # (T, B, H), input size = H
VARIANTS = {
    "peephole": dict(peephole=True),
    "cifg": dict(cell="cifg"),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "weight_drop": dict(weight_drop=0.5),
    "zoneout": dict(zoneout=(0.15, 0.05)),
    "all": dict(peephole=True, recurrent_dropout=0.25, weight_drop=0.5, zoneout=(0.15, 0.05)),
    "layer_norm": dict(layer_norm=True),
}
MIN_SAMPLE_S = 5e-3


def loop(module, x, h, c):
    """The module's variant as a plain loop of ATen ops: (output, h_n, c_n), x [T, B, I]."""
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    if module.training and module.weight_drop:
        w_hh = w_hh * torch.empty_like(w_hh).bernoulli_(1 - module.weight_drop) / (1 - module.weight_drop)
    mask = None
    if module.training and module.recurrent_dropout:
        p = module.recurrent_dropout
        mask = torch.empty_like(h).bernoulli_(1 - p) / (1 - p)
    cell, normalized = lstm_ext.cells.split(module.cell)
    layer_norm = lambda v, name, bias=None: F.layer_norm(v, v.shape[-1:], getattr(module, name), bias)  # noqa: E731
    if normalized:
        gates_x = layer_norm(x.flatten(0, 1) @ w_ih.t(), "ln_weight_ih_l0") + (b_ih + b_hh)
    else:
        gates_x = torch.addmm(b_ih + b_hh, x.flatten(0, 1), w_ih.t())
    gates_x = gates_x.view(x.size(0), x.size(1), -1)
    outputs = []
    for t in range(x.size(0)):
        h_in = h if mask is None else h * mask
        if normalized:
            gates = gates_x[t] + layer_norm(h_in @ w_hh.t(), "ln_weight_hh_l0")
        else:
            gates = torch.addmm(gates_x[t], h_in, w_hh.t())
        i, f, g, o = gates.chunk(4, 1)
        if cell == "peephole":
            i, f = i + module.weight_ci_l0 * c, f + module.weight_cf_l0 * c
        i = torch.sigmoid(i)
        f = 1 - i if cell == "cifg" else torch.sigmoid(f)
        c_new = f * c + i * torch.tanh(g)
        if cell == "peephole":
            o = o + module.weight_co_l0 * c_new
        c_out = layer_norm(c_new, "ln_weight_c_l0", module.ln_bias_c_l0) if normalized else c_new
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
        if any(module.zoneout):
            keep_c, keep_h = module.zoneout
            if module.training:
                keep_c, keep_h = torch.empty_like(c).bernoulli_(keep_c), torch.empty_like(h).bernoulli_(keep_h)
            c_new, h_new = keep_c * c + (1 - keep_c) * c_new, keep_h * h + (1 - keep_h) * h_new
        c, h = c_new, h_new
        outputs.append(h)
    return torch.stack(outputs), h, c


def make_calls(variant, shape, train, compiled=False):
    T, B, H = shape
    torch.manual_seed(0)
    x = torch.randn(T, B, H)
    h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
    module = lstm_ext.LSTM(H, H, **VARIANTS[variant]).train(train)
    plain = lstm_ext.LSTM(H, H).train(train)
    loss_weights = [torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)]

    def ext(m):
        output, (h_n, c_n) = m(x if not train else x.requires_grad_(), (h0[None], c0[None]))
        return output, h_n[0], c_n[0]

    def run(forward, parameters):
        if not train:
            with torch.inference_mode():
                return forward()
        outputs = forward()
        loss = sum((o * w).sum() for o, w in zip(outputs, loss_weights))
        return torch.autograd.grad(loss, [x, *parameters])

    calls = {
        "lstm_ext": lambda: run(lambda: ext(module), list(module.parameters())),
        "plain": lambda: run(lambda: ext(plain), list(plain.parameters())),
        "loop": lambda: run(lambda: loop(module, x, h0, c0), list(module.parameters())),
    }
    if compiled:
        # Whole (fullgraph), so that a graph break cannot time eager code; dynamo refuses any
        # nn.LSTM instance, lstm_ext.LSTM among them, unless allow_rnn.
        compiled_loop = torch._dynamo.config.patch(allow_rnn=True)(torch.compile(loop, fullgraph=True))
        calls["compiled loop"] = lambda: run(lambda: compiled_loop(module, x, h0, c0), list(module.parameters()))
    return module, x, h0, c0, calls


def check(variant, shape):
    """In float64: float32 rounds layer norm's normalisation so that two correct float32 runs of it
    part by 1e-3 over 100 steps."""
    module, x, h0, c0, _ = make_calls(variant, shape, train=False)
    module, x, h0, c0 = module.double(), x.double(), h0.double(), c0.double()
    with torch.no_grad():
        expected = loop(module, x, h0, c0)
        output, (h_n, c_n) = module(x, (h0[None], c0[None]))
    for a, e in zip((output, h_n[0], c_n[0]), expected):
        error = ((a - e).abs().max() / e.abs().max()).item()
        assert error < 1e-10, f"{variant} {shape}: lstm_ext differs from the loop by {error:.1e}"


def time_sample(call):
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    calls, start = 0, clock()
    while True:
        call()
        calls += 1
        elapsed = clock() - start
        if elapsed >= MIN_SAMPLE_S:
            return elapsed / calls


def measure(variant, shape, train, repeats, compiled):
    _, _, _, _, calls = make_calls(variant, shape, train, compiled)
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(0)
    gc.disable()
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                samples[name].append(time_sample(calls[name]))
    finally:
        gc.enable()
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def main(argv=None) -> list:
    """Prints the table; returns its rows as dicts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="from: " + ", ".join(VARIANTS))
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="T,B,H[;T,B,H]")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compiled", action="store_true", help="add the loop under torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in shape.split(",")) for shape in args.shapes.split(";")]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, one layer, input size = H")
    columns = ["variant", "T, B, H", "mode", "lstm_ext ms", "plain lstm_ext ms", "loop ms", "loop / lstm_ext"]
    columns += ["compiled loop ms", "compiled loop / lstm_ext"] if args.compiled else []
    columns += ["lstm_ext / plain"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---:|" * (len(columns) - 3))
    for variant in args.variants.split(","):
        for shape in shapes:
            check(variant, shape)
            for train in (False, True):
                ms = measure(variant, shape, train, args.repeats, args.compiled)
                rows.append(dict(variant=variant, shape=shape, train=train, ms=ms))
                cells = [variant, ", ".join(map(str, shape)), "training" if train else "inference"]
                cells += [f"{ms['lstm_ext']:.3f}", f"{ms['plain']:.3f}", f"{ms['loop']:.3f}",
                          f"{ms['loop'] / ms['lstm_ext']:.1f}x"]
                if args.compiled:
                    cells += [f"{ms['compiled loop']:.3f}", f"{ms['compiled loop'] / ms['lstm_ext']:.1f}x"]
                cells += [f"{ms['lstm_ext'] / ms['plain']:.2f}x"]
                print("| " + " | ".join(cells) + " |", flush=True)
    return rows


if __name__ == "__main__":
    main()
