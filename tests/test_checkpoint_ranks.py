"""Checkpoints across rank counts (issue 13 step 3): the windows' states are written with
torch.distributed.checkpoint, each rank its own rows, and read back on any rank count. A run checkpointed
on 1 rank and resumed on 2, or on 2 and resumed on 1, ends where the uninterrupted 1-rank run ends, for
every window kind (slices, whole tensors, tied embeddings, SGD), with accumulation and clipping.

Tolerance: as tests/test_distributed.py (2 ranks sum micro-batch gradients in another order than one
rank; |difference| <= 2e-5 + 1e-5 * |value|). A resume that loses a rank's rows (e.g. each rank reading
rows from 0) is off by whole AdamW steps, orders of magnitude above it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dp_workers import CASES, across_worker, close, free_port, one_rank_side

sys.path.insert(0, str(Path(__file__).parent))  # spawned children import dp_workers by module name


@pytest.fixture(scope="module")
def across(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("across")
    one_rank_side(out, "before")
    mp.spawn(across_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    one_rank_side(out, "after")
    return out


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_one_rank_checkpoint_resumes_on_two_and_two_on_one(across: Path, case: str) -> None:
    ref = torch.load(across / f"{case}-ref.pt", weights_only=True)
    for direction in ("1to2", "2to1"):
        got = torch.load(across / f"{case}-{direction}.pt", weights_only=True)
        for n, p in ref.items():
            assert close(p, got[n]), (direction, n, (p - got[n]).abs().max().item())


def test_each_rank_writes_only_its_own_rows(across: Path) -> None:
    ckpt = across / "slices-two" / "checkpoints" / "step-000003"
    states = sorted(p.name for p in (ckpt / "states").iterdir())
    assert ".metadata" in states
    sizes = [sum(p.stat().st_size for p in (ckpt / "states").glob(f"__{r}_*.distcp")) for r in (0, 1)]
    assert abs(sizes[0] - sizes[1]) < 0.1 * sizes[0]  # half the rows each, not everything on rank 0
    assert (ckpt / "trainer.pt").stat().st_size < sizes[0] / 10  # the states are not in trainer.pt
    import json

    files = json.loads((ckpt / "state.json").read_text())["files"]
    assert {f"states/{n}" for n in states} <= set(files)  # every states file is hashed and verified


def test_uneven_rows_reshard_both_ways(across: Path) -> None:
    """7 elements: 4 + 3 rows on 2 ranks, read by 1; one rank's 7 read by 2 (as 4 and 3 + padding)."""
    assert torch.load(across / "raw-2to1.pt", weights_only=True).tolist() == [0, 1, 2, 3, 4, 5, 6]
    r0 = torch.load(across / "raw-1to2-rank0.pt", weights_only=True).tolist()
    r1 = torch.load(across / "raw-1to2-rank1.pt", weights_only=True).tolist()
    assert r0 == [0, 10, 20, 30] and r1 == [40, 50, 60, 0]


def test_a_save_that_fails_on_rank_zero_fails_on_every_rank_and_keeps_the_last(across: Path) -> None:
    for rank in (0, 1):
        msg = (across / f"full-rank{rank}.txt").read_text()
        assert "disk full while writing checkpoint step-000002" in msg
        assert "the previous checkpoint step-000001 is intact" in msg
    root = across / "raw-two" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # no temporary left
