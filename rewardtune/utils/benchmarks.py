"""Write benchmark tables into BENCHMARKS.md between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers.

The file is ``$REWARDTUNE_BENCHMARKS`` when set, else ``BENCHMARKS.md`` at the root of the rewardtune checkout that
holds the current working directory (the nearest folder upwards whose ``pyproject.toml`` names the project
``rewardtune``), wherever the package itself is installed.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

from rewardtune.errors import UserError
from rewardtune.utils.io import atomic_write_text

BENCHMARKS_ENV = "REWARDTUNE_BENCHMARKS"
_PROJECT_NAME = re.compile(r"""^\s*name\s*=\s*["']rewardtune["']\s*$""", re.MULTILINE)


def _is_repo_root(folder: Path) -> bool:
    try:
        text = (folder / "pyproject.toml").read_text()
    except (OSError, UnicodeDecodeError):
        return False
    project = text.split("[project]", 1)[1] if "[project]" in text else ""
    return bool(_PROJECT_NAME.search(project.split("\n[", 1)[0]))


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) whose ``pyproject.toml`` has
    ``name = "rewardtune"`` in ``[project]``; a one-line :class:`UserError` when there is none."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if _is_repo_root(folder):
            return folder
    raise UserError(f"no rewardtune checkout at or above {str(here)!r} (no pyproject.toml naming rewardtune); "
                    f"run from the repository or set ${BENCHMARKS_ENV} to the BENCHMARKS.md to write")


def benchmarks_path() -> Path:
    """``$REWARDTUNE_BENCHMARKS``, else ``BENCHMARKS.md`` in :func:`repo_root` of the working directory."""
    override = os.environ.get(BENCHMARKS_ENV)
    return Path(override).expanduser() if override else repo_root() / "BENCHMARKS.md"


def machine_line() -> str:
    """A one-line description of this machine: CPU model, cores, torch build."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def header(command: str) -> str:
    return f"Command: `{command}`  \nDate: {date.today().isoformat()}  \nMachine: {machine_line()}\n\n"


def update_section(name: str, markdown: str, path: Path | None = None) -> Path:
    """Replace (or append) the named section of BENCHMARKS.md (``path``, default :func:`benchmarks_path`) with
    ``markdown``."""
    path = Path(path) if path is not None else benchmarks_path()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    return atomic_write_text(path, text)


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


__all__ = ["update_section", "benchmarks_path", "repo_root", "header", "machine_line", "command_line",
           "median_seconds"]
