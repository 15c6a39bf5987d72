"""CPU stand-ins for CUDA streams that are as adversarial as a GPU: they run the transfer engine's
asynchronous protocol (executor/streams.py) on the CPU, so that a missing wait gives a wrong result in a
CPU test instead of a rare corruption on a GPU.

On a GPU the compute stream and the side stream run concurrently; the only orderings are FIFO within a
stream, events the other stream waits for, and the host blocking on an event or a stream. The CPU runs
compute work (the update, the forward) eagerly, in program order, so the stand-ins vary when the side
stream's work happens within what those orderings allow:

- `LateStreams` queues every side-stream operation and runs it only when something forces it: the host
  blocking on a side event (or on everything), or the compute stream waiting for one. A reader that
  did not wait sees the destination as it was before the copy (another window's states, zeros).
- `EarlyStreams` runs every side-stream operation at once, as if the side stream were infinitely fast,
  but only sees compute-stream writes it is ordered after: a copy whose source or destination the
  compute stream wrote since the side stream last waited for a compute event is a race, and it writes
  NaN (`races` says where). Host buffers are exempt: the host writes them synchronously.

Both are FIFO within the side stream, as CUDA is, and take what the CPU needs no stand-in for (host
blocks, compute-stream events with a timestamp) from SyncStreams.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from chunkft.executor.streams import CompleteEvent, Event, SyncStreams


def _key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _QueuedEvent:
    """A point in LateStreams' queue: done once that many queued operations ran."""

    def __init__(self, streams: LateStreams, position: int) -> None:
        self._streams = streams
        self._position = position

    def query(self) -> bool:
        return self._streams.ran >= self._position

    def synchronize(self) -> None:
        self._streams.run_until(self._position)


def _garbage(numel: int) -> Tensor:
    """An uninitialised device slot: NaN until a fill reaches it, so reading it early cannot go unseen."""
    return torch.full((numel,), math.nan)


class LateStreams(SyncStreams):
    """Side-stream work as late as the waits allow (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[Callable[[], None]] = []
        self.ran = 0  # queued operations that have run

    @property
    def pending(self) -> int:
        """Side-stream operations issued but not run yet."""
        return len(self._queue) - self.ran

    def run_until(self, position: int) -> None:
        while self.ran < position:
            self._queue[self.ran]()
            self._queue[self.ran] = _ran  # drop references to finished copies' tensors
            self.ran += 1

    def slot_empty(self, numel: int) -> Tensor:
        return _garbage(numel)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        self._queue.append(lambda: dst.copy_(src))

    def zero(self, dst: Tensor) -> None:
        self._queue.append(dst.zero_)

    def side_event(self) -> Event:
        return _QueuedEvent(self, len(self._queue))

    # compute_event and side_waits as SyncStreams: compute work runs eagerly (done when issued), and
    # queued side work runs after everything compute did so far anyway

    def synchronize(self) -> None:
        self.run_until(len(self._queue))


def _ran() -> None:
    return None


class _SnapshotEvent(CompleteEvent):
    """A compute event: the versions of the watched device buffers when it was recorded."""

    def __init__(self, versions: dict[int, int]) -> None:
        super().__init__()
        self.versions = versions


class EarlyStreams(SyncStreams):
    """Side-stream work as early as the waits allow (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._device_buffers: dict[int, Tensor] = {}  # storage -> a tensor of it (views share versions)
        self._seen: dict[int, int] = {}  # storage -> the version the side stream is ordered after
        self.races: list[str] = []

    # host_zeros as SyncStreams: the host writes host buffers synchronously, never a race

    def device_zeros(self, numel: int, dtype: torch.dtype) -> Tensor:
        t = super().device_zeros(numel, dtype)
        self._device_buffers[_key(t)] = t  # the zeros are compute-stream work: not seen yet
        return t

    def slot_empty(self, numel: int) -> Tensor:
        t = _garbage(numel)
        self._device_buffers[_key(t)] = t
        self._seen[_key(t)] = t._version  # nothing on the compute stream wrote it
        return t

    def _racing(self, t: Tensor) -> bool:
        k = _key(t)
        return k in self._device_buffers and self._seen.get(k) != t._version

    def _write(self, dst: Tensor, op: Callable[[], None], what: str, src: Tensor | None = None) -> None:
        if self._racing(dst) or (src is not None and self._racing(src)):
            self.races.append(what)
            dst.fill_(math.nan)
        else:
            op()
        if _key(dst) in self._device_buffers:
            self._seen[_key(dst)] = dst._version  # the side stream is ordered after its own writes

    def copy(self, dst: Tensor, src: Tensor) -> None:
        self._write(dst, lambda: dst.copy_(src), f"copy of {tuple(src.shape)}", src)

    def zero(self, dst: Tensor) -> None:
        self._write(dst, dst.zero_, f"zero of {tuple(dst.shape)}")

    # side_event and synchronize as SyncStreams: side work is done when issued

    def compute_event(self, timing: bool = False) -> Event:
        return _SnapshotEvent({k: t._version for k, t in self._device_buffers.items()})

    def side_waits(self, event: Event) -> None:
        for k, v in getattr(event, "versions", {}).items():
            self._seen[k] = max(self._seen.get(k, -1), v)


def standin_streams(name: str) -> LateStreams | EarlyStreams:
    """A stand-in by name ("late" or "early"), for RunOptions.streams and the GPU check's CPU dry run."""
    if name == "late":
        return LateStreams()
    if name == "early":
        return EarlyStreams()
    raise ValueError(f"stand-in streams {name!r} are unknown; use 'late' or 'early'")
