"""Sampling trajectories from a Stable Diffusion pipeline with per-step log-probabilities.

Data path: prompts -> :func:`encode_prompts` -> :func:`sample_trajectories` (latents and per-step log-probs under
the sampling model) -> :func:`decode_latents` -> images ``[B,3,H,W]`` in [0,1]. Every part of rewardtune samples
through here; noise comes from one generator per sample, so an image depends only on its own seed, never on the
batch it was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from rewardtune.diffusion.backbones import Conditioning, backbone_of, family_of
from rewardtune.diffusion.settings import family_step, stochastic_steps


@dataclass
class Trajectory:
    """A batch of B denoising trajectories over T steps.

    latents: ``[B,T+1,C,h,w]``, ``x_T`` first and ``x_0`` last (``[B,2,C,h,w]`` when sampled without
    ``keep_latents``).
    log_probs: ``[B,T]``, ``log p(x_{t-1} | x_t, c)`` under the sampling model (NaN when ``eta == 0``).
    timesteps: ``[T]``, the scheduler timesteps in sampling order.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        """``x_0`` latents, ``[B,C,h,w]``."""
        return self.latents[:, -1]


def encode_prompts(pipe, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
    """The :class:`~rewardtune.diffusion.backbones.Conditioning` of ``prompts`` (``len(prompts)`` rows), as the
    pipeline conditions on them for images of ``height x width`` (None: native size; SD: text states ``[B,L,D]``
    padded to the tokenizer's max length)."""
    return backbone_of(pipe).encode(pipe, list(prompts), height, width)


def encode_negative(pipe, prompt: str = "", height: int | None = None, width: int | None = None) -> Conditioning:
    """The one-row conditioning of classifier-free guidance's negative prompt, as the pipeline's ``__call__`` makes
    it (SDXL: zeros for an empty one)."""
    return backbone_of(pipe).encode_negative(pipe, prompt, height, width)


def generators_for(seeds: list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded generator per sample."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def check_image_size(pipe, height: int | None, width: int | None) -> None:
    """``height``/``width`` must be multiples of the pipeline's VAE scale factor (8 for Stable Diffusion) times the
    denoiser's patch size (SD3: 2)."""
    from rewardtune.errors import UserError

    patch = getattr(backbone_of(pipe).denoiser(pipe).config, "patch_size", None) or 1
    factor = int(getattr(pipe, "vae_scale_factor", 8)) * int(patch)
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % factor:
            low = max(factor, value // factor * factor)
            raise UserError(f"{key} {value} is not a multiple of {factor} (this model's VAE scale factor x patch "
                            f"size); use e.g. {low} or {low + factor}")


def latent_shape(pipe, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """``(B, C, h, w)`` of the initial noise for images of ``height x width`` (the denoiser's native size by
    default)."""
    return backbone_of(pipe).latent_shape(pipe, batch, height, width)


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (DDPM's forward process, what a scheduler's ``add_noise`` does)
    for ``x0, noise [B,C,h,w]`` at timesteps ``t [B]`` of the cumulative-alpha table ``alphas_cumprod [T]``."""
    a = alphas_cumprod.to(x0.device)[t.to(x0.device)].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_noise(model, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                  negative: Conditioning | None, guidance: float) -> torch.Tensor:
    """The denoiser's output (noise, v or flow velocity) with classifier-free guidance in one batched pass.
    ``latents [B,C,h,w]``, ``t [B]``, ``cond`` of B rows, ``negative`` of B rows or None -> ``[B,C,h,w]``."""
    if negative is None or guidance == 1.0:
        return cond.call(model, latents, t)
    both = Conditioning.cat([negative, cond]).call(model, torch.cat([latents, latents]),
                                                   torch.cat([t, t]) if t.ndim else t)
    uncond, conditional = both.chunk(2)
    return uncond + guidance * (conditional - uncond)


def scale_model_input(scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input`` where the scheduler has one (DDIM: identity; flow schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompt_embeds: Conditioning,
    negative_embeds: Conditioning | None,
    generators: list[torch.Generator],
    steps: int = 20,
    guidance: float = 5.0,
    eta: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    progress=None,
    family: str = "auto",
    keep_latents: bool = True,
    sde_window: list[int] | None = None,
    initial_generators: list[torch.Generator] | None = None,
) -> Trajectory:
    """Sample B trajectories with the scheduler family's step (DDIM with ``eta``; the flow SDE with noise level
    ``eta``) and classifier-free guidance.

    Args:
        pipe: a pipeline whose scheduler is the family's (a ``DDIMScheduler`` for ``ddim``, a
            ``FlowMatchEulerDiscreteScheduler`` for ``flow``).
        prompt_embeds: B rows from :func:`encode_prompts`; ``negative_embeds`` likewise (or None: no CFG).
        family: the scheduler family; ``auto`` is the pipeline's own (:mod:`rewardtune.diffusion.backbones`).
        generators: one per sample (see :func:`generators_for`); they draw x_T and every step's noise.
        progress: optional callable invoked once per denoising step (e.g. a progress bar's ``update``).
        keep_latents: keep every step's latents (``[B,T+1,...]``); False keeps ``x_T`` and ``x_0`` (``[B,2,...]``).
        sde_window: ``[a, b]``: ``eta`` only on steps ``a <= i < b``, the deterministic step (eta 0, log-prob NaN)
            elsewhere; None: ``eta`` on every step.
        initial_generators: draw ``x_T`` from these instead (one per sample; ``generators`` still draw, and
            discard, their own ``x_T`` first, so each sample's step noise is the same either way).
    """
    backbone = backbone_of(pipe)
    step = family_step(family_of(pipe, family))
    batch = len(prompt_embeds)
    if len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch}")
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=prompt_embeds.device)
    model = backbone.denoiser(pipe)
    dtype = model.dtype
    shape = backbone.latent_shape(pipe, batch, height, width)
    latents = randn_tensor(shape, generator=generators, device=prompt_embeds.device, dtype=torch.float32)
    if initial_generators is not None:
        latents = randn_tensor(shape, generator=initial_generators, device=prompt_embeds.device, dtype=torch.float32)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # DDIM's (1); flow schedulers start at 1
    cond = prompt_embeds.to(dtype)
    negative = None if negative_embeds is None else negative_embeds.to(dtype)
    all_latents, log_probs = [latents], []
    stochastic = stochastic_steps(sde_window, len(scheduler.timesteps))
    for i, t in enumerate(scheduler.timesteps):
        t_batch = t.expand(batch)
        model_in = scale_model_input(scheduler, latents, t).to(dtype)
        noise_pred = predict_noise(model, model_in, t_batch, cond, negative, guidance)
        latents, log_prob = step(scheduler, noise_pred, t_batch, latents, eta=eta if i in stochastic else 0.0,
                                 generator=generators)
        latents = latents.float()
        if keep_latents or i == len(scheduler.timesteps) - 1:
            all_latents.append(latents)
        log_probs.append(log_prob)
        if progress is not None:
            progress()
    return Trajectory(latents=torch.stack(all_latents, 1), log_probs=torch.stack(log_probs, 1),
                      timesteps=scheduler.timesteps.clone())


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode ``[B,C,h,w]`` latents to images ``[B,3,H,W]`` in [0,1] (differentiable): ``latents / scaling
    + shift`` (SD3's VAE has a shift; SD's none)."""
    vae = pipe.vae
    shift = vae.config.get("shift_factor") or 0.0
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
