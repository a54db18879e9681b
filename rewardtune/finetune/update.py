"""The inner loop of one online epoch (PRDP Algorithm 1, lines "for k = 1..K"): recompute per-step log-probs of
the recorded transitions under the current model and take gradient steps on the algorithm's loss.

Batching of the recomputation: a minibatch of n samples x k steps is flattened into n*k (sample, step) pairs and
scored in UNet calls of at most ``forward_chunk`` pairs, each pair with its own timestep (the UNet and
:func:`ddim_step_with_logprob` take per-sample timesteps). One call thus covers many samples *and* steps, which
also serves DDPO's independent per-sample timestep shuffles.

Exact chunked gradient: PRDP's loss is not a sum over steps (it squares means over T of log-ratios), so a
minibatch larger than one UNet call cannot simply accumulate per-chunk losses. Instead, when n*k exceeds
``forward_chunk``: (1) compute all log-probs ``l`` without a graph, (2) evaluate the loss on a detached copy and
take ``g = dL/dl`` (cheap, no UNet), (3) recompute each chunk with a graph and backpropagate ``sum(l_chunk *
g_chunk)``. By the chain rule this is exactly ``dL/dtheta``, with the memory of one chunk and about 4/3 the compute.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from rewardtune.diffusion.rescore import pair_log_probs, sync_timesteps, trajectory_log_probs
from rewardtune.diffusion.settings import stochastic_steps
from rewardtune.errors import UserError

if TYPE_CHECKING:
    from rewardtune.finetune.algorithms import Algorithm
    from rewardtune.finetune.config import FinetuneConfig, OptimConfig
    from rewardtune.finetune.rollout import Rollouts

logger = logging.getLogger(__name__)


@dataclass
class Minibatch:
    """One gradient step's data: ``index [n]`` sample indices and ``steps [n,k]`` the steps trained per sample.

    For algorithms whose loss couples a prompt group, ``index`` holds whole groups, each group's B samples
    contiguous and in group order, so ``[n] -> [G,B]`` is a plain reshape.
    """

    index: torch.Tensor
    steps: torch.Tensor


def plan_minibatches(num_groups: int, group_size: int, num_steps: int, cfg: FinetuneConfig, whole_groups: bool,
                     generator: torch.Generator) -> list[list[Minibatch]]:
    """K passes (``cfg.inner_steps``) over the ``num_groups * group_size`` samples of an epoch.

    Each pass shuffles the order (of groups when ``whole_groups``, of single samples otherwise), gives every sample
    its own random permutation of the W trainable steps (all T, or the sampler's ``sde_window``) truncated to
    ``max(1, int(W * timestep_fraction))`` (as ddpo-pytorch), and cuts the order into minibatches of
    ``groups_per_update * group_size`` samples.
    """
    total = num_groups * group_size
    per_update = (cfg.groups_per_update or num_groups) * group_size
    window = stochastic_steps(cfg.sampling.sde_window, num_steps)
    if window.stop > num_steps:
        raise ValueError(f"sde_window {cfg.sampling.sde_window} does not fit the rollouts' {num_steps} steps")
    k = max(1, int(len(window) * cfg.timestep_fraction))
    passes = []
    for _ in range(cfg.inner_steps):
        if whole_groups:
            groups = torch.randperm(num_groups, generator=generator)
            order = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
        else:
            order = torch.randperm(total, generator=generator)
        steps = window.start + torch.argsort(torch.rand(total, len(window), generator=generator), dim=1)[:, :k]
        passes.append([Minibatch(order[i:i + per_update], steps[order[i:i + per_update]])
                       for i in range(0, total, per_update)])
    return passes


def make_optimizer(parameters, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable ``parameters`` (PRDP Table 4: lr 1e-5, weight decay 1e-4)."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: unfreeze the UNet (or add a LoRA adapter) before finetuning")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def apply_optim_config(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set the config's hyperparameters on every parameter group: a restored optimizer state carries the old ones,
    and a resume that was allowed to change ``train.optim`` must train with the new ones."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@dataclass
class StepContext:
    """What every gradient step of an epoch shares: the trained ``unet`` (maybe wrapped), its ``optimizer``, the
    ``scheduler`` that sampled the rollouts, the config, the algorithm, and the ``backward`` / ``clip_grad_norm``
    hooks (accelerate's in a run)."""

    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: FinetuneConfig
    algorithm: Algorithm
    backward: Callable
    clip_grad_norm: Callable


def loss_and_backward(ctx: StepContext, rollouts: Rollouts, batch: Minibatch, loss_fn: Callable
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of ``batch`` and, if it is finite, its gradient in the parameters' ``.grad``.

    Returns ``(loss, clipfrac, log_probs [n,k] detached)``.
    """
    unet, scheduler, backward = ctx.unet, ctx.scheduler, ctx.backward
    guidance, eta, chunk = ctx.cfg.sampling.guidance, ctx.cfg.sampling.eta, ctx.cfg.forward_chunk
    if batch.steps.numel() <= chunk:  # one UNet call: plain backward
        log_probs = trajectory_log_probs(unet, scheduler, rollouts, batch.index, batch.steps, guidance, eta)
        loss, clipfrac = loss_fn(log_probs)
        if torch.isfinite(loss):
            backward(loss)
        return loss.detach(), clipfrac.detach(), log_probs.detach()
    with torch.no_grad():  # pass 1: values only
        values = trajectory_log_probs(unet, scheduler, rollouts, batch.index, batch.steps, guidance, eta, chunk)
    leaf = values.clone().requires_grad_(True)
    loss, clipfrac = loss_fn(leaf)
    if not torch.isfinite(loss):
        return loss.detach(), clipfrac.detach(), values
    (weights,) = torch.autograd.grad(loss, leaf)  # dL/dl, [n,k]
    n, k = batch.steps.shape
    samples = batch.index[:, None].expand(n, k).reshape(-1)
    steps, weights = batch.steps.reshape(-1), weights.reshape(-1)
    for i in range(0, len(samples), chunk):  # pass 2: chunk by chunk with a graph
        part = pair_log_probs(unet, scheduler, rollouts, samples[i:i + chunk], steps[i:i + chunk], guidance, eta)
        backward((part * weights[i:i + chunk].to(part.dtype)).sum())
    return loss.detach(), clipfrac.detach(), values


def gradient_step(ctx: StepContext, rollouts: Rollouts, batch: Minibatch, targets: torch.Tensor) -> dict[str, float]:
    """One optimiser step on ``batch``; a non-finite loss or gradient norm is skipped (no update, grads cleared).

    Returns ``{loss, clipfrac, approx_kl, grad_norm, skipped}``; ``approx_kl = 0.5 * mean((l - l_old)^2)``.
    """
    optimizer, algorithm = ctx.optimizer, ctx.algorithm
    sync_timesteps(ctx.scheduler, rollouts.timesteps)
    device = rollouts.log_probs_old.device
    rows, cols = batch.index[:, None].to(device), batch.steps.to(device)
    old, ref = rollouts.log_probs_old[rows, cols], rollouts.log_probs_ref[rows, cols]
    batch_targets = targets.to(device)[rows, cols] if targets.ndim == 2 else targets.to(device)[batch.index.to(device)]
    optimizer.zero_grad(set_to_none=True)
    loss, clipfrac, log_probs = loss_and_backward(
        ctx, rollouts, batch, lambda lp: algorithm.loss(lp, old, ref, batch_targets))
    approx_kl = 0.5 * ((log_probs - old) ** 2).mean()
    record = {"loss": loss.item(), "clipfrac": clipfrac.item(), "approx_kl": approx_kl.item(),
              "grad_norm": float("nan"), "skipped": 0.0}
    if not math.isfinite(record["loss"]):
        optimizer.zero_grad(set_to_none=True)
        return {**record, "skipped": 1.0}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    record["grad_norm"] = float(ctx.clip_grad_norm(params, ctx.cfg.optim.max_grad_norm))
    if not math.isfinite(record["grad_norm"]):
        if getattr(optimizer, "scaler", None) is not None:  # fp16: the scaler skips the update, lowers its scale
            optimizer.step()                                # and resets (else the next unscale_ raises)
        optimizer.zero_grad(set_to_none=True)
        return {**record, "skipped": 1.0}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    check_finite_state(optimizer)
    return record


class DivergedError(UserError):
    """The weights or the optimizer's moments stopped being finite after a step (the run must stop)."""


def check_finite_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`DivergedError` unless every trainable tensor and optimizer state tensor is finite.

    One fused norm per (device, dtype) group: a tensor is finite iff its norm is (an overflow of the norm itself
    needs values near 1e19 in fp32, which is divergence too).
    """
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    bad = sum(int((~torch.isfinite(torch.stack(torch._foreach_norm(group)))).sum()) for group in groups.values())
    if bad:
        raise DivergedError(f"non-finite weights or optimizer state after a gradient step ({bad} of {len(tensors)} "
                            "tensors)")


def update_epoch(unet, optimizer, rollouts: Rollouts, cfg: FinetuneConfig, algorithm: Algorithm, *, scheduler,
                 generator: torch.Generator | None = None, backward: Callable | None = None,
                 clip_grad_norm: Callable | None = None, targets: torch.Tensor | None = None) -> dict[str, float]:
    """K passes of gradient steps over one epoch's rollouts (Algorithm 1's inner loop).

    Args:
        unet: the trained model (possibly wrapped, e.g. by accelerate); its forward is what gets differentiated.
        optimizer: over the trainable parameters (:func:`make_optimizer`).
        rollouts: from :func:`rewardtune.finetune.rollout.collect_rollouts` with the same sampling config.
        algorithm: an entry of :data:`rewardtune.finetune.algorithms.ALGORITHMS` (per-sample targets and loss).
        scheduler: the DDIM scheduler that sampled ``rollouts``.
        generator: CPU generator for the minibatch shuffles (default: seeded with ``cfg.seed``).
        backward, clip_grad_norm: hooks, e.g. ``accelerator.backward`` and ``accelerator.clip_grad_norm_``.
        targets: the epoch's targets if already computed: ``[N*B]``, or per-step ``[N*B,T]`` (dense advantages of
            :mod:`rewardtune.finetune.dense`; a minibatch then takes ``targets[i, t]`` of its sampled steps).

    Returns:
        Means over applied steps of ``loss``, ``clipfrac``, ``approx_kl``, ``grad_norm``; counts ``steps``
        (applied) and ``skipped`` (non-finite loss or gradient); ``nonfinite_targets`` (samples with any non-finite
        target).

    Without ``targets`` the algorithm's targets are computed once per call (this updates DDPO's stat tracker): call it
    once per epoch.
    """
    if (rollouts.num_groups, rollouts.images_per_prompt) != (cfg.prompts_per_epoch, cfg.images_per_prompt):
        raise ValueError(f"rollouts hold {rollouts.num_groups} prompts x {rollouts.images_per_prompt} images but "
                         f"the config says {cfg.prompts_per_epoch} x {cfg.images_per_prompt}; collect them with this "
                         "config")
    generator = generator or torch.Generator().manual_seed(cfg.seed)
    backward = backward or (lambda loss: loss.backward())
    clip_grad_norm = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    targets = algorithm.targets(rollouts) if targets is None else targets
    passes = plan_minibatches(rollouts.num_groups, rollouts.images_per_prompt, rollouts.num_steps, cfg,
                              algorithm.whole_groups, generator)
    ctx = StepContext(unet, optimizer, scheduler, cfg, algorithm, backward, clip_grad_norm)
    records = [gradient_step(ctx, rollouts, batch, targets) for minibatches in passes for batch in minibatches]
    bad = ~torch.isfinite(targets)
    return summarise(records, nonfinite_targets=int((bad.reshape(len(bad), -1).any(1)).sum()))


def summarise(records: list[dict[str, float]], nonfinite_targets: int = 0) -> dict[str, float]:
    """Means of the applied steps' metrics (NaN when none was applied), plus step counts."""
    applied = [r for r in records if not r["skipped"]]
    out = {key: sum(r[key] for r in applied) / len(applied) if applied else float("nan")
           for key in ("loss", "clipfrac", "approx_kl", "grad_norm")}
    out.update(steps=len(applied), skipped=len(records) - len(applied), nonfinite_targets=nonfinite_targets)
    if out["skipped"]:
        logger.warning("skipped %d of %d gradient steps with a non-finite loss or gradient norm (%d non-finite "
                       "targets)", out["skipped"], len(records), nonfinite_targets)
    logger.info("update: %d steps, loss %.4g, clipfrac %.3f, approx_kl %.3g, grad_norm %.3g", out["steps"],
                out["loss"], out["clipfrac"], out["approx_kl"], out["grad_norm"])
    return out
