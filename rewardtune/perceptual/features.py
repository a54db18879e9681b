"""Frame feature extractors behind one interface: ``extractor.embed(frames uint8 [T,H,W,3]) -> Tensor[T,D]``.

    extractor = load_extractor("random-cnn", seed=0)
    features = extractor.embed(frames)            # batched, no_grad, float32 on CPU
    spec = extractor.spec()                       # json-able; load_extractor(**spec) rebuilds the same extractor

Extractors (name: features):

- ``inception_v3``: torchvision Inception v3, activations of Mixed_5b..Mixed_7c (the paper's choice); ``pooled=True``
  (default) averages each channel over space (10,048 dims), ``pooled=False`` keeps every spatial activation
  (2,473,024 dims at 299 px). Weights: ``weights="imagenet"`` (torchvision's usual download or cache), a local
  state-dict file, or ``"random"`` (seeded; tests and speed runs)
- ``openclip:<model>``: an open_clip image tower's embedding; ``<model>`` is an architecture name or a model-config
  JSON, weights from ``pretrained=TAG`` or ``checkpoint=FILE``
- ``shapes-clip``: the shapes world's tiny CLIP image embedding (shipped with the package)
- ``random-cnn``: a seeded random ReLU convnet (4 stride-2 conv layers); channel means of every layer plus a 4x4 grid
  of the last
- ``pixels``: the frame resized (antialiased) to ``size x size``, values in [0,1]
- ``time-contrastive``: a small convnet trained on the task's own demos by a single-view time-contrastive triplet
  loss (:mod:`rewardtune.perceptual.tcn`); ``fit(videos)`` trains it, its weights travel in the reward file

Heavy libraries (torchvision models, open_clip, transformers) are imported only by the extractor that needs them.
Raw Inception activations are ~10 MB per frame in float32: fit them on few, short demos (or use ``pooled=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.modelfiles import asset, not_found_error
from rewardtune.registry import Registry
from rewardtune.rewards.preprocess import clip_pixels

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_LAYERS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                    "Mixed_7a", "Mixed_7b", "Mixed_7c")


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[T,H,W,3]`` -> float ``[T,3,H,W]`` in [0,1]. Raises :class:`UserError` on other shapes/dtypes."""
    frames = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise UserError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).float().div(255)


def resize_shortest_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B,3,H,W]`` -> ``[B,3,size,size]`` in [0,1]: shortest side to ``size`` (bilinear, antialiased, the long
    side rounded), centre crop, no normalisation (:func:`rewardtune.rewards.preprocess.clip_pixels`)."""
    return clip_pixels(images, size, mode="bilinear", rounding="round", mean=None)


class FeatureExtractor:
    """Base class: subclasses implement :meth:`features` on float ``[B,3,H,W]`` in [0,1] batches."""

    name = "extractor"
    needs_training = False      # True: call fit(videos) before embed (time-contrastive)

    def __init__(self, batch_size: int = 32, **options: Any) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.options = dict(options)

    device = torch.device("cpu")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        """The networks to move with :meth:`to` (none for pixels)."""
        return [v for v in vars(self).values() if isinstance(v, nn.Module)] + list(getattr(self, "layers", []))

    def to(self, device: str | torch.device) -> "FeatureExtractor":
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        for key in ("mean", "std"):
            if isinstance(getattr(self, key, None), torch.Tensor):
                setattr(self, key, getattr(self, key).to(self.device))
        return self

    def embed(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T,H,W,3]`` -> float32 features ``[T,D]`` on the CPU (batches of ``batch_size``)."""
        images = frames_to_tensor(frames)
        if not len(images):
            raise UserError("no frames to embed")
        parts = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                batch = images[i:i + self.batch_size].to(self.device)
                parts.append(self.features(batch).reshape(len(batch), -1).float().cpu())
        return torch.cat(parts)

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}``: enough to rebuild this extractor with :func:`load_extractor`."""
        return {"name": self.name, "options": dict(self.options)}

    def fit(self, videos) -> "FeatureExtractor":
        """Learn from demo videos (only extractors with ``needs_training``); fixed extractors return themselves."""
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned weights that :meth:`spec` cannot rebuild (saved in the reward file); none for fixed ones."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise UserError(f"feature extractor {self.name!r} has no learned weights to load")


class PixelFeatures(FeatureExtractor):
    """Raw pixels resized to ``size x size`` (antialiased bilinear, aspect ratio ignored): ``3 * size^2`` dims.
    ``blur > 0`` then applies a Gaussian blur of that std (in output pixels, reflect padding), which turns a small
    object's position into a dense signal (e.g. MountainCar's car)."""

    name = "pixels"

    def __init__(self, size: int = 16, blur: float = 0.0, batch_size: int = 256) -> None:
        super().__init__(batch_size, size=int(size), blur=float(blur))
        if size < 1 or blur < 0:
            raise UserError(f"pixels needs size >= 1 and blur >= 0, got size={size}, blur={blur}")
        self.size, self.blur = int(size), float(blur)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.blur > 0:
            radius = max(1, min(int(3 * self.blur), self.size - 1))
            taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / self.blur) ** 2)
            taps = (taps / taps.sum()).to(x.device)
            x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
            x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
            x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        return x


class RandomCNNFeatures(FeatureExtractor):
    """A seeded, randomly initialised ReLU convnet (He-normal weights from ``torch.Generator(seed)``; 4 conv
    layers 3x3 stride 2 of ``width, 2w, 4w, 4w`` channels) on the frame resized to ``size``. Features: the
    spatial mean of every layer's channels plus a 4x4 average-pooled grid of the last layer
    (``w + 2w + 4w + 4w + 16*4w`` dims, 600 for width 8)."""

    name = "random-cnn"

    def __init__(self, seed: int = 0, size: int = 64, width: int = 8, batch_size: int = 64) -> None:
        super().__init__(batch_size, seed=int(seed), size=int(size), width=int(width))
        self.size = int(size)
        generator = torch.Generator().manual_seed(int(seed))
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (9 * c_in)) ** 0.5)
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=generator))
            self.layers.append(conv.eval())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shortest_crop(images, self.size) * 2 - 1
        parts = []
        for conv in self.layers:
            x = torch.relu(conv(x))
            parts.append(x.mean((2, 3)))
        parts.append(F.adaptive_avg_pool2d(x, 4).flatten(1))
        return torch.cat(parts, 1)


class InceptionFeatures(FeatureExtractor):
    """torchvision Inception v3 activations of Mixed_5b..Mixed_7c (the paper's features, Sec. 2.2).

    Input: shortest side to ``size`` (299), centre crop, then ``2x - 1`` (what torchvision's ImageNet weights with
    ``transform_input=True`` compute from ImageNet-normalised input). ``pooled``: per-channel spatial means
    (10,048 dims) or every activation (2,473,024 dims at 299).
    """

    name = "inception_v3"

    def __init__(self, weights: str = "imagenet", pooled: bool = True, size: int = 299, seed: int = 0,
                 batch_size: int = 16) -> None:
        super().__init__(batch_size, weights=str(weights), pooled=bool(pooled), size=int(size), seed=int(seed))
        if size < 75:
            raise UserError(f"inception_v3 needs size >= 75, got {size}")
        self.size, self.pooled = int(size), bool(pooled)
        self.model = build_inception(str(weights), int(seed))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = resize_shortest_crop(images, self.size) * 2 - 1
        for layer in (m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1, m.Conv2d_3b_1x1,
                      m.Conv2d_4a_3x3, m.maxpool2):
            x = layer(x)
        parts = []
        for name in INCEPTION_LAYERS:
            x = getattr(m, name)(x)
            parts.append(x.mean((2, 3)) if self.pooled else x.flatten(1))
        return torch.cat(parts, 1)


def build_inception(weights: str, seed: int = 0) -> nn.Module:
    """Inception v3 (no aux head) with ``weights``: ``"imagenet"``, ``"random"`` or a state-dict file."""
    from torchvision.models import inception_v3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inception_v3(weights=None, aux_logits=False, init_weights=weights == "random").eval()
    if weights == "random":
        return model
    if weights == "imagenet":
        state = _download_inception()
        source = "torchvision IMAGENET1K_V1"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"inception_v3 weights file {str(path)!r} does not exist; pass weights=PATH to "
                                     "a torchvision state dict, weights=imagenet or weights=random")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"cannot read inception_v3 weights {str(path)!r}: {type(exc).__name__}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        source = str(path)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith(
        "AuxLogits.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"inception_v3 weights {source} do not match torchvision's Inception v3: "
                        f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                        f"(e.g. {unexpected[:1]})")
    return model


def _download_inception() -> dict[str, torch.Tensor]:
    from torchvision.models import Inception_V3_Weights

    try:
        return Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception:
        raise not_found_error("inception_v3 ImageNet weights", Inception_V3_Weights.IMAGENET1K_V1.url, plural=True,
                              cache="torch's cache", into="$TORCH_HOME/hub/checkpoints", option="weights") from None


class OpenClipFeatures(FeatureExtractor):
    """An open_clip image tower's (unnormalised) embedding, with the model's validation preprocessing."""

    name = "openclip"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", checkpoint: str | None = None,
                 batch_size: int = 32) -> None:
        super().__init__(batch_size, model=str(model), pretrained=pretrained, checkpoint=checkpoint)
        from rewardtune.rewards.clipscore import (
            build_open_clip,
            clip_preprocess,
            load_weights,
            read_state_dict,
            register_arch,
            resolve_clip_weights,
            square_image_size,
        )

        arch = register_arch(model)
        path, tag_cfg = resolve_clip_weights(arch, pretrained, checkpoint)
        self.clip = build_open_clip(arch, quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
        load_weights(self.clip, read_state_dict(path), path)
        self.fit, self.mean, self.std = clip_preprocess(self.clip, tag_cfg)
        self.image_size = square_image_size(self.clip)

    def spec(self) -> dict[str, Any]:
        return {"name": f"openclip:{self.options['model']}",
                "options": {k: v for k, v in self.options.items() if k != "model"}}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(images, self.image_size, fit=self.fit, mean=self.mean, std=self.std)
        return self.clip.encode_image(pixels)


class ShapesClipFeatures(FeatureExtractor):
    """The shapes world's tiny CLIP image embedding (``model`` = a CLIP folder; default: the shipped one)."""

    name = "shapes-clip"

    def __init__(self, model: str | None = None, batch_size: int = 64) -> None:
        super().__init__(batch_size, model=model)
        from rewardtune.rewards.shapes import load_tiny_clip

        self.towers = load_tiny_clip(model or asset("shapes-clip")).eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.towers.encode_images(images)


EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature extractor")
for _cls in (InceptionFeatures, OpenClipFeatures, ShapesClipFeatures, RandomCNNFeatures, PixelFeatures):
    EXTRACTORS.register(_cls.name, _cls)


def _time_contrastive(**options: Any) -> FeatureExtractor:
    from rewardtune.perceptual.tcn import TimeContrastiveFeatures

    return TimeContrastiveFeatures(**options)


EXTRACTORS.register("time-contrastive", _time_contrastive)


def load_extractor(name: str, options: dict[str, Any] | None = None, **more: Any) -> FeatureExtractor:
    """An extractor by registered name (``openclip:<model>`` passes ``<model>`` as ``model=``).

    Raises:
        UserError: unknown name (lists the valid ones) or an option the extractor does not take.
    """
    options = {**(options or {}), **more}
    base, sep, arg = str(name).partition(":")
    if base == "openclip":
        if not arg:
            raise UserError("openclip needs a model: openclip:<architecture or model-config JSON>, "
                            "e.g. openclip:ViT-B-32")
        options["model"] = arg
    elif sep:
        raise UserError(f"feature extractor {name!r} takes no ':' argument (only openclip:<model> does)")
    factory = EXTRACTORS.get(base)
    try:
        return factory(**options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            bad = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
            raise UserError(f"feature extractor {base!r} does not take option {bad!r}") from None
        raise


def extractor_names() -> list[str]:
    return [("openclip:<model>" if n == "openclip" else n) for n in EXTRACTORS.names()]


__all__ = ["EXTRACTORS", "FeatureExtractor", "load_extractor", "extractor_names", "frames_to_tensor",
           "INCEPTION_LAYERS"]
