"""Weighted sums of rewards: ``"pickscore:10,hpsv2:2,aesthetic:0.05"`` (DRaFT / PRDP's multi-reward mix)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rewardtune.errors import UserError
from rewardtune.rewards.base import Reward

EXAMPLE = "e.g. 'pickscore:10,hpsv2:2'"


def parse_weight(text: str, part: str, spec: str) -> float:
    """The finite float ``text`` (the weight of ``part`` in ``spec``), else a one-line :class:`UserError`."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"malformed reward spec {spec!r} at {part!r}: weight {text!r} is not a number; "
                        f"expected NAME or NAME:WEIGHT, {EXAMPLE}") from None
    if not math.isfinite(value):
        raise UserError(f"malformed reward spec {spec!r} at {part!r}: weight {text!r} must be a finite number")
    return value


def parse_term(part: str, spec: str) -> tuple[str, float]:
    """``"name:2"`` -> ``("name", 2.0)``; ``"name"`` -> ``("name", 1.0)``."""
    part = part.strip()
    name, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
    if not name.strip():
        raise UserError(f"malformed reward spec {spec!r} at {part!r}; expected NAME or NAME:WEIGHT, {EXAMPLE}")
    return name.strip(), parse_weight(weight.strip(), part, spec)


def check_unique(terms: list[tuple[str, float]], spec: str) -> list[tuple[str, float]]:
    seen: set[str] = set()
    for name, _ in terms:
        if name in seen:
            raise UserError(f"reward {name!r} appears twice in spec {spec!r}")
        seen.add(name)
    return terms


def check_not_empty(spec: str) -> None:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty reward spec; pass a name such as 'pickscore' or a sum such as 'pickscore:10,hpsv2:2'")


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"a:2,b"`` -> ``[("a", 2.0), ("b", 1.0)]``. Raises a one-line :class:`UserError` on malformed specs
    (empty parts, non-numeric or non-finite weights, repeated names)."""
    check_not_empty(spec)
    return check_unique([parse_term(part, spec) for part in spec.split(",")], spec)


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
