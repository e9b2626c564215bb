"""Tests of mbldm/io/atomic.py: atomic writes land with the content, the mode a plain ``open()`` gives
(0o666 & ~umask, not mkstemp's 0o600), refuse to overwrite when asked, and leave no temporary file behind."""
from __future__ import annotations

import json
import os
import stat

import pytest

from mbldm.io.atomic import atomic_path, write_bytes, write_json, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_each_writer_gives_open_mode_under_umask_022(tmp_path, umask_022):
    write_bytes(tmp_path / "a.bin", b"\x00\x01")
    write_text(tmp_path / "b.txt", "héllo")
    write_json(tmp_path / "c.json", {"k": [1, 2]})
    with atomic_path(tmp_path / "d.dat") as tmp:
        tmp.write_bytes(b"xyz")
    with open(tmp_path / "plain", "w"):  # the reference: what open() creates under this umask
        pass
    assert _mode(tmp_path / "plain") == 0o644
    for name in ("a.bin", "b.txt", "c.json", "d.dat"):
        assert _mode(tmp_path / name) == 0o644, name
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "héllo".encode("utf-8")
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "d.dat").read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.dat", "plain"]


def test_mode_follows_another_umask_and_umask_is_restored(tmp_path):
    old = os.umask(0o077)
    try:
        write_text(tmp_path / "private.txt", "x")
        assert _mode(tmp_path / "private.txt") == 0o600
        assert os.umask(0o077) == 0o077  # the writer put the umask back
    finally:
        os.umask(old)


def test_replacing_a_file_resets_its_mode(tmp_path, umask_022):
    target = tmp_path / "f.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o644


def test_refuses_to_overwrite(tmp_path):
    target = tmp_path / "f.txt"
    write_text(target, "one")
    with pytest.raises(FileExistsError, match="f.txt"):
        write_text(target, "two", overwrite=False)
    assert target.read_text() == "one"


def test_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
