"""Mask methods at equal compute on shapes-tiny: one-shot global magnitude + finetune, GraNet, lottery (IMP with
rewinding) and BiP, all ending at the same sparsity; writes BENCHMARKS.md (prune-masks).

    python scripts/prune_masks_equal_compute.py [--ratio 0.9] [--steps 150] [--batch 16] [--num-prompts 64]
                                                [--out build/prune/masks] [--no-write]

Compute is counted in student forward+backward passes of ``--batch`` latents: a distillation step is one (plus a
teacher forward), a BiP iteration two (lower and upper level). Each arm spends ``--steps``: GraNet and lottery
train 3 rounds of ``steps/5`` then finetune the rest; BiP runs ``steps/5 * 3 / 2`` iterations then finetunes the
rest; one-shot finetunes all. Finetuning is distillation from shapes-tiny (task + output + 0.1 feature loss, lr 5e-4)
with the mask fixed. Results are kept per arm in ``--out/<arm>.json`` (a rerun skips finished arms).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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


def run_arm(pipe, data, kwargs: dict, finetune: int, ratio: float, args) -> torch.nn.Module:
    weights = DistillWeights(1.0, 1.0, 0.1)
    rounds = max(1, args.steps // 5)

    def train(model, masks, steps):
        return distill(model, pipe.unet, data, steps=steps, batch_size=args.batch, lr=5e-4, weights=weights,
                       masks=masks or None, seed=0)

    extra = {"train_fn": lambda m, masks: train(m, masks, rounds)} if kwargs["method"] in ("granet", "lottery") else {}
    if kwargs["method"] in ("granet", "bip"):
        extra["calibration"] = (data.latents[:256], data.states[:256])
    pruned = prune_unet(pipe.unet, ratio=ratio, **kwargs, **extra)
    if finetune:
        train(pruned, masks_of(pruned), finetune)
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
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
    data = shapes_data(pipe, 1024, seed=0)
    rows = []
    for name, (kwargs, finetune) in arms(args.steps).items():
        path = args.out / f"{kwargs['method']}_{args.ratio}_{args.steps}.json"
        if not path.is_file():
            start = time.time()
            pruned = run_arm(pipe, data, kwargs, finetune, args.ratio, args)
            with torch.no_grad():
                q = paired_change(gold_fidelity(pipe, items, seeds, unet=pruned), base)
            q.update(sparsity=sparsity(masks_of(pruned)), seconds=time.time() - start)
            path.write_text(json.dumps(q))
        q = json.loads(path.read_text())
        rows.append(f"| {name} | {q['sparsity']:.3f} | {q['mean']:.3f} ± {q['se']:.3f} | "
                    f"{100 * q['change']:+.1f} ± {100 * q['change_se']:.1f} % | {q['seconds']:.0f} s |")
        print(rows[-1], flush=True)
    text = (f"## Pruning: mask methods at equal compute, sparsity {args.ratio}\n\n" + header(command_line())
            + f"Sparsity {args.ratio}, each arm {args.steps} student forward+backward passes of batch {args.batch} "
            "(see the script's docstring for the split), distilled from shapes-tiny on 1024 shapes renders. Gold "
            f"fidelity on {len(items)} held-out samples (mean ± standard error; original "
            f"{float(base.mean()):.3f}), change paired against the original. One seed; a small budget on a shared "
            "CPU, so a screen, not a verdict. Masks: no speed-up.\n\n| arm | sparsity | gold fidelity | change | "
            "wall time |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nWall time: {time.time() - t0:.0f} s.\n")
    print(text)
    if not args.no_write:
        update_section(f"prune-masks-{args.ratio}", text)


if __name__ == "__main__":
    main()
