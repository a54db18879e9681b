"""Channel importances for structured pruning (registered in :mod:`rewardtune.prune.registry`).

* ``magnitude``: L2 norm of each channel's weights across its dependency group (torch-pruning
  ``GroupMagnitudeImportance``); needs no data.
* ``taylor``: first-order Taylor ``|sum w * dL/dw|`` per channel (``GroupTaylorImportance(multivariable=True)``) with
  ``L`` the epsilon-prediction MSE on calibration latents at random timesteps.
* ``diff_pruning``: Diff-Pruning (Fang et al. 2023): ``sum |w * dL_t/dw|`` with gradients accumulated over
  ``t = 0, s, 2s, ...`` from the clean end until ``L_t < thr * max L`` (``multivariable=False``).

Calibration data is ``(latents [N,C,h,w] clean x0, states [N,L,D] text states)``; the CLI uses latents sampled from
the unpruned model, so no dataset is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rewardtune.config import require
from rewardtune.diffusion.sampling import forward_noise

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)


def default_alphas_cumprod() -> torch.Tensor:
    """``[1000]`` cumulative alphas of SD 1.x's scaled-linear schedule (the shapes-tiny schedule too)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def eps_loss(unet, x0: torch.Tensor, states: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE of ``unet`` on ``x0 [B,C,h,w]`` noised to timesteps ``t [B]`` (DDPM Eq. 14)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    noisy = forward_noise(x0, noise, t, alphas)
    return F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample.float(), noise.float())


def _seed_field():
    return field(default=0, metadata={"help": "seed of the noise and timesteps of the calibration losses"})


@dataclass
class TaylorOptions:
    """Options of the ``taylor`` importance."""

    batches: int = field(default=4, metadata={"help": "calibration batches whose gradients add up"})
    seed: int = _seed_field()

    def __post_init__(self) -> None:
        require(self.batches >= 1, "batches", "at least 1", self.batches)


@dataclass
class DiffPruningOptions:
    """Options of the ``diff_pruning`` importance."""

    thr: float = field(default=0.05, metadata={"help": "stop once L_t < thr * max L (fraction of the largest loss)"})
    stride: int = field(default=1, metadata={"help": "timestep stride from the clean end: t = 0, stride, ..."})
    seed: int = _seed_field()

    def __post_init__(self) -> None:
        require(self.stride >= 1, "stride", "at least 1", self.stride)


def _alphas(context: PruneContext) -> torch.Tensor:
    return default_alphas_cumprod() if context.alphas is None else context.alphas


def magnitude_importance(unet, options, context: PruneContext):
    """L2 norm of each channel's weights across its dependency group (no data)."""
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


def taylor_importance(unet, options: TaylorOptions, context: PruneContext):
    """Accumulate ``dL/dw`` over ``options.batches`` random-timestep batches of ``context.calibration``."""
    import torch_pruning as tp

    latents, states = context.calibration
    alphas = _alphas(context)
    g = torch.Generator().manual_seed(options.seed)
    unet.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for chunk_x, chunk_c in zip(latents.chunk(options.batches), states.chunk(options.batches)):
            t = torch.randint(0, len(alphas), (chunk_x.shape[0],), generator=g).to(chunk_x.device)
            eps_loss(unet, chunk_x, chunk_c, t, alphas, g).backward()
    return tp.importance.GroupTaylorImportance(multivariable=True)


def diff_pruning_importance(unet, options: DiffPruningOptions, context: PruneContext):
    """Diff-Pruning's loop: ``t = 0, stride, ...``; gradients add up (never zeroed); stop at ``L_t < thr*max``."""
    import torch_pruning as tp

    latents, states = context.calibration
    alphas = _alphas(context)
    g = torch.Generator().manual_seed(options.seed)
    unet.zero_grad(set_to_none=True)
    loss_max, used = 0.0, 0
    with torch.enable_grad():
        for step in range(0, len(alphas), options.stride):
            t = torch.full((latents.shape[0],), step, dtype=torch.long, device=latents.device)
            loss = eps_loss(unet, latents, states, t, alphas, g)
            loss.backward()
            used += 1
            loss_max = max(loss_max, loss.item())
            if loss.item() < loss_max * options.thr:
                break
    logger.info("diff_pruning: accumulated gradients over %d timesteps (thr %.3f)", used, options.thr)
    return tp.importance.GroupTaylorImportance(multivariable=False)


__all__ = ["eps_loss", "default_alphas_cumprod", "magnitude_importance", "taylor_importance",
           "diff_pruning_importance", "TaylorOptions", "DiffPruningOptions"]
