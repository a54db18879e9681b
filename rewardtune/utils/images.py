"""Image tensors <-> PNG files and grids. Tensors are float ``[3,H,W]`` / ``[N,3,H,W]`` in [0,1]."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewardtune.utils.io import atomic_path


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3,H,W]`` in [0,1] -> RGB PIL image (rounded to uint8)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (no half-written file is ever visible at ``path``)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


def make_grid(images: torch.Tensor | Sequence[torch.Tensor | Image.Image], ncol: int | None = None,
              min_tile: int = 96, pad: int = 2) -> Image.Image:
    """Tile ``[N,3,H,W]`` (or a list of ``[3,H,W]`` tensors or PIL images of one size) into one image; small
    images are enlarged (nearest) to at least ``min_tile`` pixels."""
    tiles = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    n, (w, h) = len(tiles), tiles[0].size
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    canvas = Image.new("RGB", (ncol * (tw + pad) + pad, nrow * (th + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        corner = (pad + (i % ncol) * (tw + pad), pad + (i // ncol) * (th + pad))
        canvas.paste(tile.resize((tw, th), Image.NEAREST), corner)
    return canvas


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | Path) -> torch.Tensor:
    """Read one image file of any mode (L, LA, P, RGBA, I;16, ...) as RGB ``[3,H,W]`` in [0,1].

    Transparent pixels are composited on white; 16-bit images are scaled by 1/65535.

    Raises:
        UserError: the file is missing, truncated, not an image, or claims a size past PIL's decompression-bomb
            limit (``Image.MAX_IMAGE_PIXELS``).
    """
    from rewardtune.errors import UserError

    try:
        with Image.open(path) as im:
            im.load()
            array = _as_rgb_array(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {str(path)!r}: {exc}") from None  # bombs: huge claimed sizes
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).clamp(0, 1)


def load_images(paths: list[str | Path]) -> torch.Tensor:
    """Stack same-sized image files into ``[N,3,H,W]`` in [0,1] (see :func:`load_image`)."""
    from rewardtune.errors import UserError

    tensors = [load_image(p) for p in paths]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise UserError(f"images have different sizes {sorted(shapes)}")
    return torch.stack(tensors) if tensors else torch.zeros(0, 3, 1, 1)


def _as_rgb_array(im: Image.Image) -> np.ndarray:
    """``[H,W,3]`` float32 in [0,1] from a PIL image of any mode."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(im, dtype=np.float32)
        array = array / (65535.0 if array.max() > 255 or im.mode.startswith("I;16") else 255.0)
        return np.repeat(array[..., None], 3, axis=2)
    if im.mode == "F":
        return np.repeat(np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
