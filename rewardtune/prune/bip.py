"""BiP (Zhang et al., NeurIPS 2022): bi-level pruning with the first-order implicit gradient.

    min_{m in S} l(m * theta*(m)),   theta*(m) = argmin_theta l(m * theta) + (gamma/2) ||theta||^2

with ``S`` the masks of density ``1 - ratio``. Each iteration, with ``w = m * theta`` and ``G = dl/dw`` on a batch:

* lower level (batch A, mask fixed): one SGD step ``theta <- theta - lr * (m * G_A)``;
* upper level (batch B): scores ``s <- s - score_lr * (g_m - implicit_lr * g_m * g_theta)`` with ``g_m = theta * G_B``
  (``dl/dm``) and ``g_theta = m * G_B`` (``dl/dtheta``); ``implicit_lr = 1/gamma`` (BiP's ``lr2 = 1e-4``);
* projection: ``m`` = the top-``(1 - ratio)`` of ``|s|`` globally (every layer keeps ``min_keep`` of all weights),
  a straight-through estimator (the score gradient is ``dl/dm`` at the binary mask).

``l`` is the epsilon-prediction MSE on the calibration latents. Scores start at ``|theta|``, so zero iterations is
one-shot global magnitude pruning. The lower level drops the ridge term (plain SGD, as BiP's code does). Masks zero
weights in dense tensors: no speed-up.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from rewardtune.config import require
from rewardtune.prune.masks import apply_masks, finish_masked, global_magnitude_masks, prunable_weights, sparsity

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)


@dataclass
class BiPOptions:
    """Options of ``bip``."""

    iterations: int = field(default=100, metadata={"help": "bi-level iterations (one lower and one upper step each)"})
    lr: float = field(default=0.01, metadata={"help": "lower-level SGD learning rate of the weights"})
    score_lr: float = field(default=0.1, metadata={"help": "upper-level learning rate of the mask scores"})
    implicit_lr: float = field(default=1e-4, metadata={"help": "1/gamma: weight of the implicit-gradient term"})
    batch_size: int = field(default=16, metadata={"help": "calibration latents per step"})
    min_keep: float = field(default=0.0005, metadata={"help": "fraction of all weights every layer keeps at least"})
    seed: int = field(default=0, metadata={"help": "seed of the batches, noise and timesteps"})

    def __post_init__(self) -> None:
        require(self.iterations >= 0, "iterations", ">= 0", self.iterations)
        for key in ("lr", "score_lr", "implicit_lr"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(0 <= self.min_keep < 1, "min_keep", "in [0, 1)", self.min_keep)


def score_update(scores: torch.Tensor, theta: torch.Tensor, grad_w: torch.Tensor, mask: torch.Tensor,
                 score_lr: float, implicit_lr: float) -> torch.Tensor:
    """One upper-level step ``s - score_lr * (g_m - implicit_lr * g_m * g_theta)``, ``g_m = theta * G``,
    ``g_theta = m * G`` (all shaped like the weight)."""
    g_m = theta * grad_w
    g_theta = mask.to(grad_w.dtype) * grad_w
    return scores - score_lr * (g_m - implicit_lr * g_m * g_theta)


class _BiPState:
    """Dense weights ``theta``, scores and the projected masks of every prunable layer of ``model``."""

    def __init__(self, model: nn.Module, ratio: float, min_keep: float):
        self.model, self.ratio, self.min_keep = model, ratio, min_keep
        self.theta = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
        self.scores = {n: w.abs() for n, w in self.theta.items()}
        self.project()

    def project(self) -> None:
        self.masks = global_magnitude_masks(self.scores, self.ratio, self.min_keep)

    def gradient(self, batch) -> dict[str, torch.Tensor]:
        """``G = dl/dw`` at ``w = m * theta`` for every layer (the model's weights are set to ``w``)."""
        from rewardtune.prune.importance import eps_loss

        with torch.no_grad():
            for n, theta in self.theta.items():
                self.model.get_submodule(n).weight.copy_(theta * self.masks[n])
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            eps_loss(self.model, *batch).backward()
        return {n: self.model.get_submodule(n).weight.grad.detach().clone() for n in self.theta}


def _batch(context: PruneContext, options: BiPOptions, g: torch.Generator):
    from rewardtune.prune.importance import _alphas

    latents, states = context.calibration
    idx = torch.randint(0, latents.shape[0], (min(options.batch_size, latents.shape[0]),), generator=g)
    alphas = _alphas(context)
    t = torch.randint(0, len(alphas), (len(idx),), generator=g).to(latents.device)
    return latents[idx], states[idx], t, alphas, g


def prune_bip(unet: nn.Module, ratio: float, options: BiPOptions, context: PruneContext) -> nn.Module:
    """A copy of ``unet`` masked to sparsity ``ratio`` by ``options.iterations`` BiP iterations (module docstring);
    the weights are the lower level's ``theta`` under the final mask."""
    model = copy.deepcopy(unet)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    state = _BiPState(model, ratio, options.min_keep)
    g = torch.Generator().manual_seed(options.seed)
    for _ in range(options.iterations):
        grads = state.gradient(_batch(context, options, g))  # lower level: SGD on theta, mask fixed
        for n, theta in state.theta.items():
            theta.sub_(options.lr * state.masks[n] * grads[n])
        grads = state.gradient(_batch(context, options, g))  # upper level: scores by the implicit gradient
        for n in state.theta:
            state.scores[n] = score_update(state.scores[n], state.theta[n], grads[n], state.masks[n],
                                           options.score_lr, options.implicit_lr)
        state.project()
    model.zero_grad(set_to_none=True)
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    with torch.no_grad():
        for n, theta in state.theta.items():
            model.get_submodule(n).weight.copy_(theta)
    apply_masks(model, state.masks)
    logger.info("bip: %d iterations, sparsity %.3f", options.iterations, sparsity(state.masks))
    return finish_masked(model, unet, state.masks, "bip", {"ratio": ratio, "iterations": options.iterations,
                                                     "score_lr": options.score_lr,
                                                     "implicit_lr": options.implicit_lr})


__all__ = ["BiPOptions", "prune_bip", "score_update"]
