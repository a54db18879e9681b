"""The sampler's additions for process rewards: per-step x0 predictions and continuations (branching) from stored
latents, with the random draws documented in :func:`rewardtune.diffusion.sampling.sample_trajectories`."""

from __future__ import annotations

import pytest
import torch

from rewardtune.diffusion.sampling import (
    encode_negative,
    encode_prompts,
    generators_for,
    latent_shape,
    sample_trajectories,
    skip_draws,
)
from rewardtune.diffusion.settings import SCHEDULER_FAMILIES, SamplerSettings, family_x0

PROMPTS = ["a red circle", "a blue square on a white background"]


def _sample(pipe, seeds, **kw):
    embeds = encode_prompts(pipe, PROMPTS)
    negative = encode_negative(pipe).expand(2)
    kw = {"steps": 4, "guidance": 3.0, "eta": 1.0, **kw}
    return sample_trajectories(pipe, embeds, negative, generators_for(seeds), **kw)


@pytest.fixture(scope="module")
def flow_pipe(tiny_flow_pipeline_dir):
    from rewardtune.diffusion.loading import load_pipeline

    return load_pipeline(str(tiny_flow_pipeline_dir))


def test_every_family_supplies_its_x0_prediction():
    assert set(SCHEDULER_FAMILIES.names()) == {"ddim", "flow"}
    for name in SCHEDULER_FAMILIES.names():
        assert callable(family_x0(name))


def test_ddim_x0_by_hand():
    from diffusers import DDIMScheduler

    from rewardtune.shapes.tiny_models import scheduler_config

    scheduler = DDIMScheduler(**scheduler_config())
    scheduler.set_timesteps(10)
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([901, 101])
    abar = scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    expected = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert torch.allclose(family_x0("ddim")(scheduler, eps, t, x), expected, atol=1e-6)


def test_flow_x0_by_hand():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = scheduler.timesteps[[0, 4]]
    sigma = scheduler.sigmas[[0, 4]].view(2, 1, 1, 1)
    assert torch.allclose(family_x0("flow")(scheduler, v, t, x), x - sigma * v, atol=1e-6)


def test_keep_x0_changes_nothing_else(tiny_pipe):
    plain = _sample(tiny_pipe, [0, 1])
    kept = _sample(tiny_pipe, [0, 1], keep_x0=True)
    assert plain.x0_predictions is None and plain.start_step == 0
    assert torch.equal(plain.latents, kept.latents) and torch.equal(plain.log_probs, kept.log_probs)
    assert kept.x0_predictions.shape == (2, 4, 4, 8, 8)


def test_last_x0_is_the_final_latent_for_deterministic_ddim(fresh_pipe):
    from diffusers import DDIMScheduler

    fresh_pipe.scheduler = DDIMScheduler.from_config(fresh_pipe.scheduler.config, set_alpha_to_one=True)
    traj = _sample(fresh_pipe, [0, 1], eta=0.0, keep_x0=True)
    assert torch.allclose(traj.x0_predictions[:, -1], traj.final, atol=1e-5)
    assert (traj.x0_predictions[:, 0] - traj.final).abs().max() > 1e-2  # the first guess is not the answer


def test_last_x0_is_the_final_latent_for_the_flow_ode(flow_pipe):
    traj = _sample(flow_pipe, [0, 1], eta=0.0, keep_x0=True)
    assert torch.allclose(traj.x0_predictions[:, -1], traj.final, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_branch_from_step_0_with_x_T_reproduces_the_sample(tiny_pipe, eta):
    full = _sample(tiny_pipe, [3, 4], eta=eta, keep_x0=True)
    gens = generators_for([3, 4])
    if eta:  # the full run's generators drew x_T first; a continuation draws no x_T
        skip_draws(gens, latent_shape(tiny_pipe, 2), 1)
    embeds = encode_prompts(tiny_pipe, PROMPTS)
    branch = sample_trajectories(tiny_pipe, embeds, encode_negative(tiny_pipe).expand(2), gens, steps=4,
                                 guidance=3.0, eta=eta, keep_x0=True, start_step=0, start_latents=full.latents[:, 0])
    assert torch.equal(branch.latents, full.latents)
    assert torch.equal(branch.x0_predictions, full.x0_predictions)
    assert torch.equal(branch.log_probs.nan_to_num(), full.log_probs.nan_to_num())


def test_branch_from_step_i_reproduces_the_rest_with_advanced_generators(tiny_pipe):
    full = _sample(tiny_pipe, [5, 6], sde_window=[1, 3])
    i = 2
    gens = skip_draws(generators_for([5, 6]), latent_shape(tiny_pipe, 2), 1 + i)
    embeds = encode_prompts(tiny_pipe, PROMPTS)
    branch = sample_trajectories(tiny_pipe, embeds, encode_negative(tiny_pipe).expand(2), gens, steps=4,
                                 guidance=3.0, eta=1.0, sde_window=[1, 3], start_step=i,
                                 start_latents=full.latents[:, i])
    assert branch.start_step == i and branch.latents.shape[1] == 4 - i + 1
    assert torch.equal(branch.latents, full.latents[:, i:])
    assert torch.equal(branch.timesteps, full.timesteps[i:])
    assert torch.equal(branch.log_probs.nan_to_num(), full.log_probs[:, i:].nan_to_num())
    fresh = _sample(tiny_pipe, [5, 6], sde_window=[1, 3], start_step=i, start_latents=full.latents[:, i])
    assert not torch.equal(fresh.final, full.final)  # other noise: a different continuation


def test_branching_errors(tiny_pipe):
    with pytest.raises(ValueError, match="needs start_latents"):
        _sample(tiny_pipe, [0, 1], start_step=2)
    with pytest.raises(ValueError, match="start_step must be in"):
        _sample(tiny_pipe, [0, 1], start_step=4, start_latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="latent shape"):
        _sample(tiny_pipe, [0, 1], start_step=1, start_latents=torch.zeros(2, 4, 4, 4))


def test_generate_keeps_x0_across_batches(tiny_pipe):
    from rewardtune.diffusion.service import generate

    settings = SamplerSettings(steps=3, guidance=2.0, eta=1.0, batch_size=3)
    out = generate(tiny_pipe, PROMPTS, list(range(4)), settings, per_prompt=2, keep_trajectories=True, keep_x0=True)
    plain = generate(tiny_pipe, PROMPTS, list(range(4)), settings, per_prompt=2, keep_trajectories=True)
    assert out.trajectory.x0_predictions.shape == (4, 3, 4, 8, 8) and plain.trajectory.x0_predictions is None
    assert torch.equal(out.images, plain.images) and torch.equal(out.trajectory.latents, plain.trajectory.latents)
