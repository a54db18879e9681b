"""Layer tickets (Jordao et al., "When Layers Play the Lottery, all Tickets Win at Initialization", 2023): remove
whole layers instead of channels, chosen by a data-driven score at initialisation (or at trained weights), then
train the shallower UNet.

A *layer unit* is something a diffusers config can drop, so the result is an ordinary ``UNet2DConditionModel``
that plain ``from_pretrained`` loads:

* ``down_blocks.i.attentions`` / ``up_blocks.i.attentions``: the stage's transformer blocks
  (``CrossAttnDownBlock2D -> DownBlock2D``, ``CrossAttnUpBlock2D -> UpBlock2D``);
* ``mid_block.attentions``: the mid block's transformer and second ResNet (``UNetMidBlock2DCrossAttn ->
  UNetMidBlock2D``, one ResNet);
* ``mid_block``: the whole mid block (``mid_block_type: null``).

Each unit is scored by SNIP, ``S(u) = sum_{theta in u} |theta * dL/dtheta|`` with ``L`` the epsilon-prediction MSE
on calibration latents, and the ``count`` lowest go. ``weights: init`` scores and keeps a fresh random
initialisation of the same architecture (the ticket is trained from scratch by the run's recovery); ``trained``
scores and keeps ``unet``'s own weights (remove, then distil).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from rewardtune.config import require
from rewardtune.errors import UserError
from rewardtune.prune.common import get_record, merged_record, public_config, set_record

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)

_PLAIN = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}


def layer_units(config: dict) -> dict[str, list[str]]:
    """``{unit: [parameter-name prefixes]}`` of the removable layer units of a UNet config (module docstring)."""
    units = {}
    for kind in ("down", "up"):
        for i, block in enumerate(config[f"{kind}_block_types"]):
            if block in _PLAIN:
                units[f"{kind}_blocks.{i}.attentions"] = [f"{kind}_blocks.{i}.attentions."]
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid == "UNetMidBlock2DCrossAttn":
        units["mid_block.attentions"] = ["mid_block.attentions.", "mid_block.resnets.1."]
    if mid is not None:
        units["mid_block"] = ["mid_block."]
    return units


def layers_config(config: dict, remove: list[str]) -> dict:
    """The config without the units ``remove`` (names from :func:`layer_units`)."""
    valid = layer_units(config)
    unknown = [u for u in remove if u not in valid]
    if unknown:
        raise UserError(f"layer unit {unknown[0]!r} is not removable here; valid units: {', '.join(valid)}")
    out = dict(config, down_block_types=list(config["down_block_types"]),
               up_block_types=list(config["up_block_types"]))
    for unit in remove:
        kind, _, rest = unit.partition(".")
        if kind in ("down_blocks", "up_blocks"):
            key, i = f"{kind[:-7]}_block_types", int(rest.split(".")[0])
            out[key][i] = _PLAIN[out[key][i]]
        elif unit == "mid_block":
            out["mid_block_type"] = None
        elif out.get("mid_block_type") is not None:  # mid_block.attentions (mid_block may also go)
            out["mid_block_type"] = "UNetMidBlock2D"
    return out


def snip_scores(unet: nn.Module, units: dict[str, list[str]], calibration, alphas: torch.Tensor,
                seed: int = 0) -> dict[str, float]:
    """SNIP score ``sum |theta * dL/dtheta|`` of each unit's parameters on the calibration batch."""
    from rewardtune.prune.importance import eps_loss

    latents, states = calibration
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(alphas), (latents.shape[0],), generator=g).to(latents.device)
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(True).zero_grad(set_to_none=True)
    with torch.enable_grad():
        eps_loss(unet, latents, states, t, alphas, g).backward()
    saliency = {n: float((p.detach() * p.grad).abs().sum()) for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    for p, flag in zip(unet.parameters(), flags):
        p.requires_grad_(flag)
    return {u: sum(v for n, v in saliency.items() if n.startswith(tuple(prefixes))) for u, prefixes in units.items()}


@dataclass
class LayerTicketOptions:
    """Options of ``layers``."""

    remove: list[str] | None = field(default=None, metadata={
        "help": "units to remove by name (e.g. [mid_block, up_blocks.0.attentions]); default: the lowest SNIP"})
    count: int | None = field(default=None, metadata={
        "help": "units removed by score (default: round(ratio * removable units), at least 1)"})
    weights: Literal["init", "trained"] = field(default="init", metadata={
        "help": "init: score and keep a fresh random initialisation (train from scratch); trained: unet's weights"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and of the scoring noise"})

    def __post_init__(self) -> None:
        require(self.count is None or self.count >= 1, "count", "at least 1 or null", self.count)


def check_layers_plan(unet: nn.Module, ratio: float, options: LayerTicketOptions) -> None:
    """Refuse an unknown unit, a count above the removable units, and layer removal after channel pruning."""
    if (get_record(unet) or {}).get("modules"):
        raise UserError("layer removal must come before structured pruning (this UNet's channels are pruned)")
    units = layer_units(public_config(unet.config))
    if options.remove is not None:
        layers_config(public_config(unet.config), options.remove)
    elif (options.count or 1) > len(units):
        raise UserError(f"count {options.count} exceeds the {len(units)} removable layer units ({', '.join(units)})")


def _source(unet: nn.Module, options: LayerTicketOptions) -> nn.Module:
    if options.weights == "trained":
        return unet
    torch.manual_seed(options.seed)
    return type(unet).from_config(public_config(unet.config)).to(device=unet.device, dtype=unet.dtype)


def prune_layers(unet: nn.Module, ratio: float, options: LayerTicketOptions, context: PruneContext) -> nn.Module:
    """A new, shallower UNet without the chosen layer units (module docstring), weights from ``options.weights``."""
    from rewardtune.prune.importance import _alphas

    config = public_config(unet.config)
    source, units = _source(unet, options), layer_units(config)
    remove, scores = options.remove, {}
    if remove is None:
        if context.calibration is None:
            raise UserError("method 'layers' scores layers on calibration=(latents, states); pass it or "
                            "options.remove")
        scores = snip_scores(source, units, context.calibration, _alphas(context), options.seed)
        count = options.count or max(1, round(ratio * len(units)))
        remove = sorted(units, key=scores.get)[:count]
    student = type(unet).from_config(layers_config(config, remove)).to(device=unet.device, dtype=unet.dtype)
    state = source.state_dict()
    student.load_state_dict({k: state[k] for k in student.state_dict()})
    set_record(student, merged_record(unet, "layers", {"removed": list(remove), "weights": options.weights,
                                                       "scores": scores}))
    logger.info("layer tickets: removed %s (SNIP scores %s)", remove, {k: f"{v:.3g}" for k, v in scores.items()})
    return student.eval()


__all__ = ["LayerTicketOptions", "prune_layers", "check_layers_plan", "layer_units", "layers_config", "snip_scores"]
