"""Image generation used by ``rewardtune sample`` and the library: :func:`iter_image_batches` (images batch by
batch, image ``i`` of ``prompts[i]`` from ``seeds[i]``), :func:`generate_images`, :func:`grid_images` and
:func:`check_image_size`.

The command itself (:class:`SampleConfig`, :func:`run_sample`, the output folder) lives in
:mod:`rewardtune.commands.sample`; those names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rewardtune.commands.sample import SampleConfig, prepare_out_dir, run_sample
from rewardtune.errors import UserError

GRID_MAX = 64  # grid.png shows at most this many images


def check_image_size(pipe, height: int | None, width: int | None) -> None:
    """``height``/``width`` must be multiples of the pipeline's VAE scale factor (8 for Stable Diffusion)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % factor:
            low = max(factor, value // factor * factor)
            raise UserError(f"{key} {value} is not a multiple of {factor} (this model's VAE scale factor); "
                            f"use e.g. {low} or {low + factor}")


def iter_image_batches(pipe, prompts: list[str], seeds: list[int], cfg: SampleConfig) -> Iterator[torch.Tensor]:
    """Images ``[b,3,H,W]`` in [0,1] for ``prompts[i]`` drawn from ``seeds[i]``, one batch of ``cfg.batch_size``
    at a time."""
    from rewardtune.diffusion.sampling import decode_latents, encode_prompts, generators_for, sample_trajectories

    device = pipe.unet.device
    negative = encode_prompts(pipe, [""])
    for start in range(0, len(prompts), cfg.batch_size):
        embeds = encode_prompts(pipe, prompts[start:start + cfg.batch_size])
        trajectory = sample_trajectories(
            pipe, embeds, negative.expand_as(embeds), generators_for(seeds[start:start + cfg.batch_size], device),
            steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta, height=cfg.height, width=cfg.width,
        )
        with torch.no_grad():
            images = decode_latents(pipe, trajectory.final).cpu()
        yield images


def generate_images(pipe, prompts: list[str], seeds: list[int], cfg: SampleConfig, progress=None) -> torch.Tensor:
    """All of :func:`iter_image_batches` as one ``[N,3,H,W]`` tensor."""
    batches = []
    for images in iter_image_batches(pipe, prompts, seeds, cfg):
        batches.append(images)
        if progress is not None:
            progress(len(images))
    return torch.cat(batches)


def grid_images(num_prompts: int, per_prompt: int, limit: int = GRID_MAX) -> tuple[Callable[[int], bool], int | None]:
    """Which image indices ``grid.png`` shows (at most ``limit``: the first images of the first prompts, one row
    per prompt) and its column count."""
    shown = min(per_prompt, max(1, limit // num_prompts))
    rows = limit // shown
    return (lambda k: k % per_prompt < shown and k // per_prompt < rows), (shown if num_prompts > 1 else None)


__all__ = ["GRID_MAX", "SampleConfig", "check_image_size", "generate_images", "grid_images",
           "iter_image_batches", "prepare_out_dir", "run_sample"]
