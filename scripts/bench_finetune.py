"""Where an online epoch's time goes, against the floor of its necessary UNet passes; writes BENCHMARKS.md.

    python scripts/bench_finetune.py [configs/prdp/shapes_small.yaml] [--epochs 4] [key=value ...]

Runs the preset for a few epochs (in a temporary folder), takes the median over epochs >= 2 (epoch 1 has no
reference pass) of the seconds spent sampling, scoring and updating, then times in the same process the UNet calls
the epoch cannot avoid, at the batch sizes the run used:

* sampling: T steps x ceil(S / batch) forward calls of 2*batch rows (classifier-free guidance in one pass);
* reference log-probs: S*T (sample, step) pairs in forward calls of 2*batch rows;
* update: K passes x S*k pairs in forward+backward calls of 2*forward_chunk rows (k = steps trained per sample).

The ratio epoch / floor is what the harness adds on top of the UNet (VAE decode, text encoder, reward, log-prob
arithmetic, optimiser, Python).

Side by side (``--new key=value ...``): today's settings (the preset and overrides, run by the checkout at
``--before``, default this one) against the new ones (this checkout, plus ``--new``), each ``rewardtune finetune``
in its own process, alternating for ``--rounds`` rounds; median seconds per phase over every epoch >= 2 of every
round. Before that, one batch of trajectories sampled by the base model is re-scored by the new settings' trainable
model (e.g. with LoRA adapters at their initialisation) to show that its per-step log-probs are unchanged.
Writes the ``finetune-speed-side-by-side`` section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from rewardtune.config import load_config
from rewardtune.finetune.report import read_metrics
from rewardtune.finetune.run import RunConfig, run_finetune
from rewardtune.utils.benchmarks import command_line, header, median_seconds, update_section

ROOT = Path(__file__).resolve().parents[1]


def unet_call_seconds(unet, rows: int, latent_shape, text_shape, backward: bool, repeats: int) -> float:
    """Median seconds of one UNet call on ``rows`` rows (forward, or forward+backward of the output's sum)."""
    x = torch.randn(rows, *latent_shape)
    t = torch.randint(0, 1000, (rows,))
    text = torch.randn(rows, *text_shape)

    def call():
        with torch.set_grad_enabled(backward):
            out = unet(x, t, encoder_hidden_states=text).sample
            if backward:
                out.sum().backward()
    seconds = median_seconds(call, repeats)
    unet.zero_grad(set_to_none=True)
    return seconds


def floor_seconds(cfg: RunConfig, repeats: int) -> dict[str, float]:
    """Seconds of the unavoidable UNet calls of one epoch (after the first), by phase."""
    from rewardtune.diffusion.loading import load_pipeline

    pipe = load_pipeline(cfg.model)
    unet, train = pipe.unet, cfg.train
    size = unet.config.sample_size
    latent, text = (unet.config.in_channels, size, size), (pipe.tokenizer.model_max_length,
                                                           unet.config.cross_attention_dim)
    samples, steps, batch = train.prompts_per_epoch * train.images_per_prompt, train.sampling.steps, \
        train.sampling.batch_size
    trained = max(1, int(steps * train.timestep_fraction))
    per_update = (train.groups_per_update or train.prompts_per_epoch) * train.images_per_prompt * trained
    update_calls = train.inner_steps * (samples * trained // per_update) * math.ceil(per_update / train.forward_chunk)
    forward = unet_call_seconds(unet, 2 * batch, latent, text, False, repeats)
    chunk_rows = 2 * min(train.forward_chunk, per_update)
    train_call = unet_call_seconds(unet.train(), chunk_rows, latent, text, True, repeats)
    return {"sampling": steps * math.ceil(samples / batch) * forward,
            "reference": math.ceil(samples * steps / batch) * forward,
            "update": update_calls * train_call}


PHASES = ("sampling", "reward", "update")


def epoch_seconds(checkout: Path, config: str, overrides: list[str], epochs: int) -> list[dict[str, float]]:
    """Per-phase seconds of epochs 2..``epochs`` of one ``rewardtune finetune`` run by ``checkout``'s code."""
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        command = [sys.executable, "-m", "rewardtune", "finetune", config, *overrides, f"epochs={epochs}",
                   f"save_every={epochs}", "heldout_count=1", f"output_dir={tmp}/run"]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[f"seconds_{k}"] for k in PHASES} for r in records[1:]]


def log_prob_change(config: str, overrides: list[str], new: list[str]) -> float:
    """Max |difference| of per-step log-probs of 12 trajectories sampled by the base model, re-scored by the new
    settings' trainable UNet at its initialisation vs recorded while sampling."""
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.diffusion.rescore import trajectory_log_probs
    from rewardtune.diffusion.service import generate
    from rewardtune.finetune.trainer import _add_trainable

    cfg = load_config(RunConfig, config, [*overrides, *new])
    pipe = load_pipeline(cfg.model)
    sampling = cfg.train.sampling
    out = generate(pipe, ["a red circle", "a blue square"], list(range(12)), sampling, per_prompt=6,
                   keep_trajectories=True, decode=False)
    _add_trainable(pipe, cfg)
    moves = SimpleNamespace(latents=out.trajectory.latents, timesteps=out.trajectory.timesteps, group=out.group,
                            prompt_embeds=out.prompt_embeds, negative_embeds=out.negative_embeds, family="ddim")
    with torch.no_grad():
        rescored = trajectory_log_probs(pipe.unet, pipe.scheduler, moves, torch.arange(12),
                                        torch.arange(sampling.steps), sampling.guidance, sampling.eta)
    return (rescored - out.trajectory.log_probs).abs().max().item()


def revision(checkout: Path) -> str:
    """``checkout``'s git commit (short), or its path when it is not a git checkout."""
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True)
    return f"{checkout} (commit {found.stdout.strip()})" if found.returncode == 0 else str(checkout)


def side_by_side(args) -> str:
    before = (args.before or ROOT).resolve()
    config = Path(args.config).resolve()
    change = log_prob_change(str(config), args.overrides, args.new)
    relative = config.relative_to(ROOT)  # each checkout runs its own copy of the preset
    sides = {"today": (before, args.overrides), "new": (ROOT, [*args.overrides, *args.new])}
    epochs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (checkout, overrides) in sides.items():
            epochs[name] += epoch_seconds(checkout, str(checkout / relative), overrides, args.epochs)
    med = {name: {k: statistics.median(e[k] for e in rows) for k in PHASES} | {
        "epoch": statistics.median(sum(e.values()) for e in rows)} for name, rows in epochs.items()}
    lines = ["| phase | today (s) | new (s) | today / new |", "|---|---:|---:|---:|"]
    for key in (*PHASES, "epoch"):
        ratio = med["today"][key] / med["new"][key] if med["new"][key] else float("nan")
        bold = "**" if key == "epoch" else ""
        lines.append(f"| {bold}{key}{bold} | {med['today'][key]:.2f} | {med['new'][key]:.2f} | "
                     f"{bold}{ratio:.2f}x{bold} |")
    return header(command_line()) + (
        f"`{relative}` {' '.join(args.overrides)}: today = the checkout at {revision(before)} with its copy of the "
        f"preset; new = this checkout's preset with `{' '.join(args.new) or '(no change)'}`. {args.rounds} "
        f"alternating rounds of {args.epochs}-epoch runs, median over epochs 2-{args.epochs} of every round (epoch 1 "
        f"has no reference pass). Log-probs of 12 base-model trajectories re-scored by the new trainable model at its "
        f"initialisation: max |difference| {change:.3g}.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "prdp" / "shapes_small.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", nargs="*", default=None, help="side by side: overrides of the new settings")
    parser.add_argument("--before", type=Path, help="side by side: the checkout that runs today's settings")
    parser.add_argument("--rounds", type=int, default=2, help="side by side: alternating rounds")
    parser.add_argument("--section", default="finetune-speed-side-by-side")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.new is not None:
        text = side_by_side(args)
        print(text)
        if not args.no_write:
            update_section(args.section, text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(RunConfig, args.config, [*args.overrides, f"epochs={args.epochs}", f"output_dir={tmp}",
                                                   f"save_every={args.epochs}"])
        run_finetune(cfg)
        records = read_metrics(Path(tmp) / "metrics.jsonl")[1:]
    measured = {k: statistics.median(r[f"seconds_{k}"] for r in records) for k in ("sampling", "reward", "update")}
    floor = floor_seconds(cfg, args.repeats)
    epoch, floor_total = sum(measured.values()), sum(floor.values())
    train = cfg.train
    text = header(command_line()) + (
        f"`{Path(args.config).relative_to(ROOT) if Path(args.config).is_absolute() else args.config}` "
        f"({train.algorithm}: N={train.prompts_per_epoch} x B={train.images_per_prompt}, T={train.sampling.steps}, "
        f"K={train.inner_steps}, forward_chunk={train.forward_chunk}); median over epochs 2-{args.epochs}; the floor "
        f"is timed in the same process (median of {args.repeats} calls per shape).\n\n"
        "| phase | epoch seconds | floor seconds (UNet calls only) | ratio |\n|---|---|---|---|\n"
        f"| sampling + reference log-probs | {measured['sampling']:.2f} | "
        f"{floor['sampling'] + floor['reference']:.2f} | "
        f"{measured['sampling'] / (floor['sampling'] + floor['reference']):.2f} |\n"
        f"| reward (incl. gold, logged only) | {measured['reward']:.2f} | 0 | - |\n"
        f"| update (K passes) | {measured['update']:.2f} | {floor['update']:.2f} | "
        f"{measured['update'] / floor['update']:.2f} |\n"
        f"| **epoch** | **{epoch:.2f}** | **{floor_total:.2f}** | **{epoch / floor_total:.2f}** |\n")
    print(text)
    if not args.no_write:
        update_section(f"finetune-speed-{train.algorithm}", text)


if __name__ == "__main__":
    main()
