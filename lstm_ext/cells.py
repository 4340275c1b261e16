"""The Python half of each cell variant: its extra parameters per layer-direction.

The C++ half is the cell's struct in ``csrc/cells.h``, whose ``kName`` is the key here and whose
``kUnitWeights`` is the number of names. Each parameter has ``hidden_size`` values; its name in a
module gets nn.LSTM's suffix (``_l{k}``, then ``_reverse``). ``init`` gives the values a new
module starts from: ``None`` draws them like nn.LSTM's own weights, U(-1/sqrt(H), 1/sqrt(H)).
"""

PARAMETERS = {
    "lstm": (),
    "peephole": (("weight_ci", None), ("weight_cf", None), ("weight_co", None)),
    "cifg": (),
}


def parameter_count(cell: str) -> int:
    """How many extra parameters each layer-direction of ``cell`` has."""
    if cell not in PARAMETERS:
        raise ValueError(f"lstm_ext: unknown cell {cell!r}; the cells are {', '.join(PARAMETERS)}")
    return len(PARAMETERS[cell])
