"""Differentiable image preprocessing shared by the CLIP-family rewards (torch ops only, ``[B,3,H,W]`` in [0,1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def resize_longest_and_pad(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Scale so the longest side is ``size`` (bicubic, antialiased), then zero-pad evenly to a square (HPSv2's
    ``ResizeMaxSize(fill=0)``; padding happens before normalisation)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def resize_shortest_and_center_crop(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Scale so the shortest side is ``size`` (bicubic, antialiased), then centre-crop ``size x size`` (the
    ``CLIPImageProcessor`` / torchvision ``Resize + CenterCrop`` pipeline; like them, the long side is truncated)."""
    h, w = images.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top:top + size, left:left + size]
