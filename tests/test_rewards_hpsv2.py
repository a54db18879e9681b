"""HPSv2 reward on a tiny random open_clip model saved in the real HPS checkpoint format ({'state_dict': ...}).

Reference values are computed by hand: explicit resize / zero-pad / normalise, the open_clip model run directly,
and the cosine as a dot product of L2-normalised features.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_rewards import (
    OPEN_CLIP_TINY,
    OPENAI_MEAN,
    OPENAI_STD,
    bicubic,
    hand_open_clip_cosine,
    hpsv2_options,
    reference_open_clip,
)

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.rewards import load_reward
from rewardtune.rewards.jpeg import jpeg_kilobytes

MEAN = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "a photo of a dog", "a painting of a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Config JSON + random CLIP saved as the HPS release ({'state_dict'}) and as a DDP training checkpoint."""
    folder = tmp_path_factory.mktemp("hps")
    options = hpsv2_options(folder)
    clip = reference_open_clip(options["arch"], options["checkpoint"])
    ddp = {"iterations": 7, "name": "run", "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
    torch.save(ddp, folder / "ddp.pt")
    return SimpleNamespace(arch=options["arch"], ckpt=options["checkpoint"], ddp=str(folder / "ddp.pt"), clip=clip,
                           folder=folder)


@pytest.fixture(scope="module")
def hps(tiny):
    return load_reward("hpsv2", checkpoint=tiny.ckpt, arch=tiny.arch)


def hand_hps(clip, padded: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine of L2-normalised features for already resized+padded ``[B,3,32,32]`` pixels in [0,1]."""
    return hand_open_clip_cosine(clip, padded, prompts)


def test_square_scores_match_hand_computation(tiny, hps):
    torch.manual_seed(1)
    small, large = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 48, 48)
    assert hps.size == 32 and hps.differentiable
    assert torch.allclose(hps(small, PROMPTS), hand_hps(tiny.clip, small, PROMPTS), atol=1e-5)
    assert torch.allclose(hps(large, PROMPTS), hand_hps(tiny.clip, bicubic(large, (32, 32)), PROMPTS), atol=1e-5)


@pytest.mark.parametrize("height,width", [(20, 48), (48, 20)])
def test_non_square_is_resized_longest_and_zero_padded_before_normalising(tiny, hps, height, width):
    torch.manual_seed(2)
    images = torch.rand(3, 3, height, width)
    short = round(min(height, width) * 32 / max(height, width))   # 13: pad 19 = 9 before + 10 after
    canvas = torch.zeros(3, 3, 32, 32)
    if height < width:
        canvas[:, :, 9:9 + short, :] = bicubic(images, (short, 32))
    else:
        canvas[:, :, :, 9:9 + short] = bicubic(images, (32, short))
    pixels = hps.pixels(images)
    assert torch.allclose(pixels, (canvas - MEAN) / STD, atol=1e-6)
    assert torch.allclose(pixels[:, :, 0, 0], (-MEAN / STD).view(1, 3).expand(3, 3), atol=1e-6)
    assert torch.allclose(hps(images, PROMPTS), hand_hps(tiny.clip, canvas, PROMPTS), atol=1e-5)


def test_batch_scores_equal_one_by_one(hps):
    torch.manual_seed(3)
    images = torch.rand(4, 3, 40, 40)
    prompts = ["a red circle", "a photo of a dog", "a red circle", "a blue square on a white background"]
    batch = hps(images, prompts)
    single = torch.cat([hps(images[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    assert batch.shape == (4,)
    assert torch.allclose(batch, single, atol=1e-5)


def test_gradients_reach_the_pixels(hps):
    torch.manual_seed(4)
    images = torch.rand(2, 3, 24, 40, requires_grad=True)
    hps(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in hps.parameters())


def test_ddp_module_prefix_checkpoint_loads_the_same_weights(tiny, hps):
    torch.manual_seed(5)
    images = torch.rand(3, 3, 32, 32)
    ddp = load_reward("hpsv2.1", checkpoint=tiny.ddp, arch=tiny.arch)
    assert torch.allclose(ddp(images, PROMPTS), hps(images, PROMPTS), atol=1e-6)


@pytest.mark.parametrize("name,filename", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")])
def test_missing_checkpoint_offline_is_one_line_naming_the_file(tiny, tmp_path, monkeypatch, name, filename):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hpsv2"))
    with pytest.raises(ModelNotFoundError) as info:
        load_reward(name, arch=tiny.arch)
    message = str(info.value)
    assert "\n" not in message and filename in message and "xswu/HPSv2" in message and "checkpoint=PATH" in message


def test_checkpoint_found_in_hps_root(tiny, monkeypatch):
    monkeypatch.setenv("HPS_ROOT", str(tiny.folder))
    reward = load_reward("hpsv2", arch=tiny.arch)
    images = torch.rand(1, 3, 32, 32)
    assert torch.allclose(reward(images, PROMPTS[:1]), hand_hps(tiny.clip, images, PROMPTS[:1]), atol=1e-5)


def test_bad_checkpoints_and_archs_are_one_line_errors(tiny, tmp_path):
    other = dict(OPEN_CLIP_TINY, embed_dim=8)
    (tmp_path / "tiny-other.json").write_text(json.dumps(other))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = [
        (ModelNotFoundError, dict(checkpoint=str(tmp_path / "absent.pt"), arch=tiny.arch), "does not exist"),
        (UserError, dict(checkpoint=str(tmp_path / "junk.pt"), arch=tiny.arch), "cannot read checkpoint"),
        (UserError, dict(checkpoint=tiny.ckpt, arch=str(tmp_path / "tiny-other.json")), "does not fit"),
        (UserError, dict(checkpoint=tiny.ckpt, arch="ViT-Nonexistent-99"), "unknown open_clip architecture"),
        (ModelNotFoundError, dict(checkpoint=tiny.ckpt, arch=str(tmp_path / "absent.json")), "does not exist"),
    ]
    for error, options, text in cases:
        with pytest.raises(error) as info:
            load_reward("hpsv2", **options)
        assert text in str(info.value) and "\n" not in str(info.value)


def test_weighted_sum_with_jpeg(tiny, hps):
    torch.manual_seed(6)
    images = torch.rand(3, 3, 32, 32)
    total = load_reward("hpsv2:2,jpeg_incompressibility:1", hpsv2={"checkpoint": tiny.ckpt, "arch": tiny.arch})
    scores = total(images, PROMPTS)
    expected = 2 * hand_hps(tiny.clip, images, PROMPTS) + jpeg_kilobytes(images)
    assert torch.allclose(scores, expected, atol=1e-4)
    assert set(total.components) == {"hpsv2", "jpeg_incompressibility"}
    assert torch.allclose(total.components["hpsv2"], hps(images, PROMPTS), atol=1e-6)


def test_default_vit_h_tokenizer_works_offline():
    from rewardtune.rewards.clipscore import load_tokenizer

    tokens = load_tokenizer("ViT-H-14")(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406
