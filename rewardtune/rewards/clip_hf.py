"""Shared loading and differentiable encoding for rewards built on a transformers ``CLIPModel``.

    towers = load_clip_towers("yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    image_emb = towers.encode_images(images)   # [B,3,H,W] in [0,1] -> [B,D] projected features (not normalised)
    text_emb = towers.encode_texts(prompts)    # B prompts -> [B,D]

The image preprocessing reproduces ``CLIPImageProcessor`` in torch ops (so gradients reach the pixels), with every
setting read from the processor config (``preprocessor_config.json``): resize, crop, rescale, mean/std, resample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rewardtune.errors import UserError
from rewardtune.modelfiles import from_pretrained_or_explain
from rewardtune.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, clip_pixels
from rewardtune.utils.devices import to_dtype

logger = logging.getLogger(__name__)

# PIL resample codes used in processor configs -> F.interpolate modes (antialiased bicubic/bilinear match PIL's).
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def _pair(value: Any, key: str) -> tuple[int, int]:
    """``224`` or ``{"height": h, "width": w}`` -> ``(h, w)``."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= set(value):
        return int(value["height"]), int(value["width"])
    raise UserError(f"processor config {key}={value!r} is not supported; expected an int or {{height, width}}")


@dataclass(frozen=True)
class ImagePreprocessing:
    """``CLIPImageProcessor`` as torch ops on ``[B,3,H,W]`` in [0,1]:
    ``x = normalize(crop(resize(255 * rescale_factor * images)), mean, std)`` (:func:`clip_pixels`).

    Attributes:
        shortest_edge / resize_to: resize the shorter side to ``shortest_edge`` or the image to ``resize_to``
            (``(h, w)``); both None: no resize.
        crop: centre-crop size ``(h, w)`` or None.
        scale: multiplier from [0,1] pixels to the processor's scale (``255 * rescale_factor``; 1 for CLIP).
        mean, std: per-channel normalisation or None. mode: ``F.interpolate`` mode (antialiased).
    """

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)
    scale: float = 1.0
    mean: tuple[float, ...] | None = OPENAI_MEAN
    std: tuple[float, ...] | None = OPENAI_STD
    mode: str = "bicubic"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImagePreprocessing:
        """From a processor config dict; absent keys take ``CLIPImageProcessor``'s defaults."""
        size = config.get("size", {"shortest_edge": 224})
        shortest, resize_to = None, None
        if config.get("do_resize", True):
            if isinstance(size, int) or (isinstance(size, dict) and set(size) == {"shortest_edge"}):
                shortest = size if isinstance(size, int) else int(size["shortest_edge"])
            else:
                resize_to = _pair(size, "size")
        crop = _pair(config.get("crop_size", 224), "crop_size") if config.get("do_center_crop", True) else None
        scale = 255.0 * config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 255.0
        resample = config.get("resample", 3)
        if resample not in _RESAMPLE:
            raise UserError(f"processor config resample={resample!r} is not supported; expected one of "
                            f"{sorted(_RESAMPLE)} (PIL nearest, bilinear, bicubic)")
        normalise = config.get("do_normalize", True)
        mean = tuple(config.get("image_mean", OPENAI_MEAN)) if normalise else None
        std = tuple(config.get("image_std", OPENAI_STD)) if normalise else None
        return cls(shortest, resize_to, crop, float(scale), mean, std, _RESAMPLE[resample])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,3,h,w]`` model input (no clamping, so the map stays differentiable)."""
        if self.shortest_edge:
            fit, size = "shortest", self.shortest_edge
        else:
            fit, size = ("squash", tuple(self.resize_to)) if self.resize_to is not None else ("none", 0)
        return clip_pixels(images, size, fit=fit, crop=self.crop if self.crop is not None else False, mode=self.mode,
                           scale=self.scale, mean=self.mean, std=self.std)


def _pooled(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and a ``BaseModelOutputWithPooling`` (projected
    features in ``pooler_output``) in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPTowers(nn.Module):
    """A frozen ``CLIPModel`` (always in eval mode) with its tokenizer and torch image preprocessing."""

    def __init__(self, model: nn.Module, preprocessing: ImagePreprocessing, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocessing = preprocessing
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def train(self, mode: bool = True) -> CLIPTowers:
        return super().train(False)

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,D]`` = ``visual_projection(pooled ViT output)`` (differentiable)."""
        param = self._param
        pixels = self.preprocessing(images.to(device=param.device, dtype=torch.float32)).to(param.dtype)
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> ``[B,D]`` = ``text_projection(hidden state at EOS)``; each distinct prompt is encoded once,
        padded to the longest and truncated to the model's ``max_position_embeddings``."""
        if self.tokenizer is None:
            raise RuntimeError("these CLIP towers were loaded without a tokenizer (text=False)")
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self._param.device)
        features = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens["attention_mask"]))
        index = {p: i for i, p in enumerate(unique)}
        return features[torch.tensor([index[p] for p in prompts], device=features.device)]


def load_clip_towers(model: str, processor: str | None = None, device: str = "cpu",
                     dtype: str | torch.dtype = "float32", text: bool = True, what: str = "CLIP",
                     option: str = "model", processor_option: str = "processor") -> CLIPTowers:
    """``CLIPModel`` from ``model`` plus tokenizer and image-processor config from ``processor`` (default: the
    same id/folder), on ``device`` in ``dtype``. ``text=False`` skips the tokenizer (image-only rewards).
    ``what`` names the reward and ``option``/``processor_option`` its options in the one-line errors; the model
    is loaded first, so with nothing downloaded the error names the model."""
    from transformers import AutoTokenizer, CLIPModel, ImageProcessingMixin

    processor = processor or model
    torch_dtype = to_dtype(dtype)
    clip = from_pretrained_or_explain(CLIPModel.from_pretrained, model, f"{what} model", option)
    config = from_pretrained_or_explain(lambda s: ImageProcessingMixin.get_image_processor_dict(s)[0],
                                        processor, f"{what} processor", processor_option)
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, processor, f"{what} tokenizer",
                                           processor_option) if text else None
    logger.info("loaded %s model from %s (processor %s) on %s in %s", what, model, processor, device, torch_dtype)
    return CLIPTowers(clip.to(device=device, dtype=torch_dtype), ImagePreprocessing.from_config(config), tokenizer)
