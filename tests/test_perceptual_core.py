"""Perceptual rewards: exact step discovery (vs brute force), Eq. 1 selection, Eq. 2 log-likelihood, calibration,
step combination, save/load, extractors and the procedural demos, against independent hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.perceptual import discover_steps
from rewardtune.perceptual.demos import TASKS, procedural_rollout
from rewardtune.perceptual.features import load_extractor
from rewardtune.perceptual.metrics import jaccard, ordered_random_labels, spearman, step_jaccards
from rewardtune.perceptual.reward import (
    PerceptualReward,
    combine_steps,
    fit_step_models,
    gaussian_log_likelihood,
    selection_scores,
    shape_difference,
)

# --- step discovery --------------------------------------------------------------------------------------------

def paper_objective(x: np.ndarray, bounds: list[int]) -> float:
    """Algorithm 1's objective written out: mean over segments of the mean per-feature (population) std."""
    segments = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return sum(float(np.mean(np.std(s, axis=0))) for s in segments) / len(segments)


def gaussian_objective(x: np.ndarray, bounds: list[int]) -> float:
    """Negative log-likelihood (up to constants, / D) of per-segment independent Gaussians, variance + eps."""
    eps = 1e-3 * np.var(x, axis=0)
    eps = np.where(eps > 0, eps, 1e-12)
    return sum(len(x[a:b]) * float(np.mean(np.log(np.var(x[a:b], axis=0) + eps)))
               for a, b in zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("objective, cost", [("paper", paper_objective), ("gaussian_ml", gaussian_objective)])
def test_dynamic_programme_matches_brute_force(objective, cost):
    rng = np.random.default_rng(0)
    for _ in range(40):
        t, n, m = int(rng.integers(3, 12)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
        if t < n * m:
            continue
        x = rng.normal(size=(t, 3)) + np.cumsum(rng.normal(size=(t, 3)), 0) * rng.uniform(0, 1)
        splits = discover_steps(torch.from_numpy(x), n, m, objective)
        assert len(splits) == n - 1 and splits == sorted(set(splits))
        bounds = [0, *splits, t]
        assert min(b - a for a, b in zip(bounds[:-1], bounds[1:])) >= m
        valid = [c for c in itertools.combinations(range(1, t), n - 1)
                 if min(b - a for a, b in zip([0, *c], [*c, t])) >= m]
        best = min(cost(x, [0, *c, t]) for c in valid)
        assert cost(x, bounds) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_piecewise_constant_video_is_split_at_its_changes():
    rng = np.random.default_rng(1)
    levels = np.repeat(np.array([[0.0, 1.0], [3.0, -1.0], [1.0, 4.0]]), [7, 5, 9], axis=0)
    x = torch.from_numpy(levels + 0.05 * rng.normal(size=levels.shape))
    for objective in ("paper", "gaussian_ml"):
        assert discover_steps(x, 3, objective=objective) == [7, 12]
    assert discover_steps(x, 1) == []


def test_discover_steps_errors():
    x = torch.zeros(5, 2)
    with pytest.raises(UserError, match="cannot be split into 3 steps of at least 2"):
        discover_steps(x, 3, min_size=2)
    with pytest.raises(UserError, match="unknown step objective"):
        discover_steps(x, 2, objective="greedy")
    with pytest.raises(UserError, match=r"\[T,D\]"):
        discover_steps(torch.zeros(5), 2)


# --- selection, log-likelihood, calibration, combination --------------------------------------------------------

def test_selection_score_matches_hand_computation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4))
    positive = np.array([True] * 5 + [False] * 7)
    z = selection_scores(torch.from_numpy(x), torch.from_numpy(positive), alpha=5.0).numpy()
    for i in range(4):
        pos, neg = x[positive, i], x[~positive, i]
        mu_p, mu_n = sum(pos) / len(pos), sum(neg) / len(neg)
        sd_p = math.sqrt(sum((v - mu_p) ** 2 for v in pos) / len(pos))
        sd_n = math.sqrt(sum((v - mu_n) ** 2 for v in neg) / len(neg))
        assert z[i] == pytest.approx(5.0 * abs(mu_p - mu_n) - (sd_p + sd_n))


def test_log_likelihood_is_the_mean_gaussian_log_density():
    rng = np.random.default_rng(3)
    values, mean, std = rng.normal(size=(6, 4)), rng.normal(size=4), rng.uniform(0.2, 2, 4)
    got = gaussian_log_likelihood(*(torch.from_numpy(v) for v in (values, mean, std))).numpy()
    hand = [np.mean([-0.5 * ((v - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
                     for v, m, s in zip(row, mean, std)]) for row in values]
    np.testing.assert_allclose(got, hand, rtol=1e-12)
    normal = torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(std))
    np.testing.assert_allclose(got, normal.log_prob(torch.from_numpy(values)).mean(-1).numpy(), rtol=1e-12)


def toy_training_set(seed: int = 4):
    """Two steps; feature 0 separates them, feature 1 is constant, features 2-5 are noise."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 20 + [1] * 30)
    x = rng.normal(size=(50, 6))
    x[:, 0] = np.where(labels == 0, -2.0, 2.0) + 0.3 * rng.normal(size=50)
    x[:, 1] = 7.0
    return torch.from_numpy(x).float(), torch.from_numpy(labels)


def test_selection_keeps_the_discriminative_feature_and_never_a_constant_one():
    x, labels = toy_training_set()
    models = fit_step_models(x, labels, 2, n_features=3)
    assert models.index.shape == (2, 3)
    assert (models.index[:, 0] == 0).all()
    assert not (models.index == 1).any()
    hand_center, hand_scale = x[:, 0].mean(), x[:, 0].std(unbiased=False)
    assert float(models.center[0, 0]) == pytest.approx(float(hand_center), abs=1e-6)
    assert float(models.scale[0, 0]) == pytest.approx(float(hand_scale), rel=1e-6)
    standard = (x[labels == 1, 0] - hand_center) / hand_scale
    assert float(models.mean[1, 0]) == pytest.approx(float(standard.mean()), abs=1e-5)
    assert float(models.std[1, 0]) == pytest.approx(max(0.1, float(standard.std(unbiased=False))), rel=1e-5)


def test_calibration_maps_training_medians_to_0_9_and_0_1():
    x, labels = toy_training_set()
    models = fit_step_models(x, labels, 2, n_features=3)
    loglik, rewards = models.log_likelihood(x), models.rewards(x)
    for step in range(2):
        inside, outside = loglik[labels == step, step].median(), loglik[labels != step, step].median()
        for value, target in ((inside, 0.9), (outside, 0.1)):
            r = torch.sigmoid(models.slope[step] * (value - models.midpoint[step]))
            assert float(r) == pytest.approx(target, abs=1e-5)
        assert (rewards[labels == step, step] >= 0.5).float().mean() > 0.9
        assert (rewards[labels != step, step] < 0.5).float().mean() > 0.9
    assert ((rewards >= 0) & (rewards <= 1)).all()


def test_step_combinations():
    r = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.8, 0.6], [0.0, 0.1, 0.2]])
    np.testing.assert_allclose(combine_steps(r, "doubling").numpy(), (r @ torch.tensor([1.0, 2, 4]) / 7).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(combine_steps(r, "sum").numpy(), r.mean(1).numpy())
    np.testing.assert_allclose(combine_steps(r, "furthest").numpy(), [1 / 3, 1.0, 0.0])
    np.testing.assert_allclose(shape_difference(torch.tensor([0.1, 0.5, 0.2])).numpy(), [0.0, 0.4, -0.3])
    with pytest.raises(UserError, match="unknown step combination"):
        combine_steps(r, "max")


# --- the reward end to end, save/load ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def door_demos():
    return [procedural_rollout("door", seed, size=32) for seed in range(4)]


def test_fit_learns_the_door_steps_and_round_trips(door_demos, tmp_path):
    reward = PerceptualReward.fit([d.frames for d in door_demos], 2, features="pixels")
    for demo, rollout in zip(reward.demos, door_demos):
        labels = np.zeros(demo["length"], int)
        labels[demo["splits"][0]:] = 1
        assert step_jaccards(labels, rollout.steps("door", 2), 2).mean() > 0.6
    test = procedural_rollout("door", 50, size=32)
    per_step, total = reward.score_frames(test.frames)
    assert per_step.shape == (len(test.frames), 2) and total.shape == (len(test.frames),)
    assert float(total[-5:].mean()) > float(total[:5].mean())
    path = reward.save(tmp_path / "reward.pt")
    blob = torch.load(path, weights_only=True)          # tensors and plain data only
    assert set(blob) == {"format", "meta", "tensors"} and isinstance(blob["meta"], str)
    loaded = PerceptualReward.load(path)
    again_step, again_total = loaded.score_frames(test.frames)
    torch.testing.assert_close(again_step, per_step)
    torch.testing.assert_close(again_total, total)
    assert loaded.demos == reward.demos and loaded.extractor_spec == {"name": "pixels", "options": {"size": 16,
                                                                                                   "blur": 0.0}}
    shaped = loaded.score_frames(test.frames, shaped=True)[1]
    torch.testing.assert_close(shaped, shape_difference(total))
    assert [p.name for p in tmp_path.iterdir()] == ["reward.pt"]      # no temporary files left


def test_fit_and_load_errors(door_demos, tmp_path):
    videos = [d.frames for d in door_demos]
    with pytest.raises(UserError, match="at least 2 demo videos"):
        PerceptualReward.fit(videos[:1], 2, features="pixels")
    with pytest.raises(UserError, match="at least 2 steps"):
        PerceptualReward.fit(videos, 1, features="pixels")
    with pytest.raises(UserError, match="demo 1 has 2 frames, fewer than the 3 steps"):
        PerceptualReward.fit([videos[0], videos[1][:2]], 3, features="pixels")
    with pytest.raises(UserError, match="demo1: a video of 20 frames cannot be split into 2 steps of at least 15"):
        PerceptualReward.fit([videos[0], videos[1][:20]], 2, features="pixels", min_size=15)
    with pytest.raises(UserError, match="feature_options only apply"):
        PerceptualReward.fit(videos, 2, features=load_extractor("pixels"), feature_options={"size": 8})
    with pytest.raises(UserError, match="does not exist"):
        PerceptualReward.load(tmp_path / "missing.pt")
    (tmp_path / "other.pt").write_bytes(b"not a reward")
    with pytest.raises(UserError, match="is not a perceptual reward file"):
        PerceptualReward.load(tmp_path / "other.pt")


# --- extractors --------------------------------------------------------------------------------------------------

FRAMES = np.random.default_rng(5).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)


def test_pixels_and_random_cnn():
    assert load_extractor("pixels", size=8).embed(FRAMES).shape == (3, 192)
    blurred = load_extractor("pixels", size=8, blur=1.0).embed(FRAMES)
    assert blurred.shape == (3, 192) and blurred.std() < load_extractor("pixels", size=8).embed(FRAMES).std()
    a, b = load_extractor("random-cnn", seed=1).embed(FRAMES), load_extractor("random-cnn", seed=1).embed(FRAMES)
    torch.testing.assert_close(a, b)
    assert a.shape == (3, 600) and not torch.allclose(a, load_extractor("random-cnn", seed=2).embed(FRAMES))
    batched = load_extractor("random-cnn", seed=1, batch_size=2).embed(FRAMES)
    torch.testing.assert_close(batched, a, rtol=1e-5, atol=1e-6)


def test_inception_v3_random_and_from_file(tmp_path):
    from torchvision.models import inception_v3

    extractor = load_extractor("inception_v3", weights="random", size=75, seed=3)
    pooled = extractor.embed(FRAMES[:2])
    assert pooled.shape == (2, 10048)
    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict()  # with AuxLogits keys
    torch.save(state, tmp_path / "inception.pth")
    from_file = load_extractor("inception_v3", weights=str(tmp_path / "inception.pth"), size=75).model
    for key, value in from_file.state_dict().items():
        torch.testing.assert_close(value, state[key])
    raw = load_extractor("inception_v3", weights="random", size=75, pooled=False).embed(FRAMES[:1])
    # at 75 px Mixed_5b..5d are 7x7, Mixed_6a..6e 3x3, Mixed_7a..7c 1x1 (at 299: 35, 17, 8; 2,473,024 dims)
    assert raw.shape == (1, (256 + 288 + 288) * 49 + 768 * 5 * 9 + 1280 + 2048 * 2)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_extractor("inception_v3", weights=str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="do not match"):
        load_extractor("inception_v3", weights=str(tmp_path / "wrong.pth"))


def test_openclip_and_shapes_clip(tmp_path):
    from tiny_rewards import random_open_clip, save_open_clip_config

    arch = save_open_clip_config(tmp_path, "tiny-perceptual")
    clip = random_open_clip()
    torch.save(clip.state_dict(), tmp_path / "tiny.bin")
    extractor = load_extractor(f"openclip:{arch}", checkpoint=str(tmp_path / "tiny.bin"))
    features = extractor.embed(FRAMES)
    assert features.shape == (3, 16)
    assert extractor.spec()["name"] == f"openclip:{arch}"
    assert load_extractor("shapes-clip").embed(FRAMES).shape[0] == 3


def test_unknown_extractor_and_bad_options():
    with pytest.raises(UserError, match="unknown feature extractor 'nope'; choose one of: inception_v3, openclip"):
        load_extractor("nope")
    with pytest.raises(UserError, match="does not take option 'colour'"):
        load_extractor("pixels", colour=3)
    with pytest.raises(UserError, match="openclip needs a model"):
        load_extractor("openclip")
    with pytest.raises(UserError, match="uint8"):
        load_extractor("pixels").embed(FRAMES.astype(np.float32))


# --- demos and metrics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_procedural_demos(task):
    a, b = procedural_rollout(task, 3, size=32), procedural_rollout(task, 3, size=32)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.dtype == np.uint8 and a.frames.shape[1:] == (32, 32, 3)
    assert sorted(set(a.phase)) == [0, 1, 2] and np.all(np.diff(a.progress) >= 0)
    assert sorted(set(a.steps(task, 2))) == [0, 1]
    failed, wander = procedural_rollout(task, 3, "failed", size=32), procedural_rollout(task, 3, "random", size=32)
    assert failed.progress.max() < 0.7 and wander.progress.max() == 0
    assert not np.array_equal(procedural_rollout(task, 4, size=32).frames[0], a.frames[0])   # visual variety


def test_metrics():
    assert jaccard(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])) == pytest.approx(1 / 3)
    np.testing.assert_allclose(step_jaccards(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2), [0.5, 2 / 3])
    labels = ordered_random_labels(10, 3, np.random.default_rng(0), min_size=2)
    assert np.all(np.diff(labels) >= 0) and min(np.bincount(labels)) >= 2
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 31.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 2, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-0.9486833)


def test_inception_imagenet_weights_missing_offline_is_one_line_error(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(ModelNotFoundError, match="inception_v3 ImageNet weights are not in torch's cache") as info:
        load_extractor("inception_v3")          # weights="imagenet", the default
    assert "\n" not in str(info.value) and "weights=PATH" in str(info.value)
