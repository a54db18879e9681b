"""The pruning entry points: :func:`prune_unet`, :func:`summarize` and the options a method takes
(:func:`method_options`). Imported on first use by :mod:`rewardtune.prune` (it needs torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rewardtune.prune.common import (
    check_ratio,
    check_unet,
    count_macs,
    count_params,
    get_record,
)
from rewardtune.prune.common import (
    example_inputs as make_example_inputs,
)
from rewardtune.prune.masks import masks_of, sparsity
from rewardtune.prune.pqindex import pq_index, sap_ratio, sparsity_report
from rewardtune.prune.registry import IMPORTANCES, METHODS, SUPPLIED, PruneContext, option_names, resolve


def method_options(method: str, importance: str = "magnitude") -> list[str]:
    """The option names ``method`` takes (with ``importance``'s when the method ranks channels), sorted."""
    return option_names(method, importance)


def prune_unet(unet: nn.Module, method: str = "structured", ratio: float = 0.5, importance: str = "magnitude",
               example_inputs: dict[str, torch.Tensor] | None = None, **options: Any) -> nn.Module:
    """A new pruned UNet (``unet`` is left untouched) taking the same inputs and giving the same output shapes.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        method: a name in :data:`METHODS`: ``structured`` (channels), ``blocks`` (BK-SDM), ``layers`` (layer
            tickets), ``magnitude`` (global MP masks), ``lottery``, ``granet``, ``bip`` or ``semi_structured`` (2:4).
        ratio: fraction to remove, in (0,1): channels for ``structured``, weights for the mask methods; the
            ``blocks`` plan comes from ``options`` (``layers_per_block``, ``mid_block``).
        importance: channel scoring of methods that rank channels (see :data:`IMPORTANCES`).
        example_inputs: UNet keyword inputs ``sample [B,C,h,w]``, ``timestep [B]``, ``encoder_hidden_states
            [B,L,D]`` for tracing (default: random, native size).
        options: the method's (and importance's) options, checked against their dataclasses, e.g. ``round_to``,
            ``rounds``, ``min_keep``, ``layers_per_block``, ``mid_block``; and what a caller supplies:
            ``calibration=(latents [N,C,h,w], states [N,L,D])``, ``alphas [T]``, ``train_fn(model, masks)``.
    """
    supplied = {key: options.pop(key) for key in SUPPLIED if key in options}
    choice = resolve(method, importance, options)
    check_unet(unet)
    ratio = check_ratio(ratio)
    context = PruneContext(example_inputs=example_inputs, importance=importance,
                           importance_options=choice.importance_options, **supplied)
    choice.check(unet, ratio, context)
    return choice.method.function(unet, ratio, choice.options, context)


def summarize(original: nn.Module, pruned: nn.Module, inputs: dict[str, torch.Tensor] | None = None
              ) -> dict[str, Any]:
    """Achieved parameter and MAC counts and ratios (``after / before``), and mask sparsity where masked."""
    inputs = inputs if inputs is not None else make_example_inputs(original)
    params = (count_params(original), count_params(pruned))
    macs = (count_macs(original, inputs), count_macs(pruned, inputs))
    out = {"params": params[0], "params_pruned": params[1], "param_ratio": params[1] / params[0],
           "macs": macs[0], "macs_pruned": macs[1], "mac_ratio": macs[1] / macs[0]}
    masks = masks_of(pruned)
    if masks:
        out["sparsity"] = sparsity(masks)
    return out


__all__ = ["prune_unet", "summarize", "method_options", "METHODS", "IMPORTANCES", "get_record", "pq_index",
           "sap_ratio", "sparsity_report", "masks_of"]
