"""PickScore v1 (Kirstain et al. 2023): ``score = exp(logit_scale) * cos(E_img(image), E_txt(prompt))``.

The model is a plain transformers ``CLIPModel`` (ViT-H-14) fine-tuned on Pick-a-Pic; the tokenizer and image
preprocessing come from the LAION CLIP-H processor, as in the reference code. Scores of real images are ≈18-24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewardtune.rewards.base import Reward
from rewardtune.rewards.clip_hf import CLIPTowers, load_clip_towers

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(Reward):
    """Each image scored against its own prompt (differentiable)."""

    differentiable = True

    def __init__(self, towers: CLIPTowers) -> None:
        super().__init__()
        self.towers = towers

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1], B prompts -> ``[B]`` = ``exp(logit_scale) * <img/|img|, txt/|txt|>``."""
        image_emb = F.normalize(self.towers.encode_images(images).float(), dim=-1)
        text_emb = F.normalize(self.towers.encode_texts(prompts).float(), dim=-1)
        scale = self.towers.model.logit_scale.float().exp()
        return scale * (image_emb * text_emb).sum(dim=-1).to(images.device)


def load_pickscore(model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, device: str = "cpu",
                   dtype: str = "float32") -> Reward:
    """PickScore from a hub id or local ``CLIPModel`` folder; ``processor`` holds the tokenizer and
    ``preprocessor_config.json``. Offline without the weights: one-line :class:`ModelNotFoundError`."""
    towers = load_clip_towers(model, processor, device=device, dtype=dtype, what="PickScore",
                              option="model", processor_option="processor")
    return PickScore(towers)
