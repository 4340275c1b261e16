"""Benchmark dynamically quantized LSTM inference: lstm_ext int8 / float16 weights against torch and ONNX Runtime.

Contenders, run in one process on the same seeded float nn.LSTM and inputs (issue 26):

  lstm_ext_int8     lstm_ext.quantize_dynamic(model, torch.qint8)
  lstm_ext_fp16     lstm_ext.quantize_dynamic(model, torch.float16)
  torch_int8        torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
  torch_fp16        torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.float16)
  onnxruntime_int8  model exported to ONNX (TorchScript exporter), quantized by
                    onnxruntime.quantization.quantize_dynamic (weight_type QInt8, which turns the
                    LSTM node into DynamicQuantizeLSTM), run by an InferenceSession with
                    intra_op_num_threads = --threads and session.intra_op.allow_spinning = 0;
                    left out, with a note, where onnxruntime is not installed
  lstm_ext_f32      lstm_ext.LSTM with the float weights

(torch's quantize_dynamic swaps children only, so the nn.LSTM is quantized inside an nn.Sequential.)
Each row is one shape, inference: y, (h_n, c_n) = module(x, (h0, c0)) under torch.inference_mode,
x time-major [T, B, I]; the shapes are whole sequences and decoding steps (T=1).

Errors: each contender's max relative error, max|x - ref| / max|ref| over y, h_n and c_n, against
nn.LSTM float32 on the same weights and inputs. A row FAILED (not timed, exit status 1) when
lstm_ext_int8's error exceeds 0.1, lstm_ext_fp16's 1e-2 or lstm_ext_f32's 1e-4, or an lstm_ext
contender raises; the other contenders' errors are reported, and one that raises is left out of
its row with a note.

Timing as in bench.py (its helpers): every contender at the same thread count; after warm-up, each
repeat times every contender once, round-robin in a seeded random order; a sample averages enough
calls to last >= 5 ms; the time is the median sample; each ratio is the median over repeats of the
ratio within one repeat. Ratios: each contender's time / lstm_ext_int8's (> 1: lstm_ext int8
faster), and lstm_ext_f32 / lstm_ext_fp16, torch_fp16 / lstm_ext_fp16. Per ratio the geometric mean
over the rows, and one over torch_int8 and onnxruntime_int8 together. Written to --out as
quantized.json and quantized.md (headed by the command, commit, CPU and date).

    python benchmarks/bench_quantized.py                      # issue 26's six shapes
    python benchmarks/bench_quantized.py --tiny               # a smoke run
    python benchmarks/bench_quantized.py --shapes large,step_1024 --repeats 11 --threads 1
"""

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bench import (ISSUE_SHAPES, cpu_flags, command_line, environment, gc_disabled, interleaved_samples,
                   load_ext_lstm, median_ratio, positive_int, run_once)
from bench_cases import Call, Contender, Shape, compare, make_problem
from bench_report import header_lines, write_json
from bench_step import export_lstm, onnxruntime_runner

REFERENCE = "lstm_ext_int8"  # the denominator of the ratios
CONTENDERS = ("lstm_ext_int8", "lstm_ext_fp16", "torch_int8", "torch_fp16", "onnxruntime_int8", "lstm_ext_f32")
SHORT = {"lstm_ext_int8": "ext int8", "lstm_ext_fp16": "ext fp16", "torch_int8": "torch int8",
         "torch_fp16": "torch fp16", "onnxruntime_int8": "ORT int8", "lstm_ext_f32": "ext f32"}
# (numerator, denominator) of every ratio, in the table's order.
RATIOS = tuple((name, REFERENCE) for name in CONTENDERS if name != REFERENCE) + (
    ("lstm_ext_f32", "lstm_ext_fp16"), ("torch_fp16", "lstm_ext_fp16"))
# Errors against nn.LSTM float32 above which an lstm_ext contender fails its row (the others are reported only).
TOLERANCE = {"lstm_ext_int8": 0.1, "lstm_ext_fp16": 1e-2, "lstm_ext_f32": 1e-4}
# One geomean over both int8 peers: the issue's goal (>= 1.5).
PEERS_INT8 = ("torch_int8", "onnxruntime_int8")
CPU_FLAGS = ("avx2", "f16c", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8")

GRIDS = {
    "tiny": (
        Shape("tiny", 5, 3, 8, 8),
        Shape("tiny_step", 1, 2, 16, 16),
        Shape("tiny_bidir2", 4, 2, 8, 6, layers=2, bidirectional=True),
    ),
    "issue": ISSUE_SHAPES,
}
ALL_SHAPES = {s.name: s for grid in GRIDS.values() for s in grid}
DEFAULT_REPEATS = {"tiny": 3, "issue": 7}


def ratio_key(numerator: str, denominator: str) -> str:
    return f"{numerator}/{denominator}"


def float_model(problem) -> nn.LSTM:
    """The float32 nn.LSTM holding the problem's seeded weights."""
    s = problem.shape
    model = nn.LSTM(s.I, s.H, s.layers, bidirectional=s.bidirectional)
    model.load_state_dict(dict(zip(problem.weight_names, problem.weights)))
    return model.eval()


def torch_quantized(model: nn.LSTM, dtype: torch.dtype) -> nn.Module:
    """torch's dynamic quantization of `model` (inside a container: torch swaps children, not the root)."""
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(model), {nn.LSTM}, dtype=dtype)[0]
    if type(quantized) is nn.LSTM:
        raise RuntimeError("torch.ao.quantization.quantize_dynamic left nn.LSTM in float32")
    return quantized


def onnxruntime_int8(model: nn.LSTM, problem, threads: int, notes: list):
    """ONNX Runtime on the float model's ONNX export quantized by its quantize_dynamic (QInt8 weights)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as directory:
        path = export_lstm(model, problem.x, problem.h0, f"{directory}/lstm.onnx")
        quantized = f"{directory}/lstm_int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
        try:
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        ops = sorted({node.op_type for node in onnx.load(quantized).graph.node})
        if "DynamicQuantizeLSTM" not in ops:
            notes.append(f"onnxruntime_int8: no DynamicQuantizeLSTM in the quantized graph (ops {', '.join(ops)})")
        return onnxruntime_runner(quantized, threads)


def make_builders(threads: int) -> dict:
    """name -> build(float model, problem, notes): a callable like nn.LSTM.forward(x, (h0, c0))."""
    import lstm_ext

    def ext_f32(model, problem, notes):
        s = problem.shape
        module = lstm_ext.LSTM(s.I, s.H, s.layers, bidirectional=s.bidirectional)
        module.load_state_dict(model.state_dict())
        return module.eval()

    return {
        "lstm_ext_int8": lambda model, problem, notes: lstm_ext.quantize_dynamic(model, torch.qint8),
        "lstm_ext_fp16": lambda model, problem, notes: lstm_ext.quantize_dynamic(model, torch.float16),
        "torch_int8": lambda model, problem, notes: torch_quantized(model, torch.qint8),
        "torch_fp16": lambda model, problem, notes: torch_quantized(model, torch.float16),
        "onnxruntime_int8": lambda model, problem, notes: onnxruntime_int8(model, problem, threads, notes),
        "lstm_ext_f32": ext_f32,
    }


class ModuleContender(Contender):
    """A module (or runner) called like nn.LSTM: y, (h_n, c_n) = module(x, (h0, c0)); inference only."""

    def __init__(self, name: str, module):
        self.name = name
        self.module = module

    def make_call(self, problem, train: bool) -> Call:
        module, x, hx = self.module, problem.x, (problem.h0, problem.c0)

        def forward():
            y, (h, c) = module(x, hx)
            return y, h, c

        return Call(forward, [])


def contenders_of_row(problem, builders: dict, row: dict) -> list:
    """Build every contender for the problem; a peer that cannot be built is left out with a note, an
    lstm_ext one fails the row (row["error"])."""
    model = float_model(problem)
    contenders = []
    for name, build in builders.items():
        try:
            contenders.append(ModuleContender(name, build(model, problem, row["notes"])))
        except ImportError as exc:
            row["notes"].append(f"{name}: not importable ({exc}; pip install -e '.[onnx]'): no {name} column")
        except Exception as exc:
            if name.startswith("lstm_ext"):
                row["error"] = f"{name} raised {type(exc).__name__} when built: {exc}"
                return []
            row["notes"].append(f"{name} raised {type(exc).__name__} when built: {exc}: left out")
    return contenders


def check_row(problem, contenders: list, row: dict) -> list:
    """Each contender's error against nn.LSTM float32 into row["max_rel_error"]; returns the contenders
    to time. An lstm_ext contender above TOLERANCE or raising sets row["error"]."""
    names = ["output", "h_n", "c_n"]
    expected = run_once(ModuleContender("nn.LSTM float32", float_model(problem)), problem, False)
    kept, failures = [], []
    for contender in contenders:
        try:
            actual = run_once(contender, problem, False)
        except Exception as exc:
            if contender.name.startswith("lstm_ext"):
                failures.append(f"{contender.name} raised {type(exc).__name__}: {exc}")
            else:
                row["notes"].append(f"{contender.name} raised {type(exc).__name__}: {exc}: left out")
            continue
        err, worst = compare(names, actual, expected)
        row["max_rel_error"][contender.name] = err
        tol = TOLERANCE.get(contender.name)
        if tol is not None and not err <= tol:
            failures.append(f"{contender.name} {worst} rel err {err:.2e} > {tol:.0e}")
        kept.append(contender)
    if failures:
        row["error"] = "; ".join(failures)
    return kept


def measure_row(shape: Shape, builders: dict, repeats: int) -> dict:
    problem = make_problem(shape)
    row = {"name": shape.name, "dims": shape.describe(), "T": shape.T, "B": shape.B, "I": shape.I, "H": shape.H,
           "layers": shape.layers, "bidirectional": shape.bidirectional, "mode": "inference", "status": "ok",
           "error": None, "notes": [], "max_rel_error": {}, "time_ms": {}, "calls_per_sample": {}, "ratios": {}}
    with gc_disabled():
        contenders = contenders_of_row(problem, builders, row)
        if not row["error"]:
            contenders = check_row(problem, contenders, row)
        if row["error"]:
            return {**row, "status": "FAILED"}
        row["calls_per_sample"], samples = interleaved_samples(contenders, problem, False, repeats)
    row["time_ms"] = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    row["ratios"] = {ratio_key(a, b): median_ratio(samples, a, b) for a, b in RATIOS if a in samples and b in samples}
    return row


def geomean(values: list) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(rows: list) -> dict:
    """Geometric mean of each ratio over the rows that passed, and of both int8 peers' ratios together."""
    ok = [r for r in rows if r["status"] == "ok"]
    means = {}
    for a, b in RATIOS:
        key = ratio_key(a, b)
        means[key] = geomean([r["ratios"][key] for r in ok if key in r["ratios"]])
    peers = [ratio_key(p, REFERENCE) for p in PEERS_INT8]
    both = [r["ratios"][key] for r in ok for key in peers if key in r["ratios"]]
    return {"rows": len(ok), "geomean_ratio": means,
            "geomean_int8_peers": {"over": peers, "value": geomean(both), "ratios": len(both)}}


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list) -> list:
    """The Markdown table's lines."""
    headers = (["shape", "dims"] + [f"{SHORT[n]} ms" for n in CONTENDERS]
               + [f"{SHORT[a]}/{SHORT[b]}" for a, b in RATIOS] + [f"err {SHORT[n]}" for n in CONTENDERS] + ["status"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        cells = [r["name"], r["dims"]]
        cells += [_number(r["time_ms"].get(n), ".4g") for n in CONTENDERS]
        cells += [_number(r["ratios"].get(ratio_key(a, b)), ".2f") for a, b in RATIOS]
        cells += [_number(r["max_rel_error"].get(n), ".1e") for n in CONTENDERS]
        lines.append("| " + " | ".join(cells + [r["status"]]) + " |")
    return lines


def summary_lines(result: dict) -> list:
    means = result["geomean_ratio"]
    lines = [f"geomean {SHORT[a]}/{SHORT[b]} ({result['rows']} rows): {_number(means[ratio_key(a, b)], '.2f')}"
             for a, b in RATIOS]
    both = result["geomean_int8_peers"]
    lines.append(f"geomean torch int8 and ORT int8 / ext int8 together ({both['ratios']} ratios):"
                 f" {_number(both['value'], '.2f')}")
    return lines


def markdown(payload: dict) -> str:
    env, rows = payload["environment"], payload["rows"]
    lines = ["# lstm_ext quantized LSTM benchmark", ""]
    lines += [f"{line}  " for line in header_lines(env)]
    lines += [
        f"CPU flags: {', '.join(env['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; torch quantized engine"
        f" {env['quantized_engine']}; onnxruntime {env['onnxruntime']}",
        "",
        "Inference, y, (h_n, c_n) = module(x, (h0, c0)). Ratios: time of the first / time of the second"
        " (`x/ext int8` > 1: lstm_ext int8 faster; `ext f32/ext fp16` > 1: float16 weights faster)."
        " `err`: max|x - ref| / max|ref| over y, h_n, c_n against nn.LSTM float32 on the same weights and"
        " inputs.",
        "",
        *table(rows),
        "",
        *(f"- {line}" for line in summary_lines(payload["summary"])),
    ]
    lines += [f"- note {r['name']}: {note}" for r in rows for note in r["notes"]]
    lines += [f"- FAILED {r['name']}: {r['error']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", dest="grid", action="store_const", const="tiny", default="issue",
                        help="tiny shapes (a smoke run); default: issue 26's six shapes")
    parser.add_argument("--shapes", metavar="NAME[,NAME]", help="shapes by name: " + ", ".join(ALL_SHAPES))
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), metavar="N",
                        help="threads of torch and ONNX Runtime (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, metavar="N",
                        help="timed samples per contender (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items()) + ")")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", metavar="DIR",
                        help="output directory (default: benchmarks/results)")
    args = parser.parse_args(argv)
    args.command = command_line(__file__, sys.argv[1:] if argv is None else argv)
    if args.shapes:
        unknown = [n for n in args.shapes.split(",") if n not in ALL_SHAPES]
        if unknown:
            parser.error(f"unknown shapes {unknown}; known: {', '.join(ALL_SHAPES)}")
        args.shape_list = [ALL_SHAPES[n] for n in args.shapes.split(",")]
    else:
        args.shape_list = list(GRIDS[args.grid])
    args.repeats = args.repeats or DEFAULT_REPEATS[args.grid]
    return args


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    _, ext_info = load_ext_lstm()
    env = environment(args.threads, ext_info, args.command)
    flags = cpu_flags()
    env["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    env["quantized_engine"] = torch.backends.quantized.engine
    try:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = "not installed"
    print(f"torch {env['torch']} | {env['cpu']} | threads {args.threads} | load avg"
          f" {env['load_average_1min_at_start']:.2f} | lstm_ext: {ext_info} | onnxruntime {env['onnxruntime']}")
    builders = make_builders(args.threads)
    rows = []
    for shape in args.shape_list:
        rows.append(measure_row(shape, builders, args.repeats))
        r = rows[-1]
        print(f"{r['name']} {r['dims']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
              + ("" if r["status"] == "ok" else f" FAILED {r['error']}"), flush=True)
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "shape_list"}
    return {"environment": env, "config": config, "rows": rows, "summary": summary(rows),
            "runtime_s": time.perf_counter() - started}


def main(argv=None) -> int:
    """Run the benchmark and write quantized.json and quantized.md; returns 1 if any row FAILED, else 0."""
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message="torch.ao.quantization")
            warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # torch's own int8 LSTM
            payload = run(args)
    finally:
        torch.set_num_threads(previous_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / "quantized.json", args.out / "quantized.md"]
    write_json(paths[0], payload)
    paths[1].write_text(markdown(payload))
    print("\n".join(table(payload["rows"]) + [""] + summary_lines(payload["summary"])))
    for row in payload["rows"]:
        for note in row["notes"]:
            print(f"note {row['name']}: {note}")
        if row["status"] != "ok":
            print(f"FAILED {row['name']}: {row['error']}")
    print(f"runtime {payload['runtime_s']:.1f} s; wrote " + ", ".join(map(str, paths)))
    return 0 if all(r["status"] == "ok" for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
