"""``rewardtune score``: score a folder (or glob) of images with any reward spec; one row per image.

Prompts come from ``--prompt`` (one for all), a text file (one prompt per image, in sorted file order) or a CSV /
JSON-lines file with ``path,prompt`` (matched by path relative to the folder, or by file name; the ``file`` column
of a ``rewardtune sample`` manifest works too; images without a row, such as ``grid.png``, are skipped with one
warning). Unreadable images are reported by name and skipped (``strict`` fails instead). Images stream: they are
decoded, scored (consecutive same-size images in one batch of up to ``batch_size``) and written batch by batch,
in file order, so memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import glob
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rewardtune.commands.common import positive_int
from rewardtune.errors import UserError
from rewardtune.utils.io import atomic_path, dumps_json, read_text_file

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".jsonl", ".json")

DESCRIPTION = ("Score a folder or glob of images. --reward takes a registered name or a weighted sum such as "
               "'pickscore:10,hpsv2:2,aesthetic:0.05'.")


def add_arguments(parser) -> None:
    parser.add_argument("--reward", required=True, help="reward name or weighted sum (see `rewardtune models`)")
    parser.add_argument("--images", required=True, help="folder or glob of image files")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt for every image")
    src.add_argument("--prompts", metavar="FILE", help=".txt (one per image, sorted file order) or .csv/.jsonl "
                     "with path,prompt")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--out", default=None, help="write rows to FILE (.csv or .jsonl)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first unreadable image instead of skipping")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")


def run(args) -> int:
    from tqdm.auto import tqdm

    def warn(message: str) -> None:
        tqdm.write(f"rewardtune: warning: {message}", file=sys.stderr)

    summary = run_score(args.reward, args.images, args.prompt, args.prompts, args.out, args.batch_size, args.strict,
                        args.device, args.dtype, warn=warn)
    print(summary.text())
    return 0


def load_image(path: str | Path) -> torch.Tensor:
    """:func:`rewardtune.utils.images.load_image` (imported on first use: ``score --help`` stays torch-free)."""
    from rewardtune.utils.images import load_image as load

    return load(path)


def find_images(images: str) -> list[Path]:
    """Sorted image files of a folder, or the sorted matches of a glob pattern; each real file once (symlinks
    and ``**`` through symlinked folders can reach one file by several paths: the first in sorted order is kept)."""
    from rewardtune.utils.images import IMAGE_SUFFIXES

    root = Path(images)
    if root.is_dir():
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        paths = sorted(p for p in _glob(images) if p.is_file())
    paths = _unique_files(paths)
    if not paths:
        raise UserError(f"no image files found at {images!r}; pass a folder or a glob such as 'out/*.png'")
    return paths


def _unique_files(paths: list[Path]) -> list[Path]:
    seen: set[str] = set()
    unique = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    if len(unique) < len(paths):
        logger.info("%d paths lead to files already listed (symlinks); each file is scored once",
                    len(paths) - len(unique))
    return unique


def _glob(pattern: str) -> list[Path]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` enters each real folder once (no symlink loops)."""
    parts = Path(pattern).parts
    star = next((i for i, part in enumerate(parts) if part == "**"), None)
    if star is None:
        return [Path(p) for p in glob.glob(pattern)]
    bases = [b for b in glob.glob(str(Path(*parts[:star]))) if os.path.isdir(b)] if star else ["."]
    return [path for base in bases for path in _walk_once(base) if _match(path.relative_to(base).parts, parts[star:])]


def _walk_once(base: str) -> Iterator[Path]:
    """Every file below ``base``, following symlinked folders but entering each real folder once."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(base, followlinks=True):
        if os.path.realpath(folder) in seen:
            subfolders.clear()
            continue
        seen.add(os.path.realpath(folder))
        yield from (Path(folder, name) for name in files)


def _match(names: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """glob's rules: ``**`` is any number of folders, wildcards match one name and never a hidden one."""
    if not patterns:
        return not names
    if patterns[0] == "**":
        return any(_match(names[i:], patterns[1:]) for i in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:i]))
    if not names or (names[0].startswith(".") and not patterns[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], patterns[0]) and _match(names[1:], patterns[1:])


def match_prompts(paths: list[Path], prompt: str | None, prompts_file: str | None, root: str,
                  strict: bool = False) -> tuple[list[Path], list[str], list[Path]]:
    """``(paths, prompts, unmatched)``: one prompt per kept image (see module docstring). Images that have no row
    in a CSV/JSONL table are left out and returned as ``unmatched`` (``strict`` raises instead)."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompt is not None:
        return paths, [prompt] * len(paths), []
    if Path(prompts_file).suffix.lower() not in TABLE_SUFFIXES:
        from rewardtune.prompts import read_prompts

        prompts = read_prompts(prompts_file)
        if len(prompts) != len(paths):
            raise UserError(f"prompt file {prompts_file!r} has {len(prompts)} prompts but there are {len(paths)} "
                            "images; give one prompt per image (sorted file order) or a CSV/JSONL with path,prompt")
        return paths, prompts, []
    return _match_table(paths, _path_prompt_table(prompts_file), prompts_file, root, strict)


def _match_table(paths, table, prompts_file, root, strict) -> tuple[list[Path], list[str], list[Path]]:
    base = Path(root) if Path(root).is_dir() else None
    kept, prompts, unmatched = [], [], []
    for path in paths:
        keys = [str(path), path.name] + ([path.relative_to(base).as_posix()] if base else [])
        found = next((table[k] for k in keys if k in table), None)
        if found is None and strict:
            raise UserError(f"no prompt for image {str(path)!r} in {prompts_file!r}; add a row path,prompt for it "
                            "(without --strict such images are skipped)")
        (unmatched if found is None else kept).append(path)
        if found is not None:
            prompts.append(found)
    if not kept:
        raise UserError(f"none of the {len(paths)} images has a row in {prompts_file!r}; its path (or file) column "
                        "must name them by file name or by path relative to the folder")
    return kept, prompts, unmatched


def unmatched_warning(unmatched: list[Path], prompts_file: str) -> str:
    """One line: how many images had no row in the prompt table, and which."""
    names = ", ".join(p.name for p in unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
    count = f"{len(unmatched)} image{'s' if len(unmatched) != 1 else ''}"
    return f"{count} with no row in {prompts_file!r} skipped: {names} (--strict makes this an error)"


def _path_prompt_table(prompts_file: str) -> dict[str, str]:
    text = read_text_file(prompts_file, "prompt file")
    if Path(prompts_file).suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise UserError(f"prompt file {prompts_file!r} is not valid JSON lines") from None
    key = "path" if rows and isinstance(rows[0], dict) and "path" in rows[0] else "file"  # sample manifests
    if not rows or not all(isinstance(r, dict) and key in r and "prompt" in r for r in rows):
        raise UserError(f"prompt file {prompts_file!r} needs 'path' (or 'file') and 'prompt' in every row")
    return {str(r[key]): str(r["prompt"]) for r in rows}


def _decoded(paths, prompts, strict: bool, skip: Callable[[str], None]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for path, prompt in zip(paths, prompts):
        try:
            image = load_image(path)
        except UserError as exc:
            if strict:
                raise
            skip(str(exc))
            continue
        yield path, prompt, image


def _batches(decoded, batch_size: int) -> Iterator[tuple[torch.Tensor, list[tuple[Path, str]]]]:
    """Consecutive same-size images, up to ``batch_size``, copied into one reused buffer."""
    import torch

    buffer, items = None, []
    for path, prompt, image in decoded:
        if items and image.shape != buffer.shape[1:]:
            yield buffer[:len(items)], items
            items = []
        if buffer is None or buffer.shape[1:] != image.shape:
            buffer = torch.empty(batch_size, *image.shape, dtype=image.dtype)
        buffer[len(items)] = image
        items.append((path, prompt))
        del image
        if len(items) == batch_size:
            yield buffer, items
            items = []
    if items:
        yield buffer[:len(items)], items


def iter_scores(reward, paths: list[Path], prompts: list[str], batch_size: int = 32, strict: bool = False,
                on_skip: Callable[[str], None] | None = None, progress=None) -> Iterator[dict]:
    """Rows ``{path, prompt, total, <component>...}`` in file order, decoded and scored batch by batch. Unreadable
    files go to ``on_skip`` (their message) and are left out; ``strict`` raises on the first one instead."""
    import torch

    def skip(message: str) -> None:
        if on_skip is not None:
            on_skip(message)
        if progress is not None:
            progress(1)

    for images, items in _batches(_decoded(paths, prompts, strict, skip), batch_size):
        with torch.no_grad():
            total = reward(images.to(reward.device), [p for _, p in items]).cpu()
            components = {k: v.cpu() for k, v in reward.components.items()}
        plain = len(components) == 1 and next(iter(components)) == reward.name
        for j, (path, prompt) in enumerate(items):
            row = {"path": str(path), "prompt": prompt, "total": float(total[j])}
            yield row if plain else {**row, **{k: float(v[j]) for k, v in components.items()}}
        if progress is not None:
            progress(len(items))


def score_images(reward, paths: list[Path], prompts: list[str], batch_size: int = 32, strict: bool = False,
                 progress=None) -> tuple[list[dict], list[str]]:
    """All rows of :func:`iter_scores` and the messages of skipped files."""
    skipped: list[str] = []
    rows = list(iter_scores(reward, paths, prompts, batch_size, strict, skipped.append, progress))
    return rows, skipped


def check_out(out: str | Path) -> None:
    """``--out`` must be a writable ``.csv`` or ``.jsonl`` file path (checked before anything is loaded)."""
    from rewardtune.outputs import check_writable_file

    if Path(out).suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--out must end in .csv or .jsonl, got {str(out)!r}")
    check_writable_file(out, "--out")


class _RowSink:
    """Writes one row at a time (CSV header from the first row) and flushes, so a long run's rows reach disk."""

    def __init__(self, fh, out: Path) -> None:
        self.fh, self.out, self.csv = fh, out, out.suffix.lower() == ".csv"
        self.writer: csv.DictWriter | None = None

    def __call__(self, row: dict) -> None:
        try:
            if self.csv:
                if self.writer is None:
                    self.writer = csv.DictWriter(self.fh, fieldnames=list(row))
                    self.writer.writeheader()
                self.writer.writerow(row)
            else:
                self.fh.write(dumps_json(row) + "\n")
            self.fh.flush()
        except OSError as exc:
            raise _write_error(self.out, exc) from None


def _write_error(out: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write --out {str(out)!r} ({exc.strerror or exc}); choose a writable location")


@contextlib.contextmanager
def open_rows(out: str | Path | None) -> Iterator[Callable[[dict], None]]:
    """A function that appends rows to ``out`` (.csv or .jsonl) as they come, into a temporary file that replaces
    ``out`` only when the block succeeds (a crash never leaves a half file at ``out``). ``None``: no file."""
    if out is None:
        yield lambda row: None
        return
    out = Path(out)
    stack = contextlib.ExitStack()
    try:
        fh = stack.enter_context(open(stack.enter_context(atomic_path(out)), "w", newline=""))  # noqa: SIM115
    except OSError as exc:
        stack.close()
        raise _write_error(out, exc) from None
    with stack:
        yield _RowSink(fh, out)


class Summary:
    """Running count, mean, std, min and max of every numeric column; no row is kept."""

    def __init__(self) -> None:
        self.count = 0
        self.stats: dict[str, list[float]] = {}  # column -> [n, mean, M2, min, max] over finite values (Welford)
        self.nonfinite: list[str] = []
        self.nonfinite_count = 0

    def add(self, row: dict) -> None:
        self.count += 1
        for key, value in row.items():
            if key in ("path", "prompt"):
                continue
            s = self.stats.setdefault(key, [0, 0.0, 0.0, math.inf, -math.inf])
            if math.isfinite(value):
                s[0] += 1
                delta = value - s[1]
                s[1] += delta / s[0]
                s[2] += delta * (value - s[1])
                s[3], s[4] = min(s[3], value), max(s[4], value)
        if not math.isfinite(row["total"]):
            self.nonfinite_count += 1
            self.nonfinite += [Path(row["path"]).name] if len(self.nonfinite) < 5 else []

    def text(self) -> str:
        """Mean / std / min / max of every numeric column, one line each."""
        lines = [f"{self.count} images scored"]
        for key, (n, mean, m2, low, high) in self.stats.items():
            if n == 0:
                lines.append(f"  {key:24s} all NaN")
                continue
            std = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
            lines.append(f"  {key:24s} mean {mean:.4f}  std {std:.4f}  min {low:.4f}  max {high:.4f}")
        if self.nonfinite_count:
            lines.append(f"warning: {self.nonfinite_count} images got non-finite scores: {', '.join(self.nonfinite)}")
        return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    """:meth:`Summary.text` of ``rows``."""
    summary = Summary()
    for row in rows:
        summary.add(row)
    return summary.text()


def run_score(reward_spec: str, images: str, prompt: str | None = None, prompts_file: str | None = None,
              out: str | None = None, batch_size: int = 32, strict: bool = False, device: str = "cpu",
              dtype: str = "float32", warn: Callable[[str], None] = logger.warning) -> Summary:
    """``rewardtune score``: every check first (output, reward spec, dtype, device, images, prompts), then the
    reward loads once and the images stream through it; ``warn`` gets one line per skipped file or group."""
    from tqdm.auto import tqdm

    from rewardtune.rewards import check_reward_spec, load_reward
    from rewardtune.utils.devices import resolve_device, to_dtype

    if out is not None:
        check_out(out)
    check_reward_spec(reward_spec)
    to_dtype(dtype)
    resolve_device(device)
    paths, prompts, unmatched = match_prompts(find_images(images), prompt, prompts_file, images, strict)
    if unmatched:
        warn(unmatched_warning(unmatched, prompts_file))
    reward = load_reward(reward_spec, device=device, dtype=dtype).to(device).eval()
    summary = Summary()
    with tqdm(total=len(paths), desc="scoring", unit="img", disable=len(paths) < 64) as bar, open_rows(out) as write:
        for row in iter_scores(reward, paths, prompts, batch_size, strict, lambda m: warn(f"skipped: {m}"),
                               bar.update):
            write(row)
            summary.add(row)
        if summary.count == 0:
            raise UserError("no image could be read; nothing scored")
    return summary
