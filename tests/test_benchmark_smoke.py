"""Smoke tests: benchmarks/bench.py and bench_autodiff.py run their --tiny grids and write
their reports; bench_cells.py and bench_step.py run tiny grids.

No speed assertions; the tiny grids also check lstm_ext against native
torch._VF.lstm, so a correctness regression fails these tests too.
"""

import json
import sys
from itertools import product
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402  (needs the path above)
import bench_autodiff  # noqa: E402
import bench_cells  # noqa: E402
import bench_step  # noqa: E402

ROW_FIELDS = {"name", "dims", "mode", "dtype", "T", "B", "I", "H", "layers", "bidirectional",
              "packed", "tokens", "gflop", "status", "error", "max_rel_error", "time_ms",
              "calls_per_sample", "ratios", "gflops_lstm_ext", "peak_fraction"}


def test_tiny_benchmark_writes_reports(tmp_path):
    status = bench.main(["--tiny", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)])

    payload = json.loads((tmp_path / "results.json").read_text())
    failed = [(r["name"], r["mode"], r["error"]) for r in payload["rows"] if r["status"] != "ok"]
    assert status == 0 and not failed, failed

    env = payload["environment"]
    assert {"torch", "cpu", "threads", "date"} <= env.keys()
    assert env["threads"] == 1
    assert set(payload["gemm_peak_gflops"]) == {"float32", "float64"}
    assert set(payload["summary"]) == {"inference", "training"}

    rows = payload["rows"]
    assert {(r["name"], r["mode"]) for r in rows} == {
        (s.name, m) for s in bench.GRIDS["tiny"] for m in ("inference", "training")}
    assert any(r["packed"] for r in rows) and any(r["bidirectional"] for r in rows)
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert {"lstm_ext", "native_default", "aten_loop"} <= row["time_ms"].keys()
        assert {"native_default", "aten_loop"} <= row["ratios"].keys()
        assert row["gflops_lstm_ext"] > 0 and row["peak_fraction"] > 0
        assert ("cell_loop" in row["time_ms"]) == (not row["packed"])

    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# lstm_ext benchmark") and "| shape |" in md and "geomean" in md
    assert (tmp_path / "ratios.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_tiny_autodiff_benchmark_checks_every_row(tmp_path):
    status = bench_autodiff.main(["--tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])

    rows = json.loads((tmp_path / "autodiff.json").read_text())["rows"]
    failed = [(r["row"], r["shape"], r["mode"], r["error"]) for r in rows if r["status"] != "ok"]
    assert status == 0 and not failed, failed
    assert {r["row"] for r in rows} == {"gradient_penalty", "jvp", "vmap_inputs", "ensemble"}
    assert all(r["ratios"] and "lstm_ext" in r["time_ms"] for r in rows)


def test_cell_variant_benchmark_runs_every_variant():
    rows = bench_cells.main(["--shapes", "4,3,8", "--repeats", "1"])
    expected = {(variant, train) for variant in bench_cells.VARIANTS for train in (False, True)}
    assert {(r["variant"], r["train"]) for r in rows} == expected
    assert all(set(r["ms"]) == {"lstm_ext", "plain", "loop"} for r in rows)


def test_cell_variant_benchmark_times_the_compiled_loop():
    rows = bench_cells.main(["--variants", "layer_norm", "--shapes", "2,2,4", "--repeats", "1", "--compiled"])
    assert [r["train"] for r in rows] == [False, True]
    assert all(set(r["ms"]) == {"lstm_ext", "plain", "loop", "compiled loop"} for r in rows)


def test_step_benchmark_runs_every_loop_against_the_engines(capsys):
    status = bench_step.main(["--batches", "2", "--hidden", "8", "--calls", "3x2x8", "--steps", "2", "--repeats", "1",
                              "--threads", "1"])
    out = capsys.readouterr().out
    assert status == 0 and "FAILED" not in out, out
    for loop, mode in product(("cell", "t1", "call"), ("inference", "training")):
        assert f"geomean native/ext {loop} {mode}: " in out
    # The engines time inference t1 and call rows: ONNX Runtime comes with the test extra.
    for loop in ("t1", "call"):
        assert f"geomean onnxruntime/ext {loop} inference: " in out
        openvino = f"geomean openvino/ext {loop} inference: " in out
        assert openvino != ("note: openvino not importable" in out)
