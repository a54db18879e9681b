"""Mask methods at equal compute on shapes-tiny: one-shot global magnitude + finetune, GraNet, lottery (IMP with
rewinding) and BiP, all ending at the same sparsity; writes BENCHMARKS.md (prune-masks).

    python scripts/prune_masks_equal_compute.py [--ratio 0.9] [--steps 150] [--batch 16] [--num-prompts 64]
                                                [--seeds 0 1 2] [--out build/prune/masks] [--no-write]

Compute is counted in student forward+backward passes of ``--batch`` latents: a distillation step is one (plus a
teacher forward), a BiP iteration two (lower and upper level). Each arm spends ``--steps``: GraNet and lottery
train 3 rounds of ``steps/5`` then finetune the rest; BiP runs ``steps/5 * 3 / 2`` iterations then finetunes the
rest; one-shot finetunes all. Finetuning is distillation from shapes-tiny (task + output + 0.1 feature loss, lr 5e-4)
with the mask fixed. Seed s draws the 1024 renders, the batch order and noise, and the seeds of GraNet's regrowth
and BiP's batches with seed s (seed 0 is the first one-seed screen); with several seeds the table gives mean ± std
over seeds. Results are kept per arm and seed in ``--out/<arm>.json`` (a rerun skips finished ones).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from runs import mean_std

from rewardtune.diffusion import load_pipeline
from rewardtune.prompts import read_prompts
from rewardtune.prune import masks_of, prune_unet
from rewardtune.prune.evaluate import gold_fidelity, paired_change
from rewardtune.prune.masks import sparsity
from rewardtune.prune.recover import DistillWeights, distill, shapes_data
from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "rewardtune" / "assets" / "prompts" / "shapes_heldout.txt"


def arms(steps: int) -> dict[str, tuple[dict, int]]:
    """arm -> (prune_unet keywords, finetune steps after pruning)."""
    rounds = max(1, steps // 5)
    rest = steps - 3 * rounds
    return {"one-shot magnitude + finetune": (dict(method="magnitude"), steps),
            "GraNet (dense-to-sparse)": (dict(method="granet", updates=3, batch_size=16), rest),
            "lottery (IMP, rewinding)": (dict(method="lottery", rounds=3), rest),
            "BiP": (dict(method="bip", iterations=3 * rounds // 2, batch_size=16), rest)}


def run_arm(pipe, data, kwargs: dict, finetune: int, ratio: float, args, seed: int = 0) -> torch.nn.Module:
    weights = DistillWeights(1.0, 1.0, 0.1)
    rounds = max(1, args.steps // 5)

    def train(model, masks, steps):
        return distill(model, pipe.unet, data, steps=steps, batch_size=args.batch, lr=5e-4, weights=weights,
                       masks=masks or None, seed=seed)

    extra = {"train_fn": lambda m, masks: train(m, masks, rounds)} if kwargs["method"] in ("granet", "lottery") else {}
    if kwargs["method"] in ("granet", "bip"):
        extra.update(calibration=(data.latents[:256], data.states[:256]), seed=seed)
    pruned = prune_unet(pipe.unet, ratio=ratio, **kwargs, **extra)
    if finetune:
        train(pruned, masks_of(pruned), finetune)
    return pruned


def spread(n_seeds: int) -> str:
    return "one seed: ± standard error" if n_seeds == 1 else f"{n_seeds} seeds: mean ± std over seeds"


def row(name: str, qs: list[dict]) -> str:
    """One table row: ``± standard error`` of one seed's samples, or ``mean ± std`` over several seeds."""
    if len(qs) == 1:
        q = qs[0]
        fidelity, change = f"{q['mean']:.3f} ± {q['se']:.3f}", f"{100 * q['change']:+.1f} ± {100 * q['change_se']:.1f}"
    else:
        fidelity = mean_std([q["mean"] for q in qs], ".3f")
        change = mean_std([100 * q["change"] for q in qs], "+.1f")
    mean = {key: statistics.mean(q[key] for q in qs) for key in ("sparsity", "seconds")}
    return f"| {name} | {len(qs)} | {mean['sparsity']:.3f} | {fidelity} | {change} % | {mean['seconds']:.0f} s |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every arm")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "prune" / "masks")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("shapes-tiny")
    prompts = read_prompts(HELDOUT)[:args.num_prompts]
    items, seeds = [p for p in prompts for _ in range(2)], list(range(2 * len(prompts)))
    with torch.no_grad():
        base = gold_fidelity(pipe, items, seeds)
    results: dict[str, list[dict]] = {name: [] for name in arms(args.steps)}
    for seed in args.seeds:
        data = shapes_data(pipe, 1024, seed=seed)
        for name, (kwargs, finetune) in arms(args.steps).items():
            suffix = f"_seed{seed}" if seed else ""  # seed 0 keeps the name of the first (one-seed) screen
            path = args.out / f"{kwargs['method']}_{args.ratio}_{args.steps}{suffix}.json"
            if not path.is_file():
                start = time.time()
                pruned = run_arm(pipe, data, kwargs, finetune, args.ratio, args, seed)
                with torch.no_grad():
                    q = paired_change(gold_fidelity(pipe, items, seeds, unet=pruned), base)
                q.update(sparsity=sparsity(masks_of(pruned)), seconds=time.time() - start)
                path.write_text(json.dumps(q))
            results[name].append(q := json.loads(path.read_text()))
            print(f"{name} seed {seed}: {q['mean']:.3f} ({100 * q['change']:+.1f} %)", flush=True)
    rows = [row(name, qs) for name, qs in results.items()]
    text = (f"## Pruning: mask methods at equal compute, sparsity {args.ratio}\n\n" + header(command_line())
            + f"Sparsity {args.ratio}, each arm {args.steps} student forward+backward passes of batch {args.batch} "
            "(see the script's docstring for the split), distilled from shapes-tiny on 1024 shapes renders. Gold "
            f"fidelity on {len(items)} held-out samples, change paired against the original (original "
            f"{float(base.mean()):.3f}); {spread(len(args.seeds))}. Wall time: mean per arm and seed. A small "
            "budget on a shared CPU, so a screen, not a verdict. Masks: no speed-up.\n\n| arm | seeds | sparsity | "
            "gold fidelity | change | wall time |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nWall time: {time.time() - t0:.0f} s.\n")
    print(text)
    if not args.no_write:
        update_section(f"prune-masks-{args.ratio}", text)


if __name__ == "__main__":
    main()
