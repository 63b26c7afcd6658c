"""Atomic file writes: write a sibling temp file, fsync, rename over the target.

A reader (or a restarted process) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
