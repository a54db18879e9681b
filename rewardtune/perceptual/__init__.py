"""Perceptual rewards learned from demo videos (Sermanet, Xu & Levine, RSS 2017).

    from rewardtune.perceptual import PerceptualReward, discover_steps, read_video
    reward = PerceptualReward.fit([read_video(p) for p in paths], n_steps=2, features="random-cnn")
    per_step, total = reward.score_frames(read_video("test.mp4"))      # [T,n_steps], [T]

Modules: :mod:`.features` (extractors, ``embed(frames) -> [T,D]``), :mod:`.steps` (exact step discovery),
:mod:`.reward` (selection, step Gaussians, calibration, combination, save/load), :mod:`.video` (mp4/webm/gif/frame
folders), :mod:`.demos` (procedural and MountainCar demos), :mod:`.metrics`, :mod:`.policy_search`,
:mod:`.image_reward` (``perceptual:PATH`` for :func:`rewardtune.rewards.load_reward`), :mod:`.cli`.
Attributes are imported on first use, so ``import rewardtune.perceptual`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "discover_steps": "steps", "segment_costs": "steps", "labels_from_splits": "steps",
    "PerceptualReward": "reward", "selection_scores": "reward", "gaussian_log_likelihood": "reward",
    "combine_steps": "reward", "load_extractor": "features", "extractor_names": "features", "EXTRACTORS": "features",
    "FeatureExtractor": "features", "read_video": "video", "write_video": "video", "find_videos": "video",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rewardtune.perceptual.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rewardtune.perceptual' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
