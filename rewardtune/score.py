"""``rewardtune score``: score a folder (or glob) of images with any reward spec; one row per image.

Prompts come from ``--prompt`` (one for all), a text file (one prompt per image, in sorted file order) or a CSV /
JSON-lines file with ``path,prompt`` (matched by path relative to the folder, or by file name; the ``file`` column
of a ``rewardtune sample`` manifest works too). Unreadable images are
reported by name and skipped (``strict`` fails instead). Images are batched by size, each batch in one call.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from pathlib import Path

import torch

from rewardtune.errors import UserError
from rewardtune.utils.images import IMAGE_SUFFIXES, load_image
from rewardtune.utils.io import atomic_path, read_text_file, write_csv

logger = logging.getLogger(__name__)


def find_images(images: str) -> list[Path]:
    """Sorted image files of a folder, or the sorted matches of a glob pattern."""
    root = Path(images)
    if root.is_dir():
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        paths = sorted(Path(p) for p in glob.glob(images, recursive=True) if Path(p).is_file())
    if not paths:
        raise UserError(f"no image files found at {images!r}; pass a folder or a glob such as 'out/*.png'")
    return paths


def match_prompts(paths: list[Path], prompt: str | None, prompts_file: str | None, root: str) -> list[str]:
    """One prompt per image path (see module docstring)."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompt is not None:
        return [prompt] * len(paths)
    suffix = Path(prompts_file).suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        from rewardtune.prompts import read_prompts

        prompts = read_prompts(prompts_file)
        if len(prompts) != len(paths):
            raise UserError(f"prompt file {prompts_file!r} has {len(prompts)} prompts but there are {len(paths)} "
                            "images; give one prompt per image (sorted file order) or a CSV/JSONL with path,prompt")
        return prompts
    table = _path_prompt_table(prompts_file)
    base = Path(root) if Path(root).is_dir() else None
    out = []
    for path in paths:
        keys = [str(path), path.name] + ([path.relative_to(base).as_posix()] if base else [])
        found = next((table[k] for k in keys if k in table), None)
        if found is None:
            raise UserError(f"no prompt for image {str(path)!r} in {prompts_file!r}; add a row path,prompt for it")
        out.append(found)
    return out


def _path_prompt_table(prompts_file: str) -> dict[str, str]:
    import csv
    import io

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


def score_images(reward, paths: list[Path], prompts: list[str], batch_size: int = 32, strict: bool = False,
                 progress=None) -> tuple[list[dict], list[str]]:
    """Rows ``{path, prompt, total, <component>...}`` and the messages of skipped unreadable files (``strict``
    raises on the first one instead)."""
    loaded: list[tuple[Path, str, torch.Tensor]] = []
    skipped: list[str] = []
    for path, prompt in zip(paths, prompts):
        try:
            loaded.append((path, prompt, load_image(path)))
        except UserError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            if progress is not None:
                progress(1)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, (_, _, image) in enumerate(loaded):
        by_size.setdefault(tuple(image.shape), []).append(i)
    rows: list[dict | None] = [None] * len(loaded)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = torch.stack([loaded[i][2] for i in chunk]).to(reward.device)
            total = reward(images, [loaded[i][1] for i in chunk]).cpu()
            components = {k: v.cpu() for k, v in reward.components.items()}
            for j, i in enumerate(chunk):
                row = {"path": str(loaded[i][0]), "prompt": loaded[i][1], "total": float(total[j])}
                if len(components) > 1 or next(iter(components), None) != reward.name:
                    row.update({k: float(v[j]) for k, v in components.items()})
                rows[i] = row
            if progress is not None:
                progress(len(chunk))
    return [r for r in rows if r is not None], skipped


def write_rows(rows: list[dict], out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() == ".jsonl":
        with atomic_path(out) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out must end in .csv or .jsonl, got {str(out)!r}")
    return write_csv(out, rows)


def summarize(rows: list[dict]) -> str:
    """Mean / std / min / max of every numeric column, one line each."""
    lines = [f"{len(rows)} images scored"]
    for key in [k for k in rows[0] if k not in ("path", "prompt")] if rows else []:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        finite = values[torch.isfinite(values)]
        if finite.numel() == 0:
            lines.append(f"  {key:24s} all NaN")
            continue
        std = float(finite.std()) if finite.numel() > 1 else 0.0
        lines.append(f"  {key:24s} mean {float(finite.mean()):.4f}  std {std:.4f}  "
                     f"min {float(finite.min()):.4f}  max {float(finite.max()):.4f}")
    nan = [Path(r["path"]).name for r in rows if not math.isfinite(r["total"])]
    if nan:
        lines.append(f"warning: {len(nan)} images got non-finite scores: {', '.join(nan[:5])}")
    return "\n".join(lines)
