"""Suite-wide settings: tiny models run fastest (and deterministically) on one intra-op thread, and plan
traces are cached in a directory of this session, never the user's ~/.cache/chunkft."""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Module level: test modules copy os.environ into their subprocesses' environment when imported.
_TRACE_CACHE = tempfile.mkdtemp(prefix="chunkft-test-cache-")
os.environ["CHUNKFT_CACHE_DIR"] = _TRACE_CACHE
atexit.register(shutil.rmtree, _TRACE_CACHE, True)

torch.set_num_threads(1)


@pytest.fixture
def disk_full_after_one_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.write_bytes fails with ENOSPC once its directory holds a file: the disk fills up after the
    first file of a report, so a test sees whether a half-written output is left behind."""
    real = Path.write_bytes

    def full_after_one(self: Path, data: bytes) -> int:
        if any(self.parent.glob("*")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_after_one)
