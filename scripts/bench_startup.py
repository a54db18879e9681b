"""Start-up time of the `rewardtune` command line: `--help`, each command's `--help`, and `models`.

    python scripts/bench_startup.py [--before /path/to/older/checkout] [--repeats 5]

Each command runs as `python -m rewardtune ...` from the checkout's root (so that checkout's code is imported), in
interleaved rounds (machine load drifts hit every command alike); the table gives the median wall time. With
`--before`, an older checkout (e.g. `git worktree add /tmp/before REV`) is timed side by side in the same rounds.
Writes the `startup` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["models"], ["finetune", "--help"], ["prune", "--help"], ["sample", "--help"],
            ["score", "--help"], ["perceptual", "--help"]]


def wall_seconds(checkout: Path, argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rewardtune", *argv], cwd=checkout, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an older checkout timed side by side")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    checkouts = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for argv in COMMANDS:
            for name, checkout in checkouts.items():
                times.setdefault((name, " ".join(argv)), []).append(wall_seconds(checkout, argv))
    columns = [c for c in ("before", "now") if c in checkouts]
    lines = ["| command | " + " | ".join(f"{c} (s)" for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for argv in COMMANDS:
        key = " ".join(argv)
        cells = [f"{statistics.median(times[(c, key)]):.2f}" for c in columns]
        lines.append(f"| `rewardtune {key}` | " + " | ".join(cells) + " |")
    note = (f"\nMedian of {args.repeats} interleaved runs of `python -m rewardtune ...` per checkout"
            + (f"; before = {args.before}" if args.before else "") + ".\n")
    update_section("startup", "## CLI start-up\n\n" + header(command_line()) + "\n".join(lines) + "\n" + note)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
