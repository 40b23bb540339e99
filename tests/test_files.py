"""Atomic writes (fedselect.files): the whole file or the old one, no temporary left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedselect.files import atomic_write_bytes, atomic_write_text, atomic_writer, temporary_glob


def test_atomic_write_text_and_bytes_create_folders_and_replace(tmp_path: Path):
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(target.parent) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path):
    target = tmp_path / "record.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_writer(target, "wb") as fh:
        fh.write(b"half")
        assert len(list(tmp_path.glob(temporary_glob(target)))) == 1
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert list(tmp_path.glob(temporary_glob(target))) == []


def test_files_get_umask_permissions_and_bad_modes_are_refused(tmp_path: Path):
    target = tmp_path / "shared.txt"
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "x", fsync=False)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError, match="mode"), atomic_writer(target, "a"):
        pass
