"""PickScore and the shared transformers-CLIP helpers, on a tiny random ``CLIPModel`` saved in the real formats
(config.json + model.safetensors, CLIP BPE tokenizer, preprocessor_config.json) and loaded by the real code path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_rewards import CLIP_MAX_POSITIONS, PICKSCORE_LOGIT_SCALE, PICKSCORE_MEAN, PICKSCORE_STD, save_pickscore_clip

from rewardtune.errors import ModelNotFoundError
from rewardtune.rewards import load_reward
from rewardtune.rewards.clip_hf import ImagePreprocessing

PROMPTS = ["a red circle", "a photo of a dog", "a red circle",
           "a small green triangle on a blue square on a white background in a photo of a red dog"]  # > 16 tokens
MEAN, STD, MAX_POSITIONS, LOGIT_SCALE = PICKSCORE_MEAN, PICKSCORE_STD, CLIP_MAX_POSITIONS, PICKSCORE_LOGIT_SCALE


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_pickscore_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def pickscore(clip_dir):
    return load_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hand_pickscore(folder, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Reference: 32x32 images need no resize/crop, so pixels = (x - mean) / std; each prompt tokenised alone and
    truncated by hand (keep the EOS); score = exp(logit_scale) * cos, in float64."""
    from transformers import CLIPModel, CLIPTokenizer

    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    scores = []
    with torch.no_grad():
        image_emb = _features(model.get_image_features(pixel_values=pixels)).double()
        for emb, prompt in zip(image_emb, prompts):
            ids = tokenizer(prompt)["input_ids"]
            ids = ids if len(ids) <= MAX_POSITIONS else ids[:MAX_POSITIONS - 1] + [tokenizer.eos_token_id]
            text_emb = _features(model.get_text_features(input_ids=torch.tensor([ids]))).double()[0]
            cos = emb @ text_emb / (emb.norm() * text_emb.norm())
            scores.append(model.logit_scale.double().exp() * cos)
    return torch.stack(scores)


def test_pickscore_matches_hand_computation(pickscore, clip_dir):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = pickscore(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert pickscore.differentiable and pickscore.name == "pickscore"
    assert math.isclose(float(pickscore.towers.model.logit_scale.exp()), math.exp(LOGIT_SCALE), rel_tol=1e-6)
    torch.testing.assert_close(scores.double(), hand_pickscore(clip_dir, images, PROMPTS), atol=1e-5, rtol=1e-5)
    assert float(scores.std()) > 1e-3   # random towers still separate the pairs: the check above is not vacuous


def test_pickscore_batch_invariance(pickscore):
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    together = pickscore(images, PROMPTS)
    alone = torch.cat([pickscore(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    order = [2, 0, 3, 1]
    shuffled = pickscore(images[order], [PROMPTS[i] for i in order])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled, together[order], atol=1e-5, rtol=1e-5)


def test_pickscore_gradients_reach_pixels(pickscore):
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    pickscore(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum(dim=(1, 2, 3)).min() > 0
    assert not any(p.requires_grad for p in pickscore.parameters())   # the reward model stays frozen


def _uint8_images(sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Smooth random images with some pixel noise (HWC uint8), like decoded samples rather than white noise."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in sizes:
        coarse = torch.rand(1, 3, max(h // 6, 2), max(w // 6, 2), generator=torch.Generator().manual_seed(h * w))
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        noisy = smooth[0].permute(1, 2, 0).numpy() * 230 + rng.uniform(0, 25, (h, w, 3))
        images.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return images


PROCESSOR_CONFIGS = {
    "clip": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    "resize-gt-crop": {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 28}},
    "legacy-int": {"size": 32, "crop_size": 32, "feature_extractor_type": "CLIPFeatureExtractor"},  # as laion/openai
}


@pytest.mark.parametrize("name", sorted(PROCESSOR_CONFIGS))
def test_torch_preprocessing_matches_clip_image_processor(name, tmp_path):
    """Our torch ops vs the real ``CLIPImageProcessor`` (torchvision and PIL backends, where available) on the
    same uint8 images, with the error measured in grey levels (|diff| * std * 255).

    Tolerance: max 1.5 and mean 0.35 grey levels (measured: max 0.99, mean 0.25 with transformers 5.24). The
    processors resize *uint8* images and return uint8 (PIL's fixed-point bicubic; torchvision rounds and clamps),
    we resize floats without rounding or clamping so the map stays differentiable; both use antialiased bicubic
    with a = -0.5, so what is left is quantisation (mean |U(-0.5, 0.5)| = 0.25). A size, crop-offset or mean/std
    mismatch would show up as errors of many grey levels; at the model's own size the two agree exactly.
    """
    import transformers

    config = {**PROCESSOR_CONFIGS[name], "image_mean": list(MEAN), "image_std": list(STD), "resample": 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = ImagePreprocessing.from_config(config)
    arrays = _uint8_images([(32, 32), (40, 48), (77, 50), (20, 24), (512, 768)])
    names = [n for n in ("CLIPImageProcessor", "CLIPImageProcessorPil") if hasattr(transformers, n)]
    std = torch.tensor(STD).view(3, 1, 1)
    for processor in [getattr(transformers, n).from_pretrained(tmp_path) for n in names]:
        for array in arrays:
            expected = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"][0]
            got = ours(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)[0]
            assert got.shape == expected.shape, (type(processor).__name__, array.shape)
            grey = (got - expected).abs() * std * 255
            assert grey.max() < 1.5 and grey.mean() < 0.35, (type(processor).__name__, array.shape, float(grey.max()))
            if array.shape[:2] == (32, 32) and name != "resize-gt-crop":
                assert grey.max() < 1e-3                                  # no resize: identical


def test_pickscore_missing_offline_is_one_line_error(clip_dir, tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_reward("pickscore")                                # default hub ids, not cached, HF_HUB_OFFLINE=1
    message = str(info.value)
    assert "\n" not in message and "yuvalkirstain/PickScore_v1" in message and "hf download" in message
    assert "model=PATH" in message
    with pytest.raises(ModelNotFoundError) as info:
        load_reward("pickscore", model=str(clip_dir))           # the default LAION processor is missing
    message = str(info.value)
    assert "\n" not in message and "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message and "processor=PATH" in message
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_reward("pickscore", model=str(tmp_path / "nowhere"), processor=str(clip_dir))
    with pytest.raises(ModelNotFoundError, match="cannot load") as info:
        load_reward("pickscore", model=str(tmp_path), processor=str(clip_dir))   # a folder without weights
    assert "\n" not in str(info.value)
