"""SDXL pipelines (two text encoders, pooled embeddings, size ids) through the one sampling service: loading, the
conditioning the pipeline itself builds, sampling that matches plain diffusers, re-scoring, and finetuning."""

from __future__ import annotations

import pytest
import torch

from rewardtune.diffusion.settings import SamplerSettings

PROMPTS = ["a red circle", "a blue square on a white background"]
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json: Euler, with the DDIM keys that the conversion to
# DDIM reads (no x0 clipping, the last step to alphas_cumprod[0])
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def build_tiny_sdxl_pipeline(folder):
    """A random tiny SDXL pipeline (a CLIP encoder and a CLIP encoder with projection, a 2-block
    ``UNet2DConditionModel`` with ``text_time`` added conditioning, SDXL's Euler scheduler config), saved with
    ``save_pretrained``."""
    from conftest import TOKENIZER_CORPUS
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from rewardtune.shapes.tiny_models import save_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(TOKENIZER_CORPUS, folder / "_tokenizer"))
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    time_dim, projection = 4, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, sample_size=32,
        scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=projection)),
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


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


def test_ddim_sampling_matches_plain_diffusers(sdxl_pipe):
    """eta 0 reproduces StableDiffusionXLPipeline.__call__ (same DDIM scheduler) seed for seed; the size ids and
    pooled embeddings reach the UNet (dropping either changes the output)."""
    from rewardtune.diffusion.backbones import Conditioning
    from rewardtune.diffusion.sampling import encode_prompts
    from rewardtune.diffusion.service import generate

    settings = SamplerSettings(steps=4, guidance=3.0, eta=0.0)
    out = generate(sdxl_pipe, PROMPTS, [5, 6], settings, keep_trajectories=True)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    latents = sdxl_pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=generators,
                        output_type="latent").images
    assert (out.final_latents - latents).abs().max() < 1e-4
    assert out.images.shape == (2, 3, 32, 32) and torch.isnan(out.trajectory.log_probs).all()
    cond, t = encode_prompts(sdxl_pipe, PROMPTS), torch.tensor([900, 300])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = cond.call(sdxl_pipe.unet, x, t)
        resized = encode_prompts(sdxl_pipe, PROMPTS, 64, 64).call(sdxl_pipe.unet, x, t)
        unpooled = Conditioning(cond.embeds, torch.zeros_like(cond.pooled), kind="sdxl", time_ids=cond.time_ids)
        unpooled = unpooled.call(sdxl_pipe.unet, x, t)
    assert (resized - base).abs().max() > 1e-4 and (unpooled - base).abs().max() > 1e-4


def test_ratio_is_one_before_the_first_update_and_an_update_moves_it(sdxl_pipe):
    """DDIM's recomputed log-probs (eta 1) equal the recorded ones (ratio exactly 1) until a GRPO step moves the
    UNet; the VAE and both text encoders stay frozen."""
    import copy

    from rewardtune.diffusion.rescore import trajectory_log_probs
    from rewardtune.finetune.algorithms import make_algorithm
    from rewardtune.finetune.config import FinetuneConfig, OptimConfig, SamplingConfig
    from rewardtune.finetune.rollout import collect_rollouts
    from rewardtune.finetune.update import make_optimizer, update_epoch

    pipe = copy.deepcopy(sdxl_pipe)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    sampling = SamplingConfig(steps=3, guidance=3.0, eta=1.0, batch_size=4)
    cfg = FinetuneConfig(algorithm="grpo", reward="jpeg_incompressibility", prompts_per_epoch=2, images_per_prompt=3,
                         inner_steps=1, sampling=sampling, optim=OptimConfig(lr=1e-2),
                         algorithm_options={"clip_range": 0.5, "kl_beta": 0.0})
    rollouts = collect_rollouts(pipe, PROMPTS, 3, sampling, lambda images, prompts: images.mean((1, 2, 3)), seeds=0)
    assert rollouts.family == "ddim" and rollouts.latents.shape == (6, 4, 4, 8, 8)
    assert torch.isfinite(rollouts.log_probs_old).all() and rollouts.prompt_embeds.time_ids.shape == (2, 6)

    def rescored():
        with torch.no_grad():
            return trajectory_log_probs(pipe.unet, pipe.scheduler, rollouts, torch.arange(6), torch.arange(3),
                                        sampling.guidance, sampling.eta, chunk=4)

    torch.testing.assert_close(rescored(), rollouts.log_probs_old, rtol=0, atol=1e-5)
    text_before = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    optimizer = make_optimizer(pipe.unet.parameters(), cfg.optim)
    metrics = update_epoch(pipe.unet, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["steps"] == 1 and metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert (rescored() - rollouts.log_probs_old).abs().max() > 1e-6
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder_2.state_dict().items())


@pytest.mark.parametrize("algorithm, lora", [("prdp", 2), ("ddpo", None)])
def test_finetune_runs_on_an_sdxl_pipeline(sdxl_dir, tmp_path, algorithm, lora):
    """The same finetuning config trains an SDXL pipeline; the final model loads in plain diffusers (a pipeline
    folder, or LoRA weights on the base) and generates."""
    import json

    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from rewardtune.config import load_config
    from rewardtune.finetune.run import RunConfig, run_finetune

    out = tmp_path / algorithm
    cfg = load_config(RunConfig, None, [
        f"model={sdxl_dir}", f"output_dir={out}", "prompts=[a red circle, a blue square]", "epochs=2",
        "save_every=1", f"lora_rank={lora or 'null'}", "eval_prompts=[a red circle]", "eval_seeds=[0]",
        f"train.algorithm={algorithm}", "train.reward=jpeg_incompressibility", "train.prompts_per_epoch=2",
        "train.images_per_prompt=2", "train.inner_steps=1", "train.sampling.steps=2", "train.sampling.eta=1.0",
        "train.optim.lr=1e-3"])
    run_finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["steps"] == 1 and r["grad_norm"] > 0 for r in records)
    final = out / "final"
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir if lora else final)
    if lora:
        pipe.load_lora_weights(final)
        names = {name for name, _ in pipe.unet.named_parameters() if "lora" in name}
        assert any(".attn1.to_q." in n for n in names) and any(".attn2.to_k." in n for n in names)
    else:
        trained, base = pipe.unet.state_dict(), StableDiffusionXLPipeline.from_pretrained(sdxl_dir).unet.state_dict()
        assert any(not torch.equal(trained[k], base[k]) for k in base)
        assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.config.force_zeros_for_empty_prompt
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_sample_command_on_an_sdxl_pipeline(sdxl_dir, tmp_path):
    from rewardtune.cli import main

    assert main(["sample", "--model", str(sdxl_dir), "--prompt", "a red circle", "--num-images", "2",
                 "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2 and (tmp_path / "s" / "grid.png").is_file()
