"""``rewardtune sample``: images from a pipeline, with a grid and a manifest of prompts and seeds.

Image ``k`` (in prompt-major order) is drawn from seed ``seed + k`` with its own generator, so the same seed always
gives the same image (bit-identical at equal batch size; other batch sizes change only float summation order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardtune.config import require, save_config
from rewardtune.errors import UserError
from rewardtune.utils.images import make_grid, save_png
from rewardtune.utils.io import atomic_write_json, write_csv

logger = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """What to sample and how. ``num_images`` is per prompt; ``eta=0`` is deterministic DDIM."""

    model: str = "shapes-tiny"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    num_images: int = 4
    steps: int = 20
    guidance: float = 5.0
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 64
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    out: str = "outputs/sample"
    overwrite: bool = False

    def __post_init__(self) -> None:
        require(self.num_images >= 1, "num_images", "at least 1", self.num_images)
        require(self.steps >= 1, "steps", "a positive number of denoising steps", self.steps)
        require(self.guidance >= 0, "guidance", ">= 0 (1 disables classifier-free guidance)", self.guidance)
        require(0 <= self.eta <= 1, "eta", "in [0, 1]", self.eta)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(self.seed >= 0, "seed", ">= 0", self.seed)

    def prompt_list(self) -> list[str]:
        from rewardtune.prompts import read_prompts

        if self.prompts and self.prompts_file:
            raise UserError("give prompts either inline (--prompt) or from a file (--prompts), not both")
        prompts = read_prompts(self.prompts_file) if self.prompts_file else [p.strip() for p in self.prompts or []]
        if not prompts or not all(prompts):
            raise UserError("no prompt given; pass --prompt TEXT or --prompts FILE with one prompt per line")
        return prompts


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create ``out``; refuse a non-empty folder unless ``overwrite`` (never clobber earlier results silently)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {str(out)!r} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {str(out)!r} is not empty; choose a new --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def generate_images(pipe, prompts: list[str], seeds: list[int], cfg: SampleConfig, progress=None) -> torch.Tensor:
    """Images ``[N,3,H,W]`` in [0,1] for ``prompts[i]`` drawn from ``seeds[i]``, in batches of ``cfg.batch_size``."""
    from rewardtune.diffusion.sampling import decode_latents, encode_prompts, generators_for, sample_trajectories

    device = pipe.unet.device
    negative = encode_prompts(pipe, [""])
    images = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch_prompts = prompts[start:start + cfg.batch_size]
        embeds = encode_prompts(pipe, batch_prompts)
        trajectory = sample_trajectories(
            pipe, embeds, negative.expand_as(embeds), generators_for(seeds[start:start + cfg.batch_size], device),
            steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta, height=cfg.height, width=cfg.width,
        )
        with torch.no_grad():
            images.append(decode_latents(pipe, trajectory.final).cpu())
        if progress is not None:
            progress(len(batch_prompts))
    return torch.cat(images)


def run_sample(cfg: SampleConfig) -> Path:
    """Sample ``num_images`` per prompt; write PNGs, ``grid.png``, ``manifest.json/.csv`` and ``config.yaml``."""
    from tqdm.auto import tqdm

    from rewardtune.diffusion.loading import load_pipeline

    prompts = cfg.prompt_list()
    pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=cfg.device)
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    items = [(p, cfg.seed + k) for k, p in enumerate(p for p in prompts for _ in range(cfg.num_images))]
    with tqdm(total=len(items), desc="sampling", unit="img") as bar:
        images = generate_images(pipe, [p for p, _ in items], [s for _, s in items], cfg, progress=bar.update)
    rows = []
    for k, ((prompt, seed), image) in enumerate(zip(items, images)):
        name = f"{k:05d}.png"
        save_png(image, out / name)
        rows.append({"file": name, "prompt": prompt, "seed": seed})
    save_png(make_grid(images, ncol=cfg.num_images if len(prompts) > 1 else None), out / "grid.png")
    write_csv(out / "manifest.csv", rows)
    atomic_write_json(out / "manifest.json", rows)
    save_config(cfg, out / "config.yaml")
    logger.info("wrote %d images, grid.png and manifest.{json,csv} to %s", len(rows), out)
    return out
