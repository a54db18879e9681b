"""Device and dtype strings from the command line or a config, checked before any model is loaded (torch only:
no diffusers import, so ``score`` and ``finetune`` can check them first)."""

from __future__ import annotations

import torch

from rewardtune.errors import UserError

_VALID = "cpu, cuda, cuda:N, mps"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A name in :data:`DTYPES` (or a ``torch.dtype``) -> ``torch.dtype``; one line listing the names otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(text: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` -> ``torch.device``, only if this machine has it.

    Raises:
        UserError: an unparsable or unsupported device, or one this machine lacks (one line with the fix).
    """
    try:
        device = torch.device(str(text).strip())
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device {text!r}; use one of: {_VALID}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        _check_cuda(text, device)
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {text!r} requested but MPS is not available on this machine; use --device cpu")
    else:
        raise UserError(f"unsupported device {text!r}; use one of: {_VALID}")
    return device


def _check_cuda(text: str, device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise UserError(f"device {text!r} requested but CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"device {text!r} requested but this machine has {count} CUDA device"
                        f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}); choose one of those or cpu")


__all__ = ["DTYPES", "resolve_device", "to_dtype"]
