"""One chunkft-run per output directory: an exclusive flock on OUTPUT/.lock, held for the whole run.

Two runs writing one directory would interleave checkpoints and metrics and fail in confusing ways
(a checkpoint pruned under the other's feet). flock is released by the kernel when the process ends,
however it ends, so a run killed with SIGKILL leaves no stale lock to clean up. The file itself stays
(it holds the holder's pid, for the message): unlinking a lock file lets a third process lock a new file
while a second one holds the old, so it is never removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputInUse(Exception):
    """Another process holds the output directory's lock; str() is the one-line message."""

    def __init__(self, output_dir: Path, pid: int | None) -> None:
        self.pid = pid
        holder = f"another chunkft-run (pid {pid})" if pid else "another chunkft-run"
        super().__init__(
            f"--output {output_dir} is in use by {holder}; wait for it or choose another --output"
        )


class OutputLock:
    """The lock of one output directory; acquire() when the directory exists, release() at the end."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Lock, or raise OutputInUse. False when the filesystem cannot lock (the run goes on unlocked)."""
        if self._fd is not None:
            return True
        fd = os.open(self.output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputInUse(self.output_dir, pid) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
