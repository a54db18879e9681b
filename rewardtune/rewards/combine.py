"""Weighted sums of rewards: ``"pickscore:10,hpsv2:2,aesthetic:0.05"`` (DRaFT / PRDP's multi-reward mix)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rewardtune.errors import UserError
from rewardtune.rewards.base import Reward


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"a:2,b"`` -> ``[("a", 2.0), ("b", 1.0)]``. Raises a one-line :class:`UserError` on malformed specs."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty reward spec; pass a name such as 'pickscore' or a sum such as 'pickscore:10,hpsv2:2'")
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, sep, weight = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "1")
        name = name.strip()
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not name or not math.isfinite(value):
            raise UserError(f"malformed reward spec {spec!r} at {part.strip()!r}; expected NAME or NAME:WEIGHT, "
                            "e.g. 'pickscore:10,hpsv2:2'")
        if name in dict(terms):
            raise UserError(f"reward {name!r} appears twice in spec {spec!r}")
        terms.append((name, value))
    return terms


class WeightedSum(Reward):
    """``total = sum_i w_i * r_i(images, prompts)``; each component's raw scores are kept in ``components``."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]) -> None:
        super().__init__()
        self.keys = list(rewards)  # names may contain "." (hpsv2.1), which ModuleDict keys may not
        self.parts = nn.ModuleList(rewards.values())
        self.weights = dict(weights)
        self.differentiable = all(r.differentiable for r in rewards.values())
        self.name = ",".join(f"{k}:{w:g}" for k, w in weights.items())

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], device=images.device)
        components = {}
        for key, reward in zip(self.keys, self.parts):
            values = reward(images.to(reward.device), prompts).to(images.device)
            components[key] = values.detach()
            total = total + self.weights[key] * values
        self.components = components
        return total
