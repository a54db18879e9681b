"""Atomic file writes and robust text readers: the output folder only ever holds complete files."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

from rewardtune.errors import UserError


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
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


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    The file gets the mode a plain ``open`` would give (0666 minus the umask, not mkstemp's 0600) and is flushed
    to disk before the rename, and the rename before returning, so a power loss leaves the old or the new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_safe(value):
    """NaN and infinities become None (JSON has no NaN); dicts, lists and tuples are converted recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps_json(data, **kwargs) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf instead of the invalid bare ``NaN``."""
    return json.dumps(json_safe(data), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, dumps_json(data, indent=2) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write dict rows (the union of their keys as header) atomically."""
    header: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_text_file(path: str | Path, what: str = "file") -> str:
    """Read UTF-8 text or raise a one-line :class:`UserError` (missing, unreadable, binary)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    if b"\x00" in raw:
        raise UserError(f"{what} {str(path)!r} looks binary; expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{what} {str(path)!r} is not valid UTF-8 text") from None
