"""The oracle: reads a generated image back and gives the shapes world's **gold** scores.

Read-back (all vectorised over the batch, images ``[B,3,H,W]`` in [0,1], resized to 32x32):

* background colour = median of the border pixels; distance ``d`` of every pixel to it;
* object contrast ``c`` = 98th percentile of ``d``; the object mask is ``d > c/2``; no object when ``c < 0.12``;
* object colour = mean of the core pixels (``d > 3c/4``) -> nearest palette hue; background -> nearest of
  white/black/gray/cream by chroma and luminance;
* shape from moments of the soft coverage (vertical skewness: triangles; diagonal vs axis kurtosis: squares vs
  circles), size from the soft extent, position from the centroid on a 3x3 grid.

Gold scores, never used for training:

* ``fidelity`` in [0,1]: the fraction of attributes **named in the prompt** that the image shows (0 with no
  object).
* ``taste`` in [0,1], the hidden rule that plays the role of human preference. It is the mean of
  - *contrast*: luminance difference between object and background, ``min(|dL| / 0.45, 1)``;
  - *crispness*: clean edges, ``clip(1 - (edge_ratio - 1.1) / 1.6, 0, 1)`` where ``edge_ratio`` is the number
    of half-covered pixels (``0.2 < alpha < 0.8``) per pixel of mask perimeter (~1 crisp, ~3 blurry);
  - *presence*: a bold subject, ``min(extent / 8, 1)`` with ``extent`` the object's half width in pixels (small
    objects ~0.56, medium ~0.81, large 1). It pulls against prompts that ask for small objects, the way human
    taste can pull against prompt fidelity.

  Grain is not part of taste: the VAE of ``shapes-tiny`` cannot reproduce it, so it would not vary in samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.shapes.captions import parse_prompt
from rewardtune.shapes.world import BACKGROUNDS, COLORS, COLUMNS, IMAGE_SIZE, ROWS, SHAPES, SIZES

_MIN_CONTRAST = 0.12
_TRIANGLE_SKEW = -0.15  # vertical skewness below this: triangle (renders: < -0.39; circles, squares: > -0.04)
_SQUARE_KURTOSIS = 0.28  # diagonal-minus-axis kurtosis above this: square (renders: > 0.48; circles: < 0.09)
_SIZE_EDGES = (5.3, 7.3)  # half extent in pixels: small | medium | large
_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass
class Reading:
    """What the oracle sees in a batch of B images (lists of length B; None where there is no object)."""

    color: list[str | None]
    shape: list[str | None]
    size: list[str | None]
    position: list[str | None]
    background: list[str]
    contrast: torch.Tensor  # [B] luminance contrast score in [0,1]
    crispness: torch.Tensor  # [B]
    presence: torch.Tensor  # [B]

    def attributes(self, i: int) -> dict[str, str | None]:
        return {k: getattr(self, k)[i] for k in ("color", "shape", "size", "position", "background")}


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees of ``[..., 3]`` RGB."""
    r, g, b = rgb.unbind(-1)
    mx, _ = rgb.max(-1)
    mn, _ = rgb.min(-1)
    delta = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / delta) % 6, torch.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return h * 60.0


_PALETTE_HUES = _hue(torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255.0)  # [6]


def _to_32(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return images


def read_images(images: torch.Tensor) -> Reading:
    """Read colour, shape, size, position, background and taste factors from ``images [B,3,H,W]`` in [0,1]."""
    x = _to_32(images)
    b = x.shape[0]
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)  # [B,3,P]
    bg = border.median(dim=2).values  # [B,3]
    dist = (_smooth(x) - bg[:, :, None, None]).norm(dim=1)  # [B,H,W], lightly smoothed against grain
    contrast_level = torch.quantile(dist.flatten(1), 0.98, dim=1)  # [B]
    has_object = contrast_level >= _MIN_CONTRAST
    level = contrast_level.clamp_min(1e-6)[:, None, None]
    mask = dist > level / 2
    core = (dist > 0.75 * level).float()
    obj = (x * core[:, None]).sum((2, 3)) / core.sum((1, 2)).clamp_min(1)[:, None]  # [B,3]

    hue_gap = (_hue(obj)[:, None] - _PALETTE_HUES[None]).abs()
    hue_gap = torch.minimum(hue_gap, 360 - hue_gap)
    colors = [list(COLORS)[i] for i in hue_gap.argmin(1).tolist()]
    shapes, sizes, positions, extent = _geometry(mask, (dist / level).clamp(0, 1))
    none_if_absent = lambda values: [v if ok else None for v, ok in zip(values, has_object.tolist())]  # noqa: E731

    luma_gap = ((obj - bg) * _LUMA).sum(1).abs()
    alpha = dist / level
    half_covered = ((alpha > 0.2) & (alpha < 0.8)).float().sum((1, 2))
    edge_ratio = half_covered / _perimeter(mask).clamp_min(1)
    return Reading(
        color=none_if_absent(colors), shape=none_if_absent(shapes), size=none_if_absent(sizes),
        position=none_if_absent(positions), background=_background_names(bg),
        contrast=torch.where(has_object, (luma_gap / 0.45).clamp(0, 1), torch.zeros(b)),
        crispness=torch.where(has_object, (1 - (edge_ratio - 1.1) / 1.6).clamp(0, 1), torch.zeros(b)),
        presence=torch.where(has_object, (extent / 8).clamp(0, 1), torch.zeros(b)),
    )


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """Separable [1,2,1]/4 blur with edge replication: cuts pixel noise ~2.7x, keeps half-contrast contours."""
    k = torch.tensor([0.25, 0.5, 0.25])
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1).repeat(c, 1, 1, 1), groups=c)


def _geometry(mask: torch.Tensor, alpha: torch.Tensor) -> tuple[list[str], list[str], list[str], torch.Tensor]:
    """Shape, size and position names and the half extent ``[B]`` from masks and soft coverage ``[B,H,W]``.

    Shape from moments of the soft coverage near the mask, which survive blur and pixel quantisation:
    an upright triangle's mass is skewed towards its base (vertical skewness ~ -0.5, ~0 for the others); a square's
    mass has a higher kurtosis along the diagonals than along the axes (uniform vs triangular profiles: ~+0.55),
    a circle's is isotropic (~0). Size from the soft width (sum over columns of each column's peak coverage).
    """
    b, h, w = mask.shape
    alpha = alpha * F.max_pool2d(mask.float()[:, None], 3, 1, 1)[:, 0]
    area = alpha.sum((1, 2)).clamp_min(1e-6)
    ys = (torch.arange(h).float() + 0.5)[None, :, None]
    xs = (torch.arange(w).float() + 0.5)[None, None, :]
    cy, cx = (alpha * ys).sum((1, 2)) / area, (alpha * xs).sum((1, 2)) / area
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]

    def moment(u: torch.Tensor, k: int) -> torch.Tensor:
        return (alpha * u**k).sum((1, 2)) / area

    def kurtosis(u: torch.Tensor) -> torch.Tensor:
        return moment(u, 4) / moment(u, 2).clamp_min(1e-6) ** 2

    skew_y = moment(dy, 3) / moment(dy, 2).clamp_min(1e-6) ** 1.5
    diagonal_excess = (kurtosis((dx + dy) / 2**0.5) + kurtosis((dx - dy) / 2**0.5) - kurtosis(dx) - kurtosis(dy)) / 2
    is_triangle = skew_y < _TRIANGLE_SKEW
    shape_idx = torch.where(is_triangle, 2, torch.where(diagonal_excess > _SQUARE_KURTOSIS, 1, 0))
    width, height = alpha.amax(1).sum(1).clamp_min(1), alpha.amax(2).sum(1).clamp_min(1)
    extent = torch.maximum(width, height) / 2
    size_idx = torch.bucketize(extent, torch.tensor(_SIZE_EDGES))
    rows_any = mask.any(2)
    top = torch.where(rows_any, ys[0, :, 0], torch.full((h,), float(h))).min(1).values
    bottom = torch.where(rows_any, ys[0, :, 0], torch.full((h,), -1.0)).max(1).values
    cy = torch.where(is_triangle, (top + bottom) / 2, cy)  # a triangle's centroid sits below its box centre
    row_idx = torch.bucketize(cy, torch.tensor([12.25, 19.75]))
    col_idx = torch.bucketize(cx, torch.tensor([12.25, 19.75]))
    size_names, row_names, col_names = list(SIZES), list(ROWS), list(COLUMNS)
    return (
        [SHAPES[i] for i in shape_idx.tolist()],
        [size_names[i] for i in size_idx.tolist()],
        [f"{row_names[r]} {col_names[c]}" for r, c in zip(row_idx.tolist(), col_idx.tolist())],
        extent,
    )


def _perimeter(mask: torch.Tensor) -> torch.Tensor:
    """Number of mask pixels with a 4-neighbour outside the mask. ``[B,H,W] -> [B]``."""
    m = mask.float()[:, None]
    eroded = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=1.0), 3, 1)  # 3x3 erosion (square)
    return (m - eroded).clamp_min(0).sum((1, 2, 3))


def _background_names(bg: torch.Tensor) -> list[str]:
    chroma = bg[:, 0] - bg[:, 2]
    luma = (bg * _LUMA).sum(1)
    names = []
    for c, lum in zip(chroma.tolist(), luma.tolist()):
        if c > 0.09 and lum > 0.45:
            names.append("cream")
        else:
            names.append("black" if lum < 0.3 else "gray" if lum < 0.66 else "white")
    return names


def gold_scores(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Gold ``fidelity``, ``taste`` and their mean ``gold`` for ``images [B,3,H,W]`` in [0,1]. Each ``[B]``."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    reading = read_images(images)
    fidelity = []
    for i, prompt in enumerate(prompts):
        asked = parse_prompt(prompt)
        seen = reading.attributes(i)
        if not asked or seen["color"] is None:
            fidelity.append(0.0)
            continue
        fidelity.append(float(np.mean([seen[k] == v for k, v in asked.items()])))
    fid = torch.tensor(fidelity)
    taste = (reading.contrast + reading.crispness + reading.presence) / 3
    return {"fidelity": fid, "taste": taste, "gold": (fid + taste) / 2}


def images_from_uint8(array: np.ndarray) -> torch.Tensor:
    """``uint8 [N,H,W,3]`` -> float ``[N,3,H,W]`` in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


__all__ = ["Reading", "read_images", "gold_scores", "images_from_uint8", "BACKGROUNDS"]
