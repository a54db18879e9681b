"""Epoch time under thread settings, on a quiet machine and with a busy neighbour; writes BENCHMARKS.md ("threads").

    python scripts/bench_threads.py [--settings default,omp1,omp2-passive,...] [--repeats 2] [--timeout 600]

Each cell runs ``python -m rewardtune finetune configs/prdp/shapes_small.yaml epochs=2 save_every=2
heldout_count=4 output_dir=<fresh tmp>`` as a subprocess with the setting's environment. "loaded" starts a neighbour
process burning one core (``python -c "while True: pass"``) before the run and kills it after. The epoch seconds are
``seconds_sampling + seconds_reward + seconds_update`` summed over the run's metrics.jsonl (both epochs); the wall
seconds are the whole subprocess (start-up, evaluation before and after, plots). Cells are interleaved: repeat r runs
every (setting, load) once before repeat r+1. The table shows the median per cell and loaded / quiet.

The thread variables travel only through the environment of the run (the OpenMP runtime reads them once, when torch
loads); the variables named by any setting are removed from the inherited environment first, so "default" means
none of them is set (the ``rewardtune`` command's own defaults then apply).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/prdp/shapes_small.yaml"
OVERRIDES = ["epochs=2", "save_every=2", "heldout_count=4"]

# name -> (environment added to the run, description). torch's ATen backend here is OpenMP via GNU libgomp
# (``torch.__config__.parallel_info()``; MKL and oneDNN share its pool), so KMP_* variables do nothing; libgomp's
# knobs are OMP_WAIT_POLICY (ACTIVE: spin ~minutes, PASSIVE: sleep at once, unset: spin GOMP_SPINCOUNT=300000
# iterations, ~ms, then sleep) and GOMP_SPINCOUNT, which overrides the spin count of either policy.
SETTINGS: dict[str, tuple[dict[str, str], str]] = {
    "default": ({}, "nothing set"),
    "omp1": ({"OMP_NUM_THREADS": "1"}, "OMP_NUM_THREADS=1"),
    "omp2-passive": ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
                     "OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE"),
    "omp2-spin10k": ({"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"}, "OMP_NUM_THREADS=2 GOMP_SPINCOUNT=10000"),
    "spin3k": ({"GOMP_SPINCOUNT": "3000"}, "GOMP_SPINCOUNT=3000"),
    "spin30k": ({"GOMP_SPINCOUNT": "30000"}, "GOMP_SPINCOUNT=30000"),
    "spin100k": ({"GOMP_SPINCOUNT": "100000"}, "GOMP_SPINCOUNT=100000"),
    "omp2-active": ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}, "OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE"),
    # more threads than cores: under a busy neighbour the scheduler shares cores per thread, so 3 or 4 threads win a
    # larger share of the two cores (2/3 -> 3/4, 4/5) at the price of oversubscription when the machine is quiet
    "omp3-passive": ({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"},
                     "OMP_NUM_THREADS=3 OMP_WAIT_POLICY=PASSIVE"),
    "omp4-passive": ({"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"},
                     "OMP_NUM_THREADS=4 OMP_WAIT_POLICY=PASSIVE"),
    "old-default": ({"GOMP_SPINCOUNT": "300000"},
                    "GOMP_SPINCOUNT=300000 (libgomp's spin when OMP_WAIT_POLICY is unset: the old default)"),
}
THREAD_VARS = {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME"}


def run_once(setting: str, loaded: bool, timeout: float) -> tuple[float, float]:
    """(epoch seconds, wall seconds) of one 2-epoch run under ``setting``, with or without a busy neighbour."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(SETTINGS[setting][0])
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        if neighbour is not None:
            time.sleep(0.5)  # let it get going
        with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
            out = Path(tmp) / "run"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "rewardtune", "finetune", CONFIG, *OVERRIDES,
                                   f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{setting} loaded={loaded}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            epoch = sum(r["seconds_sampling"] + r["seconds_reward"] + r["seconds_update"] for r in records)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return epoch, wall


def table(results: dict[tuple[str, bool], list[tuple[float, float]]], settings: list[str]) -> str:
    def med(key, i):
        values = [r[i] for r in results.get(key, [])]
        return statistics.median(values) if values else float("nan")

    def cell(key, i):
        values = results.get(key, [])
        if not values:
            return "-"
        spread = f" ({'/'.join(f'{r[i]:.1f}' for r in values)})" if len(values) > 1 else ""
        return f"{med(key, i):.1f}{spread}"

    runs = min(len(v) for v in results.values())
    rows = ["| setting | epoch s, quiet | epoch s, loaded | loaded / quiet | wall s, quiet | wall s, loaded | "
            "loaded / quiet (wall) |", "|---|---|---|---|---|---|---|"]
    for name in settings:
        quiet, busy = (name, False), (name, True)
        rows.append(f"| {SETTINGS[name][1]} | {cell(quiet, 0)} | {cell(busy, 0)} | "
                    f"**{med(busy, 0) / med(quiet, 0):.2f}** | "
                    f"{cell(quiet, 1)} | {cell(busy, 1)} | {med(busy, 1) / med(quiet, 1):.2f} |")
    return (f"`python -m rewardtune finetune {CONFIG} {' '.join(OVERRIDES)} output_dir=<tmp>` per cell; epoch s = "
            "sampling + reward + update seconds summed over both epochs (metrics.jsonl), wall s = the whole "
            "command (start-up, evaluation before and after). loaded = a `python -c \"while True: pass\"` "
            f"neighbour burning one core for the whole run. Median of {runs} interleaved run(s) per cell "
            "(single runs in brackets).\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="default,omp1,omp2-passive,omp2-spin10k",
                        help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--section", default="threads", help="BENCHMARKS.md section to write")
    parser.add_argument("--note", default="", help="a sentence put above the table")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for r in range(args.repeats):
        for name in settings:
            for loaded in (False, True):
                epoch, wall = run_once(name, loaded, args.timeout)
                results.setdefault((name, loaded), []).append((epoch, wall))
                print(f"repeat {r + 1} {name:14s} {'loaded' if loaded else 'quiet ':6s} epoch {epoch:6.1f} s  "
                      f"wall {wall:6.1f} s", flush=True)
        # after every repeat, so that a long benchmark stopped early still leaves its complete repeats
        text = header(command_line()) + (args.note.strip() + "\n\n" if args.note.strip() else "") + \
            table(results, settings)
        print(text, flush=True)
        if not args.no_write:
            update_section(args.section, text)


if __name__ == "__main__":
    main()
