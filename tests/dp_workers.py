"""Worker functions for tests/test_distributed.py: each runs in one of 2 gloo processes (spawned)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_models import VOCAB, tiny_llama

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec, SGDHparams
from chunkft.executor.distributed import World

# (name, tied embeddings, partition policy, chunks, optimizer, weights dtype)
CASES = [
    ("slices", False, "rows", 3, "adamw", torch.float32),
    ("whole", False, "whole", 3, "adamw", torch.float32),
    ("tied", True, "rows", 4, "adamw", torch.float32),
    ("sgd", False, "rows", 3, "sgd", torch.float32),
]
STEPS = 6
GLOBAL = 4  # micro-batches per optimizer step, over all ranks (2 ranks: accumulation 2 each)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_batches(step: int, n: int) -> list[dict[str, torch.Tensor]]:
    """The step's n global micro-batches (of different lengths, so token counts differ per batch)."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (2, 10 + i), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def make(case: tuple, world: World | None) -> tuple[torch.nn.Module, ChunkFT]:
    _, tied, policy, k, opt, dtype = case
    model = tiny_llama(dtype, tied=tied)
    hp = (
        AdamWHparams(lr=1e-2, weight_decay=0.01) if opt == "adamw" else SGDHparams(lr=5e-2, weight_decay=0.01)
    )
    chunks = partition(param_specs(model), num_chunks=k, policy=policy)
    driver = ChunkFT(
        model,
        chunks,
        hparams=hp,
        schedule=ScheduleSpec("linear", warmup_steps=2, total_steps=20),
        rotation=RotationSpec("random", update_interval=2, seed=3),
        max_grad_norm=0.3,  # small: clipping is active on most steps
        world=world,
    )
    return model, driver


def train(case: tuple, world: World, steps: int) -> tuple[torch.nn.Module, ChunkFT, list[float]]:
    """World size N: rank r takes the r-th N-th of each step's GLOBAL micro-batches, each loss scaled by
    1/(its count); the driver's mean over ranks then equals one rank accumulating all GLOBAL."""
    model, driver = make(case, world)
    norms = []
    for step in range(steps):
        micro = micro_batches(step, GLOBAL)
        per = len(micro) // world.size
        for b in micro[world.rank * per : (world.rank + 1) * per]:
            driver.backward(model(**b).loss / per)
        norms.append(driver.step().grad_norm)
    return model, driver, norms


def reference(out: Path, world_size: int = 2) -> None:
    """One rank accumulating every micro-batch of each step (no process group)."""
    for case in CASES:
        model, driver, norms = train(case, World.single(), STEPS)
        torch.save(_result(model, driver, norms), out / f"{case[0]}-ref.pt")


def _result(model: torch.nn.Module, driver: ChunkFT, norms: list[float]) -> dict:
    state = driver.state_dict()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "norms": norms,
        "state": state,
    }


def _init(rank: int, size: int, port: int, timeout_s: float = 60) -> World:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    from chunkft.executor.distributed import init_from_env

    return init_from_env("cpu", timeout_s=timeout_s)


def equality_worker(rank: int, size: int, port: int, out: str) -> None:
    """Every case on this rank; rank 0 saves weights, norms and the gathered driver state; then a resume:
    the 1-rank-format state saved after 3 steps, loaded by both ranks, continues to the same end."""
    world = _init(rank, size, port)
    try:
        for case in CASES:
            model, driver, norms = train(case, world, STEPS)
            res = _result(model, driver, norms)
            params = res["params"]
            same = [torch.equal(a, b) for a, b in zip(params.values(), _other(params, world), strict=True)]
            res["ranks_agree"] = all(same)
            if world.is_main:
                torch.save(res, Path(out) / f"{case[0]}-dp.pt")
            # resume on the same world size from a 3-step state, through a saved file like checkpoint.py
            m1, d1, _ = train(case, world, 3)
            state = {"model": m1.state_dict(), "driver": d1.state_dict()}
            path = Path(out) / f"{case[0]}-mid.pt"
            if world.is_main:
                torch.save(state, path)
            dist.barrier()
            saved = torch.load(path, weights_only=True)
            m2, d2 = make(case, world)
            m2.load_state_dict(saved["model"])
            d2.load_state_dict(saved["driver"])
            for step in range(3, STEPS):
                micro = micro_batches(step, GLOBAL)
                per = len(micro) // world.size
                for b in micro[world.rank * per : (world.rank + 1) * per]:
                    d2.backward(m2(**b).loss / per)
                d2.step()
            if world.is_main:
                torch.save(
                    {n: p.detach().clone() for n, p in m2.named_parameters()}, Path(out) / f"{case[0]}-res.pt"
                )
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _other(params: dict[str, torch.Tensor], world: World) -> list[torch.Tensor]:
    """Rank 0's parameters on this rank (to check the ranks hold identical weights)."""
    box = [params if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return list(box[0].values())
