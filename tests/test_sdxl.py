"""SDXL pipelines (two text encoders, pooled embeddings, size ids) through the one sampling service: loading, the
conditioning the pipeline itself builds, sampling that matches plain diffusers, re-scoring, and finetuning."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red circle", "a blue square on a white background"]
@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_pipeline_dir):
    return tiny_sdxl_pipeline_dir


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    from rewardtune.diffusion.loading import load_pipeline

    return load_pipeline(str(sdxl_dir))


def test_load_picks_the_sdxl_backbone(sdxl_pipe):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from rewardtune.diffusion.backbones import SDXLBackbone, backbone_of, denoiser

    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline) and isinstance(sdxl_pipe.scheduler, DDIMScheduler)
    assert sdxl_pipe.config.force_zeros_for_empty_prompt is True  # a config value, not a component to pass as None
    assert not sdxl_pipe.scheduler.config.clip_sample and not sdxl_pipe.scheduler.config.set_alpha_to_one
    backbone = backbone_of(sdxl_pipe)
    assert isinstance(backbone, SDXLBackbone) and backbone.family == "ddim" and denoiser(sdxl_pipe) is sdxl_pipe.unet
    assert backbone.frozen_parts(sdxl_pipe) == [sdxl_pipe.vae, sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2]


def test_conditioning_is_the_pipelines_own(sdxl_pipe):
    """States and pooled embeddings as ``encode_prompt`` gives them, size ids of the requested size, and the
    empty negative prompt as zeros, as ``__call__`` uses it by default (an empty *prompt* is encoded as text)."""
    from rewardtune.diffusion.backbones import Conditioning
    from rewardtune.diffusion.sampling import encode_negative, encode_prompts

    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    cond = encode_prompts(sdxl_pipe, PROMPTS)
    assert cond.kind == "sdxl" and cond.embeds.shape == (2, 32, 32)
    assert cond.pooled.shape == (2, 8) and cond.time_ids.shape == (2, 6)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert encode_prompts(sdxl_pipe, PROMPTS, 48, 24).time_ids.tolist() == [[48, 24, 0, 0, 48, 24]] * 2
    empty = encode_negative(sdxl_pipe)
    assert torch.equal(empty.embeds[0], negative[0]) and torch.equal(empty.pooled[0], negative_pooled[0])
    assert not empty.embeds.any() and not empty.pooled.any()
    assert encode_prompts(sdxl_pipe, [""]).embeds.any()  # an unconditional training prompt is text, not zeros
    sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:  # without the flag the pipeline encodes "" like any prompt, and so do we
        _, encoded, _, encoded_pooled = sdxl_pipe.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=True)
        empty = encode_negative(sdxl_pipe)
    finally:
        sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert empty.embeds.any() and torch.equal(empty.embeds, encoded) and torch.equal(empty.pooled, encoded_pooled)
    both = Conditioning.cat([empty.expand(2), cond])[torch.tensor([3, 0])].to(torch.float64)
    assert both.time_ids.dtype == torch.float64 and both.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert torch.equal(both.pooled[0].float(), pooled[1]) and torch.equal(both.embeds[1].float(), encoded[0])


def test_size_ids_and_pooled_embeddings_reach_the_unet(sdxl_pipe):
    """Dropping either the size ids' change or the pooled embedding changes the UNet's output."""
    from rewardtune.diffusion.backbones import Conditioning
    from rewardtune.diffusion.sampling import encode_prompts

    cond, t = encode_prompts(sdxl_pipe, PROMPTS), torch.tensor([900, 300])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = cond.call(sdxl_pipe.unet, x, t)
        resized = encode_prompts(sdxl_pipe, PROMPTS, 64, 64).call(sdxl_pipe.unet, x, t)
        unpooled = Conditioning(cond.embeds, torch.zeros_like(cond.pooled), kind="sdxl", time_ids=cond.time_ids)
        unpooled = unpooled.call(sdxl_pipe.unet, x, t)
    assert (resized - base).abs().max() > 1e-4 and (unpooled - base).abs().max() > 1e-4
