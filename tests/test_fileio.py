"""Durable writes: atomic files and folder replacement by exchange (jaxdiff/fileio.py)."""

import os
import sys

import pytest

from jaxdiff import fileio
from jaxdiff.convert import checkpoint


def _tree(path):
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_atomic_write_text_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "report.json"
    fileio.atomic_write_text(target, "one\n")
    fileio.atomic_write_text(target, "twö\n")
    assert target.read_text(encoding="utf-8") == "twö\n"
    assert os.listdir(target.parent) == ["report.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would create it


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_keeps_the_old_content_on_error(tmp_path):
    target = tmp_path / "x.bin"
    fileio.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), fileio.atomic_file(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_swaps_two_folders_in_one_call_on_linux(tmp_path):
    a = _folder(tmp_path / "a", {"new.txt": "new"})
    b = _folder(tmp_path / "b", {"old.txt": "old", "sub/deep.txt": "deep"})
    assert fileio.exchange(a, b) is True  # this file system and kernel exchange: the no-window path is taken
    assert _tree(b) == {"new.txt": "new"} and _tree(a) == {"old.txt": "old", "sub/deep.txt": "deep"}


def test_replace_directory_swaps_in_new_content_and_removes_old(tmp_path, monkeypatch):
    dst = _folder(tmp_path / "out", {"old.txt": "old", "sub/deep.txt": "deep"})
    tmp = _folder(tmp_path / "out.tmp", {"new.txt": "new", "model/params": "p"})
    calls = []
    exchange = fileio.exchange
    monkeypatch.setattr(fileio, "exchange", lambda a, b: calls.append((a, b)) or exchange(a, b))
    renames = []
    rename = os.rename
    monkeypatch.setattr(fileio.os, "rename", lambda a, b: renames.append((a, b)) or rename(a, b))
    synced = []
    fsync = fileio.fsync_path
    monkeypatch.setattr(fileio, "fsync_path", lambda p: synced.append(os.fspath(p)) or fsync(p))

    fileio.replace_directory(tmp, dst)
    assert _tree(dst) == {"new.txt": "new", "model/params": "p"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither tmp nor an .old folder is left
    assert calls == [(tmp, dst)]
    if sys.platform.startswith("linux"):
        assert renames == []  # exchanged: no moment without `out`
    # Every written file, the folders under tmp and tmp itself, then the parent after the swap, were fsync'd.
    assert {str(tmp / "new.txt"), str(tmp / "model" / "params"), str(tmp / "model"), str(tmp)} <= set(synced)
    assert synced[-1] == str(tmp_path)


def test_replace_directory_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "exchange", lambda a, b: False)  # e.g. not Linux, or a file system without it
    dst = _folder(tmp_path / "out", {"old.txt": "old"})
    fileio.replace_directory(_folder(tmp_path / "out.tmp", {"new.txt": "new"}), dst)
    assert _tree(dst) == {"new.txt": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fileio.replace_directory(_folder(tmp_path / "other.tmp", {"a": "a"}), tmp_path / "other")  # no dst: one rename
    assert _tree(tmp_path / "other") == {"a": "a"}


def test_replace_directory_replaces_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    fileio.replace_directory(_folder(tmp_path / "out.tmp", {"new.txt": "new"}), tmp_path / "out")
    assert _tree(tmp_path / "out") == {"new.txt": "new"} and sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_overwrites_through_the_exchange(tmp_path, monkeypatch):
    dst = _folder(tmp_path / "ckpt", {"stale.txt": "stale"})
    seen = []
    replace = fileio.replace_directory
    monkeypatch.setattr(fileio, "replace_directory", lambda t, d: seen.append(d.exists()) or replace(t, d))
    with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "params.safetensors").write_text("new")
        assert _tree(dst) == {"stale.txt": "stale"}  # untouched while the new one is written
    assert seen == [True] and _tree(dst) == {"params.safetensors": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
