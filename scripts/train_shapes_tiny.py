"""Train the shapes world's tiny models from scratch and assemble ``shapes-tiny`` (a StableDiffusionPipeline).

Stages (each resumable by re-running; outputs under ``--work``, default ``build/shapes``):

    python scripts/train_shapes_tiny.py clip      # BPE tokenizer + tiny CLIP, contrastive on image-caption pairs
    python scripts/train_shapes_tiny.py vae       # tiny AutoencoderKL, 32x32x3 <-> 8x8x4
    python scripts/train_shapes_tiny.py unet      # tiny UNet2DConditionModel on VAE latents, CLIP text states
    python scripts/train_shapes_tiny.py assemble  # write rewardtune/assets/shapes-tiny and shapes-clip
    python scripts/train_shapes_tiny.py report    # curves -> docs/figures, per-stage quality -> BENCHMARKS.md

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

from rewardtune.diffusion.sampling import forward_noise
from rewardtune.shapes import tiny_models
from rewardtune.shapes.captions import make_prompt_set, small_prompt_set
from rewardtune.shapes.data import ShapesData, caption_match_matrix
from rewardtune.utils.plots import plot_curves

log = logging.getLogger("train_shapes_tiny")
ASSETS = Path(__file__).resolve().parents[1] / "rewardtune" / "assets"


def _log_offset(path: Path) -> tuple[int, float]:
    """Step and seconds to continue a resumed stage's log from (0, 0 for a fresh log)."""
    if not path.exists():
        return 0, 0.0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return (lines[-1]["step"] + 1, lines[-1]["seconds"]) if lines else (0, 0.0)


def _log_step(fh, step: int, t0: float, **values) -> None:
    record = {
        "step": step, "seconds": round(time.time() - t0, 1), **{k: round(float(v), 6) for k, v in values.items()}
    }
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
            if step % 500 == 499:
                model.save_pretrained(work / "clip")
    model.save_pretrained(work / "clip")
    plot_curves(work / "clip_log.jsonl", ["loss", "match_acc"], work / "clip_curve.png", title="tiny CLIP")


def train_vae(work: Path, steps: int, batch: int, seed: int, resume: bool = False) -> None:
    """Reconstruction (MSE + L1) with a small KL; ``resume`` continues from ``work/vae`` at a lower rate."""
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(seed + 100 * resume)
    data = ShapesData.generate(40_000, seed=seed + 1 + 100 * resume)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(work / "vae") if resume else tiny_models.vae_model()
    base_lr = 4e-4 if resume else 1e-3
    opt = torch.optim.AdamW(vae.parameters(), lr=base_lr, weight_decay=0.0)
    step0, seconds0 = _log_offset(work / "vae_log.jsonl") if resume else (0, 0.0)
    t0 = time.time() - seconds0
    with open(work / "vae_log.jsonl", "a" if resume else "w") as fh:
        for step in range(steps):
            _cosine_lr(opt, step, steps, base_lr)
            x = data.images[rng.integers(len(data.scenes), size=batch)] * 2 - 1
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                _log_step(fh, step0 + step, t0, loss=loss.item(), recon=rec.item(), kl=kl.item())
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
    scheduler = DDPMScheduler.from_config(tiny_models.scheduler_config())  # ignores the DDIM-only keys
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
            noisy = forward_noise(latents, noise, t, alphas)
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
            if step % 800 == 799:
                ema.save_pretrained(work / "unet")
    ema.save_pretrained(work / "unet")
    plot_curves(work / "unet_log.jsonl", ["loss"], work / "unet_curve.png", title="tiny UNet (eps MSE)", smooth=20)


def clip_image_processor():
    """The tiny CLIP's preprocessing as a ``CLIPImageProcessor`` config: 32x32, mean/std 0.5 (as trained)."""
    from transformers import CLIPImageProcessor

    size = tiny_models.IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def copy_bpe_files(source: Path, folder: Path) -> None:
    """Keep CLIP's original ``vocab.json`` + ``merges.txt`` next to ``tokenizer.json``: transformers 5 writes only
    the latter, while older transformers and other CLIP tokenizers read the BPE files (the real SD layout)."""
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)


def assemble(work: Path, assets: Path = ASSETS) -> None:
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
    pipe.save_pretrained(assets / "shapes-tiny")
    CLIPModel.from_pretrained(work / "clip").save_pretrained(assets / "shapes-clip")
    tokenizer.save_pretrained(assets / "shapes-clip")
    clip_image_processor().save_pretrained(assets / "shapes-clip")
    for folder in (assets / "shapes-tiny" / "tokenizer", assets / "shapes-clip"):
        copy_bpe_files(work / "clip", folder)
    log.info("wrote %s and %s", assets / "shapes-tiny", assets / "shapes-clip")


@torch.no_grad()
def clip_zero_shot(clip_dir: Path, n: int = 1000) -> dict[str, float]:
    """Zero-shot accuracy of the tiny CLIP on held-out renders: pick colour+shape among the 18 "a <c> <s>" prompts,
    and the full caption among 200 held-out captions (over images whose caption is in that list)."""
    from rewardtune.prompts import read_prompts
    from rewardtune.rewards.shapes import load_tiny_clip
    from rewardtune.shapes.captions import parse_prompt
    from rewardtune.shapes.world import COLORS, SHAPES

    towers = load_tiny_clip(clip_dir)
    data = ShapesData.generate(n, seed=999, split="heldout")
    image = F.normalize(towers.encode_images(data.images), dim=-1)

    def best(texts: list[str]) -> list[int]:
        return (image @ F.normalize(towers.encode_texts(texts), dim=-1).T).argmax(1).tolist()

    pairs = [(c, s) for c in COLORS for s in SHAPES]
    pair_acc = np.mean([pairs[i] == (sc.color, sc.shape)
                        for i, sc in zip(best([f"a {c} {s}" for c, s in pairs]), data.scenes)])
    captions = read_prompts(ASSETS / "prompts" / "shapes_heldout.txt")
    truth = [tuple(parse_prompt(c)[k] for k in ("color", "shape", "size", "position", "background"))
             for c in captions]
    covered = [sc.combo() in set(truth) for sc in data.scenes]
    hits = [truth[i] == sc.combo() for i, sc in zip(best(captions), data.scenes)]
    return {"color+shape of 18": float(pair_acc),
            "full caption of 200": float(np.sum(hits) / max(1, np.sum(covered)))}


@torch.no_grad()
def vae_readback(vae_dir: Path, n: int = 1000) -> dict[str, float]:
    """Oracle read-back accuracy on VAE reconstructions of held-out renders (the ceiling for generation)."""
    from diffusers import AutoencoderKL

    from rewardtune.shapes.oracle import read_images

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    data = ShapesData.generate(n, seed=998, split="heldout")
    recon = (vae.decode(vae.encode(data.images * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    reading = read_images(recon)
    out = {k: float(np.mean([getattr(reading, k)[i] == getattr(s, k) for i, s in enumerate(data.scenes)]))
           for k in ("color", "shape", "size", "position", "background")}
    out["mse"] = float(F.mse_loss(recon, data.images))
    return out


def report(work: Path) -> None:
    """Training curves to docs/figures/ and the per-stage quality table to BENCHMARKS.md."""
    import shutil

    from rewardtune.utils.benchmarks import command_line, header, update_section

    figures = Path(__file__).resolve().parents[1] / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = []
    for stage in ("clip", "vae", "unet"):
        records = [json.loads(x) for x in (work / f"{stage}_log.jsonl").read_text().splitlines() if x.strip()]
        shutil.copy(work / f"{stage}_curve.png", figures / f"shapes_{stage}_curve.png")
        last = records[-1]
        first = records[0]
        lines.append(f"| {stage} | {last['step'] + 1} | {first['loss']:.4f} -> {last['loss']:.4f} | "
                     f"{last['seconds'] / 60:.1f} min |")
    clip = clip_zero_shot(ASSETS / "shapes-clip")
    vae = vae_readback(work / "vae")
    text = header(command_line()) + (
        "| stage | steps | loss first -> last | wall time |\n|---|---|---|---|\n"
        + "\n".join(lines) + "\n\n"
        + "Curves: `docs/figures/shapes_{clip,vae,unet}_curve.png`.\n\n"
        + "Tiny CLIP zero-shot on 1,000 held-out renders: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in clip.items()) + ".\n\n"
        + "VAE: oracle read-back of reconstructions of 1,000 held-out renders (ceiling for generation): "
        + ", ".join(f"{k} {v:.3f}" for k, v in vae.items()) + ".\n")
    print(text)
    update_section("shapes-training", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["clip", "vae", "unet", "assemble", "report"])
    parser.add_argument("--work", type=Path, default=Path("build/shapes"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (stage default if omitted)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="vae: continue training from WORK/vae")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="assemble: where to write the model folders")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    defaults = {"clip": (2500, 128), "vae": (2000, 32), "unet": (3200, 64)}
    if args.stage == "assemble":
        assemble(args.work, args.assets)
        return
    if args.stage == "report":
        report(args.work)
        return
    steps, batch = defaults[args.stage]
    if args.stage == "vae":
        train_vae(args.work, args.steps or steps, args.batch or batch, args.seed, resume=args.resume)
        return
    trainer = {"clip": train_clip, "unet": train_unet}[args.stage]
    trainer(args.work, args.steps or steps, args.batch or batch, args.seed)


if __name__ == "__main__":
    main()
