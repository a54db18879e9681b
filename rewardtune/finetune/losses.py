"""Losses of the reward-finetuning algorithms, as pure tensor functions.

PRDP (Deng et al., CVPR 2024): regress pairwise reward differences onto differences of trajectory log-ratios
against the reference model, with per-step proximal clipping against the sampling snapshot (Eqs. 14-21 and the
Appendix G reference loss). DDPO (Black et al. 2023): per-step PPO-clip on importance ratios. GRPO (Shao et al.
2024, DeepSeekMath; for diffusion Flow-GRPO, Liu et al. 2025, and DanceGRPO): DDPO's PPO-clip on group-relative
advantages plus a KL penalty to the reference model.
"""

from __future__ import annotations

import torch


def prdp_loss_grouped(log_probs: torch.Tensor, log_probs_old: torch.Tensor, log_probs_ref: torch.Tensor,
                      rewards: torch.Tensor, beta: float, clip_range: float) -> torch.Tensor:
    """PRDP loss of G prompt groups at once: the mean over groups of :func:`prdp_loss`.

    Args:
        log_probs, log_probs_old, log_probs_ref: ``[G,B,T]`` per-step log-probs of the sampled trajectories
            under the current model, the snapshot that sampled them, and the reference model.
        rewards: ``[G,B]``.

    Returns:
        A scalar. Each group's loss is its mean over unordered pairs with different rewards; a group without such
        a pair contributes zero (and no NaN).
    """
    log_ratios = log_probs - log_probs_ref  # r_hat_t, Eq. 19
    log_ratios_old = (log_probs_old - log_probs_ref).detach()
    clipped = torch.clamp(log_ratios, log_ratios_old - clip_range, log_ratios_old + clip_range)  # Eqs. 20-21
    r_hat, r_hat_clipped = log_ratios.mean(-1), clipped.mean(-1)  # [G,B]; the Appendix G code averages over T
    diff = r_hat[:, :, None] - r_hat[:, None, :]  # [G,B,B], Eq. 11
    diff_clipped = r_hat_clipped[:, :, None] - r_hat_clipped[:, None, :]
    target = (rewards[:, :, None] - rewards[:, None, :]) / beta  # Eq. 12 over beta
    pair = (target > 0).to(log_probs.dtype)  # each unordered pair once (r_a > r_b); ties dropped
    errors = torch.maximum((diff - target) ** 2, (diff_clipped - target) ** 2)  # Eq. 18
    per_group = (errors * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
    return per_group.mean()


def prdp_loss(log_probs: torch.Tensor, log_probs_old: torch.Tensor, log_probs_ref: torch.Tensor,
              rewards: torch.Tensor, beta: float, clip_range: float) -> torch.Tensor:
    """PRDP loss of one prompt group: ``[B,T]`` log-probs (current, snapshot, reference) and ``[B]`` rewards.

    ``mean over pairs (a,b) with r_a > r_b of max((dr_hat - dr/beta)^2, (dr_hat_clip - dr/beta)^2)`` where
    ``r_hat = mean_t(log p_theta - log p_ref)`` and the clipped version keeps every step within ``+-clip_range``
    of the snapshot's log-ratio.
    """
    return prdp_loss_grouped(log_probs[None], log_probs_old[None], log_probs_ref[None], rewards[None], beta,
                             clip_range)


def ddpo_loss(log_probs: torch.Tensor, log_probs_old: torch.Tensor, advantages: torch.Tensor,
              clip_range: float) -> torch.Tensor:
    """DDPO's per-step PPO-clip loss: ``mean_{i,t}(max(-A_it * rho_it, -A_it * clip(rho_it, 1-eps, 1+eps)))`` with
    ``rho_it = exp(log p_theta - log p_old)``; log-probs ``[N,T]`` (or ``[N]`` for one step), advantages ``[N]`` (one
    per sample, ``A_it = A_i`` for every step) or ``[N,T]`` (per step, dense advantages)."""
    ratio = torch.exp(log_probs - log_probs_old.detach())
    adv = advantages.reshape(advantages.shape + (1,) * (ratio.ndim - advantages.ndim))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def kl_k3(log_probs: torch.Tensor, log_probs_ref: torch.Tensor) -> torch.Tensor:
    """Per-step k3 estimator of ``KL(pi_theta || pi_ref)``: ``exp(d) - d - 1`` with ``d = log p_ref - log p_theta``
    (elementwise, same shape as the inputs; ``log_probs_ref`` is detached). It is >= 0, zero with zero gradient where
    the two log-probs are equal, and unbiased for the KL when the transitions are drawn from ``pi_theta`` and the
    log-probs are full log-densities."""
    d = log_probs_ref.detach() - log_probs
    return torch.exp(d) - d - 1.0


def grpo_loss(log_probs: torch.Tensor, log_probs_old: torch.Tensor, log_probs_ref: torch.Tensor,
              advantages: torch.Tensor, clip_range: float, kl_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-step loss: DDPO's PPO-clip on group-relative advantages plus a KL penalty to the reference.

    ``loss = mean_{i,t}(max(-A_it * rho_it, -A_it * clip(rho_it, 1-eps, 1+eps))) + kl_beta * mean_{i,t}(k3_it)``

    with ``rho_it = exp(l_it - l_old_it)`` and ``k3_it = exp(l_ref_it - l_it) - (l_ref_it - l_it) - 1`` (the GRPO
    paper's estimator of ``KL(pi_theta || pi_ref)``, see :func:`kl_k3`), evaluated on the sampled transitions.

    Args:
        log_probs: ``[N,T]`` (or ``[N]``) per-step log-probs of the recorded transitions under the current model.
        log_probs_old: ``[N,T]`` the same under the snapshot that sampled them (detached).
        log_probs_ref: ``[N,T]`` the same under the reference model (detached).
        advantages: ``[N]`` one per sample, broadcast over its steps (``A_it = A_i``), or ``[N,T]`` one per step.
        clip_range: the PPO band ``eps`` on the ratio; kl_beta: the KL weight (0: no KL term at all).

    Returns:
        ``(loss, kl)``: the scalar loss and the detached mean k3 (a metric; reported even when ``kl_beta`` is 0).
    """
    policy = ddpo_loss(log_probs, log_probs_old, advantages, clip_range)
    kl = kl_k3(log_probs, log_probs_ref).mean()
    loss = policy + kl_beta * kl if kl_beta else policy  # kl_beta 0: a non-finite k3 must not reach the loss
    return loss, kl.detach()
