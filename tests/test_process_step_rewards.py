"""Step rewards: PAV progress by hand, x0 rewards of decoded predictions, PRIME implicit rewards from a model pair."""

from __future__ import annotations

import pytest
import torch

from rewardtune.diffusion.sampling import decode_latents
from rewardtune.diffusion.service import generate
from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.errors import UserError
from rewardtune.process.step_rewards import implicit_step_rewards, progress_step_rewards, x0_step_rewards
from rewardtune.process.values import StepValues

PROMPTS = ["a red circle", "a blue square on a white background"]
SETTINGS = SamplerSettings(steps=3, guidance=2.0, eta=1.0)


def mean_brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_progress_is_the_value_difference_with_its_standard_error():
    values = StepValues(scores=torch.zeros(1, 4, 2), mean=torch.tensor([[0.2, 0.5, 0.4, 1.0]]),
                        se=torch.tensor([[0.1, 0.1, 0.0, 0.0]]), queries=0)
    progress, se = progress_step_rewards(values)
    assert torch.allclose(progress, torch.tensor([[0.3, -0.1, 0.6]]))
    assert torch.allclose(se, torch.tensor([[0.02**0.5, 0.1, 0.0]]))
    assert torch.allclose(progress.sum(1), values.mean[:, -1] - values.mean[:, 0])  # it telescopes


def test_x0_rewards_score_each_steps_decoded_prediction(tiny_pipe):
    out = generate(tiny_pipe, PROMPTS, [0, 1], SETTINGS, keep_trajectories=True, keep_x0=True, decode=False)
    x0 = out.trajectory.x0_predictions
    rewards, queries = x0_step_rewards(tiny_pipe, x0, PROMPTS, mean_brightness, batch_size=4)
    assert rewards.shape == (2, 3) and queries == 6
    with torch.no_grad():
        by_hand = torch.stack([mean_brightness(decode_latents(tiny_pipe, x0[:, t]), PROMPTS) for t in range(3)], 1)
    assert torch.allclose(rewards, by_hand, atol=1e-5)


def test_implicit_rewards_are_beta_times_the_log_ratio(tiny_pipe, fresh_pipe):
    out = generate(tiny_pipe, PROMPTS, [0, 1], SETTINGS, keep_trajectories=True, decode=False)
    trajectory = out.trajectory
    same = implicit_step_rewards(tiny_pipe, tiny_pipe, trajectory, PROMPTS, SETTINGS, beta=0.5)
    assert same.shape == (2, 3) and torch.equal(same, torch.zeros(2, 3))
    with torch.no_grad():
        for param in fresh_pipe.unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    changed = implicit_step_rewards(fresh_pipe, tiny_pipe, trajectory, PROMPTS, SETTINGS, beta=0.5)
    policy = implicit_step_rewards(fresh_pipe, fresh_pipe, trajectory, PROMPTS, SETTINGS)  # zeros, a sanity row
    assert torch.equal(policy, torch.zeros(2, 3)) and changed.abs().min() > 0
    # log pi_ref of the transitions is what the sampler recorded (the reference sampled them)
    from rewardtune.diffusion.rescore import trajectory_log_probs
    from rewardtune.process.step_rewards import transitions_of

    transitions = transitions_of(tiny_pipe, trajectory, PROMPTS, SETTINGS)
    with torch.no_grad():
        log_phi = trajectory_log_probs(fresh_pipe.unet, tiny_pipe.scheduler, transitions, torch.arange(2),
                                       torch.arange(3), SETTINGS.guidance, SETTINGS.eta)
    assert torch.allclose(changed, 0.5 * (log_phi - trajectory.log_probs), atol=1e-4)


def test_implicit_rewards_need_a_stochastic_sampler(tiny_pipe):
    ode = SamplerSettings(steps=3, guidance=2.0, eta=0.0)
    out = generate(tiny_pipe, PROMPTS, [0, 1], ode, keep_trajectories=True, decode=False)
    with pytest.raises(UserError, match="eta > 0"):
        implicit_step_rewards(tiny_pipe, tiny_pipe, out.trajectory, PROMPTS, ode)
