"""Over-optimisation curves in the shapes world: gold and proxy gain against the policy's drift, for PRDP and DDPO
at several beta / clip / learning-rate settings, in the manner of the reward-model over-optimisation studies.

    python scripts/overoptimisation.py [--arms prdp ddpo ...] [--seeds 0] [--epochs N] [--workers 1]

The shapes world has what no real setting has: the gold reward behind the learned proxy (shapes_preference).
Drift is each run's summed approximate KL, ``sum over gradient steps of approx_kl``, where ``approx_kl =
0.5 * mean((log p - log p_old)^2)`` per step and latent dimension: a path length of the policy's movement (the
same x axis as every run folder's kl_curve.png), not the KL to the base model itself. Writes
docs/figures/SECTION.png and a table into BENCHMARKS.md (``--section``, default ``overoptimisation``). Runs live in
``--out`` (default ``outputs/overoptimisation``) as ``ARM/seedS``, resume and are reused (scripts/runs.py): a run
of the same preset and overrides made by another script can be linked in (e.g. ``prdp`` -> reproduce_prdp.py's
``prdp_small``, ``oracle`` -> its ``oracle_small``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from runs import ORACLE, Arm, add_run_arguments, figures_dir, final_scores, read_jsonl, run_all, shown, table

from rewardtune.finetune.report import summed_kl

PRDP, DDPO = "configs/prdp/shapes_small.yaml", "configs/ddpo/shapes_small.yaml"
ARMS = {a.name: a for a in [
    Arm("prdp", PRDP),  # the presets: LoRA rank 8, lr 5e-4, beta 1, clip 1e-2
    Arm("prdp-lr2e-3", PRDP, ["train.optim.lr=2e-3"]),
    Arm("prdp-lr5e-3", PRDP, ["train.optim.lr=5e-3"]),
    Arm("prdp-beta10", PRDP, ["train.prdp.beta=10"]),
    Arm("prdp-clip0.1", PRDP, ["train.prdp.clip_range=0.1"]),
    Arm("ddpo", DDPO),
    Arm("ddpo-lr2e-3", DDPO, ["train.optim.lr=2e-3"]),
    Arm("ddpo-lr5e-3", DDPO, ["train.optim.lr=5e-3"]),
    Arm("ddpo-clip0.1", DDPO, ["train.ddpo.clip_range=0.1"]),
    Arm("oracle", PRDP, [ORACLE]),  # the positive control: PRDP trained on gold itself
]}
COLUMNS = [("d_eval_reward", "Δ proxy (eval prompts)"), ("d_eval_gold", "Δ gold (eval prompts)"),
           ("d_heldout_reward", "Δ proxy (held-out)"), ("d_heldout_gold", "Δ gold (held-out)"),
           ("peak_gold", "peak Δ gold (eval)"), ("kl_at_peak", "KL at the peak", ".3g"), ("kl", "summed KL", ".3g")]


def curves(folder: Path) -> dict[str, list[float]]:
    """Per evaluation (epoch 0 and every checkpoint): summed KL so far, proxy and gold gain on the evaluation
    prompts; per epoch: summed KL and held-out proxy and gold gain."""
    metrics, evals = read_jsonl(folder / "metrics.jsonl"), read_jsonl(folder / "eval.jsonl")
    kl = {0: 0.0, **{r["epoch"]: total for r, total in zip(metrics, summed_kl(metrics))}}
    first = evals[0]
    out = {"eval_kl": [kl[r["epoch"]] for r in evals],
           "eval_proxy": [r["eval_reward"] - first["eval_reward"] for r in evals],
           "eval_gold": [r["eval_gold"] - first["eval_gold"] for r in evals],
           "epoch_kl": [0.0] + [kl[r["epoch"]] for r in metrics],
           "heldout_proxy": [0.0] + [r["heldout_reward"] - first["heldout_reward"] for r in metrics],
           "heldout_gold": [0.0] + [r["heldout_gold"] - first["heldout_gold"] for r in metrics]}
    return out


def with_peak(scores: dict, c: dict) -> dict:
    peak = max(range(len(c["eval_gold"])), key=c["eval_gold"].__getitem__)
    return {**scores, "peak_gold": c["eval_gold"][peak], "kl_at_peak": c["eval_kl"][peak]}


def plot(runs: dict[str, list[Path]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("eval", "proxy", "proxy gain, evaluation prompts"), ("eval", "gold", "gold gain, evaluation prompts"),
              ("heldout", "proxy", "proxy gain, held-out prompts"), ("heldout", "gold", "gold gain, held-out prompts")]
    for name, folders in runs.items():
        cs = [curves(f) for f in folders]
        style = {"prdp": "-", "ddpo": "--"}.get(name.split("-")[0], ":")
        for ax, (where, what, title) in zip(axes.flat, panels):
            x_key = "eval_kl" if where == "eval" else "epoch_kl"
            n = min(len(c[x_key]) for c in cs)
            x = np.mean([c[x_key][:n] for c in cs], axis=0)
            y = np.mean([c[f"{where}_{what}"][:n] for c in cs], axis=0)
            ax.plot(x, y, style, marker="o" if where == "eval" else None, ms=3, label=name)
            ax.set_title(title)
    for ax in axes.flat:
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("symlog", linthresh=1e-5)  # runs drift from ~1e-5 to ~1: a linear axis hides the small ones
        ax.set_xlim(left=0)
        ax.set_xlabel("summed approximate KL (policy drift, symlog)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("over-optimisation: proxy (shapes_preference) vs gold, mean over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add_run_arguments(parser, "overoptimisation", [0], 2)
    parser.add_argument("--section", default="overoptimisation", help="BENCHMARKS.md section and figure name")
    parser.add_argument("--note", default="", help="a paragraph put above the table")
    args = parser.parse_args()
    plan = [ARMS[name] for name in args.arms]
    runs = run_all(plan, args.seeds, args.out, args.epochs, args.workers, args.threads)
    results = {name: [with_peak(final_scores(f), curves(f)) for f in folders] for name, folders in runs.items()}
    figure = plot(runs, figures_dir(args) / f"{args.section}.png")
    from rewardtune.utils.benchmarks import command_line, header, update_section

    drop = {name: statistics.mean(r["d_eval_gold"] - r["peak_gold"] for r in rows) for name, rows in results.items()}
    turned = [name for name, rows in results.items()
              if drop[name] < -0.01 and statistics.mean(r["d_eval_reward"] for r in rows) > 0]
    oracle = ("" if "oracle" not in drop else
              f" The peak is the best of the run's evaluations, so it sits above the final value by evaluation jitter "
              f"alone; the oracle, trained on gold itself, ends {drop['oracle']:+.3f} from its peak: a fall of that "
              "size is not evidence of hacking.")
    text = "\n".join([
        header(command_line().replace(args.note, "TEXT") if args.note else command_line()), args.note, "",
        f"Seeds {args.seeds}; every arm is its preset plus: "
        + "; ".join(f"`{a.name}` {' '.join(a.overrides) or '(as shipped)'}" for a in plan) + ". Δ = after the last "
        "epoch minus before; peak = the best evaluated gold gain on the evaluation prompts during the run and the "
        "summed KL where it happened. Where the proxy keeps rising while gold turns down, the proxy is being "
        "hacked: " + (", ".join(f"`{n}`" for n in turned) + " (final gold more than 0.01 below its peak while the "
                      "proxy gain is positive)" if turned else "no arm ends more than 0.01 gold below its peak "
                      "with a positive proxy gain") + "." + oracle, "", table(args.arms, results, COLUMNS), "",
        f"![over-optimisation]({shown(figure)})"])
    print(text)
    if not args.no_write:
        update_section(args.section, text)


if __name__ == "__main__":
    main()
