"""Write benchmark tables into BENCHMARKS.md between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

from rewardtune.utils.io import atomic_write_text

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


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


def update_section(name: str, markdown: str, path: Path = BENCHMARKS) -> Path:
    """Replace (or append) the named section of BENCHMARKS.md with ``markdown``."""
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


__all__ = ["update_section", "header", "machine_line", "command_line", "median_seconds"]
