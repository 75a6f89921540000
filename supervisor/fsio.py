"""Small durable-I/O helpers shared by the state store and the effect ledger."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_all(fd: int, raw: bytes) -> None:
    """Write every byte of ``raw`` to ``fd``. Raises ``OSError``."""
    view = memoryview(raw)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            # Would loop forever otherwise; a regular file never does this short of a fault.
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable. Raises ``OSError``."""
    # O_DIRECTORY is Linux/BSD; elsewhere opening read-only works the same for fsync.
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)`` style text for an operator."""
    if exc.errno is None:
        return str(exc)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
