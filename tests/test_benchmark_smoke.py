"""Smoke tests: benchmarks/bench.py, bench_autodiff.py and bench_quantized.py run their --tiny grids
and write their reports; bench_cells.py and bench_step.py run tiny grids.

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
import bench_quantized  # noqa: E402
import bench_step  # noqa: E402

ROW_FIELDS = {"name", "dims", "mode", "dtype", "T", "B", "I", "H", "layers", "bidirectional",
              "packed", "tokens", "gflop", "status", "error", "native_engine", "error_reference",
              "max_rel_error", "notes", "time_ms", "calls_per_sample", "ratios", "gflops_lstm_ext",
              "peak_fraction"}
NATIVE_ENGINES = {"oneDNN", "ATen loop", "oneDNN refused: ATen loop"}


def test_tiny_benchmark_writes_reports(tmp_path):
    status = bench.main(["--tiny", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)])

    payload = json.loads((tmp_path / "results.json").read_text())
    failed = [(r["name"], r["mode"], r["error"]) for r in payload["rows"] if r["status"] != "ok"]
    assert status == 0 and not failed, failed

    env = payload["environment"]
    assert {"command", "commit", "torch", "cpu", "threads", "date"} <= env.keys()
    assert env["threads"] == 1 and env["command"].startswith("python benchmarks/bench.py --tiny")
    assert set(payload["gemm_peak_gflops"]) == {"float32", "float64", "bfloat16", "float16"}
    assert set(payload["summary"]) == {f"{m}{d}" for m in ("inference", "training")
                                       for d in ("", " bfloat16", " float16")}

    rows = payload["rows"]
    assert {(r["name"], r["mode"]) for r in rows} == {
        (s.name, m) for s in bench.GRIDS["tiny"] for m in ("inference", "training")}
    assert any(r["packed"] for r in rows) and any(r["bidirectional"] for r in rows)
    assert {r["dtype"] for r in rows} == {"float32", "float64", "bfloat16", "float16"}
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["native_engine"] in NATIVE_ENGINES
        assert row["gflops_lstm_ext"] > 0 and row["peak_fraction"] > 0
        assert ("cell_loop" in row["time_ms"]) == (not row["packed"] and row["name"] != "tiny_f16")
        if row["dtype"] in ("bfloat16", "float16"):
            # Against native float32 on the same values: lstm_ext, native in that dtype, lstm_ext float32.
            assert row["error_reference"] == "native float32 on the same values"
            assert {"lstm_ext", "native_default", "lstm_ext_f32"} <= row["time_ms"].keys()
            assert {"native_default", "lstm_ext_f32"} <= row["ratios"].keys()
            assert {"lstm_ext", "native_default", "lstm_ext_f32"} <= row["max_rel_error"].keys()
            assert row["max_rel_error"]["lstm_ext_f32"] <= 1e-4
            assert ("aten_loop" in row["time_ms"]) == (row["native_engine"] == "oneDNN")
        else:
            assert row["error_reference"] == "native_default"
            assert {"lstm_ext", "native_default", "aten_loop"} <= row["time_ms"].keys()
            assert {"native_default", "aten_loop"} <= row["ratios"].keys()
            assert "lstm_ext_f32" not in row["time_ms"]

    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# lstm_ext benchmark") and "| shape |" in md and "geomean" in md
    assert "Command: `python benchmarks/bench.py --tiny" in md and "Commit: " in md and "CPU: " in md
    assert "## bfloat16 / float16" in md and "| native ran |" in md and "| err ext |" in md
    assert "| ext f32/ext |" in md
    assert (tmp_path / "ratios.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_reduced_row_where_onednn_refuses_times_the_aten_loop(monkeypatch):
    """Where native's oneDNN raises for the dtype (CPUs without AVX-512 BF16), native_default is timed
    with oneDNN off, labelled, and aten_loop (the same computation) is not timed twice."""
    monkeypatch.setattr(bench, "native_engine", lambda problem, train: (False, "oneDNN refused: ATen loop"))
    ext_lstm, _ = bench.load_ext_lstm()
    row = bench.measure_row(bench.ALL_SHAPES["tiny_f16"], "inference", bench.make_contenders(ext_lstm), 1)
    assert row["status"] == "ok", row["error"]
    assert row["native_engine"] == "oneDNN refused: ATen loop"
    assert any("oneDNN refused float16" in note for note in row["notes"])
    assert set(row["time_ms"]) == {"lstm_ext", "native_default", "lstm_ext_f32"}


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


def test_step_benchmark_in_bfloat16_against_native_and_float32(capsys):
    status = bench_step.main(["--batches", "2", "--hidden", "8", "--calls", "3x2x8", "--steps", "2", "--repeats", "1",
                              "--threads", "1", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert status == 0 and "FAILED" not in out, out
    for loop, mode in product(("cell", "t1", "call"), ("inference", "training")):
        assert f"geomean native/ext {loop} {mode}: " in out
        assert f"geomean lstm_ext_f32/ext {loop} {mode}: " in out
    assert "| native ran |" in out and "| err lstm_ext | err native | err lstm_ext_f32 |" in out
    assert "onnxruntime/ext" not in out and "note: bfloat16 rows: the engines" in out


def test_tiny_quantized_benchmark_writes_reports(tmp_path):
    status = bench_quantized.main(["--tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])

    payload = json.loads((tmp_path / "quantized.json").read_text())
    rows = payload["rows"]
    failed = [(r["name"], r["error"]) for r in rows if r["status"] != "ok"]
    assert status == 0 and not failed, failed
    assert [r["name"] for r in rows] == [s.name for s in bench_quantized.GRIDS["tiny"]]
    env = payload["environment"]
    assert {"command", "commit", "cpu", "date", "threads", "quantized_engine", "onnxruntime"} <= env.keys()
    # ONNX Runtime comes with the test extra, as for bench_step's engines.
    contenders = set(bench_quantized.CONTENDERS)
    for row in rows:
        assert set(row["time_ms"]) == contenders and set(row["max_rel_error"]) == contenders
        assert set(row["ratios"]) == {f"{a}/{b}" for a, b in bench_quantized.RATIOS}
        assert row["max_rel_error"]["lstm_ext_f32"] <= 1e-4 and row["max_rel_error"]["lstm_ext_fp16"] <= 1e-2
    assert set(payload["summary"]["geomean_ratio"]) == {f"{a}/{b}" for a, b in bench_quantized.RATIOS}

    md = (tmp_path / "quantized.md").read_text()
    assert md.startswith("# lstm_ext quantized LSTM benchmark")
    assert "Command: `python benchmarks/bench_quantized.py --tiny" in md and "Commit: " in md and "CPU: " in md
    assert "| ext int8 ms |" in md and "| torch int8/ext int8 |" in md and "| err ORT int8 |" in md
    assert "geomean torch int8 and ORT int8 / ext int8 together" in md
