"""Prompt sources, all through :func:`read_prompts`:

- plain text (one prompt per line), CSV (a prompt column), JSON lines (strings or objects);
- JSON: a list of strings (the HPSv2 benchmark files ``anime.json`` ...), a list of objects (HPDv2's
  ``train.json`` / ``test.json``, whose entries carry ``"prompt"``), or ``{name: [prompts]}``;
- Parquet and Arrow files, e.g. Pick-a-Pic's ``data/train-*.parquet`` shards (``caption`` column);
- folders: a local Hugging Face dataset (``save_to_disk`` output, or a snapshot of a hub dataset with Parquet
  shards), or a folder of JSON prompt files (the HPSv2 benchmark folder: all styles, in file-name order).

A bare name such as ``animals45`` or ``shapes_small`` names a prompt set shipped in ``rewardtune/assets/prompts``
(see :func:`shipped_prompt_sets`). The prompt column is ``column`` when given, else the first of
:data:`PROMPT_COLUMNS` that the source has.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rewardtune.errors import UserError
from rewardtune.utils.io import read_text_file

PROMPT_COLUMNS = ("prompt", "caption", "text")
SHIPPED = Path(__file__).resolve().parent / "assets" / "prompts"
TABLE_SUFFIXES = (".parquet", ".arrow")


def read_prompts(path: str | Path, column: str | None = None, split: str = "train", unique: bool = False
                 ) -> list[str]:
    """Prompts of a file or folder (see the module docstring), stripped, blanks skipped, in source order.

    Args:
        column: the prompt column or field; None picks the first of :data:`PROMPT_COLUMNS` present.
        split: the split of a dataset folder that holds several (``DatasetDict``).
        unique: drop repeated prompts, keeping the first (Pick-a-Pic repeats each caption per image pair).

    Raises:
        UserError: the source is missing, unreadable, malformed or holds no prompt.
    """
    path = resolve_prompt_source(path)
    if path.is_dir():
        prompts = _folder_prompts(path, column, split)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        prompts = _table_prompts([path], column, path)
    else:
        prompts = _text_prompts(path, column)
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if unique:
        prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise UserError(f"prompt source {str(path)!r} holds no prompt; put one prompt per line")
    return prompts


def shipped_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with rewardtune (e.g. ``animals45``: DDPO's 45 common animals)."""
    return sorted(p.stem for p in SHIPPED.glob("*.txt"))


def resolve_prompt_source(path: str | Path) -> Path:
    """``path`` itself when it exists; a shipped set's file for a bare name; otherwise a one-line error."""
    path = Path(path)
    if path.exists():
        return path
    if len(path.parts) == 1 and (SHIPPED / f"{path.name}.txt").is_file():
        return SHIPPED / f"{path.name}.txt"
    raise UserError(f"prompt source {str(path)!r} not found; give a file or folder path, or a shipped set: "
                    f"{', '.join(shipped_prompt_sets())}")


def _text_prompts(path: Path, column: str | None) -> list[str]:
    text = read_text_file(path, "prompt file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_prompts(text, path, column)
    if suffix == ".jsonl":
        return _jsonl_prompts(text, path, column)
    if suffix == ".json":
        return _json_prompts(text, path, column)
    return text.splitlines()


def _pick_column(available, column: str | None, source: Path) -> str:
    available = list(available or [])
    if column is not None:
        if column not in available:
            raise UserError(f"{str(source)!r} has no {column!r} column (columns: {available}); set the prompt "
                            "column to one of them")
        return column
    for name in PROMPT_COLUMNS:
        if name in available:
            return name
    raise UserError(f"{str(source)!r} has no prompt column: none of {list(PROMPT_COLUMNS)} among {available}; "
                    "name the column to use")


def _csv_prompts(text: str, path: Path, column: str | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    name = _pick_column(reader.fieldnames, column, path)
    return [row.get(name) or "" for row in reader]


def _record_prompt(record, column: str | None, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        name = column or next((c for c in PROMPT_COLUMNS if c in record), None)
        if name is not None and isinstance(record.get(name), str):
            return record[name]
    wanted = repr(column) if column else f"one of {list(PROMPT_COLUMNS)}"
    raise UserError(f"{where} has no string field {wanted}")


def _jsonl_prompts(text: str, path: Path, column: str | None) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{str(path)!r} line {number} is not valid JSON") from None
        prompts.append(_record_prompt(record, column, f"{str(path)!r} line {number}"))
    return prompts


def _json_prompts(text: str, path: Path, column: str | None) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        if all(line.strip().startswith("{") for line in text.splitlines() if line.strip()):
            return _jsonl_prompts(text, path, column)  # JSON lines under a .json name
        raise UserError(f"{str(path)!r} is not valid JSON") from None
    if isinstance(data, dict):
        if not all(isinstance(v, list) for v in data.values()):
            raise UserError(f"{str(path)!r}: expected a list of prompts, a list of objects or {{name: [prompts]}}")
        data = [item for values in data.values() for item in values]
    if not isinstance(data, list):
        raise UserError(f"{str(path)!r}: expected a list of prompts, a list of objects or {{name: [prompts]}}")
    return [_record_prompt(item, column, f"{str(path)!r} item {i}") for i, item in enumerate(data)]


def _table_prompts(files: list[Path], column: str | None, source: Path) -> list[str]:
    """The prompt column of Parquet / Arrow files, read column-only with pyarrow."""
    prompts = []
    for file in files:
        table = _read_table(file, column, source)
        prompts.extend(table.to_pylist())
    return prompts


def _read_table(file: Path, column: str | None, source: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix.lower() == ".parquet":
            name = _pick_column(pq.read_schema(file).names, column, file)
            return pq.read_table(file, columns=[name]).column(name)
        with pa.memory_map(str(file)) as source_file:
            try:
                table = pa.ipc.open_stream(source_file).read_all()  # datasets' save_to_disk format
            except pa.ArrowInvalid:
                source_file.seek(0)
                table = pa.ipc.open_file(source_file).read_all()
        return table.column(_pick_column(table.column_names, column, file))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"cannot read prompts from {str(file)!r} in {str(source)!r}: {exc}") from None


def _folder_prompts(path: Path, column: str | None, split: str) -> list[str]:
    """A dataset folder: ``save_to_disk`` output (its Arrow shards in order), Parquet shards (recursively, sorted;
    restricted to ``split`` when file names carry splits), or JSON prompt files."""
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise UserError(f"dataset {str(path)!r} has no split {split!r} (splits: {splits}); choose one of them")
        path = path / split
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        state = json.loads((path / "state.json").read_text())
        return _table_prompts([path / f["filename"] for f in state.get("_data_files", [])], column, path)
    tables = sorted(p for p in path.rglob("*") if p.suffix.lower() in TABLE_SUFFIXES)
    if tables:
        in_split = [p for p in tables if p.name.split("-")[0] == split or p.parent.name == split]
        if not in_split and any("-of-" in p.name for p in tables):  # hub shard names carry their split
            splits = sorted({p.name.split("-")[0] for p in tables})
            raise UserError(f"dataset {str(path)!r} has no split {split!r} (splits: {splits}); choose one of them")
        return _table_prompts(in_split or tables, column, path)
    texts = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl", ".txt", ".csv"))
    if not texts:
        raise UserError(f"folder {str(path)!r} holds no prompt files (.txt/.csv/.json/.jsonl/.parquet/.arrow)")
    return [p for file in texts for p in _text_prompts(file, column)]
