"""The shapes world's rewards.

* ``shapes_gold``: the oracle's fidelity and hidden taste (evaluation only, never for training).
* ``shapes_taste``: the hidden taste alone (contrast, crispness, presence), a control whose effect anyone can see
  (bolder, larger, crisper objects); never a substitute for the learned proxy.
* ``shapes_alignment``: cosine of the tiny CLIP's image and prompt embeddings (learned, like CLIPScore).
* ``shapes_preference``: the learned proxy, like HPSv2/PickScore: a preference head on the tiny CLIP, with the CLIP
  finetuned, trained on noisy pairwise labels drawn from the gold rule (``scripts/train_shapes_rewards.py``).
  ``score = head([e_img, e_txt, e_img * e_txt])`` on L2-normalised embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import ModelNotFoundError
from rewardtune.modelfiles import ASSETS, asset  # noqa: F401  (ASSETS: scripts import it from here)
from rewardtune.rewards.base import Reward


class ShapesGold(Reward):
    """Gold reward = (fidelity + taste) / 2 from :mod:`rewardtune.shapes.oracle` (or one of its parts, ``key``);
    components keep all three."""

    def __init__(self, key: str = "gold") -> None:
        super().__init__()
        self.key = key

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from rewardtune.shapes.oracle import gold_scores

        scores = gold_scores(images, prompts)
        self.components = {k: v.to(images.device) for k, v in scores.items()}
        return scores[self.key].to(images.device)


def load_shapes_gold(device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesGold()


def load_shapes_taste(device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesGold("taste")


def load_tiny_clip(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The tiny CLIP's towers (:class:`rewardtune.rewards.clip_hf.CLIPTowers`) from a shipped or given folder."""
    from rewardtune.rewards.clip_hf import load_clip_towers

    return load_clip_towers(str(folder), device=device, dtype=dtype, what="shapes CLIP")


def embed_pair(towers, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``([B,D], [B,D])`` image and prompt embeddings."""
    return F.normalize(towers.encode_images(images), dim=-1), F.normalize(towers.encode_texts(prompts), dim=-1)


class ShapesAlignment(Reward):
    """``cos(e_img, e_txt)`` of the tiny CLIP, in [-1, 1]."""

    differentiable = True

    def __init__(self, towers) -> None:
        super().__init__()
        self.towers = towers

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image, text = embed_pair(self.towers, images, prompts)
        return (image * text).sum(-1)


class PreferenceHead(nn.Module):
    """``[B,D] x [B,D] -> [B]``: MLP on ``[e_img, e_txt, e_img * e_txt]``."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image, text, image * text], dim=-1)).squeeze(-1)


class ShapesPreference(Reward):
    """The learned proxy reward (see module docstring). Folder: a CLIP folder plus ``head.safetensors``."""

    differentiable = True

    def __init__(self, towers, head: PreferenceHead) -> None:
        super().__init__()
        self.towers, self.head = towers, head.eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(*embed_pair(self.towers, images, prompts))


def load_preference_head(folder: str | Path) -> PreferenceHead:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "head.safetensors").is_file():
        raise ModelNotFoundError(f"no preference head at {str(folder / 'head.safetensors')!r}; train it with "
                                 "scripts/train_shapes_rewards.py or pass model=PATH")
    config = json.loads((folder / "head_config.json").read_text())
    head = PreferenceHead(config["dim"], config["hidden"])
    head.load_state_dict(load_file(folder / "head.safetensors"))
    return head


def load_shapes_alignment(model: str | None = None, device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesAlignment(load_tiny_clip(model or asset("shapes-clip"), device, dtype))


def load_shapes_preference(model: str | None = None, device: str = "cpu", dtype: str = "float32") -> Reward:
    folder = model or asset("shapes-preference")
    head = load_preference_head(folder)
    return ShapesPreference(load_tiny_clip(folder, device, dtype), head.to(device))
