"""BK-SDM block removal (Kim et al. 2023): fewer residual+attention pairs per stage and/or no mid block.

The result is an ordinary diffusers ``UNet2DConditionModel`` built from a changed config (``layers_per_block``,
``mid_block_type: null``), initialised from the teacher: a stage keeps its first ``n`` down layers; an up stage
keeps its first ``n`` layers and its last one (which consumes the stage's input skip), as BK-SDM's
``copy_weight_from_teacher`` does.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from rewardtune.errors import UserError
from rewardtune.prune.common import check_unet, get_record, merged_record, public_config, set_record

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


def prune_blocks(unet: nn.Module, ratio: float | None = None, example_inputs=None, *,
                 layers_per_block: int | list[int] | None = None, mid_block: bool = False, **_) -> nn.Module:
    """A new, smaller UNet from a BK-SDM plan. ``ratio`` is not used (the plan is given by the options).

    Defaults give BK-SDM-Small: one layer fewer per stage where a stage has more than one, and no mid block.
    """
    check_unet(unet)
    old = get_record(unet) or {}
    if old.get("modules"):
        raise UserError("block removal must come before structured pruning (this UNet's channels are pruned)")
    config = public_config(unet.config)
    new_config = blocks_config(config, layers_per_block, mid_block)
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
                new_config["layers_per_block"], "kept" if mid_block else "removed")
    return student


__all__ = ["prune_blocks", "blocks_config", "teacher_key"]
