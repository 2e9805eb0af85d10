"""toolkit.fsio: a write that fails leaves the previous file (or folder) as it was and names the path."""

import errno

import numpy as np
import pytest

from toolkit import fsio
from toolkit.errors import UserError
from toolkit.shards.format import open_shard, write_shard


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_keeps_the_old_file_when_the_write_raises(tmp_path):
    path = tmp_path / "a.txt"
    fsio.atomic_write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("half of the new")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        fsio.atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_disk_full_is_a_user_error_naming_the_path(tmp_path):
    path = tmp_path / "sub" / "meta.json"
    fsio.atomic_write_json(path, {"v": 1})

    def write(tmp):
        tmp.write_bytes(b"partial")
        _disk_full()

    with pytest.raises(UserError) as e:
        fsio.atomic_write(path, write)
    assert str(path) in str(e.value) and "disk is full" in str(e.value)
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert not list(path.parent.glob("*.tmp"))


def test_atomic_write_helpers_write_the_whole_file(tmp_path):
    fsio.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    fsio.atomic_write_json(tmp_path / "deep" / "c.json", [1, 2])
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "deep" / "c.json").read_text() == "[\n  1,\n  2\n]\n"


def test_build_atomically_keeps_the_old_folder_when_build_raises(tmp_path):
    out = tmp_path / "out"

    def build_v1(tmp):
        (tmp / "f.txt").write_text("v1")
        return "first"

    assert fsio.build_atomically(out, build_v1) == "first"

    def build_broken(tmp):
        (tmp / "f.txt").write_text("v2, half")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        fsio.build_atomically(out, build_broken)
    assert (out / "f.txt").read_text() == "v1"
    assert not (tmp_path / "out.partial").exists()

    def build_v2(tmp):
        (tmp / "g.txt").write_text("v2")

    fsio.build_atomically(out, build_v2)
    assert sorted(p.name for p in out.iterdir()) == ["g.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_build_atomically_disk_full_names_the_folder(tmp_path):
    out = tmp_path / "shards"
    fsio.build_atomically(out, lambda tmp: (tmp / "x").write_text("old"))

    def build(tmp):
        (tmp / "x").write_text("new")
        _disk_full()

    with pytest.raises(UserError, match="disk is full") as e:
        fsio.build_atomically(out, build)
    assert str(out) in str(e.value)
    assert (out / "x").read_text() == "old"
    assert not (tmp_path / "shards.partial").exists()


def test_write_shard_disk_full_keeps_the_earlier_shard(tmp_path, monkeypatch):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    before = path.read_bytes()

    real_open = open

    class FillsUp:  # the header goes through, then the disk is full
        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                _disk_full()
            return self.f.write(data)

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FillsUp(f) if "w" in mode else f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(UserError) as e:
        write_shard(path, np.arange(20, dtype=np.uint16))
    monkeypatch.undo()
    assert str(path) in str(e.value) and "disk is full" in str(e.value)
    assert path.read_bytes() == before
    assert open_shard(path).tolist() == list(range(10))
    assert not list(tmp_path.glob("*.tmp"))
