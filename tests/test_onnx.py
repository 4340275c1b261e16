"""ONNX export with both of torch.onnx's exporters, run in ONNX Runtime and compared with lstm_ext.

Each configuration is exported with dynamic sequence length and batch, then run at the traced
shape and at another one on the same file. Every layer must be one standard ONNX LSTM node,
projections included (native's exporter refuses those).
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

import lstm_ext

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE = 3, 5, 2
TRACED_SHAPE, OTHER_SHAPE = (5, 2), (9, 3)  # (T, B)
CONFIGS = {
    "default": {},
    "layers3": dict(num_layers=3),
    "bidirectional": dict(bidirectional=True),
    "no_bias": dict(bias=False),
    "batch_first": dict(batch_first=True),
    "layers2_bidirectional_dropout": dict(num_layers=2, bidirectional=True, dropout=0.5),
    "proj_size": dict(proj_size=PROJ_SIZE),
    "proj_size_layers2_bidirectional": dict(num_layers=2, bidirectional=True, proj_size=PROJ_SIZE),
    "proj_size_no_bias_batch_first": dict(proj_size=PROJ_SIZE, bias=False, batch_first=True),
}
EXPORTERS = ["torchscript", "dynamo"]


class Flat(nn.Module):
    """The LSTM with its outputs flat, called with or without (h_0, c_0)."""

    def __init__(self, lstm, with_hx):
        super().__init__()
        self.lstm, self.with_hx = lstm, with_hx

    def forward(self, x, h0=None, c0=None):
        output, (h_n, c_n) = self.lstm(x, (h0, c0) if self.with_hx else None)
        return output, h_n, c_n


def inputs(lstm, shape, with_hx, seed=0):
    steps, batch = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, steps, INPUT_SIZE) if lstm.batch_first else (steps, batch, INPUT_SIZE), generator=generator)
    if not with_hx:
        return (x,)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    h0 = torch.randn(states, batch, lstm.proj_size or HIDDEN_SIZE, generator=generator)
    c0 = torch.randn(states, batch, HIDDEN_SIZE, generator=generator)
    return x, h0, c0


def export(model, args, path, exporter):
    names = ["x", "h0", "c0"][: len(args)]
    time_dim, batch_dim = (1, 0) if model.lstm.batch_first else (0, 1)
    if exporter == "torchscript":
        axes = {"x": {time_dim: "T", batch_dim: "B"}, "h0": {1: "B"}, "c0": {1: "B"}}
        torch.onnx.export(model, args, path, dynamo=False, input_names=names, output_names=["output", "h_n", "c_n"],
                          dynamic_axes={name: axes[name] for name in names})
    else:
        steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
        shapes = {"x": {time_dim: steps, batch_dim: batch}, "h0": {1: batch}, "c0": {1: batch}}
        torch.onnx.export(model, args, path, dynamo=True, input_names=names, output_names=["output", "h_n", "c_n"],
                          dynamic_shapes={name: shapes[name] for name in names})
    return names


def max_difference_in_onnx_runtime(model, path, names, shape, with_hx):
    """Runs the exported file at ``shape``; returns the largest |ORT - lstm_ext| over the outputs."""
    args = inputs(model.lstm, shape, with_hx, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: arg.numpy() for name, arg in zip(names, args)})
    with torch.no_grad():
        expected = model(*args)
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    return max(float(abs(torch.from_numpy(g) - e).max()) for g, e in zip(got, expected))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("hx", ["hx_given", "hx_omitted"])
@pytest.mark.parametrize("config", CONFIGS)
def test_export_runs_in_onnx_runtime_and_matches_lstm_ext(tmp_path, config, hx, exporter):
    torch.manual_seed(0)
    lstm = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, **CONFIGS[config]).eval()
    with_hx = hx == "hx_given"
    model = Flat(lstm, with_hx).eval()
    path = tmp_path / "model.onnx"
    names = export(model, inputs(lstm, TRACED_SHAPE, with_hx), path, exporter)

    nodes = [node for node in onnx.load(str(path)).graph.node if node.op_type == "LSTM"]
    assert len(nodes) == lstm.num_layers
    direction = "bidirectional" if lstm.bidirectional else "forward"
    directions = [onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "direction"]
    assert directions == [direction.encode()] * len(nodes)
    for shape in (TRACED_SHAPE, OTHER_SHAPE):
        assert max_difference_in_onnx_runtime(model, path, names, shape, with_hx) <= 1e-5, shape


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_matches_native_exporter(tmp_path, exporter):
    """The same ONNX LSTM nodes as native's export of nn.LSTM: both files give the same outputs."""
    torch.manual_seed(0)
    native = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True).eval()
    ext = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True).eval()
    ext.load_state_dict(native.state_dict())
    args = inputs(ext, TRACED_SHAPE, with_hx=True)
    results = []
    for name, lstm in (("native", native), ("ext", ext)):
        path = tmp_path / f"{name}.onnx"
        names = export(Flat(lstm, True).eval(), args, path, exporter)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results.append(session.run(None, {n: a.numpy() for n, a in zip(names, args)}))
    for got, expected in zip(*results):
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), atol=1e-6, rtol=1e-6)


def test_packed_input_refuses_to_export(tmp_path):
    """With a clear message. (torch.export, the dynamo exporter's first step, fails earlier, in
    nn.LSTM's own forward, as it does for native.)"""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE)

        def forward(self, x):
            return self.lstm(nn.utils.rnn.pack_padded_sequence(x, [5, 3]))[1][0]

    with pytest.raises(Exception, match="packed sequences"):
        torch.onnx.export(Packed().eval(), (torch.randn(5, 2, INPUT_SIZE),), tmp_path / "m.onnx", dynamo=False)


def test_dropout_in_training_mode_refuses_to_export(tmp_path):
    lstm = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, dropout=0.5)
    with pytest.raises(Exception, match="export the model in eval mode"):
        torch.onnx.export(Flat(lstm, False), inputs(lstm, TRACED_SHAPE, False), tmp_path / "m.onnx", dynamo=True)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize(
    "variant", [dict(peephole=True), dict(zoneout=0.1), dict(cell="cifg"), dict(layer_norm=True)], ids=str
)
def test_cell_variants_refuse_to_export(tmp_path, variant, exporter):
    """ONNX's LSTM node is the plain cell: a variant raises rather than exporting the wrong math."""
    lstm = lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, **variant).eval()
    with pytest.raises(Exception, match="cell variants"):
        export(Flat(lstm, False), inputs(lstm, TRACED_SHAPE, False), tmp_path / "m.onnx", exporter)


def test_lstm_ext_imports_and_exports_with_torchscript_without_onnxscript(tmp_path):
    """onnx, onnxscript and onnxruntime are an optional extra: without them only the dynamo
    exporter (which needs onnxscript) is missing."""
    script = (
        'import sys\nsys.modules["onnxscript"] = None\n'
        "import torch, lstm_ext\n"
        "lstm = lstm_ext.LSTM(3, 5).eval()\n"
        f"torch.onnx.export(lstm, (torch.randn(5, 2, 3),), {str(tmp_path / 'm.onnx')!r}, dynamo=False)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("first", ["lstm_ext", "onnxscript"])
def test_dynamo_translation_is_registered_whichever_is_imported_first(tmp_path, first):
    """``import lstm_ext`` leaves onnxscript unimported (it costs about a second) and registers the
    translation when the dynamo exporter loads its registry, or at once if it already has."""
    script = (
        "import sys, torch\n"
        + ("import lstm_ext\nassert 'onnxscript' not in sys.modules\n" if first == "lstm_ext" else "")
        + "import onnxscript.function_libs.torch_lib.registration\n"
        + ("import lstm_ext\n" if first == "onnxscript" else "")
        + "lstm = lstm_ext.LSTM(3, 5).eval()\n"
        + f"torch.onnx.export(lstm, (torch.randn(5, 2, 3),), {str(tmp_path / 'm.onnx')!r}, dynamo=True)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
