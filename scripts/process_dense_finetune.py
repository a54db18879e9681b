"""Issue 14, evidence 2 and 3: dense-reward finetuning in the shapes world (GRPO on ``shapes-tiny`` against the
learned proxy ``shapes_preference``; the gold oracle is logged, never trained on). Writes two tables into
BENCHMARKS.md (sections ``process-dense-efficiency`` and ``process-dense-hacking``) and a figure into docs/figures.

    python scripts/process_dense_finetune.py [--arms outcome prime x0 x0-delta x0-clip progress] [--seeds 0]
        [--epochs 5]

Arms (one preset each, otherwise identical: prompts, N x B samples per epoch, K passes, sampler, optimiser):

* ``outcome``: ``configs/grpo/shapes_small.yaml`` (outcome advantages only; N*B = 36 reward queries per epoch);
* ``x0``, ``x0-clip``, ``x0-delta``: ``configs/grpo/shapes_small_dense_x0.yaml`` with ``train.dense.transform``
  none / clip / delta (each step's decoded x0 prediction scored: 360 queries per epoch);
* ``prime``: ``configs/grpo/shapes_small_prime.yaml`` (implicit PRM trained on the outcome rewards: 36 per epoch);
* ``progress``: the x0 preset with ``train.dense.kind=progress`` (PAV: each step's change in the base model's Monte
  Carlo value, 2 continuations per step: 36 + 36 x 10 x 2 = 756 queries and ~11x the sampling per epoch).

Every run evaluates after each epoch (``save_every=1``: 8 training prompts x 2 fixed seeds, scored by proxy and
gold), so each arm has a gold-against-reward-queries curve; evidence 2 compares the arms at equal query budgets,
evidence 3 follows the summed raw x0 step rewards (what an exploited dense reward inflates) against gold. Runs live in
``--out`` (default ``outputs/process_dense``) as ARM/seedS; they resume and are reused (scripts/runs.py).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from runs import Arm, add_run_arguments, figures_dir, finished, mean_std, read_jsonl, run_all, shown

X0 = "configs/grpo/shapes_small_dense_x0.yaml"
ARMS = {"outcome": ("configs/grpo/shapes_small.yaml", []), "prime": ("configs/grpo/shapes_small_prime.yaml", []),
        "x0": (X0, []), "x0-delta": (X0, ["train.dense.transform=delta"]),
        "x0-clip": (X0, ["train.dense.transform=clip"]),
        "progress": (X0, ["train.dense.kind=progress", "train.dense.progress_continuations=2"])}
# An evaluation after every epoch (gold-against-queries curves) on 8 training prompts x 2 seeds; no held-out prompts
# (their gold does not move in 20 GRPO epochs here, BENCHMARKS.md compare-algorithms): measurement only, every arm.
COMMON = ["save_every=1", "keep_last=1", "heldout_prompts_file=null", "eval_seeds=[0,1]"]
EPOCHS = 5


def arms(names: list[str]) -> list[Arm]:
    return [Arm(name, ARMS[name][0], COMMON + ARMS[name][1]) for name in names]


def curve(folder: Path) -> list[dict]:
    """Per evaluated epoch: ``queries`` (cumulative training reward queries), ``gold`` / ``proxy`` (gain of the
    fixed evaluation over epoch 0), and the epoch's ``raw_sum`` / ``dense_sum`` (summed raw / transformed x0 step
    rewards of its rollouts, when it has them)."""
    import yaml

    evals = read_jsonl(folder / "eval.jsonl")
    metrics = {r["epoch"]: r for r in read_jsonl(folder / "metrics.jsonl")}
    train = yaml.safe_load((folder / "config.yaml").read_text())["train"]
    outcome = train["prompts_per_epoch"] * train["images_per_prompt"]  # an outcome-only run logs no count
    first = evals[0]
    points = []
    for record in evals:
        epoch = record["epoch"]
        m = metrics.get(epoch, {})
        points.append({"epoch": epoch, "queries": m.get("reward_queries", epoch * outcome),
                       "gold": record["eval_gold"] - first["eval_gold"],
                       "proxy": record["eval_reward"] - first["eval_reward"],
                       "raw_sum": m.get("dense_raw_sum"), "dense_sum": m.get("dense_sum"),
                       "minutes": sum(r.get(f"seconds_{k}", 0.0) for e, r in metrics.items() if e <= epoch
                                      for k in ("sampling", "reward", "dense", "update")) / 60})
    return points


def at_budget(points: list[dict], budget: int) -> dict | None:
    """The last evaluated point whose cumulative queries are within ``budget`` (None when even epoch 1 exceeds
    it... epoch 0 always qualifies, so never None)."""
    within = [p for p in points if p["queries"] <= budget]
    return within[-1] if within else None


def cell(values: list[float], fmt: str = "+.3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return mean_std(values, fmt)


def efficiency_table(names: list[str], curves: dict[str, list[list[dict]]], budgets: list[int]) -> str:
    """Evidence 2: gold and proxy gains at equal query budgets and after the last epoch."""
    head = ["run", "queries / epoch"] + [f"Δ gold @ {b} queries (epoch)" for b in budgets] + [
        "Δ gold after the last epoch (epoch)", "Δ proxy after the last epoch (epoch)", "queries used",
        "train minutes"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in names:
        runs = curves[name]
        per_epoch = runs[0][1]["queries"] if len(runs[0]) > 1 else 0
        row = [name, str(per_epoch)]
        for budget in budgets:
            points = [at_budget(c, budget) for c in runs]
            row.append(f"{cell([p['gold'] for p in points])} ({points[0]['epoch']})")
        last = f" ({runs[0][-1]['epoch']})"
        row += [cell([c[-1]["gold"] for c in runs]) + last, cell([c[-1]["proxy"] for c in runs]) + last,
                str(runs[0][-1]["queries"]), f"{statistics.mean(c[-1]['minutes'] for c in runs):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def hacking_table(names: list[str], curves: dict[str, list[list[dict]]]) -> str:
    """Evidence 3: the summed raw x0 step rewards and the transformed sum (epoch 1 -> E) against proxy and gold, at
    the last epoch E that every x0 arm has run."""
    names = [n for n in names if n.startswith("x0")]
    if not names:
        return "(no x0 arm has run)"
    epoch = min(len(c) - 1 for n in names for c in curves[n])
    head = ["run", f"Σ raw x0 step rewards: epoch 1 → {epoch}", f"Σ transformed: epoch 1 → {epoch}",
            f"Δ proxy (epoch {epoch})", f"Δ gold (epoch {epoch})", "worst Δ gold until then"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in names:
        runs = [c[:epoch + 1] for c in curves[name]]
        first = [c[1] for c in runs]
        last = [c[-1] for c in runs]
        row = [name, f"{cell([p['raw_sum'] for p in first], '.2f')} → {cell([p['raw_sum'] for p in last], '.2f')}",
               f"{cell([p['dense_sum'] for p in first], '.2f')} → {cell([p['dense_sum'] for p in last], '.2f')}",
               cell([p["proxy"] for p in last]), cell([p["gold"] for p in last]),
               cell([min(p["gold"] for p in c) for c in runs])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(names: list[str], curves: dict[str, list[list[dict]]], out: Path) -> Path:
    """Δ gold and Δ proxy of the fixed evaluation against cumulative reward queries (first seed), log x-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rewardtune.utils.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("gold", "proxy"), ("Δ gold (eval prompts)", "Δ proxy (eval prompts)")):
        for name in names:
            points = [p for p in curves[name][0] if p["queries"] > 0]
            ax.plot([p["queries"] for p in points], [p[key] for p in points], marker=".", label=name)
        ax.set_xscale("log")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training reward queries (cumulative)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add_run_arguments(parser, "process_dense", [0], 1)
    parser.add_argument("--existing", action="store_true",
                        help="tabulate the runs that have finished, as they are (whatever their epochs); start none")
    args = parser.parse_args()
    epochs = args.epochs or EPOCHS
    plan = arms(args.arms)
    if args.existing:
        plan = finished(plan, args.seeds, args.out)
    runs = run_all(plan, args.seeds, args.out, None if args.existing else epochs, args.workers, args.threads)
    names = [a.name for a in plan]
    curves = {name: [curve(folder) for folder in folders] for name, folders in runs.items()}
    totals = [c[-1]["queries"] for name in names for c in curves[name]]
    per_epoch = {c[1]["queries"] for name in names for c in curves[name] if len(c) > 1}
    budgets = sorted(b for b in per_epoch | {min(totals)} if b <= max(totals))  # an epoch of each; the cheapest run
    plot = figure(names, curves, figures_dir(args) / "process_dense_finetune.png")
    from rewardtune.utils.benchmarks import command_line, header, update_section

    common = (f"Seeds {args.seeds}; GRPO on shapes-tiny against the proxy shapes_preference for the epochs shown "
              "(`configs/grpo/shapes_small*.yaml`: N x B = 6 x 6 samples per epoch, 10 DDIM steps); overrides "
              f"`{' '.join(COMMON)}`. Δ = the fixed evaluation (8 training prompts x 2 seeds) after the epoch minus "
              "before finetuning; gold = the hidden oracle, never trained on. Reward queries = every image the "
              "training reward scored during training (outcome, x0 step images and Monte Carlo continuations; "
              "evaluation not counted). "
              "Every arm draws the same prompts and seeds per epoch and starts from the same model, so arms are "
              "paired, but 16 evaluation images and one seed per arm leave gold differences below ~0.01 within "
              "noise. Σ raw x0 step rewards: the sum over the 10 steps of the proxy reward of each step's decoded x0 "
              "prediction, mean over the epoch's 36 rollouts (it moves with the epoch's prompt draw).")
    efficiency = "\n".join([header(command_line()), common, "",
                            efficiency_table(names, curves, budgets), "",
                            f"![gold and proxy against reward queries]({shown(plot)}) Seed "
                            f"{args.seeds[0]}."])
    hacking = "\n".join([header(command_line()), common, "", hacking_table(names, curves)])
    print(efficiency, "\n", hacking)
    if not args.no_write:
        update_section("process-dense-efficiency", efficiency)
        update_section("process-dense-hacking", hacking)


if __name__ == "__main__":
    main()
