"""The reward interface: ``reward(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]``.

Every reward is a :class:`Reward` (an ``nn.Module``): loaded once, reused across calls, moved with ``.to()``.
Differentiable rewards preprocess with torch ops so gradients reach the pixels; the others run under no_grad.
"""

from __future__ import annotations

import torch
from torch import nn

from rewardtune.errors import UserError


class Reward(nn.Module):
    """Base class. Subclasses implement :meth:`score` on validated inputs.

    Attributes:
        name: registered name (set by :func:`rewardtune.rewards.load_reward`).
        differentiable: True when gradients of the score reach the input pixels.
        components: scores of the last call by component (``{name: Tensor[B]}``; one entry for plain rewards).
    """

    differentiable: bool = False
    name: str = "reward"

    def __init__(self) -> None:
        super().__init__()
        self.components: dict[str, torch.Tensor] = {}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        if self.differentiable and torch.is_grad_enabled():
            scores = self.score(images, prompts)
        else:
            with torch.no_grad():
                scores = self.score(images, prompts)
        scores = scores.float().reshape(-1)
        if scores.shape[0] != images.shape[0]:
            raise RuntimeError(f"{self.name} returned {scores.shape[0]} scores for {images.shape[0]} images")
        if not self.components or len(self.components) == 1:
            self.components = {self.name: scores.detach()}
        return scores


def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    """Raise a one-line :class:`UserError` unless ``images`` is ``[B,3,H,W]`` float in [0,1] with B prompts."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"images must be a float tensor [B,3,H,W], got {shape}")
    if not images.is_floating_point():
        raise UserError(f"images must be float in [0,1], got dtype {images.dtype}; divide uint8 images by 255")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        count = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise UserError(f"got {images.shape[0]} images but {count}; pass a list with one prompt per image")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise UserError(f"images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}]; map [-1,1] with x/2+0.5")
