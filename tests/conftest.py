"""Suite-wide settings: tiny models run fastest (and deterministically) on one intra-op thread."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

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
