"""ddim_step_with_logprob against an independent float64 hand computation and against diffusers' DDIM step."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from rewardtune.diffusion import ddim_step_with_logprob
from rewardtune.shapes.tiny_models import scheduler_config


def make_scheduler(steps=10, **overrides):
    scheduler = DDIMScheduler(**{**scheduler_config(), **overrides})
    scheduler.set_timesteps(steps)
    return scheduler


def hand_step(scheduler, eps, t, x_t, x_prev, eta):
    """DDIM (Song et al. 2021, Eq. 12 and 16) in float64 numpy, one sample at a time."""
    a = scheduler.alphas_cumprod.double().numpy()
    t_prev = t - 1000 // scheduler.num_inference_steps
    a_t = a[t]
    a_prev = a[t_prev] if t_prev >= 0 else float(scheduler.final_alpha_cumprod)
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    log_density = -0.5 * ((x_prev - mean) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return mean, sigma, log_density.mean()


def test_log_prob_matches_hand_computation_with_per_sample_timesteps():
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(0)
    x_t, eps, x_prev = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([901, 501, 1])  # last one steps to the final alpha (t_prev < 0)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, prev_sample=x_prev)
    expected = [hand_step(scheduler, eps[i].numpy(), int(t[i]), x_t[i].numpy(), x_prev[i].numpy(), 1.0)[2]
                for i in range(3)]
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-5)


def test_sampled_step_matches_diffusers_ddim_step():
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(1)
    x_t, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[3]
    for eta in (0.0, 0.5, 1.0):
        ours, _ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=eta,
                                         generator=torch.Generator().manual_seed(7))
        ref_noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        ref = scheduler.step(eps, t, x_t, eta=eta, variance_noise=ref_noise).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_match_diffusers(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(2)
    x_t, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[5]
    ours, _ = ddim_step_with_logprob(scheduler, out, t, x_t, eta=0.0)
    ref = scheduler.step(out, t, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_scored_sample_is_returned_and_density_peaks_at_the_mean():
    scheduler = make_scheduler()
    x_t, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[2]
    mean, _ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(0))
    given = torch.randn(1, 4, 8, 8)
    prev, lp_given = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, prev_sample=given)
    assert torch.equal(prev, given)
    a, sigma, _ = hand_step(scheduler, eps[0].double().numpy(), int(t), x_t[0].double().numpy(),
                            given[0].double().numpy(), 1.0)
    _, lp_mean = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, prev_sample=torch.from_numpy(a)[None].float())
    assert lp_mean.item() == pytest.approx(-math.log(sigma) - 0.5 * math.log(2 * math.pi), rel=1e-4)
    assert lp_mean > lp_given


def test_log_prob_is_differentiable_in_the_model_output_only():
    scheduler = make_scheduler()
    x_t, x_prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, scheduler.timesteps[0], x_t, prev_sample=x_prev)
    log_prob.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert x_prev.grad is None


def test_deterministic_step_has_undefined_log_prob_and_bad_input_is_rejected():
    scheduler = make_scheduler()
    x = torch.randn(2, 4, 8, 8)
    _, log_prob = ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, eta=0.0)
    assert torch.isnan(log_prob).all()
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(scheduler, x, torch.tensor([1, 2, 3]), x)
    fresh = DDIMScheduler(**scheduler_config())
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(fresh, x, 1, x)


def test_a_zero_variance_last_step_is_a_point_mass_with_finite_gradient():
    """set_alpha_to_one: the last step goes to alpha_prev = 1, its variance is 0, so x_0 = predicted x0 exactly and
    the step's log-prob is 0 (not 0/0 = NaN, which would skip every minibatch holding it)."""
    from diffusers import DDIMScheduler

    from rewardtune.diffusion import ddim_step_with_logprob

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(10)
    last = scheduler.timesteps[-1]
    torch.manual_seed(0)
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8, requires_grad=True)
    prev, log_prob = ddim_step_with_logprob(scheduler, eps, last, x_t, eta=1.0, generator=torch.Generator())
    a = scheduler.alphas_cumprod[last]
    torch.testing.assert_close(prev, (x_t - (1 - a).sqrt() * eps.detach()) / a.sqrt())
    assert torch.equal(log_prob, torch.zeros(3))
    log_prob.sum().backward()
    assert torch.isfinite(eps.grad).all()
    _, earlier = ddim_step_with_logprob(scheduler, eps.detach(), scheduler.timesteps[-2], x_t, eta=1.0,
                                        generator=torch.Generator())
    assert torch.isfinite(earlier).all() and (earlier != 0).all()
