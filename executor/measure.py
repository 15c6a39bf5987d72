"""Measured memory and time of training steps, in the categories the plan predicts, for run.json.

GPU: the caching allocator's peak (`torch.cuda.max_memory_allocated`, plus `max_memory_reserved`) over
the measured steps, reset after the first (warm-up) step. CPU has no allocator statistics, so a span of
sampled steps runs under a dispatch-mode tracker (CpuPeakTracker), which sees every tensor storage
allocated or freed inside the span plus the model's parameters and buffers; tensors made before the span
and not owned by the model (host copies of inactive chunks' optimizer states, which on a GPU would live
in host memory) are not counted; host copies the driver allocates anew inside the span are (CPU cannot
tell host from device). The span starts after step 0 and covers one full rotation, so every window is
active once with its buffers created inside the span, as the plan predicts the worst window.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from planner.timeline import CATEGORIES

_PHASE_CATEGORY = {"forward": "activations", "backward": "temporaries", "optimizer": "optimizer_states"}


@dataclass(frozen=True)
class MemoryMeasurement:
    """A measured peak with its breakdown (empty where the method gives none)."""

    method: str  # "cuda-allocator" or "dispatch-tracker"
    device: str
    peak_bytes: int
    reserved_bytes: int | None  # CUDA caching allocator reserve; None on CPU
    peak_by_category: tuple[tuple[str, int], ...]  # CATEGORIES order; empty for cuda-allocator
    steps: tuple[int, ...]  # the 0-based optimizer steps measured


def measured_steps(total_steps: int, rotation_length: int) -> range:
    """Step 0 warms up (and on CPU creates the first window's buffers outside the span); then one rotation."""
    return range(1, min(total_steps, 1 + rotation_length))


class CpuPeakTracker(TorchDispatchMode):
    """Counts every tensor storage alive during a span of steps and keeps the breakdown at the highest total.

    torch's MemTracker cannot be used here: it registers gradient hooks on every parameter a module
    runs with, which fails on the frozen parameters outside the active window. This is the same idea,
    reduced to what the plan's categories need: a storage is labelled by the phase that allocated it
    (forward: activations, backward: temporaries, optimizer step: optimizer_states), and storages that a
    backward pass allocated and that are still alive when it ends are the window's gradient buffers.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peak_bytes = 0
        self._phase = "activations"
        self._live: dict[int, tuple[int, weakref.ref[Any]]] = {}  # storage id -> (bytes, weakref)
        self._category: dict[int, str] = {}  # storage id -> category (kept after free, for the snapshot)
        self._current = 0
        self._pending = False  # a new peak whose live set is not yet snapshotted
        self._peak_live: dict[int, int] = {}
        self._steps: list[int] = []
        self.active = False
        self._stopped = False

    def start(self) -> None:
        if self.active or self._stopped:
            return
        for t in [*self.model.parameters(), *self.model.buffers()]:
            self._add(t, "weights")
        self.__enter__()
        self.active = True

    def stop(self) -> None:
        if not self.active:
            return
        self.__exit__(None, None, None)
        self.active = False
        self._stopped = True
        self._snapshot_if_pending()

    def note_step(self, step: int) -> None:
        self._steps.append(step)

    @property
    def steps_measured(self) -> int:
        return len(self._steps)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label what is allocated inside: "forward", "backward" or "optimizer"."""
        previous, self._phase = self._phase, _PHASE_CATEGORY[name]
        try:
            yield
        finally:
            self._phase = previous
            if name == "backward":  # what backward allocated and kept: the window's gradients
                for key in self._live:
                    if self._category.get(key) == "temporaries":
                        self._category[key] = "gradients"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t, self._phase)
        return out

    def _add(self, t: torch.Tensor, category: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        nbytes = int(st.nbytes())
        self._live[key] = (nbytes, weakref.ref(st, lambda _ref, key=key: self._free(key)))
        self._category[key] = category
        self._current += nbytes
        if self._current > self.peak_bytes:
            self.peak_bytes = self._current
            self._pending = True

    def _free(self, key: int) -> None:
        self._snapshot_if_pending()
        entry = self._live.pop(key, None)
        if entry is not None:
            self._current -= entry[0]

    def _snapshot_if_pending(self) -> None:
        if self._pending:
            self._peak_live = {k: b for k, (b, _) in self._live.items()}
            self._pending = False

    def result(self) -> MemoryMeasurement:
        by_cat = dict.fromkeys(CATEGORIES, 0)
        for key, nbytes in self._peak_live.items():
            by_cat[self._category[key]] += nbytes
        return MemoryMeasurement(
            method="dispatch-tracker",
            device="cpu",
            peak_bytes=self.peak_bytes,
            reserved_bytes=None,
            peak_by_category=tuple((c, by_cat[c]) for c in CATEGORIES),
            steps=tuple(self._steps),
        )


class CudaPeak:
    """The allocator's peak over the measured steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._steps: list[int] = []

        self.active = False
        self.peak_bytes = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.active = True

    def stop(self) -> None:
        self.active = False

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def note_step(self, step: int) -> None:
        self._steps.append(step)

    @property
    def steps_measured(self) -> int:
        return len(self._steps)

    def result(self) -> MemoryMeasurement:
        return MemoryMeasurement(
            method="cuda-allocator",
            device=str(self.device),
            peak_bytes=int(torch.cuda.max_memory_allocated(self.device)),
            reserved_bytes=int(torch.cuda.max_memory_reserved(self.device)),
            peak_by_category=(),
            steps=tuple(self._steps),
        )


@dataclass
class StepClock:
    """Wall time, tokens and transfer waits per optimizer step; GPU work is synchronized before reading."""

    device: torch.device
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    transfer_wait_s: list[float] = field(default_factory=list)
    excluded: set[int] = field(default_factory=set)  # steps slowed by measurement or warm-up
    _t0: float = 0.0

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, tokens: int, transfer_wait_s: float, *, exclude: bool) -> float:
        self._sync()
        dt = time.perf_counter() - self._t0
        if exclude:
            self.excluded.add(len(self.seconds))
        self.seconds.append(dt)
        self.tokens.append(tokens)
        self.transfer_wait_s.append(transfer_wait_s)
        return dt

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _kept(self) -> list[int]:
        kept = [i for i in range(len(self.seconds)) if i not in self.excluded]
        return kept or list(range(len(self.seconds)))

    def median_step_seconds(self) -> float:
        kept = self._kept()
        return statistics.median(self.seconds[i] for i in kept) if kept else 0.0

    def tokens_per_second(self) -> float:
        kept = self._kept()
        secs = sum(self.seconds[i] for i in kept)
        return sum(self.tokens[i] for i in kept) / secs if secs > 0 else 0.0

    def median_transfer_wait_s(self) -> float:
        kept = self._kept()
        return statistics.median(self.transfer_wait_s[i] for i in kept) if kept else 0.0
