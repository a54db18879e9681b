"""Save and load pruned UNets and pipelines without pickling modules.

A pruned UNet is written with ``save_pretrained``: ``config.json`` (its diffusers config plus the pruning record
under ``_rewardtune_pruning``) next to ``diffusion_pytorch_model.safetensors``.

* ``blocks`` and the mask methods change nothing a diffusers config cannot say: plain ``from_pretrained`` loads them.
* ``structured`` pruning changes channel counts, which no diffusers config expresses. The record lists the plain
  attributes that changed per module (channel counts, head dims, attention scale); :func:`load_pruned_unet` builds
  the config's architecture on the meta device, sets those attributes, shapes every parameter as the safetensors
  file says, and loads the weights. The record survives ``save_pretrained``, so a finetuned pruned UNet saved by
  ``rewardtune finetune`` loads the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from rewardtune.errors import UserError
from rewardtune.prune.common import RECORD_KEY

logger = logging.getLogger(__name__)


def pruning_record_of_folder(unet_folder: str | Path) -> dict | None:
    """The pruning record in ``unet_folder/config.json`` (None if absent or the folder has no config)."""
    path = Path(unet_folder) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(RECORD_KEY)


def needs_rebuild(unet_folder: str | Path) -> bool:
    """True when the UNet in ``unet_folder`` has pruned channels (plain ``from_pretrained`` cannot load it)."""
    record = pruning_record_of_folder(unet_folder)
    return bool(record and record.get("modules"))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"pruned UNet folder {str(folder)!r} has no .safetensors weights")
    state = {}
    for file in files:
        state.update({k: v.clone() for k, v in load_file(file).items()})  # own, aligned memory
    return state


def _set_attributes(unet: nn.Module, modules: dict[str, dict], folder: Path) -> None:
    names = dict(unet.named_modules())
    for name, attrs in modules.items():
        if name not in names:
            raise UserError(f"pruned UNet {str(folder)!r} does not match its config: no module {name!r}")
        for key, value in attrs.items():
            current = getattr(names[name], key, None)
            setattr(
                names[name], key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
            )


def _shape_parameters(unet: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Give every (meta) parameter/buffer of ``unet`` the shape its tensor has in ``state``."""
    expected = set(unet.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"pruned UNet {str(folder)!r} does not match its config: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}")
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        module = unet.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(torch.empty(tensor.shape, device="meta", dtype=tensor.dtype))
        else:
            module._buffers[leaf] = torch.empty(tensor.shape, device="meta", dtype=tensor.dtype)


def load_pruned_unet(unet_folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a structurally pruned ``UNet2DConditionModel`` from its folder (see the module docstring)."""
    from diffusers import UNet2DConditionModel

    folder = Path(unet_folder)
    config = json.loads((folder / "config.json").read_text())
    record = config.get(RECORD_KEY) or {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    _set_attributes(unet, record.get("modules", {}), folder)
    state = _read_weights(folder)
    _shape_parameters(unet, state, folder)
    unet.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if leftover:
        raise UserError(f"pruned UNet {str(folder)!r}: no weights for {leftover[:3]}")
    return (unet if unet.dtype == dtype else unet.to(dtype)).eval()


def load_unet_if_pruned(unet_folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """The UNet loader that ``rewardtune.diffusion.loading.load_pipeline`` runs on a UNet folder whose config
    carries the pruning record (``UNET_LOADER_HOOKS`` in rewardtune.models_table): the rebuilt UNet when it has
    pruned channels, else None (plain ``from_pretrained`` loads block-removed and masked UNets)."""
    return load_pruned_unet(unet_folder, dtype) if needs_rebuild(unet_folder) else None


def check_unet_fits(pipe, unet: nn.Module | None = None) -> None:
    """Refuse a UNet whose inputs or outputs do not match the pipeline's VAE latents or text-encoder states."""
    unet = unet if unet is not None else pipe.unet
    text_dim = pipe.text_encoder.config.hidden_size
    latent = pipe.vae.config.latent_channels
    cfg = unet.config
    if cfg.cross_attention_dim != text_dim:
        raise UserError(f"the UNet does not fit this pipeline: it attends to {cfg.cross_attention_dim}-wide text "
                        f"states but the text encoder gives {text_dim}; use the pipeline it was pruned from")
    if cfg.in_channels != latent or cfg.out_channels != latent:
        raise UserError(f"the UNet does not fit this pipeline: it takes {cfg.in_channels} latent channels, the "
                        f"VAE has {latent}; use the pipeline it was pruned from")


def check_pruned_fits(pipe) -> None:
    """:func:`check_unet_fits` for a pipeline whose UNet carries a pruning record (others are left alone)."""
    if dict(pipe.unet.config).get(RECORD_KEY) is not None:
        check_unet_fits(pipe)


def save_pruned_pipeline(pipe, unet: nn.Module, folder: str | Path) -> Path:
    """Write ``pipe`` with ``unet`` in place of its UNet as a diffusers pipeline folder ``load_pipeline`` reads."""
    check_unet_fits(pipe, unet)
    original = pipe.unet
    pipe.unet = unet
    try:
        pipe.save_pretrained(folder)
    finally:
        pipe.unet = original
    return Path(folder)


__all__ = ["load_pruned_unet", "needs_rebuild", "check_unet_fits", "save_pruned_pipeline",
           "pruning_record_of_folder", "check_pruned_fits", "load_unet_if_pruned"]
