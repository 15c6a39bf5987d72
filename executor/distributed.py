"""torch.distributed for the executor: the process group, the collectives data parallel needs, and checks.

Data parallel (issue 13 step 1): every rank runs the whole model on its own micro-batches; after backward
the active window's gradients, flattened in the chunk's layout order, are reduce-scattered so each rank
owns 1/N of the window's flat elements, updates them from its own fp32 master and states (host memory
per rank ~1/N), and all-gathers the updated rows back into every rank's weights. DDP cannot do this:
its reducer sees only `.grad` of a fixed set of trainable parameters, and slice gradients never reach
`.grad`.

Checkpoints (executor/checkpoint.py) go through torch.distributed.checkpoint on `World.checkpoint_group`:
each rank writes its own rows of every window's states (FlatShard), and a load on any rank count reads
the rows it needs, so no rank ever gathers the whole.

World size 1 never touches torch.distributed: `World.single()` is a plain value and every caller keeps
today's code path for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# a dead rank turns into an error on the others within this, not a hang; CHUNKFT_COLLECTIVE_TIMEOUT_S
# overrides it (the tests use a few seconds)
DEFAULT_TIMEOUT_S = float(os.environ.get("CHUNKFT_COLLECTIVE_TIMEOUT_S", "180"))
# Writing and hashing a large checkpoint keeps rank 0 away for longer than a training step's collectives
# may wait: the checkpoint group waits this many times the collective timeout.
CHECKPOINT_TIMEOUT_FACTOR = 10
# global_sq_norm squares this many elements at a time in fp64 (16 bytes each, for the copy and its square)
NORM_PIECE = 1 << 20


class DistributedError(RuntimeError):
    """One line: what went wrong between the ranks and what to do."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; size 1 needs no process group."""

    rank: int = 0
    size: int = 1
    group: Any = None  # None: the default group (or no group at all when size == 1)
    # gloo, on CPU tensors, with CHECKPOINT_TIMEOUT_FACTOR x the timeout: what checkpoints collect over
    # (the host states are CPU tensors; with nccl they would be copied to the GPU). None: `group`.
    checkpoint_group: Any = None

    @staticmethod
    def single() -> World:
        return World(0, 1, None)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes run.json, checkpoints, exports and logs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def launched_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """The World torchrun described in RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.

    gloo on the CPU, nccl on CUDA. The timeout bounds every collective, so a killed rank makes the others
    fail with an error instead of waiting forever. Failures become one DistributedError line.
    """
    size = launched_size()
    if size <= 1:
        return World.single()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), None)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={size} but {', '.join(missing)} is not set; "
            f"launch with torchrun --nproc-per-node {size}"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - any init failure is reported as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"could not start the {backend} process group ({first}); check MASTER_ADDR/MASTER_PORT "
            "and that every rank was launched"
        ) from None
    slow = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s * CHECKPOINT_TIMEOUT_FACTOR))
    return World(dist.get_rank(), dist.get_world_size(), None, slow)


def shutdown(world: World) -> None:
    if world.parallel and dist.is_initialized():
        dist.destroy_process_group()


def shutdown_any() -> None:
    """Tear down the process groups on any way out, errors included: groups left to interpreter exit can
    abort the process (SIGABRT) as the other ranks disconnect, instead of exiting with its error code."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class FlatShard:
    """This rank's elements [start, start + local.numel()) of a flat state of `numel` elements: what a
    checkpoint saves per rank and reshards on load. The split is shard_bounds', which is torch.chunk's
    (a DTensor's Shard(0)), so any rank count can read it back."""

    local: Tensor
    numel: int
    start: int


# fills the `local` tensors of the FlatShards it is given (a checkpoint reader, executor/checkpoint.py)
ReadShards = Callable[[dict[str, FlatShard]], None]


def shard_model(model: torch.nn.Module, world: World, device_type: str) -> None:
    """FSDP2 (hardware.parallel "shard"): fully_shard every decoder layer (transformers'
    GradientCheckpointingLayer), an untied embedding and head (untied_units), then the root (the rest),
    over all ranks. Each rank
    keeps dim-0 rows 1/N of every tensor (torch.chunk's split, as shard_bounds'), a block's weights are
    gathered for its forward and backward, gradients reduce-scattered in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise DistributedError(
            f"{type(model).__name__} has no transformers decoder layers to shard; plan it data parallel"
        )
    mesh = init_device_mesh(device_type, (world.size,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    embedding, head = untied_units(model)
    if embedding is not None and head is not None:
        # FSDP2 keeps the root whole from its forward to the end of the backward: units of their own, an
        # untied embedding is gathered for its forward (and backward) only, the head from its forward to
        # its backward (not resharded in between: chunked cross-entropy calls it once per piece). On
        # Llama-3-70B that is 3.9 GiB less per GPU through the backward (planner.simulator.root_bytes).
        fully_shard(embedding, mesh=mesh, mp_policy=policy)
        fully_shard(head, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def untied_units(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(input embedding, head) of a causal LM whose head is not tied to its embedding; else (None, None)
    (tied: one parameter, which must stay in one FSDP unit; classifiers: no output embeddings)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embedding is None or head is None or getattr(head, "weight", None) is getattr(embedding, "weight", 0):
        return None, None
    return embedding, head


def local_rows(t: Tensor, world: World) -> tuple[Tensor, int, int]:
    """(this rank's local tensor, its first row, one past its last) of a weight FSDP2 sharded on dim 0
    (torch.chunk's split, which is shard_bounds'); ValueError when the local shard says otherwise."""
    local = t.to_local()  # type: ignore[attr-defined]
    r0, r1, _ = shard_bounds(t.shape[0], world)
    if local.shape[0] != r1 - r0:
        raise ValueError(f"the local shard has {local.shape[0]} rows, not {r1 - r0}")
    return local, r0, r1


def shard_bounds(numel: int, world: World) -> tuple[int, int, int]:
    """(start, stop, per): this rank's flat range [start, stop) of a window of `numel` elements, and the
    padded shard length `per` (numel rounded up to a multiple of N, divided by N). The last ranks' ranges
    may be short or empty; their shard tensors are still `per` long (zero padding)."""
    per = -(-numel // world.size)
    start = min(world.rank * per, numel)
    return start, min(start + per, numel), per


def release(*tensors: Tensor) -> None:
    """Free these tensors' memory now, for a caller done with them after a collective. A finished
    collective's Work can still hold its tensors from the backend's thread (gloo drops its references
    only after it has marked the work complete), so a plain `del` may leave them alive into the step's
    next allocation: under load the flat gradient outlived the reduce-scatter into the norm and rank 0's
    peak rose 12% above the plan in 2 of 3 runs. Safe on CUDA too: later kernels on the compute stream,
    which waited for the collective, are the only ones the freed blocks can be handed to."""
    for t in tensors:
        t.untyped_storage().resize_(0)


def reduce_scatter_mean(flat: Tensor, world: World, *, in_place: bool | None = None) -> Tensor:
    """This rank's shard of the mean over ranks of `flat` (padded to N*per): SUM then divide by N, so 2
    ranks on micro-batches A and B give the gradient of 1 rank accumulating A and B. A `flat` of a
    multiple of N elements (the caller padded it) is reduced as it is, without a padded copy. `flat` is
    consumed: it may be overwritten, and its memory is released on return (see release).

    in_place (default: on gloo): all-reduce `flat` itself and keep this rank's part. gloo's
    reduce_scatter_tensor all-reduces a copy of the whole input inside its work object, which gloo's
    thread frees at a moment of its own: pinned to one CPU, that copy outlived the collective into the
    norm in 2 runs of 4 (rank 0 +12% above the plan). The same traffic, no copy. NCCL reduce-scatters
    natively (half an all-reduce's traffic); tests run that path on gloo too."""
    per = -(-flat.numel() // world.size)
    if flat.numel() == per * world.size:
        padded = flat
    else:
        padded = torch.zeros(per * world.size, dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()].copy_(flat)
    if in_place is None:
        in_place = dist.get_backend(world.group) == "gloo"
    if in_place:
        dist.all_reduce(padded, group=world.group)
        out = padded[world.rank * per : (world.rank + 1) * per].clone()
    else:
        out = torch.empty(per, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, padded, group=world.group)
    release(flat, padded)
    return out.div_(world.size)


def all_gather_flat(shard: Tensor, world: World) -> Tensor:
    """Every rank's shard, concatenated in rank order (length N*per)."""
    out = torch.empty(shard.numel() * world.size, dtype=shard.dtype, device=shard.device)
    dist.all_gather_into_tensor(out, shard.contiguous(), group=world.group)
    return out


def gather_flat_to_main(shard: Tensor, numel: int, world: World) -> Tensor | None:
    """Rank 0: the full flat tensor (first `numel` of the ranks' shards in order); others: None. Used by
    ChunkFT.state_dict() (one object in the one-rank format; checkpoints save per rank instead).
    Gathered in fp32 (exact for bf16)."""
    src = shard.float().contiguous()
    parts = [torch.empty_like(src) for _ in range(world.size)] if world.is_main else None
    dist.gather(src, parts, dst=0, group=world.group)
    if parts is None:
        return None
    return torch.cat(parts)[:numel].to(shard.dtype)


def all_reduce_sum(value: Tensor, world: World) -> Tensor:
    dist.all_reduce(value, group=world.group)
    return value


def global_sq_norm(shard: Tensor, world: World) -> Tensor:
    """The squared 2-norm over every rank's shard, summed in fp64 (so skipping a non-finite step is
    decided identically on every rank: they all see the same all-reduced value)."""
    sq = torch.zeros(1, dtype=torch.float64, device=shard.device)
    for piece in shard.split(NORM_PIECE):  # fp64 copies of one piece at a time, not of the whole shard
        sq += piece.double().pow(2).sum()
    return all_reduce_sum(sq, world)


def fingerprint_of(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def check_same(world: World, what: dict[str, str]) -> None:
    """All-gather each rank's (name -> fingerprint) and refuse, on every rank, if any differs.

    Run at start, before anything is written: ranks launched with different plans or data would otherwise
    train silently different models."""
    if not world.parallel:
        return
    theirs: list[Any] = [None] * world.size
    dist.all_gather_object(theirs, dict(what), group=world.group)
    for name in what:
        values = [t.get(name) for t in theirs]
        if len(set(values)) > 1:
            ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise DistributedError(
                f"the ranks disagree on the {name} ({ranks}); launch every rank with the same files"
            )


def barrier(world: World) -> None:
    if world.parallel:
        dist.barrier(group=world.group)


def group_for(world: World, checkpoint: bool = False) -> Any:
    """The process group a collective runs on: the checkpoint group (gloo, patient) for checkpoints."""
    return world.checkpoint_group if checkpoint and world.checkpoint_group is not None else world.group


def broadcast_object(obj: Any, world: World, *, checkpoint: bool = False) -> Any:
    """Rank 0's object on every rank."""
    if not world.parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group_for(world, checkpoint))
    return box[0]


def all_gather_objects(obj: Any, world: World, *, checkpoint: bool = False) -> list[Any]:
    """Every rank's object, in rank order."""
    if not world.parallel:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj, group=group_for(world, checkpoint))
    return out
