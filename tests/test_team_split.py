"""Shapes big enough for the recurrent loop to split a step's hidden units between threads.

The rest of the suite uses tiny shapes, which run each direction on one thread. Here a step has
enough work that every thread of torch's pool takes a slice of the units (and of the projection
columns), meeting at a barrier each step; the hidden sizes are not multiples of the vector width,
so the slices have ragged edges.
"""

import itertools

import pytest
import torch

from conftest import assert_matches_native, make_hx, make_input, make_lstm_pair

# The smallest step, with the projection, is 4·75·13·61 = 238k multiply-adds: enough for two
# threads (layer.h's kMinStepWorkPerThread).
INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE, SEQ_LEN, BATCH = 20, 75, 13, 6, 61


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "bidirectional, proj_size, packed",
    list(itertools.product((False, True), (0, PROJ_SIZE), (False, True))),
    ids=lambda value: str(value),
)
def test_split_steps_match_native(num_threads, dtype, bidirectional, proj_size, packed):
    native, ext = make_lstm_pair(
        dtype=dtype,
        input_size=INPUT_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_layers=2,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    input = make_input(dtype, seq_len=SEQ_LEN, batch=BATCH, input_size=INPUT_SIZE)
    hx = make_hx(native, dtype, batch=BATCH)
    lengths = torch.randint(1, SEQ_LEN + 1, (BATCH,), generator=torch.Generator().manual_seed(0)) if packed else None
    assert_matches_native(native, ext, input, hx, lengths=lengths)
