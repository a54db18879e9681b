"""Reproduce PRDP's claims in the shapes world; writes a table and curves into BENCHMARKS.md / docs/figures.

    python scripts/reproduce_prdp.py [--seeds 0 1 2] [--claims 1 2 3 4] [--workers 2] [--epochs N]
    python scripts/reproduce_prdp.py --epochs 120 --out build/reproduce10x --section reproduce-prdp-10x --existing

Every run is ``rewardtune finetune PRESET train.seed=S ...`` in its own process under ``--out`` (default
``outputs/reproduce``); a finished run (``summary.json`` present) is reused and an interrupted one resumes
(``resume=auto``), so the script can be stopped and started again. PRDP and DDPO runs of a claim use the same
prompts, N x B samples per epoch and epochs: equal reward-query budgets.

Claims (PRDP, Deng et al. CVPR 2024):
1. small prompt set: PRDP >= DDPO on proxy and gold reward (Table 1);
2. large prompt set: PRDP improves the gold reward while DDPO stalls or collapses (Table 2, Fig. 9);
3. without proximal clipping PRDP is unstable (Table 5);
4. beta trades proxy reward against gold and held-out reward (reward hacking, Sec. 4.4).

Scores are the fixed evaluation of each run (``eval.jsonl``: the preset's evaluation prompts x seeds, and its
held-out prompts), before (epoch 0) and after the last epoch; mean +- std over seeds, and per claim the difference
of its two deciding arms paired by seed (mean +- sd, two-sided paired t-test). A claim whose rule holds in the
seed means is reproduced only if those paired differences are significant (p < 0.05); else it is within noise.
``--existing`` tabulates the claims whose runs have all finished and starts none (a long study written part by
part).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from runs import (
    ORACLE,
    ROOT,
    Arm,
    add_run_arguments,
    figures_dir,
    final_scores,
    finished,
    paired_difference,
    paired_test,
    read_jsonl,
    run_all,
    shown,
    table,
)

PRDP_SMALL, DDPO_SMALL = "configs/prdp/shapes_small.yaml", "configs/ddpo/shapes_small.yaml"
PRDP_LARGE, DDPO_LARGE = "configs/prdp/shapes_large.yaml", "configs/ddpo/shapes_large.yaml"


def claims(betas: list[float]) -> dict[int, list[Arm]]:
    return {
        1: [Arm("prdp_small", PRDP_SMALL), Arm("ddpo_small", DDPO_SMALL), Arm("oracle_small", PRDP_SMALL, [ORACLE])],
        2: [Arm("prdp_large", PRDP_LARGE), Arm("ddpo_large", DDPO_LARGE), Arm("oracle_large", PRDP_LARGE, [ORACLE])],
        3: [Arm("prdp_small", PRDP_SMALL), Arm("prdp_small_noclip", PRDP_SMALL, ["train.prdp.clip_range=1e9"])],
        4: [beta_arm(b) for b in sorted(betas)],
    }


def beta_arm(beta: float) -> Arm:
    """PRDP small at ``beta``; the preset's own beta is the ``prdp_small`` run itself (not run twice)."""
    from rewardtune.presets import load_preset

    if beta == load_preset(ROOT / PRDP_SMALL, ROOT / "configs").train.prdp.beta:
        return Arm("prdp_small", PRDP_SMALL)
    return Arm(f"prdp_small_beta{beta:g}", PRDP_SMALL, [f"train.prdp.beta={beta}"])


def deciding_pair(claim: int, betas: list[float]) -> tuple[str, str, list[tuple[str, str]]]:
    """The two arms whose seed-paired difference decides ``claim`` (A - B) and the columns it is taken on."""
    gold, held, proxy = ("d_eval_gold", "Δ gold (eval)"), ("d_heldout_gold", "Δ gold (held-out)"), \
        ("d_eval_reward", "Δ proxy (eval)")
    return {1: ("prdp_small", "ddpo_small", [proxy, gold, held]),
            2: ("prdp_large", "ddpo_large", [gold, held]),
            3: ("prdp_small", "prdp_small_noclip", [gold, ("min_gold", "worst Δ gold")]),
            4: (beta_arm(min(betas)).name, beta_arm(max(betas)).name, [proxy, held])}[claim]


def paired_line(claim: int, betas: list[float], results: dict[str, list[dict]]) -> str:
    """``A − B, paired by seed: column mean ± sd (p = ..); ...`` for the claim's deciding arms."""
    a, b, columns = deciding_pair(claim, betas)
    if a not in results or b not in results:
        return ""
    cells = [f"{label} {paired_difference([r[k] for r in results[a]], [r[k] for r in results[b]])}"
             for k, label in columns]
    return f"{a} − {b}, paired by seed: " + "; ".join(cells) + "."


def mean(values: list[float]) -> float:
    return statistics.mean(values)


# The columns on which each claim's rule compares its two deciding arms (deciding_pair): a rule that holds in the
# seed means counts as reproduced only if every one of these seed-paired differences is significant.
RULE_KEYS = {1: ("d_eval_reward", "d_eval_gold"), 2: ("d_eval_gold",), 3: ("d_eval_gold", "min_gold"),
             4: ("d_eval_reward", "d_heldout_gold")}
ALPHA = 0.05


def word(claim: int, ok: bool, betas: list[float], results: dict[str, list[dict]]) -> str:
    """``Reproduced`` (rule holds in the seed means and every paired difference it compares has p < ALPHA),
    ``Within noise`` (holds in the means only; the largest p named) or ``Not reproduced``."""
    if not ok:
        return "Not reproduced"
    a, b, _ = deciding_pair(claim, betas)
    ps = [paired_test([r[k] for r in results[a]], [r[k] for r in results[b]])[2] for k in RULE_KEYS[claim]]
    if any(math.isnan(p) for p in ps):
        return "Holds in one seed (untested)"
    worst = max(ps)
    if worst < ALPHA:
        return "Reproduced"
    return f"Within noise (the rule holds in the seed means, but its paired difference has p = {worst:.2f})"


def verdicts(results: dict[str, list[dict]], betas: list[float]) -> dict[int, str]:
    """One sentence per claim: its rule on the seed means (stated in the sentence), then the seed-paired test of
    the arms it compares (:func:`word`)."""
    m = {name: {k: mean([r[k] for r in rows]) for k in rows[0]} for name, rows in results.items()}
    out = {}
    if {"prdp_small", "ddpo_small"} <= set(m):
        p, d = m["prdp_small"], m["ddpo_small"]
        ok = p["d_eval_reward"] >= d["d_eval_reward"] and p["d_eval_gold"] >= d["d_eval_gold"]
        out[1] = (f"{word(1, ok, betas, results)}: PRDP Δproxy {p['d_eval_reward']:+.3f} vs DDPO "
                  f"{d['d_eval_reward']:+.3f}, Δgold {p['d_eval_gold']:+.3f} vs {d['d_eval_gold']:+.3f} "
                  "(rule: PRDP >= DDPO on both).")
    if {"prdp_large", "ddpo_large"} <= set(m):
        p, d = m["prdp_large"], m["ddpo_large"]
        ok = p["d_heldout_gold"] > 0 and p["d_eval_gold"] > 0 and d["d_eval_gold"] < p["d_eval_gold"]
        out[2] = (f"{word(2, ok, betas, results)}: PRDP Δgold {p['d_eval_gold']:+.3f} (held-out "
                  f"{p['d_heldout_gold']:+.3f}) vs DDPO {d['d_eval_gold']:+.3f} (held-out {d['d_heldout_gold']:+.3f}) "
                  "(rule: PRDP's gold rises on train and held-out prompts and DDPO's rises less).")
    if {"prdp_small", "prdp_small_noclip"} <= set(m):
        c, n = m["prdp_small"], m["prdp_small_noclip"]
        ok = n["min_gold"] < c["min_gold"] and n["d_eval_gold"] < c["d_eval_gold"]
        out[3] = (f"{word(3, ok, betas, results)}: without clipping Δgold {n['d_eval_gold']:+.3f} "
                  f"(worst {n['min_gold']:+.3f}) vs with clipping {c['d_eval_gold']:+.3f} "
                  f"(worst {c['min_gold']:+.3f}) (rule: no-clip ends lower and dips lower).")
    names = [beta_arm(b).name for b in sorted(betas)]
    if len(names) >= 2 and all(n in m for n in names):
        proxy = [m[n]["d_eval_reward"] for n in names]
        gold = [m[n]["d_heldout_gold"] for n in names]
        ok = proxy[0] > proxy[-1] and gold[0] < gold[-1]
        out[4] = (f"{word(4, ok, betas, results)}: β {', '.join(f'{b:g}' for b in sorted(betas))} -> "
                  f"Δproxy {', '.join(f'{v:+.3f}' for v in proxy)}, Δheld-out gold "
                  f"{', '.join(f'{v:+.3f}' for v in gold)} (rule: the smallest β gains more proxy and less "
                  "held-out gold than the largest).")
    return out


def plot_claim(claim: int, arms: list[Arm], out: Path, seeds: list[int], path: Path) -> Path:
    """Training reward (per epoch) and evaluated gold (per checkpoint), mean over seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for arm in arms:
        runs = [out / arm.name / f"seed{s}" for s in seeds]
        metrics = [read_jsonl(r / "metrics.jsonl") for r in runs]
        evals = [read_jsonl(r / "eval.jsonl") for r in runs]
        epochs = np.array([r["epoch"] for r in metrics[0]])
        reward = np.mean([[r["reward_mean"] for r in m] for m in metrics], axis=0)
        axes[0].plot(epochs, reward, label=arm.name)
        e = np.array([r["epoch"] for r in evals[0]])
        for ax, key in zip(axes[1:], ("eval_reward", "eval_gold", "heldout_gold")):
            ax.plot(e, np.mean([[r[key] for r in ev] for ev in evals], axis=0), marker="o", label=arm.name)
    titles = ("proxy of each epoch's samples", "proxy (eval prompts)", "gold (eval prompts)", "gold (held-out)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"claim {claim}: mean over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "reproduce", [0, 1, 2], 1)
    parser.add_argument("--claims", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--section", default="reproduce-prdp", help="BENCHMARKS.md section (and figure names)")
    parser.add_argument("--existing", action="store_true", help="only the claims whose runs all finished; start none")
    parser.add_argument("--note", default="", help="a paragraph put above the claims")
    args = parser.parse_args()
    plan = {c: arms for c, arms in claims(args.betas).items() if c in args.claims}
    if args.existing:
        plan = {c: arms for c, arms in plan.items() if finished(arms, args.seeds, args.out, args.epochs) == arms}
        if not plan:
            raise SystemExit(f"no claim of {args.claims} has all its runs finished under {args.out}")
    unique = {arm.name: arm for arms in plan.values() for arm in arms}
    runs = run_all(list(unique.values()), args.seeds, args.out, args.epochs, args.workers, args.threads)
    results = {name: [final_scores(folder) for folder in folders] for name, folders in runs.items()}
    found = verdicts(results, args.betas)
    from rewardtune.utils.benchmarks import command_line, header, update_section

    parts = [header(command_line().replace(args.note, "TEXT") if args.note else command_line()),
             *([args.note + "\n"] if args.note else []),
             f"Seeds {args.seeds}; Δ = after the last epoch minus before finetuning, on "
             "the fixed evaluation: the presets' 8 evaluation prompts x 4 seeds (training prompts of shapes_small; "
             "for the large presets mostly prompts outside their 6,000) and 16 held-out prompts (attribute "
             "combinations never rendered for training), one image each; mean ± std over seeds. Every run: "
             f"{'the preset' if args.epochs is None else f'{args.epochs} epochs'} of N=6 prompts x B=6 images.\n"]
    for claim, arms in plan.items():
        name = f"{args.section.replace('-', '_')}_claim{claim}.png"
        figure = plot_claim(claim, arms, args.out, args.seeds, figures_dir(args) / name)
        parts.append(f"**Claim {claim}.** {found.get(claim, '')} {paired_line(claim, args.betas, results)}\n\n"
                     f"{table([a.name for a in arms], results)}\n\n"
                     f"![claim {claim}]({shown(figure)})\n")
    text = "\n".join(parts)
    print(text)
    if not args.no_write:
        update_section(args.section, text)


if __name__ == "__main__":
    main()
