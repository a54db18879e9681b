"""flow_sde_step_with_logprob against an independent float64 hand computation, and its sampling properties."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rewardtune.diffusion.flow import flow_family_step, flow_sde_step_with_logprob


def make_scheduler(steps=10, shift=3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def tensors(count, batch=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype) for _ in range(count)]


def hand_step(scheduler, step, x_t, v, noise_level):
    """The step's mean and std for one sample, written out in float64 from the sigmas at explicit indices."""
    sigmas = [float(s) for s in scheduler.sigmas]
    s, s_next = sigmas[step], sigmas[step + 1]
    denominator = 1 - sigmas[1] if s == 1.0 else 1 - s
    a = noise_level * math.sqrt(s / denominator)
    h = s - s_next  # > 0
    mean = x_t - a * a / (2 * s) * h * x_t - (1 + a * a * (1 - s) / (2 * s)) * h * v
    return mean, a * math.sqrt(h)


def hand_log_prob(scheduler, step, x_t, v, x_prev, noise_level):
    mean, std = hand_step(scheduler, step, x_t, v, noise_level)
    return torch.distributions.Normal(mean, std).log_prob(x_prev).mean()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_log_prob_matches_hand_computation_with_per_sample_timesteps(shift):
    scheduler = make_scheduler(shift=shift)
    x_t, v, x_prev = tensors(3, batch=4)
    steps = [0, 3, 7, 9]  # the first (sigma == 1) and the last (sigma_prev == 0) included
    t = scheduler.timesteps[steps]
    _, log_prob = flow_sde_step_with_logprob(scheduler, v, t, x_t, noise_level=0.7, prev_sample=x_prev)
    expected = torch.stack([hand_log_prob(scheduler, s, x_t[i], v[i], x_prev[i], 0.7) for i, s in enumerate(steps)])
    assert log_prob.dtype == torch.float64
    torch.testing.assert_close(log_prob, expected, rtol=1e-10, atol=1e-10)


def test_sampled_then_rescored_is_exact_and_seeded_sampling_is_reproducible():
    scheduler = make_scheduler()
    x_t, v = tensors(2, dtype=torch.float32)
    t = scheduler.timesteps[4]
    prev, lp = flow_sde_step_with_logprob(scheduler, v, t, x_t, generator=torch.Generator().manual_seed(3))
    again, lp_again = flow_sde_step_with_logprob(scheduler, v, t, x_t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(prev, again) and torch.equal(lp, lp_again)
    scored, lp_scored = flow_sde_step_with_logprob(scheduler, v, t, x_t, prev_sample=prev)
    assert torch.equal(scored, prev) and torch.equal(lp_scored, lp)
    per_sample = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    prev_list, _ = flow_sde_step_with_logprob(scheduler, v, t, x_t, generator=per_sample)
    one, _ = flow_sde_step_with_logprob(scheduler, v[1:2], t, x_t[1:2], generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(prev_list[1:2], one, rtol=0, atol=0)


def test_a_batch_of_mixed_timesteps_equals_the_samples_one_by_one():
    scheduler = make_scheduler()
    x_t, v, x_prev = tensors(3, batch=5, dtype=torch.float32)
    t = scheduler.timesteps[[9, 0, 5, 5, 2]]
    _, log_prob = flow_sde_step_with_logprob(scheduler, v, t, x_t, prev_sample=x_prev)
    for i in range(5):
        _, one = flow_sde_step_with_logprob(scheduler, v[i:i + 1], t[i], x_t[i:i + 1], prev_sample=x_prev[i:i + 1])
        torch.testing.assert_close(log_prob[i:i + 1], one, rtol=1e-6, atol=1e-6)


def test_first_and_last_steps_are_finite_and_bf16_is_computed_in_float32():
    scheduler = make_scheduler()
    x_t, v = tensors(2, dtype=torch.float32)
    for t in (scheduler.timesteps[0], scheduler.timesteps[-1]):
        prev, log_prob = flow_sde_step_with_logprob(scheduler, v, t, x_t, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()
    x_prev = tensors(1, seed=1, dtype=torch.float32)[0]
    t = scheduler.timesteps[6]
    half = [a.to(torch.bfloat16) for a in (x_t, v, x_prev)]
    prev16, lp16 = flow_sde_step_with_logprob(scheduler, half[1], t, half[0], prev_sample=half[2])
    _, lp32 = flow_sde_step_with_logprob(scheduler, half[1].float(), t, half[0].float(), prev_sample=half[2].float())
    assert prev16.dtype == torch.bfloat16 and lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, rtol=1e-6, atol=1e-6)  # same bf16 values, float32 arithmetic
    _, lp_full = flow_sde_step_with_logprob(scheduler, v, t, x_t, prev_sample=x_prev)
    torch.testing.assert_close(lp16, lp_full, rtol=0.05, atol=0.05)
    sampled16, lp_sampled16 = flow_sde_step_with_logprob(scheduler, half[1], t, half[0], generator=torch.Generator())
    _, rescored16 = flow_sde_step_with_logprob(scheduler, half[1], t, half[0], prev_sample=sampled16)
    assert torch.equal(lp_sampled16, rescored16)  # the log-prob is of the returned (bf16) sample


def test_bad_timesteps_and_an_unset_scheduler_are_rejected():
    scheduler = make_scheduler()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="timestep 123 is not one of the scheduler's 10 timesteps"):
        flow_sde_step_with_logprob(scheduler, x, torch.tensor([scheduler.timesteps[0], 123.0]), x)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        flow_sde_step_with_logprob(scheduler, x, scheduler.timesteps[:3], x)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_sde_step_with_logprob(FlowMatchEulerDiscreteScheduler(), x, 1000.0, x)
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, noise_level=-0.1)


def test_empirical_moments_match_the_step_gaussian():
    scheduler = make_scheduler()
    step, n = 3, 20000
    x_t, v = (torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
              for s in (0, 1))
    prev, _ = flow_sde_step_with_logprob(scheduler, v.expand(n, -1, -1, -1), scheduler.timesteps[step],
                                         x_t.expand(n, -1, -1, -1), noise_level=1.0,
                                         generator=torch.Generator().manual_seed(2))
    mean, std = hand_step(scheduler, step, x_t[0], v[0], 1.0)
    z = (prev - mean) / std  # standard normal if the sampler draws from N(mean, std^2)
    assert z.mean(0).abs().max() < 4 / math.sqrt(n)
    assert (z.var(0) - 1).abs().max() < 4 * math.sqrt(2 / n)


def test_zero_noise_is_the_deterministic_euler_step_with_undefined_log_prob():
    scheduler = make_scheduler()
    x_t, v = tensors(2, dtype=torch.float32)
    t = scheduler.timesteps[2]
    prev, log_prob = flow_sde_step_with_logprob(scheduler, v, t, x_t, noise_level=0.0, generator=torch.Generator())
    torch.testing.assert_close(prev, scheduler.step(v, t, x_t).prev_sample)
    assert torch.isnan(log_prob).all()


def test_log_prob_is_differentiable_in_the_model_output_only():
    scheduler = make_scheduler()
    x_t, x_prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, requires_grad=True)
    v = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, log_prob = flow_sde_step_with_logprob(scheduler, v, scheduler.timesteps[0], x_t, prev_sample=x_prev)
    log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert x_prev.grad is None


def test_family_step_passes_eta_as_the_noise_level():
    scheduler = make_scheduler()
    x_t, v = tensors(2, dtype=torch.float32)
    t = scheduler.timesteps[[1, 4, 8]]
    ours = flow_family_step(scheduler, v, t, x_t, eta=0.7, generator=torch.Generator().manual_seed(9))
    direct = flow_sde_step_with_logprob(scheduler, v, t, x_t, noise_level=0.7,
                                        generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(ours, direct))
