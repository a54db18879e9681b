"""The sampling service: every image rewardtune draws comes from :func:`generate_batches` (the ``sample`` command,
finetuning rollouts, evaluation grids and held-out scores, teacher data for distillation).

    settings = SamplerSettings(steps=20, guidance=5.0, eta=0.0)
    out = generate(pipe, ["a red circle", "a blue square"], seeds=[0, 1, 2, 3], settings=settings, per_prompt=2)
    out.images            # [4,3,H,W] in [0,1]; sample i shows prompts[i // per_prompt] from seeds[i]

Prompts are encoded once per call; samples are drawn in batches of ``settings.batch_size`` with one generator per
sample (an image depends only on its seed). A scheduler family (``SCHEDULER_FAMILIES`` in
:mod:`rewardtune.diffusion.settings`) supplies the step with log-probability, so another family (flow matching) is
a new entry, not a new code path; so is a pipeline kind (:mod:`rewardtune.diffusion.backbones`: SD's UNet, SD3's
transformer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from rewardtune.diffusion.backbones import Conditioning, denoiser
from rewardtune.diffusion.sampling import (
    Trajectory,
    decode_latents,
    encode_negative,
    encode_prompts,
    generators_for,
    sample_trajectories,
)
from rewardtune.diffusion.settings import SamplerSettings


@dataclass
class Generated:
    """One batch of samples ``b``: ``images [b,3,H,W]`` in [0,1] on the CPU (None without decoding),
    ``index [b]`` the sample indices of the call, ``trajectory`` (latents ``[b,T+1,C,h,w]``, log-probs ``[b,T]``)
    when asked for, ``group [b]`` each sample's prompt index, and the call's ``prompt_embeds`` (P rows, one per
    prompt) and ``negative_embeds`` (one row; None without guidance)."""

    images: torch.Tensor | None
    index: torch.Tensor
    group: torch.Tensor
    prompt_embeds: Conditioning
    negative_embeds: Conditioning | None
    trajectory: Trajectory | None = None

    @property
    def final_latents(self) -> torch.Tensor:
        return self.trajectory.final


def generate_batches(pipe, prompts: list[str], seeds: list[int], settings: SamplerSettings, per_prompt: int = 1,
                     keep_trajectories: bool = False, decode: bool = True,
                     keep_x0: bool = False) -> Iterator[Generated]:
    """Samples ``i = 0 .. len(seeds)-1`` of ``prompts[i // per_prompt]`` from ``seeds[i]``, batch by batch.

    ``keep_trajectories`` keeps every step's latents and log-probs (rollouts); otherwise only ``x_0`` is kept.
    ``keep_x0`` also keeps each step's predicted clean latent (``trajectory.x0_predictions [b,T,C,h,w]``).
    """
    if len(seeds) != len(prompts) * per_prompt:
        raise ValueError(f"need one seed per sample: {len(prompts)} prompts x {per_prompt} = "
                         f"{len(prompts) * per_prompt}, got {len(seeds)}")
    device = denoiser(pipe).device
    size = (settings.height, settings.width)
    embeds = encode_prompts(pipe, list(prompts), *size)
    negative = encode_negative(pipe, settings.negative_prompt, *size) if settings.guidance != 1.0 else None
    group = torch.arange(len(prompts), device=device).repeat_interleave(per_prompt)
    for start in range(0, len(seeds), settings.batch_size):
        index = torch.arange(start, min(start + settings.batch_size, len(seeds)))
        batch = embeds[group[index]]
        group_seeds = [seeds[int(g) * per_prompt] for g in group[index]]  # x_T of a group under same_latent
        trajectory = sample_trajectories(
            pipe, batch, None if negative is None else negative.expand(len(batch)),
            generators_for(seeds[start:start + settings.batch_size], device), steps=settings.steps,
            guidance=settings.guidance, eta=settings.eta, height=settings.height, width=settings.width,
            family=settings.scheduler, keep_latents=keep_trajectories, sde_window=settings.sde_window,
            initial_generators=generators_for(group_seeds, device) if settings.same_latent else None,
            keep_x0=keep_x0)
        images = None
        if decode:
            with torch.no_grad():
                images = decode_latents(pipe, trajectory.final).cpu()
        yield Generated(images, index, group[index], embeds, negative, trajectory)


def generate(pipe, prompts: list[str], seeds: list[int], settings: SamplerSettings, per_prompt: int = 1,
             keep_trajectories: bool = False, decode: bool = True,
             progress: Callable[[int], object] | None = None, keep_x0: bool = False) -> Generated:
    """:func:`generate_batches` joined into one :class:`Generated` (``progress(n)`` after each batch)."""
    parts = []
    for part in generate_batches(pipe, prompts, seeds, settings, per_prompt, keep_trajectories, decode,
                                 keep_x0=keep_x0):
        parts.append(part)
        if progress is not None:
            progress(len(part.index))
    first = parts[0]
    x0 = torch.cat([p.trajectory.x0_predictions for p in parts]) if keep_x0 else None
    trajectory = Trajectory(latents=torch.cat([p.trajectory.latents for p in parts]),
                            log_probs=torch.cat([p.trajectory.log_probs for p in parts]),
                            timesteps=first.trajectory.timesteps,
                            x0_predictions=x0)
    images = torch.cat([p.images for p in parts]) if decode else None
    return Generated(images, torch.cat([p.index for p in parts]), torch.cat([p.group for p in parts]),
                     first.prompt_embeds, first.negative_embeds, trajectory)


__all__ = ["SamplerSettings", "Generated", "generate", "generate_batches"]
