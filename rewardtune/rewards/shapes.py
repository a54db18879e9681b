"""The shapes world's rewards: ``shapes_gold`` (the oracle; evaluation only)."""

from __future__ import annotations

import torch

from rewardtune.rewards.base import Reward


class ShapesGold(Reward):
    """Gold reward = (fidelity + taste) / 2 from :mod:`rewardtune.shapes.oracle`; components keep both."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from rewardtune.shapes.oracle import gold_scores

        scores = gold_scores(images, prompts)
        self.components = {k: v.to(images.device) for k, v in scores.items()}
        return scores["gold"].to(images.device)


def load_shapes_gold(device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesGold()
