"""Step-reward transforms against hand computations."""

from __future__ import annotations

import pytest
import torch

from rewardtune.errors import ConfigError
from rewardtune.process.transforms import (
    TRANSFORMS,
    apply_transform,
    clip_step_rewards,
    delta_step_rewards,
    returns_to_go,
    td_lookahead,
)

R = torch.tensor([[1.0, 3.0, -2.0, 0.5], [0.0, 0.0, 0.0, 2.0]])


def test_clip_is_min_of_shifted_reward_and_zero():
    expected = torch.tensor([[0.0, 0.0, -3.0, -0.5], [-1.0, -1.0, -1.0, 0.0]])
    assert torch.equal(clip_step_rewards(R, eta=1.0), expected)
    assert torch.equal(clip_step_rewards(R), torch.tensor([[0.0, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_delta_is_consecutive_difference_and_telescopes():
    expected = torch.tensor([[-2.0, 5.0, -2.5, 0.5], [0.0, 0.0, -2.0, 2.0]])
    delta = delta_step_rewards(R)
    assert torch.equal(delta, expected)
    assert torch.allclose(returns_to_go(delta), R)  # sum_{k>=t} d_k = r_t
    assert torch.equal(R, torch.tensor([[1.0, 3.0, -2.0, 0.5], [0.0, 0.0, 0.0, 2.0]]))  # input untouched


def test_returns_to_go_by_hand():
    assert torch.allclose(returns_to_go(R), torch.tensor([[2.5, 1.5, -1.5, 0.5], [2.0, 2.0, 2.0, 2.0]]))
    # gamma 0.5, row 0: G_3 = 0.5; G_2 = -2 + 0.25 = -1.75; G_1 = 3 - 0.875 = 2.125; G_0 = 1 + 1.0625 = 2.0625
    assert torch.allclose(returns_to_go(R, 0.5)[0], torch.tensor([2.0625, 2.125, -1.75, 0.5]))


def test_td_lookahead_is_the_lambda_return_recursion():
    lam = 0.25
    # row 0: c_3 = 0.5; c_2 = 0.75*-2 + 0.25*0.5 = -1.375; c_1 = 0.75*3 + 0.25*-1.375 = 1.90625;
    # c_0 = 0.75*1 + 0.25*1.90625 = 1.2265625
    assert torch.allclose(td_lookahead(R, lam)[0], torch.tensor([1.2265625, 1.90625, -1.375, 0.5]))
    assert torch.allclose(td_lookahead(R, 0.0), R)
    assert torch.allclose(td_lookahead(R, 1.0), R[:, -1:].expand_as(R))
    with pytest.raises(ValueError, match="lam"):
        td_lookahead(R, 1.5)


def test_transforms_are_differentiable_and_batched_over_leading_dims():
    r = torch.randn(2, 3, 5, requires_grad=True)
    for fn in (returns_to_go, lambda x: td_lookahead(x, 0.5), delta_step_rewards, clip_step_rewards):
        out = fn(r)
        assert out.shape == r.shape
        out.sum().backward()


def test_registry_names_none_clip_delta():
    assert set(TRANSFORMS) == {"none", "clip", "delta"}
    assert torch.equal(apply_transform("none", R), R)
    assert torch.equal(apply_transform("clip", R, eta=1.0), clip_step_rewards(R, 1.0))
    assert torch.equal(apply_transform("delta", R), delta_step_rewards(R))
    with pytest.raises(ConfigError, match="choose one of: none, clip, delta"):
        apply_transform("bogus", R)
