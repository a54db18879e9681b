"""The one differentiable CLIP-style image preprocessing (torch ops only, ``[B,3,H,W]`` in [0,1]).

    pixels = clip_pixels(images, 224)                                  # shortest side + centre crop, OpenAI mean/std
    pixels = clip_pixels(images, 224, fit="longest")                   # HPSv2: longest side + zero padding
    pixels = clip_pixels(images, 64, mode="bilinear", rounding="round", mean=None)   # perceptual features

Every caller (the CLIP-family rewards, ``CLIPImageProcessor`` configs, the perceptual feature extractors) goes
through :func:`clip_pixels`, so resize, crop, padding and normalisation are written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FITS = ("shortest", "longest", "squash", "none")
MODES = ("bicubic", "bilinear", "nearest-exact")


def normalize(images: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """``(images - mean) / std`` per channel of ``[B,3,H,W]``."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[..., H, W] -> [..., height, width]``: top/left offsets ``(H - height) // 2``; zero-pads first when the
    image is smaller than the crop (transformers' ``center_crop`` rules)."""
    h, w = images.shape[-2:]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top:top + height, left:left + width]


def shortest_side_size(height: int, width: int, size: int, rounding: str = "floor") -> tuple[int, int]:
    """``(h, w)`` with the shorter side scaled to ``size``. ``floor``: the longer side is truncated
    (``int(size * long / short)``, as transformers and torchvision); ``round``: rounded, at least ``size``."""
    if rounding == "round":
        scale = size / min(height, width)
        return max(size, round(height * scale)), max(size, round(width * scale))
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(size) == tuple(images.shape[-2:]):
        return images
    extra = {"antialias": True, "align_corners": False} if mode != "nearest-exact" else {}
    return F.interpolate(images, size=tuple(size), mode=mode, **extra)


def clip_pixels(images: torch.Tensor, size: int | tuple[int, int], *, fit: str = "shortest",
                crop: int | tuple[int, int] | bool | None = None, mode: str = "bicubic", rounding: str = "floor",
                scale: float = 1.0, mean: tuple[float, ...] | None = OPENAI_MEAN,
                std: tuple[float, ...] | None = OPENAI_STD) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] -> model input ``[B,3,S,S]`` (or the crop size): ``normalize(crop(resize(scale * x)))``,
    differentiable (no rounding or clamping). Interpolation is antialiased (``bicubic``/``bilinear``, a = -0.5 as
    PIL and torchvision) and skipped when the size does not change.

    Args:
        size: the target side ``S``; with ``fit="squash"`` also ``(h, w)``.
        fit: ``shortest``: shorter side to ``S`` (longer side by ``rounding``), then centre crop to ``crop``
            (None: ``S x S``; False: none; zero-padded if larger than the image), as CLIP ``Resize + CenterCrop``;
            ``longest``: longer side to ``S`` (rounded), then zero padding to ``S x S``, evenly, before
            normalisation (HPSv2's ``ResizeMaxSize(fill=0)``); ``squash``: resize to ``S x S`` ignoring the aspect
            ratio; ``none``: no resize. Other fits crop only when ``crop`` is a size.
        mode: ``bicubic``, ``bilinear`` or ``nearest-exact``. rounding: ``floor`` or ``round`` (see
            :func:`shortest_side_size`).
        scale: multiplier applied first (``255 * rescale_factor`` of a processor config; 1 for CLIP).
        mean, std: per-channel normalisation; None leaves the values unnormalised.
    """
    if fit not in FITS or mode not in MODES or rounding not in ("floor", "round"):
        raise ValueError(f"clip_pixels: fit={fit!r}, mode={mode!r}, rounding={rounding!r}; expected fit in {FITS}, "
                         f"mode in {MODES}, rounding floor or round")
    x = images * scale if scale != 1.0 else images
    h, w = x.shape[-2:]
    if fit == "shortest":
        x = _resize(x, shortest_side_size(h, w, int(size), rounding), mode)
        crop = size if crop is None else crop
    elif fit == "longest":
        factor = size / max(h, w)
        nh, nw = round(h * factor), round(w * factor)
        x = _resize(x, (nh, nw), mode)
        pad_h, pad_w = size - nh, size - nw
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    elif fit == "squash":
        x = _resize(x, (size, size) if isinstance(size, int) else size, mode)
    if crop is not None and crop is not False:
        x = center_crop(x, *((crop, crop) if isinstance(crop, int) else crop))
    return normalize(x, mean, std) if mean is not None else x


__all__ = ["OPENAI_MEAN", "OPENAI_STD", "clip_pixels", "normalize", "center_crop", "shortest_side_size"]
