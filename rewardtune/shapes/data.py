"""Training data of the shapes world: rendered images with freshly drawn captions every time they are used."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rewardtune.shapes.captions import caption, parse_prompt
from rewardtune.shapes.oracle import images_from_uint8
from rewardtune.shapes.world import Scene, render, sample_scenes


@dataclass
class ShapesData:
    """``images``: float ``[N,3,32,32]`` in [0,1]; ``scenes``: the N scenes they show (train combos only)."""

    images: torch.Tensor
    scenes: list[Scene]

    @classmethod
    def generate(cls, n: int, seed: int, split: str = "train", chunk: int = 4096) -> "ShapesData":
        scenes = sample_scenes(n, seed=seed, split=split)
        arrays = [render(scenes[i:i + chunk], seed=seed + i) for i in range(0, n, chunk)]
        return cls(images=images_from_uint8(np.concatenate(arrays)).contiguous(), scenes=scenes)

    def captions(self, index: np.ndarray, rng: np.random.Generator, drop_prob: float = 0.0) -> list[str]:
        """A fresh random caption for each selected image; ``""`` with ``drop_prob`` (classifier-free guidance)."""
        return ["" if rng.random() < drop_prob else caption(self.scenes[i], rng) for i in index]


def caption_match_matrix(scenes: list[Scene], captions: list[str]) -> torch.Tensor:
    """``[B,B]`` bool: ``m[i, j]`` is True when image i shows everything caption j names (multi-positive CLIP)."""
    named = [parse_prompt(c) for c in captions]
    scene_attrs = [dict(color=s.color, shape=s.shape, size=s.size, position=s.position, background=s.background)
                   for s in scenes]
    return torch.tensor([[all(a.get(k) == v for k, v in n.items()) for n in named] for a in scene_attrs])
