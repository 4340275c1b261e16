"""Terminal table, Markdown, JSON and PNG output for bench.py results."""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402

BASELINES = ("native_default", "aten_loop", "cell_loop")  # ratio = baseline time / lstm_ext time
CONTENDERS = ("lstm_ext",) + BASELINES
SHORT = {"lstm_ext": "ext", "native_default": "native", "aten_loop": "aten", "cell_loop": "cell"}


def _number(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(scale * value, spec)


def _ms(value) -> str:
    return _number(value, ".0f" if value is not None and value >= 1000 else ".4g")


def _columns() -> list:
    """(header, row -> text) pairs shared by the terminal and Markdown tables."""
    columns = [
        ("shape", lambda r: r["name"]),
        ("dims", lambda r: r["dims"]),
        ("mode", lambda r: r["mode"]),
        ("dtype", lambda r: r["dtype"]),
    ]
    for name in CONTENDERS:
        columns.append((f"{SHORT[name]} ms", lambda r, n=name: _ms(r["time_ms"].get(n))))
    for name in BASELINES:
        columns.append((f"{SHORT[name]}/ext", lambda r, n=name: _number(r["ratios"].get(n), ".2f")))
    columns += [
        ("ext GFLOP/s", lambda r: _number(r["gflops_lstm_ext"], ".1f")),
        ("% peak", lambda r: _number(r["peak_fraction"], ".1f", scale=100)),
        ("status", lambda r: r["status"]),
    ]
    return columns


def _cells(rows: list) -> tuple:
    columns = _columns()
    return [h for h, _ in columns], [[fmt(r) for _, fmt in columns] for r in rows]


def geomeans(rows: list) -> dict:
    """Geometric mean of each ratio per mode over the rows that passed."""
    summary = {}
    for mode in sorted({r["mode"] for r in rows}):
        ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        means = {}
        for name in BASELINES:
            ratios = [r["ratios"][name] for r in ok if r["ratios"].get(name)]
            means[name] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
        summary[mode] = {"rows": len(ok), "geomean_ratio": means}
    return summary


def _summary_lines(summary: dict) -> list:
    lines = []
    for mode, item in summary.items():
        parts = [f"{SHORT[n]}/ext {_number(g, '.2f')}" for n, g in item["geomean_ratio"].items()]
        lines.append(f"geomean {mode} ({item['rows']} rows): " + ", ".join(parts))
    return lines


def terminal_table(rows: list, summary: dict) -> str:
    headers, body = _cells(rows)
    widths = [max(len(x) for x in column) for column in zip(headers, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [headers, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + _summary_lines(summary))


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


def markdown(rows: list, summary: dict, env: dict, peak: dict) -> str:
    headers, body = _cells(rows)
    lines = [
        "# lstm_ext benchmark",
        "",
        f"torch {env['torch']}, {env['cpu']}, {env['threads']} threads, {env['date']}, 1-min load"
        f" average {env['load_average_1min_at_start']:.2f} -> {env['load_average_1min_at_end']:.2f}.",
        "Ratios are contender time / lstm_ext time (> 1: lstm_ext faster). " + peak_text(peak),
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    lines += ["", *(f"- {line}" for line in _summary_lines(summary))]
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
    bar = 0.8 / len(BASELINES)
    for ax, mode in zip(axes[0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        for i, name in enumerate(BASELINES):
            ys = [k + (i - (len(BASELINES) - 1) / 2) * bar for k in range(len(mode_rows))]
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
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(BASELINES))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)
