"""``perceptual:PATH`` as an image reward: ``reward(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]``.

Each image is a frame: it is rounded to uint8 (as a video frame would be), embedded by the reward's feature
extractor and scored; the score is the combined total (``combine`` overrides the file's default). Prompts are
ignored: the reward says how much an image looks like the demos' later steps. Not differentiable.
"""

from __future__ import annotations

import torch

from rewardtune.errors import UserError
from rewardtune.perceptual.reward import COMBINES, PerceptualReward
from rewardtune.rewards.base import Reward


class PerceptualImageReward(Reward):
    """Wraps a :class:`PerceptualReward`; ``components`` holds the total and every step's reward."""

    def __init__(self, learned: PerceptualReward, combine: str | None = None) -> None:
        super().__init__()
        if combine is not None and combine not in COMBINES:
            raise UserError(f"unknown step combination {combine!r}; choose one of: {', '.join(COMBINES)}")
        self.learned, self.combine = learned, combine
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)   # lets .to()/.device track the device

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        per_step, total = self.learned.score_frames(frames, combine=self.combine, shaped=False)
        self.components = {self.name: total.to(images.device)}
        self.components.update({f"step{k + 1}": per_step[:, k].to(images.device) for k in range(per_step.shape[1])})
        return total.to(images.device)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.learned.extractor.to(self._anchor.device)
        return result


def load_perceptual_reward(path: str, combine: str | None = None, device: str = "cpu",
                           dtype: str = "float32") -> Reward:
    """The image reward of a file written by ``rewardtune perceptual learn`` (or ``PerceptualReward.save``)."""
    learned = PerceptualReward.load(path)
    learned.extractor.to(device)
    return PerceptualImageReward(learned, combine).to(device)


__all__ = ["PerceptualImageReward", "load_perceptual_reward"]
