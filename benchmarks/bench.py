"""Benchmark lstm_ext.lstm against the native torch._VF.lstm on CPU.

Contenders, run in one process on the same seeded inputs and weights:

  lstm_ext        lstm_ext.lstm, same arguments as torch._VF.lstm
  native_default  torch._VF.lstm as it runs by default: oneDNN for CPU float32
                  padded input (float64 and packed input use ATen's loop anyway)
  aten_loop       torch._VF.lstm under torch.backends.mkldnn.flags(enabled=False),
                  i.e. the layer loop in ATen's RNN.cpp
  cell_loop       the hand-written Python loop over nn.LSTMCell (small padded
                  shapes only)

Each row is one shape in one mode. "inference" is a forward pass under
torch.inference_mode; "training" is forward + backward of a fixed
random-weighted sum of output, h_n and c_n, taking gradients of the input and
all weights. Packed rows use the packed overload (seeded lengths uniform in
[T/4, T], the longest pinned to T) and are followed by a `<name>_padded` row of
the same max length.

Correctness comes first: each contender's outputs (and gradients) must match
native_default to max|diff| / max|native| <= 1e-4 (float32) or 1e-9 (float64).
A row that does not is marked FAILED, is not timed, and makes the exit status 1.

bfloat16 and float16 rows (--dtype bfloat16 / float16, the --reduced grid) time,
on seeded values rounded to that dtype:

  lstm_ext        lstm_ext.lstm in that dtype (the reference of the ratios)
  native_default  torch._VF.lstm in that dtype: oneDNN where it runs, else ATen's
                  loop; where oneDNN raises ("could not create a primitive
                  descriptor", CPUs without AVX-512 BF16/FP16), ATen's loop with
                  oneDNN switched off. The row's `native ran` says which ran
                  (detected by profiling one call), and a note says when oneDNN refused.
  aten_loop       only where native_default ran oneDNN (else it is the same loop)
  cell_loop       as above, in that dtype
  lstm_ext_f32    lstm_ext in float32 on the same values widened (weights, input,
                  state): its ratio lstm_ext_f32 / lstm_ext is what the narrow type
                  gains (> 1) or loses (< 1)

and give each contender's max relative error against native float32 on the same
(rounded) values. lstm_ext must be within 5e-2 (bfloat16) or 1e-2 (float16) of
it and lstm_ext_f32 within 1e-4, or the row FAILED; the other contenders' errors
are reported (a note when above that bound), not checked.

Timing: every contender runs at the same thread count (printed and recorded).
After warm-up, each repeat times every contender once, round-robin in a
seeded random order (so no contender always follows the same one). A sample
averages enough calls to last >= 5 ms; the reported time is the median sample.
gc is disabled while timing, and training calls get freshly cloned input and
weights each call (gradients come from torch.autograd.grad, so nothing
accumulates).

Reported per row: median ms per contender; ratios contender / lstm_ext (> 1:
lstm_ext faster), each the median over repeats of the ratio within one repeat,
so that a slow spell of the machine (another VM on the same cores) slows both
sides of a ratio instead of whichever contender it fell on; lstm_ext GFLOP/s
counting GEMM flops only, 2*4H*(in+H) per token, layer and direction, training
as 3x forward; and that as a share of this machine's peak: the FMA throughput of
the threads' cores at the clock measured in the run (FMA lanes x 2 FMA units x 2
flops per cycle), or the best torch.mm over a few shapes if that is higher (both
measured before and after the rows, same process and threads). A share above 100%
is printed as a warning: the clock or the CPU flags undercounted the machine.
Per mode (and per mode and dtype for bfloat16/float16 rows): the geometric mean
of each ratio. Written to --out as results.json, results.md (headed by the
command, commit, CPU and date) and ratios.png.

    python benchmarks/bench.py                 # quick grid, < 3 min on 2 cores
    python benchmarks/bench.py --full --mode training --dtype float32
    python benchmarks/bench.py --shapes large,speech --repeats 5
    python benchmarks/bench.py --reduced       # bfloat16 and float16 rows, issue 25's shapes
    python benchmarks/bench.py --reduced --dtype bfloat16 --mode inference
"""

import argparse
import ctypes
import gc
import math
import mmap
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime
from itertools import product
from pathlib import Path

import torch
from tqdm import tqdm

from torch import _VF

from bench_cases import (ONEDNN_REFUSAL, REDUCED, TOLERANCE, FunctionalLSTM, Shape, Widened, compare,
                         forward_flops, make_contenders, make_problem, native_engine, result_names, step)
from bench_report import geomeans, markdown, peak_text, plot_ratios, terminal_table, write_json

MIN_SAMPLE_S = 5e-3  # one timed sample averages enough calls to last this long
MAX_CALLS_PER_SAMPLE = 100
REFERENCE = "native_default"
TRAINING_FLOP_FACTOR = 3  # backward ~ 2x forward


def with_padded_twins(shapes: tuple) -> tuple:
    """Follow each packed shape with a padded shape of the same max length."""
    out = []
    for s in shapes:
        out.append(s)
        if s.packed:
            out.append(replace(s, name=f"{s.name}_padded", packed=False))
    return tuple(out)


SMALL = Shape("small", 50, 16, 128, 128, cell_loop=True)
LATENCY = Shape("latency", 20, 4, 64, 64, cell_loop=True)
BATCH1 = Shape("batch1", 200, 1, 256, 256, cell_loop=True)
PACKED_SMALL = Shape("packed_small", 50, 16, 64, 64, packed=True, cell_loop=True)
LARGE = Shape("large", 100, 64, 512, 512)
WIDE = Shape("wide", 35, 32, 256, 1024)
STEP_1024 = Shape("step_1024", 1, 1, 1024, 1024)  # a decoding step, bound by reading the weights
STEP_B8 = Shape("step_b8", 1, 8, 256, 256)
# The shapes of issues 25 (bfloat16/float16) and 26 (quantization): whole sequences and decoding steps.
ISSUE_SHAPES = (LARGE, WIDE, SMALL, BATCH1, STEP_1024, STEP_B8)


SUFFIX = {"bfloat16": "bf16", "float16": "f16"}


def reduced(shape: Shape, dtype: str) -> Shape:
    """`shape` in bfloat16 or float16, named <name>_bf16 / <name>_f16."""
    return replace(shape, name=f"{shape.name}_{SUFFIX[dtype]}", dtype=dtype)


# What autocast runs: bfloat16/float16 rows against native in the same dtype and lstm_ext float32.
REDUCED_PRECISION = tuple(reduced(shape, dtype) for dtype in REDUCED for shape in (*ISSUE_SHAPES, LATENCY))

GRIDS = {
    "tiny": with_padded_twins((
        Shape("tiny", 5, 3, 8, 8, cell_loop=True),
        Shape("tiny_bidir2", 5, 3, 8, 6, layers=2, bidirectional=True, cell_loop=True),
        Shape("tiny_f64", 5, 3, 8, 8, dtype="float64", cell_loop=True),
        Shape("tiny_packed", 6, 4, 8, 8, bidirectional=True, packed=True, cell_loop=True),
        Shape("tiny_bf16", 5, 3, 8, 8, dtype="bfloat16", cell_loop=True),
        Shape("tiny_f16", 1, 2, 8, 8, dtype="float16"),
    )),
    "quick": with_padded_twins((
        LATENCY,
        SMALL,
        BATCH1,
        Shape("quick_gemm", 50, 32, 256, 256),
        Shape("quick_bidir2", 50, 16, 128, 128, layers=2, bidirectional=True, cell_loop=True),
        replace(SMALL, name="small_f64", dtype="float64"),
        PACKED_SMALL,
        Shape("quick_packed_bidir", 50, 32, 128, 128, bidirectional=True, packed=True),
        reduced(LATENCY, "bfloat16"),  # the issue's heavier shapes are in --reduced and --full
        reduced(STEP_B8, "bfloat16"),
    )),
    "full": with_padded_twins((
        LARGE,
        Shape("bidir", 100, 64, 512, 256, bidirectional=True),
        SMALL,
        LATENCY,
        BATCH1,
        WIDE,
        STEP_1024,
        STEP_B8,
        Shape("speech", 512, 32, 80, 256, layers=3, bidirectional=True),
        replace(SMALL, name="small_f64", dtype="float64"),
        replace(LATENCY, name="latency_f64", dtype="float64"),
        replace(BATCH1, name="batch1_f64", dtype="float64"),
        *REDUCED_PRECISION,
        Shape("packed", 100, 64, 256, 256, packed=True),
        Shape("packed_bidir", 100, 64, 256, 256, bidirectional=True, packed=True),
        PACKED_SMALL,
        Shape("packed_long_bidir", 200, 8, 128, 128, bidirectional=True, packed=True),
    )),
    "reduced": REDUCED_PRECISION,
}
ALL_SHAPES = {s.name: s for grid in GRIDS.values() for s in grid}
DEFAULT_REPEATS = {"tiny": 3, "quick": 11, "full": 7, "reduced": 7}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = parser.add_mutually_exclusive_group()
    for name in GRIDS:
        grid.add_argument(f"--{name}", dest="grid", action="store_const", const=name,
                          help=f"{name} shape grid" + (" (default)" if name == "quick" else ""))
    parser.set_defaults(grid="quick")
    parser.add_argument("--mode", choices=("inference", "training", "all"), default="all")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16", "all"), default="all")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), metavar="N",
                        help="torch threads for every contender (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        metavar="DIR", help="output directory (default: benchmarks/results)")
    parser.add_argument("--shapes", metavar="NAME[,NAME]",
                        help="shapes from any grid: " + ", ".join(ALL_SHAPES))
    default_repeats = ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items())
    parser.add_argument("--repeats", type=positive_int, metavar="N",
                        help=f"timed samples per contender (default: {default_repeats})")
    args = parser.parse_args(argv)
    args.command = command_line(__file__, sys.argv[1:] if argv is None else argv)
    args.shape_list = select_shapes(parser, args)
    args.repeats = args.repeats or DEFAULT_REPEATS[args.grid]
    return args


def select_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    if args.shapes:
        names = args.shapes.split(",")
        unknown = [n for n in names if n not in ALL_SHAPES]
        if unknown:
            parser.error(f"unknown shapes {unknown}; known: {', '.join(ALL_SHAPES)}")
        shapes = [ALL_SHAPES[n] for n in names]
    else:
        shapes = list(GRIDS[args.grid])
    shapes = [s for s in shapes if args.dtype in ("all", s.dtype)]
    if not shapes:
        parser.error("no shapes left to run")
    return shapes


REPO = Path(__file__).resolve().parents[1]


def command_line(script: str, argv: list) -> str:
    """How this run was started, as a shell command from the repository root."""
    try:
        script = os.path.relpath(script, REPO)
    except ValueError:
        pass
    return shlex.join(["python", script, *map(str, argv)])


def git_commit() -> str:
    """HEAD's hash, and which tracked files differ from it (the extension may be built from those)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
        dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if dirty:
        more = f" and {len(dirty) - 6} more" if len(dirty) > 6 else ""
        commit += f" + uncommitted changes in {', '.join(dirty[:6])}{more}"
    return commit


def load_ext_lstm() -> tuple:
    """lstm_ext.lstm and where it came from, or a stand-in that raises why it is missing."""
    try:
        import lstm_ext
    except ImportError as exc:
        reason = f"lstm_ext is not importable: {exc}"

        def unavailable(*args):
            raise RuntimeError(reason)

        return unavailable, reason
    return lstm_ext.lstm, lstm_ext.__file__


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int, ext_info: str, command: str | None = None) -> dict:
    return {
        "command": command or command_line(sys.argv[0], sys.argv[1:]),
        "commit": git_commit(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "lstm_ext": ext_info,
        "load_average_1min_at_start": os.getloadavg()[0],
    }


# x86-64 SysV: rax = rdi; loop { 100 x `add rax, 1`; dec rdi; jnz loop }; ret.
# The adds form one dependency chain of latency 1 cycle each on every x86-64 core
# (a core that folds them only runs faster, so the clock is never underestimated).
_CHAIN_ADDS = 100
_CLOCK_CODE = (b"\x48\x89\xf8" + b"\x48\x83\xc0\x01" * _CHAIN_ADDS + b"\x48\xff\xcf"
               + b"\x0f\x85" + (-(4 * _CHAIN_ADDS + 3 + 6)).to_bytes(4, "little", signed=True) + b"\xc3")


def measured_clock_ghz(iterations: int = 50_000, repeats: int = 100) -> tuple:
    """(GHz, how): the core clock, timed on a chain of dependent adds, else the nominal one.

    Many short samples (~2 ms), the fastest kept: a sample another VM's time slice fell on
    only reads slower.
    """
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            code = mmap.mmap(-1, len(_CLOCK_CODE), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            code.write(_CLOCK_CODE)
            chain = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(
                ctypes.addressof(ctypes.c_char.from_buffer(code)))
            chain(1000)
            best = math.inf
            for _ in range(repeats):  # other load only lowers the rate: keep the best
                start = time.perf_counter()
                chain(iterations)
                best = min(best, time.perf_counter() - start)
            return iterations * _CHAIN_ADDS / best / 1e9, "measured on a chain of dependent adds"
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    mhz = []
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            mhz.append(int(f.read()) / 1e3)
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz += [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        pass
    return (max(mhz) / 1e3, "nominal, not measured") if mhz else (math.nan, "unknown")


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def flops_per_cycle(dtype: str, flags: set) -> float:
    """Flops one core can retire per cycle in `dtype`: FMA lanes x 2 FMA units x 2 flops.

    An upper bound: two full-width FMA units are assumed even where a core has one, or
    splits 512-bit work over two 256-bit halves. bfloat16/float16 count the pairwise
    dot-product instructions (two products per float32 lane) or AMX tiles where the CPU has them.
    """
    width_bits = 512 if "avx512f" in flags else 256 if {"avx", "avx2", "fma"} & flags else 128
    lanes = width_bits // {"float64": 64}.get(dtype, 32)
    per_cycle = lanes * 2 * 2
    if dtype == "bfloat16":
        if "amx_bf16" in flags:
            return max(per_cycle, 2 * 1024)  # one 16x32 by 32x16 tile product a cycle
        if {"avx512_bf16", "avx_vnni"} & flags:  # vdpbf16ps: two products per float32 lane
            return 2 * per_cycle
    if dtype == "float16":
        if "amx_fp16" in flags:
            return max(per_cycle, 2 * 1024)
        if "avx512_fp16" in flags:
            return 2 * per_cycle
    return per_cycle


GEMM_SHAPES = ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (4096, 256, 1024))  # m, k, n
GEMM_BUDGET_S = 2.0


def gemm_best_gflops(dtype: str, repeats: int = 5) -> float:
    """Best torch.mm throughput over GEMM_SHAPES and repeats, at the current thread count.

    A shape whose calls would take the dtype past GEMM_BUDGET_S at the best rate so far is
    skipped: without bfloat16/float16 instructions torch.mm runs those at ~1 GFLOP/s (1.5 s
    a 1024^3 product), where the FMA estimate is the peak anyway.
    """
    best_rate, started = 0.0, time.perf_counter()
    for m, k, n in GEMM_SHAPES:
        expected_s = (repeats + 1) * 2 * m * k * n / (best_rate * 1e9) if best_rate else 0.0
        if time.perf_counter() - started + expected_s > GEMM_BUDGET_S:
            continue
        a = torch.randn(m, k, dtype=getattr(torch, dtype))
        b = torch.randn(k, n, dtype=getattr(torch, dtype))
        out = torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best_rate = max(best_rate, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best_rate


def machine_peaks(dtypes: list, threads: int, gemm: dict, clock: tuple) -> dict:
    """Per dtype, the peak that % peak divides by: the FMA throughput of `threads` cores at
    the measured clock, or the best GEMM measured if that is higher (then the clock or the
    flags undercounted the machine); with how it was derived."""
    ghz, how = clock
    flags = cpu_flags()
    peaks = {}
    for d in dtypes:
        fma = threads * ghz * flops_per_cycle(d, flags)
        source = "FMA" if fma >= gemm[d] else "best GEMM"
        peaks[d] = {"gflops": fma if source == "FMA" else gemm[d], "source": source,
                    "fma_gflops": fma, "flops_per_cycle": flops_per_cycle(d, flags),
                    "best_gemm_gflops": gemm[d]}
    return {"clock_ghz": ghz, "clock": how, "threads": threads, "dtypes": peaks}


@contextmanager
def gc_disabled():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run_once(contender, problem, train: bool) -> list:
    call = contender.make_call(problem, train)
    with contender.context(), torch.inference_mode(not train):
        return step(call, train, problem.loss_weights)


def time_sample(contender, problem, train: bool, n_calls: int) -> float:
    """Seconds per call, averaged over n_calls calls with fresh arguments."""
    calls = [contender.make_call(problem, train) for _ in range(n_calls)]
    with contender.context(), torch.inference_mode(not train):
        start = time.perf_counter()
        for call in calls:
            step(call, train, problem.loss_weights)
        return (time.perf_counter() - start) / n_calls


def calls_per_sample(contender, problem, train: bool) -> int:
    """Warm up once more and size a sample so that it lasts >= MIN_SAMPLE_S."""
    seconds = time_sample(contender, problem, train, 1)
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / seconds)))


CHECKED_REDUCED = ("lstm_ext", "lstm_ext_f32")  # on reduced rows, the contenders an error fails


def error_reference(shape: Shape) -> str:
    return "native float32 on the same values" if shape.dtype in REDUCED else REFERENCE


def interleaved_samples(contenders: list, problem, train: bool, repeats: int) -> tuple:
    """({name: calls per sample}, {name: [seconds per call, one per repeat]}): after a warm-up sizing each
    sample, every repeat times every contender once, round-robin in a seeded random order."""
    n_calls = {c.name: calls_per_sample(c, problem, train) for c in contenders}
    samples = {c.name: [] for c in contenders}
    order = random.Random(0)
    for _ in range(repeats):
        for c in order.sample(contenders, len(contenders)):
            samples[c.name].append(time_sample(c, problem, train, n_calls[c.name]))
    return n_calls, samples


def median_ratio(samples: dict, numerator: str, denominator: str) -> float:
    """The median over repeats of numerator's time / denominator's time within one repeat: a slow spell
    of the machine slows both sides of a ratio instead of whichever contender it fell on."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def check_row(problem, train: bool, contenders: list) -> tuple:
    """Compare every contender with native_default (first warm-up call), or on bfloat16/float16 rows
    every contender with native float32 on the same values widened.

    Returns ({contender: worst relative error}, failure message or None, notes).
    """
    names = result_names(problem, train)
    reduced_row = problem.shape.dtype in REDUCED
    if reduced_row:
        expected = run_once(FunctionalLSTM("native_float32", _VF.lstm), problem.float32, train)
    else:
        expected = run_once(next(c for c in contenders if c.name == REFERENCE), problem, train)
    errors, failures, notes = {}, [], []
    for contender in contenders:
        if contender.name == REFERENCE and not reduced_row:
            continue
        try:
            actual = run_once(contender, problem, train)
        except Exception as exc:  # a crashing contender fails its row, not the run
            failures.append(f"{contender.name} raised {type(exc).__name__}: {exc}")
            continue
        err, worst = compare(names, actual, expected)
        errors[contender.name] = err
        tol = TOLERANCE["float32" if isinstance(contender, Widened) else problem.shape.dtype]
        if err <= tol:
            continue
        message = f"{contender.name} {worst} rel err {err:.2e} > {tol:.0e}"
        if reduced_row and contender.name not in CHECKED_REDUCED:
            notes.append(f"{message} against float32 (reported, not checked)")
        else:
            failures.append(message)
    return errors, "; ".join(failures) or None, notes


def row_contenders(contenders: list, problem, train: bool) -> tuple:
    """The contenders of this row, how native_default ran (native_engine's label) and notes.

    Where native's oneDNN refuses the row's dtype, native_default is timed as its ATen loop with oneDNN
    off (the aten_loop contender's computation, then not timed twice); on bfloat16/float16 rows where
    native ran ATen's loop by itself, aten_loop is left out for the same reason.
    """
    shape = problem.shape
    active = [c for c in contenders if c.applies(shape)]
    mkldnn, engine = native_engine(problem, train)
    notes = []
    if not mkldnn:
        active = [FunctionalLSTM(REFERENCE, _VF.lstm, mkldnn=False) if c.name == REFERENCE else c
                  for c in active if c.name != "aten_loop"]
        notes.append(f"oneDNN refused {shape.dtype} ({ONEDNN_REFUSAL}): native_default is ATen's loop, oneDNN off")
    elif engine != "oneDNN" and shape.dtype in REDUCED:
        active = [c for c in active if c.name != "aten_loop"]
    return active, engine, notes


def measure_row(shape: Shape, mode: str, contenders: list, repeats: int) -> dict:
    train = mode == "training"
    problem = make_problem(shape)
    flops = forward_flops(shape, problem.tokens) * (TRAINING_FLOP_FACTOR if train else 1)
    row = {**asdict(shape), "dims": shape.describe(), "mode": mode, "tokens": problem.tokens,
           "gflop": flops / 1e9, "status": "ok", "error": None, "native_engine": None,
           "error_reference": error_reference(shape), "max_rel_error": {}, "notes": [],
           "time_ms": {}, "calls_per_sample": {}, "ratios": {}, "gflops_lstm_ext": None,
           "peak_fraction": None}
    with gc_disabled():
        try:
            active, row["native_engine"], row["notes"] = row_contenders(contenders, problem, train)
        except Exception as exc:  # native itself raising fails the row, not the run
            return {**row, "status": "FAILED", "error": f"native_default raised {type(exc).__name__}: {exc}"}
        row["max_rel_error"], failure, notes = check_row(problem, train, active)
        row["notes"] += notes
        if failure:
            return {**row, "status": "FAILED", "error": failure}
        n_calls, samples = interleaved_samples(active, problem, train, repeats)
    seconds = {name: statistics.median(s) for name, s in samples.items()}
    ext = seconds.pop("lstm_ext")
    gflops = flops / ext / 1e9
    return {**row, "calls_per_sample": n_calls,
            "time_ms": {"lstm_ext": 1e3 * ext, **{n: 1e3 * s for n, s in seconds.items()}},
            "ratios": {n: median_ratio(samples, n, "lstm_ext") for n in samples if n != "lstm_ext"},
            "gflops_lstm_ext": gflops}


def measure_rows(args: argparse.Namespace, contenders: list) -> list:
    """Every (shape, mode) row, with a progress bar."""
    modes = ("inference", "training") if args.mode == "all" else (args.mode,)
    rows = []
    with tqdm(list(product(args.shape_list, modes)), desc="lstm bench", unit="row") as bar:
        for shape, mode in bar:
            bar.set_postfix_str(f"{shape.name} {mode}")
            rows.append(measure_row(shape, mode, contenders, args.repeats))
    return rows


def add_peak_fractions(rows: list, peaks: dict) -> None:
    """Each row's GFLOP/s as a share of its dtype's peak; a share above 1 is reported, never hidden."""
    for row in rows:
        if row["gflops_lstm_ext"] is not None:
            row["peak_fraction"] = row["gflops_lstm_ext"] / peaks["dtypes"][row["dtype"]]["gflops"]
            if row["peak_fraction"] > 1:
                print(f"warning: {row['name']} {row['mode']} runs at {100 * row['peak_fraction']:.1f}% of the"
                      " peak: the clock or the CPU flags undercount this machine")


def run(args: argparse.Namespace) -> dict:
    """Measure the GEMM peak and every row; return the JSON payload."""
    started = time.perf_counter()
    ext_lstm, ext_info = load_ext_lstm()
    env = environment(args.threads, ext_info, args.command)
    print(f"torch {env['torch']} | {env['cpu']} | threads {args.threads} | "
          f"load avg {env['load_average_1min_at_start']:.2f} | lstm_ext: {ext_info}")
    dtypes = sorted({s.dtype for s in args.shape_list})
    clock_before = measured_clock_ghz()
    gemm_before = {d: gemm_best_gflops(d) for d in dtypes}
    rows = measure_rows(args, make_contenders(ext_lstm))
    # The better of before and after the rows: a busy machine only ever lowers them.
    gemm = {d: max(g, gemm_best_gflops(d)) for d, g in gemm_before.items()}
    peaks = machine_peaks(dtypes, args.threads, gemm, max(clock_before, measured_clock_ghz()))
    print(peak_text(peaks))
    add_peak_fractions(rows, peaks)
    env["load_average_1min_at_end"] = os.getloadavg()[0]  # high: other load, noisy times
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "shape_list"}
    return {"environment": env, "config": config, "gemm_peak_gflops": gemm, "peak": peaks, "rows": rows,
            "summary": geomeans(rows), "runtime_s": time.perf_counter() - started}


def write_reports(payload: dict, out: Path) -> list:
    """results.json, results.md and ratios.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "ratios.png"]
    rows, summary = payload["rows"], payload["summary"]
    write_json(paths[0], payload)
    paths[1].write_text(markdown(rows, summary, payload["environment"], payload["peak"]))
    plot_ratios(rows, paths[2])
    return paths


def main(argv=None) -> int:
    """Run the benchmark and write its reports; returns 1 if any row FAILED, else 0."""
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            payload = run(args)
    finally:
        torch.set_num_threads(previous_threads)
    paths = write_reports(payload, args.out)
    rows, env = payload["rows"], payload["environment"]
    print(terminal_table(rows, payload["summary"]))
    for row in rows:
        for note in row["notes"]:
            print(f"note {row['name']} {row['mode']}: {note}")
        if row["status"] != "ok":
            print(f"FAILED {row['name']} {row['mode']}: {row['error']}")
    print(f"runtime {payload['runtime_s']:.1f} s, load avg {env['load_average_1min_at_start']:.2f}"
          f" -> {env['load_average_1min_at_end']:.2f}; wrote " + ", ".join(map(str, paths)))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
