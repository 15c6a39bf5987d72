"""FSDP2 (torch.distributed.fsdp.fully_shard) on 2 gloo processes, CPU: what issue 13 step 2 builds on.

ChunkFT changes which parameters train between windows, after the model is sharded, and cuts row slices
that autograd never sees as parameters. Checked here: toggling requires_grad between windows after
fully_shard is honoured (gradients for exactly the window's tensors, equal to dense autograd), the whole
tensors' gradients arrive reduce-scattered as each rank's dim-0 rows (the shape of chunkft's slices, so
a rank can keep master and states for its own rows), and SliceGradients' row slices work on FSDP's
unsharded weights. Tolerance: fp32, 2 ranks average their halves of the batch (another summation
order than one process): 1e-6 relative.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dp_workers import CASES, STEPS, free_port, train
from fsdp_workers import WINDOWS, chunkft_fsdp_worker, dense_window_grads, fsdp_worker
from tiny_models import tiny_llama

from chunkft.executor.distributed import World

sys.path.insert(0, str(Path(__file__).parent))  # spawned children import fsdp_workers by module name


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(fsdp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out / "fsdp.pt", weights_only=True)


@pytest.mark.parametrize("i", range(len(WINDOWS)))
def test_fsdp2_gives_the_window_and_only_the_window_its_dense_gradients(sharded: list[dict], i: int) -> None:
    window = WINDOWS[i]
    got = sharded[i]["got"]
    assert set(got) == {n for n, _, _ in window}
    rows = {n: p.shape[0] for n, p in tiny_llama().named_parameters()}
    whole = {n for n, a, b in window if (a, b) == (0, rows[n])}
    assert sharded[i]["trainable"] == sorted(whole)  # the slice's weight stays frozen (SliceGradients)
    assert sharded[i]["stray"] == []  # no other tensor got a gradient (SliceGradients took the window's)
    ref = dense_window_grads(window)
    for name, (kind, local_shape, g) in got.items():
        if name in whole:
            assert kind == "sharded" and local_shape[0] == g.shape[0] // 2  # this rank's half of the rows
        else:
            assert kind == "local"  # computed by SliceGradients on the unsharded weight
        assert torch.allclose(g, ref[name], rtol=1e-6, atol=1e-8), (name, (g - ref[name]).abs().max())



@pytest.fixture(scope="module")
def chunkft_sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-chunkft")
    mp.spawn(chunkft_fsdp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_chunkft_on_fsdp2_sharded_weights_equals_one_unsharded_rank(chunkft_sharded: Path, case: str) -> None:
    """The driver on a fully_shard-ed model (2 ranks, each its half of every step's micro-batches) ends
    where one unsharded rank accumulating all of them ends, for slices, whole tensors, tied embeddings and
    SGD, with clipping. Tolerance as tests/test_distributed.py (2e-5 + 1e-5 * |value|)."""
    got = torch.load(chunkft_sharded / f"{case}-fsdp.pt", weights_only=True)
    model, _, norms = train(next(c for c in CASES if c[0] == case), World.single(), STEPS)
    assert got["norms"] == pytest.approx(norms, rel=1e-5)
    for n, p in model.named_parameters():
        q = got["params"][n]
        assert torch.allclose(p, q, rtol=1e-5, atol=2e-5), (n, (p - q).abs().max())
