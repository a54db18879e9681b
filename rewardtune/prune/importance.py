"""Channel importances for structured pruning (a registry; an unknown name lists the valid ones).

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
from typing import Callable

import torch
import torch.nn.functional as F

from rewardtune.errors import UserError
from rewardtune.registry import Registry

logger = logging.getLogger(__name__)

IMPORTANCES: Registry[Callable] = Registry("pruning importance")


def default_alphas_cumprod() -> torch.Tensor:
    """``[1000]`` cumulative alphas of SD 1.x's scaled-linear schedule (the shapes-tiny schedule too)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def eps_loss(unet, x0: torch.Tensor, states: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE of ``unet`` on ``x0 [B,C,h,w]`` noised to timesteps ``t [B]`` (DDPM Eq. 14)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    a = alphas.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample.float(), noise.float())


def _need_calibration(name: str, calibration) -> tuple[torch.Tensor, torch.Tensor]:
    if calibration is None:
        raise UserError(f"importance {name!r} needs calibration=(latents [N,C,h,w], states [N,L,D]); use "
                        "importance=magnitude to prune without data")
    latents, states = calibration
    if latents.shape[0] != states.shape[0]:
        raise UserError(f"calibration latents and states differ in batch size: {latents.shape[0]} vs "
                        f"{states.shape[0]}")
    return latents, states


@IMPORTANCES.register("magnitude")
def magnitude_importance(unet, calibration=None, **options):
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


@IMPORTANCES.register("taylor")
def taylor_importance(unet, calibration=None, batches: int = 4, alphas: torch.Tensor | None = None, seed: int = 0,
                      **options):
    """Accumulate ``dL/dw`` over ``batches`` random-timestep batches of the calibration data."""
    import torch_pruning as tp

    latents, states = _need_calibration("taylor", calibration)
    alphas = default_alphas_cumprod() if alphas is None else alphas
    g = torch.Generator().manual_seed(seed)
    unet.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for chunk_x, chunk_c in zip(latents.chunk(batches), states.chunk(batches)):
            t = torch.randint(0, len(alphas), (chunk_x.shape[0],), generator=g).to(chunk_x.device)
            eps_loss(unet, chunk_x, chunk_c, t, alphas, g).backward()
    return tp.importance.GroupTaylorImportance(multivariable=True)


@IMPORTANCES.register("diff_pruning")
def diff_pruning_importance(unet, calibration=None, thr: float = 0.05, stride: int = 1,
                            alphas: torch.Tensor | None = None, seed: int = 0, **options):
    """Diff-Pruning's loop: ``t = 0, stride, ...``; gradients add up (never zeroed); stop at ``L_t < thr*max``."""
    import torch_pruning as tp

    latents, states = _need_calibration("diff_pruning", calibration)
    alphas = default_alphas_cumprod() if alphas is None else alphas
    g = torch.Generator().manual_seed(seed)
    unet.zero_grad(set_to_none=True)
    loss_max, used = 0.0, 0
    with torch.enable_grad():
        for step in range(0, len(alphas), max(1, int(stride))):
            t = torch.full((latents.shape[0],), step, dtype=torch.long, device=latents.device)
            loss = eps_loss(unet, latents, states, t, alphas, g)
            loss.backward()
            used += 1
            loss_max = max(loss_max, loss.item())
            if loss.item() < loss_max * thr:
                break
    logger.info("diff_pruning: accumulated gradients over %d timesteps (thr %.3f)", used, thr)
    return tp.importance.GroupTaylorImportance(multivariable=False)


__all__ = ["IMPORTANCES", "eps_loss", "default_alphas_cumprod"]
