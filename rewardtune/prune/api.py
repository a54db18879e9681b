"""The pruning entry points: :func:`prune_unet`, :func:`summarize`, :data:`METHODS` and the options each method
reads (:func:`method_options`). Imported on first use by :mod:`rewardtune.prune` (it needs torch)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from rewardtune.prune.blocks import prune_blocks
from rewardtune.prune.common import (
    check_ratio, count_macs, count_params, example_inputs as make_example_inputs, get_record,
)
from rewardtune.prune.importance import IMPORTANCES
from rewardtune.prune.masks import masks_of, prune_lottery, prune_magnitude, sparsity
from rewardtune.prune.pqindex import pq_index, sap_ratio, sparsity_report
from rewardtune.prune.structured import prune_structured
from rewardtune.registry import Registry

METHODS: Registry[Callable[..., nn.Module]] = Registry("pruning method")
METHODS.register("structured", prune_structured)
METHODS.register("blocks", prune_blocks)
METHODS.register("magnitude", prune_magnitude)
METHODS.register("lottery", prune_lottery)


# Arguments the pipeline supplies itself (tensors, callbacks): not options a config can set.
INTERNAL = {"unet", "ratio", "importance", "example_inputs", "calibration", "alphas", "train_fn"}
# Options that ``rewardtune prune`` reads before calling the method.
RUN_OPTIONS = {"lottery": {"round_steps"}}


def _keyword_names(function: Callable) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds} - INTERNAL


def method_options(method: str, importance: str = "magnitude") -> list[str]:
    """The option names ``method`` reads (its keyword arguments; ``structured`` adds those of ``importance``'s
    scorer, ``lottery`` the CLI's ``round_steps``), sorted."""
    names = _keyword_names(METHODS.get(method)) | RUN_OPTIONS.get(method, set())
    if method == "structured":
        names |= _keyword_names(IMPORTANCES.get(importance))
    return sorted(names)


def prune_unet(unet: nn.Module, method: str = "structured", ratio: float = 0.5, importance: str = "magnitude",
               example_inputs: dict[str, torch.Tensor] | None = None, **options: Any) -> nn.Module:
    """A new pruned UNet (``unet`` is left untouched) taking the same inputs and giving the same output shapes.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        method: ``structured`` (channels), ``blocks`` (BK-SDM), ``magnitude`` (global MP masks) or ``lottery``.
        ratio: fraction to remove, in (0,1): channels for ``structured``, weights for the mask methods; the
            ``blocks`` plan comes from ``options`` (``layers_per_block``, ``mid_block``).
        importance: channel scoring for ``structured`` (see :data:`IMPORTANCES`).
        example_inputs: UNet keyword inputs ``sample [B,C,h,w]``, ``timestep [B]``, ``encoder_hidden_states
            [B,L,D]`` for tracing (default: random, native size).
        options: method options, e.g. ``calibration=(latents, states)``, ``round_to``, ``rounds``, ``train_fn``,
            ``min_keep``, ``layers_per_block``, ``mid_block``.
    """
    prune = METHODS.get(method)
    check_ratio(ratio)
    if method == "structured":
        options["importance"] = importance
    elif importance != "magnitude":
        IMPORTANCES.get(importance)  # an unknown name is still an error
    return prune(unet, ratio=ratio, example_inputs=example_inputs, **options)


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
