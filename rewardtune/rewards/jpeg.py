"""JPEG (in)compressibility (DDPO): the JPEG size in kB at quality 95 of the uint8-rounded image, negated for
compressibility. Not differentiable."""

from __future__ import annotations

import io

import torch
from PIL import Image

from rewardtune.rewards.base import Reward


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] -> ``[B]`` JPEG file sizes in kB (1 kB = 1000 bytes, as DDPO)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSize(Reward):
    def __init__(self, sign: float, quality: int = 95) -> None:
        super().__init__()
        self.sign, self.quality = sign, quality

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_kilobytes(images, self.quality).to(images.device)


def jpeg_compressibility(quality: int = 95, device: str = "cpu", dtype: str = "float32") -> Reward:
    return JpegSize(-1.0, quality)


def jpeg_incompressibility(quality: int = 95, device: str = "cpu", dtype: str = "float32") -> Reward:
    return JpegSize(1.0, quality)
