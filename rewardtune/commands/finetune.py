"""``rewardtune finetune CONFIG [key=value ...]``: online reward finetuning (PRDP, the DDPO baseline) through
:func:`rewardtune.finetune.run.run_finetune`, closing with before -> after on the fixed evaluation."""

from __future__ import annotations

import os

from rewardtune.commands.common import add_config_arguments, load_job_config
from rewardtune.finetune.config import RunConfig

SCHEMA = RunConfig
PRESETS = ("prdp", "ddpo", "grpo")  # configs/prdp/*.yaml, configs/ddpo/*.yaml and configs/grpo/*.yaml

DESCRIPTION = ("Online reward finetuning, e.g. `rewardtune finetune configs/prdp/shapes_small.yaml epochs=2 "
               "output_dir=out/run resume=auto`. Multi-process: `accelerate launch -m rewardtune finetune CONFIG`.")


def add_arguments(parser) -> None:
    add_config_arguments(parser, SCHEMA)


def run(args) -> int:
    cfg = load_job_config(SCHEMA, args)  # a bad key fails at once, before torch loads
    # Before torch loads its OpenMP runtime (GNU libgomp, which reads this once): idle threads sleep instead of
    # spinning, so a busy neighbour on one core costs 1.36x per epoch instead of 8.4x, at ~25 % of the quiet
    # epoch (BENCHMARKS.md "threads-default"; GOMP_SPINCOUNT=3000 is the faster choice on a machine known to be
    # quiet). Setting OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself overrides it.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    from accelerate import PartialState

    from rewardtune.finetune.run import run_finetune

    summary = run_finetune(cfg)
    if PartialState().is_main_process:  # one summary per run, not per process
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The closing lines of ``rewardtune finetune``: before -> after on the fixed evaluation, and where to look."""
    minutes, seconds = divmod(round(summary.get("seconds", 0)), 60)
    lines = [f"finetune: {summary['epochs_run']} epochs in {minutes}m{seconds:02d}s -> {summary['output_dir']}"]
    before, after = summary.get("before", {}), summary.get("after", {})
    names = {"eval_reward": "reward (eval prompts)", "eval_gold": "gold (eval prompts)",
             "heldout_reward": "reward (held-out)", "heldout_gold": "gold (held-out)"}
    rows = [(label, before[k], after[k]) for k, label in names.items()
            if isinstance(before.get(k), float) and isinstance(after.get(k), float)]
    if rows:
        epochs = summary.get("epochs", [0, 0])
        lines.append(f"  {'':24s}{'before':>9s}{'after':>10s}   (epoch {epochs[0]} -> {epochs[1]})")
        lines += [f"  {label:24s}{b:9.4g} -> {a:7.4g}   ({a - b:+.3g})" for label, b, a in rows]
    if summary.get("skipped"):
        lines.append(f"  skipped gradient steps in the last epoch: {summary['skipped']} (non-finite loss)")
    lines.append(f"  grids before | after: {summary['comparison']}")
    lines.append(f"  final model: {summary['final']}   metrics: {summary['output_dir']}/metrics.jsonl, "
                 "reward_curve.png")
    if summary.get("processes", 1) > 1:
        lines.append(f"  processes: {summary['processes']}, replicas in sync: {summary['ranks_in_sync']}")
    return "\n".join(lines)


__all__ = ["DESCRIPTION", "PRESETS", "SCHEMA", "add_arguments", "format_summary", "run"]
