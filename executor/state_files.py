"""The disk tier's files: one file per (window, kind) of optimizer state or fp32 master rows under a run's
state directory, read and written by one I/O thread so the reads and write-backs overlap compute.

Why one file per (window, kind): each file is a flat array of exactly one store's bytes, so it maps as a
tensor (torch.from_file) with no offsets, and replacing one never touches another.

Why files are only ever replaced, never written in place: every write goes to a temporary file that is
fsynced (DiskTier.fsync says why, and why it may be off) and renamed over the old one (os.replace), so a
reader, a kill, or a full disk at any instant leaves either the old or the new bytes, never a mix. It also
makes a mapped file a snapshot: a mapping (`snapshot`) keeps the inode it opened, whatever is renamed over
the name later, which is how a checkpoint copies the states without reading them all into memory first
(executor/checkpoint.py writes them from fresh mappings, one file at a time).

The state directory is scratch space for one running process: a resume restores it from the checkpoint
(`load_target` + `commit_loaded`), never from what a killed run left there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from chunkft.files import fsync_dir, fsync_file

SUFFIX = ".bin"
TMP_SUFFIX = ".tmp"
LOAD_SUFFIX = ".load"
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


FileIO = Literal["thread", "inline", "late"]
FILE_IO: tuple[str, ...] = ("thread", "inline", "late")


@dataclass(frozen=True)
class DiskTier:
    """Where the disk tier's files live and how they move.

    io: "thread" (one I/O thread, jobs in order: the real thing), "inline" (each job runs when submitted)
    or "late" (a stand-in for a slow disk: each job runs only when something waits for it, as late as
    the engine's waits allow, like executor/stream_standins.LateStreams for the side stream).
    staging_buffers: pinned buffers between files and slots; None: the engine's max_slots + 2.
    fsync: fsync each write-back before its rename (default). Correctness does not need it: the rename
    alone makes every file old or new for this process (and for a killed one), and no run reads a state
    file after a crash (a resume restores them from its checkpoint; tests/test_state_disk_run.py kills a
    run mid-write). It turns the written pages clean at once, so a host with less RAM than the states
    never carries them as dirty page cache; on the I/O thread it made no step-time difference beyond
    the noise here (bench/results/disk_tier.md), though one 24 MiB file takes 172 ms with it and 70 ms
    without on this machine's disk."""

    directory: Path
    io: FileIO = "thread"
    staging_buffers: int | None = None
    fsync: bool = True

    def __post_init__(self) -> None:
        if self.io not in FILE_IO:
            raise ValueError(f"disk tier io {self.io!r} is unknown; use one of {', '.join(FILE_IO)}")
        if self.staging_buffers is not None and self.staging_buffers < 1:
            raise ValueError(f"staging_buffers must be >= 1, got {self.staging_buffers}")


class StateFileError(RuntimeError):
    """Reading or writing a state file failed; one line (what failed, what to do). `disk_full` says
    whether the disk (or a quota or file-size limit) was full, so the caller can name the resume command."""

    def __init__(self, message: str, *, disk_full: bool, path: Path) -> None:
        super().__init__(message)
        self.disk_full = disk_full
        self.path = path


def _bytes(t: Tensor) -> memoryview:
    """The tensor's bytes without a copy (flat and contiguous: a store or a staging view)."""
    return memoryview(t.detach().view(torch.uint8).numpy())


def _write_all(f, data: memoryview) -> None:  # noqa: ANN001 - a binary file object
    """Write every byte (a module function, so a test can make it fail as a full disk does)."""
    done = 0
    while done < len(data):
        done += f.write(data[done:])


def _failure(what: str, path: Path, e: OSError) -> StateFileError:
    full = e.errno in NO_SPACE
    reason = e.strerror or type(e).__name__
    advice = (
        f"free space on {path.parent} (or give --state-dir on a disk with room)"
        if full
        else f"check {path.parent}"
    )
    return StateFileError(f"{what} {path} failed ({reason}); {advice}", disk_full=full, path=path)


class Job:
    """A read or write: on the I/O thread (a future), already run (inline), or queued (late)."""

    def __init__(
        self,
        future: Future | None = None,
        error: StateFileError | None = None,
        late: tuple[_LateQueue, int] | None = None,
    ) -> None:
        self._future = future
        self._error = error
        self._late = late

    def done(self) -> bool:
        if self._late is not None:
            queue, position = self._late
            return queue.ran > position
        return self._future is None or self._future.done()

    def result(self) -> None:
        """Block until done; raise its StateFileError."""
        if self._late is not None:
            queue, position = self._late
            queue.run_through(position)
            self._error = queue.errors.get(position)
        if self._future is not None:
            self._future.result()
        if self._error is not None:
            raise self._error


class _LateQueue:
    """Jobs run in order, each only when its result is asked for (the "late" stand-in)."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []
        self.ran = 0
        self.errors: dict[int, StateFileError] = {}

    def run_through(self, position: int) -> None:
        while self.ran <= position:
            try:
                self.jobs[self.ran]()
            except StateFileError as e:
                self.errors[self.ran] = e
            self.jobs[self.ran] = _nothing  # drop the finished job's tensors
            self.ran += 1


def _nothing() -> None:
    return None


class StateFiles:
    """The files of every (chunk, kind) on the disk tier, and the thread that reads and writes them."""

    def __init__(
        self,
        directory: Path,
        pieces: Sequence[tuple[int, str, int, torch.dtype]],
        *,
        io: FileIO = "thread",
        fsync: bool = True,
    ) -> None:
        """pieces: (chunk, kind, numel, dtype) of each file; io, fsync: see DiskTier."""
        if io not in FILE_IO:
            raise ValueError(f"disk tier io {io!r} is unknown; use one of {', '.join(FILE_IO)}")
        self.directory = Path(directory)
        self._pieces = {(c, k): (n, d) for c, k, n, d in pieces}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="chunkft-state-io") if io == "thread" else None
        self._late = _LateQueue() if io == "late" else None
        self._fsync = fsync

    def path(self, chunk: int, kind: str) -> Path:
        return self.directory / f"chunk-{chunk:05d}.{kind}{SUFFIX}"

    def nbytes(self) -> int:
        """Bytes of all the files (what the disk tier keeps out of host memory)."""
        return sum(n * d.itemsize for n, d in self._pieces.values())

    def create(self) -> None:
        """Every file, zero-filled (sparse: no bytes written) and renamed into place, replacing any a
        previous run left."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _failure("creating the state directory", self.directory / "x", e) from None
        for (c, k), (n, d) in self._pieces.items():
            path = self.path(c, k)
            tmp = path.with_name(path.name + TMP_SUFFIX)
            try:
                with open(tmp, "wb") as f:
                    f.truncate(n * d.itemsize)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                self.remove()  # nothing half-made left behind
                raise _failure("creating state file", path, e) from None
        fsync_dir(self.directory)

    # ----- jobs ------------------------------------------------------------------------------------------
    def submit_read(self, chunk: int, targets: dict[str, Tensor]) -> Job:
        """Read the chunk's files into `targets` (kind -> flat tensor of the file's numel)."""
        return self._submit(self._read, chunk, targets)

    def submit_write(self, chunk: int, sources: dict[str, Tensor]) -> Job:
        """Replace the chunk's files with `sources` (kind -> flat tensor), each atomically."""
        return self._submit(self._write, chunk, sources)

    def _submit(self, fn, chunk: int, tensors: dict[str, Tensor]) -> Job:  # noqa: ANN001
        if self._pool is not None:
            return Job(self._pool.submit(fn, chunk, tensors))
        if self._late is not None:
            self._late.jobs.append(lambda: fn(chunk, tensors))
            return Job(late=(self._late, len(self._late.jobs) - 1))
        try:
            fn(chunk, tensors)
        except StateFileError as e:
            return Job(error=e)
        return Job()

    def _read(self, chunk: int, targets: dict[str, Tensor]) -> None:
        for kind, t in targets.items():
            path = self.path(chunk, kind)
            want = t.numel() * t.element_size()
            try:
                with open(path, "rb", buffering=0) as f:
                    got, view = 0, _bytes(t)
                    while got < want:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
            except OSError as e:
                raise _failure("reading state file", path, e) from None
            if got != want:
                raise StateFileError(
                    f"state file {path} holds {got} bytes, expected {want}; another process changed the "
                    "state directory: resume from the last checkpoint",
                    disk_full=False,
                    path=path,
                )

    def _write(self, chunk: int, sources: dict[str, Tensor]) -> None:
        for kind, t in sources.items():
            write_atomically(self.path(chunk, kind), t, fsync=self._fsync)

    def write_now(self, chunk: int, kind: str, t: Tensor) -> None:
        """Replace one file with `t` on the calling thread (loading a state that came in memory)."""
        write_atomically(self.path(chunk, kind), t, fsync=self._fsync)

    # ----- mappings: checkpoints and resume ----------------------------------------------------------------
    def snapshot(self, chunk: int, kind: str) -> Tensor:
        """The file's current contents as a read-only-by-convention private mapping: later replacements
        of the file do not change it (see the module docstring), and it costs no memory until read."""
        n, d = self._pieces[(chunk, kind)]
        path = str(self.path(chunk, kind))
        st = os.stat(path)
        t = torch.from_file(path, shared=False, size=n, dtype=d)
        key = t.untyped_storage().data_ptr()
        _MAPPED[key] = (path, st.st_dev, st.st_ino)
        weakref.finalize(t, _MAPPED.pop, key, None)
        return t

    def load_target(self, chunk: int, kind: str) -> Tensor:
        """A new zero-filled file mapped shared, for a checkpoint reader to fill in place; commit_loaded
        renames it over the state file."""
        n, d = self._pieces[(chunk, kind)]
        path = self.path(chunk, kind).with_suffix(LOAD_SUFFIX)
        try:
            with open(path, "wb") as f:
                f.truncate(n * d.itemsize)
                if n:  # the blocks up front: a full disk is an error here, not a SIGBUS in the mapping
                    os.posix_fallocate(f.fileno(), 0, n * d.itemsize)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise _failure("creating state file", path, e) from None
        t = torch.from_file(str(path), shared=True, size=n, dtype=d)
        key = t.untyped_storage().data_ptr()
        _LOADING[key] = str(path)
        weakref.finalize(t, _LOADING.pop, key, None)
        return t

    def commit_loaded(self, chunk: int, kind: str) -> None:
        """Make the filled load_target the state file (renamed over it)."""
        final = self.path(chunk, kind)
        path = final.with_suffix(LOAD_SUFFIX)
        try:
            if self._fsync:
                fsync_file(path)
            os.replace(path, final)
        except OSError as e:
            raise _failure("writing state file", final, e) from None

    def remove(self) -> None:
        """Delete every file (and the directory, when nothing else is in it)."""
        for c, k in self._pieces:
            self.path(c, k).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._late is not None:
            self._late.run_through(len(self._late.jobs) - 1)


# storage address of a live snapshot() -> (path, device, inode) of the file it maps
_MAPPED: dict[int, tuple[str, int, int]] = {}


def fresh_mapping(t: Tensor) -> Tensor | None:
    """A new mapping of the same bytes as `t`, a snapshot() (or a view of one from its start), while its
    file is still the one it mapped; None otherwise.

    Why: a checkpoint writer reads every page of a snapshot, and the pages stay in the process (its RSS)
    for as long as the snapshot lives, i.e. until the whole checkpoint is written: all the states at once.
    A fresh mapping per file, dropped once that file is written, holds one file's pages at a time."""
    entry = _MAPPED.get(t.untyped_storage().data_ptr())
    if entry is None or t.storage_offset() != 0 or not t.is_contiguous():
        return None
    path, dev, ino = entry
    try:
        st = os.stat(path)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != (dev, ino):  # replaced since: only the snapshot has those bytes now
        return None
    return torch.from_file(path, shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)


# storage address of a live load_target() -> the path of the file it maps (shared)
_LOADING: dict[int, str] = {}


def fresh_load_mapping(t: Tensor) -> Tensor | None:
    """A new shared mapping of the file a load_target() `t` (or a view of it from its start) maps, None
    for any other tensor: a checkpoint reader fills it and drops it, so a resume holds one file's written
    pages at a time instead of every state file's until the load ends (the writes land in the same file,
    which `t` maps too)."""
    path = _LOADING.get(t.untyped_storage().data_ptr())
    if path is None or t.storage_offset() != 0 or not t.is_contiguous():
        return None
    return torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)


def write_atomically(path: Path, t: Tensor, *, fsync: bool = True) -> None:
    """Replace `path` with the tensor's bytes: temporary file, fsync (when asked), rename; on failure the
    temporary goes and the old file stays as it was."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, _bytes(t))
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _failure("writing state file", path, e) from None


