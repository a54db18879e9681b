"""Checkpoints of an online finetuning run and its final model.

A checkpoint is a folder ``output_dir/checkpoints/epoch_N`` (N = epochs completed) holding

* ``trainable.safetensors``: the trainable parameters by name (every UNet parameter for full finetuning, the LoRA
  matrices for LoRA), so the same code saves and restores both;
* ``state.pt``: optimizer state, the algorithm's ``state_dict()`` (DDPO's stat tracker), RNG states (python,
  numpy, torch) and ``epoch``; plain tensors and containers only, loadable with ``weights_only=True``.

Folders are written under a temporary name and renamed into place with ``os.replace``, so a crash never leaves a
half-written ``epoch_N``. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rewardtune.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^epoch_(\d+)$")


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that require grad, detached and on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``unet``; every trainable name must be present."""
    params = dict(unet.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"checkpoint does not match this model: {len(missing)} trainable parameters missing "
                        f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); was it written with "
                        "another model or lora_rank?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(epoch, folder)]`` under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("epoch_*") if (m := _NAME.match(p.name))
             and (p / "state.pt").is_file() and (p / "trainable.safetensors").is_file()]
    return sorted(found)


def save_checkpoint(output_dir: str | Path, epoch: int, unet, optimizer, algorithm, keep_last: int) -> Path:
    """Write ``checkpoints/epoch_{epoch}`` atomically, then delete all but the newest ``keep_last``."""
    from safetensors.torch import save_file

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"epoch_{epoch}", root / f".tmp_epoch_{epoch}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(unet), str(tmp / "trainable.safetensors"))
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "algorithm": algorithm.state_dict(),
                "rng": rng_state()}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the latest checkpoint of ``output_dir`` (None when there is none);
    a path -> that checkpoint folder, which must exist."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not ((path / "state.pt").is_file() and (path / "trainable.safetensors").is_file()):
        raise UserError(f"resume={resume!r} is not a checkpoint folder (state.pt and trainable.safetensors); use "
                        "resume=auto or a path like OUTPUT_DIR/checkpoints/epoch_N")
    return path


def load_checkpoint(folder: str | Path, unet, optimizer, algorithm) -> int:
    """Restore weights, optimizer, algorithm state and RNG states from ``folder``; returns the epochs done."""
    from safetensors.torch import load_file

    folder = Path(folder)
    load_trainable_state(unet, load_file(str(folder / "trainable.safetensors")))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    algorithm.load_state_dict(state["algorithm"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s (epoch %d)", folder, state["epoch"])
    return int(state["epoch"])


def save_final_model(pipe, unet, folder: str | Path, lora: bool) -> Path:
    """The trained model at ``folder``, written under a temporary name and renamed into place.

    Full finetuning: a diffusers pipeline folder (``pipe.save_pretrained``). LoRA: the adapter weights in the
    diffusers LoRA format, loadable with ``pipe.load_lora_weights(folder)`` on the base pipeline.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        metadata = unet.peft_config["default"].to_dict()
        type(pipe).save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    else:
        pipe.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
