"""Re-scoring stored transitions: the log-probability of recorded denoising steps ``x_t -> x_{t-1}`` under a
(possibly updated, or reference) model, through the same scheduler-family step that sampled them.

``transitions`` is any object with ``latents [S,T+1,C,h,w]``, ``timesteps [T]``, ``prompt_embeds`` (a
:class:`~rewardtune.diffusion.backbones.Conditioning` of G rows), ``group [S]`` (each sample's row of
``prompt_embeds``), ``negative_embeds`` (one row) or None, and optionally
``family`` (the scheduler family that sampled them, default ``ddim``), e.g. the finetuning
:class:`~rewardtune.finetune.rollout.Rollouts`.
"""

from __future__ import annotations

import torch

from rewardtune.diffusion.sampling import predict_noise, scale_model_input
from rewardtune.diffusion.settings import family_step


def model_dtype(model) -> torch.dtype:
    """Input dtype of ``model`` (a diffusers model, or a wrapper such as DDP whose ``.module`` is one)."""
    inner = getattr(model, "module", model)
    return getattr(inner, "dtype", None) or next(inner.parameters()).dtype


def sync_timesteps(scheduler, timesteps: torch.Tensor) -> None:
    """Put ``scheduler`` on the recorded ``timesteps [T]`` (set_timesteps(T)); raise if they cannot match."""
    steps = len(timesteps)
    current = getattr(scheduler, "timesteps", None)
    if scheduler.num_inference_steps != steps or current is None or not torch.equal(current.cpu(), timesteps.cpu()):
        scheduler.set_timesteps(steps, device=timesteps.device)
    if not torch.equal(scheduler.timesteps.cpu(), timesteps.cpu()):
        raise ValueError(f"the scheduler's {steps} timesteps {scheduler.timesteps.tolist()} differ from the "
                         f"recorded ones {timesteps.tolist()}; use the scheduler that sampled the rollouts")


def pair_log_probs(model, scheduler, transitions, samples: torch.Tensor, steps: torch.Tensor,
                   guidance: float, eta: float) -> torch.Tensor:
    """``log p_theta(x_{t-1} | x_t, c)`` of P recorded transitions in one (CFG-batched) denoiser call.

    Args:
        samples, steps: ``[P]`` sample indices and step indices (step j scores ``latents[:, j] -> latents[:, j+1]``
            at ``timesteps[j]``); pairs may mix samples and steps freely.

    Returns:
        ``[P]`` log-probs, averaged over latent dimensions (Eqs. 2-4 with the DDPO/PRDP normalisation).
    """
    device = transitions.latents.device
    samples, steps = samples.to(device), steps.to(device)
    x_t = transitions.latents[samples, steps]
    x_prev = transitions.latents[samples, steps + 1]
    t = transitions.timesteps.to(device)[steps]
    dtype = model_dtype(model)
    embeds = transitions.prompt_embeds[transitions.group[samples]].to(dtype)
    negative = transitions.negative_embeds
    if negative is not None:
        negative = negative.to(dtype).expand(len(samples))
    model_in = scale_model_input(scheduler, x_t, t).to(dtype)
    noise = predict_noise(model, model_in, t, embeds, negative, guidance)
    step = family_step(getattr(transitions, "family", "ddim"))
    _, log_prob = step(scheduler, noise, t, x_t, eta=eta, prev_sample=x_prev)
    return log_prob


def trajectory_log_probs(model, scheduler, transitions, index: torch.Tensor, step_indices: torch.Tensor,
                         guidance: float, eta: float, chunk: int | None = None) -> torch.Tensor:
    """Recompute per-step log-probs ``[n,k]`` of samples ``index [n]`` at steps ``step_indices`` (``[n,k]``, one
    row of steps per sample, or ``[k]`` shared by all), in UNet calls of at most ``chunk`` (sample, step) pairs.

    Differentiable when called with grad enabled (all chunks stay in the graph; :mod:`rewardtune.finetune.update`
    has the memory-bounded gradient).
    """
    sync_timesteps(scheduler, transitions.timesteps)
    index = torch.as_tensor(index).long().cpu()
    step_indices = torch.as_tensor(step_indices).long().cpu()
    if step_indices.ndim == 1:
        step_indices = step_indices.expand(len(index), -1)
    n, k = step_indices.shape
    samples, steps = index[:, None].expand(n, k).reshape(-1), step_indices.reshape(-1)
    chunk = chunk or len(samples)
    parts = [pair_log_probs(model, scheduler, transitions, samples[i:i + chunk], steps[i:i + chunk], guidance, eta)
             for i in range(0, len(samples), chunk)]
    return torch.cat(parts).reshape(n, k)
