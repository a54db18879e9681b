"""CLIPScore on a tiny random open_clip model: hand-computed cosine (shortest-side resize + centre crop), scale and
CLIP-S, pretrained-tag handling (QuickGELU, mean/std) without a network, and one-line errors for missing weights."""

from __future__ import annotations

from types import SimpleNamespace

import open_clip  # a required dependency: never skip
import pytest
import torch
from tiny_rewards import (
    OPEN_CLIP_TINY,
    OPENAI_MEAN,
    OPENAI_STD,
    bicubic,
    clipscore_options,
    hand_open_clip_cosine,
    reference_open_clip,
)

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.rewards import load_reward
from rewardtune.rewards.jpeg import jpeg_kilobytes

OPENAI = (torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD))
PROMPTS = ["a red circle", "a photo of a dog", "a painting of a cat", "a small green triangle"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Config JSON + a random CLIP saved as a bare open_clip state dict and as {'state_dict': ...}."""
    folder = tmp_path_factory.mktemp("clipscore")
    options = clipscore_options(folder)
    clip = reference_open_clip(options["model"], options["checkpoint"])
    torch.save({"state_dict": clip.state_dict()}, folder / "wrapped.pt")
    return SimpleNamespace(arch=options["model"], ckpt=options["checkpoint"], wrapped=str(folder / "wrapped.pt"),
                           clip=clip, state=clip.state_dict())


@pytest.fixture(scope="module")
def clipscore(tiny):
    return load_reward("clipscore", model=tiny.arch, checkpoint=tiny.ckpt)


def hand_cosine(clip, cropped: torch.Tensor, prompts: list[str], mean_std=OPENAI) -> torch.Tensor:
    """Cosine of L2-normalised features for already resized+cropped ``[B,3,32,32]`` pixels in [0,1]."""
    return hand_open_clip_cosine(clip, cropped, prompts, *mean_std)


def test_cosine_matches_hand_computation_with_shortest_side_resize_and_centre_crop(tiny, clipscore):
    torch.manual_seed(1)
    wide, tall = torch.rand(4, 3, 40, 60), torch.rand(4, 3, 60, 40)   # shortest side 40 -> 32, long side 48
    assert clipscore.size == 32 and clipscore.differentiable
    expected_wide = hand_cosine(tiny.clip, bicubic(wide, (32, 48))[:, :, :, 8:40], PROMPTS)
    expected_tall = hand_cosine(tiny.clip, bicubic(tall, (48, 32))[:, :, 8:40, :], PROMPTS)
    assert torch.allclose(clipscore(wide, PROMPTS), expected_wide, atol=1e-5)
    assert torch.allclose(clipscore(tall, PROMPTS), expected_tall, atol=1e-5)
    square = torch.rand(4, 3, 32, 32)
    assert torch.allclose(clipscore(square, PROMPTS), hand_cosine(tiny.clip, square, PROMPTS), atol=1e-5)


def test_scale_and_clip_s(tiny, tmp_path):
    torch.manual_seed(2)
    images = torch.rand(4, 3, 32, 32)
    cos = hand_cosine(tiny.clip, images, PROMPTS)
    scaled = load_reward("clipscore", model=tiny.arch, checkpoint=tiny.ckpt, scale=100.0)
    hessel = load_reward("clipscore", model=tiny.arch, checkpoint=tiny.wrapped, clip_s=True)
    torchmetrics_like = load_reward("clipscore", model=tiny.arch, checkpoint=tiny.ckpt, clip_s=True, scale=40.0)
    assert torch.allclose(scaled(images, PROMPTS), 100 * cos, atol=1e-4)
    assert torch.allclose(hessel(images, PROMPTS), 2.5 * cos.clamp(min=0), atol=1e-5)
    assert torch.allclose(torchmetrics_like(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-4)
    # a negated text projection flips every cosine's sign: plain cosine goes negative, CLIP-S clamps it to 0
    flipped = dict(tiny.state, text_projection=-tiny.state["text_projection"])
    torch.save(flipped, tmp_path / "flipped.pt")
    plain = load_reward("clipscore", model=tiny.arch, checkpoint=str(tmp_path / "flipped.pt"))
    clamped = load_reward("clipscore", model=tiny.arch, checkpoint=str(tmp_path / "flipped.pt"), clip_s=True)
    assert torch.allclose(plain(images, PROMPTS), -cos, atol=1e-5) and (cos.abs() > 1e-3).all()
    assert torch.equal(clamped(images, PROMPTS), torch.zeros(4))


def test_batch_scores_equal_one_by_one(clipscore):
    torch.manual_seed(3)
    images = torch.rand(4, 3, 36, 50)
    prompts = ["a red circle", "a red circle", "a photo of a dog", "a red circle"]
    batch = clipscore(images, prompts)
    single = torch.cat([clipscore(images[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    assert torch.allclose(batch, single, atol=1e-5)


def test_gradients_reach_the_pixels(clipscore):
    torch.manual_seed(4)
    images = torch.rand(2, 3, 40, 56, requires_grad=True)
    clipscore(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_pretrained_tag_sets_quick_gelu_and_mean_std(tiny, monkeypatch):
    """A tag's config (as open_clip's 'openai' tags: quick_gelu=True) drives the activation and normalisation."""
    from open_clip.transformer import QuickGELU

    tag = {"hf_hub": "example/tiny-clip/", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "tinytag" else {})
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, **kw: tiny.ckpt)
    reward = load_reward("clipscore", model=tiny.arch, pretrained="tinytag")
    assert any(isinstance(m, QuickGELU) for m in reward.model.modules())
    reference = open_clip.model.CLIP(**OPEN_CLIP_TINY, quick_gelu=True).eval()
    reference.load_state_dict(tiny.state)
    images = torch.rand(4, 3, 32, 32)
    half = (torch.full((3,), 0.5), torch.full((3,), 0.5))
    assert torch.allclose(reward(images, PROMPTS), hand_cosine(reference, images, PROMPTS, half), atol=1e-5)


def test_missing_weights_offline_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as info:
        load_reward("clipscore", model="ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "\n" not in message and "timm/vit_base_patch32_clip_224.openai" in message
    assert "checkpoint=PATH" in message


def test_bad_options_are_one_line_errors(tiny, tmp_path):
    cases = [
        (UserError, dict(model="ViT-B-32", pretrained="no-such-tag"), "unknown pretrained tag"),
        (UserError, dict(model=tiny.arch), "unknown pretrained tag"),
        (UserError, dict(model=tiny.arch, pretrained=None), "needs weights"),
        (ModelNotFoundError, dict(model=tiny.arch, checkpoint=str(tmp_path / "absent.pt")), "does not exist"),
    ]
    for error, options, text in cases:
        with pytest.raises(error) as info:
            load_reward("clipscore", **options)
        assert text in str(info.value) and "\n" not in str(info.value)


def test_weighted_sum_with_jpeg(tiny, clipscore):
    torch.manual_seed(5)
    images = torch.rand(3, 3, 32, 32)
    options = {"model": tiny.arch, "checkpoint": tiny.ckpt}
    total = load_reward("clipscore:0.5,jpeg_compressibility:1", clipscore=options)
    expected = 0.5 * hand_cosine(tiny.clip, images, PROMPTS[:3]) - jpeg_kilobytes(images)
    assert torch.allclose(total(images, PROMPTS[:3]), expected, atol=1e-4)
    assert torch.allclose(total.components["clipscore"], clipscore(images, PROMPTS[:3]), atol=1e-6)
