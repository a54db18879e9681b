"""GraNet (Liu et al., NeurIPS 2021): gradual magnitude pruning during training with zero-cost neuroregeneration.

``updates`` rounds, each: train the masked model (``context.train_fn``, ``round_steps`` steps), prune globally by
magnitude to the cubic schedule's sparsity (Zhu & Gupta 2017)

    s_k = s_f + (s_i - s_f) * (1 - k/n)^3,   k = 1..n,

then, in every round but the last, regenerate: per layer remove ``ceil(r_k * nnz)`` more of the smallest ``|w|``
and regrow as many zero positions with the largest ``|dL/dw|`` (zero-initialised; the next round trains them).
``r_k`` decays by a cosine from ``regrow_fraction`` to 0.005 (``CosineAnnealingLR``). ``s_i = 0`` is dense-to-sparse,
``s_i > 0`` sparse-to-sparse (a global magnitude mask at ``s_i`` first). ``L`` is the epsilon-prediction MSE on the
calibration latents. The last round ends at ``s_f = ratio`` with no regrowth, so the run's recovery finetunes a
fixed mask. Masks zero weights in dense tensors: no speed-up.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from rewardtune.config import require
from rewardtune.prune.masks import (
    Masks,
    apply_masks,
    finish_masked,
    global_magnitude_masks,
    prunable_weights,
    sparsity,
)

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)


@dataclass
class GraNetOptions:
    """Options of ``granet``."""

    updates: int = field(default=4, metadata={"help": "prune(-and-regrow) rounds n, each after a train_fn call"})
    round_steps: int | None = field(default=None, metadata={
        "help": "training steps before each round in rewardtune prune (default: recover.steps // 2)"})
    initial_sparsity: float = field(default=0.0, metadata={
        "help": "s_i: 0 dense-to-sparse; > 0 sparse-to-sparse from a global magnitude mask at s_i"})
    regrow_fraction: float = field(default=0.5, metadata={
        "help": "r_0: fraction of each layer's surviving weights swapped (pruned and regrown), cosine-decayed"})
    min_keep: float = field(default=0.0005, metadata={"help": "fraction of all weights every layer keeps at least"})
    batch_size: int = field(default=16, metadata={"help": "calibration latents per regrowth gradient"})
    seed: int = field(default=0, metadata={"help": "seed of the regrowth gradient's noise and timesteps"})

    def __post_init__(self) -> None:
        require(self.updates >= 1, "updates", "at least 1", self.updates)
        require(self.round_steps is None or self.round_steps >= 1, "round_steps", "at least 1 or null",
                self.round_steps)
        require(0 <= self.initial_sparsity < 1, "initial_sparsity", "in [0, 1)", self.initial_sparsity)
        require(0 <= self.regrow_fraction < 1, "regrow_fraction", "in [0, 1)", self.regrow_fraction)
        require(0 <= self.min_keep < 1, "min_keep", "in [0, 1)", self.min_keep)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


def cubic_sparsity(k: int, n: int, final: float, initial: float = 0.0) -> float:
    """``s_k = s_f + (s_i - s_f) (1 - k/n)^3`` (``k = 0`` gives ``s_i``, ``k = n`` gives ``s_f``)."""
    return final + (initial - final) * (1 - k / n) ** 3


def regrow_rate(k: int, n: int, initial: float, floor: float = 0.005) -> float:
    """Cosine decay of the regeneration fraction: ``floor + (r_0 - floor)(1 + cos(pi k/n))/2``."""
    return floor + (initial - floor) * 0.5 * (1 + math.cos(math.pi * k / n))


def prune_and_regrow(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """One layer's regeneration: drop ``c = ceil(fraction * nnz)`` surviving weights of least ``|w|``, regrow the
    ``c`` dead positions (just-dropped ones included) of largest ``|grad|``. Density is unchanged. Shapes as
    ``weight``; returns the new bool mask."""
    alive = int(mask.sum())
    count = min(math.ceil(fraction * alive), alive) if fraction > 0 else 0
    if count == 0:
        return mask.clone()
    magnitude = weight.detach().abs().flatten().masked_fill(~mask.flatten(), math.inf)
    new = mask.flatten().clone()
    new[torch.topk(magnitude, count, largest=False).indices] = False
    growth = grad.detach().abs().flatten().masked_fill(new, -math.inf)
    new[torch.topk(growth, count).indices] = True
    return new.view_as(mask)


def masked_gradients(model: nn.Module, masks: Masks, context: PruneContext, options: GraNetOptions,
                     round_: int) -> dict[str, torch.Tensor]:
    """``dL/dw`` of every masked layer (dense, at the current masked weights) on a calibration batch."""
    from rewardtune.prune.importance import _alphas, eps_loss

    latents, states = context.calibration
    g = torch.Generator().manual_seed(options.seed + round_)
    idx = torch.randint(0, latents.shape[0], (min(options.batch_size, latents.shape[0]),), generator=g)
    alphas = _alphas(context)
    t = torch.randint(0, len(alphas), (len(idx),), generator=g).to(latents.device)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        eps_loss(model, latents[idx], states[idx], t, alphas, g).backward()
    grads = {n: model.get_submodule(n).weight.grad.detach().clone() for n in masks}
    model.zero_grad(set_to_none=True)
    return grads


def regenerate(model: nn.Module, masks: Masks, grads: dict[str, torch.Tensor], fraction: float) -> Masks:
    """:func:`prune_and_regrow` on every layer; regrown weights are set to zero."""
    new = {n: prune_and_regrow(model.get_submodule(n).weight, grads[n], m, fraction) for n, m in masks.items()}
    apply_masks(model, new)
    return new


def prune_granet(unet: nn.Module, ratio: float, options: GraNetOptions, context: PruneContext) -> nn.Module:
    """A copy of ``unet`` pruned gradually to sparsity ``ratio`` (module docstring); ``context.train_fn(model,
    masks)`` trains between rounds (without it: gradual magnitude pruning with regrowth of untrained zeros)."""
    model = copy.deepcopy(unet)
    weights = prunable_weights(model)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    if options.initial_sparsity:
        masks = global_magnitude_masks(weights, options.initial_sparsity, options.min_keep)
        apply_masks(model, masks)
    n = options.updates
    for k in range(1, n + 1):
        if context.train_fn is not None:
            context.train_fn(model, masks)
        target = cubic_sparsity(k, n, ratio, options.initial_sparsity)
        remove = 1 - (1 - target) / (1 - sparsity(masks))  # fraction of the survivors
        masks = global_magnitude_masks(prunable_weights(model), max(remove, 0.0), options.min_keep, masks)
        apply_masks(model, masks)
        if k < n and options.regrow_fraction > 0 and context.calibration is not None:
            rate = regrow_rate(k, n, options.regrow_fraction)
            masks = regenerate(model, masks, masked_gradients(model, masks, context, options, k), rate)
        logger.info("granet round %d/%d: sparsity %.3f", k, n, sparsity(masks))
    return finish_masked(model, unet, masks, "granet", {"ratio": ratio, "updates": n,
                                                  "initial_sparsity": options.initial_sparsity,
                                                  "regrow_fraction": options.regrow_fraction})


__all__ = ["GraNetOptions", "prune_granet", "cubic_sparsity", "regrow_rate", "prune_and_regrow", "regenerate"]
