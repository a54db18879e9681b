"""Structured channel pruning of a diffusers UNet with Torch-Pruning's dependency graph (Diff-Pruning recipe).

Every Conv2d/Linear width group is prunable except ``conv_out`` (the output must keep its channels). Three fixes
that diffusers UNets need (research/pruning.md, section 1.4), plus one for attention temperature:

1. ``num_heads`` for every ``to_q/to_k/to_v``: head *dimensions* shrink, the head *count* stays valid.
2. ``Downsample2D/Upsample2D.channels`` (and ``out_channels``) are reset from their convs after pruning.
3. GroupNorm keeps ``num_groups``; torch-pruning keeps ``int(channels_per_group * (1 - ratio))`` channels per
   group, so the achieved ratio is coarser than the requested one (64 channels in 32 groups: any ratio <= 0.5
   halves them). :func:`check_plan` refuses a ratio that would leave a group, a head or a layer empty.
4. Attention temperature: SDPA scales logits by ``1/sqrt(head_dim)`` of the *pruned* head. ``to_q`` is multiplied
   by ``sqrt(new/old head_dim)`` and ``attn.scale`` reset, so surviving dimensions keep their original logits.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from rewardtune.config import require
from rewardtune.errors import UserError
from rewardtune.prune.common import (
    attribute_changes,
    merged_record,
    set_record,
    unet_forward,
)
from rewardtune.prune.common import (
    example_inputs as make_inputs,
)

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)


def _attention_modules(unet: nn.Module):
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention)]


def head_counts(unet: nn.Module) -> dict[nn.Module, int]:
    """``{to_q/to_k/to_v Linear: heads}`` for every diffusers ``Attention`` (torch-pruning's ``num_heads``)."""
    return {layer: attn.heads for _, attn in _attention_modules(unet) for layer in (attn.to_q, attn.to_k, attn.to_v)}


def check_plan(unet: nn.Module, ratio: float, ignored: set[str]) -> None:
    """Refuse a ratio that would remove every channel of a GroupNorm group, an attention head or a layer."""
    for name, module in unet.named_modules():
        if isinstance(module, nn.GroupNorm):
            per_group = module.num_channels // module.num_groups
            if int(per_group * (1 - ratio)) < 1:
                raise UserError(
                    f"ratio {ratio} would remove a whole layer: GroupNorm {name!r} has {per_group} channel(s) per "
                    f"group and keeps int({per_group}*(1-ratio)) = 0; use ratio <= {1 - 1 / per_group:.3f}")
    for name, attn in _attention_modules(unet):
        head_dim = attn.to_q.out_features // attn.heads
        if int(head_dim * (1 - ratio)) < 1:
            raise UserError(f"ratio {ratio} would remove a whole layer: attention {name!r} has head_dim {head_dim} "
                            f"and would keep 0 dims per head; use ratio <= {1 - 1 / head_dim:.3f}")
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or name in ignored:
            continue
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if int(width * (1 - ratio)) < 1:
            raise UserError(f"ratio {ratio} would remove a whole layer: {name!r} has {width} output channel(s)")


def fix_after_pruning(unet: nn.Module, old_head_dims: dict[str, int]) -> None:
    """Reset static attributes torch-pruning does not know about (fixes 2 and 4 of the module docstring)."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for module in unet.modules():
        if isinstance(module, (Downsample2D, Upsample2D)) and getattr(module, "conv", None) is not None:
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels
    for name, attn in _attention_modules(unet):
        new_dim = attn.to_q.out_features // attn.heads
        attn.inner_dim, attn.inner_kv_dim = attn.to_q.out_features, attn.to_k.out_features
        attn.query_dim, attn.out_dim = attn.to_q.in_features, attn.to_out[0].out_features
        if attn.scale_qk and new_dim != old_head_dims[name]:
            factor = math.sqrt(new_dim / old_head_dims[name])
            with torch.no_grad():
                attn.to_q.weight.mul_(factor)
                if attn.to_q.bias is not None:
                    attn.to_q.bias.mul_(factor)
            attn.scale = new_dim ** -0.5


@dataclass
class StructuredOptions:
    """Options of ``structured`` (the importance's options join these)."""

    ignored: tuple[str, ...] = field(default=("conv_out",), metadata={
        "help": "modules whose output channels are never pruned (their inputs follow the layers before), by name "
                "or shell-style pattern (e.g. '*.to_q'); conv_out keeps the output channels"})
    round_to: int | None = field(default=None, metadata={"help": "kept channel counts round to a multiple of this"})
    global_pruning: bool = field(default=False, metadata={"help": "rank channels across layers, not per layer"})
    ratios: dict[str, float] = field(default_factory=dict, metadata={
        "help": "per-module ratios {module name: ratio} overriding ratio for the width groups rooted there "
                "(e.g. {down_blocks.1: 0.25}); 0 keeps a module's groups whole"})

    def __post_init__(self) -> None:
        require(self.round_to is None or self.round_to >= 1, "round_to", "at least 1 or null", self.round_to)
        for name, value in self.ratios.items():
            require(isinstance(value, (int, float)) and 0 <= value < 1, f"ratios.{name}", "in [0, 1)", value)


def ignored_modules(unet: nn.Module, ignored: tuple[str, ...]) -> list[str]:
    """Module names matching ``ignored`` (names or shell-style patterns such as ``*.to_q``), in module order."""
    names = [n for n, _ in unet.named_modules() if n]
    return [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in ignored)]


def check_structured_plan(unet: nn.Module, ratio: float, options: StructuredOptions) -> None:
    """Refuse an ``ignored`` name or pattern that matches no module and a ratio that empties a group, head or layer."""
    names = dict(unet.named_modules())
    unknown = [n for n in options.ratios if n not in names]
    unknown += [p for p in options.ignored if not ignored_modules(unet, (p,))]
    if unknown:
        raise UserError(f"layer {unknown[0]!r} (options.ignored or options.ratios) is not a module of this UNet "
                        "(e.g. conv_out, conv_in, down_blocks.1, '*.to_q')")
    check_plan(unet, max([ratio, *options.ratios.values()]), set(ignored_modules(unet, options.ignored)))


def prune_structured(unet: nn.Module, ratio: float, options: StructuredOptions, context: PruneContext) -> nn.Module:
    """A new UNet with ``ratio`` of the channels of every width group removed (smaller tensors, same I/O shapes);
    channels are ranked by ``context.scorer`` (the chosen importance). Parameters shrink by about
    ``1-(1-ratio)^2`` (see GroupNorm rounding); ``context.example_inputs`` are traced (default: random, native size).
    """
    import torch_pruning as tp

    model = copy.deepcopy(unet).eval()
    model.requires_grad_(True)
    inputs = context.example_inputs if context.example_inputs is not None else make_inputs(model)
    old_head_dims = {n: a.to_q.out_features // a.heads for n, a in _attention_modules(model)}
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            model, inputs, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=ratio,
            ignored_layers=[model.get_submodule(n) for n in ignored_modules(model, options.ignored)],
            num_heads=head_counts(model),
            round_to=options.round_to, global_pruning=options.global_pruning, forward_fn=unet_forward,
            pruning_ratio_dict={model.get_submodule(n): r for n, r in options.ratios.items()} or None)
        pruner.importance = context.scorer(model)
        pruner.step()
    model.zero_grad(set_to_none=True)
    fix_after_pruning(model, old_head_dims)
    record = merged_record(unet, "structured", {"ratio": ratio, "importance": context.importance,
                                                 "round_to": options.round_to,
                                                 "global_pruning": options.global_pruning,
                                                 "ignored": list(options.ignored),
                                                 "ratios": dict(options.ratios)})
    record["modules"] = attribute_changes(model)
    set_record(model, record)
    logger.info("structured pruning (ratio %.2f, %s): %d groups pruned", ratio, context.importance,
                len(pruner.pruning_history()))
    return model


__all__ = ["prune_structured", "StructuredOptions", "check_structured_plan", "check_plan", "head_counts",
           "fix_after_pruning"]
