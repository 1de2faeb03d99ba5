"""Atomic writes: a reader (or a process restarted after kill -9) sees the old file or the new one, never half.

Every durable artefact adaspec writes -- model dirs, traces, heads, step-cost caches, sidecar versions and
checkpoints -- goes through here: the content is written under a temp sibling name (`.tmp-<pid>-<name>`, so
concurrent writers never share one, and `leftovers()` finds what an interrupted write left) and renamed into
place. `fsync=True` also flushes the file and its directory, for state that must survive a power cut (the
sidecar's versions and checkpoints), not just a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

from safetensors.torch import save_file
from torch import Tensor

TMP_PREFIX = ".tmp-"


def tmp_sibling(path: Path) -> Path:
    """The temp name a write to `path` goes through (per process: concurrent writers never collide)."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def leftovers(directory: Path) -> list[Path]:
    """Temp files and dirs an interrupted write left in `directory` (to remove at start)."""
    return sorted(directory.glob(f"{TMP_PREFIX}*")) if directory.is_dir() else []


def remove(path: Path) -> None:
    """Remove a file or a directory tree, whichever it is (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (model weights are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk; best effort where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path | str, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to; on success it is renamed over `path`, on any
    error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str, fsync: bool = False, mode: int = 0o777) -> Iterator[Path]:
    """Yield an empty temp dir to build `path`'s new content in; on success it replaces `path` (an existing
    dir is moved aside first and removed after, so `path` is never missing its content for long and never
    half-written), on any error the temp dir is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    remove(tmp)
    tmp.mkdir(mode=mode)
    old = path.with_name(f"{TMP_PREFIX}{os.getpid()}-old-{path.name}")
    try:
        yield tmp
        if fsync:
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        moved = path.exists()
        if moved:
            remove(old)
            path.rename(old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if moved:
                old.rename(path)
            raise
        if fsync:
            fsync_dir(path.parent)
    finally:
        remove(tmp)
        remove(old)


def save_safetensors(tensors: Mapping[str, Tensor], path: Path | str, metadata: Mapping[str, str] | None = None,
                     fsync: bool = False) -> Path:
    """Write a safetensors file atomically (tensors must be contiguous CPU tensors)."""
    path = Path(path)
    with atomic_file(path, fsync=fsync) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return path


def write_text(path: Path | str, text: str, fsync: bool = False) -> Path:
    path = Path(path)
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path | str, obj: Any, indent: int | None = 2, fsync: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n", fsync=fsync)
