"""Files chunkft writes honour the user's umask, and reach the disk before they are renamed into place.

tempfile.mkstemp/mkdtemp create 0600 files and 0700 directories, and an atomic write renames that
temporary into place: without a chmod the plan, the checkpoints and the exported model would be private
to their owner whatever the umask says, unlike every other file the user creates.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask: from /proc/self/status on Linux (reading it there changes nothing), else by
    setting it and straight back (os.umask can only be read so; for that instant another thread's new
    files would get mode 0666, hence not the first choice)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Give a file 0666 & ~umask and a directory tree 0777 & ~umask (files in it 0666 & ~umask), as if
    they had been created with open()/mkdir() instead of mkstemp()/mkdtemp()."""
    mask = current_umask()
    root = Path(path)
    if not root.is_dir():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """The file's bytes on the disk (before an atomic rename publishes it)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """A directory's entries on the disk (so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
