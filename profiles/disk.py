"""The disk the disk tier keeps optimizer states on: its sustained read and write rates.

The default is profiles/disks/nvme-pcie4.json (a conservative figure for a typical PCIe 4.0 NVMe, each
with its source, like the GPU profiles); --disk-read/--disk-write override it, and probe() measures a
directory's disk with one small file (write + fsync, then read with the page cache dropped for it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from chunkft.profiles import FrozenMap, ProfileError, _data_files, _positive_int

DEFAULT_DISK = "nvme-pcie4"
PROBE_BYTES = 256 * 2**20  # big enough to get past the drive's DRAM cache, small enough to take ~1 s
_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class DiskProfile:
    """Sustained sequential rates, integer bytes/s; sources says where each figure comes from."""

    key: str
    name: str
    read_bytes_per_s: int
    write_bytes_per_s: int
    sources: FrozenMap[str]


def load_disk(key: str = DEFAULT_DISK) -> DiskProfile:
    """A shipped disk profile by key; every figure must carry a source."""
    for stem, data in _data_files("disks"):
        if stem != key:
            continue
        origin = f"profiles/disks/{stem}.json"
        sources = data.get("sources") or {}
        figures = ("read_bytes_per_s", "write_bytes_per_s")
        missing = [f for f in figures if not str(sources.get(f, "")).strip()]
        if missing:
            raise ProfileError(f"{origin}: no source for {', '.join(missing)}; add one to 'sources'")
        return DiskProfile(
            key=str(data.get("key", stem)),
            name=str(data.get("name", stem)),
            read_bytes_per_s=int(_positive_int(data, "read_bytes_per_s", origin) or 0),
            write_bytes_per_s=int(_positive_int(data, "write_bytes_per_s", origin) or 0),
            sources=FrozenMap({str(k): str(v) for k, v in sources.items()}),
        )
    raise ProfileError(f"no disk profile {key!r} in profiles/disks; use {DEFAULT_DISK!r}")


def with_rates(disk: DiskProfile, read: int | None, write: int | None, source: str) -> DiskProfile:
    """The profile with the given rates (None: kept), their source replaced by `source`."""
    for flag, value in (("read", read), ("write", write)):
        if value is not None and value <= 0:
            raise ProfileError(f"disk {flag} rate must be more than 0 bytes/s; write e.g. 2GB")
    sources = dict(disk.sources)
    if read is not None:
        sources["read_bytes_per_s"] = source
    if write is not None:
        sources["write_bytes_per_s"] = source
    return replace(
        disk,
        read_bytes_per_s=disk.read_bytes_per_s if read is None else read,
        write_bytes_per_s=disk.write_bytes_per_s if write is None else write,
        sources=FrozenMap(sources),
    )


def probe(directory: str, nbytes: int = PROBE_BYTES) -> tuple[int, int]:
    """(read, write) bytes/s of the disk under `directory`: write + fsync one file, drop it from the page
    cache (posix_fadvise DONTNEED, so the read comes from the disk, not memory), read it, remove it."""
    if not os.path.isdir(directory):
        raise ProfileError(f"--probe-disk {directory}: not a directory; give the --state-dir you train with")
    path = os.path.join(directory, f".chunkft-disk-probe-{os.getpid()}")
    block = os.urandom(_CHUNK)
    written = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter_ns()
            while written < nbytes:
                written += os.write(fd, block[: min(_CHUNK, nbytes - written)])
            os.fsync(fd)
            write_ns = time.perf_counter_ns() - t0
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            read = 0
            t0 = time.perf_counter_ns()
            while chunk := os.read(fd, _CHUNK):
                read += len(chunk)
            read_ns = time.perf_counter_ns() - t0
        finally:
            os.close(fd)
    except OSError as e:
        why = e.strerror or e
        raise ProfileError(f"--probe-disk {directory}: {why}; check the path and free space") from None
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    if read != written:
        raise ProfileError(f"--probe-disk {directory}: read back {read} of {written} bytes; check the disk")
    return read * 10**9 // max(read_ns, 1), written * 10**9 // max(write_ns, 1)
