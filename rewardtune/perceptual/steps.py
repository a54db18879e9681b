"""Unsupervised step discovery (Sermanet, Xu & Levine 2017, Sec. 2.1, Algorithm 1), solved exactly.

A video's features ``[T,D]`` are split into ``n`` contiguous segments. Two objectives:

* ``"paper"`` (Algorithm 1 "recursive similarity maximization"): minimise the **mean over segments** of
  ``AverageStd(segment) = (1/D) sum_d std_d(segment)`` (population std, ddof=0, of the raw features).
  The mean over segments is not additive, but the number of segments is fixed at ``n``, so
  ``mean = sum / n`` and minimising the sum of segment costs minimises the mean: an exact dynamic programme
  ``best[k][j] = min_i best[k-1][i] + cost(i, j)`` over ``O(n T^2)`` cells reproduces the brute-force recursion.
* ``"gaussian_ml"``: the length-weighted maximum-likelihood fit of per-segment independent Gaussians (the paper's
  own description of what its objective approximates): minimise ``sum_s L_s * (1/D) sum_d log(var_sd + eps_d)``,
  the negative log-likelihood up to constants, with ``eps_d = 1e-3 * var_d`` (the feature's variance over the
  whole video, or 1e-12 for a constant feature) so that a constant segment has a finite cost. It is invariant to
  per-feature scaling.
* ``"linear_ml"``: the same likelihood for per-segment Gaussians whose mean moves **linearly in time**
  (``x_t = a + b t + noise`` per feature and segment): ``var_sd`` is the residual variance of the least-squares
  line. A step is "one motion"; its boundaries fall where the direction of motion changes. This fixes the two
  failures of the constant-mean objectives on the procedural demos (BENCHMARKS.md, perceptual section): every
  phase eases in and out, so a near-static stretch straddles each true boundary, and a constant-mean segment is
  cheapest when it takes the whole still stretch (the cut slides to one end of it); and a phase of small motion
  (the door's handle turn) is absorbed by its neighbours, whose variance a cut inside a large motion lowers more.
  A line through a motion leaves small residuals wherever the motion is steady, so a cut through the middle of a
  slow-down costs little, and a short phase of a different direction is worth its own segment.

Segment statistics come from float64 prefix sums of the (video-mean centred) features ``x``, ``x^2`` and
``t x``, so every segment's cost is
``O(D)`` and all ``O(T^2)`` costs are computed in length-major batches: ``O(T^2 D)`` time in all (about 5 s for
T = 300 frames of 10,048 pooled Inception features on one CPU core), ``O(T^2)`` memory for the cost table.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rewardtune.errors import UserError
from rewardtune.perceptual.constants import OBJECTIVES

_CHUNK_ELEMENTS = 2 ** 24  # rows x D of one batched cost computation


def segment_costs(features: torch.Tensor, objective: str = "paper", min_size: int = 1) -> np.ndarray:
    """``cost[i, j]`` of the segment ``features[i:j]`` for ``j - i >= min_size`` (``inf`` elsewhere).

    Args:
        features: ``[T,D]`` float.
        objective: ``"paper"`` (mean per-feature std), ``"gaussian_ml"`` (``L * mean_d log(var_d + eps_d)``) or
            ``"linear_ml"`` (the same with the residual variance about the least-squares line in time).
    Returns:
        float64 array ``[T+1, T+1]``.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"unknown step objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    x = torch.as_tensor(features).detach().to(torch.float64).reshape(features.shape[0], -1)
    t, d = x.shape
    x = x - x.mean(0, keepdim=True)
    eps = _variance_floor(x)
    zero = torch.zeros(1, d, dtype=torch.float64)
    time = torch.arange(t, dtype=torch.float64)[:, None]
    s1, s2, st = (torch.cat([zero, v.cumsum(0)]) for v in (x, x.pow(2), time * x))
    cost = np.full((t + 1, t + 1), np.inf)
    rows = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for length in range(max(1, min_size), t + 1):
        for start in range(0, t - length + 1, rows):
            i = torch.arange(start, min(start + rows, t - length + 1))
            total = s1[i + length] - s1[i]
            var = ((s2[i + length] - s2[i]) - total.pow(2) / length) / length        # about the segment mean
            if objective == "linear_ml" and length > 1:
                centre = (i.to(torch.float64) + (length - 1) / 2)[:, None]
                slope_sum = (st[i + length] - st[i]) - centre * total               # sum (t - tbar) x
                var = var - slope_sum.pow(2) / (length * length * (length * length - 1) / 12.0)
            var = var.clamp_min(0)
            if objective == "paper":
                value = var.sqrt().mean(1)
            else:
                value = length * torch.log(var + eps).mean(1)
            cost[i.numpy(), i.numpy() + length] = value.numpy()
    return cost


def _variance_floor(centred: torch.Tensor) -> torch.Tensor:
    """``[D]`` ``eps_d = 1e-3 * var_d`` over the whole video (1e-12 for a constant feature)."""
    eps = 1e-3 * centred.pow(2).mean(0)
    return torch.where(eps > 0, eps, torch.full_like(eps, 1e-12))


def discover_steps(features: torch.Tensor, n_steps: int, min_size: int = 1, objective: str = "paper") -> list[int]:
    """The ``n_steps - 1`` split points that exactly minimise the step objective (module docstring).

    Args:
        features: ``[T,D]`` per-frame features of one video.
        n_steps: number of segments (>= 1).
        min_size: minimum frames per segment (>= 1).
        objective: ``"paper"`` (default: mean over segments of the average per-feature std), ``"gaussian_ml"`` or
            ``"linear_ml"`` (module docstring).
    Returns:
        Strictly increasing first-frame indices of segments 2..n (``[]`` for one step).
    Raises:
        UserError: ``T < n_steps * min_size``, bad arguments.
    """
    if features.ndim != 2:
        raise UserError(f"features must be [T,D], got shape {tuple(features.shape)}")
    if n_steps < 1 or min_size < 1:
        raise UserError(f"n_steps and min_size must be >= 1, got n_steps={n_steps}, min_size={min_size}")
    t = int(features.shape[0])
    if t < n_steps * min_size:
        raise UserError(f"a video of {t} frames cannot be split into {n_steps} steps of at least {min_size} "
                        f"frame(s); use fewer steps, a smaller min_size or a longer video")
    cost = segment_costs(features, objective, min_size)
    return _best_splits(cost, t, n_steps, min_size)


def _best_splits(cost: np.ndarray, t: int, n: int, min_size: int) -> list[int]:
    """Dynamic programme over (segments used, frames covered); ``best[k, j]``: least summed cost of ``frames[:j]``
    in ``k`` segments. Ties go to the earliest split (deterministic)."""
    best = np.full((n + 1, t + 1), np.inf)
    back = np.zeros((n + 1, t + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, n + 1):
        for j in range(k * min_size, t - (n - k) * min_size + 1):
            starts = np.arange((k - 1) * min_size, j - min_size + 1)
            totals = best[k - 1, starts] + cost[starts, j]
            pick = int(np.argmin(totals))
            best[k, j], back[k, j] = totals[pick], starts[pick]
    if not math.isfinite(best[n, t]):
        raise UserError("no valid split exists for these features (non-finite costs)")
    splits, j = [], t
    for k in range(n, 1, -1):
        j = int(back[k, j])
        splits.append(j)
    return splits[::-1]


def objective_value(features: torch.Tensor, splits: list[int], objective: str = "paper") -> float:
    """The objective of a given split, computed directly from its definition (no prefix sums): the paper's
    mean over segments of the average per-feature std, or the Gaussian ML cost summed over segments (about the
    segment mean, or about the least-squares line in time for ``linear_ml``)."""
    x = torch.as_tensor(features).detach().to(torch.float64)
    bounds = [0, *splits, x.shape[0]]
    segments = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if objective == "paper":
        return float(np.mean([float(s.std(0, unbiased=False).mean()) for s in segments]))
    eps = _variance_floor(x - x.mean(0))
    total = 0.0
    for s in segments:
        residual = s - s.mean(0)
        if objective == "linear_ml" and len(s) > 1:
            time = torch.arange(len(s), dtype=torch.float64)[:, None]
            time = time - time.mean()
            residual = residual - time * (time * residual).sum(0) / time.pow(2).sum()
        total += len(s) * float(torch.log(residual.pow(2).mean(0) + eps).mean())
    return total


def labels_from_splits(splits: list[int], length: int) -> np.ndarray:
    """``[T]`` int step index (0-based) of every frame for the given split points."""
    labels = np.zeros(length, dtype=np.int64)
    for split in splits:
        labels[split:] += 1
    return labels


__all__ = ["OBJECTIVES", "discover_steps", "segment_costs", "objective_value", "labels_from_splits"]
