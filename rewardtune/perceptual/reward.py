"""Perceptual rewards from demo videos (Sermanet, Xu & Levine 2017, Sec. 2.2 and Appendix A.1).

    reward = PerceptualReward.fit(videos, n_steps=3, features="random-cnn")     # videos: list of uint8 [T,H,W,3]
    reward.save("reward.pt"); reward = PerceptualReward.load("reward.pt")
    per_step, total = reward.score_frames(frames)                               # [T,n_steps], [T]

Pipeline (for ``S`` steps, ``n`` selected features per step):

1. **Features** of every frame (:mod:`rewardtune.perceptual.features`).
2. **Steps**: each demo is split on its own by :func:`rewardtune.perceptual.steps.discover_steps`; ``fit``
   defaults to the ``gaussian_ml`` objective (it matched the true steps far better than the paper's unweighted
   objective on the Table 1 protocol, BENCHMARKS.md) and to steps of at least a quarter of the mean step length.
3. **Selection** (Eq. 1): every feature is standardised by its mean and std over all training frames; per step,
   positives are that step's frames of all demos and negatives all other frames;
   ``z_i = alpha * |mu_i+ - mu_i-| - (sigma_i+ + sigma_i-)`` and the top ``n`` (alpha = 5, n = 32) are kept.
   Features constant over the training frames are never selected.
4. **Step reward** (Eq. 2, as a true log-likelihood): ``l_k(a) = (1/n) sum_i log N(a_i; mu_i+, sigma_i+^2)``
   over the selected standardised features, with ``sigma_i+`` floored at ``min_std`` (0.1 standardised units) so a
   feature that is constant within a step cannot give infinite rewards. (The paper prints
   ``(1/n) sum (a_i - mu_i)^2 / sigma_i``; its experiments use a higher-is-better reward in [0,1].)
5. **Calibration** to [0,1]: ``r_k = sigmoid(b_k * (l_k - m_k))`` where, on the training frames, ``p_k`` is the
   median ``l_k`` of the step's own frames and ``q_k`` that of all other frames, ``m_k = (p_k + q_k) / 2`` and
   ``b_k = 2 ln 9 / (p_k - q_k)``: the median in-step training frame scores 0.9, the median out-of-step frame
   0.1, and 0.5 (the paper's binarisation threshold) lies halfway between them in log-likelihood.
6. **Combination** (later steps pay more): ``doubling`` (default) ``sum_k 2^(k-1) r_k / (2^S - 1)``; ``sum``
   ``mean_k r_k``; ``furthest`` ``(index of the furthest step with r_k >= 0.5) / S`` (0 when none);
   ``expected`` the mean step index under the step posterior ``softmax_k(logit r_k)`` (the calibrated logits
   ``b_k (l_k - m_k)``), divided by ``S - 1``: ``sum_k (k-1)/(S-1) softmax_k``. All lie in [0,1].
   ``shaped=True`` returns the VIP-style difference ``total[t] - total[t-1]`` (0 at t = 0) instead.
   (The paper's Appendix A.1 was not available; doubling weights follow the team's unverified recollection of it,
   normalised here so the total stays in [0,1].)

Saved files (``.save``) hold only tensors and json-able metadata (``torch.load(weights_only=True)``), never a
pickled module; the feature extractor is stored as its spec (name + options) and rebuilt on load, plus its learned
weights under ``"extractor_state"`` when it has any (``time-contrastive``; files without the key load as before).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rewardtune.errors import UserError
from rewardtune.perceptual.constants import COMBINES, DEFAULT_OBJECTIVE, OBJECTIVES
from rewardtune.perceptual.features import FeatureExtractor, load_extractor
from rewardtune.perceptual.steps import discover_steps, labels_from_splits
from rewardtune.utils.io import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "rewardtune.perceptual/1"
CALIBRATION_HIGH = 0.9


def selection_scores(features: torch.Tensor, positive: torch.Tensor, alpha: float = 5.0) -> torch.Tensor:
    """Eq. 1 on standardised features: ``z = alpha * |mu+ - mu-| - (sigma+ + sigma-)`` per feature.

    Args:
        features: ``[N,D]`` standardised training features; positive: ``[N]`` bool (frames of the step).
    Returns:
        ``[D]`` scores (population stds).
    """
    pos, neg = features[positive], features[~positive]
    if not len(pos) or not len(neg):
        raise UserError("every step needs frames inside and outside it to select features")
    mu_p, mu_n = pos.mean(0), neg.mean(0)
    sd_p, sd_n = pos.std(0, unbiased=False), neg.std(0, unbiased=False)
    return alpha * (mu_p - mu_n).abs() - (sd_p + sd_n)


def gaussian_log_likelihood(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[T,n]`` values -> ``[T]`` mean over features of ``log N(value; mean, std^2)``."""
    return (-0.5 * ((values - mean) / std).pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(-1)


def combine_steps(per_step: torch.Tensor, combine: str = "doubling") -> torch.Tensor:
    """``[T,S]`` calibrated step rewards -> ``[T]`` total in [0,1] (module docstring, item 6)."""
    if combine not in COMBINES:
        raise UserError(f"unknown step combination {combine!r}; choose one of: {', '.join(COMBINES)}")
    steps = per_step.shape[-1]
    if combine == "sum":
        return per_step.mean(-1)
    if combine == "doubling":
        weights = 2.0 ** torch.arange(steps, dtype=per_step.dtype)
        return per_step @ (weights / weights.sum())
    if combine == "expected":
        logits = torch.logit(per_step.clamp(1e-6, 1 - 1e-6))
        return torch.softmax(logits, -1) @ (torch.arange(steps, dtype=per_step.dtype) / max(1, steps - 1))
    reached = per_step >= 0.5
    index = torch.where(reached, torch.arange(1, steps + 1), torch.zeros(1, dtype=torch.long)).amax(-1)
    return index.to(per_step.dtype) / steps


def shape_difference(total: torch.Tensor) -> torch.Tensor:
    """VIP-style shaping ``total[t] - total[t-1]`` (0 for the first frame)."""
    return torch.cat([total.new_zeros(1), total[1:] - total[:-1]])


@dataclass
class StepModels:
    """Per-step tensors (``S`` steps, ``n`` features): ``index [S,n]`` long feature indices, ``center``/``scale``
    ``[S,n]`` standardisation of those features, ``mean``/``std`` ``[S,n]`` Gaussian in standardised units,
    ``midpoint``/``slope`` ``[S]`` calibration."""

    index: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    midpoint: torch.Tensor
    slope: torch.Tensor

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """``[T,D]`` raw features -> ``[T,S]`` step log-likelihoods ``l_k``."""
        picked = features[:, self.index]                                   # [T,S,n]
        values = (picked - self.center) / self.scale
        return gaussian_log_likelihood(values, self.mean, self.std)

    def rewards(self, features: torch.Tensor) -> torch.Tensor:
        """``[T,D]`` -> ``[T,S]`` calibrated rewards in [0,1]."""
        return torch.sigmoid(self.slope * (self.log_likelihood(features) - self.midpoint))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in self.__dataclass_fields__}


def fit_step_models(features: torch.Tensor, labels: torch.Tensor, n_steps: int, alpha: float = 5.0,
                    n_features: int = 32, min_std: float = 0.1) -> StepModels:
    """Selection (Eq. 1), Gaussians (Eq. 2) and calibration from all training frames.

    Args:
        features: ``[N,D]`` raw features of every training frame; labels: ``[N]`` step index of each frame.
    """
    center = features.mean(0)
    scale = features.std(0, unbiased=False)
    usable = scale > 1e-6 * scale.max().clamp_min(1e-12)
    if not bool(usable.any()):
        raise UserError("every feature is constant over the training demos; the demos show no change")
    scale = torch.where(usable, scale, torch.ones_like(scale))
    standard = (features - center) / scale
    n = min(n_features, int(usable.sum()))
    rows = {k: [] for k in ("index", "mean", "std")}
    for step in range(n_steps):
        positive = labels == step
        z = selection_scores(standard, positive, alpha).masked_fill(~usable, -math.inf)
        index = torch.argsort(-z, stable=True)[:n]
        pos = standard[positive][:, index]
        rows["index"].append(index)
        rows["mean"].append(pos.mean(0))
        rows["std"].append(pos.std(0, unbiased=False).clamp_min(min_std))
    index = torch.stack(rows["index"])
    models = StepModels(index, center[index], scale[index], torch.stack(rows["mean"]), torch.stack(rows["std"]),
                        torch.zeros(n_steps), torch.ones(n_steps))
    models.midpoint, models.slope = calibrate(models.log_likelihood(features), labels, n_steps)
    return models


def calibrate(loglik: torch.Tensor, labels: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N,S]`` training log-likelihoods -> ``(midpoint [S], slope [S])`` (module docstring, item 5)."""
    logit = math.log(CALIBRATION_HIGH / (1 - CALIBRATION_HIGH))
    mids, slopes = [], []
    for step in range(n_steps):
        inside = loglik[labels == step, step].median()
        outside = loglik[labels != step, step].median()
        gap = float(inside - outside)
        if gap <= 1e-9:
            logger.warning("step %d: its own frames are not more likely than the others (gap %.3g); the "
                           "calibration uses unit slope", step + 1, gap)
            gap = 2 * logit
        mids.append(float(inside + outside) / 2)
        slopes.append(2 * logit / gap)
    return torch.tensor(mids), torch.tensor(slopes)


def default_min_size(length: int, n_steps: int, fraction: float) -> int:
    """``max(1, floor(fraction * length / n_steps))``: no step shorter than ``fraction`` of the mean step."""
    return max(1, int(fraction * length / n_steps))


class PerceptualReward:
    """A learned perceptual reward: extractor spec + per-step models + how to combine them (module docstring).

    Attributes:
        n_steps: number of steps ``S``. combine / shaped: defaults for :meth:`score_frames`.
        demos: per training demo ``{"name", "length", "splits"}`` (the discovered step boundaries).
        config: the fit's hyper-parameters (json-able).
    """

    def __init__(self, extractor_spec: dict[str, Any], models: StepModels, demos: list[dict[str, Any]],
                 config: dict[str, Any], combine: str = "doubling", shaped: bool = False,
                 extractor: FeatureExtractor | None = None,
                 extractor_state: dict[str, torch.Tensor] | None = None) -> None:
        if combine not in COMBINES:
            raise UserError(f"unknown step combination {combine!r}; choose one of: {', '.join(COMBINES)}")
        self.extractor_spec, self.models, self.demos, self.config = extractor_spec, models, demos, config
        self.n_steps = int(models.index.shape[0])
        self.combine, self.shaped = combine, bool(shaped)
        self._extractor = extractor
        self.extractor_state = extractor.state_tensors() if extractor is not None else dict(extractor_state or {})

    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor, rebuilt from its spec (and learned weights) on first use after :meth:`load`."""
        if self._extractor is None:
            extractor = load_extractor(self.extractor_spec["name"], self.extractor_spec.get("options", {}))
            extractor.load_state(self.extractor_state)
            self._extractor = extractor
        return self._extractor

    @classmethod
    def fit(cls, videos: Sequence[np.ndarray], n_steps: int, features: str | FeatureExtractor = "random-cnn",
            feature_options: dict[str, Any] | None = None, objective: str = DEFAULT_OBJECTIVE,
            min_size: int | None = None, min_fraction: float = 0.25, alpha: float = 5.0, n_features: int = 32,
            min_std: float = 0.1, combine: str = "doubling", shaped: bool = False,
            names: Sequence[str] | None = None) -> "PerceptualReward":
        """Learn from demo videos (uint8 ``[T,H,W,3]`` each, at least 2, same steps in the same order).

        Args:
            n_steps: steps per demo (>= 2). features: extractor name or instance (+ ``feature_options``).
            objective: step-discovery objective; default ``gaussian_ml`` (better on Table 1, see BENCHMARKS.md).
            min_size: minimum frames per discovered step; ``None``: :func:`default_min_size` with ``min_fraction``.
            alpha, n_features: Eq. 1 (paper: 5 and 32). min_std: floor of the step Gaussians' std.
        """
        videos = list(videos)
        cls._check_demos(videos, n_steps, names)
        if isinstance(features, FeatureExtractor) and feature_options:
            raise UserError("feature_options only apply when features is an extractor name, not an instance")
        extractor = features if isinstance(features, FeatureExtractor) else load_extractor(features, feature_options)
        if extractor.needs_training and not getattr(extractor, "trained", False):
            extractor.fit(videos)
        embedded = [extractor.embed(v) for v in videos]
        return cls.fit_features(embedded, n_steps, extractor, objective=objective, min_size=min_size,
                                min_fraction=min_fraction, alpha=alpha, n_features=n_features, min_std=min_std,
                                combine=combine, shaped=shaped, names=names)

    @staticmethod
    def _check_demos(videos: list, n_steps: int, names: Sequence[str] | None) -> None:
        if n_steps < 2:
            raise UserError(f"need at least 2 steps (a step is learned against the frames of the others), got "
                            f"{n_steps}")
        if len(videos) < 2:
            raise UserError(f"need at least 2 demo videos to learn a reward, got {len(videos)}; record more demos")
        for i, video in enumerate(videos):
            if len(video) < n_steps:
                name = names[i] if names else f"demo {i}"
                raise UserError(f"{name} has {len(video)} frames, fewer than the {n_steps} steps asked for")

    @classmethod
    def fit_features(cls, embedded: Sequence[torch.Tensor], n_steps: int, extractor: FeatureExtractor,
                     objective: str = DEFAULT_OBJECTIVE, min_size: int | None = None, min_fraction: float = 0.25,
                     alpha: float = 5.0, n_features: int = 32, min_std: float = 0.1, combine: str = "doubling",
                     shaped: bool = False, names: Sequence[str] | None = None) -> "PerceptualReward":
        """:meth:`fit` on precomputed ``[T_i,D]`` features of each demo (made by ``extractor``)."""
        cls._check_demos(list(embedded), n_steps, names)
        if objective not in OBJECTIVES:
            raise UserError(f"unknown step objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        names = list(names) if names else [f"demo{i}" for i in range(len(embedded))]
        demos, labels = [], []
        for name, feats in zip(names, embedded):
            size = min_size or default_min_size(len(feats), n_steps, min_fraction)
            try:
                splits = discover_steps(feats, n_steps, size, objective)
            except UserError as exc:
                raise UserError(f"{name}: {exc}") from None
            demos.append({"name": str(name), "length": int(len(feats)), "splits": splits})
            labels.append(torch.from_numpy(labels_from_splits(splits, len(feats))))
        models = fit_step_models(torch.cat(list(embedded)), torch.cat(labels), n_steps, alpha, n_features, min_std)
        config = {"objective": objective, "min_size": min_size, "min_fraction": min_fraction, "alpha": alpha,
                  "n_features": int(models.index.shape[1]), "min_std": min_std,
                  "feature_dim": int(embedded[0].shape[1])}
        logger.info("perceptual reward: %d demos, %d steps, splits %s", len(demos), n_steps,
                    [d["splits"] for d in demos])
        return cls(extractor.spec(), models, demos, config, combine, shaped, extractor)

    def score_features(self, features: torch.Tensor, combine: str | None = None,
                       shaped: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T,D]`` features -> ``(per_step [T,S] in [0,1], total [T])``."""
        if features.ndim != 2 or features.shape[1] != self.config["feature_dim"]:
            raise UserError(f"features must be [T,{self.config['feature_dim']}], got {tuple(features.shape)}")
        per_step = self.models.rewards(features.float())
        total = combine_steps(per_step, combine or self.combine)
        if self.shaped if shaped is None else shaped:
            total = shape_difference(total)
        return per_step, total

    def score_frames(self, frames: np.ndarray | torch.Tensor, combine: str | None = None,
                     shaped: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames ``[T,H,W,3]`` -> ``(per_step [T,S], total [T])`` (shaping only makes sense on a video)."""
        return self.score_features(self.extractor.embed(frames), combine, shaped)

    def save(self, path: str | Path) -> Path:
        """Write tensors + json metadata atomically (no pickled objects; loads with ``weights_only=True``)."""
        meta = {"format": FORMAT, "extractor": self.extractor_spec, "demos": self.demos, "config": self.config,
                "combine": self.combine, "shaped": self.shaped}
        blob = {"format": FORMAT, "meta": json.dumps(meta), "tensors": self.models.tensors()}
        if self.extractor_state:
            blob["extractor_state"] = self.extractor_state
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PerceptualReward":
        """Read a file written by :meth:`save`; a one-line :class:`UserError` for anything else."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"perceptual reward file {str(path)!r} does not exist; learn one with "
                            "`rewardtune perceptual learn`")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(blob["meta"])
            assert blob["format"] == FORMAT and meta["format"] == FORMAT
            models = StepModels(**{k: blob["tensors"][k] for k in StepModels.__dataclass_fields__})
            state = dict(blob.get("extractor_state", {}))
        except Exception:
            raise UserError(f"{str(path)!r} is not a perceptual reward file ({FORMAT}); learn one with "
                            "`rewardtune perceptual learn`") from None
        return cls(meta["extractor"], models, meta["demos"], meta["config"], meta["combine"], meta["shaped"],
                   extractor_state=state)


__all__ = ["PerceptualReward", "StepModels", "selection_scores", "gaussian_log_likelihood", "combine_steps",
           "shape_difference", "fit_step_models", "calibrate", "COMBINES", "DEFAULT_OBJECTIVE"]
