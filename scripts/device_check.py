"""A prepared GPU check: finetuning memory and speed of full-size random-weight models, as one JSON file.

    python scripts/device_check.py --size full --device cuda --out DIR     # scripts/device_check.sh does this
    python scripts/device_check.py --size toy --device cpu --out DIR       # the same code at toy size (the test)
    python scripts/device_check.py --list                                  # the case names

Models (random weights, built here, saved with the project's own ``Backbone.save`` into a temporary folder and
loaded back through :func:`rewardtune.diffusion.loading.load_pipeline` by the trainer, the real path):

* ``sd15``: Stable Diffusion 1.5's UNet config (block_out_channels 320/640/1280/1280, cross_attention_dim 768,
  4 latent channels, sample_size 64 -> 512 px; 859.5M parameters) with SD's VAE and a 1-layer, 768-wide
  ``CLIPTextModel`` (77 positions);
* ``sd35m``: Stable Diffusion 3.5 Medium's transformer config (24 layers, 24 heads of 64, joint_attention_dim 4096,
  caption_projection_dim 1536, pooled_projection_dim 2048, patch 2, 16 channels, pos_embed_max_size 384, qk_norm
  rms_norm, dual attention in layers 0..12, sample_size 128; 2.24B parameters plus the 226M-entry position table),
  SD3's 16-channel VAE (scaling 1.5305, shift 0.0609), 1-layer CLIP-L (768) and CLIP-G (1280) encoders with
  projections and no T5 (the T5-less path of :mod:`rewardtune.diffusion.sd3`), at 512 x 512.

The tokenizers are CLIP BPE tokenizers learned on a few prompts (``save_clip_tokenizer``), so the embedding tables
are small; the text encoders have one layer to save build time. Both are recorded in the JSON's ``models`` notes.

Cases (one JSON row each; ``--cases`` takes comma-separated ``fnmatch`` patterns over the names):

* ``reward-aesthetic``: seconds to score ``reward_images`` images (512 px at full size) with the LAION aesthetic
  reward (a random CLIP ViT-L/14 image tower in the ``CLIPModel`` folder format plus a random head, loaded through
  :func:`rewardtune.rewards.load_reward` from a local folder) in one batched call, against one call per image;
  ``ratio`` = (seconds of the one-per-call way) / (seconds of the batched call);
* ``sparse24-sd15``: 2:4 semi-structured sparsity (``rewardtune prune`` method ``semi_structured``) of the sd15
  UNet's Linear layers: one forward of ``2 * batch_size`` rows (guidance) in fp16 with the 2:4 zeros in dense
  tensors against the same weights as ``torch.sparse.to_sparse_semi_structured`` tensors (sparse kernels):
  ``speedup`` = dense / sparse seconds, ``max_abs_diff`` between the two outputs. Where the kernels cannot run (the
  CPU, a GPU below compute capability 8.0) the row is ``unsupported`` with the reason, after checking the 2:4 masks
  (exactly half of each eligible layer's weights zeroed), and the exit status is unaffected;
* ``{sd15,sd35m}-{lora,full}-{nogc,gc}-prdp`` and ``{sd15,sd35m}-lora-nogc-grpo``: a 2-epoch finetune (the trained
  reward is ``jpeg_incompressibility``, which loads without model files: the run config cannot pass reward options),
  with accelerate's mixed precision ``fp16`` for sd15 and ``bf16`` for sd35m (on the CPU both use bf16: accelerate
  has no fp16 autocast there). Recorded: peak GPU memory (``torch.cuda.max_memory_allocated``, reset per case),
  the seconds of each epoch by phase (``metrics.jsonl``'s ``seconds_{sampling,reward,update}``; ``seconds_per_epoch``
  is the second, warm epoch, which also has PRDP's reference pass), rollout samples/s of the second epoch
  (samples / ``seconds_sampling``, which includes the reference log-prob pass and VAE decoding), and samples/s of a
  separate :func:`rewardtune.diffusion.service.generate` call after training (trajectories kept, no reference pass).

Precision: ``Trainer.build`` loads the pipeline in float32 and ``RunConfig`` offers ``mixed_precision`` only
(accelerate's autocast of the denoiser's forward; weights, gradients and AdamW state stay fp32, fp16 adds
accelerate's gradient scaler). Training with fp16/bf16 weights is not a config option, so the check measures
mixed precision.

Drivers: ``--driver epochs`` (default) builds the run exactly as :func:`rewardtune.finetune.run.run_finetune` does
(``Accelerator``, ``validate_run``, ``Trainer.build``) and calls ``Trainer.epoch`` twice, leaving out the evaluation
grids, checkpoints and final model (at full size a full-finetuning checkpoint of SD3.5-M is ~30 GB of optimizer
state and weights written to disk, minutes the 8-minute budget does not have); ``--driver run`` calls
``run_finetune`` itself (whole run folder, deleted after each case).

``--max-seconds``: a case is not started when the elapsed time plus the duration of the last case of the same model
would pass it; it is recorded as ``skipped``. The JSON is rewritten after every case, so a killed run leaves what
it measured. A failing case records its error and the script goes on; the exit status is 1 when a case failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain checkout (the device machine has no editable install)
    sys.path.insert(0, str(ROOT))

SCHEMA = 1
GIB = 1024 ** 3
PROMPTS = ["a red circle", "a blue square on a white background", "a small green triangle in the top left corner",
           "a painting of a cat", "a photo of a dog"]
MODELS = ("sd15", "sd35m")
PRECISION = {"sd15": "fp16", "sd35m": "bf16"}  # each model's usual half precision
ETA = {"sd15": 1.0, "sd35m": 0.7}  # DDIM eta 1 (PRDP); the flow SDE's noise level 0.7 (Flow-GRPO)
REWARD_CASE = "reward-aesthetic"
SPARSE_CASE = "sparse24-sd15"  # 2:4 semi-structured Linear sparsity of the SD-1.5-size UNet (issue 15)


@dataclass(frozen=True)
class Size:
    """Image size and per-epoch work of one ``--size``."""

    name: str
    resolution: int
    prompts_per_epoch: int
    images_per_prompt: int
    steps: int
    batch_size: int  # samples per sampling call, (sample, step) pairs per reference-pass call
    forward_chunk: int  # (sample, step) pairs per denoiser call in the update (x2 rows with guidance)
    lora_rank: int
    reward_images: int
    max_seconds: float


# Full size: per epoch 2 prompts x 2 images (PRDP and GRPO need >= 2 per prompt), 8 sampling steps with guidance
# (8 rows per call), one inner pass (K=1) over the 4 x 8 (sample, step) pairs in chunks of 4 pairs. Estimated on
# one H200: SD-1.5 ~15 s and SD3.5-M ~40 s per case (loading and both epochs), ~45 s of building, ~10 s of reward
# timing, ~10 s for the 2:4 row: ~5 minutes for the 12 rows, inside 8 minutes; --max-seconds (7 min) guards the rest.
FULL = Size("full", resolution=512, prompts_per_epoch=2, images_per_prompt=2, steps=8, batch_size=4, forward_chunk=4,
            lora_rank=16, reward_images=16, max_seconds=420.0)
# Toy size: conftest's tiny models, 32 x 32 images, 2 steps; the whole selection of the test runs in seconds.
TOY = Size("toy", resolution=32, prompts_per_epoch=2, images_per_prompt=2, steps=2, batch_size=4, forward_chunk=64,
           lora_rank=2, reward_images=8, max_seconds=120.0)
SIZES = {"full": FULL, "toy": TOY}


@dataclass(frozen=True)
class Case:
    model: str
    lora: bool
    checkpointing: bool
    algorithm: str

    @property
    def name(self) -> str:
        return f"{self.model}-{'lora' if self.lora else 'full'}-{'gc' if self.checkpointing else 'nogc'}-" \
               f"{self.algorithm}"


def all_cases() -> list[Case]:
    """Run order: per model LoRA without/with checkpointing, the GRPO row, then full finetuning."""
    cases = []
    for model in MODELS:
        cases += [Case(model, True, False, "prdp"), Case(model, True, True, "prdp"), Case(model, True, False, "grpo"),
                  Case(model, False, False, "prdp"), Case(model, False, True, "prdp")]
    return cases


def case_names() -> list[str]:
    return [REWARD_CASE] + [c.name for c in all_cases()] + [SPARSE_CASE]


def select(patterns: str | None) -> list[str]:
    """The case names matching any comma-separated ``fnmatch`` pattern (all when None), in run order."""
    names = case_names()
    if not patterns:
        return names
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"--cases {unknown[0]!r} matches no case; cases: {', '.join(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(n: int) -> float:
    return round(n / GIB, 3)


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"peak_gpu_mem_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_mem_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_gpu_reserved_gib": gib(torch.cuda.max_memory_reserved())}


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


# --- building the random models ----------------------------------------------------------------------------------

def tokenizer(folder: Path, max_length: int):
    """A CLIP BPE tokenizer learned on :data:`PROMPTS`, with ``max_length`` positions (SD's 77 at full size)."""
    from transformers import CLIPTokenizer

    from rewardtune.shapes.tiny_models import save_clip_tokenizer

    path = save_clip_tokenizer(PROMPTS, folder)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": max_length}))
    return CLIPTokenizer.from_pretrained(path)


def clip_text_config(tok, width: int, heads: int, projection: int | None, act: str, max_length: int):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                          num_attention_heads=heads, max_position_embeddings=max_length, hidden_act=act,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                          **extra)


def sd_vae(full: bool, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    if full:  # SD 1.x / SD3 VAE layout
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                             layers_per_block=2, latent_channels=latent_channels, norm_num_groups=32, **extra)
    return AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=32, **extra)


def build_sd15(folder: Path, full: bool):
    """SD-1.5 UNet config (or conftest's tiny one), SD's VAE, a 1-layer CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from rewardtune.shapes.tiny_models import scheduler_config

    tok = tokenizer(folder / "_tokenizer", 77 if full else 32)
    if full:
        text = CLIPTextModel(clip_text_config(tok, 768, 12, None, "quick_gelu", 77))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32)
        vae = sd_vae(True, 4, sample_size=512)
    else:
        text = CLIPTextModel(clip_text_config(tok, 16, 2, None, "quick_gelu", 32))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
            attention_head_dim=2)
        vae = sd_vae(False, 4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_sd35m(folder: Path, full: bool):
    """SD3.5-Medium transformer config (or a 2-layer toy with the same features: dual attention, RMS qk-norm,
    16 channels), SD3's VAE, 1-layer CLIP-L/CLIP-G encoders with projections, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    length = 77 if full else 32
    tok = tokenizer(folder / "_tokenizer", length)
    if full:
        clip_l = CLIPTextModelWithProjection(clip_text_config(tok, 768, 12, 768, "quick_gelu", length))
        clip_g = CLIPTextModelWithProjection(clip_text_config(tok, 1280, 20, 1280, "gelu", length))
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
        vae = sd_vae(True, 16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False)
    else:
        clip_l = CLIPTextModelWithProjection(clip_text_config(tok, 16, 2, 8, "quick_gelu", length))
        clip_g = CLIPTextModelWithProjection(clip_text_config(tok, 16, 2, 8, "gelu", length))
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
        vae = sd_vae(False, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_l, tokenizer=tok, text_encoder_2=clip_g,
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


BUILDERS = {"sd15": build_sd15, "sd35m": build_sd35m}
SAVE_DTYPE = {"sd15": torch.float16, "sd35m": torch.bfloat16}
MODEL_NOTES = {
    "sd15": "random weights; UNet at SD-1.5's config; text encoder: 1-layer CLIPTextModel of width 768 (SD-1.5 has "
            "12 layers); BPE vocabulary learned on a few prompts (CLIP has 49408 tokens); saved in fp16",
    "sd35m": "random weights; transformer at SD3.5-Medium's config; CLIP-L (768) and CLIP-G (1280) text encoders with "
             "projections, 1 layer each (SD3.5 has 12 and 32); no T5 (the T5-less SD3 path); BPE vocabulary learned "
             "on a few prompts; saved in bf16",
}


def build_model(model: str, folder: Path, size: Size, device: str) -> dict:
    """Build ``model`` with random weights on ``device``, save it with ``Backbone.save`` into ``folder/pipe``;
    returns its JSON record (the pipeline path under ``path``)."""
    from diffusers.utils import logging as diffusers_logging

    from rewardtune.diffusion.backbones import backbone_of

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 2.5B parameters
        pipe = BUILDERS[model](folder, size is FULL)
    backbone = backbone_of(pipe)
    denoiser = backbone.denoiser(pipe)
    params = sum(p.numel() for p in denoiser.parameters())
    buffers = sum(b.numel() for b in denoiser.buffers())
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the cast and the absent T5 warn; both are meant
    try:
        pipe.to(dtype=SAVE_DTYPE[model])
        backbone.save(pipe, folder / "pipe")
    finally:
        diffusers_logging.set_verbosity(verbosity)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(denoiser.config).items()
              if not k.startswith("_")}
    del pipe, denoiser
    free_memory(device)
    return {"path": str(folder / "pipe"), "denoiser": type(backbone).__name__, "denoiser_params": params,
            "denoiser_buffers": buffers, "denoiser_config": config, "notes": MODEL_NOTES[model],
            "build_seconds": round(time.perf_counter() - start, 2)}


def save_aesthetic(folder: Path, full: bool) -> dict:
    """A random ``CLIPModel`` folder (ViT-L/14 image tower at full size: 24 layers of 1024, patch 14, 224 px,
    projection 768; a 1-layer text tower) with its processor config, and a random LAION head file; returns the
    ``load_reward("aesthetic", ...)`` options."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rewardtune.rewards.aesthetic import HEAD_FILE, AestheticHead

    tok = tokenizer(folder / "_tokenizer", 77)
    text = clip_text_config(tok, 768 if full else 32, 12 if full else 2, None, "quick_gelu", 77).to_dict()
    if full:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="quick_gelu")
        projection, crop, edge = 768, 224, 224
    else:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=24, patch_size=8)
        projection, crop, edge = 12, 24, 28
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    clip.save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop}).save_pretrained(
        folder / "clip")
    torch.save(AestheticHead(projection).state_dict(), folder / HEAD_FILE)
    return {"clip": str(folder / "clip"), "head": str(folder / HEAD_FILE)}


# --- measurements -------------------------------------------------------------------------------------------------

def measure_reward(size: Size, device: str, work: Path) -> dict:
    """Batched against one-image-per-call scoring of ``size.reward_images`` random images."""
    from rewardtune.rewards import load_reward

    start = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        options = save_aesthetic(work / "aesthetic", size is FULL)
    free_memory(device)
    built = time.perf_counter() - start
    reward = load_reward("aesthetic", device=device, **options).to(device).eval()
    n, side = size.reward_images, size.resolution
    images = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def batched() -> float:
        sync(device)
        t = time.perf_counter()
        reward(images, prompts)
        sync(device)
        return time.perf_counter() - t

    def one_per_call() -> float:
        sync(device)
        t = time.perf_counter()
        for i in range(n):
            reward(images[i:i + 1], prompts[i:i + 1])
        sync(device)
        return time.perf_counter() - t

    with torch.no_grad():
        reward(images[:1], prompts[:1])  # warm-up: kernels, autotuning
        batched()
        batched_s = statistics.median(batched() for _ in range(3))
        single_s = statistics.median(one_per_call() for _ in range(2))
    record = {"reward": "aesthetic", "clip": "ViT-L/14 (random)" if size is FULL else "tiny (random)",
              "images": n, "image_size": side, "dtype": "float32", "batched_seconds": round(batched_s, 5),
              "one_per_call_seconds": round(single_s, 5), "ratio": round(single_s / batched_s, 3),
              "batched_images_per_s": round(n / batched_s, 2), "one_per_call_images_per_s": round(n / single_s, 2),
              "build_seconds": round(built, 2)}
    return record


def measure_sparse24(size: Size, device: str, model_path: str) -> dict:
    """Dense-with-2:4-zeros against sparse-kernel forward seconds of the sd15 UNet (see the module docstring)."""
    from diffusers import UNet2DConditionModel

    from rewardtune.prune.semi_structured import (
        SemiStructuredOptions,
        eligible_linears,
        semi_structured_support,
        two_four_mask,
    )

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", torch_dtype=dtype).to(device).eval()
    reason = semi_structured_support(device, dtype)
    # the kernels' shape rules where they run; any multiple of 4 otherwise (the toy UNet is narrower than 64)
    layers = eligible_linears(unet, SemiStructuredOptions(accelerate=reason is None,
                                                          min_features=64 if size is FULL else 4))
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.mul_(two_four_mask(layer.weight))
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    linear_weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear))
    record = {"layers": len(layers), "zero_fraction": round(zeros / max(total, 1), 4),
              "sparse_weight_fraction_of_linear": round(total / max(linear_weights, 1), 4), "dtype": str(dtype)}
    if reason:
        return {**record, "status": "unsupported", "reason": reason}
    from torch.sparse import to_sparse_semi_structured

    rows, latent = 2 * size.batch_size, unet.config.sample_size
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, unet.config.in_channels, latent, latent, generator=generator, device=device, dtype=dtype)
    t = torch.full((rows,), 500, device=device)
    text = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator, device=device, dtype=dtype)

    def forward_seconds() -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            out = unet(x, t, encoder_hidden_states=text).sample  # warm-up
            times = []
            for _ in range(5):
                sync(device)
                start = time.perf_counter()
                out = unet(x, t, encoder_hidden_states=text).sample
                sync(device)
                times.append(time.perf_counter() - start)
        return statistics.median(times), out

    dense_s, dense_out = forward_seconds()
    for layer in layers.values():
        layer.weight = torch.nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    sparse_s, sparse_out = forward_seconds()
    return {**record, "rows": rows, "resolution": latent * 8, "dense_seconds": round(dense_s, 5),
            "sparse_seconds": round(sparse_s, 5), "speedup": round(dense_s / sparse_s, 3),
            "max_abs_diff": float((dense_out.float() - sparse_out.float()).abs().max())}


def run_config(case: Case, size: Size, device: str, model_path: str, out: Path, precision: dict[str, str]):
    from rewardtune.config import load_config
    from rewardtune.finetune.run import RunConfig

    precision = precision[case.model] if device.startswith("cuda") else "bf16"
    overrides = [
        f"model={model_path}", f"output_dir={out}", f"prompts=[{', '.join(PROMPTS[:2])}]", "epochs=2",
        "save_every=2", f"lora_rank={size.lora_rank if case.lora else 'null'}", f"mixed_precision={precision}",
        f"gradient_checkpointing={'true' if case.checkpointing else 'false'}", f"device={device}",
        f"eval_prompts=[{PROMPTS[0]}]", "eval_seeds=[0]", f"train.algorithm={case.algorithm}",
        "train.reward=jpeg_incompressibility", f"train.prompts_per_epoch={size.prompts_per_epoch}",
        f"train.images_per_prompt={size.images_per_prompt}", "train.inner_steps=1",
        f"train.forward_chunk={size.forward_chunk}", f"train.sampling.steps={size.steps}",
        f"train.sampling.batch_size={size.batch_size}", f"train.sampling.eta={ETA[case.model]}",
        f"train.sampling.height={size.resolution}", f"train.sampling.width={size.resolution}"]
    return load_config(RunConfig, None, overrides)


def reset_accelerate() -> None:
    """accelerate keeps one state per process, fixed at the first ``Accelerator``: each case builds its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_epochs(cfg, device: str) -> tuple[list[dict], list[float], float | None]:
    """``run_finetune``'s setup (``Accelerator``, ``validate_run``, ``Trainer.build``) and ``Trainer.epoch`` for each
    epoch, without evaluation grids, checkpoints or the final model. Returns the epoch records, their wall seconds,
    and the samples/s of one ``generate`` call after training."""
    from accelerate import Accelerator

    from rewardtune.diffusion.service import generate
    from rewardtune.finetune.run import validate_run
    from rewardtune.finetune.trainer import Trainer

    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    plan = validate_run(cfg, accelerator.num_processes)
    trainer = Trainer.build(cfg, plan, accelerator)
    records, walls = [], []
    try:
        for epoch in range(cfg.epochs):
            sync(device)
            start = time.perf_counter()
            records.append(trainer.epoch(epoch))
            sync(device)
            walls.append(time.perf_counter() - start)
        train = cfg.train
        count = train.prompts_per_epoch * train.images_per_prompt
        prompts = PROMPTS[:train.prompts_per_epoch]
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            generate(trainer.pipe, prompts, list(range(count)), train.sampling, per_prompt=train.images_per_prompt,
                     keep_trajectories=True)
        sync(device)
        generate_rate = count / (time.perf_counter() - start)
    finally:
        del trainer
    return records, walls, generate_rate


def run_whole(cfg) -> tuple[list[dict], list[float] | None, None]:
    """``run_finetune`` end to end; the records from its ``metrics.jsonl``."""
    from rewardtune.finetune.report import read_metrics
    from rewardtune.finetune.run import run_finetune

    run_finetune(cfg)
    return read_metrics(Path(cfg.output_dir) / "metrics.jsonl"), None, None


PHASES = ("sampling", "reward", "update")


def measure_case(case: Case, size: Size, device: str, model_path: str, work: Path, driver: str,
                 precision: dict[str, str]) -> dict:
    out = work / "runs" / case.name
    cfg = run_config(case, size, device, model_path, out, precision)
    reset_accelerate()
    free_memory(device)
    before = gib(torch.cuda.memory_allocated()) if device.startswith("cuda") else None
    try:
        runner = run_epochs if driver == "epochs" else (lambda c, d: run_whole(c))
        records, walls, generate_rate = runner(cfg, device)
    finally:
        reset_accelerate()
        shutil.rmtree(out, ignore_errors=True)
    if len(records) != cfg.epochs:
        raise RuntimeError(f"expected {cfg.epochs} epoch records, got {len(records)}")
    phases = [{k: r[f"seconds_{k}"] for k in PHASES} for r in records]
    epoch_seconds = [sum(p.values()) for p in phases]
    last, samples = records[-1], cfg.train.prompts_per_epoch * cfg.train.images_per_prompt
    return {
        "mixed_precision": cfg.mixed_precision, "weights_dtype": "float32", "lora_rank": cfg.lora_rank,
        "gpu_mem_at_start_gib": before,  # should be ~0: what earlier cases left allocated
        "epochs": cfg.epochs, "samples_per_epoch": samples, "steps": cfg.train.sampling.steps,
        "seconds_per_epoch": round(epoch_seconds[-1], 4),
        "epoch_seconds": [round(s, 4) for s in epoch_seconds],
        "epoch_wall_seconds": None if walls is None else [round(s, 4) for s in walls],
        "phase_seconds": {k: round(v, 4) for k, v in phases[-1].items()},
        "rollout_samples_per_s": round(samples / phases[-1]["sampling"], 3),
        "generate_samples_per_s": None if generate_rate is None else round(generate_rate, 3),
        "gradient_steps": last.get("steps"), "skipped_steps": last.get("skipped"), "loss": last.get("loss"),
        "grad_norm": last.get("grad_norm"),
    }


# --- report -------------------------------------------------------------------------------------------------------

def device_record(device: str) -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    record = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "accelerate": accelerate.__version__,
              "peft": peft.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "gpu": None, "gpu_memory_gib": None, "capability": None}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        record.update(gpu=props.name, gpu_memory_gib=gib(props.total_memory),
                      capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return record


def quiet_progress_bars() -> None:
    """transformers' per-load "Loading weights" and "Writing model shards" bars off (the log is the timeline)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def write_report(path: Path, report: dict) -> None:
    from rewardtune.utils.io import atomic_write_json

    atomic_write_json(path, report)


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    lines = [f"{'case':<24} {'status':<8} {'prec':<5} {'peak GiB':>9} {'s/epoch':>9} {'rollout/s':>10} "
             f"{'generate/s':>11} {'steps':>5}"]
    for row in report["cases"]:
        lines.append(f"{row['name']:<24} {row['status']:<8} {row.get('mixed_precision') or '-':<5} "
                     f"{fmt(row.get('peak_gpu_mem_gib')):>9} {fmt(row.get('seconds_per_epoch')):>9} "
                     f"{fmt(row.get('rollout_samples_per_s'), '.3f'):>10} "
                     f"{fmt(row.get('generate_samples_per_s'), '.3f'):>11} {fmt(row.get('gradient_steps'), 'g'):>5}")
        if row["status"] != "ok":
            lines.append(f"    {row.get('error') or row.get('reason')}")
    scoring = report.get("reward_scoring")
    if scoring and scoring.get("status") == "ok":
        s = scoring
        lines.append(f"reward scoring ({s['reward']}, {s['images']} images of {s['image_size']} px): batched "
                     f"{s['batched_seconds']:.4f} s, one per call {s['one_per_call_seconds']:.4f} s, "
                     f"ratio {s['ratio']:.2f}x")
    sp = next((row for row in report["cases"] if row["name"] == SPARSE_CASE and row["status"] == "ok"), None)
    if sp:
        lines.append(f"2:4 sparsity ({sp['layers']} Linear layers, {sp['rows']} rows at {sp['resolution']} px): "
                     f"dense {sp['dense_seconds']:.4f} s, sparse {sp['sparse_seconds']:.4f} s, {sp['speedup']:.2f}x, "
                     f"max |diff| {sp['max_abs_diff']:.3g}")
    lines.append(f"elapsed {report['elapsed_seconds']:.1f} s of --max-seconds {report['max_seconds']:.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="toy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="device_check", help="folder of device_check.json")
    parser.add_argument("--cases", default=None, help="comma-separated fnmatch patterns over the case names")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no case that would end past this many seconds (default: 420 full, 120 toy)")
    parser.add_argument("--driver", choices=("epochs", "run"), default="epochs")
    parser.add_argument("--work", default=None, help="folder for the built models (default: a temporary one, "
                                                     "deleted at the end)")
    parser.add_argument("--precision", default="",
                        help="mixed precision per model on CUDA, e.g. sd15=bf16 (default: sd15=fp16,sd35m=bf16)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    return parser.parse_args(argv)


def parse_precision(text: str) -> dict[str, str]:
    """``MODEL=PREC,...`` over :data:`PRECISION` (``no``, ``fp16`` or ``bf16``)."""
    precision = dict(PRECISION)
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, _, value = part.partition("=")
        if model not in MODELS or value not in ("no", "fp16", "bf16"):
            raise SystemExit(f"--precision {part!r}: expected MODEL=PREC with MODEL in {', '.join(MODELS)} and PREC "
                             "no, fp16 or bf16")
        precision[model] = value
    return precision


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(case_names()))
        return 0
    began = time.perf_counter()
    size, device = SIZES[args.size], args.device
    max_seconds = args.max_seconds if args.max_seconds is not None else size.max_seconds
    selected = select(args.cases)
    precision = parse_precision(args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "device_check.json"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="device_check_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_progress_bars()
    used = precision if device.startswith("cuda") else dict.fromkeys(MODELS, "bf16")  # no fp16 autocast on CPU
    settings = {**size.__dict__, "trained_reward": "jpeg_incompressibility", "inner_steps": 1, "epochs": 2,
                "guidance": 5.0, "precision": used, "eta": ETA}
    report = {"schema": SCHEMA, "size": size.name, "driver": args.driver, "max_seconds": max_seconds,
              "selected": selected, "settings": settings,
              "device": device_record(device), "models": {}, "cases": [], "reward_scoring": None,
              "elapsed_seconds": 0.0}
    durations: dict[str, float] = {}
    failed = False

    def elapsed() -> float:
        return time.perf_counter() - began

    def model_path(model: str) -> str:
        """The saved pipeline of ``model``, built on first use."""
        if model not in report["models"]:
            log(f"building {model} ({size.name})")
            report["models"][model] = build_model(model, work / model, size, device)
        return report["models"][model]["path"]

    def save() -> None:
        report["elapsed_seconds"] = round(elapsed(), 2)
        write_report(path, report)

    try:
        for name in selected:
            model = name.split("-")[0]
            row = {"name": name, "model": model if model in MODELS else None, "status": "ok"}
            if name not in (REWARD_CASE, SPARSE_CASE):
                case = next(c for c in all_cases() if c.name == name)
                row.update(algorithm=case.algorithm, lora=case.lora, gradient_checkpointing=case.checkpointing)
            estimate = durations.get(model, 0.0)
            if elapsed() + estimate > max_seconds:
                row.update(status="skipped", reason=f"over budget: {elapsed():.0f} s elapsed + ~{estimate:.0f} s "
                                                    f"> --max-seconds {max_seconds:.0f}")
                log(f"{name}: skipped ({row['reason']})")
            else:
                log(f"{name}: start ({elapsed():.0f} s elapsed)")
                start = time.perf_counter()
                try:
                    if name == REWARD_CASE:
                        free_memory(device)
                        row.update(measure_reward(size, device, work), **peak_memory(device))
                    elif name == SPARSE_CASE:
                        pipe = model_path("sd15")
                        free_memory(device)
                        row.update(measure_sparse24(size, device, pipe), **peak_memory(device))
                    else:
                        pipe = model_path(model)
                        free_memory(device)
                        row.update(measure_case(case, size, device, pipe, work, args.driver, precision),
                                   **peak_memory(device))
                except Exception as exc:  # noqa: BLE001  (a failing case is a result; the others still run)
                    failed = True
                    row.update(status="error", error=error_text(exc), **peak_memory(device))
                    traceback.print_exc(file=sys.stderr)
                    del exc
                row["case_seconds"] = round(time.perf_counter() - start, 2)
                durations[model] = row["case_seconds"]
                free_memory(device)
                log(f"{name}: {row['status']} in {row['case_seconds']:.1f} s")
            if name == REWARD_CASE:
                report["reward_scoring"] = row
            report["cases"].append(row)
            save()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    save()
    print(table(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
