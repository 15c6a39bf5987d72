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
from dp_workers import free_port
from fsdp_workers import WINDOWS, dense_window_grads, fsdp_worker
from tiny_models import tiny_llama

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

