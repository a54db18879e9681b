"""The demo's section of BENCHMARKS.md from a finished ``make demo`` run folder (default ``outputs/demo``):
before -> after scores on the fixed evaluation, wall time, and its before/after grid and reward curve copied into
docs/figures.

    make demo && python scripts/demo_report.py [--run outputs/demo] [--wall SECONDS] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
ROWS = [("eval_reward", "proxy, 8 eval (training) prompts x 4 seeds", ".3f"),
        ("eval_gold", "gold, same images", ".4f"),
        ("heldout_reward", "proxy, 16 held-out prompts", ".3f"),
        ("heldout_gold", "gold, same images", ".4f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--wall", type=float, help="wall seconds of `make demo` (default: the run's own seconds)")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    summary = json.loads((args.run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    wall = args.wall if args.wall is not None else summary["seconds"]
    lines = ["| score | before (epoch 0) | after (epoch %d) | change |" % summary["epochs"][-1], "|---|---|---|---|"]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | {before[key]:{fmt}} | {after[key]:{fmt}} | {after[key] - before[key]:+{fmt}} |")
    figures = {}
    for name, target in (("before_after.png", "demo_before_after.png"), ("reward_curve.png", "demo_reward_curve.png"),
                         ("kl_curve.png", "demo_kl_curve.png")):
        if (args.run / name).is_file():
            figures[name] = FIGURES / target
            if not args.no_write:
                shutil.copyfile(args.run / name, figures[name])
    from rewardtune.utils.benchmarks import header, update_section

    text = header("make demo (= rewardtune finetune configs/prdp/shapes_small.yaml output_dir=outputs/demo "
                  "resume=auto)") + (
        f"{summary['epochs_run']} epochs, {wall / 60:.1f} minutes wall from start to summary. {args.note}\n\n"
        + "\n".join(lines) + "\n\n"
        + "\n\n".join(f"![demo {n}]({p.relative_to(ROOT)})" for n, p in figures.items()) + "\n")
    print(text)
    if not args.no_write:
        update_section("demo", text)


if __name__ == "__main__":
    main()
