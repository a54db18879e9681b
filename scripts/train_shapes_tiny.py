"""Train the shapes world's tiny models from scratch and assemble ``shapes-tiny`` (a StableDiffusionPipeline).

Stages (each resumable by re-running; outputs under ``--work``, default ``build/shapes``):

    python scripts/train_shapes_tiny.py clip      # BPE tokenizer + tiny CLIP, contrastive on image-caption pairs
    python scripts/train_shapes_tiny.py vae       # tiny AutoencoderKL, 32x32x3 <-> 8x8x4
    python scripts/train_shapes_tiny.py unet      # tiny UNet2DConditionModel on VAE latents, CLIP text states
    python scripts/train_shapes_tiny.py assemble  # write rewardtune/assets/shapes-tiny and shapes-clip

Each stage writes ``<stage>_log.jsonl`` (its loss curve) and ``<stage>_curve.png`` into the work folder.
The quality evaluation is ``scripts/eval_shapes_tiny.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.shapes.captions import make_prompt_set, small_prompt_set
from rewardtune.shapes.data import ShapesData, caption_match_matrix
from rewardtune.shapes import tiny_models
from rewardtune.utils.plots import plot_curves

log = logging.getLogger("train_shapes_tiny")
ASSETS = Path(__file__).resolve().parents[1] / "rewardtune" / "assets"


def _log_step(fh, step: int, t0: float, **values) -> None:
    record = {"step": step, "seconds": round(time.time() - t0, 1), **{k: round(float(v), 6) for k, v in values.items()}}
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    log.info(" ".join(f"{k}={v}" for k, v in record.items()))


def _cosine_lr(optimizer, step: int, total: int, base: float, warmup: int = 200) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_clip(work: Path, steps: int, batch: int, seed: int) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    rng = np.random.default_rng(seed)
    data = ShapesData.generate(40_000, seed=seed)
    corpus = data.captions(np.arange(len(data.scenes)), rng) + make_prompt_set(5000, seed=1) + small_prompt_set()
    tok_dir = tiny_models.save_clip_tokenizer(corpus, work / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    config = tiny_models.clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mean, std = torch.tensor([0.5, 0.5, 0.5])[:, None, None], torch.tensor([0.5, 0.5, 0.5])[:, None, None]
    t0 = time.time()
    with open(work / "clip_log.jsonl", "w") as fh:
        for step in range(steps):
            _cosine_lr(opt, step, steps, 1e-3)
            idx = rng.integers(len(data.scenes), size=batch)
            captions = data.captions(idx, rng)
            ids = tokenizer(captions, padding="max_length", max_length=tiny_models.MAX_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
            pixels = (data.images[idx] - mean) / std
            out = model(input_ids=ids, pixel_values=pixels)
            match = caption_match_matrix([data.scenes[i] for i in idx], captions).float()
            loss_i = -(F.log_softmax(out.logits_per_image, 1) * match / match.sum(1, keepdim=True)).sum(1).mean()
            loss_t = -(F.log_softmax(out.logits_per_text, 1) * match.T / match.T.sum(1, keepdim=True)).sum(1).mean()
            loss = (loss_i + loss_t) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                acc = (match.gather(1, out.logits_per_image.argmax(1, keepdim=True))).mean()
                _log_step(fh, step, t0, loss=loss.item(), match_acc=acc.item())
    model.save_pretrained(work / "clip")
    plot_curves(work / "clip_log.jsonl", ["loss", "match_acc"], work / "clip_curve.png", title="tiny CLIP")


def train_vae(work: Path, steps: int, batch: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = ShapesData.generate(40_000, seed=seed + 1)
    torch.manual_seed(seed)
    vae = tiny_models.vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    with open(work / "vae_log.jsonl", "w") as fh:
        for step in range(steps):
            _cosine_lr(opt, step, steps, 1e-3)
            x = data.images[rng.integers(len(data.scenes), size=batch)] * 2 - 1
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                _log_step(fh, step, t0, loss=loss.item(), recon=rec.item(), kl=kl.item())
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.images[i:i + 512] * 2 - 1).latent_dist.mean for i in range(0, 4096, 512)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(work / "vae")
    plot_curves(work / "vae_log.jsonl", ["recon", "kl"], work / "vae_curve.png", title="tiny VAE")


@torch.no_grad()
def _encode_dataset(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 1024):
        dist = vae.encode(images[i:i + 1024] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(work: Path, steps: int, batch: int, seed: int) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    rng = np.random.default_rng(seed)
    data = ShapesData.generate(60_000, seed=seed + 2)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(work / "clip")
    text_encoder = CLIPTextModel.from_pretrained(work / "clip").eval().requires_grad_(False)
    lat_mean, lat_std = _encode_dataset(vae, data.images)
    scale = vae.config.scaling_factor
    scheduler = DDPMScheduler(**tiny_models.scheduler_config())
    torch.manual_seed(seed)
    unet = tiny_models.unet_model()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    alphas = scheduler.alphas_cumprod
    t0 = time.time()
    with open(work / "unet_log.jsonl", "w") as fh:
        for step in range(steps):
            _cosine_lr(opt, step, steps, 5e-4)
            idx = rng.integers(len(data.scenes), size=batch)
            latents = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) * scale
            ids = tokenizer(data.captions(idx, rng, drop_prob=0.1), padding="max_length",
                            max_length=tiny_models.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                states = text_encoder(ids).last_hidden_state
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), unet.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            if step % 50 == 0 or step == steps - 1:
                _log_step(fh, step, t0, loss=loss.item())
            if step % 2000 == 1999:
                ema.save_pretrained(work / "unet")
    ema.save_pretrained(work / "unet")
    plot_curves(work / "unet_log.jsonl", ["loss"], work / "unet_curve.png", title="tiny UNet (eps MSE)", smooth=20)


def assemble(work: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "clip")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(work / "clip"),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=DDIMScheduler(**tiny_models.scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(ASSETS / "shapes-tiny")
    CLIPModel.from_pretrained(work / "clip").save_pretrained(ASSETS / "shapes-clip")
    tokenizer.save_pretrained(ASSETS / "shapes-clip")
    log.info("wrote %s and %s", ASSETS / "shapes-tiny", ASSETS / "shapes-clip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["clip", "vae", "unet", "assemble"])
    parser.add_argument("--work", type=Path, default=Path("build/shapes"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (stage default if omitted)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    defaults = {"clip": (2500, 128), "vae": (2000, 32), "unet": (7000, 64)}
    if args.stage == "assemble":
        assemble(args.work)
        return
    steps, batch = defaults[args.stage]
    trainer = {"clip": train_clip, "vae": train_vae, "unet": train_unet}[args.stage]
    trainer(args.work, args.steps or steps, args.batch or batch, args.seed)


if __name__ == "__main__":
    main()
