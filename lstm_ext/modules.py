"""``LSTM`` and ``LSTMCell``: ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` running lstm_ext's operator.

Only ``forward`` differs, and only in which operator it calls. Each ``forward`` here *is* the
installed torch's own ``forward`` code (argument validation, error messages, unbatched input,
omitted ``hx``, ``PackedSequence`` sorting), run with its ``_VF`` global pointing at
:mod:`lstm_ext.functional` instead of ``torch._VF``. Parameters, initialisation, ``state_dict``
and ``repr`` are inherited. So the module matches native by construction, not by a copy of it.
"""

import types

from torch import nn, serialization
from torch.nn.modules import rnn as _native_rnn

from . import functional

_VF = types.SimpleNamespace(lstm=functional.lstm, lstm_cell=functional.lstm_cell)


def _with_lstm_ext_ops(native_forward):
    """``native_forward``'s code, calling lstm_ext where it called ``torch._VF``."""
    forward = types.FunctionType(
        native_forward.__code__,
        {**vars(_native_rnn), "_VF": _VF},
        native_forward.__name__,
        native_forward.__defaults__,
        native_forward.__closure__,
    )
    forward.__doc__ = native_forward.__doc__
    forward.__qualname__ = native_forward.__qualname__
    return forward


class LSTM(nn.LSTM):
    """Drop-in for :class:`torch.nn.LSTM` (same constructor, parameters and ``state_dict``)."""

    forward = _with_lstm_ext_ops(nn.LSTM.forward)


class LSTMCell(nn.LSTMCell):
    """Drop-in for :class:`torch.nn.LSTMCell`."""

    forward = _with_lstm_ext_ops(nn.LSTMCell.forward)


# torch.load's default (weights_only) unpickler builds only allow-listed classes. A script that
# allow-lists nn.LSTM to load a whole-model checkpoint must load it with these drop-ins in it too.
serialization.add_safe_globals([LSTM, LSTMCell])
