"""The one DDIM step with a log-probability, used by every part of rewardtune.

Adapted from ``diffusers.schedulers.scheduling_ddim.DDIMScheduler.step`` (Song et al. 2021, Eq. 12) with these
changes, as in DDPO (Black et al. 2023) and PRDP (Deng et al. 2024):

* timesteps may differ per sample (``timestep`` of shape ``[B]``);
* ``prev_sample`` may be given, in which case it is scored instead of sampled;
* the Gaussian log-density of ``prev_sample`` under ``N(mu_t, sigma_t^2 I)`` is returned, **averaged over all
  non-batch dimensions** (the DDPO / PRDP normalisation that their clip ranges and KL weights assume).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor


def _gather(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[index]`` reshaped to broadcast over a sample of ``ndim`` dimensions: ``[B,1,1,1]``."""
    out = values.to(index.device)[index.clamp_min(0)]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def _x0_and_eps(scheduler, eps_or_x0: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor,
                beta_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted clean sample ``x0`` (clipped where the scheduler clips) and noise ``eps`` from the model output
    (epsilon, sample or v, per ``scheduler.config.prediction_type``); ``alpha_t, beta_t = abar_t, 1 - abar_t``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x_t - beta_t.sqrt() * eps_or_x0) / alpha_t.sqrt()
        eps = eps_or_x0
    elif kind == "sample":
        x0 = eps_or_x0
        eps = (x_t - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif kind == "v_prediction":
        x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * eps_or_x0
        eps = alpha_t.sqrt() * eps_or_x0 + beta_t.sqrt() * x_t
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon, sample or v_prediction")
    if scheduler.config.clip_sample:  # eps is kept, as DDIMScheduler.step (use_clipped_model_output=False)
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0, eps


def _timesteps(timestep: int | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """``timestep`` (an int or ``[B]``) as a long tensor ``[B]`` on ``sample``'s device."""
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device).long()
    t = t.expand(batch) if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
    return t


def ddim_predicted_x0(scheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                      sample: torch.Tensor) -> torch.Tensor:
    """The DDIM family's prediction of the clean latent at ``x_t``: for epsilon prediction
    ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Song et al. 2021, Eq. 12's "predicted x_0"; sample and
    v prediction likewise), clipped where the scheduler clips, exactly the ``x0`` that
    :func:`ddim_step_with_logprob` steps towards. ``model_output, sample [B,C,h,w]``, ``timestep`` an int or ``[B]``
    -> ``[B,C,h,w]`` in at least float32."""
    t = _timesteps(timestep, sample)
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x_t = sample.to(dtype)
    alpha_t = _gather(scheduler.alphas_cumprod.to(dtype), t, x_t.ndim)
    return _x0_and_eps(scheduler, model_output.to(dtype), x_t, alpha_t, 1 - alpha_t)[0]


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t -> x_{t-1}`` and ``log p(x_{t-1} | x_t)``.

    Args:
        scheduler: a ``DDIMScheduler`` on which ``set_timesteps`` has been called.
        model_output: UNet output ``[B,C,h,w]`` (epsilon, sample or v, per ``scheduler.config.prediction_type``).
        timestep: current timestep, an int or ``[B]``.
        sample: ``x_t``, ``[B,C,h,w]``.
        eta: DDIM noise scale: 0 deterministic, 1 the DDPM posterior variance (PRDP/DDPO's sampler).
        prev_sample: ``x_{t-1}`` to score; sampled from the step's Gaussian when None.
        generator: a generator or one per sample (a list), for reproducible noise.

    Returns:
        ``(prev_sample [B,C,h,w], log_prob [B])``. ``log_prob`` is computed in at least float32; it is NaN for a
        deterministic sampler (``eta == 0``), where the density is undefined, and 0 (a point mass, no gradient)
        for a step whose variance is zero at ``eta > 0`` (the last step of a scheduler with ``set_alpha_to_one``,
        where the DDPO reference instead reuses ``alphas_cumprod[0]``).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    batch = sample.shape[0]
    t = _timesteps(timestep, sample)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    dtype = torch.promote_types(sample.dtype, torch.float32)  # at least float32, float64 stays float64
    x_t, eps_or_x0 = sample.to(dtype), model_output.to(dtype)
    alphas = scheduler.alphas_cumprod.to(dtype)
    alpha_t = _gather(alphas, t, x_t.ndim)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=x_t.device, dtype=dtype)
    has_prev = (prev_t >= 0).reshape((batch,) + (1,) * (x_t.ndim - 1))
    alpha_prev = torch.where(has_prev, _gather(alphas, prev_t, x_t.ndim), final)
    beta_t = 1 - alpha_t

    x0, eps = _x0_and_eps(scheduler, eps_or_x0, x_t, alpha_t, beta_t)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp_min(0).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp_min(0).sqrt() * eps

    if prev_sample is None:
        noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = mean + std * noise
    target = prev_sample.detach().to(dtype)
    stochastic = std > 0  # a zero-variance step (eta 0, or set_alpha_to_one's last step) is a point mass
    safe = torch.where(stochastic, std, torch.ones_like(std))  # no 0/0 in the value or the gradient
    log_prob = -((target - mean) ** 2) / (2 * safe**2) - torch.log(safe) - math.log(math.sqrt(2 * math.pi))
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if eta == 0:
        log_prob = torch.full_like(log_prob, float("nan"))
    return prev_sample.to(sample.dtype), log_prob
