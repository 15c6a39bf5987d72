"""One chunkft-run per output directory: an exclusive flock on the directory itself, held for the run.

Two runs writing one directory would interleave checkpoints and metrics and fail in confusing ways
(a checkpoint pruned under the other's feet). flock is released by the kernel when the process ends,
however it ends, so a run killed with SIGKILL leaves no stale lock to clean up. The lock is taken on the
directory's own descriptor, so a run refused while it validates its inputs leaves nothing behind; once
the run writes, it also records its pid in OUTPUT/.lock, for the message a second run prints (the file
is only a note: a pid there counts only while its process lives and the directory is locked).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

PID_FILE = ".lock"
# The filesystem cannot flock a directory (NFS emulates flock with byte-range locks, which a read-only
# descriptor cannot take: EBADF): the run goes on unlocked, with a note.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


class OutputInUse(Exception):
    """Another process holds the output directory's lock; str() is the one-line message."""

    def __init__(self, output_dir: Path, pid: int | None) -> None:
        self.pid = pid
        holder = f"another chunkft-run (pid {pid})" if pid else "another chunkft-run"
        super().__init__(
            f"--output {output_dir} is in use by {holder}; wait for it or choose another --output"
        )


class OutputLock:
    """The lock of one output directory: acquire() once it exists, note_pid() when the run starts
    writing there, release() at the end."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._fd: int | None = None
        self.tried = False  # acquire() ran: held, or the filesystem cannot lock (said once)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Lock, or raise OutputInUse. False when the filesystem cannot lock (the run goes on unlocked)."""
        if self._fd is not None:
            return True
        self.tried = True
        fd = os.open(self.output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUse(self.output_dir, _live_pid(self.output_dir / PID_FILE)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                return False
            raise
        self._fd = fd
        return True

    def note_pid(self) -> None:
        """Record this process in OUTPUT/.lock (best effort: it only improves another run's message)."""
        if self._fd is None:
            return
        try:
            (self.output_dir / PID_FILE).write_text(f"{os.getpid()}\n")
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _live_pid(path: Path) -> int | None:
    """The pid a lock holder recorded, if that process still runs (a holder still validating its inputs
    has not written one, and the file may name an earlier run)."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it lives, under another user
    return int(text)
