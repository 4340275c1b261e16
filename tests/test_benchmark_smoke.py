"""Smoke test: benchmarks/bench.py runs its --tiny grid and writes every report.

No speed assertions; the tiny grid also checks lstm_ext against native
torch._VF.lstm, so a correctness regression fails this test too.
"""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402  (needs the path above)

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
