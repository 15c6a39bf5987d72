"""Moving each window's optimizer states (and fp32 master rows) between where they are stored and the
fp32 compute slots the update uses. Streams, events and pinned buffers come from executor/streams.py.

Per chunk and per kind (e.g. "master", "exp_avg") there is one flat *store*: pinned host memory, device
memory, or none at all (a transient kind, zero-filled whenever a chunk is brought in: BAdam-style reset).
The update never touches a store directly unless it is fp32 on the device (then it is used in place, no
copy). Everything else goes through at most `max_slots` fp32 device slots sized for the largest chunk.

One slot already overlaps transfers with compute: a window's states are needed only during its update,
so right after an update the driver writes the slot back and refills it with the next window; both copies
run during the next forward/backward. A second slot lets the copies of the window after that start a
step earlier (more slack on a slow link) for one more window of device memory.

Ordering: every copy runs on one side stream, so host->device and device->host copies are FIFO among
themselves; that single fact is what keeps stores and slots consistent (a write-back of chunk c finishes
before any later fetch of c or reuse of its slot starts). Across streams there are exactly four waits,
each a method below so the tests can remove one and watch the results go wrong:

- `_side_waits_for_allocation`: a new slot's first fill starts after the compute stream's work so far
  (device stores are zeroed there; the allocator may hand out memory the compute stream just used);
- `_side_waits_for_update`: a write-back reads the slot only after the update that wrote it;
- `_host_waits_for_fill`: the update reads a slot only after its fill finished (the host blocks on the
  fill's event, which is also the transfer wait a step reports);
- `synchronize`: the host reads or overwrites stores (state_dict, load_state_dict) only after every copy.

The engine has this one code path on every device: on the CPU the streams are synchronous
(streams.SyncStreams), and the tests run it with stand-ins that reorder the side stream as a GPU may
(executor/stream_standins.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from chunkft.executor.streams import Event, Streams, default_streams

StoreLocation = Literal["host", "device", "none"]


@dataclass(frozen=True)
class KindSpec:
    """One kind of per-element state and where its inactive copies live."""

    name: str
    store: StoreLocation  # "none": not kept when the window leaves (zeros when it comes back)
    store_dtype: torch.dtype = torch.float32  # fp32, or bf16 (lossy, opt-in)


@dataclass(frozen=True)
class Fetched:
    """A chunk's fp32 tensors on the compute device, ready for the update."""

    tensors: dict[str, Tensor]  # kind -> flat fp32 tensor of the chunk's numel
    wait_s: float  # seconds the host blocked waiting for the copy (0 when it had already finished)


class _Slot:
    """One fp32 staging area on the device (mutable bookkeeping, private to the engine)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.chunk: int | None = None  # whose data it holds; None = nothing valid
        self.dirty = False  # updated since it was filled: must be written back before reuse
        self.ready: Event | None = None  # recorded on the side stream after the fill


class TransferEngine:
    """Stores, slots and the copies between them; see the module docstring for the ordering rules."""

    def __init__(
        self,
        chunk_numels: list[int],
        kinds: list[KindSpec],
        *,
        device: torch.device,
        max_slots: int = 2,
        streams: Streams | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        for k in kinds:
            if k.store_dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(
                    f"state kind {k.name!r}: store dtype {k.store_dtype} is not float32 or bfloat16"
                )
        self.device = device
        self.kinds = kinds
        self.chunk_numels = list(chunk_numels)
        self.max_slots = max_slots
        self.streams = streams if streams is not None else default_streams(device)
        # Kinds used in place: fp32 stores already on the device. All others need a slot.
        self._direct = [k for k in kinds if k.store == "device" and k.store_dtype == torch.float32]
        self._staged = [k for k in kinds if k not in self._direct]
        # A slot stays valid after its write-back only if the store holds exactly what the slot held.
        self._slot_survives_write_back = all(
            k.store != "none" and k.store_dtype == torch.float32 for k in self._staged
        )
        # Every host store is a view of one block, page-locked once on CUDA (streams.host_block says why).
        host = iter(
            self.streams.host_zeros(
                [(n, k.store_dtype) for n in self.chunk_numels for k in kinds if k.store == "host"]
            )
        )
        self._stores: list[dict[str, Tensor]] = [
            {
                k.name: next(host) if k.store == "host" else self.streams.device_zeros(n, k.store_dtype)
                for k in kinds
                if k.store != "none"
            }
            for n in self.chunk_numels
        ]
        self._slots: list[_Slot] = []
        self._slot_numel = max(self.chunk_numels, default=0)

    # ----- sizes, for planning and reports -----------------------------------------------------------
    def store_bytes(self, location: StoreLocation) -> int:
        """Bytes of all stores at `location` ("host" or "device")."""
        return sum(t.numel() * t.element_size() for t in self.store_tensors(location))

    def slot_bytes(self) -> int:
        """Bytes of the fp32 slots allocated so far (at most max_slots)."""
        return sum(t.numel() * t.element_size() for t in self.slot_tensors())

    def store_tensors(self, location: StoreLocation) -> list[Tensor]:
        """Every store tensor at `location`, e.g. to tell host from device memory in a tracker."""
        kinds = {k.name for k in self.kinds if k.store == location}
        return [t for s in self._stores for n, t in s.items() if n in kinds]

    def slot_tensors(self) -> list[Tensor]:
        """The fp32 slot tensors allocated so far (device memory)."""
        return [t for s in self._slots for t in s.tensors.values()]

    def store(self, chunk: int, kind: str) -> Tensor:
        """The store of one chunk's kind, to initialise it; synchronize() before reading it on the host."""
        return self._stores[chunk][kind]

    # ----- the copy protocol ---------------------------------------------------------------------------
    def prefetch(self, *chunks: int) -> None:
        """Start bringing these chunks into slots, in priority order, without blocking.

        Slots holding other chunks are reused only when clean (written back or never updated); chunks that
        find no slot are skipped: wait() fetches them later. A listed chunk may evict a clean slot of a
        later-listed one, never of an earlier one, so prefetch(active, upcoming) serves the active window
        first and, with a single slot, simply skips the upcoming one.
        """
        for i, chunk in enumerate(chunks):
            if not self._staged or self._slot_of(chunk) is not None:
                continue
            slot = self._free_slot(set(chunks[: i + 1]))
            if slot is None:
                return
            self._fill(slot, chunk)

    def wait(self, chunk: int) -> Fetched:
        """The chunk's fp32 tensors on the device, after its copy finished; marks them as being updated."""
        n = self.chunk_numels[chunk]
        out = {k.name: self._stores[chunk][k.name] for k in self._direct}
        wait_s = 0.0
        if self._staged:
            slot = self._slot_of(chunk)
            if slot is None:
                slot = self._free_slot({chunk})
                if slot is None:
                    raise RuntimeError("every slot holds an updated window; write_back() one before wait()")
                self._fill(slot, chunk)
            wait_s = self._host_waits_for_fill(slot)
            slot.dirty = True
            out.update({k.name: slot.tensors[k.name][:n] for k in self._staged})
        return Fetched(out, wait_s)

    def write_back(self, chunk: int) -> None:
        """Copy the chunk's updated slot into its stores (asynchronously on CUDA) and release the slot.

        Call after the update was issued on the compute stream and before that slot may be refilled.
        """
        slot = self._slot_of(chunk)
        if slot is None or not slot.dirty:
            return  # nothing updated since the last fill (or the kinds are all used in place)
        n = self.chunk_numels[chunk]
        store = self._stores[chunk]
        self._side_waits_for_update()
        for k in self._staged:
            if k.store != "none":
                self.streams.copy(store[k.name], slot.tensors[k.name][:n])
        slot.dirty = False
        if not self._slot_survives_write_back:
            slot.chunk = None  # lossy or dropped states: the next visit must refetch from the store

    # ----- the four waits (see the module docstring) ----------------------------------------------------
    def _side_waits_for_allocation(self) -> None:
        """The first fill into a new slot must start after the compute stream's work so far: the zeros of
        device stores it may read, and whatever last used the memory the allocator just handed out."""
        self.streams.side_waits(self.streams.compute_event())

    def _side_waits_for_update(self) -> None:
        """The write-back about to be issued must read the slot only after the update that wrote it."""
        self.streams.side_waits(self.streams.compute_event())

    def _host_waits_for_fill(self, slot: _Slot) -> float:
        """The update must not read the slot before its fill finished: block the host on the fill's event
        (the compute stream is then ordered after it too). Returns the seconds blocked."""
        if slot.ready is None or slot.ready.query():
            return 0.0
        t0 = time.perf_counter()
        slot.ready.synchronize()
        return time.perf_counter() - t0

    def synchronize(self) -> None:
        """Block until every issued copy finished, so the host may read or overwrite stores."""
        self.streams.synchronize()

    # ----- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every chunk's stores plus the fp32 content of slots not yet written back (CPU copies).

        Including updated slots, instead of flushing them, leaves the running trajectory untouched (a
        flush into a bf16 or transient store would change it).
        """
        self.synchronize()
        # Host stores are already on the CPU and synchronized: hand them over without a second copy
        # (for an 8B model that copy alone would be ~90 GiB of extra host memory at every checkpoint).
        stores = [
            {k: t.detach() if t.device.type == "cpu" else t.to("cpu") for k, t in s.items()}
            for s in self._stores
        ]
        live = [
            {
                "chunk": slot.chunk,
                "tensors": {
                    k.name: slot.tensors[k.name][: self.chunk_numels[slot.chunk]].to("cpu", copy=True)
                    for k in self._staged
                },
            }
            for slot in self._slots
            if slot.chunk is not None and slot.dirty
        ]
        return {"stores": stores, "live_slots": live}

    def load_targets(self, live_chunks: Sequence[int]) -> dict:
        """Tensors in state_dict()'s layout for a checkpoint reader to fill before load_state_dict(): the
        host stores themselves (filled in place, so an 8B model's ~90 GiB of states is not held twice)
        and new CPU buffers for device stores and for the slots `live_chunks` had not written back."""
        self.synchronize()  # the host is about to overwrite stores
        stores = [
            {k: t if t.device.type == "cpu" else torch.zeros(t.shape, dtype=t.dtype) for k, t in s.items()}
            for s in self._stores
        ]
        live = [
            {"chunk": c, "tensors": {k.name: torch.zeros(self.chunk_numels[c]) for k in self._staged}}
            for c in live_chunks
        ]
        return {"stores": stores, "live_slots": live}

    def load_state_dict(self, state: dict) -> None:
        """Replace stores and slots with a state_dict() result from an engine of the same layout (or
        load_targets(), filled: a store given as itself is already loaded)."""
        stores = state["stores"]
        if len(stores) != len(self._stores):
            raise ValueError(f"optimizer state has {len(stores)} chunks, this run has {len(self._stores)}")
        self.synchronize()
        for mine, theirs in zip(self._stores, stores, strict=True):
            if set(mine) != set(theirs):
                raise ValueError(f"optimizer state kinds {sorted(theirs)} do not match {sorted(mine)}")
            for k, t in mine.items():
                if theirs[k].shape != t.shape:
                    raise ValueError(
                        f"optimizer state {k!r} has shape {tuple(theirs[k].shape)}, expected {tuple(t.shape)}"
                    )
                if theirs[k] is not t:  # load_targets() handed out the store itself: filled in place
                    t.copy_(theirs[k])
        for slot in self._slots:
            slot.chunk, slot.dirty, slot.ready = None, False, None
        for live in state["live_slots"]:
            chunk = int(live["chunk"])
            slot = self._free_slot({chunk})
            if slot is None:
                raise ValueError("optimizer state holds more live windows than this run has slots")
            n = self.chunk_numels[chunk]
            for k in self._staged:
                slot.tensors[k.name][:n].copy_(live["tensors"][k.name])
            slot.chunk, slot.dirty = chunk, True
        self.synchronize()

    # ----- internals -----------------------------------------------------------------------------------
    def _slot_of(self, chunk: int) -> _Slot | None:
        return next((s for s in self._slots if s.chunk == chunk), None)

    def _free_slot(self, keep: set[int]) -> _Slot | None:
        """A slot that may be refilled: never used, or clean and holding none of `keep`; None if none."""
        for slot in self._slots:
            if slot.chunk is None and not slot.dirty:
                return slot
        if len(self._slots) < self.max_slots:
            tensors = {k.name: self.streams.slot_empty(self._slot_numel) for k in self._staged}
            self._side_waits_for_allocation()
            self._slots.append(_Slot(tensors))
            return self._slots[-1]
        for slot in self._slots:
            if not slot.dirty and slot.chunk not in keep:
                return slot
        return None

    def _fill(self, slot: _Slot, chunk: int) -> None:
        """Copy (or zero) the chunk into a clean slot."""
        n = self.chunk_numels[chunk]
        store = self._stores[chunk]
        # No compute-stream wait is needed: a clean slot is no longer touched by the compute stream
        # (write_back made the side stream wait for the update), and side-stream FIFO puts this fill
        # after any pending write-back of the same slot or of this chunk's store.
        for k in self._staged:
            if k.store == "none":
                self.streams.zero(slot.tensors[k.name][:n])
            else:
                self.streams.copy(slot.tensors[k.name][:n], store[k.name])
        slot.ready = self.streams.side_event()
        slot.chunk, slot.dirty = chunk, False
