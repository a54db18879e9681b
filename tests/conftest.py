"""Shared fixtures: a tiny random Stable Diffusion pipeline saved in the real diffusers folder format."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TOKENIZER_CORPUS = [
    "a red circle", "a blue square on a white background", "a small green triangle in the top left corner",
    "a painting of a cat", "a photo of a dog",
]


def build_tiny_pipeline(folder):
    """Random tiny SD components (real classes, real file formats) saved with ``save_pretrained``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from rewardtune.shapes.tiny_models import save_clip_tokenizer, scheduler_config

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(TOKENIZER_CORPUS, folder / "_tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def build_tiny_flow_pipeline(folder, t5: bool = False):
    """A random tiny SD3 pipeline (two CLIP encoders with projections, optionally a T5 encoder, a 2-block
    ``SD3Transformer2DModel``, a flow-matching scheduler), saved with ``save_pretrained``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from rewardtune.shapes.tiny_models import save_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(TOKENIZER_CORPUS, folder / "_tokenizer"))

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, projection_dim=8, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))

    t5_encoder = t5_tokenizer = None
    if t5:
        from transformers import T5Config, T5EncoderModel

        t5_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=32, d_kv=8, num_layers=1,
                                             num_heads=2, pad_token_id=tokenizer.eos_token_id))
        t5_tokenizer = tokenizer
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    with torch.no_grad():  # AdaLN-zero starts at zero: perturb so that outputs depend on every input
        for param in transformer.parameters():
            param.add_(0.05 * torch.randn_like(param))
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, sample_size=32,
        shift_factor=0.1)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
                                    tokenizer_2=tokenizer, text_encoder_3=t5_encoder, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(folder / "pipe")  # without a T5, model_index.json lacks text_encoder_3: load must cope
    return folder / "pipe"


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


# The integration tier: tests that run whole commands or jobs end to end (the rest are unit tests of one piece).
INTEGRATION = ("reliability/", "_cli.py", "_run.py", "test_commands.py", "test_finetune_multiprocess.py",
               "test_finetune_algorithm_registry.py", "test_prune_registry.py")


def pytest_collection_modifyitems(config, items):
    """Mark the integration tier (``-m "not integration"`` runs the unit tests alone, in about two minutes)."""
    for item in items:
        path = item.path.as_posix()
        if any(part in path for part in INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_flow_pipeline_dir(tmp_path_factory):
    return build_tiny_flow_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture
def fresh_pipe(tiny_pipeline_dir):
    """A fresh tiny pipeline per test (updates must not leak into the session's ``tiny_pipe``), VAE and text encoder
    frozen."""
    from rewardtune.diffusion.loading import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    from rewardtune.diffusion.loading import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir))
