"""Benchmark step-by-step decoding: lstm_ext against native, one step per call.

Two loops, each over --steps steps with the state fed back, on the same seeded weights,
and small whole calls:

  cell  h, c = cell(x[t], (h, c))                        lstm_ext.LSTMCell vs nn.LSTMCell
  t1    y, (h, c) = lstm(x[t:t + 1], (h, c))             lstm_ext.LSTM vs nn.LSTM, T=1
  call  y, (h, c) = lstm(x, (h, c))                      one call on [T, B, I], --calls shapes

"inference" runs the loop under torch.inference_mode; "training" runs it with
gradients and then takes those of the input and every weight of a weighted sum
of every step's h and the last c (BPTT through the Python loop). Native's LSTM
runs as by default (oneDNN for float32). Inference t1 and call rows also time
the engines people deploy nn.LSTM to, on nn.LSTM exported to ONNX for one call
(the `peers` extra installs them; a row without one says so): ONNX Runtime
(its pool's spinning off) and OpenVINO (float32 precision, latency hint), each
on the same thread count.

--dtype bfloat16 / float16: every loop in that dtype (weights, input, state rounded
to it), against native in that dtype (oneDNN where it runs, else ATen's loop or
cell; where oneDNN raises, "could not create a primitive descriptor", its ATen loop
with oneDNN off: the row's `native ran` says which) and lstm_ext_f32, lstm_ext in
float32 on the same values widened (its ratio lstm_ext_f32/ext > 1: the narrow
type is faster); each contender's max relative error against native float32 on
the same values is a column. lstm_ext must be within bench_cases.TOLERANCE of it
and lstm_ext_f32 within 1e-4, or the row FAILED; native's error is reported. The
engines (float32 runtimes) are not timed in those rows.

Correctness first: the results must match native to bench_cases.TOLERANCE, or
the row is FAILED and not timed. Timing as in bench.py: round-robin repeats in
a seeded random order, each ratio (contender time / lstm_ext time, > 1: lstm_ext
faster) the median of the ratios within one repeat. Per loop and mode, the
geometric mean of the ratios.

    python benchmarks/bench_step.py                      # the grid: B 1-64, H 64-1024
    python benchmarks/bench_step.py --batches 1 --hidden 256 --loops cell
    python benchmarks/bench_step.py --loops call --mode inference    # small calls vs the engines
    python benchmarks/bench_step.py --dtype bfloat16 --loops cell,t1  # vs native bf16 and lstm_ext float32
"""

import argparse
import contextlib
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from itertools import product

import torch
from torch import nn

from bench import gc_disabled, positive_int
from bench_cases import REDUCED, REFUSED, TOLERANCE, compare, engine_of

LOOPS = ("cell", "t1", "call")
MODES = ("inference", "training")
MIN_SAMPLE_S = 5e-3
PEERS = ("onnxruntime", "openvino")
CONTENDERS = ("lstm_ext", "native", "lstm_ext_f32", *PEERS)
# The small calls (T, B, H): a streaming step, and two short sequences.
CALL_SHAPES = ((1, 1, 256), (20, 4, 64), (50, 16, 128))


@dataclass(frozen=True)
class StepShape:
    loop: str
    B: int
    H: int
    dtype: str = "float32"
    T: int = 0  # a call's steps (call loop)

    def describe(self) -> str:
        return f"{self.loop}{f' T{self.T}' if self.T else ''} B{self.B} I{self.H} H{self.H}"


@dataclass
class StepProblem:
    shape: StepShape
    modules: dict  # contender name -> module with the same weights
    x: torch.Tensor  # [steps, B, I]
    h0: torch.Tensor  # [B, H]
    c0: torch.Tensor
    loss_weights: torch.Tensor  # [steps, B, H], for every step's h
    float32: "StepProblem | None" = None  # bfloat16/float16: the same values and weights widened


def make_problem(shape: StepShape, steps: int, seed: int = 0) -> StepProblem:
    import lstm_ext

    steps = shape.T or steps
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    native_class, ext_class = (nn.LSTMCell, lstm_ext.LSTMCell) if shape.loop == "cell" else (nn.LSTM, lstm_ext.LSTM)
    native = native_class(shape.H, shape.H, dtype=dtype)
    ext = ext_class(shape.H, shape.H, dtype=dtype)
    ext.load_state_dict(native.state_dict())
    randn = lambda *size: torch.randn(*size, dtype=dtype)  # noqa: E731
    problem = StepProblem(shape, {"lstm_ext": ext, "native": native}, randn(steps, shape.B, shape.H),
                          randn(shape.B, shape.H), randn(shape.B, shape.H), randn(steps, shape.B, shape.H))
    if shape.dtype in REDUCED:
        state = {k: v.float() for k, v in native.state_dict().items()}
        wide = {"lstm_ext": ext_class(shape.H, shape.H), "native": native_class(shape.H, shape.H)}
        for module in wide.values():
            module.load_state_dict(state)
        problem.float32 = StepProblem(replace(shape, dtype="float32"), wide, problem.x.float(), problem.h0.float(),
                                      problem.c0.float(), problem.loss_weights.float())
    return problem


def decode(module, problem: StepProblem) -> tuple:
    """The loop: every step's h stacked, and the last c."""
    h, c = problem.h0, problem.c0
    hs = []
    if problem.shape.loop == "cell":
        for x_t in problem.x:
            h, c = module(x_t, (h, c))
            hs.append(h)
        return torch.stack(hs), c
    h, c = h.unsqueeze(0), c.unsqueeze(0)
    if problem.shape.loop == "call":
        y, (h, c) = module(problem.x, (h, c))
        return y, c[0]
    for t in range(problem.x.size(0)):
        y, (h, c) = module(problem.x[t:t + 1], (h, c))
        hs.append(y[0])
    return torch.stack(hs), c[0]


def run(module, problem: StepProblem, train: bool) -> list:
    """Inference: the outputs. Training: the outputs and the gradients of input and weights."""
    if not train:
        with torch.inference_mode():
            return list(decode(module, problem))
    x = problem.x.clone().requires_grad_()
    hs, c = decode(module, StepProblem(**{**vars(problem), "x": x}))
    loss = (hs * problem.loss_weights).sum() + c.sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [hs.detach(), c.detach(), *grads]


def export_lstm(module: nn.LSTM, x: torch.Tensor, h: torch.Tensor, path: str) -> str:
    """`module` exported to ONNX (TorchScript exporter) for calls like module(x, (h, h)): inputs x, h, c and
    outputs y, h_n, c_n, as the runners below take them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, (h, h)), path, input_names=["x", "h", "c"], output_names=["y", "h_n", "c_n"],
                          dynamo=False)
    return path


def exported_lstm(problem: StepProblem, directory: str) -> str:
    """nn.LSTM exported to ONNX for one call of the loop (one step, or the whole call), as a file."""
    T = problem.shape.T or 1
    return export_lstm(problem.modules["native"], problem.x[:T], problem.h0.unsqueeze(0), f"{directory}/lstm.onnx")


def onnxruntime_runner(path: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def call(x, state):
        y, h, c = session.run(None, {"x": x.numpy(), "h": state[0].numpy(), "c": state[1].numpy()})
        return torch.from_numpy(y), (torch.from_numpy(h), torch.from_numpy(c))

    return call


def openvino_runner(path: str, threads: int):
    import openvino

    # float32 throughout: on a CPU with bfloat16 instructions OpenVINO would otherwise compute in bfloat16.
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "NUM_STREAMS": 1}
    compiled = openvino.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()

    def call(x, state):
        result = request.infer({"x": x.numpy(), "h": state[0].numpy(), "c": state[1].numpy()})
        y, h, c = (torch.from_numpy(result[compiled.output(name)]) for name in ("y", "h_n", "c_n"))
        return y, (h, c)

    return call


def peer_runners(problem: StepProblem, threads: int) -> tuple[dict, list]:
    """The deployment engines as module-like callables on nn.LSTM's export, and a note for each one absent."""
    runners, notes = {}, []
    with tempfile.TemporaryDirectory() as directory:
        path = exported_lstm(problem, directory)
        for name, make in (("onnxruntime", onnxruntime_runner), ("openvino", openvino_runner)):
            try:
                runners[name] = make(path, threads)
            except ImportError:
                notes.append(f"{name} not importable (pip install -e '.[peers]'): no {name} column")
    return runners, notes


def time_sample(module, problem: StepProblem, train: bool, calls: int, context=contextlib.nullcontext) -> float:
    with context():
        start = time.perf_counter()
        for _ in range(calls):
            run(module, problem, train)
        return (time.perf_counter() - start) / calls


def mkldnn_off():
    return torch.backends.mkldnn.flags(enabled=False)


def reduced_contenders(problem: StepProblem, train: bool, row: dict) -> tuple:
    """bfloat16/float16 rows: the contenders (name -> (module, problem, context)), which engine native
    ran (recorded in row), and native float32's results on the same values (the reference)."""
    contenders = {name: (module, problem, contextlib.nullcontext) for name, module in problem.modules.items()}
    mkldnn, row["native_engine"] = engine_of(lambda: run(problem.modules["native"], problem, train),
                                             "ATen cell" if problem.shape.loop == "cell" else "ATen loop")
    if not mkldnn:
        contenders["native"] = (problem.modules["native"], problem, mkldnn_off)
        row["notes"].append(f"{problem.shape.dtype}: {REFUSED} (native timed with oneDNN off)")
    wide = problem.float32
    contenders["lstm_ext_f32"] = (wide.modules["lstm_ext"], wide, contextlib.nullcontext)
    if not train and problem.shape.loop in ("t1", "call"):
        row["notes"].append(f"{problem.shape.dtype} rows: the engines ({', '.join(PEERS)}) are float32 runtimes,"
                            " not timed")
    return contenders, run(wide.modules["native"], wide, train)


def check(contenders: dict, expected: list, train: bool, row: dict) -> str | None:
    """Each contender's worst relative error against `expected` into row["max_rel_error"] (reduced rows);
    the first failure's message, or None."""
    dtype = row["dtype"]
    for name, (module, problem, context) in contenders.items():
        with context():
            actual = run(module, problem, train)
        err, worst = compare([f"result {i}" for i in range(len(expected))], actual, expected)
        if dtype not in REDUCED:
            if not err <= TOLERANCE[dtype]:
                return f"{name} {worst} rel err {err:.2e}"
            continue
        row["max_rel_error"][name] = err
        tol = TOLERANCE["float32" if name == "lstm_ext_f32" else dtype]
        if err <= tol:
            continue
        if name == "native":
            row["notes"].append(f"native {worst} rel err {err:.2e} > {tol:.0e} against float32 (reported, not"
                                " checked)")
        else:
            return f"{name} {worst} rel err {err:.2e} against float32"
    return None


def measure_row(shape: StepShape, mode: str, steps: int, repeats: int, threads: int) -> dict:
    train = mode == "training"
    problem = make_problem(shape, steps)
    row = {"loop": shape.loop, "B": shape.B, "H": shape.H, "dtype": shape.dtype, "mode": mode, "steps": steps,
           "dims": shape.describe(), "status": "ok", "error": None, "notes": [], "native_engine": None,
           "max_rel_error": {}, "ms_per_step": {}, "ratios": {}}
    with gc_disabled():
        if shape.dtype in REDUCED:
            contenders, expected = reduced_contenders(problem, train, row)
        else:
            contenders = {name: (module, problem, contextlib.nullcontext) for name, module in problem.modules.items()}
            if not train and shape.loop in ("t1", "call"):
                runners, row["notes"] = peer_runners(problem, threads)
                contenders.update({name: (r, problem, contextlib.nullcontext) for name, r in runners.items()})
            expected = run(contenders["native"][0], problem, train)
        failure = check(contenders, expected, train, row)
        if failure:
            return {**row, "status": "FAILED", "error": failure}
        # Calls per sample from the fastest of three single calls: one cold call (its caches and threads
        # taken over by the contender before it) had sized a call row's samples at a tenth of MIN_SAMPLE_S.
        calls = {n: max(1, math.ceil(MIN_SAMPLE_S / min(time_sample(c[0], c[1], train, 1, c[2]) for _ in range(3))))
                 for n, c in contenders.items()}
        samples = {n: [] for n in contenders}
        order = random.Random(0)
        for _ in range(repeats):
            for name in order.sample(list(contenders), len(contenders)):
                module, sample_problem, context = contenders[name]
                samples[name].append(time_sample(module, sample_problem, train, calls[name], context))
    ext = samples["lstm_ext"]
    row["ms_per_step"] = {n: 1e3 * statistics.median(s) / (shape.T or steps) for n, s in samples.items()}
    row["ratios"] = {n: statistics.median(a / b for a, b in zip(s, ext)) for n, s in samples.items() if n != "lstm_ext"}
    return row


def geomean(values: list) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def report(rows: list) -> str:
    """A Markdown table and the geomeans; bfloat16/float16 rows add `native ran` and `err <contender>` (max
    relative error against native float32 on the same values)."""
    contenders = [n for n in CONTENDERS if any(n in r["ms_per_step"] for r in rows)]
    ratio_names = [n for n in contenders if n != "lstm_ext"]
    engines = any(r.get("native_engine") for r in rows)
    errors = [n for n in CONTENDERS if any(n in r.get("max_rel_error", {}) for r in rows)]
    headers = ["loop", "dims", "mode"] + (["dtype", "native ran"] if engines else [])
    headers += [f"{n} ms/step" for n in contenders] + [f"{n}/ext" for n in ratio_names]
    headers += [f"err {n}" for n in errors] + ["status"]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for r in rows:
        cells = [r["loop"], r["dims"], r["mode"]] + ([r["dtype"], r.get("native_engine") or "-"] if engines else [])
        cells += [f"{r['ms_per_step'][n]:.4g}" if n in r["ms_per_step"] else "-" for n in contenders]
        cells += [f"{r['ratios'][n]:.2f}" if n in r["ratios"] else "-" for n in ratio_names]
        cells += [f"{r['max_rel_error'][n]:.1e}" if n in r.get("max_rel_error", {}) else "-" for n in errors]
        lines.append("| " + " | ".join(cells + [r["status"]]) + " |")
    lines.append("")
    for loop, mode in product(sorted({r["loop"] for r in rows}), MODES):
        ok = [r for r in rows if r["loop"] == loop and r["mode"] == mode and r["status"] == "ok"]
        if ok:
            for name in ("native", "lstm_ext_f32", *PEERS):
                ratios = [r["ratios"][name] for r in ok if name in r["ratios"]]
                if ratios:
                    lines.append(f"geomean {name}/ext {loop} {mode}: {geomean(ratios):.2f} over {len(ratios)} rows"
                                 f" (min {min(ratios):.2f})")
    ok = [r["ratios"]["native"] for r in rows if r["status"] == "ok"]
    lines.append(f"geomean native/ext, all rows: {geomean(ok):.2f} (min {min(ok, default=math.nan):.2f})")
    lines += sorted({f"note: {note}" for r in rows for note in r["notes"]})
    lines += [f"FAILED {r['dims']} {r['mode']}: {r['error']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines)


def csv_ints(text: str) -> list:
    return [positive_int(v) for v in text.split(",")]


def call_shapes(text: str) -> list:
    return [tuple(positive_int(v) for v in shape.split("x")) for shape in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", default=",".join(LOOPS), help="any of cell, t1, call (default: %(default)s)")
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--batches", type=csv_ints, default=[1, 8, 32, 64], metavar="B[,B]")
    parser.add_argument("--hidden", type=csv_ints, default=[64, 256, 512, 1024], metavar="H[,H]")
    parser.add_argument("--calls", type=call_shapes, default=CALL_SHAPES, metavar="TxBxH[,TxBxH]",
                        help="the call loop's shapes (default: 1x1x256,20x4x64,50x16x128)")
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default="float32")
    parser.add_argument("--steps", type=positive_int, default=32, help="steps fed back per loop")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = MODES if args.mode == "all" else (args.mode,)
    print(f"torch {torch.__version__} | threads {args.threads} | steps {args.steps} | repeats {args.repeats}"
          + (f" | {args.dtype}" if args.dtype in REDUCED else ""))
    rows = []
    shapes = []
    for loop in args.loops.split(","):
        if loop == "call":
            shapes += [StepShape(loop, B, H, args.dtype, T) for T, B, H in args.calls]
        else:
            shapes += [StepShape(loop, B, H, args.dtype) for H, B in product(args.hidden, args.batches)]
    for mode, shape in product(modes, shapes):
        rows.append(measure_row(shape, mode, args.steps, args.repeats, args.threads))
        r = rows[-1]
        print(f"{r['dims']} {mode}: " + ", ".join(f"{n}/ext {v:.2f}" for n, v in r["ratios"].items())
              + (f" (native ran: {r['native_engine']})" if r["native_engine"] else "")
              + ("" if r["status"] == "ok" else f" {r['status']} {r['error']}"), flush=True)
    print(report(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
