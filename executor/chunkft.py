"""The ChunkFT driver: one window of the parameter stream trains per optimizer step.

It ties the parts together on an unmodified model: SliceGradients gives exact gradients for the active
window only (nothing else holds gradients), ChunkedOptimizer updates that window from fp32 master rows and
states, the TransferEngine brings the next window's states in while the current one computes, the LR
schedule advances every optimizer step, and the rotation picks the next window.

Typical loop (gradient accumulation: scale each micro-batch loss by 1/accum and call backward per
micro-batch, then step once):

    driver = ChunkFT(model, chunks, hparams=AdamWHparams(lr=1e-4), schedule=..., rotation=...)
    for batch in batches:
        driver.backward(model(**batch).loss)
        stats = driver.step()
    driver.close()

A task head, norms or biases can train on every step beside the window: partition the other parameters
and pass `always_active=names`. Under a torch LR scheduler or a Trainer-style loop, drive it through
executor.optimizer_face.ChunkFTOptimizer(driver) (the scheduler then owns the learning rate).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from chunkft.chunks import Chunk
from chunkft.executor import distributed as dist_
from chunkft.executor.always_active import AlwaysActive
from chunkft.executor.devices import CudaInfo, resolve_device, same_device
from chunkft.executor.distributed import FlatShard, ReadShards, World
from chunkft.executor.optimizer import (
    AdamWHparams,
    ChunkedOptimizer,
    HostStateDtype,
    Hparams,
    SGDHparams,
    StatesOn,
    WeightDecayMode,
    check_weight_decay_mode,
    clip_,
    grad_norm,
)
from chunkft.executor.rotation import Rotation, RotationSpec, windows_reached
from chunkft.executor.schedule import ScheduleSpec, lr_at
from chunkft.executor.slicegrad import SliceGradients
from chunkft.executor.state_files import DiskTier
from chunkft.executor.streams import Streams
from chunkft.executor.transfer import TransferEngine

__all__ = [
    "AdamWHparams",
    "ChunkFT",
    "RotationSpec",
    "SGDHparams",
    "ScheduleSpec",
    "StepStats",
]

STATE_VERSION = 1


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    chunk: int  # the window updated (or that would have been, when skipped)
    lr: float
    grad_norm: float  # 2-norm of window + always-active gradients before clipping (inf/nan when skipped)
    skipped: bool  # non-finite gradient norm: no update, same window, schedule not advanced
    transfer_wait_s: float  # seconds the host blocked on this window's state copy


class ChunkFT:
    """Trains one chunk of the model's parameters per optimizer step (see the module docstring).

    Non-finite gradient norm: the step is skipped (no weights or states change), the gradients are still
    cleared, and neither the schedule nor the rotation advance, so the same window retries on the next
    batch with the same learning rate.

    Prefetch: right after the update of window c the driver writes c's states back and starts copying
    the newly activated window's states into the freed slot, so both copies overlap the next forward and
    backward; the update waits for them (StepStats.transfer_wait_s). With state_slots=2 the window after
    that is also prefetched, one step earlier, into a second slot: more slack for a slow host link, one more
    window of fp32 states on the device. prefetch_order names the windows in the order the plan expects
    them (the one following the active window in it is the one prefetched into the second slot); None
    follows the rotation itself (exact also for the random order); an empty sequence disables prefetching
    (every copy is synchronous, at the update). A wrong order only costs a synchronous copy, never
    correctness.

    always_active names whole parameters trained on every step on top of the window (a task head, norms,
    biases: executor/always_active.py), with their own fp32 states resident on the device, the same lr,
    schedule and weight decay, and one clipping norm over window and always-active gradients together.
    A name that is also in a chunk is refused rather than silently taken out of it: the chunk table is the
    plan's (its bytes and memory prediction), so the caller partitions the other parameters instead, e.g.
    partition([s for s in param_specs(model) if s.name not in names], ...). Single process only for now
    (refused under data parallel).

    start_chunk is the first window trained (None: the order's first, 0 bottom-up and K-1 top-down); the
    rotation continues from its place in the order (bottom-up from 3 of 8: 3, 4, ..., 7, 0, 1, ...; a
    random order's first cycle is then the rest of its permutation). load_state_dict() restores the saved
    position instead. When schedule.total_steps optimizer steps at rotation.update_interval steps per visit
    cannot reach every window, a UserWarning names the windows and parameters that would never train and
    what to change.
    """

    def __init__(
        self,
        model: nn.Module,
        chunks: Sequence[Chunk],
        *,
        hparams: Hparams,
        schedule: ScheduleSpec,
        rotation: RotationSpec,
        host_state_dtype: HostStateDtype = "float32",
        states_on: StatesOn = "host",
        max_grad_norm: float | None = None,
        device: torch.device | str | None = None,
        prefetch_order: Sequence[int] | None = None,
        state_slots: int = 1,
        weight_decay_mode: WeightDecayMode = "window",
        streams: Streams | None = None,
        cuda: CudaInfo | None = None,
        world: World | None = None,
        always_active: Sequence[str] = (),
        start_chunk: int | None = None,
        disk: DiskTier | None = None,  # host states in files under disk.directory (the disk tier)
    ) -> None:
        chunks = tuple(chunks)
        if not chunks:
            raise ValueError("ChunkFT needs at least one chunk; partition the model's parameters first")
        for i, c in enumerate(chunks):
            if c.index != i:
                raise ValueError(
                    f"chunks[{i}].index is {c.index}; chunks must be given in index order 0..K-1"
                )
        if not isinstance(schedule, ScheduleSpec):
            raise TypeError(f"schedule must be a ScheduleSpec, got {type(schedule).__name__}")
        if not isinstance(rotation, RotationSpec):
            raise TypeError(f"rotation must be a RotationSpec, got {type(rotation).__name__}")
        if state_slots not in (1, 2):
            raise ValueError(f"state_slots must be 1 or 2, got {state_slots}")
        check_weight_decay_mode(weight_decay_mode)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        params = dict(model.named_parameters())
        _check_chunks(chunks, params)
        used = [params[sl.name] for c in chunks for sl in c.slices]
        # `cuda` stands in for this machine's GPUs in the tests (an unindexed "cuda" is the current one)
        device = resolve_device(used[0].device if device is None else device, cuda)
        names = [sl.name for c in chunks for sl in c.slices]
        wrong = [n for n in names if not same_device(params[n].device, device, cuda)]
        if wrong:
            raise ValueError(
                f"parameter {wrong[0]!r} is on {params[wrong[0]].device}, not {device}; move the model"
            )
        if prefetch_order is not None:
            prefetch_order = tuple(int(i) for i in prefetch_order)
            bad = [i for i in prefetch_order if not 0 <= i < len(chunks)]
            if bad:
                raise ValueError(f"prefetch_order names chunk {bad[0]}, but there are {len(chunks)} chunks")
        world = world if world is not None else World.single()
        always = _check_always_active(always_active, chunks, params, device, cuda, world)

        self.model = model
        self.chunks = chunks
        self.hparams = hparams
        self.schedule = schedule
        self.max_grad_norm = max_grad_norm
        self.world = world
        self._prefetch_order = prefetch_order
        self._prefetch = prefetch_order is None or len(prefetch_order) > 0
        self._slicegrad = SliceGradients(model)
        self._slicegrad.check_supported(chunks)
        self._optimizer = ChunkedOptimizer(
            params,
            chunks,
            hparams,
            host_state_dtype=host_state_dtype,
            states_on=states_on,
            device=device,
            state_slots=state_slots,
            # "compensated": each window is updated 1/K of the time, so it decays K steps' worth per update
            decay_steps=len(chunks) if weight_decay_mode == "compensated" else 1,
            streams=streams,
            world=self.world,
            disk=disk,
        )
        self._rotation = Rotation(rotation, len(chunks), start_chunk=start_chunk)
        _warn_unreached(chunks, rotation, schedule.total_steps, start_chunk)
        self._schedule_step = 0
        self._closed = False
        self._always = AlwaysActive(params, always, hparams, device)  # registers gradient hooks
        try:
            self._activate(self._rotation.current())
        except BaseException:
            self._always.close()  # a refused driver leaves no hook behind
            raise

    # ----- the public loop -----------------------------------------------------------------------------
    @property
    def active_chunk(self) -> Chunk:
        """The window that gets gradients now."""
        return self.chunks[self._rotation.current()]

    @property
    def always_active(self) -> tuple[str, ...]:
        """The parameters trained on every step beside the window."""
        return self._always.names

    def always_active_bytes(self) -> int:
        """Device bytes of the always-active tensors' fp32 states and masters (for memory reports)."""
        return self._always.device_bytes()

    @property
    def schedule_step(self) -> int:
        """Optimizer steps taken (skipped ones excluded): the schedule's position."""
        return self._schedule_step

    @property
    def engine(self) -> TransferEngine:
        """The transfer engine (read-only use: memory accounting and reports)."""
        return self._optimizer.engine

    @property
    def engine_slot_bytes(self) -> int:
        """Device bytes of the fp32 state slots (state_slots windows at most), for memory reports."""
        return self._optimizer.engine.slot_bytes()

    def host_state_bytes(self) -> int:
        """Bytes of the optimizer states and master copies kept in host memory."""
        return self._optimizer.engine.store_bytes("host")

    def lr(self) -> float:
        """The learning rate the next step() will use."""
        return lr_at(self.schedule, self.hparams.lr, self._schedule_step)

    def backward(self, loss: Tensor) -> None:
        """Accumulate the active window's gradients (scale the loss by 1/accumulation before calling)."""
        self._check_open()
        loss.backward()

    def step(self, lr: float | None = None) -> StepStats:
        """Clip and apply the accumulated window (and always-active) gradients, then advance schedule and
        rotation. `lr`: this step's learning rate instead of the schedule's (executor/optimizer_face.py
        passes its param group's, set by a torch LR scheduler)."""
        self._check_open()
        if lr is None:
            lr = self.lr()
        elif isinstance(lr, bool) or not isinstance(lr, int | float) or not lr >= 0:
            raise ValueError(f"step(lr=...) must be a number >= 0, got {lr!r}")
        lr = float(lr)
        chunk = self._rotation.current()
        grads = self._slicegrad.window_grads()
        if self.world.parallel:
            return self._step_parallel(chunk, lr, grads)
        extra = self._always.grads()
        every = list(grads.values()) + list(extra.values())
        norm = grad_norm(every)  # one norm over window and always-active gradients
        norm_value = float(norm)  # one host sync per step: skipping is decided on the host
        if not math.isfinite(norm_value):
            self.discard_grads()
            return StepStats(chunk, lr, norm_value, True, 0.0)
        if self.max_grad_norm is not None:
            clip_(every, norm, self.max_grad_norm)
        wait_s = self._optimizer.update(chunk, grads, lr)
        self._always.update(extra, lr)
        self._after_update(chunk)
        return StepStats(chunk, lr, norm_value, False, wait_s)

    def _step_parallel(self, chunk: int, lr: float, grads: dict[str, Tensor]) -> StepStats:
        """Data parallel step: reduce-scatter the window's flat gradient (mean over ranks), global clip
        norm from the all-reduced fp64 sum of squares, update this rank's shard, all-gather the rows."""
        layout = self._optimizer.layouts[chunk]
        device = self._optimizer.engine.device
        # padded to N*per already, so the reduce-scatter takes it as it is (no padded copy of the window)
        per = self._optimizer.bounds[chunk][2]
        flat = torch.zeros(per * self.world.size, dtype=torch.float32, device=device)
        present = torch.zeros(len(layout), dtype=torch.float32, device=device)
        for i, s in enumerate(layout):
            g = grads.get(s.slice.name)
            if g is not None:
                # Sharded weights (FSDP2): their gradient arrives reduce-scattered, this rank's rows of the
                # mean over ranks; made whole it is the same on every rank, and the mean below keeps it.
                g = g.full_tensor() if isinstance(g, DTensor) else g
                flat[s.offset : s.offset + s.numel].copy_(g.reshape(-1))
                present[i] = 1.0
        # a slice that got a gradient on any rank is updated on all (its gradient is zero on the others)
        present = dist_.all_reduce_sum(present, self.world)
        shard = dist_.reduce_scatter_mean(flat, self.world)  # consumes flat (its memory is released)
        del flat
        norm = dist_.global_sq_norm(shard, self.world).sqrt().to(torch.float32).reshape(())
        norm_value = float(norm)  # the same on every rank, so every rank skips the same steps
        if not math.isfinite(norm_value):
            self._slicegrad.zero_grad()
            return StepStats(chunk, lr, norm_value, True, 0.0)
        if self.max_grad_norm is not None:
            clip_([shard], norm, self.max_grad_norm)
        wait_s = self._optimizer.update_shard(chunk, shard, [bool(x > 0) for x in present.tolist()], lr)
        self._after_update(chunk)
        return StepStats(chunk, lr, norm_value, False, wait_s)

    def _after_update(self, chunk: int) -> None:
        """Clear the gradients and advance the schedule; at the end of a visit write the window's states
        back and activate the next window (the same on one rank and on many)."""
        self.discard_grads()
        self._schedule_step += 1
        if self._rotation.advance():
            self._optimizer.engine.write_back(chunk)
            self._slicegrad.deactivate()
            self._activate(self._rotation.current())
            self._optimizer.begin_window(self._rotation.current())

    def discard_grads(self) -> None:
        """Drop the gradients accumulated since the last step (a step abandoned half-way, e.g. on OOM)."""
        self._slicegrad.zero_grad()
        self._always.zero_grad()

    def close(self) -> None:
        """Restore the model (every module and requires_grad flag) and finish pending copies."""
        if self._closed:
            return
        self._always.close()
        self._slicegrad.deactivate()
        self._optimizer.engine.synchronize()
        self._closed = True

    # ----- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the model weights needed to continue exactly: rotation position, schedule step,
        every chunk's states, step counts and master copies. Plain containers and tensors only, so it loads
        with torch.load(weights_only=True). Take it between steps (accumulated gradients are not saved).
        Data parallel: a collective (every rank calls it); the whole windows' states land on rank 0 only
        (the other ranks' optimizer engine entry is None), in the same format as one rank's."""
        return self._state(self._optimizer.state_dict())

    def sharded_state_dict(self) -> tuple[dict, dict[str, FlatShard]]:
        """For a distributed checkpoint: state_dict() without the windows' flat states, and this rank's
        rows of them by key (executor/checkpoint.py saves them with torch.distributed.checkpoint, so no
        rank gathers the whole and any rank count can resume). Not a collective."""
        small, shards = self._optimizer.sharded_state_dict()
        return self._state(small), shards

    def _state(self, optimizer: dict) -> dict:
        state = {
            "version": STATE_VERSION,
            "optimizer_kind": type(self.hparams).__name__,
            "chunks": [[[sl.name, sl.row_start, sl.row_end] for sl in c.slices] for c in self.chunks],
            "rotation": self._rotation.state_dict(),
            "schedule_step": self._schedule_step,
            "optimizer": optimizer,
        }
        if self._always.names:  # absent without them: states saved before always_active load unchanged
            state["always_active"] = self._always.state_dict()
        return state

    def load_state_dict(self, state: dict, read: ReadShards | None = None) -> None:
        """Continue from a state_dict() of a driver built with the same chunks and optimizer kind, or from
        a sharded_state_dict() saved on any rank count: then `read` fills this rank's rows of each key."""
        self._check_open()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"driver state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["optimizer_kind"] != type(self.hparams).__name__:
            raise ValueError(
                f"driver state is for {state['optimizer_kind']}, this run uses {type(self.hparams).__name__}"
            )
        mine = [[[sl.name, sl.row_start, sl.row_end] for sl in c.slices] for c in self.chunks]
        theirs = [[[str(n), int(a), int(b)] for n, a, b in c] for c in state["chunks"]]
        if theirs != mine:
            raise ValueError("driver state was saved with a different chunk table; resume with the same plan")
        always = state.get("always_active", {"names": []})
        if [str(n) for n in always["names"]] != list(self._always.names):
            raise ValueError(
                f"driver state was saved with always_active {list(always['names'])}, this driver has "
                f"{list(self._always.names)}; resume with the same always_active names"
            )
        if state["optimizer"]["engine"].get("sharded"):
            if read is None:
                raise ValueError("this driver state keeps the windows' states apart: pass `read` for them")
            self._optimizer.load_sharded_state_dict(state["optimizer"], read)
        else:
            self._optimizer.load_state_dict(state["optimizer"])
        if self._always.names:
            self._always.load_state_dict(always)
        self._rotation.load_state_dict(state["rotation"])
        self._schedule_step = int(state["schedule_step"])
        self._slicegrad.deactivate()
        self._activate(self._rotation.current())

    # ----- internals -----------------------------------------------------------------------------------
    def _activate(self, chunk: int) -> None:
        """Give `chunk` gradients and start copying its states and the next window's."""
        self._slicegrad.activate(self.chunks[chunk])
        self._always.arm()  # activate() froze everything outside the window
        if self._prefetch:
            upcoming = self._prefetch_after(chunk)
            self._optimizer.engine.prefetch(chunk, *([] if upcoming is None else [upcoming]))

    def _prefetch_after(self, chunk: int) -> int | None:
        order = self._prefetch_order
        if order is None:
            return self._rotation.upcoming()
        if chunk not in order:
            return order[0] if order[0] != chunk else None
        i = order.index(chunk)
        following = [order[(i + j) % len(order)] for j in range(1, len(order) + 1)]
        return next((c for c in following if c != chunk), None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ChunkFT driver was closed; build a new one to keep training")


def _check_chunks(chunks: Sequence[Chunk], params: dict[str, nn.Parameter]) -> None:
    """Every slice names a parameter, stays within its rows, and no row is in two windows."""
    covered: dict[str, list[tuple[int, int]]] = {}
    for c in chunks:
        for sl in c.slices:
            p = params.get(sl.name)
            if p is None:
                raise ValueError(f"chunk {c.index} names {sl.name!r}, which is not a parameter of the model")
            rows = p.shape[0] if p.dim() else 1
            if not 0 <= sl.row_start < sl.row_end <= rows:
                raise ValueError(
                    f"chunk {c.index}: rows [{sl.row_start}, {sl.row_end}) of {sl.name!r} are outside "
                    f"[0, {rows}); rebuild the plan for this model"
                )
            if not p.is_contiguous():
                raise ValueError(f"parameter {sl.name!r} is not contiguous; call .contiguous() on it first")
            for a, b in covered.get(sl.name, []):
                if sl.row_start < b and a < sl.row_end:
                    raise ValueError(f"rows of {sl.name!r} are in more than one chunk; use a valid partition")
            covered.setdefault(sl.name, []).append((sl.row_start, sl.row_end))


def _check_always_active(
    names: Sequence[str],
    chunks: Sequence[Chunk],
    params: dict[str, nn.Parameter],
    device: torch.device,
    cuda: CudaInfo | None,
    world: World,
) -> tuple[str, ...]:
    """The always-active names, checked: real parameters, once each, in no chunk, on the device."""
    if isinstance(names, str):
        raise TypeError("always_active must be a sequence of parameter names, not one string; use [name]")
    names = tuple(names)
    if not names:
        return names
    if world.parallel:
        raise ValueError(
            f"always_active is not supported under data parallel yet (world size {world.size}); "
            "train with one process or leave always_active empty"
        )
    seen: set[str] = set()
    in_chunk = {sl.name: c.index for c in chunks for sl in c.slices}
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"always_active names must be strings, got {type(n).__name__}")
        if n not in params:
            raise ValueError(f"always_active names {n!r}, which is not a parameter of the model")
        if n in seen:
            raise ValueError(f"always_active names {n!r} twice; give each parameter once")
        seen.add(n)
        if n in in_chunk:
            raise ValueError(
                f"always_active names {n!r}, which is also in chunk {in_chunk[n]}; partition the other "
                "parameters only: partition([s for s in param_specs(model) if s.name not in always_active])"
            )
        p = params[n]
        if isinstance(p, DTensor):
            raise ValueError(f"always_active names {n!r}, a sharded (FSDP2) weight; leave it out")
        if not same_device(p.device, device, cuda):
            raise ValueError(f"always_active parameter {n!r} is on {p.device}, not {device}; move the model")
    return names


class UnreachedWindowsWarning(UserWarning):
    """A run too short to train every window (unreached_windows_message says which and what to change)."""


def unreached_windows_message(
    chunks: Sequence[Chunk], rotation: RotationSpec, steps: int, start_chunk: int | None = None
) -> str | None:
    """Why `steps` optimizer steps would never train some windows, and what to change; None when every
    window is reached (chunkft-plan prints it as a warning line, the driver warns with it)."""
    k = len(chunks)
    missed = sorted(set(range(k)) - windows_reached(rotation, k, steps, start_chunk))
    if not missed:
        return None
    reached = {sl.name for c in chunks if c.index not in missed for sl in c.slices}
    never = list(dict.fromkeys(sl.name for i in missed for sl in chunks[i].slices if sl.name not in reached))

    def covers(u: int) -> bool:
        spec = RotationSpec(rotation.order, u, rotation.seed)
        return len(windows_reached(spec, k, steps, start_chunk)) == k

    fits = [u for u in range(rotation.update_interval - 1, 0, -1) if covers(u)]
    fix = f"update_interval <= {fits[0]}, " if fits else ""
    shown = ", ".join(never[:5]) + (f" and {len(never) - 5} more" if len(never) > 5 else "")
    what = f"parameters never trained: {shown}" if never else "only rows of parameters other windows train"
    per = f"{rotation.update_interval} step" + ("s" if rotation.update_interval > 1 else "")
    return (
        f"{steps} steps at {per} per visit reach {k - len(missed)} of {k} windows; window(s) "
        f"{', '.join(map(str, missed))} would never be trained ({what}); use {fix}fewer chunks, or more "
        "steps (schedule total_steps)"
    )


def _warn_unreached(
    chunks: Sequence[Chunk], rotation: RotationSpec, steps: int, start_chunk: int | None
) -> None:
    """Warn when `steps` optimizer steps never reach some windows: their parameters would not train."""
    message = unreached_windows_message(chunks, rotation, steps, start_chunk)
    if message is not None:
        warnings.warn(f"ChunkFT: {message}", UnreachedWindowsWarning, stacklevel=3)
