"""Durable writes: fsync'd atomic files and folder replacement with no moment where the destination is missing."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
# What renameat2 answers where the kernel, libc or file system cannot exchange: then two renames do it.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry and contents to disk (a folder's fsync makes its renames durable)."""
    if os.name != "posix":
        return  # folders cannot be opened for fsync elsewhere; the rename is as atomic as the platform allows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path`, then every folder (deepest first), then `path` itself."""
    path = Path(path)
    if not path.is_dir():
        fsync_path(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(os.path.join(root, name))
        fsync_path(root)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write `path` through a temporary file in the same folder: fsync'd, renamed over `path`, the folder fsync'd.

    Readers see the old file or the complete new one; on an error the old file stays and the temporary goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() would give
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_directory(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make the complete folder `tmp` (same parent folder as `dst`) become `dst`, durably.

    `tmp`'s files and folders are fsync'd first. An existing `dst` is swapped with `tmp` in one atomic exchange, so
    `dst` exists at every moment (where the exchange is unsupported: two renames, a short window without `dst`),
    then the old content is deleted and the parent folder fsync'd.
    """
    tmp, dst = Path(tmp), Path(dst)
    fsync_tree(tmp)
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
    elif exchange(tmp, dst):
        _remove(tmp)  # tmp now names the old content
    else:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        _remove(old)
    fsync_path(dst.parent)
