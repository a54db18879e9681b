"""The three-regime sweep of pruning (Zhou, Yang, Chang, Mahoney 2023) on the shapes world: a temperature-like knob
of the dense model (its training length) against a load-like one (the sparsity of global magnitude pruning);
writes BENCHMARKS.md (prune-regimes) and docs/figures/prune_regimes.png.

    python scripts/prune_regimes.py train [--train-steps 200 400 800 1600]
    python scripts/prune_regimes.py sweep [--dense 400 800 3200] [--sparsities 0.5 0.7 0.8 0.9]
                                          [--recover-steps 300] [--seeds 0 1 2] [--no-write]

``train``: shapes-tiny's UNet recipe (scripts/train_shapes_tiny.py: AdamW 5e-4 cosine, batch 64, EMA 0.999, the
same 60,000 renders, shapes-tiny's VAE and text encoder) for each length, into ``--work/t<steps>/unet``. The shipped
shapes-tiny UNet is the same recipe at 3200 steps: the longest-trained model of the sweep.

``sweep``: for each dense model and sparsity, global magnitude masks, then a short fixed recovery (masked
distillation from that dense model: ``--recover-steps`` x ``--batch``, lr 5e-4, task + output + 0.1 feature loss)
run twice with different data orders (seed s: orders 2s and 2s+1). Per cell and seed:

* gold fidelity of the first copy on held-out samples (paired against its dense model on the same prompts/seeds);
* the loss barrier between the two copies (linear mode connectivity; denoising loss on a fixed validation batch
  along the line between them, :mod:`rewardtune.prune.landscape`);
* linear CKA between the first copy's and the dense model's mid-block features on that batch.

With several ``--seeds`` the tables give mean ± std over seeds. Cells are kept in ``--work/cells/*.json``; a
rerun skips finished cells. About 5 minutes a cell at 300 recovery
steps on a shared core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rewardtune.diffusion import load_pipeline
from rewardtune.diffusion.sampling import forward_noise
from rewardtune.prompts import read_prompts
from rewardtune.prune import masks_of, prune_unet
from rewardtune.prune.evaluate import gold_fidelity, paired_change
from rewardtune.prune.importance import default_alphas_cumprod
from rewardtune.prune.landscape import linear_cka, loss_barrier
from rewardtune.prune.recover import DistillWeights, distill, shapes_data, tap_features
from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "rewardtune" / "assets" / "prompts" / "shapes_heldout.txt"
SHIPPED_STEPS = 3200  # scripts/train_shapes_tiny.py's default UNet length, which made the shipped shapes-tiny


def train(work: Path, lengths: list[int]) -> None:
    """Dense UNets of ``lengths`` steps (shapes-tiny's recipe) into ``work/t<steps>/unet``; finished ones kept."""
    pipe = load_pipeline("shapes-tiny")
    shared = work / "base"
    if not (shared / "clip" / "config.json").is_file():
        pipe.vae.save_pretrained(shared / "vae")
        pipe.text_encoder.save_pretrained(shared / "clip")
        pipe.tokenizer.save_pretrained(shared / "clip")
    for steps in lengths:
        run = work / f"t{steps}"
        if (run / "done").is_file():
            continue
        run.mkdir(parents=True, exist_ok=True)
        for part in ("vae", "clip"):
            if not (run / part).exists():
                (run / part).symlink_to(Path("..") / "base" / part)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_shapes_tiny.py"), "unet", "--work", str(run),
                        "--steps", str(steps)], check=True)
        (run / "done").touch()


def dense_models(work: Path, lengths: list[int] | None = None) -> dict[int, Path | None]:
    """Training steps -> UNet folder (None: the shipped shapes-tiny), shortest first; only ``lengths`` if given."""
    found = {int(p.name[1:]): p / "unet" for p in work.glob("t*") if (p / "done").is_file()}
    models = dict(sorted({**found, SHIPPED_STEPS: None}.items()))
    missing = sorted(set(lengths or []) - set(models))
    if missing:
        raise SystemExit(f"no trained dense model of {missing} steps under {work}: run the train stage first")
    return {k: v for k, v in models.items() if not lengths or k in lengths}


class Probe:
    """A fixed validation batch: noised latents of fresh renders (seed 1; recovery data are seed 0), their
    timesteps, noise and prompt states."""

    def __init__(self, pipe, n: int = 256, seed: int = 1) -> None:
        data = shapes_data(pipe, n, seed=seed)
        g = torch.Generator().manual_seed(seed)
        alphas = default_alphas_cumprod()
        self.t = torch.randint(0, len(alphas), (n,), generator=g)
        self.noise = torch.randn(data.latents.shape, generator=g)
        self.noisy = forward_noise(data.latents, self.noise, self.t, alphas)
        self.states = data.states

    @torch.no_grad()
    def loss(self, unet) -> float:
        """Denoising (eps) MSE of ``unet`` on the batch."""
        return float(F.mse_loss(unet(self.noisy, self.t, encoder_hidden_states=self.states).sample, self.noise))

    @torch.no_grad()
    def features(self, unet) -> torch.Tensor:
        """Mid-block output ``[n, C*h*w]``."""
        with tap_features(unet, ["mid_block"]) as store:
            unet(self.noisy, self.t, encoder_hidden_states=self.states)
        return store["mid_block"].flatten(1)


def run_cell(pipe, dense, sparsity: float, data, probe: Probe, items, seeds, base, steps: int, batch: int,
             seed: int = 0) -> dict:
    """One (dense model, sparsity) cell of the module docstring; ``seed`` s trains copies with orders 2s, 2s+1."""
    copies = []
    for order in (2 * seed, 2 * seed + 1):
        student = prune_unet(dense, method="magnitude", ratio=sparsity)
        if steps:
            distill(student, dense, data, steps=steps, batch_size=batch, lr=5e-4,
                    weights=DistillWeights(1.0, 1.0, 0.1), masks=masks_of(student), seed=order)
        copies.append(student.eval())
    with torch.no_grad():
        cell = {"sparsity": sparsity, **paired_change(gold_fidelity(pipe, items, seeds, unet=copies[0]), base),
                "cka": linear_cka(probe.features(copies[0]), probe.features(dense)), "loss": probe.loss(copies[0])}
    lmc = loss_barrier(copies[1], copies[0].state_dict(), copies[1].state_dict(), probe.loss)
    return {**cell, "barrier": lmc["barrier"], "path": lmc["losses"]}


def sweep(args) -> None:
    t0 = time.time()
    pipe = load_pipeline("shapes-tiny")
    shipped = pipe.unet
    heldout = read_prompts(HELDOUT)
    prompts = heldout[::max(1, len(heldout) // args.num_prompts)][:args.num_prompts]
    items, seeds = [p for p in prompts for _ in range(2)], list(range(2 * len(prompts)))
    data, probe = shapes_data(pipe, 1024, seed=0), Probe(pipe)
    cells_dir = args.work / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    for steps, folder in dense_models(args.work, args.dense).items():
        dense = shipped if folder is None else type(shipped).from_pretrained(folder).eval()
        with torch.no_grad():
            base = gold_fidelity(pipe, items, seeds, unet=dense)
        results[steps] = {"dense": float(base.mean()), "dense_loss": probe.loss(dense), "cells": {}}
        for sparsity in args.sparsities:
            per_seed = []
            for seed in args.seeds:
                suffix = f"_seed{seed}" if seed else ""  # seed 0 keeps the name of the first (one-seed) sweep
                path = cells_dir / f"t{steps}_s{sparsity}_r{args.recover_steps}x{args.batch}{suffix}.json"
                if not path.is_file():
                    start = time.time()
                    cell = run_cell(pipe, dense, sparsity, data, probe, items, seeds, base, args.recover_steps,
                                    args.batch, seed)
                    path.write_text(json.dumps({**cell, "seconds": time.time() - start}))
                per_seed.append(cell := json.loads(path.read_text()))
                print(f"t{steps} s{sparsity} seed {seed}: fidelity {cell['mean']:.3f} ({100 * cell['change']:+.1f} "
                      f"%), barrier {cell['barrier']:.4f}, CKA {cell['cka']:.3f}", flush=True)
            results[steps]["cells"][sparsity] = over_seeds(per_seed)
    text = report(results, args, len(items), time.time() - t0)
    print(text)
    if not args.no_write:
        figure(results, args.sparsities, ROOT / "docs" / "figures" / "prune_regimes.png")
        update_section("prune-regimes", text)


def over_seeds(cells: list[dict]) -> dict:
    """Mean and (``<key>_sd``) sample std over seeds of a cell's numbers; ``n`` the number of seeds."""
    out: dict = {"n": len(cells)}
    for key in ("mean", "change", "cka", "loss", "barrier"):
        values = torch.tensor([c[key] for c in cells], dtype=torch.float64)
        out[key], out[key + "_sd"] = float(values.mean()), float(values.std()) if len(cells) > 1 else 0.0
    return out


def pm(cell: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """``value`` or ``value ± sd`` (several seeds) of ``cell[key]`` in format ``fmt``."""
    text = format(scale * cell[key], fmt)
    return text + (f" ± {format(scale * cell[key + '_sd'], fmt.lstrip('+'))}" if cell["n"] > 1 else "")


def grid(results: dict, sparsities: list[float], cell_text, dense_text) -> str:
    head = "| training steps | dense | " + " | ".join(f"sparsity {s}" for s in sparsities) + " |\n"
    rows = [f"| {steps}{' (shapes-tiny)' if steps == SHIPPED_STEPS else ''} | {dense_text(r)} | "
            + " | ".join(cell_text(r["cells"][s]) for s in sparsities) + " |" for steps, r in results.items()]
    return head + "|---|---|" + "---|" * len(sparsities) + "\n" + "\n".join(rows) + "\n"


def report(results: dict, args, n_samples: int, seconds: float) -> str:
    s = args.sparsities
    return ("## Pruning: the three-regime sweep\n\n" + header(command_line())
            + f"Temperature-like knob: training steps of the dense UNet (shapes-tiny's recipe, batch 64; "
            f"{SHIPPED_STEPS} is the shipped model). Load-like knob: sparsity of global magnitude masks. Each cell: "
            f"prune, then {args.recover_steps} x {args.batch} masked distillation from its own dense model, twice "
            f"(data orders 2s and 2s+1 for seed s; seeds {args.seeds}, mean ± std over seeds where more than one). "
            f"Gold fidelity of the first copy on {n_samples} held-out samples ({args.num_prompts} "
            "prompts spread over shapes_heldout x 2 seeds, 20 DDIM steps, guidance 5; the change is paired against "
            "the dense model). Barrier: the largest rise of the denoising loss (256 fixed noised renders) above the "
            "chord on the straight line between the two copies (5 points). CKA: linear CKA of copy 0's mid-block "
            "features against the dense model's on the same batch.\n\n"
            "Gold fidelity after pruning and recovery (change against the dense model):\n\n"
            + grid(results, s, lambda c: f"{pm(c, 'mean', '.3f')} ({pm(c, 'change', '+.1f', 100)} %)",
                   lambda r: f"{r['dense']:.3f}")
            + "\nLoss barrier between the two recovered copies (denoising MSE; endpoint loss in brackets):\n\n"
            + grid(results, s, lambda c: f"{pm(c, 'barrier', '.4f')} ({c['loss']:.3f})",
                   lambda r: f"({r['dense_loss']:.3f})")
            + "\nLinear CKA to the dense model (mid block):\n\n"
            + grid(results, s, lambda c: pm(c, "cka", ".3f"), lambda r: "1")
            + f"\n![regimes](docs/figures/prune_regimes.png)\n\nWall time: {seconds / 60:.0f} min.\n")


def figure(results: dict, sparsities: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(results)
    panels = [("gold fidelity", "mean", "viridis"), ("loss barrier", "barrier", "magma"), ("CKA to dense", "cka",
                                                                                          "cividis")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, key, cmap) in zip(axes, panels):
        values = [[results[t]["cells"][s][key] for s in sparsities] for t in steps]
        im = ax.imshow(values, cmap=cmap, aspect="auto", origin="lower")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(sparsities)), [str(s) for s in sparsities])
        ax.set_yticks(range(len(steps)), [str(t) for t in steps])
        ax.set_xlabel("sparsity (load)")
        ax.set_ylabel("dense training steps (temperature)")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "sweep"])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "regimes")
    parser.add_argument("--train-steps", type=int, nargs="+", default=[200, 400, 800, 1600])
    parser.add_argument("--dense", type=int, nargs="+", default=None,
                        help="sweep: training lengths of the dense models to use (default: all trained, and 3200)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--recover-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sweep: recovery seeds of every cell")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.stage == "train":
        train(args.work, args.train_steps)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
