"""2:4 semi-structured sparsity of ``nn.Linear`` weights (NVIDIA sparse tensor cores; research/pruning.md section 4).

In every run of 4 consecutive weights along a row's input dimension the 2 of least ``|w|`` are zeroed (50 %).
With ``accelerate: true`` the weights are then converted by ``torch.sparse.to_sparse_semi_structured`` so the
matmuls run on sparse kernels: this needs a CUDA GPU of compute capability >= 8.0 and fp16/bf16 weights, and is
checked before anything is done. ``accelerate: false`` keeps the 2:4 zeros in dense tensors (a mask like
``magnitude``: quality is measurable anywhere, no speed-up; and the form a pruned UNet is saved in). Linear layers
are 34 % of SD 1.x's MACs (convolutions are untouched), so the sampling gain is bounded well below 2x.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from rewardtune.config import require
from rewardtune.errors import UserError
from rewardtune.prune.masks import finish_masked

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)


@dataclass
class SemiStructuredOptions:
    """Options of ``semi_structured`` (the ratio is fixed at 0.5 by the 2:4 pattern and not used)."""

    accelerate: bool = field(default=False, metadata={
        "help": "convert to sparse semi-structured tensors (CUDA, compute capability >= 8.0, fp16/bf16)"})
    min_features: int = field(default=64, metadata={
        "help": "Linear layers with fewer input or output features stay dense (kernel minimum shapes)"})

    def __post_init__(self) -> None:
        require(self.min_features >= 4, "min_features", "at least 4", self.min_features)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> bool mask keeping the 2 largest ``|w|`` of every 4 consecutive inputs (``in % 4 == 0``)."""
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def semi_structured_support(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None if 2:4 kernels can run on ``device`` with ``dtype``, else the reason (one line)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (f"2:4 semi-structured kernels need a CUDA GPU of compute capability >= 8.0; this UNet is on "
                f"{device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"2:4 semi-structured kernels need compute capability >= 8.0; this GPU has {major}.{minor}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 semi-structured kernels need fp16 or bf16 weights; this UNet is {dtype}"
    return None


def eligible_linears(unet: nn.Module, options: SemiStructuredOptions) -> dict[str, nn.Linear]:
    """Linear layers with both sides >= ``min_features`` and multiples of 4 (of 64 with ``accelerate``: the
    sparse kernels' shape constraint)."""
    multiple = 64 if options.accelerate else 4
    return {n: m for n, m in unet.named_modules() if type(m) is nn.Linear
            and min(m.in_features, m.out_features) >= options.min_features and m.in_features % multiple == 0
            and m.out_features % multiple == 0}


def check_semi_structured_plan(unet: nn.Module, ratio: float, options: SemiStructuredOptions) -> None:
    """With ``accelerate``, refuse a device or dtype the kernels do not support (a clear one-line message)."""
    if options.accelerate:
        reason = semi_structured_support(unet.device, unet.dtype)
        if reason:
            raise UserError(f"{reason}; set options.accelerate=false for the 2:4 zeros in dense tensors (quality "
                            "only, no speed-up)")
    if not eligible_linears(unet, options):
        raise UserError(f"no Linear layer of this UNet has >= {options.min_features} input and output features "
                        f"(multiples of {64 if options.accelerate else 4}); lower options.min_features")


def prune_semi_structured(unet: nn.Module, ratio: float, options: SemiStructuredOptions,
                          context: PruneContext) -> nn.Module:
    """A copy of ``unet`` with 2:4 zeros in its eligible Linear weights (converted to sparse kernels with
    ``accelerate``)."""
    model = copy.deepcopy(unet)
    layers = eligible_linears(model, options)
    masks = {n: two_four_mask(m.weight) for n, m in layers.items()}
    model = finish_masked(model, unet, masks, "semi_structured", {"accelerate": options.accelerate})
    if options.accelerate:
        from torch.sparse import to_sparse_semi_structured

        for layer in layers.values():
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    logger.info("2:4 sparsity on %d Linear layers (%s)", len(layers), "sparse kernels" if options.accelerate
                else "dense zeros")
    return model


__all__ = ["SemiStructuredOptions", "prune_semi_structured", "two_four_mask", "semi_structured_support",
           "check_semi_structured_plan", "eligible_linears"]
