"""Names of the registered pipelines, rewards and UNet loaders, without importing torch (``rewardtune models``
answers at once).

``rewardtune.diffusion.loading.MODELS``/``UNET_LOADERS`` and ``rewardtune.rewards.REWARDS``/``PATH_REWARDS`` hold
the same entries (a test keeps them equal); those registries import torch, this module only the standard library.
"""

from __future__ import annotations

from rewardtune.modelfiles import ASSETS

PIPELINES: dict[str, str] = {
    "shapes-tiny": str(ASSETS / "shapes-tiny"),
    "shapes-tiny-flow": str(ASSETS / "shapes-tiny-flow"),
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd35m": "stabilityai/stable-diffusion-3.5-medium",
    "sd35l": "stabilityai/stable-diffusion-3.5-large",
}

REWARD_FACTORIES: dict[str, str] = {
    "jpeg_compressibility": "rewardtune.rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "rewardtune.rewards.jpeg:jpeg_incompressibility",
    "shapes_gold": "rewardtune.rewards.shapes:load_shapes_gold",
    "shapes_taste": "rewardtune.rewards.shapes:load_shapes_taste",
    "shapes_alignment": "rewardtune.rewards.shapes:load_shapes_alignment",
    "shapes_preference": "rewardtune.rewards.shapes:load_shapes_preference",
    "hpsv2": "rewardtune.rewards.hpsv2:load_hpsv2",
    "hpsv2.1": "rewardtune.rewards.hpsv2:load_hpsv21",
    "clipscore": "rewardtune.rewards.clipscore:load_clipscore",
    "pickscore": "rewardtune.rewards.pickscore:load_pickscore",
    "aesthetic": "rewardtune.rewards.aesthetic:load_aesthetic",
    "imagereward": "rewardtune.rewards.imagereward:load_imagereward",
}

# Rewards whose name carries a file: "perceptual:PATH".
PATH_REWARD_FACTORIES: dict[str, str] = {
    "perceptual": "rewardtune.perceptual.image_reward:load_perceptual_reward",
}

# UNets that plain ``from_pretrained`` cannot load, keyed by the entry of ``unet/config.json`` that marks them.
# ``load``: "module:function" (unet_folder: Path, dtype: torch.dtype) -> UNet, or None when from_pretrained can load
# it; ``check``: "module:function" (pipe) -> None, raising a one-line UserError when the UNet does not fit the
# pipeline. Imported only when a pipeline folder's UNet config carries the key (``load_pipeline``).
UNET_LOADER_HOOKS: dict[str, dict[str, str]] = {
    "_rewardtune_pruning": {"load": "rewardtune.prune.io:load_unet_if_pruned",
                            "check": "rewardtune.prune.io:check_pruned_fits"},
}


def pipeline_names() -> list[str]:
    return sorted(PIPELINES)


def reward_names() -> list[str]:
    """As :func:`rewardtune.rewards.reward_names`: sorted names, then ``NAME:PATH`` for path rewards."""
    return sorted(REWARD_FACTORIES) + [f"{name}:PATH" for name in sorted(PATH_REWARD_FACTORIES)]


__all__ = ["ASSETS", "PIPELINES", "REWARD_FACTORIES", "PATH_REWARD_FACTORIES", "UNET_LOADER_HOOKS",
           "pipeline_names", "reward_names"]
