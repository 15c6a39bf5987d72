"""Where chunkft-run keeps the inactive windows' host-tier states: pinned host memory (the plan's default)
or the disk tier (files under --state-dir, executor/state_files.py), and what each needs of the machine.

Why a choice of the run and not only of the plan: the trajectory is the same bit for bit either way
(tests/test_state_disk.py), so `--state-store disk` may run any host-tier plan on a machine with less RAM,
and a checkpoint of one resumes under the other.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from chunkft.chunks import chunk_numel
from chunkft.executor.distributed import World
from chunkft.executor.state_files import DiskTier

STATE_STORES: tuple[str, ...] = ("host", "disk")
DEFAULT_STATE_DIR = "state-files"  # under --output, so the output directory's lock covers it
GIB = 2**30


def state_store_for(plan: Any, requested: str | None) -> str:
    """--state-store when given, else the plan's placement.state_store; ValueError in one line when the
    plan keeps no states on the host tier for the disk to hold."""
    store = requested if requested is not None else plan.placement.state_store
    if store not in STATE_STORES:
        raise ValueError(f"--state-store {store!r} is unknown; use one of {', '.join(STATE_STORES)}")
    if store == "disk" and plan.placement.optimizer_states != "host":
        raise ValueError(
            "--state-store disk holds the host tier's states in files, but this plan keeps the optimizer "
            "states on the GPU; drop --state-store disk or re-plan with the states on the host"
        )
    return store


def disk_tier(output_dir: Path, requested_dir: Path | None, world: World) -> DiskTier:
    """The disk tier's files: --state-dir, by default <output>/state-files; a directory per rank under
    data parallel (each rank keeps only its shard of every window)."""
    base = Path(requested_dir) if requested_dir is not None else Path(output_dir) / DEFAULT_STATE_DIR
    return DiskTier(base / f"rank-{world.rank}" if world.parallel else base)


def _ranks(plan: Any) -> int:
    return plan.hardware.num_gpus if plan.hardware.parallel in ("data", "shard") else 1


def staging_host_bytes(plan: Any) -> int:
    """Pinned host bytes of the disk tier's staging buffers on one rank: (slots + 2) of the largest
    window's host-tier states (the plan's per-element host bytes times that window's elements)."""
    ranks = _ranks(plan)
    numels = [-(-chunk_numel(c, plan.chunk_table.params) // ranks) for c in plan.chunk_table.chunks]
    if not numels or sum(numels) == 0:
        return 0
    per_element = plan.predictions.host_bytes / sum(numels)
    slots = 2 if plan.placement.prefetch else 1
    return int(-(-(slots + 2) * max(numels) * per_element // 1))


def check_state_disk(tier: DiskTier, state_bytes: int) -> None:
    """Refuse before anything is built when the state directory's disk cannot take every window's files
    (they are created sparse, so a shortfall would otherwise surface at a write-back hours in)."""
    probe = tier.directory
    while not probe.exists():
        probe = probe.parent
    # files a previous run left there are replaced, which frees their space
    old = sum(p.stat().st_size for p in tier.directory.glob("chunk-*.bin")) if tier.directory.is_dir() else 0
    free = shutil.disk_usage(probe).free + old
    if state_bytes > free:
        raise ValueError(
            f"--state-dir {tier.directory}: the disk tier's files need {state_bytes / GIB:.2f} GiB and "
            f"{probe} has {free / GIB:.2f} GiB free; free space there or give --state-dir on a larger disk"
        )
