"""Unstructured masks: global magnitude pruning with a per-layer minimum, and lottery tickets (IMP + rewinding).

Masked weights are set to zero in dense tensors: the UNet keeps every shape, so dense kernels do exactly the same
work and **no speed is gained**; these are research tools (sparsity against quality). The masked layer names are
kept in the pruning record; :func:`masks_of` reads the masks back as ``weight != 0``.
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
from rewardtune.prune.common import get_record, merged_record, set_record

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]  # layer name -> bool mask shaped like its weight


def prunable_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: weight}`` of every Conv2d and Linear (biases and norms are never masked)."""
    return {n: m.weight for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def global_magnitude_masks(weights: dict[str, torch.Tensor], ratio: float, min_keep: float = 0.0005,
                           masks: Masks | None = None) -> Masks:
    """Global MP with a minimum threshold (Gupta et al. 2022): remove the ``floor(ratio * n_alive)`` smallest
    ``|w|`` over all layers, but every layer keeps its ``ceil(min_keep * N)`` largest weights (at least 1), so no
    layer collapses. ``N`` counts all weights; with ``masks`` only surviving weights compete (IMP rounds).
    """
    masks = masks or {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    floor_keep = max(1, math.ceil(min_keep * total))
    scores = {}
    for name, w in weights.items():
        s = w.detach().abs().float().flatten().clone()
        s[~masks[name].flatten()] = -1.0  # already pruned: stays pruned, never counted again
        keep = min(floor_keep, int(masks[name].sum()))
        if keep:
            s[torch.topk(s, keep).indices] = math.inf  # protected minimum of this layer
        scores[name] = s
    flat = torch.cat(list(scores.values()))
    alive = int(sum(int(m.sum()) for m in masks.values()))
    k = int(math.floor(ratio * alive))
    if k == 0:
        return masks
    candidates = flat[(flat >= 0) & torch.isfinite(flat)]
    k = min(k, candidates.numel())
    threshold = torch.kthvalue(candidates, k).values if k else torch.tensor(-0.5)
    return {n: (s > threshold).view_as(weights[n]) for n, s in scores.items()}


def apply_masks(unet: nn.Module, masks: Masks) -> None:
    """Zero the masked weights in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            unet.get_submodule(name).weight.mul_(mask.to(unet.get_submodule(name).weight.dtype))


def masks_of(unet: nn.Module) -> Masks:
    """The masks of a masked UNet (``weight != 0`` on the layers its pruning record lists)."""
    record = get_record(unet) or {}
    return {n: unet.get_submodule(n).weight.detach() != 0 for n in record.get("masked", [])}


def sparsity(masks: Masks) -> float:
    """Fraction of masked-out weights over all masked layers."""
    total = sum(m.numel() for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def finish_masked(model: nn.Module, unet: nn.Module, masks: Masks, method: str, options: dict) -> nn.Module:
    """Zero ``model``'s masked weights and record the method and the masked layers (on top of ``unet``'s record)."""
    apply_masks(model, masks)
    record = merged_record(unet, method, {**options, "sparsity": round(sparsity(masks), 6)})
    record["masked"] = sorted(set(record["masked"]) | set(masks))
    set_record(model, record)
    return model


def _min_keep_field():
    return field(default=0.0005, metadata={"help": "fraction of all weights that every layer keeps at least"})


@dataclass
class MagnitudeOptions:
    """Options of ``magnitude`` (one-shot global magnitude masks)."""

    min_keep: float = _min_keep_field()

    def __post_init__(self) -> None:
        require(0 <= self.min_keep < 1, "min_keep", "in [0, 1)", self.min_keep)


@dataclass
class LotteryOptions:
    """Options of ``lottery`` (iterative magnitude pruning with rewinding)."""

    rounds: int = field(default=3, metadata={"help": "prune-and-rewind rounds, each after a train_fn call"})
    min_keep: float = _min_keep_field()
    round_steps: int | None = field(default=None, metadata={
        "help": "distillation steps before each round in rewardtune prune (default: recover.steps // 2)"})

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "rounds", "at least 1", self.rounds)
        require(0 <= self.min_keep < 1, "min_keep", "in [0, 1)", self.min_keep)
        require(self.round_steps is None or self.round_steps >= 1, "round_steps", "at least 1 or null",
                self.round_steps)


def prune_magnitude(unet: nn.Module, ratio: float, options: MagnitudeOptions, context: PruneContext) -> nn.Module:
    """A copy of ``unet`` with the ``ratio`` smallest-magnitude Conv/Linear weights zeroed (one-shot Global MP)."""
    model = copy.deepcopy(unet)
    masks = global_magnitude_masks(prunable_weights(model), ratio, options.min_keep)
    return finish_masked(model, unet, masks, "magnitude", {"ratio": ratio, "min_keep": options.min_keep})


def prune_lottery(unet: nn.Module, ratio: float, options: LotteryOptions, context: PruneContext) -> nn.Module:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019).

    Each of ``rounds`` rounds: ``context.train_fn(model, masks)`` trains the masked model (keeping masked weights
    at zero), then ``p = 1 - (1 - ratio)^(1/rounds)`` of the *surviving* weights are pruned globally by ``|w|`` and
    the survivors rewind to ``unet``'s weights (the rewind point). Final density ``(1 - p)^rounds = 1 - ratio``.
    Without ``train_fn`` this reduces to iterative Global MP on the rewind weights.
    """
    rounds, train_fn = options.rounds, context.train_fn
    per_round = 1 - (1 - ratio) ** (1 / rounds)
    rewind = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    model = copy.deepcopy(unet)
    masks = None
    for level in range(rounds):
        if train_fn is not None:
            train_fn(model, masks or {})
        masks = global_magnitude_masks(prunable_weights(model), per_round, options.min_keep, masks)
        model.load_state_dict(rewind)
        apply_masks(model, masks)
        logger.info("lottery round %d/%d: sparsity %.3f", level + 1, rounds, sparsity(masks))
    return finish_masked(model, unet, masks, "lottery", {"ratio": ratio, "rounds": rounds,
                                                         "min_keep": options.min_keep})


__all__ = ["global_magnitude_masks", "apply_masks", "masks_of", "sparsity", "prune_magnitude", "prune_lottery",
           "MagnitudeOptions", "LotteryOptions", "prunable_weights", "finish_masked"]
