"""HPS v2 / v2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2).

    score = <E_I(x') / |E_I(x')|, E_T(p) / |E_T(p)|>        (cosine, no logit scale; ~0.25-0.30)
    x'    = normalize_OpenAI(pad0(resize_longest(x, S)))    (S = the model's image size, 224 for ViT-H-14)

This is ``hpsv2.score()`` (diagonal of ``image_features @ text_features.T``); the HPSv2 benchmark tables report it
x100. Preprocessing is ``ResizeMaxSize(S, fill=0)`` + ``Normalize`` written in torch ops (bicubic, antialiased), so
gradients reach the pixels; the zero padding happens before normalisation. The model is built once from the
architecture alone (no LAION base weights are downloaded) and the HPS checkpoint is loaded into it:
``torch.save({'state_dict': ...})`` with open_clip CLIP keys, ``module.`` prefixes stripped when present.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rewardtune.modelfiles import hub_file
from rewardtune.rewards.base import Reward
from rewardtune.rewards.clipscore import (
    ClipCosine,
    build_open_clip,
    load_tokenizer,
    load_weights,
    read_state_dict,
    register_arch,
    square_image_size,
)
from rewardtune.rewards.preprocess import OPENAI_MEAN, OPENAI_STD
from rewardtune.utils.devices import to_dtype

logger = logging.getLogger(__name__)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def find_hps_checkpoint(version: str) -> str:
    """The local path of the HPS ``version`` checkpoint: ``$HPS_ROOT`` (default ``~/.cache/hpsv2``, the hpsv2
    package's folder) or the Hugging Face cache (downloaded only when the hub is allowed and reachable)."""
    filename = HPS_FILES[version]
    legacy = Path(os.environ.get("HPS_ROOT", "~/.cache/hpsv2")).expanduser() / filename
    if legacy.is_file():
        return str(legacy)
    return str(hub_file(HPS_REPO, filename, what=f"HPS {version} checkpoint {filename}", option="checkpoint",
                        more=[f"put it in $HPS_ROOT ({legacy.parent})"]))


def load_hps(version: str, checkpoint: str | None = None, arch: str = "ViT-H-14", device: str = "cpu",
             dtype: str = "float32") -> Reward:
    """A differentiable HPS ``version`` reward (``[B,3,H,W]`` in [0,1], prompts -> ``[B]`` cosine)."""
    name = register_arch(arch)
    path = str(Path(checkpoint).expanduser()) if checkpoint else find_hps_checkpoint(version)
    model = build_open_clip(name)
    load_weights(model, read_state_dict(path), path)
    reward = ClipCosine(model, load_tokenizer(name), "longest", square_image_size(model), OPENAI_MEAN, OPENAI_STD)
    logger.info("HPS %s: %s from %s", version, name, path)
    return reward.to(device=device, dtype=to_dtype(dtype))


def load_hpsv2(checkpoint: str | None = None, arch: str = "ViT-H-14", device: str = "cpu",
               dtype: str = "float32") -> Reward:
    """HPS v2.0 (``HPS_v2_compressed.pt``). ``arch``: open_clip model name or model-config JSON path."""
    return load_hps("v2.0", checkpoint, arch, device, dtype)


def load_hpsv21(checkpoint: str | None = None, arch: str = "ViT-H-14", device: str = "cpu",
                dtype: str = "float32") -> Reward:
    """HPS v2.1 (``HPS_v2.1_compressed.pt``); scores are not comparable with v2.0's."""
    return load_hps("v2.1", checkpoint, arch, device, dtype)
