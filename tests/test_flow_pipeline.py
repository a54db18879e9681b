"""SD3 (flow-matching) pipelines through the one sampling service: loading, the exact T5-less conditioning,
sampling that matches plain diffusers, re-scoring, and finetuning."""

from __future__ import annotations

import pytest
import torch

from rewardtune.diffusion.settings import SamplerSettings

PROMPTS = ["a red circle", "a blue square on a white background"]


@pytest.fixture(scope="module")
def flow_pipe(tiny_flow_pipeline_dir):
    from rewardtune.diffusion.loading import load_pipeline

    return load_pipeline(str(tiny_flow_pipeline_dir))


def test_load_picks_the_flow_backbone(flow_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from rewardtune.diffusion.backbones import backbone_of, denoiser
    from rewardtune.diffusion.sd3 import KeyBiasJointAttnProcessor

    assert isinstance(flow_pipe, StableDiffusion3Pipeline)
    assert isinstance(flow_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert backbone_of(flow_pipe).family == "flow" and denoiser(flow_pipe) is flow_pipe.transformer
    processors = set(map(type, flow_pipe.transformer.attn_processors.values()))
    assert processors == {KeyBiasJointAttnProcessor}


def test_collapsed_t5_padding_is_exact(flow_pipe):
    """One zero row with key bias log(256) gives the velocity of the pipeline's own 32 + 256 rows."""
    from rewardtune.diffusion.sampling import encode_prompts

    full, _, pooled, _ = flow_pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                 do_classifier_free_guidance=False)
    cond = encode_prompts(flow_pipe, PROMPTS)
    assert full.shape[1] == 32 + 256 and cond.embeds.shape[1] == 32 + 1
    assert torch.equal(cond.pooled, pooled) and torch.equal(cond.embeds, full[:, :33])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 300.0])
    with torch.no_grad():
        plain = flow_pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=full,
                                      pooled_projections=pooled).sample
        collapsed = cond.call(flow_pipe.transformer, x, t)
        unbiased = flow_pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                                         pooled_projections=cond.pooled).sample
    assert (collapsed - plain).abs().max() < 1e-5
    assert (unbiased - plain).abs().max() > 1e-3  # the bias is what makes it exact


def test_sde_log_probs_rescore_exactly(flow_pipe):
    """Re-scoring the sampled transitions under the sampling model reproduces the recorded log-probs."""
    from types import SimpleNamespace

    from rewardtune.diffusion.rescore import trajectory_log_probs
    from rewardtune.diffusion.service import generate

    settings = SamplerSettings(steps=3, guidance=2.0, eta=0.7, scheduler="flow")
    out = generate(flow_pipe, PROMPTS, [0, 1, 2, 3], settings, per_prompt=2, keep_trajectories=True)
    assert torch.isfinite(out.trajectory.log_probs).all()
    moves = SimpleNamespace(latents=out.trajectory.latents, timesteps=out.trajectory.timesteps, group=out.group,
                            prompt_embeds=out.prompt_embeds, negative_embeds=out.negative_embeds, family="flow")
    with torch.no_grad():
        rescored = trajectory_log_probs(flow_pipe.transformer, flow_pipe.scheduler, moves, torch.arange(4),
                                        torch.arange(3), settings.guidance, settings.eta, chunk=5)
    assert (rescored - out.trajectory.log_probs).abs().max() < 1e-4


def test_image_size_must_fit_the_patches(flow_pipe):
    from rewardtune.diffusion.sampling import check_image_size
    from rewardtune.errors import UserError

    check_image_size(flow_pipe, 48, 32)
    with pytest.raises(UserError, match="height 36 is not a multiple of 8"):
        check_image_size(flow_pipe, 36, 32)


def test_t5_pipelines_are_not_collapsed(tmp_path):
    from conftest import build_tiny_flow_pipeline

    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.diffusion.sampling import encode_prompts

    pipe = load_pipeline(str(build_tiny_flow_pipeline(tmp_path, t5=True)))
    cond = encode_prompts(pipe, PROMPTS)
    assert cond.key_bias is None and cond.embeds.shape[1] == 32 + 256


def test_sde_window_samples_and_trains_only_its_steps(flow_pipe):
    """``sde_window=[1, 3]`` of 4 steps: steps 0 and 3 are the deterministic ODE step (no log-prob; step 0 lands
    where the ODE sampler lands), steps 1-2 are stochastic, and finetuning trains only steps 1 and 2."""
    from rewardtune.diffusion.service import generate
    from rewardtune.finetune.config import FinetuneConfig, SamplingConfig
    from rewardtune.finetune.update import plan_minibatches

    window = SamplerSettings(steps=4, guidance=2.0, eta=0.7, sde_window=[1, 3])
    out = generate(flow_pipe, PROMPTS, [0, 1], window, keep_trajectories=True)
    log_probs = out.trajectory.log_probs
    assert torch.isnan(log_probs[:, [0, 3]]).all() and torch.isfinite(log_probs[:, 1:3]).all()
    ode = generate(flow_pipe, PROMPTS, [0, 1], SamplerSettings(steps=4, guidance=2.0, eta=0.0), keep_trajectories=True)
    torch.testing.assert_close(out.trajectory.latents[:, 1], ode.trajectory.latents[:, 1], rtol=0, atol=1e-6)
    assert (out.final_latents - ode.final_latents).abs().max() > 1e-3
    cfg = FinetuneConfig(prompts_per_epoch=2, images_per_prompt=3, inner_steps=3, timestep_fraction=1.0,
                         sampling=SamplingConfig(steps=4, eta=0.7, sde_window=[1, 3]))
    passes = plan_minibatches(2, 3, 4, cfg, True, torch.Generator().manual_seed(0))
    steps = torch.cat([batch.steps for minibatches in passes for batch in minibatches])
    assert steps.shape[1] == 2 and set(steps.flatten().tolist()) == {1, 2}
    with pytest.raises(Exception, match="sde_window"):
        SamplingConfig(steps=4, eta=0.7, sde_window=[2, 5])


def test_same_latent_shares_x_T_within_a_prompt_group(flow_pipe):
    from rewardtune.diffusion.service import generate

    seeds = [3, 4, 5, 6]
    shared = generate(flow_pipe, PROMPTS, seeds, SamplerSettings(steps=3, eta=0.7, same_latent=True, batch_size=3),
                      per_prompt=2, keep_trajectories=True)
    # the same batch layout on both sides: matmuls may round differently at another batch size
    plain = generate(flow_pipe, PROMPTS, seeds, SamplerSettings(steps=3, eta=0.7, batch_size=3), per_prompt=2,
                     keep_trajectories=True)
    x_T = shared.trajectory.latents[:, 0]
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[2], x_T[3]) and not torch.equal(x_T[0], x_T[2])
    first = [0, 2]  # a group's first sample is the plain one; the others keep their own step noise
    torch.testing.assert_close(shared.trajectory.latents[first], plain.trajectory.latents[first], rtol=0, atol=0)
    assert (shared.final_latents[1] - shared.final_latents[0]).abs().max() > 1e-3
