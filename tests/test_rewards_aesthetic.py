"""LAION aesthetic predictor on a tiny random ``CLIPModel`` (saved with save_pretrained) and a random head saved with
``torch.save`` in the key layout of the original ``sac+logos+ava1-l14-linearMSE.pth``."""

from __future__ import annotations

import pytest
import torch
from tiny_rewards import (
    AESTHETIC_HEAD_FILE,
    AESTHETIC_HEAD_LINEARS,
    AESTHETIC_PROJECTION,
    save_aesthetic_clip,
    save_aesthetic_head,
)

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.rewards import load_reward

PROJECTION, HEAD_LINEARS = AESTHETIC_PROJECTION, AESTHETIC_HEAD_LINEARS


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_aesthetic_clip(tmp_path_factory.mktemp("tiny_clip_aesthetic"))


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    return save_aesthetic_head(tmp_path_factory.mktemp("head") / AESTHETIC_HEAD_FILE)


@pytest.fixture(scope="module")
def aesthetic(clip_dir, head_path):
    return load_reward("aesthetic", clip=str(clip_dir), head=str(head_path))


def hand_aesthetic(folder, head, images: torch.Tensor) -> torch.Tensor:
    """Reference for 28x28 inputs: no resize, crop rows/cols 2..25, OpenAI mean/std; e/|e| then the five affine
    layers as explicit matrix products from the saved state dict (float64)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        output = model.get_image_features(pixel_values=(images[..., 2:26, 2:26] - mean) / std)
    emb = (output if isinstance(output, torch.Tensor) else output.pooler_output).double()
    x = emb / emb.norm(dim=-1, keepdim=True)
    state = torch.load(head, map_location="cpu", weights_only=True)
    for index in HEAD_LINEARS:
        x = x @ state[f"layers.{index}.weight"].double().T + state[f"layers.{index}.bias"].double()
    return x[:, 0]


def test_aesthetic_matches_hand_computation(aesthetic, clip_dir, head_path):
    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    scores = aesthetic(images, ["a", "b", "c"])
    assert scores.shape == (3,) and aesthetic.differentiable and aesthetic.name == "aesthetic"
    torch.testing.assert_close(scores.double(), hand_aesthetic(clip_dir, head_path, images), atol=1e-5, rtol=1e-5)
    assert float(scores.std()) > 1e-4
    assert sorted(aesthetic.head.state_dict()) == sorted(torch.load(head_path, weights_only=True))


def test_aesthetic_ignores_train_mode_and_prompts(aesthetic):
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    before = aesthetic(images, ["x", "y"])
    aesthetic.train()                                   # Dropouts must stay off: the reward is frozen
    torch.testing.assert_close(aesthetic(images, ["other", "prompts"]), before)
    assert not aesthetic.head.training and not aesthetic.towers.model.training


def test_aesthetic_batch_invariance(aesthetic):
    images = torch.rand(4, 3, 40, 30, generator=torch.Generator().manual_seed(3))
    together = aesthetic(images, ["p"] * 4)
    alone = torch.cat([aesthetic(images[i:i + 1], ["p"]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aesthetic(images.flip(0), ["p"] * 4), together.flip(0), atol=1e-5, rtol=1e-5)


def test_aesthetic_gradients_reach_pixels(aesthetic):
    images = torch.rand(2, 3, 40, 30, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    aesthetic(images, ["p", "q"]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum(dim=(1, 2, 3)).min() > 0
    assert not any(p.requires_grad for p in aesthetic.parameters())


def test_aesthetic_head_from_env(clip_dir, head_path, monkeypatch):
    monkeypatch.setenv("REWARDTUNE_AESTHETIC_HEAD", str(head_path))
    images = torch.rand(1, 3, 28, 28)
    reward = load_reward("aesthetic", clip=str(clip_dir))
    torch.testing.assert_close(reward(images, ["p"]).double(), hand_aesthetic(clip_dir, head_path, images),
                               atol=1e-5, rtol=1e-5)


def test_aesthetic_missing_head_offline_is_one_line_error(clip_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("REWARDTUNE_AESTHETIC_HEAD", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))          # empty rewardtune cache; HF_HUB_OFFLINE=1
    with pytest.raises(ModelNotFoundError) as info:
        load_reward("aesthetic", clip=str(clip_dir))
    message = str(info.value)
    assert "\n" not in message and "sac+logos+ava1-l14-linearMSE.pth" in message
    assert "improved-aesthetic-predictor" in message and "head=PATH" in message
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_reward("aesthetic", clip=str(clip_dir), head=str(tmp_path / "missing.pth"))


def test_aesthetic_missing_clip_offline_is_one_line_error(head_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_reward("aesthetic", head=str(head_path))          # default openai/clip-vit-large-patch14, not cached
    message = str(info.value)
    assert "\n" not in message and "openai/clip-vit-large-patch14" in message and "clip=PATH" in message


def test_aesthetic_rejects_a_head_with_other_keys_or_sizes(clip_dir, tmp_path):
    wrong_keys = tmp_path / "relu.pth"
    torch.save({"net.0.weight": torch.zeros(1, PROJECTION)}, wrong_keys)
    with pytest.raises(UserError, match="not a LAION aesthetic head"):
        load_reward("aesthetic", clip=str(clip_dir), head=str(wrong_keys))
    wrong_dim = save_aesthetic_head(tmp_path / "l14.pth", input_dim=768)   # the real head on a tiny CLIP
    with pytest.raises(UserError, match="projection dim is 12"):
        load_reward("aesthetic", clip=str(clip_dir), head=str(wrong_dim))


def test_weighted_sum_of_pickscore_and_aesthetic(clip_dir, head_path, aesthetic):
    reward = load_reward("pickscore:10,aesthetic:0.05", pickscore={"model": str(clip_dir), "processor": str(clip_dir)},
                         aesthetic={"clip": str(clip_dir), "head": str(head_path)})
    pickscore = load_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    prompts = ["a red circle", "a blue square"]
    total = reward(images, prompts)
    expected = 10 * pickscore(images, prompts) + 0.05 * aesthetic(images, prompts)
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)
    assert set(reward.components) == {"pickscore", "aesthetic"} and reward.differentiable
    total.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
