"""ONNX export of ``lstm_ext::forward``, registered with both of torch.onnx's exporters at import.

``torch.onnx.export(model, args, dynamo=False)`` (the TorchScript exporter) finds a symbolic for the
operator, ``dynamo=True`` a translation in the exporter's registry of ONNX functions; neither
needs user code. Both write the same graph: one standard ONNX ``LSTM`` node per layer, both
directions in one (``direction="bidirectional"``), weights reordered from PyTorch's gates i, f, g, o
to ONNX's i, o, f, c. The graph is written once (:func:`_layer_stack`) against a three-method
builder that each exporter implements.

Projections (``proj_size``; ONNX's LSTM has none, and native's exporter refuses them) are a
decomposition onto the same node, exact in real arithmetic: the node runs the unprojected hidden
state h~ (``h = W_hr h~``), its recurrent weight is ``W_hh W_hr``, and since h~ before the first
step is unknown, the node starts from h~ = 0 and gets ``W_hh h_0`` through its input instead: the
input is widened by h_0 at the first step (the last one walking in reverse), and zeros elsewhere,
with ``W_hh`` as that input's weight. Its outputs are projected by ``W_hr`` afterwards.

Packed sequences and dropout between layers in training do not export: export in eval mode.
"""

import importlib.abc
import importlib.util
import sys

import torch
from torch.onnx import symbolic_helper

# PyTorch stores the four gates' rows as i, f, g, o; ONNX's LSTM reads them as i, o, f, c (c = g).
ONNX_GATE_ORDER = [0, 3, 1, 2]
# The TorchScript exporter's symbolic needs Range (opset 11); the dynamo exporter writes opset 18.
TORCHSCRIPT_OPSET = 11
# The registry of ONNX functions the dynamo exporter reads (with torch's own) each time it exports.
DYNAMO_REGISTRY_MODULE = "onnxscript.function_libs.torch_lib.registration"


def _layer_stack(graph, input, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional):
    """The ONNX graph of ``lstm_ext::forward`` on dense [T, B, I] input: (output, h_n, c_n)."""
    if train and dropout > 0 and num_layers > 1:
        raise RuntimeError("lstm_ext: dropout between layers does not export to ONNX; export the model in eval mode")
    directions = 2 if bidirectional else 1
    per_cell = len(params) // (num_layers * directions)
    has_projections = per_cell == (5 if has_biases else 3)
    hidden, proj = graph.size(params[1], 0) // 4, graph.size(params[-1], 0)  # proj: W_hr's rows
    layer_input, h_n, c_n = input, [], []
    for layer in range(num_layers):
        first = layer * directions * per_cell
        cells = [params[first + d * per_cell : first + (d + 1) * per_cell] for d in range(directions)]
        h0, c0 = (_slice(graph, state, layer * directions, (layer + 1) * directions) for state in (hx, cx))
        if has_projections:
            layer_input, h, c = _projected_layer(graph, layer_input, h0, c0, cells, has_biases, hidden, proj)
        else:
            layer_input, h, c = _layer(graph, layer_input, h0, c0, cells, has_biases, hidden)
        h_n.append(h)
        c_n.append(c)
    return layer_input, _concat(graph, h_n, axis=0), _concat(graph, c_n, axis=0)


def _layer(graph, input, h0, c0, cells, has_biases, hidden):
    """One ONNX LSTM node for a layer (all its directions): (output [T, B, D*H], h_n, c_n)."""
    y, h, c = _lstm_node(graph, input, [w_hh for _, w_hh, *_ in cells], cells, has_biases, hidden, h0, c0, [])
    return _merge_directions(graph, y), h, c


def _projected_layer(graph, input, h0, c0, cells, has_biases, hidden, proj):
    """A layer with projections, on the node of a layer without (see the module's docstring)."""
    directions = len(cells)
    steps = graph.node("Gather", graph.node("Shape", input), graph.ints(0), axis=0)
    step = _as_shape(graph, graph.node("Range", graph.ints(0), steps, graph.ints(1)), [-1, 1, 1])
    last = graph.node("Sub", steps, graph.ints(1))
    first_steps = [graph.node("Equal", step, graph.ints(0)), graph.node("Equal", step, last)]  # of each direction
    # The widened input: [x_t, h_0 of each direction at that direction's first step, else 0].
    starts = []
    for d in range(directions):
        h0_d = graph.node("Gather", h0, graph.ints(d), axis=0)  # [B, P]
        starts.append(graph.node("Where", first_steps[d], h0_d, graph.node("Sub", h0_d, h0_d)))
    widened = graph.node("Concat", input, *starts, axis=2)
    # Each direction's W_hh reads its own h_0 columns, zeros the other direction's.
    extra_weights = [
        [w_hh if e == d else graph.node("Sub", w_hh, w_hh) for e, (_, w_hh, *_) in enumerate(cells)]
        for d in range(directions)
    ]
    recurrent = [graph.node("MatMul", w_hh, w_hr) for _, w_hh, *_, w_hr in cells]  # [4H, H]
    y, h, c = _lstm_node(graph, widened, recurrent, cells, has_biases, hidden, None, c0, extra_weights)
    # Project each direction by its W_hr: [..., D, B, H] @ [D, H, P].
    w_hr_t = _concat(graph, [_as_shape(graph, graph.node("Transpose", w_hr, perm=[1, 0]), [1, hidden, proj])
                             for *_, w_hr in cells], axis=0)
    return _merge_directions(graph, graph.node("MatMul", y, w_hr_t)), graph.node("MatMul", h, w_hr_t), c


def _lstm_node(graph, input, recurrent, cells, has_biases, hidden, h0, c0, extra_input_weights):
    """The ONNX LSTM node; ``extra_input_weights[d]`` are appended to direction d's input weight."""
    w, r, b = [], [], []
    for d, (w_ih, _, *rest) in enumerate(cells):
        if extra_input_weights:
            w_ih = graph.node("Concat", w_ih, *extra_input_weights[d], axis=1)
        w.append(_onnx_gates(graph, w_ih, hidden, [1, 4 * hidden, -1]))
        r.append(_onnx_gates(graph, recurrent[d], hidden, [1, 4 * hidden, -1]))
        if has_biases:
            b_ih, b_hh = (_onnx_gates(graph, bias, hidden, [1, 4 * hidden]) for bias in rest[:2])
            b.append(graph.node("Concat", b_ih, b_hh, axis=1))
    w, r, b = (_concat(graph, tensors, axis=0) if tensors else None for tensors in (w, r, b))
    direction = "bidirectional" if len(cells) == 2 else "forward"
    return graph.node("LSTM", input, w, r, b, None, h0, c0, hidden_size=hidden, direction=direction, outputs=3)


def _onnx_gates(graph, weight, hidden, shape):
    """``weight``'s four row blocks in ONNX's gate order, reshaped to ``shape``."""
    blocks = _as_shape(graph, weight, [4, hidden, -1])
    return _as_shape(graph, graph.node("Gather", blocks, graph.ints(ONNX_GATE_ORDER), axis=0), shape)


def _merge_directions(graph, y):
    """ONNX's [T, D, B, H] output as PyTorch's [T, B, D*H]."""
    return _as_shape(graph, graph.node("Transpose", y, perm=[0, 2, 1, 3]), [0, 0, -1])


def _as_shape(graph, tensor, shape):
    return graph.node("Reshape", tensor, graph.ints(shape))


def _concat(graph, tensors, axis):
    return tensors[0] if len(tensors) == 1 else graph.node("Concat", *tensors, axis=axis)


def _slice(graph, state, begin, end):
    return graph.node("Slice", state, graph.ints([begin]), graph.ints([end]), graph.ints([0]))


def _check_exportable(batch_sizes_given, cell="lstm", has_cell_params=False, zoneout=()):
    if batch_sizes_given:
        raise RuntimeError("lstm_ext: packed sequences (PackedSequence input) do not export to ONNX; pad them")
    if cell != "lstm" or has_cell_params or any(zoneout):
        raise RuntimeError(
            "lstm_ext: cell variants (peephole, zoneout, cell=...) do not export to ONNX, whose LSTM node is the "
            "plain cell; export a model without them"
        )


# ---- the TorchScript exporter (dynamo=False) ----------------------------------------------------


class _TorchScriptGraph:
    """The builder on a TorchScript exporter's graph context."""

    def __init__(self, g):
        self.g = g

    def node(self, op_type, *inputs, outputs=1, **attributes):
        inputs = [symbolic_helper._optional_input_placeholder_tensor(self.g) if x is None else x for x in inputs]
        attributes = {f"{name}_{_attribute_kind(value)}": value for name, value in attributes.items()}
        return self.g.op(op_type, *inputs, outputs=outputs, **attributes)

    def ints(self, values):
        return self.g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def size(self, value, dim):
        return symbolic_helper._get_tensor_dim_size(value, dim)


def _attribute_kind(value):
    sample = value[0] if isinstance(value, (list, tuple)) else value
    return {int: "i", float: "f", str: "s"}[type(sample)]


def _torchscript_symbolic(
    g, input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional, need_workspace,
    cell, cell_params, recurrent_dropout, zoneout,
):
    _check_exportable(
        not symbolic_helper._is_none(batch_sizes),
        symbolic_helper._parse_arg(cell, "s"),
        not symbolic_helper._is_none(cell_params),
        symbolic_helper._parse_arg(zoneout, "fs"),
    )
    options = [
        symbolic_helper._parse_arg(value, kind)
        for value, kind in ((has_biases, "b"), (num_layers, "i"), (dropout, "f"), (train, "b"), (bidirectional, "b"))
    ]
    output, h_n, c_n = _layer_stack(_TorchScriptGraph(g), input, hx, cx, symbolic_helper._unpack_list(params), *options)
    return output, h_n, c_n, None  # no workspace: nothing uses it in an exported (inference) graph


# ---- the dynamo exporter (dynamo=True) ----------------------------------------------------------


class _OnnxScriptGraph:
    """The builder on an onnxscript opset, for a trace-only translation."""

    def __init__(self, op):
        self.op = op

    def node(self, op_type, *inputs, outputs=1, **attributes):
        return getattr(self.op, op_type)(*inputs, **attributes)  # onnxscript counts outputs itself

    def ints(self, values):
        return self.op.Constant(value_ints=values) if isinstance(values, list) else self.op.Constant(value_int=values)

    def size(self, value, dim):
        return value.shape[dim]


def _register_dynamo_translation():
    from onnxscript import opset18
    from onnxscript.function_libs.torch_lib.registration import torch_op

    @torch_op("lstm_ext::forward", trace_only=True)
    def lstm_ext_forward(
        input, batch_sizes, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional, need_workspace,
        cell="lstm", cell_params=None, recurrent_dropout=0.0, zoneout=(),
    ):
        _check_exportable(batch_sizes is not None, cell, bool(cell_params), zoneout)
        graph = _OnnxScriptGraph(opset18)
        # Three outputs of four: nothing reads the workspace in an exported (inference) graph.
        return _layer_stack(graph, input, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional)


def register():
    """Registers the symbolic, and the translation once the dynamo exporter loads its registry, so
    that ``import lstm_ext`` (which calls this) does not import onnxscript (about a second) for an
    export that may never come. Without onnxscript there is no dynamo exporter."""
    torch.onnx.register_custom_op_symbolic("lstm_ext::forward", _torchscript_symbolic, TORCHSCRIPT_OPSET)
    if DYNAMO_REGISTRY_MODULE in sys.modules:
        _register_dynamo_translation()
    else:
        sys.meta_path.insert(0, _AfterImport(DYNAMO_REGISTRY_MODULE, _register_dynamo_translation))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after the module ``name`` is imported (Python has no hook for that)."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_module_then_callback(module):
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_module_then_callback
        return spec
