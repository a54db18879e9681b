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
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "prdp" / "shapes_small.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
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
