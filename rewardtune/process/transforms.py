"""Pure transforms of step rewards ``r [B,T]`` of denoising trajectories.

Step ``t`` (0-based, in sampling order) is the ``t``-th denoising step ``x_{T-t} -> x_{T-t-1}``; ``r[:, t]`` is its
reward (an ``x0``, ``progress`` or ``implicit`` step reward of :mod:`rewardtune.process`). Every function maps
``[B,T]`` to ``[B,T]`` (any leading shape works; the step axis is the last) and is differentiable.

* :func:`clip_step_rewards` and :func:`delta_step_rewards` are the two refinements of "On Designing Effective RL
  Reward at Training Time" (Gao et al. 2024) against reward hacking: a learned step reward can be inflated by
  repeating steps that score well; Clip bounds each step reward above by 0 (``min(r_t - eta, 0)``), so extra steps
  can only cost; Delta rewards the difference of consecutive step scores, so the return-to-go telescopes to a single
  score and cannot be inflated by repetition.
* :func:`td_lookahead` is ReARTeR's temporal-difference look-ahead: process scores are biased at early steps (little
  of the outcome is visible yet), so each step's score is blended with the (recursively corrected) score of the
  steps after it, a lambda-return.
* :data:`TRANSFORMS` names the transforms a config can choose (``none | clip | delta``); :func:`apply_transform`
  applies one by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def clip_step_rewards(r: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    """Clip: ``min(r_t - eta, 0)`` elementwise, ``[..., T] -> [..., T]``. Every step reward is <= 0, so the return
    cannot grow by adding or repeating steps; ``eta`` is the threshold above which a step is "good enough"."""
    return (r - eta).clamp(max=0.0)


def delta_step_rewards(r: torch.Tensor) -> torch.Tensor:
    """Delta: ``d_t = r_t - r_{t+1}`` for ``t < T-1`` and ``d_{T-1} = r_{T-1}``, ``[..., T] -> [..., T]``.

    The return-to-go telescopes: ``sum_{k>=t} d_k = r_t``, so a trajectory's return is one step score, whatever
    the number of good-scoring steps after it."""
    out = r.clone()
    out[..., :-1] = r[..., :-1] - r[..., 1:]
    return out


def _upper_powers(steps: int, base: float, like: torch.Tensor) -> torch.Tensor:
    """``[T,T]`` matrix with ``base ** (k - t)`` at ``[t, k]`` for ``k >= t`` and 0 below the diagonal."""
    index = torch.arange(steps, device=like.device)
    gap = (index[None, :] - index[:, None]).to(like.dtype)
    powers = torch.full_like(gap, float(base)).pow(gap.clamp_min(0))
    return torch.where(gap >= 0, powers, torch.zeros_like(powers))


def returns_to_go(r: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{k=t}^{T-1} gamma^(k-t) r_k``, ``[..., T] -> [..., T]`` (one matrix product, no loop)."""
    return r @ _upper_powers(r.shape[-1], gamma, r).T


def td_lookahead(r: torch.Tensor, lam: float) -> torch.Tensor:
    """ReARTeR-style TD look-ahead: the lambda-return ``c_{T-1} = r_{T-1}``, ``c_t = (1 - lam) r_t + lam c_{t+1}``,
    ``[..., T] -> [..., T]``.

    ``lam = 0`` keeps ``r``; ``lam = 1`` gives every step the last step's score. Closed form (one matrix product):
    ``c_t = sum_{k=t}^{T-2} (1 - lam) lam^(k-t) r_k + lam^(T-1-t) r_{T-1}``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    steps = r.shape[-1]
    weights = _upper_powers(steps, lam, r) * (1.0 - lam)
    weights[:, -1] = _upper_powers(steps, lam, r)[:, -1]
    return r @ weights.T


def no_transform(r: torch.Tensor) -> torch.Tensor:
    """The step rewards unchanged."""
    return r


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "none": no_transform,
    "clip": clip_step_rewards,
    "delta": delta_step_rewards,
}


def apply_transform(name: str, r: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    """``TRANSFORMS[name](r)`` (``clip`` with threshold ``eta``); an unknown name is a one-line ConfigError."""
    from rewardtune.errors import ConfigError

    if name not in TRANSFORMS:
        raise ConfigError(f"unknown step-reward transform {name!r}; choose one of: {', '.join(TRANSFORMS)}")
    return clip_step_rewards(r, eta) if name == "clip" else TRANSFORMS[name](r)


__all__ = ["TRANSFORMS", "apply_transform", "clip_step_rewards", "delta_step_rewards", "no_transform",
           "returns_to_go", "td_lookahead"]
