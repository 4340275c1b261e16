"""Terminal table, Markdown, JSON and PNG output for bench.py results.

float32/float64 rows and bfloat16/float16 rows go to two tables: the second has the contender
lstm_ext_f32, the engine native ran and each contender's error against float32.
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402

BASELINES = ("native_default", "aten_loop", "cell_loop")  # ratio = baseline time / lstm_ext time
CONTENDERS = ("lstm_ext",) + BASELINES
REDUCED_BASELINES = BASELINES + ("lstm_ext_f32",)  # bfloat16/float16 rows
REDUCED_CONTENDERS = ("lstm_ext",) + REDUCED_BASELINES
REDUCED = ("bfloat16", "float16")
SHORT = {"lstm_ext": "ext", "native_default": "native", "aten_loop": "aten", "cell_loop": "cell",
         "lstm_ext_f32": "ext f32"}


def _number(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(scale * value, spec)


def _ms(value) -> str:
    return _number(value, ".0f" if value is not None and value >= 1000 else ".4g")


def _is_reduced(row: dict) -> bool:
    return row["dtype"] in REDUCED


def _columns(reduced: bool = False) -> list:
    """(header, row -> text) pairs shared by the terminal and Markdown tables; `reduced`: the
    bfloat16/float16 table's (lstm_ext_f32, which engine native ran, errors against float32)."""
    columns = [
        ("shape", lambda r: r["name"]),
        ("dims", lambda r: r["dims"]),
        ("mode", lambda r: r["mode"]),
        ("dtype", lambda r: r["dtype"]),
    ]
    if reduced:
        columns.append(("native ran", lambda r: r.get("native_engine") or "-"))
    for name in REDUCED_CONTENDERS if reduced else CONTENDERS:
        columns.append((f"{SHORT[name]} ms", lambda r, n=name: _ms(r["time_ms"].get(n))))
    for name in REDUCED_BASELINES if reduced else BASELINES:
        columns.append((f"{SHORT[name]}/ext", lambda r, n=name: _number(r["ratios"].get(n), ".2f")))
    if reduced:
        for name in REDUCED_CONTENDERS:
            columns.append((f"err {SHORT[name]}", lambda r, n=name: _number(r["max_rel_error"].get(n), ".1e")))
    columns += [
        ("ext GFLOP/s", lambda r: _number(r["gflops_lstm_ext"], ".1f")),
        ("% peak", lambda r: _number(r["peak_fraction"], ".1f", scale=100)),
        ("status", lambda r: r["status"]),
    ]
    return columns


def _cells(rows: list, reduced: bool = False) -> tuple:
    columns = _columns(reduced)
    return [h for h, _ in columns], [[fmt(r) for _, fmt in columns] for r in rows]


def _group(row: dict) -> str:
    """A summary group: the mode, and the dtype too for bfloat16/float16 rows."""
    return f"{row['mode']} {row['dtype']}" if _is_reduced(row) else row["mode"]


def geomeans(rows: list) -> dict:
    """Geometric mean of each ratio per mode (float32/float64 rows) and per mode and dtype
    (bfloat16/float16 rows, keys like "inference bfloat16"), over the rows that passed."""
    summary = {}
    for group in sorted({_group(r) for r in rows}, key=lambda g: (" " in g, g)):
        ok = [r for r in rows if _group(r) == group and r["status"] == "ok"]
        means = {}
        for name in REDUCED_BASELINES if " " in group else BASELINES:
            ratios = [r["ratios"][name] for r in ok if r["ratios"].get(name)]
            means[name] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
        summary[group] = {"rows": len(ok), "geomean_ratio": means}
    return summary


def _summary_lines(summary: dict) -> list:
    lines = []
    for mode, item in summary.items():
        parts = [f"{SHORT[n]}/ext {_number(g, '.2f')}" for n, g in item["geomean_ratio"].items()]
        lines.append(f"geomean {mode} ({item['rows']} rows): " + ", ".join(parts))
    return lines


def _tables(rows: list) -> list:
    """(reduced, rows) per table: float32/float64 rows, then bfloat16/float16 rows; empty ones left out."""
    tables = [(False, [r for r in rows if not _is_reduced(r)]), (True, [r for r in rows if _is_reduced(r)])]
    return [(reduced, part) for reduced, part in tables if part]


def terminal_table(rows: list, summary: dict) -> str:
    lines = []
    for reduced, part in _tables(rows):
        headers, body = _cells(part, reduced)
        widths = [max(len(x) for x in column) for column in zip(headers, *body)]
        table = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [headers, *body]]
        table.insert(1, "  ".join("-" * w for w in widths))
        lines += table + [""]
    return "\n".join(lines + _summary_lines(summary))


def peak_text(peak: dict) -> str:
    """What `% peak` divides by, per dtype, and how it was derived."""
    parts = []
    for dtype, p in peak["dtypes"].items():
        if p["source"] == "FMA":
            parts.append(f"{dtype} {p['gflops']:.1f} GFLOP/s ({p['flops_per_cycle']:g} flops/cycle/core, best"
                         f" torch.mm {p['best_gemm_gflops']:.1f})")
        else:
            parts.append(f"{dtype} {p['gflops']:.1f} GFLOP/s (best torch.mm, above the FMA estimate"
                         f" {p['fma_gflops']:.1f})")
    return (f"Peak for % peak: FMA throughput of {peak['threads']} cores at {peak['clock_ghz']:.2f} GHz"
            f" ({peak['clock']}) x FMA lanes x 2 FMA units x 2 flops, or the best torch.mm if higher: "
            + "; ".join(parts) + ".")


REDUCED_TEXT = (
    "bfloat16 / float16 rows: every contender on the same seeded values rounded to that dtype; ratios are"
    " contender time / lstm_ext time in that dtype, so `ext f32/ext` is lstm_ext float32 on the same values"
    " widened over lstm_ext in the narrow dtype (> 1: the narrow dtype is faster). `native ran`: oneDNN, ATen"
    " loop (native chose it), or `oneDNN refused: ATen loop` (oneDNN raised, native timed with oneDNN off);"
    " `aten` is timed only where native ran oneDNN. `err`: max|x - ref| / max|ref| over outputs (and, in"
    " training, gradients) against native float32 on the same rounded weights and inputs."
)


def header_lines(env: dict) -> list:
    """Command, commit, CPU and date (and torch, threads, load) as Markdown lines."""
    return [
        f"Command: `{env.get('command', '?')}`",
        f"Commit: {env.get('commit', '?')}",
        f"CPU: {env['cpu']}, threads: {env['threads']}; torch {env['torch']}",
        f"Date: {env['date']}, 1-min load average {env['load_average_1min_at_start']:.2f}"
        + (f" -> {env['load_average_1min_at_end']:.2f}" if "load_average_1min_at_end" in env else ""),
    ]


def markdown(rows: list, summary: dict, env: dict, peak: dict) -> str:
    lines = ["# lstm_ext benchmark", ""]
    lines += [f"{line}  " for line in header_lines(env)]
    lines += ["", "Ratios are contender time / lstm_ext time (> 1: lstm_ext faster). " + peak_text(peak)]
    for reduced, part in _tables(rows):
        headers, body = _cells(part, reduced)
        lines += ["", "## bfloat16 / float16" if reduced else "## float32 / float64", ""]
        if reduced:
            lines += [REDUCED_TEXT, ""]
        lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in body]
    lines += ["", *(f"- {line}" for line in _summary_lines(summary))]
    lines += [f"- note {r['name']} {r['mode']}: {note}" for r in rows for note in r.get("notes", ())]
    over = [r for r in rows if (r["peak_fraction"] or 0) > 1]
    lines += [f"- above the peak: {r['name']} {r['mode']} {100 * r['peak_fraction']:.1f}% (the clock or the CPU"
              " flags undercount this machine)" for r in over]
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [f"- FAILED {r['name']} {r['mode']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_ratios(rows: list, path: Path) -> None:
    """Bars from 1 to each ratio (log scale), one panel per mode."""
    modes = sorted({r["mode"] for r in rows})
    height = max(3.0, 0.45 * max(sum(r["mode"] == m for r in rows) for m in modes) + 2.0)
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), height), squeeze=False)
    names = [n for n in REDUCED_BASELINES if n in BASELINES or any(n in r["ratios"] for r in rows)]
    bar = 0.8 / len(names)
    for ax, mode in zip(axes[0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        for i, name in enumerate(names):
            ys = [k + (i - (len(names) - 1) / 2) * bar for k in range(len(mode_rows))]
            widths = [(r["ratios"].get(name) or math.nan) - 1 for r in mode_rows]
            ax.barh(ys, widths, left=1.0, height=bar, label=f"{SHORT[name]}/ext")
        ax.set_yticks(range(len(mode_rows)))
        ax.set_yticklabels([f"{r['name']} {r['dtype']}" + ("" if r["status"] == "ok" else " FAILED")
                            for r in mode_rows])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("contender time / lstm_ext time (> 1: lstm_ext faster)")
        ax.set_title(mode)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(names))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)
