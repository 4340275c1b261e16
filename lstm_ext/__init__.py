"""lstm_ext: torch.nn.LSTM as a C++/ATen extension with a hand-written backward.

``lstm_ext.LSTM`` / ``lstm_ext.LSTMCell`` are drop-ins for the ``torch.nn`` modules;
``lstm_ext.lstm`` / ``lstm_ext.lstm_cell`` for ``torch._VF.lstm`` / ``torch.lstm_cell``;
``lstm_ext.quantize_dynamic`` for ``torch.ao.quantization.quantize_dynamic`` (see lstm_ext.quantized).
"""

from ._extension import import_operators, load

# The compiled module, prebuilt or JIT-built: lstm_ext._C either way.
_C = import_operators()

from .functional import lstm, lstm_cell  # noqa: E402  (needs the operators registered)
from .modules import LSTM, LSTMCell  # noqa: E402
from .onnx import register as _register_onnx_export  # noqa: E402
from . import quantized  # noqa: E402
from .quantized import QuantizedLSTM, QuantizedLSTMCell, quantize_dynamic  # noqa: E402

_register_onnx_export()

__all__ = ["LSTM", "LSTMCell", "lstm", "lstm_cell", "load", "quantize_dynamic", "QuantizedLSTM", "QuantizedLSTMCell"]
__version__ = "0.1.0"
