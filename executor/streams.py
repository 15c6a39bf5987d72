"""Streams, events, pinned host buffers and compute-stream timing: how the transfer engine and the step
clock talk to a device. The only module in the project that touches CUDA streams.

One small protocol (`Streams`), three kinds of implementation:

- `CudaStreams`: the GPU. State copies run on one side stream (FIFO among themselves), host stores are
  page-locked in place, steps are timed with events on the compute stream.
- `SyncStreams`: training on the CPU. Every operation runs at once and every event is complete.
- `LateStreams` / `EarlyStreams` (executor/stream_standins.py): CPU stand-ins for the tests, which run
  the engine's asynchronous protocol as adversarially as a GPU may: side-stream copies as late as the
  engine's waits allow, or as early as they allow.

The transfer engine has one code path for all of them, so the CPU suite runs the engine's GPU logic (every
wait, every copy it issues) and a missing wait shows up on the CPU as a wrong result. What the stand-ins
cannot show: the bodies of CudaStreams' methods, and hazards no CPU order models (the allocator reusing
memory across streams, a side-stream write landing while the compute stream still reads the same buffer).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

GIB = 2**30
PAGE_BYTES = 4096  # host pages: a page-locked block shares none with any other allocation
PIECE_ALIGN = 512  # every store in a host block starts at a multiple of this (any dtype, DMA-friendly)


class Event(Protocol):
    """A point in one stream's work."""

    def query(self) -> bool:
        """True when everything issued before the event has finished."""
        ...

    def synchronize(self) -> None:
        """Block the host until everything issued before the event has finished."""
        ...


class Streams(Protocol):
    """What the transfer engine and the step clock need from a device (see the module docstring)."""

    device: torch.device

    def host_zeros(self, pieces: Sequence[tuple[int, torch.dtype]]) -> list[Tensor]:
        """Zeroed host buffers of (numel, dtype) the device can copy from and to asynchronously: views of
        one block (page-locked once on CUDA)."""
        ...

    def device_zeros(self, numel: int, dtype: torch.dtype) -> Tensor:
        """A zeroed device buffer; the zeros are written on the compute stream."""
        ...

    def slot_empty(self, numel: int) -> Tensor:
        """An uninitialised fp32 device buffer that side-stream copies fill and drain."""
        ...

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """dst <- src (converting the dtype) on the side stream, without blocking the host."""
        ...

    def zero(self, dst: Tensor) -> None:
        """dst <- 0 on the side stream."""
        ...

    def side_event(self) -> Event:
        """An event after all side-stream work issued so far."""
        ...

    def compute_event(self, timing: bool = False) -> Event:
        """An event after all compute-stream work issued so far (timing: usable with elapsed_s)."""
        ...

    def side_waits(self, event: Event) -> None:
        """Side-stream work issued from now on starts after `event` (a compute event)."""
        ...

    def synchronize(self) -> None:
        """Block the host until both streams finished everything issued so far."""
        ...

    def elapsed_s(self, start: Event, end: Event) -> float:
        """Seconds between two timing compute events; blocks on `end` only, never on the side stream."""
        ...


class PinnedMemoryError(RuntimeError):
    """Page-locking the host stores failed; one line (what failed, what to do)."""


# ------------------------------------------------------------------------------------------------ CPU


class CompleteEvent:
    """An event whose work is already done (CPU work is done when the call returns): a timestamp."""

    def __init__(self) -> None:
        self.time = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


def host_block(pieces: Sequence[tuple[int, torch.dtype]]) -> tuple[Tensor, list[Tensor]]:
    """One zeroed, page-aligned host block of whole pages and a view of it per (numel, dtype) piece.

    Why one block: cudaHostRegister works on whole pages and refuses a range overlapping one already
    registered, so stores allocated one by one (small ones share pages on the heap) cannot each be
    registered; one block is registered once and shares no page with any other allocation."""
    offsets, end = [], 0
    for numel, dtype in pieces:
        offsets.append(end)
        end += -(-numel * dtype.itemsize // PIECE_ALIGN) * PIECE_ALIGN
    size = -(-end // PAGE_BYTES) * PAGE_BYTES
    raw = torch.zeros(size + PAGE_BYTES, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE_BYTES
    block = raw[start : start + size]
    views = [
        block[o : o + numel * dtype.itemsize].view(dtype)
        for o, (numel, dtype) in zip(offsets, pieces, strict=True)
    ]
    return block, views


class SyncStreams:
    """The CPU: every operation runs when it is issued, so no wait ever has anything to wait for."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    def host_zeros(self, pieces: Sequence[tuple[int, torch.dtype]]) -> list[Tensor]:
        return host_block(pieces)[1]

    def device_zeros(self, numel: int, dtype: torch.dtype) -> Tensor:
        return torch.zeros(numel, dtype=dtype, device=self.device)

    def slot_empty(self, numel: int) -> Tensor:
        return torch.empty(numel, dtype=torch.float32, device=self.device)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src)

    def zero(self, dst: Tensor) -> None:
        dst.zero_()

    def side_event(self) -> Event:
        return CompleteEvent()

    def compute_event(self, timing: bool = False) -> Event:
        return CompleteEvent()

    def side_waits(self, event: Event) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def elapsed_s(self, start: Event, end: Event) -> float:
        return end.time - start.time  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- CUDA


class CudaStreams:
    """One side stream for the state copies of one transfer engine, next to the compute stream."""

    def __init__(self, device: torch.device, cudart: Any = None) -> None:
        self.device = device
        self._side = torch.cuda.Stream(device)
        self._cudart = cudart  # None: torch.cuda.cudart(), looked up when a host store is pinned
        self._blocks: list[Tensor] = []  # pinned for as long as these streams (their engine) live

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def host_zeros(self, pieces: Sequence[tuple[int, torch.dtype]]) -> list[Tensor]:
        block, views = host_block(pieces)
        if block.numel():
            pin_in_place(block, self._cudart if self._cudart is not None else torch.cuda.cudart())
            self._blocks.append(block)
        return views

    def device_zeros(self, numel: int, dtype: torch.dtype) -> Tensor:
        return torch.zeros(numel, dtype=dtype, device=self.device)

    def slot_empty(self, numel: int) -> Tensor:
        t = torch.empty(numel, dtype=torch.float32, device=self.device)
        # Allocated for the compute stream but filled and drained on the side stream: without this the
        # caching allocator could hand the block to another tensor while side-stream copies of it pend.
        t.record_stream(self._side)
        return t

    def copy(self, dst: Tensor, src: Tensor) -> None:
        with torch.cuda.stream(self._side):
            if src.dtype != dst.dtype:
                # Convert on the GPU: a copy_ across host and device that also changes the dtype converts
                # on the host through a pageable temporary, which makes the copy synchronous.
                src = src.to(self.device, non_blocking=True) if src.device.type != "cuda" else src
                src = src.to(dst.dtype) if dst.device.type != "cuda" else src
            dst.copy_(src, non_blocking=True)

    def zero(self, dst: Tensor) -> None:
        with torch.cuda.stream(self._side):
            dst.zero_()

    def side_event(self) -> Event:
        event = torch.cuda.Event()
        event.record(self._side)
        return event

    def compute_event(self, timing: bool = False) -> Event:
        event = torch.cuda.Event(enable_timing=timing)
        event.record(self._compute())
        return event

    def side_waits(self, event: Event) -> None:
        self._side.wait_event(event)  # type: ignore[arg-type]

    def synchronize(self) -> None:
        self._compute().synchronize()
        self._side.synchronize()

    def elapsed_s(self, start: Event, end: Event) -> float:
        # An event waits for its own stream's work only: the side stream's copies keep running.
        end.synchronize()
        return start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]


def pin_in_place(t: Tensor, cudart: Any) -> None:
    """Page-lock `t` where it lies, so host<->device copies of it are asynchronous.

    torch.empty(..., pin_memory=True) goes through the caching host allocator, which rounds every block
    up to a power of two: an 8B model's 90 GiB of host states could take up to twice that. Registering the
    exact pageable allocation costs its own size only; it is unregistered when the tensor is collected
    (views of it that outlive it, e.g. in a saved state dict, stay valid, pageable memory).

    A failed cudaHostRegister leaves its error pending in the CUDA runtime until cudaGetLastError, which
    torch's Python bindings do not expose: the next kernel launch check would then raise it as an
    unrelated error. So a failure is raised here, in words, instead of carrying on with pageable memory.
    """
    nbytes = t.numel() * t.element_size()
    ptr = t.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        reason = cudart.cudaGetErrorString(err)
        raise PinnedMemoryError(
            f"page-locking {nbytes / GIB:.2f} GiB of host memory for optimizer states failed ({reason}); "
            "free host memory (or raise the container's locked-memory limit) and start a new process, "
            "or re-plan with a smaller --host-mem"
        )
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)


def default_streams(device: torch.device) -> Streams:
    """The real streams of a device: CUDA's for a GPU, synchronous ones for the CPU."""
    if device.type == "cuda":
        return CudaStreams(device)
    return SyncStreams(device)
