"""Fully sharded data parallel training (torch's FSDP2, ``fully_shard``) for full finetuning of denoisers too large
for a data-parallel replica per device (an SD3.5 transformer with AdamW states).

Each process holds ``1/P`` of every parameter, gradient and optimizer state (``DTensor`` shards on dim 0); a
sharded unit's full parameters are all-gathered for its forward and backward and freed after, and gradients are
reduce-scattered (averaged over processes, as DDP's all-reduce is). The units are the denoiser's blocks
(:meth:`rewardtune.diffusion.backbones.Backbone.shard_units`) and then the whole model.

Checkpoints stay sharded: ``torch.distributed.checkpoint`` writes one file per process plus ``.metadata``
(:func:`save_sharded`) and reads them back into a model sharded the same way or over another process count
(:func:`load_sharded`). The final model is gathered once (:func:`full_state_dict`) into the plain diffusers format.
Every function here is collective: all processes must call it.

torch supports FSDP2 on the CPU with the ``gloo`` backend, which is how the tests run it (two processes).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def fsdp_requested(accelerator, flag: bool = False) -> bool:
    """Whether this run shards: ``flag`` (the config's ``fsdp``) or an accelerate launch with an FSDP config
    (``distributed_type: FSDP``, which accelerate announces as ``ACCELERATE_USE_FSDP=true``; on CPUs accelerate
    itself ignores it and runs plain multi-CPU data parallelism)."""
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    typed = str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")
    return flag or launched or typed


def shard(model: nn.Module, units: list[nn.Module], reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place: each unit of ``units`` (its blocks) and then the model itself (the parameters no
    unit holds). Returns ``model``, now an FSDP module whose parameters are ``DTensor`` shards. Build the optimizer
    after this call: it must hold the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write the model's (and the optimizer's) shards to ``folder`` (one ``.distcp`` file per process and
    ``.metadata``). ``folder`` should be a temporary name that the caller renames once every process returns."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    dcp.save(_state(model, optimizer), checkpoint_id=str(folder))
    return folder


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read shards written by :func:`save_sharded` into the sharded ``model`` (and ``optimizer``) in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) parameters and buffers on the CPU, on process 0 (other processes get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_`` of sharded parameters returns a ``DTensor``: its full value (a plain tensor as is)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


__all__ = ["fsdp_requested", "shard", "is_sharded", "save_sharded", "load_sharded", "full_state_dict",
           "full_grad_norm"]
