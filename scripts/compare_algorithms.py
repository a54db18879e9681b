"""PRDP vs GRPO vs DDPO on both model families of the shapes world (``shapes-tiny``, a UNet sampled with DDIM, and
``shapes-tiny-flow``, an SD3 transformer sampled with the flow SDE), with the positive control beside them; writes a
table into BENCHMARKS.md (section ``compare-algorithms``) and a grid figure into docs/figures.

    python scripts/compare_algorithms.py [--models tiny flow] [--arms prdp grpo ddpo oracle] [--seeds 0 1 2]

Every arm of a model runs that model's preset of its algorithm (``configs/ALG/shapes_small.yaml`` or
``configs/ALG/shapes_flow_small.yaml``): the same prompts, N x B reward queries per epoch, epochs, K passes, sampler
and optimiser; only the loss differs. ``oracle`` is the positive control: PRDP trained on the gold reward itself at
the proxy's scale (``shapes_gold:40``). Gold is never trained on otherwise. Runs live in ``--out`` (default
``outputs/compare``) as MODEL-ARM/seedS; they resume and are reused (scripts/runs.py).
"""

from __future__ import annotations

import argparse

from controls import grid_figure
from runs import (
    ORACLE,
    Arm,
    add_run_arguments,
    figures_dir,
    final_scores,
    finished,
    paired_difference,
    run_all,
    shown,
    table,
)

MODELS = {"tiny": "shapes_small", "flow": "shapes_flow_small"}
ARMS = {"prdp": ("prdp", []), "grpo": ("grpo", []), "ddpo": ("ddpo", []),
        "oracle": ("prdp", [ORACLE])}
COLUMNS = [("d_eval_reward", "Δ proxy (eval prompts)"), ("d_eval_gold", "Δ gold (eval prompts)"),
           ("d_heldout_reward", "Δ proxy (held-out)"), ("d_heldout_gold", "Δ gold (held-out)"),
           ("min_gold", "worst Δ gold during run"), ("kl", "summed KL", ".3g")]


def arms(models: list[str], names: list[str]) -> list[Arm]:
    """One arm per model x algorithm arm, named MODEL-ARM."""
    return [Arm(f"{m}-{a}", f"configs/{ARMS[a][0]}/{MODELS[m]}.yaml", ARMS[a][1]) for m in models for a in names]


PAIRS = [("prdp", "grpo"), ("prdp", "ddpo"), ("grpo", "ddpo"), ("prdp", "oracle")]
PAIRED = [("d_eval_gold", "Δ gold (eval prompts)"), ("d_heldout_gold", "Δ gold (held-out)"),
          ("d_eval_reward", "Δ proxy (eval prompts)")]


def paired_table(models: list[str], results: dict[str, list[dict]]) -> str:
    """Per model, the per-seed differences between two arms (the same seed draws the same prompts and evaluation
    images in both): mean ± sd and a two-sided paired t-test."""
    lines = ["| model | difference | " + " | ".join(label for _, label in PAIRED) + " |",
             "|---" * (len(PAIRED) + 2) + "|"]
    for model in models:
        for a, b in PAIRS:
            x, y = results.get(f"{model}-{a}"), results.get(f"{model}-{b}")
            if x and y:
                cells = [paired_difference([r[k] for r in x], [r[k] for r in y]) for k, _ in PAIRED]
                lines.append(f"| {model} | {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add_run_arguments(parser, "compare", [0, 1, 2], 2)
    parser.add_argument("--existing", action="store_true", help="only the runs that have finished; start none")
    args = parser.parse_args()
    plan = arms(args.models, args.arms)
    if args.existing:  # tabulate what has run, start nothing
        plan = finished(plan, args.seeds, args.out)
    runs = run_all(plan, args.seeds, args.out, args.epochs, args.workers, args.threads)
    results = {name: [final_scores(folder) for folder in folders] for name, folders in runs.items()}
    names = [a.name for a in plan]
    figure = grid_figure(names, args.out, args.seeds[0], figures_dir(args) / "compare_algorithms.png")
    from rewardtune.utils.benchmarks import command_line, header, update_section

    text = "\n".join([
        header(command_line()),
        f"Seeds {args.seeds}; each arm runs its model's preset (`configs/ALG/shapes_small.yaml` for `tiny`, "
        "`configs/ALG/shapes_flow_small.yaml` for `flow`): equal reward queries per run. Δ = after the last epoch "
        "minus before finetuning on the fixed evaluation (8 evaluation prompts x 4 seeds; 16 held-out prompts spread "
        "over shapes_heldout, one image each); proxy = shapes_preference (the training reward), gold = the hidden "
        "oracle (never trained on, except by `oracle`, the positive control: PRDP on `shapes_gold:40`). "
        "Mean ± std over seeds.", "", table(names, results, COLUMNS), "",
        "Paired by seed (arm A − arm B per seed; mean ± sd, two-sided paired t-test over the seeds):", "",
        paired_table(args.models, results), "",
        f"![compare]({shown(figure)}) Before (left) and after (right) grids of seed {args.seeds[0]}, "
        "one row per run, in the table's order."])
    print(text)
    if not args.no_write:
        update_section("compare-algorithms", text)


if __name__ == "__main__":
    main()
