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


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to fp32 rounding of another summation order, as tests/test_distributed.py explains."""
    return torch.allclose(a, b, rtol=1e-5, atol=2e-5)


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


def make(case: tuple, world: World | None, shard: bool = False) -> tuple[torch.nn.Module, ChunkFT]:
    """shard: the weights sharded by FSDP2 first (executor.distributed.shard_model)."""
    _, tied, policy, k, opt, dtype = case
    model = tiny_llama(dtype, tied=tied)
    if shard:  # as chunkft-run does: every decoder layer, an untied embedding and head, the root
        from chunkft.executor.distributed import shard_model

        shard_model(model, world, "cpu")  # type: ignore[arg-type]
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


def train(
    case: tuple, world: World, steps: int, shard: bool = False
) -> tuple[torch.nn.Module, ChunkFT, list[float]]:
    """World size N: rank r takes the r-th N-th of each step's GLOBAL micro-batches, each loss scaled by
    1/(its count); the driver's mean over ranks then equals one rank accumulating all GLOBAL."""
    model, driver = make(case, world, shard)
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


# ------------------------------------------------- checkpoints across rank counts (test_checkpoint_ranks)
HALF = 3  # the checkpoint is written after this many steps


def continue_steps(model: torch.nn.Module, driver: ChunkFT, world: World, start: int, stop: int) -> None:
    for step in range(start, stop):
        micro = micro_batches(step, GLOBAL)
        per = len(micro) // world.size
        for b in micro[world.rank * per : (world.rank + 1) * per]:
            driver.backward(model(**b).loss / per)
        driver.step()


def save_at(out: Path, model: torch.nn.Module, driver: ChunkFT, world: World, step: int) -> Path:
    """A real checkpoint (executor/checkpoint.py): every rank writes its own rows of the states."""
    from chunkft.executor.checkpoint import CheckpointMeta, save_checkpoint

    small, shards = driver.sharded_state_dict()
    meta = CheckpointMeta(step, "model", "plan", 0, 0, world_size=world.size)
    return save_checkpoint(out, meta, model, {"driver": small}, shards=shards, world=world)


def resume_from(path: Path, case: tuple, world: World) -> tuple[torch.nn.Module, ChunkFT]:
    from chunkft.executor.checkpoint import load_checkpoint, states_reader

    model, driver = make(case, world)
    ckpt = load_checkpoint(path, model, model_fingerprint="model", plan_sha256="plan")
    driver.load_state_dict(ckpt.trainer["driver"], read=states_reader(path, world))
    return model, driver


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def one_rank_side(out: Path, phase: str) -> None:
    """phase "before": per case, 1 rank trains HALF steps, checkpoints, goes on to STEPS (the reference),
    and a raw 7-element state is saved for 2 ranks to read; "after": per case, 1 rank resumes from the
    2-rank checkpoint to STEPS, and reads the 2-rank raw state."""
    from chunkft.executor.checkpoint import states_reader
    from chunkft.executor.distributed import FlatShard

    one = World.single()
    for case in CASES:
        if phase == "before":
            model, driver = make(case, one)
            continue_steps(model, driver, one, 0, HALF)
            save_at(out / f"{case[0]}-one", model, driver, one, HALF)
            continue_steps(model, driver, one, HALF, STEPS)
            torch.save(params_of(model), out / f"{case[0]}-ref.pt")
        else:
            model, driver = resume_from(out / f"{case[0]}-two" / "checkpoints" / "step-000003", case, one)
            continue_steps(model, driver, one, HALF, STEPS)
            torch.save(params_of(model), out / f"{case[0]}-2to1.pt")
    if phase == "before":
        from chunkft.executor.checkpoint import CheckpointMeta, save_checkpoint

        raw = torch.arange(7, dtype=torch.float32) * 10
        meta = CheckpointMeta(1, "model", "plan", 0, 0)
        save_checkpoint(out / "raw-one", meta, torch.nn.Linear(1, 1), {}, shards={"a": FlatShard(raw, 7, 0)})
    else:
        got = torch.zeros(7)
        states_reader(out / "raw-two" / "checkpoints" / "step-000001")({"a": FlatShard(got, 7, 0)})
        torch.save(got, out / "raw-2to1.pt")


def across_worker(rank: int, size: int, port: int, out_dir: str) -> None:
    """On 2 ranks, per case: resume the 1-rank checkpoint and go on to STEPS; train HALF steps and
    checkpoint. Then a 7-element raw state (4 + 3 rows), and a save whose rank-0 part fails."""
    import errno

    from chunkft.executor import checkpoint as ck
    from chunkft.executor.distributed import FlatShard, shard_bounds

    out = Path(out_dir)
    world = _init(rank, size, port)
    try:
        for case in CASES:
            model, driver = resume_from(out / f"{case[0]}-one" / "checkpoints" / "step-000003", case, world)
            continue_steps(model, driver, world, HALF, STEPS)
            if world.is_main:
                torch.save(params_of(model), out / f"{case[0]}-1to2.pt")
            model, driver = make(case, world)
            continue_steps(model, driver, world, 0, HALF)
            save_at(out / f"{case[0]}-two", model, driver, world, HALF)
        lo, hi, per = shard_bounds(7, world)
        mine = torch.zeros(per)
        ck.states_reader(out / "raw-one" / "checkpoints" / "step-000001", world)(
            {"a": FlatShard(mine[: hi - lo], 7, lo)}
        )
        torch.save(mine, out / f"raw-1to2-rank{rank}.pt")
        rows = torch.arange(lo, hi, dtype=torch.float32)
        meta = ck.CheckpointMeta(1, "model", "plan", 0, 0, world_size=2)
        lin = torch.nn.Linear(1, 1)
        shards = {"a": FlatShard(rows, 7, lo)}
        ck.save_checkpoint(out / "raw-two", meta, lin, {}, shards=shards, world=world)
        # rank 0 fails after every rank's states are written: both ranks raise, step 1 stays the latest
        if world.is_main:

            def full(*_: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            ck._finish = full  # type: ignore[assignment]
        meta2 = ck.CheckpointMeta(2, "model", "plan", 0, 0, world_size=2)
        try:
            ck.save_checkpoint(out / "raw-two", meta2, lin, {}, shards=shards, world=world)
        except ck.CheckpointDiskFull as e:
            (out / f"full-rank{rank}.txt").write_text(str(e))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def release_worker(rank: int, size: int, port: int, out: str) -> None:
    """reduce_scatter_mean's result, and whether the collective's tensors are freed when it returns
    (saved by each rank for tests/test_distributed.py)."""
    from chunkft.executor import distributed as dist_

    world = _init(rank, size, port)
    try:
        res = {}
        for numel in (6, 7):  # a multiple of the rank count (reduced as it is) and one padded
            for in_place in (True, False):  # gloo's path and NCCL's (reduce_scatter_tensor)
                flat = torch.arange(numel, dtype=torch.float32) * (rank + 1)
                shard = dist_.reduce_scatter_mean(flat, world, in_place=in_place)
                res[numel, in_place] = (shard.clone(), flat.untyped_storage().nbytes())
        # what the reduce-scatter holds at its highest (tracked as a step is): the input and the shard, on
        # gloo's path; reduce_scatter_tensor's copy of the whole input on the other
        from chunkft.executor.measure import MemoryTracker

        for in_place in (True, False, None):  # None: the backend's default
            with MemoryTracker() as tracker:
                dist_.reduce_scatter_mean(torch.ones(1 << 16), world, in_place=in_place)
            res["peak", in_place] = tracker.peak_bytes()
        # the optimizer's all-gather of the updated rows, in real steps: what it was given and returned
        seen: list[torch.Tensor] = []
        gather = dist_.all_gather_flat

        def spy(shard: torch.Tensor, w: World) -> torch.Tensor:
            seen.append(shard)
            seen.append(gather(shard, w))
            return seen[-1]

        dist_.all_gather_flat = spy
        try:
            train(CASES[0], world, 2)
        finally:
            dist_.all_gather_flat = gather
        res["gathered bytes left"] = (len(seen), sum(t.untyped_storage().nbytes() for t in seen))
        dist.barrier()
        torch.save(res, Path(out) / f"release-{rank}.pt")
    finally:
        dist.destroy_process_group()
