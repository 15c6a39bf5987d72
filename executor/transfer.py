"""Moving each window's optimizer states (and fp32 master rows) between where they are stored and the
fp32 compute slots the update uses. Streams, events and pinned buffers come from executor/streams.py.

Per chunk and per kind (e.g. "master", "exp_avg") there is one flat *store*: pinned host memory, device
memory, a file on disk (executor/state_files.py), or none at all (a transient kind, zero-filled whenever a
chunk is brought in: BAdam-style reset).
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

The disk tier ("disk" stores) adds pinned host *staging* buffers between the files and the slots, a few
windows' worth (`staging_buffers`, by default max_slots + 2: the window being written back, the one being
filled, the one read ahead), not K. A fill copies staging -> slot, a write-back slot -> staging, both on the
side stream as above; the files are read into staging and written from it by one I/O thread. prefetch()
reads the listed windows that find no slot ahead, so with prefetch(active, upcoming) each window's files
are read one visit before its fill; a later-listed window that would get a slot but whose files are not
in staging yet is read ahead instead and filled at a later engine call once its read finished (with two
slots the prefetch never blocks on the upcoming window's file). A written-back buffer is written to its
files once its copy finished (checked at every engine call, never waited for there), and stays a valid
copy of the window, so a window that comes back before it is evicted needs no read. Four more waits,
host-side, guard the staging buffers:

- `_host_waits_for_read`: the fill's staging -> slot copy is issued only after the file read finished;
- `_host_waits_for_drain`: the host writes a buffer to its files only after its slot -> staging copy;
- `_host_waits_for_staging_use`: the host overwrites a buffer (a file read) only after the side stream's
  copies out of it finished;
- `_host_waits_for_io`: a buffer is overwritten (by a read or a slot -> staging copy) only after the I/O
  thread's job on it finished.

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

from chunkft.executor.state_files import DiskTier, Job, StateFiles
from chunkft.executor.streams import Event, Streams, default_streams

StoreLocation = Literal["host", "device", "disk", "none"]


@dataclass(frozen=True)
class KindSpec:
    """One kind of per-element state and where its inactive copies live."""

    name: str
    store: StoreLocation  # "none": not kept when the window leaves (zeros when it comes back); "disk": a file
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


class _Staging:
    """One pinned host buffer carrying a chunk's disk kinds between its files and a slot (private)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.chunk: int | None = None  # whose data it holds (valid once `reading` finished); None: nothing
        self.dirty = False  # newer than the chunk's files: written to them before the buffer is reused
        self.reading: Job | None = None  # file -> buffer on the I/O thread
        self.writing: Job | None = None  # buffer -> file on the I/O thread
        self.drained: Event | None = None  # side event after the last slot -> buffer copy
        self.used: Event | None = None  # side event after the last buffer -> slot copy
        self.tick = 0  # last use, for least-recently-used eviction


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
        disk: DiskTier | None = None,
    ) -> None:
        """disk: where "disk" kinds' files live and how they are read and written (required with them)."""
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
                if k.store in ("host", "device")
            }
            for n in self.chunk_numels
        ]
        self._slots: list[_Slot] = []
        self._slot_numel = max(self.chunk_numels, default=0)
        self._disk = [k for k in kinds if k.store == "disk"]
        self._staging: list[_Staging] = []
        self._files: StateFiles | None = None
        self._tick = 0
        self._io_wait_s = 0.0  # host seconds blocked on staging waits since the last wait()
        self._loading: dict[tuple[int, str], Tensor] = {}  # load_targets()' files, by (chunk, kind)
        self._keep: set[int] = set()  # the chunks of the last prefetch(), never evicted by a deferred fill
        self._deferred: list[int] = []  # prefetched windows to fill once their file read finished
        if self._disk:
            if disk is None:
                raise ValueError("state kinds stored on 'disk' need a DiskTier (the state directory)")
            count = max_slots + 2 if disk.staging_buffers is None else disk.staging_buffers
            self._files = StateFiles(
                disk.directory,
                [(c, k.name, n, k.store_dtype) for c, n in enumerate(self.chunk_numels) for k in self._disk],
                io=disk.io,
                fsync=disk.fsync,
            )
            self._files.create()
            pieces = [(self._slot_numel, k.store_dtype) for _ in range(count) for k in self._disk]
            views = iter(self.streams.host_zeros(pieces))
            self._staging = [_Staging({k.name: next(views) for k in self._disk}) for _ in range(count)]

    # ----- sizes, for planning and reports -----------------------------------------------------------
    def store_bytes(self, location: StoreLocation) -> int:
        """Bytes of all stores at `location` ("host", "device" or "disk": the files)."""
        if location == "disk":
            return self._files.nbytes() if self._files is not None else 0
        return sum(t.numel() * t.element_size() for t in self.store_tensors(location))

    def staging_bytes(self) -> int:
        """Pinned host bytes of the disk tier's staging buffers (a few windows, not K)."""
        return sum(t.numel() * t.element_size() for t in self.staging_tensors())

    def staging_tensors(self) -> list[Tensor]:
        """The disk tier's staging buffers (host memory), e.g. to count them in a tracker."""
        return [t for b in self._staging for t in b.tensors.values()]

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
        """The store of one chunk's kind, to initialise it; synchronize() before reading it on the host.

        A disk kind's store is its staging buffer, marked as changed: valid until the next engine call."""
        if any(k.name == kind for k in self._disk):
            self._pump()
            buf = self._stage_in(chunk)
            self._host_waits_for_drain(buf)
            self._host_waits_for_staging_use(buf)
            self._host_waits_for_io(buf)
            buf.dirty = True  # the host writes it now; the files follow
            return buf.tensors[kind][: self.chunk_numels[chunk]]
        return self._stores[chunk][kind]

    def read_store(self, chunk: int, kind: str) -> Tensor:
        """A CPU copy of one chunk's stored kind (after every pending copy and file write), for tests."""
        self.synchronize()
        if any(k.name == kind for k in self._disk):
            return self._files.snapshot(chunk, kind).clone()
        return self._stores[chunk][kind].to("cpu", copy=True)

    # ----- the copy protocol ---------------------------------------------------------------------------
    def prefetch(self, *chunks: int) -> None:
        """Start bringing these chunks into slots, in priority order, without blocking.

        Slots holding other chunks are reused only when clean (written back or never updated); chunks that
        find no slot are skipped: wait() fetches them later. A listed chunk may evict a clean slot of a
        later-listed one, never of an earlier one, so prefetch(active, upcoming) serves the active window
        first and, with a single slot, simply skips the upcoming one.
        """
        self._pump()
        self._keep = set(chunks)
        self._deferred = [c for c in self._deferred if c in self._keep]
        for i, chunk in enumerate(chunks):
            if not self._staged or self._slot_of(chunk) is not None:
                continue
            if i > 0 and self._disk and not self._read_finished(chunk):
                # the disk tier: a later-listed window whose files are not in staging yet is read ahead
                # (below) and filled by a later call once its read finished, instead of blocking here
                if chunk not in self._deferred:
                    self._deferred.append(chunk)
                continue
            slot = self._free_slot(set(chunks[: i + 1]))
            if slot is None:
                break
            self._fill(slot, chunk)
        for chunk in chunks:  # the disk tier: read the files of windows without a slot ahead
            if self._disk and self._slot_of(chunk) is None and self._staging_of(chunk) is None:
                buf = self._claim(set(chunks), host_writes=True)
                if buf is None:
                    break
                self._start_read(buf, chunk)

    def wait(self, chunk: int) -> Fetched:
        """The chunk's fp32 tensors on the device, after its copy finished; marks them as being updated."""
        self._pump()
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
            wait_s = self._host_waits_for_fill(slot) + self._io_wait_s
            self._io_wait_s = 0.0
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
        buf = None
        if self._disk:
            self._pump()
            buf = self._staging_of(chunk) or self._claim({chunk}, host_writes=False)
            self._host_waits_for_io(buf)  # no file job may read it while the copy below overwrites it
            buf.chunk, buf.reading, buf.tick = chunk, None, self._next_tick()
        self._side_waits_for_update()
        for k in self._staged:
            if k.store == "disk":
                self.streams.copy(buf.tensors[k.name][:n], slot.tensors[k.name][:n])
            elif k.store != "none":
                self.streams.copy(store[k.name], slot.tensors[k.name][:n])
        done = self.streams.side_event()
        if buf is not None:
            buf.drained, buf.dirty = done, True
            self._pump()  # its file write starts as soon as the copy finished (now, on the CPU)
        slot.dirty = False
        if not self._slot_survives_write_back:
            slot.chunk = None  # lossy or dropped states: the next visit must refetch from the store
        # A surviving slot is updated again at the window's next visit without a fill: that update must
        # not overwrite the slot while this copy still reads it (else the store gets the newer values),
        # so _host_waits_for_fill waits for the write-back too.
        slot.ready = done

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
        """Block until every issued copy finished, so the host may read or overwrite stores; on the disk
        tier also until every changed staging buffer is in its files (they are the stores)."""
        self.streams.synchronize()
        for buf in self._staging:
            if buf.dirty:
                self._flush(buf)
        for buf in self._staging:
            self._host_waits_for_io(buf)

    def _host_waits_for_read(self, buf: _Staging) -> None:
        """A copy out of the buffer must be issued only after the file read into it finished."""
        if buf.reading is not None:
            t0 = time.perf_counter()
            job, buf.reading = buf.reading, None
            job.result()
            self._io_wait_s += time.perf_counter() - t0

    def _host_waits_for_drain(self, buf: _Staging) -> None:
        """The host must read the buffer (to write its files) only after the slot -> buffer copy."""
        if buf.drained is not None:
            t0 = time.perf_counter()
            buf.drained.synchronize()
            buf.drained = None
            self._io_wait_s += time.perf_counter() - t0

    def _host_waits_for_staging_use(self, buf: _Staging) -> None:
        """The host must overwrite the buffer only after the side stream's copies out of it finished."""
        if buf.used is not None:
            t0 = time.perf_counter()
            buf.used.synchronize()
            buf.used = None
            self._io_wait_s += time.perf_counter() - t0

    def _host_waits_for_io(self, buf: _Staging) -> None:
        """The buffer must be overwritten only after the I/O thread's job on it finished (errors raise).
        Every staging wait's seconds go into the next wait()'s transfer wait."""
        self._host_waits_for_read(buf)
        if buf.writing is not None:
            t0 = time.perf_counter()
            job, buf.writing = buf.writing, None
            job.result()
            self._io_wait_s += time.perf_counter() - t0

    def close(self) -> None:
        """Finish every copy and file write and stop the I/O thread."""
        self.synchronize()
        if self._files is not None:
            self._files.close()

    def remove_files(self) -> None:
        """Finish, then delete the disk tier's files (scratch space: a finished run's states are in its
        checkpoints); the engine is unusable afterwards."""
        self.close()
        if self._files is not None:
            self._files.remove()

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
        # Disk kinds: mappings of the files as they are now (synchronize wrote every change): read page
        # by page by whoever saves them, unchanged by later write-backs (files are replaced, not rewritten).
        for c, s in enumerate(stores):
            s.update({k.name: self._files.snapshot(c, k.name) for k in self._disk})
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
        # Disk kinds: new files mapped shared, filled in place and then renamed over the state files.
        self._loading = {
            (c, k.name): self._files.load_target(c, k.name) for c in range(len(stores)) for k in self._disk
        }
        for (c, k), t in self._loading.items():
            stores[c][k] = t
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
        disk = {k.name for k in self._disk}
        for c, (mine, theirs) in enumerate(zip(self._stores, stores, strict=True)):
            if set(mine) | disk != set(theirs):
                expected = sorted(set(mine) | disk)
                raise ValueError(f"optimizer state kinds {sorted(theirs)} do not match {expected}")
            for k in sorted(set(theirs)):
                n = self.chunk_numels[c]
                shape = mine[k].shape if k in mine else torch.Size([n])
                if theirs[k].shape != shape:
                    raise ValueError(
                        f"optimizer state {k!r} has shape {tuple(theirs[k].shape)}, expected {tuple(shape)}"
                    )
        for c, (mine, theirs) in enumerate(zip(self._stores, stores, strict=True)):
            for k, t in mine.items():
                if theirs[k] is not t:  # load_targets() handed out the store itself: filled in place
                    t.copy_(theirs[k])
            for k in sorted(disk):
                if theirs[k] is self._loading.get((c, k)):  # load_targets()' file, filled: now the store
                    self._files.commit_loaded(c, k)
                else:
                    dtype = next(x.store_dtype for x in self._disk if x.name == k)
                    self._files.write_now(c, k, theirs[k].to(dtype).contiguous())
        self._loading = {}
        for buf in self._staging:  # every buffer's chunk has new files now
            buf.chunk, buf.dirty, buf.reading, buf.drained = None, False, None, None
        self._deferred = []
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
        buf = self._stage_in(chunk) if self._disk else None  # its files read into a staging buffer
        # No compute-stream wait is needed: a clean slot is no longer touched by the compute stream
        # (write_back made the side stream wait for the update), and side-stream FIFO puts this fill
        # after any pending write-back of the same slot or of this chunk's store (or staging buffer).
        for k in self._staged:
            if k.store == "none":
                self.streams.zero(slot.tensors[k.name][:n])
            elif k.store == "disk":
                self.streams.copy(slot.tensors[k.name][:n], buf.tensors[k.name][:n])
            else:
                self.streams.copy(slot.tensors[k.name][:n], store[k.name])
        slot.ready = self.streams.side_event()
        slot.chunk, slot.dirty = chunk, False
        if buf is not None:
            buf.used = slot.ready

    # ----- the disk tier's staging buffers --------------------------------------------------------------
    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _staging_of(self, chunk: int) -> _Staging | None:
        return next((b for b in self._staging if b.chunk == chunk), None)

    def _stage_in(self, chunk: int) -> _Staging:
        """The staging buffer holding the chunk's current disk kinds, its file read finished."""
        buf = self._staging_of(chunk)
        if buf is None:
            buf = self._claim({chunk}, host_writes=True)
            assert buf is not None  # keep holds one chunk, which no buffer holds: any buffer will do
            self._start_read(buf, chunk)
        buf.tick = self._next_tick()
        self._host_waits_for_read(buf)
        return buf

    def _start_read(self, buf: _Staging, chunk: int) -> None:
        n = self.chunk_numels[chunk]
        buf.chunk, buf.dirty, buf.tick = chunk, False, self._next_tick()
        buf.reading = self._files.submit_read(chunk, {k: t[:n] for k, t in buf.tensors.items()})

    def _claim(self, keep: set[int], *, host_writes: bool) -> _Staging | None:
        """A staging buffer emptied for reuse (its changes in the files, its jobs done): unused, or the
        least recently used one holding none of `keep`; None when every buffer holds one of them.
        host_writes: the host will overwrite it (a file read), so the side stream's reads of it must be
        done too; a slot -> staging copy is ordered after them by the side stream itself."""
        candidates = [b for b in self._staging if b.chunk is None] or sorted(
            (b for b in self._staging if b.chunk not in keep), key=lambda b: b.tick
        )
        if not candidates:
            return None
        buf = candidates[0]
        if buf.dirty:
            self._flush(buf)
        self._host_waits_for_io(buf)
        if host_writes:
            self._host_waits_for_staging_use(buf)
        buf.chunk, buf.dirty, buf.drained = None, False, None
        return buf

    def _flush(self, buf: _Staging) -> None:
        """Start writing a changed buffer to its files (after its slot -> staging copy finished)."""
        self._host_waits_for_drain(buf)
        self._host_waits_for_io(buf)
        n = self.chunk_numels[buf.chunk]
        buf.writing = self._files.submit_write(buf.chunk, {k: t[:n] for k, t in buf.tensors.items()})
        buf.dirty = False

    def _read_finished(self, chunk: int) -> bool:
        buf = self._staging_of(chunk)
        return buf is not None and (buf.reading is None or buf.reading.done())

    def _pump(self) -> None:
        """Without blocking: start the file writes whose slot -> staging copy finished, fill the deferred
        windows whose file read finished, and raise the error of any file job that failed."""
        for buf in self._staging:
            if buf.reading is not None and buf.reading.done():
                job, buf.reading = buf.reading, None
                job.result()  # raises a failed read's StateFileError (once)
            if buf.writing is not None and buf.writing.done():
                job, buf.writing = buf.writing, None
                job.result()  # raises a failed write's StateFileError (once)
            if buf.dirty and buf.writing is None and (buf.drained is None or buf.drained.query()):
                self._flush(buf)
        for chunk in list(self._deferred):
            if self._slot_of(chunk) is not None or self._staging_of(chunk) is None:
                self._deferred.remove(chunk)  # filled meanwhile, or evicted: wait() fetches it
            elif self._read_finished(chunk):
                slot = self._free_slot(self._keep | {chunk})
                if slot is not None:
                    self._deferred.remove(chunk)
                    self._fill(slot, chunk)
