"""Atomic file writes: write a sibling temp file, fsync, rename over the target.

A reader (or a restarted process) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK = ".lock"  # in a run directory or a sweep's folder: the pid of the process working in it


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def append_line(path: Path, value: Any) -> None:
    """Append one JSON object as a line and fsync (metrics.jsonl style logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_private(path, "a") as handle:
        handle.write(json.dumps(value, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def private_dir(path: Path | str) -> Path:
    """A folder only its owner can enter (a run directory, a state root): what is inside
    names clients and their records' effects, whatever modes other tools give their files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_private(path: Path, mode: str = "a"):
    """Open for appending (`"a"`, text; `"ab"`, bytes), created 0600 like every other file
    of a run directory or state store (they name clients and their records' effects)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.chmod(path, 0o600)  # a file made 0644 by an older version is narrowed too
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


class InUse(Exception):
    """Another live process holds the folder's lock (its pid, as it wrote it)."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by process {holder}")
        self.folder, self.holder = folder, holder


@contextmanager
def exclusive(folder: Path | str) -> Iterator[Path]:
    """Hold `folder`/.lock while the block runs, or raise `InUse` at once. Two processes in
    one run directory would each resume it, charge the same devices' ledgers for the same
    round twice and interleave their rounds in metrics.jsonl. The kernel drops the lock
    when its holder dies, so a crashed run never leaves a stale one behind."""
    import fcntl

    folder = private_dir(folder)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUse(folder, os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)
