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
from rewardtune.diffusion.settings import family_step, family_x0, stochastic_steps


@dataclass
class Trajectory:
    """A batch of B denoising trajectories over T steps.

    latents: ``[B,T+1,C,h,w]``, ``x_T`` first and ``x_0`` last (``[B,2,C,h,w]`` when sampled without
    ``keep_latents``).
    log_probs: ``[B,T]``, ``log p(x_{t-1} | x_t, c)`` under the sampling model (NaN when ``eta == 0``).
    timesteps: ``[T]``, the scheduler timesteps in sampling order.
    x0_predictions: ``[B,T,C,h,w]`` or None: at each step the guided model's predicted clean latent (the scheduler
    family's ``x0``: DDIM ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, flow ``x_t - sigma_t v``), kept when
    sampled with ``keep_x0=True``.
    start_step: the scheduler step index of ``latents[:, 0]``: 0 for a full trajectory; ``i`` for a continuation
    from step ``i`` (then T above is ``steps - i`` and ``timesteps`` are the scheduler's ``timesteps[i:]``).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    x0_predictions: torch.Tensor | None = None
    start_step: int = 0

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


def skip_draws(generators: list[torch.Generator], shape: tuple[int, ...], draws: int) -> list[torch.Generator]:
    """Advance each generator by ``draws`` draws of one sample's noise (``shape`` is the batch's ``(B, C, h, w)``)
    and return them: generators of a full run's seeds advanced by ``1 + i`` draws (``x_T`` and steps ``0..i-1``) make
    a continuation from its stored ``x`` at step ``i`` (:func:`sample_trajectories` with ``start_step=i``) reproduce
    that run's steps ``i..T-1`` exactly."""
    one = (1, *shape[1:])
    for generator in generators:
        for _ in range(draws):
            torch.randn(one, generator=generator, device=generator.device)
    return generators


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


def _initial_latents(scheduler, shape, device, generators, initial_generators, start_latents) -> torch.Tensor:
    """``x_T`` drawn by ``generators`` (then replaced by one drawn by ``initial_generators`` if given), times the
    scheduler's ``init_noise_sigma``; or ``start_latents`` as given (no draw)."""
    if start_latents is not None:
        if initial_generators is not None:
            raise ValueError("initial_generators draw x_T; a continuation from start_latents draws none")
        if tuple(start_latents.shape) != tuple(shape):
            raise ValueError(f"start_latents must have the latent shape {tuple(shape)}, got "
                             f"{tuple(start_latents.shape)}")
        return start_latents.to(device=device, dtype=torch.float32)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
    if initial_generators is not None:
        latents = randn_tensor(shape, generator=initial_generators, device=device, dtype=torch.float32)
    return latents * getattr(scheduler, "init_noise_sigma", 1.0)  # DDIM's (1); flow schedulers start at 1


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
    keep_x0: bool = False,
    start_step: int = 0,
    start_latents: torch.Tensor | None = None,
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
        keep_x0: also keep each step's predicted clean latent (``Trajectory.x0_predictions [B,T,C,h,w]``, the
            family's ``x0`` of the guided model output).
        start_step, start_latents: continue from latents ``[B,C,h,w]`` at scheduler step index ``start_step``
            (branching, e.g. Monte Carlo step values): only steps ``start_step..steps-1`` run and the returned
            trajectory starts at ``start_latents`` (``Trajectory.start_step``); ``sde_window`` keeps its absolute
            step indices. Without ``start_latents``, ``start_step`` must be 0.

    Random draws (what makes runs and continuations reproducible): each sample's generator draws, in this order,
    one ``[1,C,h,w]`` standard normal for ``x_T`` (not with ``start_latents``), then one ``[1,C,h,w]`` standard normal
    per step run, deterministic steps included (their noise is multiplied by 0). So a continuation from step ``i``
    draws exactly ``steps - i`` times; it reproduces a full run's steps ``i..T-1`` when given that run's generators
    advanced by ``1 + i`` draws (:func:`skip_draws`).
    """
    backbone = backbone_of(pipe)
    family = family_of(pipe, family)
    step, predict_x0 = family_step(family), (family_x0(family) if keep_x0 else None)
    batch = len(prompt_embeds)
    if len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch}")
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=prompt_embeds.device)
    if not 0 <= start_step < len(scheduler.timesteps) or (start_step and start_latents is None):
        raise ValueError(f"start_step must be in [0, {len(scheduler.timesteps)}) and needs start_latents when > 0, "
                         f"got {start_step}")
    model = backbone.denoiser(pipe)
    dtype = model.dtype
    shape = backbone.latent_shape(pipe, batch, height, width)
    latents = _initial_latents(scheduler, shape, prompt_embeds.device, generators, initial_generators,
                               start_latents)
    cond = prompt_embeds.to(dtype)
    negative = None if negative_embeds is None else negative_embeds.to(dtype)
    all_latents, log_probs, x0s = [latents], [], []
    stochastic = stochastic_steps(sde_window, len(scheduler.timesteps))
    timesteps = scheduler.timesteps[start_step:]
    for i, t in enumerate(timesteps, start=start_step):
        t_batch = t.expand(batch)
        model_in = scale_model_input(scheduler, latents, t).to(dtype)
        noise_pred = predict_noise(model, model_in, t_batch, cond, negative, guidance)
        if predict_x0 is not None:
            x0s.append(predict_x0(scheduler, noise_pred, t_batch, latents).float())
        latents, log_prob = step(scheduler, noise_pred, t_batch, latents, eta=eta if i in stochastic else 0.0,
                                 generator=generators)
        latents = latents.float()
        if keep_latents or i == len(scheduler.timesteps) - 1:
            all_latents.append(latents)
        log_probs.append(log_prob)
        if progress is not None:
            progress()
    return Trajectory(latents=torch.stack(all_latents, 1), log_probs=torch.stack(log_probs, 1),
                      timesteps=timesteps.clone(), x0_predictions=torch.stack(x0s, 1) if x0s else None,
                      start_step=start_step)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode ``[B,C,h,w]`` latents to images ``[B,3,H,W]`` in [0,1] (differentiable): ``latents / scaling
    + shift`` (SD3's VAE has a shift; SD's none)."""
    vae = pipe.vae
    shift = vae.config.get("shift_factor") or 0.0
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
