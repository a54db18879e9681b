"""The flow-matching SDE step with a log-probability (Flow-GRPO, Liu et al. 2025), for rectified-flow models sampled
with diffusers' ``FlowMatchEulerDiscreteScheduler`` (Stable Diffusion 3, FLUX).

The Euler step of the flow ODE ``dx = v dsigma`` is replaced by a step of the SDE with the same marginals, whose
noise is scaled by ``noise_level`` (Flow-GRPO's ``a``); with these changes to a plain scheduler step, as in
:func:`rewardtune.diffusion.logprob.ddim_step_with_logprob`:

* timesteps may differ per sample (``timestep`` of shape ``[B]``), mapped to step indices without a Python loop;
* ``prev_sample`` may be given, in which case it is scored instead of sampled;
* the Gaussian log-density of ``prev_sample`` under ``N(mean, std^2 I)`` is returned, **averaged over all
  non-batch dimensions** (Flow-GRPO's normalisation, the same as DDPO's).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor


def _step_indices(scheduler, timestep: float | torch.Tensor, batch: int) -> torch.Tensor:
    """The step index ``[B]`` of each sample's timestep in ``scheduler.timesteps`` (where several entries are equal,
    the second, as diffusers' ``index_for_timestep``); a one-line ValueError for a timestep not in the schedule."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if scheduler.config.get("invert_sigmas", False):
        raise ValueError("schedulers with invert_sigmas=True (sigma increasing along the chain) are not supported")
    schedule = scheduler.timesteps
    t = torch.as_tensor(timestep).to(device=schedule.device, dtype=schedule.dtype)
    t = t.expand(batch) if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
    matches = t[:, None] == schedule[None, :]
    found = matches.any(dim=1)
    if not bool(found.all()):
        bad = float(t[~found][0])
        raise ValueError(f"timestep {bad:g} is not one of the scheduler's {len(schedule)} timesteps; pass values "
                         "of scheduler.timesteps from the same set_timesteps call")
    wanted = torch.where(matches.sum(dim=1) > 1, 2, 1)
    return ((matches.cumsum(dim=1) == wanted[:, None]) & matches).int().argmax(dim=1)


def flow_sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow-matching SDE step ``x_t -> x_{t-1}`` and ``log p(x_{t-1} | x_t)``.

    With ``sigma`` the scheduler's sigma at the sample's step, ``sigma_prev`` the next one, ``dt = sigma_prev - sigma``
    (< 0) and ``sigma_max = scheduler.sigmas[1]``::

        std_dev_t = noise_level * sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
        mean = x_t * (1 + std_dev_t**2 / (2 sigma) * dt) + v * (1 + std_dev_t**2 (1 - sigma) / (2 sigma)) * dt
        x_{t-1} = mean + std_dev_t * sqrt(-dt) * noise

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` on which ``set_timesteps`` has been called.
        model_output: the predicted velocity ``v``, ``[B,C,h,w]`` (any shape with the batch first).
        timestep: current timestep, a scalar or ``[B]``; values of ``scheduler.timesteps``.
        sample: ``x_t``, ``[B,C,h,w]``.
        noise_level: the SDE's noise scale (>= 0): 0 is the deterministic Euler step of the ODE, Flow-GRPO uses 0.7.
        prev_sample: ``x_{t-1}`` to score; sampled from the step's Gaussian when None.
        generator: a generator or one per sample (a list), for reproducible noise.

    Returns:
        ``(prev_sample [B,C,h,w], log_prob [B])``. Both are computed in at least float32 (float64 stays float64) and
        ``prev_sample`` is returned in ``sample``'s dtype; a sampled ``prev_sample`` is scored after that cast, so
        re-scoring the returned tensor reproduces ``log_prob`` exactly. The first step (``sigma == 1``) uses
        ``sigma_max`` as above and the last (``sigma_prev == 0``) has ``std = std_dev_t * sqrt(sigma)``: both finite.
        ``log_prob`` is NaN for a deterministic step (``noise_level == 0``), where the density is undefined, and 0
        (a point mass, no gradient) for a step whose variance is zero at ``noise_level > 0`` (only a degenerate
        schedule with ``sigma_prev == sigma``). Negative ``noise_level`` raises ValueError.
    """
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0 (0 is the deterministic ODE step), got {noise_level}")
    batch = sample.shape[0]
    index = _step_indices(scheduler, timestep, batch).to(sample.device)

    dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
    x_t, velocity = sample.to(dtype), model_output.to(dtype)
    sigmas = scheduler.sigmas.to(device=x_t.device, dtype=dtype)
    shape = (batch,) + (1,) * (x_t.ndim - 1)
    sigma, sigma_prev = sigmas[index].reshape(shape), sigmas[index + 1].reshape(shape)
    dt = sigma_prev - sigma

    std_dev_t = (sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))).sqrt() * noise_level
    # the per-sample coefficients [B,1,1,1] first, so that each full-size tensor is touched as few times as possible
    coef_x = 1 + std_dev_t**2 / (2 * sigma) * dt
    coef_v = (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    mean = x_t * coef_x + velocity * coef_v
    std = std_dev_t * (-dt).clamp_min(0).sqrt()

    if prev_sample is None:
        noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=dtype)
        prev_sample = (mean + std * noise).to(sample.dtype)
    dims = tuple(range(1, x_t.ndim))
    square = (prev_sample.detach().to(dtype) - mean).square().mean(dim=dims)
    std = std.reshape(batch)
    stochastic = std > 0  # a zero-variance step is a point mass
    safe = torch.where(stochastic, std, torch.ones_like(std))  # no 0/0 in the value or the gradient
    log_prob = -square / (2 * safe**2) - torch.log(safe) - math.log(math.sqrt(2 * math.pi))
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    if noise_level == 0:
        log_prob = torch.full_like(log_prob, float("nan"))
    return prev_sample.to(sample.dtype), log_prob


def flow_family_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flow_sde_step_with_logprob` with the signature of a scheduler family's step
    (:mod:`rewardtune.diffusion.settings`): the sampler's ``eta`` is the SDE's ``noise_level``."""
    return flow_sde_step_with_logprob(scheduler, model_output, timestep, sample, noise_level=eta,
                                      prev_sample=prev_sample, generator=generator)


def flow_predicted_x0(scheduler, model_output: torch.Tensor, timestep: float | torch.Tensor,
                      sample: torch.Tensor) -> torch.Tensor:
    """The flow family's prediction of the clean latent at ``x_t``: ``x0 = x_t - sigma_t v`` (rectified flow's
    ``x_t = (1 - sigma) x0 + sigma noise`` with velocity ``v = noise - x0``). ``model_output`` (the velocity) and
    ``sample [B,C,h,w]``, ``timestep`` a scalar or ``[B]`` of ``scheduler.timesteps`` -> ``[B,C,h,w]`` in at least
    float32."""
    index = _step_indices(scheduler, timestep, sample.shape[0]).to(sample.device)
    dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
    sigma = scheduler.sigmas.to(device=sample.device, dtype=dtype)[index]
    return sample.to(dtype) - sigma.reshape((-1,) + (1,) * (sample.ndim - 1)) * model_output.to(dtype)


__all__ = ["flow_sde_step_with_logprob", "flow_family_step", "flow_predicted_x0"]
