"""BK-SDM block removal (Kim et al. 2023): fewer residual+attention pairs per stage and/or no mid block.

The result is an ordinary diffusers ``UNet2DConditionModel`` built from a changed config (``layers_per_block``,
``mid_block_type: null``), initialised from the teacher: a stage keeps its first ``n`` down layers; an up stage
keeps its first ``n`` layers and its last one (which consumes the stage's input skip), as BK-SDM's
``copy_weight_from_teacher`` does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from rewardtune.errors import UserError
from rewardtune.prune.common import get_record, merged_record, public_config, set_record

if TYPE_CHECKING:
    from rewardtune.prune.registry import PruneContext

logger = logging.getLogger(__name__)


def _as_list(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def blocks_config(config: dict, layers_per_block: int | list[int] | None, mid_block: bool) -> dict:
    """The student's diffusers config: ``layers_per_block`` per down stage (default: one fewer where > 1)."""
    n = len(config["down_block_types"])
    old = _as_list(config["layers_per_block"], n)
    new = [max(1, k - 1) for k in old] if layers_per_block is None else _as_list(layers_per_block, n)
    if len(new) != n:
        raise UserError(f"layers_per_block needs {n} values (one per down stage), got {new}")
    for i, (k_old, k_new) in enumerate(zip(old, new)):
        if k_new < 1:
            raise UserError(f"layers_per_block[{i}] = {k_new} would remove a whole layer (stage {i} keeps no "
                            "residual block); use at least 1")
        if k_new > k_old:
            raise UserError(f"layers_per_block[{i}] = {k_new} exceeds the teacher's {k_old}; block removal can "
                            "only remove layers")
    out = dict(config, layers_per_block=new if len(set(new)) > 1 else new[0])
    if not mid_block:
        out["mid_block_type"] = None
    if new == old and (mid_block or config.get("mid_block_type") is None):
        raise UserError("this block plan removes nothing: lower layers_per_block or set mid_block=false")
    return out


def teacher_key(key: str, up_teacher: list[int], up_student: list[int]) -> str:
    """Student state-dict key -> teacher key: down stages and other modules map to themselves; in up stage ``i``
    the student's last layer takes the teacher's last (``up_*[i]`` = layers in up stage ``i``)."""
    m = re.match(r"(up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, j = int(m.group(2)), int(m.group(4))
        if j == up_student[i] - 1:
            j = up_teacher[i] - 1
        return f"up_blocks.{i}.{m.group(3)}.{j}.{m.group(5)}"
    return key


@dataclass
class BlocksOptions:
    """Options of ``blocks``: the BK-SDM plan (defaults give BK-SDM-Small)."""

    layers_per_block: int | list[int] | None = field(default=None, metadata={
        "help": "residual+attention pairs per down stage (one value or one per stage); default: one fewer where > 1"})
    mid_block: bool = field(default=False, metadata={"help": "keep the mid block (BK-SDM-Base) or remove it (Small)"})


def check_blocks_plan(unet: nn.Module, ratio: float, options: BlocksOptions) -> None:
    """Refuse a plan that removes nothing or a whole stage, and block removal after channel pruning."""
    if (get_record(unet) or {}).get("modules"):
        raise UserError("block removal must come before structured pruning (this UNet's channels are pruned)")
    blocks_config(public_config(unet.config), options.layers_per_block, options.mid_block)


def prune_blocks(unet: nn.Module, ratio: float, options: BlocksOptions, context: PruneContext) -> nn.Module:
    """A new, smaller UNet from the BK-SDM plan in ``options`` (``ratio`` is not used)."""
    config = public_config(unet.config)
    new_config = blocks_config(config, options.layers_per_block, options.mid_block)
    student = type(unet).from_config(new_config)
    if (unet.device, unet.dtype) != (student.device, student.dtype):
        student = student.to(device=unet.device, dtype=unet.dtype)
    n = len(config["down_block_types"])
    up_teacher = [k + 1 for k in reversed(_as_list(config["layers_per_block"], n))]
    up_student = [k + 1 for k in reversed(_as_list(new_config["layers_per_block"], n))]
    teacher_state = unet.state_dict()
    mapped = {k: teacher_state[teacher_key(k, up_teacher, up_student)] for k in student.state_dict()}
    student.load_state_dict(mapped)
    record = merged_record(unet, "blocks", {"layers_per_block": new_config["layers_per_block"],
                                            "mid_block": new_config.get("mid_block_type") is not None})
    set_record(student, record)
    logger.info("block removal: layers_per_block %s -> %s, mid block %s", config["layers_per_block"],
                new_config["layers_per_block"], "kept" if options.mid_block else "removed")
    return student


__all__ = ["prune_blocks", "BlocksOptions", "check_blocks_plan", "blocks_config", "teacher_key"]
