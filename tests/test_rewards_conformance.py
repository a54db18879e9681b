"""Every registered reward obeys the interface contract, checked on its tiny model from ``tests/tiny_rewards.py``.

Contract: ``reward(images [B,3,H,W] in [0,1], prompts) -> float32 [B]``, finite; a batch scores as its images do one
by one; a second call gives the same scores (no state leaks between calls); bad shapes are a :class:`UserError`;
``components`` holds ``[B]`` scores of the last call; the reward works inside a weighted sum with a JPEG reward; and
when ``differentiable`` is set, gradients reach the pixels and are finite (otherwise the scores carry no graph).
Images are 40x56 (non-square, not any model's input size), so every resizing path runs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_rewards import TINY_OPTIONS

from rewardtune.errors import UserError
from rewardtune.rewards import REWARDS, load_reward

HEIGHT, WIDTH = 40, 56
PROMPTS = ["a red circle", "a blue square on a white background", "a small green triangle"]
ATOL = RTOL = 1e-4


def test_every_registered_reward_has_a_tiny_builder():
    missing = sorted(set(REWARDS.names()) - set(TINY_OPTIONS))
    assert not missing, f"rewards {missing} have no tiny builder; add one to TINY_OPTIONS in tests/tiny_rewards.py"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (load options, loaded reward), built on first use and shared by the module's tests."""
    cache: dict[str, tuple[dict, object]] = {}

    def get(name: str):
        if name not in TINY_OPTIONS:
            pytest.fail(f"reward {name!r} is registered but has no tiny builder; add one to TINY_OPTIONS in "
                        "tests/tiny_rewards.py", pytrace=False)
        if name not in cache:
            options = TINY_OPTIONS[name](tmp_path_factory.mktemp(name.replace(".", "_")))
            cache[name] = (options, load_reward(name, **options))
        return cache[name]

    return get


@pytest.fixture(params=REWARDS.names())
def case(request, tiny_models):
    """``(name, options, reward)`` for one registered reward."""
    options, reward = tiny_models(request.param)
    return request.param, options, reward


def sample_images(n: int, seed: int = 0) -> torch.Tensor:
    """``[n,3,40,56]`` in [0,1]: smooth random images with pixel noise; the last one is flat grey (an edge case)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 7, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    images = (0.85 * smooth + 0.15 * torch.rand(n, 3, HEIGHT, WIDTH, generator=generator)).clamp(0, 1)
    images[-1] = 0.5
    return images


def test_scores_are_finite_float_vectors(case):
    name, _, reward = case
    scores = reward(sample_images(3), PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32, (name, scores.shape, scores.dtype)
    assert torch.isfinite(scores).all(), (name, scores)


def test_batch_equals_one_by_one(case):
    name, _, reward = case
    images = sample_images(3, seed=1)
    together = reward(images, PROMPTS)
    alone = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_second_call_gives_the_same_scores(case):
    name, _, reward = case
    images = sample_images(3, seed=2)
    first = reward(images, PROMPTS).clone()
    reward(sample_images(2, seed=3), ["a photo of a dog", "a red circle"])   # something else in between
    torch.testing.assert_close(reward(images, PROMPTS), first, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("images, prompts", [
    (torch.rand(2, HEIGHT, WIDTH), ["a", "b"]),                 # no channel axis
    (torch.rand(2, 4, HEIGHT, WIDTH), ["a", "b"]),              # RGBA
    (torch.rand(2, HEIGHT, WIDTH, 3), ["a", "b"]),              # channels last
    (torch.rand(3, HEIGHT, WIDTH), ["a", "b", "c"]),            # one image without the batch axis
    (torch.rand(2, 3, HEIGHT, WIDTH), ["a"]),                   # prompt count differs
], ids=["BHW", "B4HW", "BHWC", "CHW", "prompts"])
def test_bad_shapes_are_user_errors(case, images, prompts):
    name, _, reward = case
    with pytest.raises(UserError) as info:
        reward(images, prompts)
    assert "\n" not in str(info.value), name


def test_components_hold_the_last_call(case):
    name, _, reward = case
    reward(sample_images(3, seed=4), PROMPTS)
    scores = reward(sample_images(2, seed=5), PROMPTS[:2])
    assert reward.components, name
    for key, value in reward.components.items():
        assert value.shape == (2,) and not value.requires_grad, (name, key, value.shape)
    if len(reward.components) == 1:
        torch.testing.assert_close(next(iter(reward.components.values())), scores.detach())


def test_weighted_sum_with_jpeg(case):
    name, options, reward = case
    partner = "jpeg_incompressibility" if name == "jpeg_compressibility" else "jpeg_compressibility"
    total = load_reward(f"{name}:0.5,{partner}:1", **{name: options})
    images = sample_images(3, seed=6)
    scores = total(images, PROMPTS)
    alone, jpeg = reward(images, PROMPTS), load_reward(partner)(images, PROMPTS)
    torch.testing.assert_close(scores, 0.5 * alone + jpeg, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    assert set(total.components) == {name, partner}
    torch.testing.assert_close(total.components[name], alone, atol=ATOL, rtol=RTOL)
    assert not total.differentiable                         # JPEG sizes are not differentiable


def test_gradients_reach_the_pixels_when_differentiable(case):
    name, _, reward = case
    images = sample_images(2, seed=7).requires_grad_(True)
    scores = reward(images, PROMPTS[:2])
    if not reward.differentiable:
        assert not scores.requires_grad, f"{name} is marked non-differentiable but its scores carry a graph"
        return
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all(), name
    assert images.grad.abs().sum(dim=(1, 2, 3)).min() > 0, f"{name}: some image got no gradient"
    assert all(p.grad is None for p in reward.parameters()), f"{name}: gradients reached the reward's weights"
