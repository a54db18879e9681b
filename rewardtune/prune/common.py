"""Shared pieces of every pruning method: input checks, example inputs, parameter/MAC counts, the pruning record.

The pruning record is a JSON-able dict stored in the pruned UNet's diffusers config under ``_rewardtune_pruning``
(diffusers keeps private ``_`` keys through ``save_pretrained``/``from_config``), so a pruned UNet carries what is
needed to rebuild it wherever it is saved (see :mod:`rewardtune.prune.io`).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
from torch import nn

from rewardtune.errors import UserError

RECORD_KEY = "_rewardtune_pruning"
# Leaf modules that own parameters and that every method knows how to handle.
SUPPORTED_LEAVES = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)
_SIMPLE = (int, float, bool, str, type(None))


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """A pruning ratio must lie strictly between 0 and 1 (0 prunes nothing, 1 removes every weight)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < float(ratio) < 1:
        raise UserError(f"{name} must be strictly between 0 and 1 (the fraction to remove), got {ratio!r}")
    return float(ratio)


def check_unet(unet: nn.Module) -> None:
    """Only diffusers ``UNet2DConditionModel`` made of supported leaf layers can be pruned (LoRA/PEFT wrappers,
    quantised or custom layers would be pruned wrongly or not at all)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise UserError(f"unsupported module type {type(unet).__name__}: prune_unet takes a diffusers "
                        "UNet2DConditionModel (pipe.unet)")
    for name, module in unet.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if own and not isinstance(module, SUPPORTED_LEAVES):
            raise UserError(f"unsupported module type {type(module).__name__} at {name!r}: pruning handles "
                            f"{', '.join(t.__name__ for t in SUPPORTED_LEAVES)} (fuse or remove LoRA adapters first)")
        if isinstance(module, SUPPORTED_LEAVES) and type(module) not in SUPPORTED_LEAVES:
            raise UserError(f"unsupported module type {type(module).__name__} at {name!r} (a subclass of "
                            f"{type(module).__mro__[1].__name__}); fuse or remove LoRA adapters first")


def example_inputs(unet: nn.Module, batch: int = 1, tokens: int = 77, size: int | None = None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random UNet inputs: ``sample [B,C,h,w]``, ``timestep [B]``, ``encoder_hidden_states [B,tokens,D]``."""
    cfg = unet.config
    size = size or cfg.sample_size
    g = torch.Generator().manual_seed(seed)
    device, dtype = unet.device, unet.dtype
    return {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device, dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g).to(device, dtype),
    }


def unet_forward(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``unet(**inputs).sample`` (the function torch-pruning traces and MAC counting calls)."""
    return unet(**inputs).sample


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (torch-pruning's op counter)."""
    import torch_pruning as tp

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the counter prints batch-size notes
        macs, _ = tp.utils.count_ops_and_params(unet, inputs)
    return int(macs)


def simple_attributes(module: nn.Module) -> dict[str, Any]:
    """The module's own plain attributes (ints, floats, strings, tuples of them): channel counts, heads, scale."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE)
                                                                                   for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def fresh_like(unet: nn.Module) -> nn.Module:
    """The unpruned architecture of ``unet``'s config, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return type(unet).from_config(public_config(unet.config))


def public_config(config) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def attribute_changes(pruned: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module name, the plain attributes that differ from the unpruned architecture of the same config."""
    base = dict(fresh_like(pruned).named_modules())
    changes = {}
    for name, module in pruned.named_modules():
        ref = simple_attributes(base[name]) if name in base else {}
        diff = {k: v for k, v in simple_attributes(module).items()
                if k not in ref or not _same(ref[k], v)}
        if diff:
            changes[name] = diff
    return changes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def get_record(unet: nn.Module) -> dict[str, Any] | None:
    """The pruning record of a pruned UNet, or None for an unpruned one."""
    return dict(unet.config).get(RECORD_KEY)


def set_record(unet: nn.Module, record: dict[str, Any]) -> None:
    unet.register_to_config(**{RECORD_KEY: record})


def merged_record(unet: nn.Module, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The record after one more pruning step: earlier steps are kept in ``history``."""
    old = get_record(unet) or {}
    history = list(old.get("history", [])) + [{"method": method, **_jsonable(options)}]
    return {"version": 1, "history": history, "modules": old.get("modules", {}), "masked": old.get("masked", [])}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if isinstance(v, (*_SIMPLE, list, tuple, dict))}


def module_of(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root
