"""Crash-safe writes: a temp file in the same folder, fsync, rename, then fsync the folder.

A reader therefore sees either the old file or the new one, never half of one. The `hook`
runs after the temp file is durable and before the rename (the `during_write` fault point),
which is exactly where a crash must leave the old file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

WriteHook = Callable[[Path], None]


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: Path, write: Callable[[Path], None], hook: WriteHook | None = None) -> Path:
    """Let `write` fill a temp file beside `path`, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if hook is not None:
            hook(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: Path, data: bytes, hook: WriteHook | None = None) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data), hook)


def write_text(path: Path, text: str, hook: WriteHook | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), hook)


def write_json(path: Path, data: Any, hook: WriteHook | None = None, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent), hook)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it: an append-only log (metrics.jsonl) loses at most the line
    being written, and a reader skips a torn last line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines file, and the numbers (1-based) of lines that were torn."""
    records, torn = [], []
    if not Path(path).is_file():
        return records, torn
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn.append(number)
    return records, torn
