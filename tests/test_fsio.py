"""``supervisor.fsio``: preparing a state or ledger directory and replacing a file atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from supervisor.errors import StateError
from supervisor.fsio import prepare_directory, replace_atomically

TEMP = re.compile(r"\.[a-z]+\.json\.[0-9a-f]{16}\.tmp")
OTHER = re.compile(r"\.journal\.log\.[0-9a-f]{16}\.tmp")


def test_prepare_creates_a_missing_directory_with_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "state"
    assert prepare_directory(directory, mode=0o750, temp_names=(TEMP,), what="state") == 0
    assert directory.is_dir()
    assert directory.stat().st_mode & 0o777 == 0o750 & ~_umask()


def test_prepare_removes_only_matching_temp_files(tmp_path: Path) -> None:
    stale = [".alpha.json.0123456789abcdef.tmp", ".journal.log.fedcba9876543210.tmp"]
    kept = ["alpha.json", ".alpha.json.tmp", "alpha.json.0123456789abcdef.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert prepare_directory(tmp_path, mode=0o750, temp_names=(TEMP, OTHER), what="state") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_prepare_refuses_a_path_that_is_not_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "ledger"
    target.write_bytes(b"not a directory")
    with pytest.raises(StateError, match=r"effect ledger path .* is not a directory") as info:
        prepare_directory(target, mode=0o750, temp_names=(), what="effect ledger")
    assert info.value.agent == "*"
    assert target.read_bytes() == b"not a directory"


def test_prepare_reports_an_os_error(tmp_path: Path) -> None:
    parent = tmp_path / "file"
    parent.write_bytes(b"")
    with pytest.raises(StateError, match=r"cannot prepare state directory .*\(ENOTDIR\)"):
        prepare_directory(parent / "state", mode=0o750, temp_names=(), what="state")


@pytest.mark.parametrize("flush", [True, False])
def test_replace_writes_the_bytes_and_leaves_no_temp_file(tmp_path: Path, flush: bool) -> None:
    target = tmp_path / "alpha.json"
    target.write_bytes(b"old")
    replace_atomically(tmp_path, target, b"new", mode=0o640, flush=flush)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["alpha.json"]


def test_replace_removes_its_temp_file_when_it_fails(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "alpha.json"  # the rename fails: no such directory
    with pytest.raises(FileNotFoundError):
        replace_atomically(tmp_path, target, b"new", mode=0o640)
    assert list(tmp_path.iterdir()) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
