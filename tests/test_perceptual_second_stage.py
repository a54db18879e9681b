"""Perceptual rewards, second stage: the time-contrastive loss and extractor (hand computation, training, saved
with the reward, CLI), step discovery through near-static stretches (linear_ml), the `expected` combination,
progress Spearman, the scripted door/pour controllers and CEM on hand-checkable cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rewardtune.cli import main
from rewardtune.errors import UserError
from rewardtune.perceptual import discover_steps
from rewardtune.perceptual.control import DEMONSTRATED, episode
from rewardtune.perceptual.demos import procedural_rollout
from rewardtune.perceptual.features import load_extractor
from rewardtune.perceptual.metrics import progress_spearman, spearman
from rewardtune.perceptual.policy_search import cem_update, cross_entropy_method
from rewardtune.perceptual.reward import PerceptualReward, combine_steps
from rewardtune.perceptual.steps import objective_value
from rewardtune.perceptual.tcn import sample_triplets, triplet_loss
from rewardtune.perceptual.video import write_video

# --- time-contrastive ------------------------------------------------------------------------------------------


def test_triplet_loss_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # row 0: |a-p|^2 = 0.04 + 0.36 = 0.40, |a-n|^2 = 2.0 -> max(0, 0.40 - 2.0 + 0.2) = 0
    # row 1: |a-p|^2 = 0, |a-n|^2 = 0.36 + 0.04 = 0.40 -> max(0, 0 - 0.40 + 0.5) = 0.10 (margin 0.5)
    assert float(triplet_loss(a, p, n, margin=0.2)) == pytest.approx(0.0)
    assert float(triplet_loss(a, p, n, margin=0.5)) == pytest.approx((0.0 + 0.10) / 2)
    assert float(triplet_loss(a, p, n, margin=1.8)) == pytest.approx(((0.40 - 2.0 + 1.8) + (0.0 - 0.40 + 1.8)) / 2)


def test_triplets_respect_the_time_windows():
    lengths = [40, 25]
    idx = sample_triplets(lengths, 500, np.random.default_rng(0), pos_window=0.05, neg_window=0.2)
    assert idx.shape == (500, 4)
    for demo, anchor, pos, neg in idx:
        t = lengths[demo]
        w_pos, w_neg = max(1, round(0.05 * t)), max(max(1, round(0.05 * t)) + 1, round(0.2 * t))
        assert 0 < abs(pos - anchor) <= w_pos and abs(neg - anchor) >= w_neg and 0 <= max(pos, neg) < t


def tiny_tcn(**more):
    return load_extractor("time-contrastive", {"size": 16, "width": 4, "dim": 8, "steps": 15, "batch": 8, **more})


def test_time_contrastive_trains_saves_and_reloads(tmp_path):
    demos = [procedural_rollout("door", s, size=32).frames for s in range(3)]
    with pytest.raises(UserError, match="untrained"):
        tiny_tcn().embed(demos[0])
    reward = PerceptualReward.fit(demos, 2, features="time-contrastive",
                                  feature_options={"size": 16, "width": 4, "dim": 8, "steps": 15, "batch": 8})
    features = reward.extractor.embed(demos[0])
    assert features.shape == (len(demos[0]), 8)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(demos[0])))
    blob = torch.load(reward.save(tmp_path / "tcn.pt"), weights_only=True)
    assert set(blob["extractor_state"]) and "head.weight" in blob["extractor_state"]
    loaded = PerceptualReward.load(tmp_path / "tcn.pt")
    torch.testing.assert_close(loaded.score_frames(demos[1])[1], reward.score_frames(demos[1])[1])
    with pytest.raises(UserError, match="pos_window < neg_window"):
        tiny_tcn(pos_window=0.3, neg_window=0.2)


def test_learn_time_contrastive_from_the_command_line(tmp_path, capsys):
    for seed in range(3):
        write_video(tmp_path / "demos" / f"d{seed}", procedural_rollout("pour", seed, size=32).frames)
    out = tmp_path / "r.pt"
    assert main(["perceptual", "learn", "--videos", str(tmp_path / "demos"), "--steps", "2", "--features",
                 "time-contrastive", "--feature-option", "steps=5", "--feature-option", "size=16",
                 "--objective", "linear_ml", "--out", str(out)]) == 0
    assert "extractor_state" in torch.load(out, weights_only=True)
    assert main(["perceptual", "score", "--reward", str(out), "--video", str(tmp_path / "demos" / "d0"),
                 "--combine", "expected"]) == 0
    assert "frames scored" in capsys.readouterr().out


# --- step discovery through near-static stretches ---------------------------------------------------------------

def linear_objective(x: np.ndarray, bounds: list[int]) -> float:
    """Per-segment Gaussian NLL (/ D, up to constants) about each segment's least-squares line in time."""
    eps = np.where(np.var(x, axis=0) > 0, 1e-3 * np.var(x, axis=0), 1e-12)
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg, t = x[a:b], np.arange(b - a, dtype=float)
        if len(seg) > 1:
            design = np.stack([np.ones_like(t), t], 1)
            seg = seg - design @ np.linalg.lstsq(design, seg, rcond=None)[0]
        else:
            seg = seg - seg.mean(0)
        total += len(seg) * float(np.mean(np.log(np.mean(seg ** 2, axis=0) + eps)))
    return total


def test_linear_ml_dynamic_programme_matches_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(30):
        t, n, m = int(rng.integers(3, 11)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        if t < n * m:
            continue
        x = np.cumsum(rng.normal(size=(t, 3)), 0)
        splits = discover_steps(torch.from_numpy(x), n, m, "linear_ml")
        valid = [c for c in itertools.combinations(range(1, t), n - 1)
                 if min(b - a for a, b in zip([0, *c], [*c, t])) >= m]
        best = min(linear_objective(x, [0, *c, t]) for c in valid)
        assert linear_objective(x, [0, *splits, t]) == pytest.approx(best, rel=1e-7, abs=1e-9)
        assert objective_value(torch.from_numpy(x), splits, "linear_ml") == pytest.approx(best, rel=1e-7, abs=1e-9)


def eased_video(lengths, seed, still=6, noise=0.02):
    """Three motions that ease in and out (near-static around every boundary), the middle one small and in a
    direction shared with the others, then still frames; returns features [T,4] and the true boundaries."""
    directions = np.array([[3.0, 1.0, 0, 0], [0.3, 0.3, 0.5, 0], [0, 0, 1.0, 4.0]])
    ease = lambda u: u * u * (3 - 2 * u)  # noqa: E731
    position, frames = np.zeros(4), []
    for length, direction in zip(lengths, directions):
        frames += [position + direction * ease(k / length) for k in range(length)]
        position = position + direction
    frames += [position] * still
    x = np.array(frames) + noise * np.random.default_rng(seed).normal(size=(len(frames), 4))
    return torch.from_numpy(x), [lengths[0], lengths[0] + lengths[1]]


def test_linear_ml_finds_boundaries_inside_near_static_stretches():
    errors = {"gaussian_ml": [], "linear_ml": []}
    for seed in range(4):
        for lengths in ((20, 8, 14), (10, 16, 22)):
            x, truth = eased_video(lengths, seed)
            for objective in errors:
                errors[objective] += list(np.abs(np.subtract(discover_steps(x, 3, 3, objective), truth)))
    assert max(errors["linear_ml"]) <= 2
    assert np.mean(errors["gaussian_ml"]) > 2 * np.mean(errors["linear_ml"])


# --- combination and progress metric ----------------------------------------------------------------------------

def test_expected_combination_and_progress_spearman():
    r = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.8]])
    logits = torch.logit(r)
    hand = [float((torch.softmax(row, 0) * torch.tensor([0.0, 0.5, 1.0])).sum()) for row in logits]
    np.testing.assert_allclose(combine_steps(r, "expected").numpy(), hand, rtol=1e-6)
    assert float(combine_steps(torch.tensor([[1.0, 0.0]]), "expected")) == pytest.approx(0.0, abs=1e-5)
    totals, progress = [np.array([0.1, 0.4]), np.array([0.3])], [np.array([0.0, 1.0]), np.array([0.5])]
    assert progress_spearman(totals, progress) == pytest.approx(spearman([0.1, 0.4, 0.3], [0.0, 1.0, 0.5]))
    assert progress_spearman(totals, progress) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="paired"):
        progress_spearman(totals, progress[:1])


def test_pour_alternative_grouping_keeps_the_truth():
    rollout = procedural_rollout("pour", 0)
    truth, alt = rollout.steps("pour", 2), rollout.steps("pour", 2, alternative=True)
    np.testing.assert_array_equal(truth, (rollout.phase >= 1).astype(int))
    np.testing.assert_array_equal(alt, (rollout.phase >= 2).astype(int))


# --- controllers and CEM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["door", "pour"])
def test_controllers(task):
    good = episode(task, DEMONSTRATED[task], 3)
    assert good.success and good.frames.shape == (44, 64, 64, 3) and good.frames.dtype == np.uint8
    assert good.progress[0] < 0.05 and good.progress[-1] == pytest.approx(1.0)
    assert (np.diff(good.progress) >= -1e-12).all()
    off = DEMONSTRATED[task] + np.r_[4.0, np.zeros(len(DEMONSTRATED[task]) - 1)]   # misses the handle / glass
    bad = episode(task, off, 3, render=False)
    assert not bad.success and bad.progress[-1] < good.progress[-1] and len(bad.frames) == 0
    weak = DEMONSTRATED[task].copy()
    weak[2] = 0.4                                                                  # turn / tilt too little
    assert not episode(task, weak, 3, render=False).success
    with pytest.raises(UserError, match="parameters"):
        episode(task, np.zeros(7), 0)


def test_cem_update_by_hand_and_cem_on_a_quadratic():
    thetas = np.array([[0.0], [1.0], [2.0], [3.0]])
    mu, sigma = cem_update(thetas, np.array([0.0, 3.0, 2.0, 1.0]), elite=0.5, min_std=0.1)
    assert mu == pytest.approx([1.5]) and sigma == pytest.approx([0.5])
    mu, sigma = cem_update(thetas, np.array([0.0, 3.0, 3.0, 1.0]), elite=0.25, min_std=0.7)   # at least 2 elite
    assert mu == pytest.approx([1.5]) and sigma == pytest.approx([0.7])
    target = np.array([2.0, -1.0])
    result = cross_entropy_method(lambda th, _: -float(((th - target) ** 2).sum()), np.zeros(2), np.ones(2) * 2,
                                  seed=0, iterations=15, samples=20)
    assert np.abs(result.means[-1] - target).max() < 0.05
    assert len(result.means) == len(result.best_returns) == 15


@pytest.mark.parametrize("common", [False, True])
def test_cem_episode_seeds_common_or_fresh_per_iteration(common):
    seen = []
    cross_entropy_method(lambda th, scene: seen.append(scene) or 0.0, np.zeros(1), np.ones(1), seed=3, iterations=3,
                         samples=4, common_scenes=common)
    per_iteration = [set(seen[i:i + 4]) for i in range(0, 12, 4)]
    assert [len(s) for s in per_iteration] == ([1, 1, 1] if common else [4, 4, 4])
    assert len(set.union(*per_iteration)) == (3 if common else 12)
