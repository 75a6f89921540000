"""Small durable-I/O helpers shared by the state store and the effect ledger."""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from supervisor.errors import StateError

# StateError names an agent; errors about the whole directory name this placeholder.
_ALL_AGENTS = "*"


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


def prepare_directory(
    directory: Path, *, mode: int, temp_names: Iterable[re.Pattern[str]], what: str
) -> int:
    """Create ``directory`` with ``mode`` if missing (its new entry made durable), then remove
    the temp files a crash left in it (names a pattern of ``temp_names`` fully matches).

    Returns how many temp files were removed. Raises ``StateError`` (subject ``"*"``) when the
    path exists but is not a directory, or cannot be created, listed or cleaned; ``what``
    names the directory in the message (``state``, ``effect ledger``).
    """
    patterns = tuple(temp_names)
    try:
        if directory.exists() and not directory.is_dir():
            raise StateError(_ALL_AGENTS, f"{what} path {directory} is not a directory")
        if not directory.exists():
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
            # Make the new directory entry itself durable.
            fsync_directory(directory.parent)
        removed = 0
        with os.scandir(directory) as entries:
            stale = [e.path for e in entries if any(p.fullmatch(e.name) for p in patterns)]
        for leftover in stale:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                continue
            removed += 1
    except OSError as exc:
        raise StateError(
            _ALL_AGENTS,
            f"cannot prepare {what} directory {directory}: {describe_os_error(exc)}",
        ) from exc
    return removed


def replace_atomically(
    directory: Path, target: Path, raw: bytes, *, mode: int, flush: bool = True
) -> None:
    """Write ``raw`` to a temp file ``.<target name>.<16 hex>.tmp`` (created with ``mode``)
    in ``directory`` and rename it onto ``target``.

    With ``flush`` the temp file is fsynced before the rename; the rename is durable once
    the caller syncs ``directory``. Raises ``OSError``; the temp file is removed first when it
    can be.
    """
    temp = directory / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, raw)
            if flush:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass  # nothing more to do; ``prepare_directory`` removes it at the next start
        raise


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)`` style text for an operator."""
    if exc.errno is None:
        return str(exc)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
