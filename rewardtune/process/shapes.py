"""Outcomes read by the shapes world's gold oracle (:mod:`rewardtune.shapes.oracle`), for decisive steps: which
colour, shape, size, position and background an image shows, as integer codes.

Codes index :data:`VOCABULARY` ``[attribute]``; ``-1`` is "no object" (the oracle sees none; the background is
always read) and ``-2`` "not named" (in a prompt). Evaluation only: the gold oracle is never a training signal.
"""

from __future__ import annotations

import torch

from rewardtune.process.decisive import Outcome

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background")
NO_OBJECT, NOT_NAMED = -1, -2


def vocabulary() -> dict[str, tuple[str, ...]]:
    """The values of each attribute, in code order."""
    from rewardtune.shapes.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

    return {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": POSITIONS,
            "background": tuple(BACKGROUNDS)}


def _codes(values: list[list[str | None]], missing: int) -> torch.Tensor:
    """``[M,5]`` codes of per-attribute value lists (``values[a][m]``)."""
    vocab = vocabulary()
    return torch.tensor([[missing if v is None else vocab[a].index(v) for v in column]
                         for a, column in zip(ATTRIBUTES, values)], dtype=torch.long).T.reshape(-1, len(ATTRIBUTES))


def read_attribute_codes(images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """The oracle's reading of ``images [M,3,H,W]`` in [0,1]: ``[M,5]`` codes (``prompts`` unused; the signature
    of a score function)."""
    from rewardtune.shapes.oracle import read_images

    reading = read_images(images)
    return _codes([getattr(reading, a) for a in ATTRIBUTES], NO_OBJECT)


def prompted_codes(prompts: list[str]) -> torch.Tensor:
    """``[B,5]`` codes of the attributes each prompt names (:func:`rewardtune.shapes.captions.parse_prompt`),
    ``-2`` where it names none."""
    from rewardtune.shapes.captions import parse_prompt

    asked = [parse_prompt(p) for p in prompts]
    return _codes([[a.get(attr) for a in asked] for attr in ATTRIBUTES], NOT_NAMED)


def oracle_outcome(attribute: str, target: str = "prompt") -> Outcome:
    """"The oracle reads ``attribute`` as the target": the prompted value (``target="prompt"``; never met where
    the prompt does not name it), or the value of the trajectory's own final image (``target="final"``: when is
    the attribute the image ends with decided?)."""
    from rewardtune.errors import UserError

    if attribute not in ATTRIBUTES:
        raise UserError(f"unknown attribute {attribute!r}; choose one of: {', '.join(ATTRIBUTES)}")
    if target not in ("prompt", "final"):
        raise UserError(f"unknown outcome target {target!r}; choose prompt or final")
    a = ATTRIBUTES.index(attribute)

    def reference(final: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return prompted_codes(prompts)[:, a] if target == "prompt" else final[:, a]

    def judge(readings: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return ((readings[..., a] == ref[:, None]) & (ref[:, None] != NOT_NAMED)).float()

    return Outcome(read=read_attribute_codes, reference=reference, judge=judge)


__all__ = ["ATTRIBUTES", "NOT_NAMED", "NO_OBJECT", "oracle_outcome", "prompted_codes", "read_attribute_codes",
           "vocabulary"]
