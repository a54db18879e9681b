"""Prompt sources: plain text (one per line), CSV (a ``prompt`` column) and JSON-lines (a ``prompt`` field)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rewardtune.errors import UserError
from rewardtune.utils.io import read_text_file


def read_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts of a ``.txt``, ``.csv`` or ``.jsonl`` file, in file order. Blank lines are skipped.

    Raises:
        UserError: the file is missing, unreadable, binary, malformed or holds no prompt.
    """
    path = Path(path)
    text = read_text_file(path, "prompt file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        prompts = _csv_prompts(text, path, column)
    elif suffix in (".jsonl", ".json"):
        prompts = _jsonl_prompts(text, path, column)
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"prompt file {str(path)!r} holds no prompt; put one prompt per line")
    return prompts


def _csv_prompts(text: str, path: Path, column: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or column not in reader.fieldnames:
        raise UserError(f"CSV prompt file {str(path)!r} has no {column!r} column (columns: {reader.fieldnames})")
    return [(row.get(column) or "").strip() for row in reader]


def _jsonl_prompts(text: str, path: Path, column: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{str(path)!r} line {number} is not valid JSON") from None
        if isinstance(record, str):
            prompts.append(record.strip())
        elif isinstance(record, dict) and isinstance(record.get(column), str):
            prompts.append(record[column].strip())
        else:
            raise UserError(f"{str(path)!r} line {number} has no string field {column!r}")
    return prompts
