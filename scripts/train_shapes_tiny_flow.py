"""Train ``shapes-tiny-flow``: a StableDiffusion3Pipeline for the shapes world, its transformer trained from scratch
by flow matching (rectified flow, SD3's objective), the rest shared with ``shapes-tiny``.

    python scripts/train_shapes_tiny_flow.py train      # SD3Transformer2DModel on VAE latents (resumable)
    python scripts/train_shapes_tiny_flow.py assemble   # write rewardtune/assets/shapes-tiny-flow
    python scripts/train_shapes_tiny_flow.py report     # loss curve -> docs/figures, table -> BENCHMARKS.md

Components: shapes-tiny's VAE (8x8x4 latents of 32x32 images, ``shift_factor`` 0), the tiny CLIP's text tower
with its projection as both CLIP encoders (``hidden_states[-2]`` concatenated: 192-wide rows; pooled 2 x 64), no
T5 (the pipeline pads with zero rows, which training sees collapsed: :mod:`rewardtune.diffusion.sd3`), and a
``FlowMatchEulerDiscreteScheduler`` with shift 1. Training: ``x_s = (1 - s) x_0 + s eps`` with ``s`` logit-normal
(SD3's choice), target velocity ``eps - x_0``, 10 % empty captions for guidance, EMA weights.
Quality is measured by ``scripts/eval_shapes_tiny.py --model shapes-tiny-flow``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_shapes_tiny import ASSETS, _cosine_lr, _encode_dataset, _log_offset, _log_step

from rewardtune.diffusion.sd3 import encode_sd3, key_bias_mask, use_key_bias_attention
from rewardtune.shapes.data import ShapesData
from rewardtune.utils.plots import plot_curves

log = logging.getLogger("train_shapes_tiny_flow")
PATCH = 2


def transformer_model():
    """A tiny ``SD3Transformer2DModel`` (6 joint blocks, 128 wide, 2x2 patches of the 8x8x4 latents)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=PATCH, in_channels=4, out_channels=4, num_layers=6,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=192,
                                 caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=8)


def clip_text_with_projection():
    """The tiny CLIP's text tower and text projection as a ``CLIPTextModelWithProjection`` (SD3's CLIP encoders)."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(ASSETS / "shapes-clip")
    config = clip.config.text_config
    config.projection_dim = clip.config.projection_dim
    text = CLIPTextModelWithProjection(config)
    text.text_model.load_state_dict(clip.text_model.state_dict())
    text.text_projection.load_state_dict(clip.text_projection.state_dict())
    return text.eval()


def build_pipeline(transformer=None):
    """The shapes-tiny-flow pipeline around ``transformer`` (a fresh random one by default)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(ASSETS / "shapes-tiny" / "vae")
    vae.register_to_config(shift_factor=0.0)
    text = clip_text_with_projection()
    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "shapes-tiny" / "tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else transformer_model(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
        text_encoder=text, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(text), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train(work: Path, steps: int, batch: int, seed: int, resume: bool) -> None:
    rng = np.random.default_rng(seed + 100 * resume)
    data = ShapesData.generate(30_000, seed=seed + 3 + 100 * resume)
    folder = work / "transformer"
    pipe = build_pipeline()
    if resume:
        from diffusers import SD3Transformer2DModel

        pipe.transformer = SD3Transformer2DModel.from_pretrained(folder)
    model = pipe.transformer
    use_key_bias_attention(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    vae = pipe.vae.eval()
    lat_mean, lat_std = _encode_dataset(vae, data.images)
    scale = vae.config.scaling_factor
    torch.manual_seed(seed + 100 * resume)
    base_lr = 2e-4 if resume else 5e-4
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.01)
    step0, seconds0 = _log_offset(work / "flow_log.jsonl") if resume else (0, 0.0)
    t0 = time.time() - seconds0
    image_rows = (8 // PATCH) ** 2
    with open(work / "flow_log.jsonl", "a" if resume else "w") as fh:
        for step in range(steps):
            _cosine_lr(opt, step, steps, base_lr)
            idx = rng.integers(len(data.scenes), size=batch)
            x0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) * scale
            embeds, pooled, key_bias = encode_sd3(pipe, data.captions(idx, rng, drop_prob=0.1))
            noise = torch.randn_like(x0)
            sigma = torch.sigmoid(torch.randn(batch))  # logit-normal(0, 1)
            s = sigma.view(-1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            velocity = model(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                             pooled_projections=pooled, joint_attention_kwargs=key_bias_mask(key_bias, image_rows)
                             ).sample
            loss = F.mse_loss(velocity, noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            if step % 50 == 0 or step == steps - 1:
                _log_step(fh, step0 + step, t0, loss=loss.item())
            if step % 500 == 499:
                ema.save_pretrained(folder)
    ema.save_pretrained(folder)
    plot_curves(work / "flow_log.jsonl", ["loss"], work / "flow_curve.png", title="tiny SD3 transformer (flow MSE)",
                smooth=20)


def assemble(work: Path, assets: Path = ASSETS) -> None:
    from diffusers import SD3Transformer2DModel

    from rewardtune.diffusion.backbones import backbone_of

    pipe = build_pipeline(SD3Transformer2DModel.from_pretrained(work / "transformer"))
    backbone_of(pipe).save(pipe, assets / "shapes-tiny-flow")  # model_index.json names the absent T5 as null
    from train_shapes_tiny import copy_bpe_files

    for name in ("tokenizer", "tokenizer_2"):
        copy_bpe_files(ASSETS / "shapes-tiny" / "tokenizer", assets / "shapes-tiny-flow" / name)
    log.info("wrote %s", assets / "shapes-tiny-flow")


def report(work: Path) -> None:
    from rewardtune.utils.benchmarks import command_line, header, update_section

    figures = Path(__file__).resolve().parents[1] / "docs" / "figures"
    plot_curves(work / "flow_log.jsonl", ["loss"], figures / "shapes_flow_curve.png",
                title="tiny SD3 transformer (flow MSE)", smooth=20)
    records = [json.loads(x) for x in (work / "flow_log.jsonl").read_text().splitlines() if x.strip()]
    first, last = records[0], records[-1]
    n = sum(p.numel() for p in build_pipeline().transformer.parameters())
    text = header(command_line()) + (
        "| stage | parameters | steps | loss first -> last | wall time |\n|---|---|---|---|---|\n"
        f"| SD3 transformer | {n / 1e6:.2f}M | {last['step'] + 1} | {first['loss']:.4f} -> {last['loss']:.4f} | "
        f"{last['seconds'] / 60:.1f} min |\n\nCurve: `docs/figures/shapes_flow_curve.png`. A resumed stage "
        "(`--resume`) restarts from the saved EMA weights with a fresh AdamW at lr 2e-4 (cosine).\n")
    print(text)
    update_section("shapes-flow-training", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "assemble", "report"])
    parser.add_argument("--work", type=Path, default=Path("build/shapes"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue training from WORK/transformer")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="assemble: where to write the model folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "train":
        train(args.work, args.steps, args.batch, args.seed, args.resume)
    elif args.stage == "assemble":
        assemble(args.work, args.assets)
    else:
        report(args.work)


if __name__ == "__main__":
    main()
