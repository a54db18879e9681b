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
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.hub import offline_unless_reachable
from rewardtune.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, normalize

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


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """``(h, w)`` after scaling the shorter side to ``edge``; the longer side is truncated, as transformers does."""
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[..., H, W] -> [..., height, width]``: top/left offsets ``(H - height) // 2``; zero-pads first when the
    image is smaller than the crop (transformers' ``center_crop`` rules)."""
    h, w = images.shape[-2:]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top:top + height, left:left + width]


@dataclass(frozen=True)
class ImagePreprocessing:
    """``CLIPImageProcessor`` as torch ops on ``[B,3,H,W]`` in [0,1]:
    ``x = normalize(crop(resize(255 * rescale_factor * images)), mean, std)``.

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
        x = images * self.scale if self.scale != 1.0 else images
        h, w = x.shape[-2:]
        size = shortest_edge_size(h, w, self.shortest_edge) if self.shortest_edge else self.resize_to
        if size is not None and tuple(size) != (h, w):
            smooth = self.mode != "nearest-exact"
            extra = {"antialias": True, "align_corners": False} if smooth else {}
            x = F.interpolate(x, size=tuple(size), mode=self.mode, **extra)
        if self.crop is not None:
            x = center_crop(x, *self.crop)
        if self.mean is not None:
            x = normalize(x, self.mean, self.std)
        return x


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def from_pretrained_or_explain(loader: Callable[[str], Any], source: str, what: str, option: str) -> Any:
    """``loader(source)`` where ``source`` is a hub id or local folder; a missing or unreadable model becomes one
    line of :class:`ModelNotFoundError` that names ``what``/``source`` and how to supply it (``option=PATH``)."""
    source = str(source)
    if _is_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"{what} folder {source!r} does not exist; pass a folder written by "
                                     f"save_pretrained with {option}=PATH")
        try:
            return loader(str(folder))
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load {what} from folder {source!r}: {_first_line(exc)}") from None
    try:
        with offline_unless_reachable():  # no network: the cache only, and no minute of retries
            return loader(source)
    except OSError:
        raise ModelNotFoundError(
            f"{what} {source!r} is not in the local Hugging Face cache and could not be downloaded; on a connected "
            f"machine run `hf download {source}` (then copy the cache or set HF_HOME), or pass a local folder "
            f"with {option}=PATH") from None
    except ValueError as exc:
        raise ModelNotFoundError(f"cannot load {what} {source!r}: {_first_line(exc)}") from None


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

    from rewardtune.diffusion.loading import to_dtype

    processor = processor or model
    torch_dtype = to_dtype(dtype)
    clip = from_pretrained_or_explain(CLIPModel.from_pretrained, model, f"{what} model", option)
    config = from_pretrained_or_explain(lambda s: ImageProcessingMixin.get_image_processor_dict(s)[0],
                                        processor, f"{what} processor", processor_option)
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, processor, f"{what} tokenizer",
                                           processor_option) if text else None
    logger.info("loaded %s model from %s (processor %s) on %s in %s", what, model, processor, device, torch_dtype)
    return CLIPTowers(clip.to(device=device, dtype=torch_dtype), ImagePreprocessing.from_config(config), tokenizer)
