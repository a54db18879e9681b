"""Evaluation metrics of the paper (Sec. 3): per-step Jaccard overlap, the ordered-random baseline, and the rank
correlation of a reward with true progress."""

from __future__ import annotations

import numpy as np


def jaccard(predicted: np.ndarray, true: np.ndarray) -> float:
    """``|P & T| / |P | T|`` of two ``[T]`` bool masks (1.0 when both are empty)."""
    predicted, true = np.asarray(predicted, bool), np.asarray(true, bool)
    union = np.logical_or(predicted, true).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, true).sum() / union)


def step_jaccards(predicted_labels: np.ndarray, true_labels: np.ndarray, n_steps: int) -> np.ndarray:
    """``[n_steps]`` Jaccard of ``predicted == k`` with ``true == k`` for every step ``k``."""
    return np.array([jaccard(predicted_labels == k, true_labels == k) for k in range(n_steps)])


def ordered_random_labels(length: int, n_steps: int, rng: np.random.Generator, min_size: int = 1) -> np.ndarray:
    """Labels of a uniformly random ordered split of ``length`` frames into ``n_steps`` segments of at least
    ``min_size`` frames (the paper's "ordered random steps" baseline)."""
    free = length - n_steps * min_size
    cuts = np.sort(rng.integers(0, free + 1, size=n_steps - 1))
    splits = cuts + min_size * np.arange(1, n_steps)
    labels = np.zeros(length, dtype=np.int64)
    for split in splits:
        labels[split:] += 1
    return labels


def ordered_random_jaccards(true_labels: np.ndarray, n_steps: int, rng: np.random.Generator,
                            draws: int = 200) -> np.ndarray:
    """Mean per-step Jaccard of ``draws`` ordered random splits against ``true_labels``."""
    return np.mean([step_jaccards(ordered_random_labels(len(true_labels), n_steps, rng), true_labels, n_steps)
                    for _ in range(draws)], axis=0)


def random_detector_jaccards(true_labels: np.ndarray, n_steps: int, rng: np.random.Generator,
                             draws: int = 200) -> np.ndarray:
    """Table 2's random baseline: every frame is independently in or out of every step (p = 0.5)."""
    return np.mean([[jaccard(rng.random(len(true_labels)) < 0.5, true_labels == k) for k in range(n_steps)]
                    for _ in range(draws)], axis=0)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties averaged."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks); nan when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def progress_spearman(totals, progress) -> float:
    """Spearman of the total reward with true progress, pooled over the frames of several rollouts
    (lists of ``[T_i]`` arrays, paired): the reward-tracks-progress metric."""
    if len(totals) != len(progress) or any(len(a) != len(b) for a, b in zip(totals, progress)):
        raise ValueError("totals and progress must be paired rollouts of equal lengths")
    return spearman(np.concatenate([np.asarray(t, np.float64) for t in totals]),
                    np.concatenate([np.asarray(p, np.float64) for p in progress]))


__all__ = ["progress_spearman", "jaccard", "step_jaccards", "ordered_random_labels", "ordered_random_jaccards",
           "random_detector_jaccards", "spearman"]
