"""lstm_ext.LSTM under DistributedDataParallel: 2 gloo processes on 127.0.0.1 train like one.

Each rank trains on its half of every batch; DDP averages the gradients, so with a mean loss
(equal halves) the ranks end with the parameters one process gets training native nn.LSTM on
the whole batches. Every wait is bounded, so a broken rendezvous fails the test, never hangs it.
"""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import HIDDEN_SIZE, INPUT_SIZE, PROJ_SIZE, SEQ_LEN, compare, make_input, make_lstm_pair
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lstm_ext

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

DTYPE = torch.float64
CONFIG = dict(num_layers=2, bidirectional=True, proj_size=PROJ_SIZE, batch_first=True)
WORLD_SIZE = 2
BATCH_PER_RANK = 2
STEPS = 3
LEARNING_RATE = 0.5
RENDEZVOUS_TIMEOUT = timedelta(seconds=60)
JOIN_TIMEOUT_S = 120
# A cell variant with parameters of its own, in eval: zoneout's constants, no random masks, so
# that the ranks' halves compute what the whole batch does.
VARIANT = dict(peephole=True, zoneout=(0.2, 0.1))


def make_model(variant):
    """lstm_ext.LSTM with CONFIG (and the variant), the same in every process."""
    if not variant:
        return make_lstm_pair(**CONFIG)[1]
    torch.manual_seed(0)
    return lstm_ext.LSTM(INPUT_SIZE, HIDDEN_SIZE, **CONFIG, **variant).to(DTYPE).eval()


def batches():
    """STEPS (input, target) pairs of WORLD_SIZE * BATCH_PER_RANK sequences, the same in every process."""
    torch.manual_seed(1)
    batch = WORLD_SIZE * BATCH_PER_RANK
    return [
        (make_input(DTYPE, batch=batch, batch_first=True), torch.randn(batch, SEQ_LEN, 2 * PROJ_SIZE, dtype=DTYPE))
        for _ in range(STEPS)
    ]


def train(model, batches):
    """STEPS of SGD on the mean squared error of the LSTM output; returns the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for input, target in batches:
        optimizer.zero_grad()
        output, _ = model(input)
        nn.functional.mse_loss(output, target).backward()
        optimizer.step()
    return {name.removeprefix("module."): p.detach() for name, p in model.named_parameters()}


def train_rank(rank, store_port, result_dir, variant):
    """One DDP process: trains lstm_ext.LSTM on its shard, saves its parameters."""
    torch.set_num_threads(1)  # two processes share the machine's cores
    store = dist.TCPStore("127.0.0.1", store_port, WORLD_SIZE, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=RENDEZVOUS_TIMEOUT)
    try:
        ext = make_model(variant)
        shard = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        parameters = train(DistributedDataParallel(ext), [(x[shard], y[shard]) for x, y in batches()])
        torch.save(parameters, result_dir / f"rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank destroying its group while the
        # other's transfers are in flight can abort the other ("terminate called without an
        # active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(result_dir, variant=None):
    """Spawns the WORLD_SIZE ranks around a store this process hosts (the OS picks its free
    port); fails if they do not all finish within JOIN_TIMEOUT_S."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT)
    context = mp.start_processes(
        train_rank, args=(store.port, result_dir, variant), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"DDP ranks did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_ddp_training_matches_single_process_on_the_whole_batch(tmp_path):
    run_ranks(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    native, _ = make_lstm_pair(**CONFIG)
    initial = {name: p.detach().clone() for name, p in native.named_parameters()}
    expected = train(native, batches())

    for rank_parameters in ranks[1:]:
        assert all(torch.equal(rank_parameters[name], ranks[0][name]) for name in expected), "ranks diverged"
    assert not any(torch.equal(ranks[0][name], initial[name]) for name in expected), "a parameter did not train"
    compare(ranks[0], expected, msg="DDP parameters vs one process on the whole batch")


@pytest.mark.parametrize("variant", [VARIANT, dict(VARIANT, layer_norm=True)], ids=["peephole", "layer_norm"])
def test_ddp_trains_a_cell_variant_like_one_process(tmp_path, variant):
    run_ranks(tmp_path, variant)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    expected = train(make_model(variant), batches())
    assert "weight_co_l1_reverse" in expected
    compare(ranks[0], expected, msg="DDP parameters vs one process on the whole batch")
    compare(ranks[1], expected, msg="DDP parameters vs one process on the whole batch")
