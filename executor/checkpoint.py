"""Atomic, verifiable training checkpoints, so a crash never leaves one that cannot be resumed from.

Layout under the run's output directory:

    checkpoints/step-000007/model.safetensors   model weights (shared/tied tensors stored once)
    checkpoints/step-000007/trainer.pt          driver state (rotation, schedule, step counts) and RNG
                                                states, loaded with weights_only=True
    checkpoints/step-000007/states/             every window's master rows and optimizer states, written
                                                with torch.distributed.checkpoint (DCP): files per rank
                                                (__<rank>_<n>.distcp) plus DCP's .metadata index
    checkpoints/step-000007/state.json          step, data position, plan/model identity, file sizes and
                                                sha256 digests (written last)
    checkpoints/latest                          the name of the newest complete checkpoint

The weights are streamed to disk tensor by tensor through one reused 64 MiB host buffer
(executor/safetensors_stream.py): a checkpoint adds that buffer, not a host copy of the whole model, to
the host memory the run already pins. The states go to DCP as they are (the host stores themselves):
under data parallel each rank writes only the rows it owns, so no rank ever gathers the whole, and a
resume on any rank count reads, per rank, the parts of the saved rows it needs (2 ranks -> 1, 1 -> 2).
Format 1 (before states/) kept the states inside trainer.pt; those checkpoints still load. On the disk tier
(--state-store disk) the states are mappings of the state files, which are only ever replaced, never
rewritten, so a mapping is a consistent snapshot: DCP copies them into states/ one file at a time, never
all in memory, and a resume fills new state files in place (mapped) and renames them in. A checkpoint
does not depend on the tier: either resumes under the other.

A checkpoint is written into a temporary sibling directory, every file fsynced, then os.replace'd into
place; `latest` is replaced atomically afterwards. Killing the writer at any instant leaves the previous
checkpoint and pointer intact; stale temporary directories are removed by the next save. A full disk
(ENOSPC, EDQUOT, or the file-size limit EFBIG) during a save removes the partial directory and raises
CheckpointDiskFull naming the previous checkpoint, which is untouched: old checkpoints are pruned only
after the new one and its pointer are in place. Loading verifies every file's size and digest and the
identity of the model and the plan.

Resuming (find_resume_point) takes `latest` when it names an intact checkpoint, else the newest intact
one, with a note saying why; state.json files written before a field existed load with its default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from chunkft.executor import distributed as dist_
from chunkft.executor.distributed import FlatShard, ReadShards, World
from chunkft.executor.safetensors_stream import (
    hf_tied_names,
    load_sharded_rows,
    model_tensors_for_save,
    save_safetensors_gathered,
    save_safetensors_streaming,
    sharded_tensors_for_save,
)
from chunkft.executor.state_files import fresh_load_mapping, fresh_mapping
from chunkft.files import fsync_dir, fsync_file, honour_umask

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: every window's states inside trainer.pt (chunkft before states/)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
STATES_DIR = "states"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the states files
TMP_MARK = ".tmp-"
_STEP_DIR = re.compile(r"step-[0-9]+")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or belongs to another model or plan; one line."""


class CheckpointDiskFull(CheckpointError):
    """The disk filled while a checkpoint was written; the partial one is gone, the previous one intact."""

    def __init__(self, step: int, previous: str | None, reason: str) -> None:
        self.step = step
        self.previous = previous  # the name `latest` still points at, or None when there is none
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous
            else "there is no earlier checkpoint"
        )
        super().__init__(f"disk full while writing checkpoint {checkpoint_name(step)} ({reason}); {kept}")


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
FULL_BELOW_BYTES = 1 << 20  # a failed write with less than this free is taken as a full disk


@dataclass(frozen=True)
class CheckpointMeta:
    """What identifies a checkpoint and where the run stood; the JSON part of it."""

    step: int  # optimizer steps completed
    model_fingerprint: str  # chunkft.plan_format.fingerprint of the trainable parameters
    plan_sha256: str  # chunkft.plan_format.plan_digest of the plan it was trained under
    data_epoch: int
    data_index: int
    consecutive_bad_steps: int = 0
    # the training data file's sha256 and size (None: written before chunkft recorded them)
    data_sha256: str | None = None
    data_bytes: int | None = None
    # the tokenizer's identity (executor.data Tokenizer.identity; None: written before it was recorded)
    tokenizer_sha256: str | None = None
    # chunkft.plan_format.trajectory_digest of the plan: another plan with the same one (e.g. the same run
    # for another rank count) may continue it. None: written before it was recorded (same plan only).
    trajectory_sha256: str | None = None
    world_size: int = 1  # the ranks that wrote it (any count can resume it)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its metadata and the trainer state; the weights are already in the model."""

    path: Path
    meta: CheckpointMeta
    trainer: dict[str, Any]  # {"driver": driver.state_dict(), "rng": rng_state(), "extra": {...}}


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from (dropout, sampling)."""
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    meta: CheckpointMeta,
    model: torch.nn.Module,
    trainer: dict[str, Any],
    keep: int = 2,
    *,
    shards: Mapping[str, FlatShard] | None = None,
    world: World | None = None,
) -> Path:
    """Write a complete checkpoint atomically, point `latest` at it, and keep only the newest `keep`.

    shards: this rank's rows of the windows' states (ChunkFT.sharded_state_dict), written with
    torch.distributed.checkpoint into states/. With a parallel `world` every rank calls this (a
    collective): each writes and hashes its own states file; rank 0 writes everything else. A failure on
    any rank raises on every rank, and only rank 0 touches the directory layout, so the protocol is the
    one-rank one: temporary directory, fsync, rename, pointer.
    """
    world = World.single() if world is None else world
    shards = {} if shards is None else shards
    root = Path(output_dir) / CHECKPOINTS
    final = root / checkpoint_name(meta.step)
    need = tensor_bytes(model.state_dict()) + tensor_bytes(trainer) + _global_bytes(shards)
    # 1. rank 0 makes the temporary directory unless the disk is already too small; every rank learns it
    begun: tuple[str, str | None, str | None] = ("", None, None)  # (tmp name, previous, why refused)
    if world.is_main:
        begun = _begin(root, final, meta.step, need)
    name, previous, refused = dist_.broadcast_object(begun, world, checkpoint=True)
    if refused is not None:
        raise CheckpointDiskFull(meta.step, previous, refused)
    tmp = root / name
    try:
        # 2. every rank: its rows of the states (DCP raises on every rank when any rank's write failed)
        try:
            _save_states(tmp / STATES_DIR, shards, world)
        except CheckpointException as e:
            raise _unwrapped(e) from None
        sharded = is_sharded(model)
        if sharded:  # FSDP2: every rank gathers each weight in turn, rank 0 writes the file
            tensors, metadata = sharded_tensors_for_save(model)
            save_safetensors_gathered(tensors, tmp / MODEL_FILE, metadata, write=world.is_main)
            del tensors
        mine = _digests(tmp, _own_state_files(tmp, world))
        files = {k: v for d in dist_.all_gather_objects(mine, world, checkpoint=True) for k, v in d.items()}
        # 3. rank 0: the weights, the trainer state, state.json; rename into place; the pointer
        failure: tuple[bool, str] | None = None  # (disk full, why)
        if world.is_main:
            try:
                _finish(root, final, tmp, meta, None if sharded else model, trainer, files)
            except BaseException as e:
                failure = (_full(e, root), _reason(e) if _full(e, root) else _one_line(e))
                if not world.parallel:
                    raise
        failure = dist_.broadcast_object(failure, world, checkpoint=True)
        if failure is not None:
            full, why = failure
            if full:
                raise CheckpointDiskFull(meta.step, previous, why)
            raise CheckpointError(f"checkpoint {final.name} was not written: rank 0 failed ({why})")
    except BaseException as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointError) or not _full(e, root):
            raise
        raise CheckpointDiskFull(meta.step, previous, _reason(e)) from e
    if world.is_main:
        _prune(root, keep)
    return final


def _begin(root: Path, final: Path, step: int, need: int) -> tuple[str, str | None, str | None]:
    """Rank 0: (the temporary directory's name, the checkpoint `latest` names, why the disk cannot take
    this one or None). Stale temporaries of a killed writer go first."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    previous, free = _pointer(root), shutil.disk_usage(root).free
    tmp = root / f"{final.name}{TMP_MARK}{os.getpid()}"
    if need > free:  # a lower bound of the files' size: this write cannot succeed, do not start it
        return tmp.name, previous, f"needs over {need:,} bytes, {free:,} free"
    tmp.mkdir()
    return tmp.name, previous, None


def _finish(
    root: Path,
    final: Path,
    tmp: Path,
    meta: CheckpointMeta,
    model: torch.nn.Module | None,
    trainer: dict[str, Any],
    files: dict[str, dict],
) -> None:
    """Rank 0, after every rank's states are on disk: the rest of the files, then rename and pointer.
    model None: the weights file is written already (sharded weights, gathered by every rank)."""
    if model is not None:
        tensors, metadata = model_tensors_for_save(model)
        save_safetensors_streaming(tensors, tmp / MODEL_FILE, metadata)  # no host copy of the model
        del tensors
    torch.save(trainer, tmp / TRAINER_FILE)
    names = [MODEL_FILE, TRAINER_FILE]
    if (tmp / STATES_DIR).is_dir():
        names.append(f"{STATES_DIR}/{DCP_METADATA}")  # written by rank 0, the coordinator
    files = {**files, **_digests(tmp, names)}
    for name in files:
        fsync_file(tmp / name)
    state = {"format_version": FORMAT_VERSION, **meta.__dict__, "files": dict(sorted(files.items()))}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    fsync_file(tmp / STATE_FILE)
    if (tmp / STATES_DIR).is_dir():
        fsync_dir(tmp / STATES_DIR)
    fsync_dir(tmp)
    honour_umask(tmp)  # as if created by mkdir/open, whatever the writers used
    if final.exists():  # a re-save of the same step: move the old copy aside, never delete it first
        aside = root / f"{final.name}{TMP_MARK}old-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_atomically(root / LATEST, final.name + "\n")
    fsync_dir(root)


def _prune(root: Path, keep: int) -> None:
    """Old checkpoints go only after the new one and its pointer are in place."""
    for old in sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and TMP_MARK not in p.name),
        key=lambda p: int(p.name.removeprefix("step-")),  # numeric: step-1000000 comes after step-999999
    )[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----- the windows' states: torch.distributed.checkpoint, resharded to any rank count on load ------------
def _save_states(directory: Path, shards: Mapping[str, FlatShard], world: World) -> None:
    if not shards:
        return
    # A file per flat state: DCP keeps a file's tensors until it closes, so one state's alias is alive at a
    # time (an alias costs no memory, but a tracker counting storages would see each as a copy).
    writer = dcp.FileSystemWriter(directory, single_file_per_rank=False, sync_files=True, thread_count=1)
    with _one_rank_is_meant():
        dcp.save(
            _as_saved(shards, world),
            storage_writer=writer,
            planner=_AliasingSavePlanner(),
            process_group=_group(world),
            no_dist=not world.parallel,
        )


class _AliasingSavePlanner(DefaultSavePlanner):
    """DCP's default planner, handing the writer each state as a tensor whose storage is exactly its
    bytes. The host stores are views of one pinned block, and DCP writes a view of a larger storage from
    a clone, holding the clones until the file closes: with one file per rank, a second copy of all the
    states (measured: +1.0 GiB of RSS saving 1 GiB of views; +1 MiB with aliases). The disk tier's states
    are mappings of its files (executor/state_files.py snapshot()), whose pages would stay in the process
    until the save ends once read: each is handed over as a fresh mapping, released after its file."""

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        if not isinstance(data, Tensor) or data.device.type != "cpu" or data.numel() == 0:
            return data
        fresh = fresh_mapping(data)  # the disk tier: one state file's pages in memory at a time
        if fresh is not None:
            return fresh
        if data.untyped_storage().nbytes() == data.nbytes or not data.is_contiguous():
            return data
        return torch.frombuffer(data.view(torch.uint8).numpy(), dtype=data.dtype)  # same memory


@contextlib.contextmanager
def _one_rank_is_meant() -> Iterator[None]:
    """DCP warns at every single-process save and load that it assumes one process: here it is asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def states_reader(path: Path, world: World | None = None) -> ReadShards:
    """What ChunkFT.load_state_dict fills this rank's rows of the states with, from a checkpoint's states/
    written on any number of ranks (DCP reads, for each rank, the parts of the saved rows it needs)."""
    world = World.single() if world is None else world

    def load(shards: Mapping[str, FlatShard]) -> None:
        with _one_rank_is_meant():
            dcp.load(
                _as_saved(shards, world),
                storage_reader=dcp.FileSystemReader(path / STATES_DIR),
                process_group=_group(world),
                no_dist=not world.parallel,
            )

    def read(shards: dict[str, FlatShard]) -> None:
        # The disk tier's targets are mapped state files: each is read through a fresh mapping of its
        # own, dropped after its key, so a resume never holds every file's pages at once (the same keys
        # on every rank, in the same order: the loads stay collective).
        fresh = {k: fresh_load_mapping(s.local) for k, s in shards.items()}
        try:
            plain = {k: s for k, s in shards.items() if fresh[k] is None}
            if plain:
                load(plain)
            for k in sorted(k for k in shards if fresh[k] is not None):
                s, mapped = shards[k], fresh.pop(k)
                load({k: FlatShard(mapped, s.numel, s.start)})
                del mapped
        except (CheckpointException, RuntimeError, OSError, ValueError) as e:
            cause = _unwrapped(e) if isinstance(e, CheckpointException) else e
            raise CheckpointError(
                f"{path / STATES_DIR}: cannot load the optimizer states ({_one_line(cause)}); the "
                "checkpoint does not fit this run's windows"
            ) from None

    return read


def _as_saved(shards: Mapping[str, FlatShard], world: World) -> dict[str, Tensor]:
    """Plain tensors on one rank; else DTensors sharded on dim 0 over the checkpoint group, whose split
    (torch.chunk's) is the FlatShards' own, so DCP records each rank's offset and can reshard."""
    if not world.parallel:
        for k, s in shards.items():
            if s.start != 0 or s.local.numel() != s.numel:
                raise ValueError(f"{k}: a single rank holds only {s.local.numel()} of {s.numel} elements")
        return {k: s.local for k, s in shards.items()}
    for k, s in shards.items():  # DCP infers each rank's offset from the split: it must be this one
        lo, hi, _ = dist_.shard_bounds(s.numel, world)
        if (s.start, s.local.numel()) != (lo, hi - lo):
            got = f"[{s.start}, {s.start + s.local.numel()})"
            raise ValueError(f"{k}: rank {world.rank} holds {got}, not [{lo}, {hi})")
    mesh = DeviceMesh.from_group(_group(world) or dist.group.WORLD, "cpu")
    return {
        k: DTensor.from_local(
            s.local, mesh, [Shard(0)], run_check=False, shape=torch.Size([s.numel]), stride=(1,)
        )
        for k, s in shards.items()
    }


def _group(world: World) -> Any:
    return dist_.group_for(world, checkpoint=True) if world.parallel else None


def _own_state_files(tmp: Path, world: World) -> list[str]:
    """The states files this rank wrote (DCP names them __<rank>_<n>.distcp, n counting its files)."""
    directory = tmp / STATES_DIR
    if not directory.is_dir():
        return []
    return sorted(f"{STATES_DIR}/{p.name}" for p in directory.glob(f"__{world.rank}_*.distcp"))


def _digests(tmp: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names}


def _global_bytes(shards: Mapping[str, FlatShard]) -> int:
    """Bytes of the whole states the shards are rows of (what all ranks write together)."""
    return sum(s.numel * s.local.element_size() for s in shards.values())


def export_safetensors(model: torch.nn.Module, directory: Path, world: World | None = None) -> Path:
    """Write a Hugging Face model directory (model.safetensors, config.json, generation_config.json when
    the model generates) that from_pretrained loads, streaming the weights like a checkpoint does.

    Replaces model.save_pretrained, which copies every weight to the host before writing. Like it, this
    records the dtype and architecture in the config and keeps the name from_pretrained expects of each
    tied group; unlike it, the weights go into one unsharded file, written in place (swap the directory
    in for atomicity). Returns `directory`.
    """
    directory = Path(directory)
    if is_sharded(model):  # FSDP2: a collective; every rank gathers each weight, rank 0 writes
        world = World.single() if world is None else world
        tensors, _ = sharded_tensors_for_save(model, discard_names=hf_tied_names(model))
        if world.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        save_safetensors_gathered(tensors, directory / MODEL_FILE, {"format": "pt"}, write=world.is_main)
        del tensors
        if not world.is_main:
            return directory
    else:
        directory.mkdir(parents=True, exist_ok=True)
        tensors, _ = model_tensors_for_save(model, discard_names=hf_tied_names(model))
        save_safetensors_streaming(tensors, directory / MODEL_FILE, {"format": "pt"})  # as save_pretrained
        del tensors
    config = getattr(model, "config", None)
    if config is not None:
        dtype = getattr(model, "dtype", None)  # PreTrainedModel.dtype: its first floating parameter's
        if isinstance(dtype, torch.dtype):
            config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
    can_generate = getattr(model, "can_generate", None)
    if getattr(model, "generation_config", None) is not None and callable(can_generate) and can_generate():
        model.generation_config.save_pretrained(directory)
    return directory


def latest_checkpoint(output_dir: Path) -> Path:
    """The directory `latest` points at; CheckpointError (what is wrong with the pointer) otherwise."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"{output_dir}: no checkpoint to resume from ({pointer} is missing)")
    name = pointer.read_text().strip()
    if not name.startswith("step-") or "/" in name or not (root / name).is_dir():
        raise CheckpointError(f"{pointer}: points at {name!r}, which is not a checkpoint directory")
    return root / name


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint directories under output_dir, newest (highest step) first; temporaries excluded.
    Complete means renamed into place, which happens only after every file is written: not verified."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")), reverse=True)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a resumed run starts from, verified, and why it is not `latest` when it is not."""

    path: Path
    meta: CheckpointMeta
    note: str | None = None


class NoCheckpoint(CheckpointError):
    """There is no checkpoint at all to resume from (the run stopped before writing its first)."""


class NoIntactCheckpoint(CheckpointError):
    """Checkpoints exist, none is intact (or the one asked for is not): `newest` is the best other choice."""

    def __init__(self, message: str, newest: str | None) -> None:
        self.newest = newest
        super().__init__(message)


def find_resume_point(output_dir: Path, choice: str | None = None) -> ResumePoint:
    """The checkpoint to resume from: `choice` (step-N, or a checkpoint directory's path) when given,
    else the one `latest` names, else (latest missing, dangling or corrupt) the newest intact one.
    Every candidate is verified with read_meta (sizes and sha256 of every file)."""
    if choice is not None:
        return _chosen(Path(output_dir), choice)
    candidates = complete_checkpoints(output_dir)
    if not candidates:
        raise NoCheckpoint(f"--output {output_dir} has no checkpoints to resume from")
    try:
        latest = latest_checkpoint(output_dir)
    except CheckpointError:
        latest, why = None, _pointer_problem(Path(output_dir) / CHECKPOINTS)
    if latest is not None:
        try:
            return ResumePoint(latest, read_meta(latest))
        except CheckpointError as e:
            why = f"{CHECKPOINTS}/{latest.name} (the latest) is corrupt ({_corruption(e)})"
    problems = [why]
    for path in candidates:
        if latest is not None and path == latest:
            continue
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            problems.append(f"{path.name} is corrupt ({_corruption(e)})")
            continue
        why = "; ".join(problems)
        return ResumePoint(path, meta, f"{why}; resuming from {path.name}, the newest intact checkpoint")
    raise NoIntactCheckpoint(
        f"{Path(output_dir) / CHECKPOINTS} holds no intact checkpoint: {'; '.join(problems)}", None
    )


def _chosen(output_dir: Path, choice: str) -> ResumePoint:
    """--resume-from: a step-N name under output_dir's checkpoints, or a checkpoint directory's path."""
    root = output_dir / CHECKPOINTS
    if _STEP_DIR.fullmatch(choice) or choice.isdigit():
        path = root / checkpoint_name(int(choice.removeprefix("step-")))
    else:
        path = Path(choice)
    if not (path / STATE_FILE).is_file():
        raise NoIntactCheckpoint(
            f"--resume-from {choice}: {path} is not a checkpoint (no {STATE_FILE}); "
            f"{_listing(output_dir)}",
            _newest_intact(output_dir),
        )
    try:
        return ResumePoint(path, read_meta(path))
    except CheckpointError as e:
        raise NoIntactCheckpoint(
            f"--resume-from {choice}: {path.name} is corrupt ({_corruption(e)})", _newest_intact(output_dir)
        ) from None


def _listing(output_dir: Path) -> str:
    names = [p.name for p in complete_checkpoints(output_dir)]
    return f"{output_dir / CHECKPOINTS} holds {', '.join(names)}" if names else "there are no checkpoints"


def _newest_intact(output_dir: Path) -> str | None:
    for path in complete_checkpoints(output_dir):
        try:
            read_meta(path)
        except CheckpointError:
            continue
        return path.name
    return None


def _pointer_problem(root: Path) -> str:
    """Why `latest` names no checkpoint, in a few words."""
    pointer = root / LATEST
    if not pointer.is_file():
        return f"{CHECKPOINTS}/{LATEST} is missing"
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return f"{CHECKPOINTS}/{LATEST} is unreadable"
    return f"{CHECKPOINTS}/{LATEST} points at {name!r}, which is not a checkpoint directory"


def _corruption(e: CheckpointError) -> str:
    """read_meta's message without the path it starts with: what is wrong with the files."""
    text = str(e)
    head, _, rest = text.partition(": ")
    return f"{Path(head).name}: {rest}" if rest else text


def read_meta(path: Path) -> CheckpointMeta:
    """Parse and verify a checkpoint directory's state.json and file digests."""
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        files = state.pop("files")
        version = state.pop("format_version")
        meta = CheckpointMeta(**state)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{state_path}: unreadable checkpoint state ({type(e).__name__}); the checkpoint is corrupt"
        ) from None
    if version not in READABLE_FORMATS:
        readable = " and ".join(map(str, READABLE_FORMATS))
        raise CheckpointError(f"{path}: checkpoint format {version}, this chunkft reads {readable}")
    for name, info in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: missing or does not match its recorded size/sha256")
    return meta


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    *,
    model_fingerprint: str,
    plan_sha256: str | tuple[str, ...],
    trajectory_sha256: str | None = None,
    meta: CheckpointMeta | None = None,
) -> Checkpoint:
    """Verify a checkpoint against this model and plan, load its weights into the model, return the rest.
    plan_sha256: the plan's digest, or every digest a checkpoint of it may carry
    (chunkft.plan_format.plan_digests). trajectory_sha256: the plan's trajectory_digest; a checkpoint
    written under another plan with the same trajectory (another rank count) is accepted too.
    meta: read_meta(path) already done (find_resume_point), so the files are not hashed twice."""
    meta = read_meta(path) if meta is None else meta
    if meta.model_fingerprint != model_fingerprint:
        raise CheckpointError(
            f"{path}: belongs to another model (fingerprint {meta.model_fingerprint[:12]}, "
            f"this model {model_fingerprint[:12]}); use its own output directory"
        )
    accepted = (plan_sha256,) if isinstance(plan_sha256, str) else plan_sha256
    same_run = trajectory_sha256 is not None and meta.trajectory_sha256 == trajectory_sha256
    if meta.plan_sha256 not in accepted and not same_run:
        raise CheckpointError(
            f"{path}: was written under another plan (plan sha256 {meta.plan_sha256[:12]}, "
            f"this plan {accepted[0][:12]}); resume with the plan it was made with"
        )
    if is_sharded(model):  # FSDP2: each rank reads the rows of its shards
        try:
            missing = load_sharded_rows(model, [path / MODEL_FILE], dist.get_rank(), dist.get_world_size())
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{path / MODEL_FILE}: cannot load the weights ({_one_line(e)}); the checkpoint does not "
                "fit this model"
            ) from None
        unexpected = []
    else:
        missing, unexpected = _load_whole(model, path)
    if missing or unexpected:
        raise CheckpointError(
            f"{path / MODEL_FILE}: tensors do not match the model (missing {sorted(missing)[:3]}"
            f", unexpected {sorted(unexpected)[:3]})"
        )
    try:
        # mmap: the host states are read page by page into the driver's stores, not held twice in RAM.
        trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle that weights_only refuses or a truncated archive
        raise CheckpointError(
            f"{path / TRAINER_FILE}: cannot load the trainer state ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return Checkpoint(path=path, meta=meta, trainer=trainer)


def _load_whole(model: torch.nn.Module, path: Path) -> tuple[list[str], list[str]]:
    try:
        return load_model(model, str(path / MODEL_FILE), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{path / MODEL_FILE}: cannot load the weights ({e}); the checkpoint does not fit this model"
        ) from None


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (fully_shard) holds the model's weights as DTensors, each rank its rows."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensors in a nested state (a tied tensor counts once, as saved)."""
    seen: dict[tuple[int, int], int] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.device.type != "meta":
                seen[(x.data_ptr(), x.numel())] = x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sum(seen.values())


def _full(e: BaseException, root: Path) -> bool:
    """A failed write that a full disk explains: its errno, or little free space after an opaque error
    (torch.save reports a full disk as a RuntimeError)."""
    return _no_space(e) or (
        isinstance(e, (OSError, RuntimeError, SafetensorError))
        and shutil.disk_usage(root).free < FULL_BELOW_BYTES
    )


def _unwrapped(e: CheckpointException) -> BaseException:
    """The first rank's own exception inside DCP's collective one."""
    failures = sorted(e.failures.items())
    return failures[0][1][0] if failures else e


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _no_space(e: BaseException) -> bool:
    """OSError from our own writes, or the RuntimeError torch.save / safetensors wrap it in."""
    while e is not None:
        if isinstance(e, CheckpointException):
            e = _unwrapped(e)
            continue
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if isinstance(e, (OSError, RuntimeError, SafetensorError)) and any(
            s in str(e) for s in ("No space left on device", "Disk quota exceeded", "File too large")
        ):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def _reason(e: BaseException) -> str:
    while e is not None:
        if isinstance(e, CheckpointException):
            e = _unwrapped(e)
            continue
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return "No space left on device"


def _pointer(root: Path) -> str | None:
    """The checkpoint `latest` names, if it names one that exists."""
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return name if name.startswith("step-") and (root / name).is_dir() else None


def _remove_stale_temporaries(root: Path) -> None:
    for p in root.iterdir():
        if TMP_MARK in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)




def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
