"""Quality of shapes-tiny (or shapes-tiny-flow) on held-out prompts, read by the oracle; writes the table into
BENCHMARKS.md (section ``<model>-quality``).

    python scripts/eval_shapes_tiny.py [--model shapes-tiny] [--images-per-prompt 4] [--steps 20] [--guidance 5]
    python scripts/eval_shapes_tiny.py --model shapes-tiny-flow   # the SD3 flow model (Euler ODE, eta 0)
    python scripts/eval_shapes_tiny.py --steps 10 8 6 5 --eta 1 --section sampling-schedule  # finetuning's sampler

Several ``--steps`` give one row each (same prompts and seeds): does a cheaper schedule keep quality? ``--eta 1`` is
the stochastic DDIM that finetuning samples with (every step has a log-probability); the default 0 is plain DDIM.

Held-out prompts name all five attributes of combinations never rendered for training. Reports accuracy of colour,
shape, colour+shape (the quality target: >= 70 %), position, size and background, the gold scores, the same read-out
on ground-truth renders of those prompts (the oracle's ceiling), and chance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rewardtune.diffusion.backbones import family_of
from rewardtune.diffusion.loading import load_pipeline
from rewardtune.diffusion.service import generate
from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.prompts import read_prompts
from rewardtune.shapes.captions import parse_prompt
from rewardtune.shapes.oracle import gold_scores, images_from_uint8, read_images
from rewardtune.shapes.world import Scene, render
from rewardtune.utils.benchmarks import command_line, header, update_section
from rewardtune.utils.images import make_grid, save_png

HELDOUT = Path(__file__).resolve().parents[1] / "rewardtune" / "assets" / "prompts" / "shapes_heldout.txt"
ATTRS = ("color", "shape", "position", "size", "background")


def accuracies(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    reading = read_images(images)
    asked = [parse_prompt(p) for p in prompts]
    acc = {k: float(np.mean([getattr(reading, k)[i] == a[k] for i, a in enumerate(asked)])) for k in ATTRS}
    acc["color+shape"] = float(np.mean([reading.color[i] == a["color"] and reading.shape[i] == a["shape"]
                                        for i, a in enumerate(asked)]))
    gold = gold_scores(images, prompts)
    acc.update({k: float(v.mean()) for k, v in gold.items()})
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (1: finetuning's stochastic sampler)")
    parser.add_argument("--section", help="BENCHMARKS.md section (default: <model>-quality)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("build/eval_shapes_tiny"))
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()

    prompts = read_prompts(HELDOUT)
    items = [p for p in prompts for _ in range(args.images_per_prompt)]
    seeds = list(range(len(items)))
    pipe = load_pipeline(args.model)
    family = {"ddim": "DDIM", "flow": "flow-ODE Euler"}[family_of(pipe)]
    rows, seconds = [], {}
    for steps in args.steps:
        settings = SamplerSettings(steps=steps, guidance=args.guidance, eta=args.eta, batch_size=100)
        t0 = time.time()
        images = generate(pipe, prompts, seeds, settings, per_prompt=args.images_per_prompt).images
        seconds[steps] = time.time() - t0
        eta = f", eta {args.eta:g}" if args.eta else ""
        rows.append((f"{args.model} ({steps} {family} steps{eta}, guidance {args.guidance})",
                     accuracies(images, items)))
    truth_scenes = [Scene(**{k: parse_prompt(p)[k] for k in ATTRS}, softness=0.8) for p in items]
    ceiling = accuracies(images_from_uint8(render(truth_scenes, seed=0)), items)

    args.out.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images[: 16 * args.images_per_prompt], ncol=args.images_per_prompt * 4), args.out / "grid.png")
    (args.out / "results.json").write_text(json.dumps({"model": dict(rows), "ground_truth": ceiling}, indent=2))
    cols = ["color+shape", *ATTRS, "fidelity", "taste"]
    chance = {"color+shape": 1 / 18, "color": 1 / 6, "shape": 1 / 3, "position": 1 / 9, "size": 1 / 3,
              "background": 1 / 4}
    table = "| images | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    for name, row in (*rows, ("ground-truth renders (oracle ceiling)", ceiling)):
        table += f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |\n"
    table += "| chance | " + " | ".join(f"{chance[c]:.3f}" if c in chance else "–" for c in cols) + " |\n"
    text = header(command_line()) + (
        f"{len(prompts)} held-out prompts x {args.images_per_prompt} seeds = {len(items)} images, sampled in "
        + ", ".join(f"{s:.1f} s ({len(items) / s:.1f} images/s)" for s in seconds.values())
        + " (batch 100; the last grid is saved).\n\n" + table)
    print(text)
    if not args.no_write:
        update_section(args.section or f"{args.model}-quality", text)


if __name__ == "__main__":
    main()
