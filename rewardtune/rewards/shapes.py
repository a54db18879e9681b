"""The shapes world's rewards.

* ``shapes_gold``: the oracle's fidelity and hidden taste (evaluation only, never for training).
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
from rewardtune.rewards.base import Reward

ASSETS = Path(__file__).resolve().parents[1] / "assets"


class ShapesGold(Reward):
    """Gold reward = (fidelity + taste) / 2 from :mod:`rewardtune.shapes.oracle`; components keep all three."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from rewardtune.shapes.oracle import gold_scores

        scores = gold_scores(images, prompts)
        self.components = {k: v.to(images.device) for k, v in scores.items()}
        return scores["gold"].to(images.device)


def load_shapes_gold(device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesGold()


class TinyClipEmbedder(nn.Module):
    """L2-normalised image and text embeddings of a transformers ``CLIPModel`` on 32x32 inputs.

    Images ``[B,3,H,W]`` in [0,1] are resized (bilinear, antialiased) to the vision tower's size and normalised
    with the mean/std of the folder's ``preprocessor_config.json``; everything is differentiable.
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        folder = _require_folder(folder)
        self.clip = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        config = json.loads((folder / "preprocessor_config.json").read_text())
        self.register_buffer("mean", torch.tensor(config["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["image_std"]).view(1, 3, 1, 1), persistent=False)
        self.size = self.clip.config.vision_config.image_size

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,D]`` unit vectors."""
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        pixels = (images - self.mean) / self.std
        return F.normalize(_as_tensor(self.clip.get_image_features(pixel_values=pixels)), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """``B`` prompts -> ``[B,D]`` unit vectors."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.mean.device)
        return F.normalize(_as_tensor(self.clip.get_text_features(input_ids=ids)), dim=-1)


def _as_tensor(features) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from ``get_*_features``."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _require_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"no CLIP model at {str(folder)!r} (config.json missing); rebuild it with "
                                 "scripts/train_shapes_tiny.py or pass model=PATH")
    return folder


class ShapesAlignment(Reward):
    """``cos(e_img, e_txt)`` of the tiny CLIP, in [-1, 1]."""

    differentiable = True

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.embedder = TinyClipEmbedder(folder)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.embedder.embed_images(images) * self.embedder.embed_texts(prompts)).sum(-1)


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

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        from safetensors.torch import load_file

        folder = _require_folder(folder)
        if not (folder / "head.safetensors").is_file():
            raise ModelNotFoundError(f"no preference head at {str(folder / 'head.safetensors')!r}; train it with "
                                     "scripts/train_shapes_rewards.py or pass model=PATH")
        self.embedder = TinyClipEmbedder(folder)
        head_config = json.loads((folder / "head_config.json").read_text())
        self.head = PreferenceHead(head_config["dim"], head_config["hidden"])
        self.head.load_state_dict(load_file(folder / "head.safetensors"))
        self.head.eval()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.embedder.embed_images(images), self.embedder.embed_texts(prompts))


def load_shapes_alignment(model: str | None = None, device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesAlignment(model or ASSETS / "shapes-clip").to(device)


def load_shapes_preference(model: str | None = None, device: str = "cpu", dtype: str = "float32") -> Reward:
    return ShapesPreference(model or ASSETS / "shapes-preference").to(device)
