"""Measured memory and time of training steps, in the categories the plan predicts, for run.json.

The accounting (the same on both sides: planner/simulator.py predicts it, this module measures it):
**tracked tensor bytes on the training device at the highest point of one optimizer step, worst window of
one rotation**: the model's parameters and buffers, the driver's persistent fp32 state slots, gradient
buffers, activations and temporaries; *not* the host-side state stores of inactive windows (host memory
on a GPU; on CPU they share the same RAM, so they are excluded by storage identity), and not the CUDA
context or allocator fragmentation (the plan's separate reserve).

GPU: the caching allocator's peak (`torch.cuda.max_memory_allocated`, plus `max_memory_reserved`) over
the measured steps. CPU has no allocator statistics, so the span runs under MemoryTracker, the one
tracker of the project (planner profiling, the executor's CPU measurement and the benchmarks use it).
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.weak import WeakIdKeyDictionary

from chunkft.executor.streams import Streams
from chunkft.timeline import CATEGORIES

# MemTracker's ModTracker warns when a backward hook fires for a module whose weakref is already gone
# (BERT's classifier path, planning and measuring): the bytes are still counted, and the warning would
# only clutter chunkft-plan's and chunkft-run's output with torch's internals.
warnings.filterwarnings(
    "ignore",
    message=r"Module is None\. Skipping (PRE|POST)_BW hook",
    category=UserWarning,
    module=r"torch\.distributed\._tools\.mod_tracker",
)

# MemTracker's reference types -> the plan's categories. Refinements made by MemoryTracker itself:
# storages a backward pass creates and that outlive it are the window's fp32 gradient buffers
# (gradients, not Temp); optimizer-phase storages that outlive the update are optimizer states (a dense
# baseline's), the others the update's temporaries; tensors passed as `persistent` keep the category
# they were registered under.
CATEGORY_OF_REFTYPE: dict[str, str] = {
    "Parameter": "weights",
    "Buffer": "weights",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "temporaries",
    "Other": "temporaries",
}


@dataclass(frozen=True)
class MemoryMeasurement:
    """A measured peak with its breakdown (empty where the method gives none)."""

    method: str  # "cuda-allocator" or "memtracker" (MemoryTracker: torch MemTracker, CPU)
    device: str
    peak_bytes: int
    reserved_bytes: int | None  # CUDA caching allocator reserve; None on CPU
    peak_by_category: tuple[tuple[str, int], ...]  # CATEGORIES order; empty for cuda-allocator
    steps: tuple[int, ...]  # the 0-based optimizer steps measured
    # (phase, peak bytes) of what ran beside the steps (OTHER_PHASES), measured on its own
    phase_peaks: tuple[tuple[str, int], ...] = ()


def measured_steps(total_steps: int, rotation_length: int) -> range:
    """Step 0 warms up (state slots and lazily made buffers exist afterwards); then one full rotation."""
    return range(1, min(total_steps, 1 + rotation_length))


class _NoHandle:
    """A hook handle with nothing to remove (stands in for hooks a frozen parameter cannot take)."""

    def remove(self) -> None:
        return None


class MemoryTracker(MemTracker):
    """torch's MemTracker, usable on ChunkFT models, with the breakdown in the plan's categories.

    Upstream limitation worked around (torch 2.x `MemTracker._track_module_params_and_buffers`): it
    registers a gradient hook on every parameter of every module that runs forward, and torch refuses
    hooks on tensors with requires_grad=False, which is every parameter outside ChunkFT's window. Every
    parameter gets no-op handles on this instance instead, so MemTracker installs none: which parameters
    are frozen changes with every window, and ChunkFT never leaves a `.grad` for the hook to label. The
    gradients are labelled by what they do instead: storages a backward pass creates and that outlive it
    are gradient buffers (ChunkFT's fp32 window buffers, or `.grad` of a dense baseline). Everything else
    is MemTracker's own dispatch-level accounting.

    Additions: `persistent` tensors made before tracking (the driver's fp32 state slots) are counted from
    the start under a stated category; `exclude` tensors (host state stores) are never counted, even
    when an in-place copy returns them; phases label the optimizer update and reset MemTracker's
    per-module stats before each forward (it refuses a second forward of the root otherwise); the set of
    storages alive at the peak is kept, so the breakdown can be refined into the plan's categories.
    Works under FakeTensorMode (nothing allocated), which is how the planner's reference trace uses it.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        persistent: Mapping[str, Sequence[torch.Tensor]] | None = None,
        exclude: Iterable[torch.Tensor] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self._persistent = {c: list(ts) for c, ts in (persistent or {}).items()}
        for c in self._persistent:
            if c not in CATEGORIES:
                raise ValueError(f"persistent category {c!r} is not one of {', '.join(CATEGORIES)}")
        self._excluded: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for t in exclude:
            self._excluded[t.untyped_storage()] = True
        self._forced: dict[int, tuple[Any, str]] = {}  # id(winfo) -> (winfo, category)
        self._grad_winfos: dict[int, Any] = {}  # winfos kept past a backward: gradient buffers
        self._state_winfos: dict[int, Any] = {}  # winfos kept past an update: optimizer states
        self._peak_live: list[tuple[Any, int, str]] = []  # (winfo, bytes, reftype) alive at the peak
        self._seen_peak = -1
        self._pending = False
        self._steps: list[int] = []
        self.active = False
        self._stopped = False
        self.phase_peaks: dict[str, int] = {}

    # ----- the upstream limitation --------------------------------------------------------------------
    def _track_module_params_and_buffers(
        self, module: torch.nn.Module, install_grad_hooks: bool = True
    ) -> tuple[int, int]:
        if install_grad_hooks:
            for p in module.parameters():
                if self._param_to_grad_hook_handles.get(p, None) is None:
                    self._param_to_grad_hook_handles[p] = (_NoHandle(), _NoHandle())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
        # Upstream refuses a second top-level forward of a module before reset_mod_stats (it keeps
        # per-module statistics for one iteration). This tracker counts storages, not per-module
        # statistics, and a step may call the model more than once at top level (evaluation batches,
        # accumulation inside a measured span): start that module's statistics afresh instead.
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        if t.untyped_storage() in self._excluded:
            return
        super()._track(reftype, t)

    # ----- the set of storages at the peak -------------------------------------------------------------
    def _update_peak_stats(self, peak_state: Any) -> None:
        super()._update_peak_stats(peak_state)
        top = max(self._peak_mem.values(), default=0)
        if top > self._seen_peak:
            self._seen_peak = top
            self._pending = True  # snapshot lazily: the live set only changes again at the next free

    def _delete_callback(self, winfo: Any, w_st: Any) -> None:
        self._snapshot_if_pending(dying=winfo)
        super()._delete_callback(winfo, w_st)

    def _snapshot_if_pending(self, dying: Any = None) -> None:
        if self._pending:
            live = [w for w, _ in self._WINFO.values()]
            # the dying storage may already be gone from the weak dictionary, but is still in the total
            if dying is not None and all(w is not dying for w in live):
                live.append(dying)
            self._peak_live = [(w, w.mem_consumed, str(w.reftype.value)) for w in live if w.mem_consumed]
            self._pending = False

    # ----- the span ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Register the model and the persistent tensors, then track until stop()."""
        if self.active or self._stopped:
            return
        if self.model is not None:
            self.track_external(self.model)
        for category, tensors in self._persistent.items():
            for t in tensors:
                for w in self._update_and_maybe_create_winfos(t, _MemRefType.OPT):
                    self._forced[id(w)] = (w, category)
        self.__enter__()
        self._seen_peak = -1
        self._update_peak_stats(None)  # the starting point counts as a peak candidate
        self._snapshot_if_pending()
        self.active = True

    def stop(self) -> None:
        if not self.active:
            return
        self._snapshot_if_pending()
        self.__exit__(None, None, None)
        self.active = False
        self._stopped = True

    def note_step(self, step: int) -> None:
        self._steps.append(step)

    @property
    def steps_measured(self) -> int:
        return len(self._steps)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the work inside: "forward", "backward", "optimizer", or one of OTHER_PHASES (evaluation,
        checkpoint, export: tracked, but its peak is kept apart from the step's)."""
        if not self.active:
            yield
            return
        if name == "forward":
            self.reset_mod_stats()
        if name in OTHER_PHASES:
            self.reset_mod_stats()
            self._snapshot_if_pending()
            saved = (dict(self._peak_mem), dict(self._peak_mem_snap), self._seen_peak, self._peak_live)
            self.reset_peak()
            try:
                yield
            finally:
                self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.peak_bytes())
                self._peak_mem, self._peak_mem_snap = saved[0], saved[1]
                self._seen_peak, self._peak_live, self._pending = saved[2], saved[3], False
                self.reset_mod_stats()
            return
        previous = self._in_opt
        self._in_opt = name == "optimizer"
        try:
            yield
        finally:
            self._in_opt = previous
            if name == "backward":  # what backward made and kept: the window's gradient buffers
                for w, _ in self._WINFO.values():
                    if w.reftype == _MemRefType.TEMP and w.mem_consumed:
                        self._grad_winfos[id(w)] = w
            if name == "optimizer":  # what an update made and kept: optimizer states (dense baselines)
                for w, _ in self._WINFO.values():
                    if w.reftype == _MemRefType.OPT and w.mem_consumed and id(w) not in self._forced:
                        self._state_winfos[id(w)] = w

    def peak_bytes(self) -> int:
        return max(self._peak_mem.values(), default=0)

    def live_bytes(self) -> int:
        """Tracked bytes alive now (all devices)."""
        return sum(int(snap.get("Total", 0)) for snap in self.get_tracker_snapshot("current").values())

    def reset_peak(self) -> None:
        """Start a new peak window at the current bytes (the planner's per-segment excursions)."""
        self._peak_mem = {dev: int(snap.get("Total", 0)) for dev, snap in self._curr_mem_snap.items()}
        self._seen_peak = max(self._peak_mem.values(), default=0)

    def breakdown(self) -> dict[str, int]:
        """The plan's categories at the peak (sums to peak_bytes())."""
        self._snapshot_if_pending()
        out = dict.fromkeys(CATEGORIES, 0)
        for w, nbytes, reftype in self._peak_live:
            forced = self._forced.get(id(w))
            if forced is not None and forced[0] is w:
                out[forced[1]] += nbytes
            elif reftype == "Temp" and self._grad_winfos.get(id(w)) is w:
                out["gradients"] += nbytes
            elif reftype == "Optstate" and self._state_winfos.get(id(w)) is w:
                out["optimizer_states"] += nbytes
            else:
                out[CATEGORY_OF_REFTYPE.get(reftype, "temporaries")] += nbytes
        return out

    def result(self) -> MemoryMeasurement:
        by_cat = self.breakdown()
        return MemoryMeasurement(
            method="memtracker",
            device="cpu",
            peak_bytes=self.peak_bytes(),
            reserved_bytes=None,
            peak_by_category=tuple((c, by_cat[c]) for c in CATEGORIES),
            steps=tuple(self._steps),
            phase_peaks=tuple(sorted(self.phase_peaks.items())),
        )


def driver_tensors(driver: Any) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """(persistent, exclude) for a ChunkFT driver: its fp32 state slots by category (the first slot's
    master rows under master, its states under optimizer_states, further slots under prefetch; states
    kept on the device likewise), and its host stores (and the disk tier's staging buffers), which are
    host memory, not device memory."""
    engine = driver.engine
    staged = [k for k in engine.kinds if not (k.store == "device" and k.store_dtype == torch.float32)]
    persistent: dict[str, list[torch.Tensor]] = {"master": [], "optimizer_states": [], "prefetch": []}
    slots = engine.slot_tensors()
    for i, t in enumerate(slots):
        kind = staged[i % len(staged)]
        if i >= len(staged):
            persistent["prefetch"].append(t)
        else:
            persistent["master" if kind.name == "master" else "optimizer_states"].append(t)
    direct = [k.name for k in engine.kinds if k.store == "device" and k.store_dtype == torch.float32]
    for c in range(len(engine.chunk_numels)):
        for name in direct:
            persistent["master" if name == "master" else "optimizer_states"].append(engine.store(c, name))
    return persistent, list(engine.store_tensors("host")) + engine.staging_tensors()  # staging: host too


# The former name (bench/peers.py); one tracker.
CpuPeakTracker = MemoryTracker


# Work beside the training steps whose peaks are measured on their own lines, never in the step's peak.
OTHER_PHASES = ("evaluation", "checkpoint", "export")


class CudaPeak:
    """The caching allocator's peak over the measured training steps, and the peaks of evaluation,
    checkpoints and the export, each on its own line.

    The allocator's counters are host-side bookkeeping of allocations as the host issues them, so no
    synchronization is needed. The reserved peak after an evaluation or checkpoint starts from what the
    allocator still caches from it: memory the following steps really run beside. `allocator` is
    torch.cuda, or a stand-in with the same four functions (the CPU tests)."""

    def __init__(self, device: torch.device, allocator: Any = None) -> None:
        self.device = device
        self._alloc = allocator if allocator is not None else torch.cuda
        self._steps: list[int] = []
        self.active = False
        self._stopped = False
        self.peak_bytes = 0  # the training span's, folded in whenever the counters are reset
        self.reserved_bytes = 0
        self.phase_peaks: dict[str, int] = {}

    def start(self) -> None:
        """The measured span begins: what ran before (model build, warm-up step) is not in its peak."""
        if self.active or self._stopped:
            return
        self._alloc.reset_peak_memory_stats(self.device)
        self.active = True

    def stop(self) -> None:
        """The measured span ends: read its peak now, before evaluation, the last checkpoint or export."""
        if self.active:
            self._fold()
        self.active = False
        self._stopped = True

    def _fold(self) -> None:
        self.peak_bytes = max(self.peak_bytes, int(self._alloc.max_memory_allocated(self.device)))
        self.reserved_bytes = max(self.reserved_bytes, int(self._alloc.max_memory_reserved(self.device)))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Forward, backward and optimizer are the step's own; OTHER_PHASES get a peak of their own."""
        if name not in OTHER_PHASES:
            yield
            return
        if self.active:
            self._fold()  # the step's peak so far, before the counters are reset for this phase
        self._alloc.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            peak = int(self._alloc.max_memory_allocated(self.device))
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), peak)
            self._alloc.reset_peak_memory_stats(self.device)  # the span goes on from here

    def note_step(self, step: int) -> None:
        self._steps.append(step)

    @property
    def steps_measured(self) -> int:
        return len(self._steps)

    def result(self) -> MemoryMeasurement:
        if self.active:
            self._fold()
        return MemoryMeasurement(
            method="cuda-allocator",
            device=str(self.device),
            peak_bytes=self.peak_bytes,
            reserved_bytes=self.reserved_bytes,
            peak_by_category=(),
            steps=tuple(self._steps),
            phase_peaks=tuple(sorted(self.phase_peaks.items())),
        )


@dataclass
class StepClock:
    """Seconds, tokens and transfer waits per optimizer step, timed with events on the compute stream.

    Not torch.cuda.synchronize() at the step's ends: that waits for the side stream too, so the state
    copies a window change issues could never overlap the next step's compute (each change would cost a
    write-back plus a fill, serially). An event on the compute stream waits for the step's own work only.
    The transfer wait (the host blocking on a fill before an update) is inside the step's seconds and
    reported on its own as well.

    Windows differ in cost (the backward of a low window runs through every block above it), so the step
    time that compares with the plan's (the simulator's mean over the rotation's windows) is the mean over
    windows of each window's median step, not the median over steps: a run whose visits fall unevenly on
    the windows (60 steps of 7 per visit: window 0 gets 11 steps, the others 7) would weigh some more."""

    streams: Streams
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    transfer_wait_s: list[float] = field(default_factory=list)
    windows: list[int | None] = field(default_factory=list)  # the window each step trained
    excluded: set[int] = field(default_factory=set)  # steps slowed by measurement or warm-up
    _start: Any = None

    def start(self) -> None:
        self._start = self.streams.compute_event(timing=True)

    def stop(self, tokens: int, transfer_wait_s: float, *, exclude: bool, window: int | None = None) -> float:
        end = self.streams.compute_event(timing=True)
        dt = self.streams.elapsed_s(self._start, end)
        if exclude:
            self.excluded.add(len(self.seconds))
        self.seconds.append(dt)
        self.tokens.append(tokens)
        self.transfer_wait_s.append(transfer_wait_s)
        self.windows.append(window)
        return dt

    def _kept(self) -> list[int]:
        kept = [i for i in range(len(self.seconds)) if i not in self.excluded]
        return kept or list(range(len(self.seconds)))

    def median_step_seconds(self) -> float:
        kept = self._kept()
        return statistics.median(self.seconds[i] for i in kept) if kept else 0.0

    def rotation_step_seconds(self, num_windows: int) -> float:
        """Mean over the rotation's windows of each one's median kept step (what the plan predicts);
        the plain median when some window has no kept step (a run shorter than a rotation)."""
        by_window: dict[int, list[float]] = {}
        for i in self._kept():
            w = self.windows[i]
            if w is not None:
                by_window.setdefault(w, []).append(self.seconds[i])
        if len(by_window) < num_windows or num_windows < 1:
            return self.median_step_seconds()
        return statistics.fmean(statistics.median(v) for v in by_window.values())

    def tokens_per_second(self) -> float:
        kept = self._kept()
        secs = sum(self.seconds[i] for i in kept)
        return sum(self.tokens[i] for i in kept) / secs if secs > 0 else 0.0

    def median_transfer_wait_s(self) -> float:
        kept = self._kept()
        return statistics.median(self.transfer_wait_s[i] for i in kept) if kept else 0.0

    def total_transfer_wait_s(self) -> float:
        """Seconds the host blocked on state copies over every timed step (warm-up included)."""
        return sum(self.transfer_wait_s)
