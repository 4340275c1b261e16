"""The Python half of each cell variant: its extra parameters per layer-direction.

The C++ half is the cell's struct in ``csrc/cells.h``, whose ``kName`` is the key here and whose
``kUnitWeights`` is the number of names. Each parameter has ``hidden_size`` values; its name in a
module gets nn.LSTM's suffix (``_l{k}``, then ``_reverse``). ``init`` gives the values a new
module starts from: ``None`` draws them like nn.LSTM's own weights, U(-1/sqrt(H), 1/sqrt(H)).

Layer norm wraps any of them: the operators' cell ``"layer_norm"`` is the plain cell
layer-normalised, ``"layer_norm+<cell>"`` another one. Its parameters come first, then the cell's.
"""

PARAMETERS = {
    "lstm": (),
    "peephole": (("weight_ci", None), ("weight_cf", None), ("weight_co", None)),
    "cifg": (),
}

LAYER_NORM = "layer_norm"
# (name, init, size in units of hidden_size): the gain of each of LN(x W_ihᵀ) and LN(h W_hhᵀ)
# over the 4H gate columns (no shift: the biases are the shift), and gain and shift of LN(c_t).
LAYER_NORM_PARAMETERS = (("ln_weight_ih", 1.0, 4), ("ln_weight_hh", 1.0, 4), ("ln_weight_c", 1.0, 1),
                         ("ln_bias_c", 0.0, 1))


def is_layer_normalised(cell: str) -> bool:
    return cell == LAYER_NORM or cell.startswith(LAYER_NORM + "+")


def split(cell: str) -> tuple[str, bool]:
    """(the cell inside, whether it is layer-normalised), checked: ValueError for an unknown cell."""
    layer_norm = is_layer_normalised(cell)
    inner = "lstm" if cell == LAYER_NORM else cell[len(LAYER_NORM) + 1 :] if layer_norm else cell
    if inner not in PARAMETERS:
        raise ValueError(
            f"lstm_ext: unknown cell {cell!r}; the cells are {', '.join(PARAMETERS)}, each also as {LAYER_NORM}+<cell>"
        )
    return inner, layer_norm


def join(cell: str, layer_norm: bool) -> str:
    """The operators' name of ``cell``, layer-normalised or not."""
    return (LAYER_NORM if cell == "lstm" else f"{LAYER_NORM}+{cell}") if layer_norm else cell


def parameters(cell: str) -> tuple[tuple[str, float | None, int], ...]:
    """(name, init, size in units of hidden_size) of each extra parameter of ``cell``, in order."""
    inner, layer_norm = split(cell)
    return (LAYER_NORM_PARAMETERS if layer_norm else ()) + tuple((name, init, 1) for name, init in PARAMETERS[inner])


def parameter_count(cell: str) -> int:
    """How many extra parameters each layer-direction of ``cell`` has."""
    return len(parameters(cell))
