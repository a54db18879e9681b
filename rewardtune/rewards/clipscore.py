"""CLIPScore: image-text cosine similarity of any open_clip model, differentiable.

    cos(x, p) = <E_I(prep(x)) / |E_I(prep(x))|, E_T(tok(p)) / |E_T(tok(p))|>
    score     = scale * cos                              (default, scale=1: plain cosine in [-1, 1])
    score     = scale * 2.5 * max(cos, 0)                (clip_s=True: CLIP-S of Hessel et al. 2021, w = 2.5)

torchmetrics' ``CLIPScore`` (100 * max(cos, 0)) is ``clip_s=True, scale=40``. ImageReward's CLIP baseline is the
default (plain cosine). With ``clip_s=True`` the clamp zeroes the gradient of pairs whose cosine is negative.

This module also holds the open_clip plumbing shared with :mod:`rewardtune.rewards.hpsv2`: architecture lookup
(model name or config JSON), checkpoint reading (bare state dict or ``{'state_dict': ...}``, ``module.`` prefix
stripped), strict weight loading and the :class:`ClipCosine` reward. open_clip is imported lazily. Preprocessing is
:func:`rewardtune.rewards.preprocess.clip_pixels` with open_clip's ``resize_mode`` as its ``fit``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.modelfiles import not_found_error, offline_mode, offline_unless_reachable, use_network
from rewardtune.rewards.base import Reward
from rewardtune.rewards.preprocess import clip_pixels
from rewardtune.utils.devices import to_dtype

logger = logging.getLogger(__name__)

CLIP_S_WEIGHT = 2.5

# open_clip's validation ``resize_mode``s, each the ``fit`` of :func:`clip_pixels` of the same name (bicubic,
# antialiased): shortest side + centre crop, longest side + zero padding, squash.
RESIZE_MODES = ("shortest", "longest", "squash")


class ClipCosine(Reward):
    """``score = scale * f(cos(E_I(normalize(resize(x))), E_T(tokens(p))))`` with ``f = id`` or
    ``f(c) = 2.5 * max(c, 0)`` (``clip_s``). Images ``[B,3,H,W]`` in [0,1], prompts ``list[str]`` -> ``[B]``.
    ``resize`` is one of :data:`RESIZE_MODES` (the ``fit`` of :func:`clip_pixels`).

    One forward per call: all images in one batch, each distinct prompt encoded once.
    """

    differentiable = True

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, resize: str, size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1.0, clip_s: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.resize, self.size = tokenizer, str(resize), int(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.clip_s = float(scale), bool(clip_s)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> normalised model input ``[B,3,S,S]`` (resize/pad or crop, then mean/std)."""
        dtype = next(self.model.parameters()).dtype
        x = images.to(self.device, torch.float32)
        return clip_pixels(x, self.size, fit=self.resize, mean=self.mean, std=self.std).to(dtype)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` cosine of the L2-normalised image and text embeddings (no logit scale)."""
        image_features = self.model.encode_image(self.pixels(images), normalize=True)
        unique = list(dict.fromkeys(prompts))
        text_features = self.model.encode_text(self.tokenizer(unique).to(self.device), normalize=True)
        row = {prompt: i for i, prompt in enumerate(unique)}
        index = torch.tensor([row[p] for p in prompts], device=self.device)
        return (image_features.float() * text_features.float()[index]).sum(dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.shape[0] == 0:
            return images.new_zeros(0)
        cos = self.cosine(images, prompts)
        if self.clip_s:
            cos = CLIP_S_WEIGHT * cos.clamp(min=0)
        return (self.scale * cos).to(images.device)


def register_arch(arch: str) -> str:
    """An open_clip model name (``ViT-H-14``) or a path to an open_clip model-config JSON -> the name open_clip
    knows it by. A JSON is registered under its file stem (``open_clip.add_model_config``)."""
    import open_clip

    path = Path(str(arch)).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ModelNotFoundError(f"model config {str(path)!r} does not exist; pass an open_clip model name "
                                     "such as ViT-H-14 or the path of an open_clip model-config JSON")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read model config {str(path)!r}: {str(exc).splitlines()[0]}") from None
        if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"{str(path)!r} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        if open_clip.get_model_config(path.stem) != config:
            open_clip.add_model_config(path)
        return path.stem
    name = str(arch).replace("/", "-")
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture {arch!r}; pass a name from open_clip.list_models() "
                        "(e.g. ViT-H-14, ViT-L-14) or the path of an open_clip model-config JSON")
    return name


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns 'initialized randomly' when built without weights; ours are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def build_open_clip(name: str, quick_gelu: bool = False) -> torch.nn.Module:
    """A randomly initialised open_clip model of registered architecture ``name`` on CPU. Downloads nothing: no
    CLIP weights, no timm/HF tower weights (``pretrained=None``, ``pretrained_image/text=False``)."""
    import open_clip

    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False,
                                       force_quick_gelu=quick_gelu, device="cpu")
    finally:
        logging.getLogger().removeFilter(quiet)
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file -> an open_clip state dict. Accepts a bare state dict (``.pt``/``.bin``/``.safetensors``)
    or a training checkpoint ``{'state_dict': {...}, ...}`` (HPSv2, open_clip); strips DDP's ``module.`` prefix.
    Loads with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the path of a downloaded checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            blob: Any = load_file(str(path), device="cpu")
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors all mean "not a readable checkpoint"
        raise UserError(f"cannot read checkpoint {str(path)!r}: {str(exc).splitlines()[0]}") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no state dict (expected a dict of tensors or "
                        "{'state_dict': dict of tensors})")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` with a one-line :class:`UserError` naming the first mismatch."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        example = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected else
                   f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, model needs {tuple(own[wrong[0]].shape)}")
        raise UserError(f"checkpoint {source!r} does not fit the architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped keys; e.g. {example}); "
                        "pass the matching arch/model")
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), source)


def load_tokenizer(name: str) -> Callable:
    """``open_clip.get_tokenizer(name)``; a tokenizer that must come from the hub and is absent is a one-line error."""
    import open_clip

    try:
        with offline_unless_reachable():
            return open_clip.get_tokenizer(name)
    except Exception as exc:
        raise ModelNotFoundError(f"the tokenizer of {name!r} is not available offline "
                                 f"({str(exc).splitlines()[0]}); download it on a connected machine") from None


def square_image_size(model: torch.nn.Module) -> int:
    """The model's input side from its preprocess config (e.g. 224 for ViT-H-14)."""
    import open_clip

    size = open_clip.get_model_preprocess_cfg(model).get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise UserError(f"non-square model input {height}x{width} is not supported")
    return int(height)


def fetch_pretrained(name: str, tag: str, cfg: dict) -> str:
    """The local file of open_clip weights ``name``/``tag`` (cache hit, or a download when the hub is allowed and
    reachable; otherwise a one-line error at once, with no retries)."""
    import open_clip

    source = cfg.get("hf_hub", "").rstrip("/") or cfg.get("url", "")
    url_cache = "~/.cache/clip"
    where = {} if cfg.get("hf_hub") else {"cache": url_cache, "into": url_cache}
    what = f"open_clip weights {name} ({tag})"
    offline_url_only = not use_network() and not cfg.get("hf_hub")
    if offline_url_only and not (Path(url_cache).expanduser() / Path(source).name).is_file():
        why = "HF_HUB_OFFLINE is set" if offline_mode() else "the network is not reachable"
        raise not_found_error(what, source, option="checkpoint", plural=True, reason=why, **where)
    try:
        with offline_unless_reachable():
            return open_clip.download_pretrained(cfg)
    except Exception:
        raise not_found_error(what, source, option="checkpoint", plural=True, **where) from None


def resolve_clip_weights(name: str, pretrained: str | None, checkpoint: str | None) -> tuple[str, dict]:
    """``(weights file, open_clip pretrained config)``; the config is ``{}`` unless the weights come from a tag."""
    import open_clip

    if checkpoint:
        return str(checkpoint), {}
    if not pretrained:
        raise UserError("clipscore needs weights: pass pretrained=TAG (e.g. 'openai') or checkpoint=PATH")
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser()), {}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none; pass checkpoint=PATH"
        raise UserError(f"unknown pretrained tag {pretrained!r} for open_clip model {name!r}; choose one of: {tags}")
    return fetch_pretrained(name, pretrained, cfg), cfg


def clip_preprocess(model: torch.nn.Module, tag_cfg: dict) -> tuple[str, tuple, tuple]:
    """``(resize mode, mean, std)`` of the open_clip validation transform (the ``fit``/``mean``/``std`` of
    :func:`clip_pixels`): the model's preprocess config, overridden by the pretrained tag's
    ``mean``/``std``/``resize_mode`` (e.g. SigLIP's 0.5 mean/std)."""
    import open_clip

    cfg = {**open_clip.get_model_preprocess_cfg(model),
           **{k: tag_cfg[k] for k in ("mean", "std", "resize_mode") if k in tag_cfg}}
    mode = cfg.get("resize_mode", "shortest")
    if mode not in RESIZE_MODES:
        raise UserError(f"open_clip resize_mode {mode!r} is not supported; supported: {', '.join(RESIZE_MODES)}")
    return mode, tuple(cfg["mean"]), tuple(cfg["std"])


def load_clipscore(model: str = "ViT-L-14", pretrained: str | None = "openai", checkpoint: str | None = None,
                   scale: float = 1.0, clip_s: bool = False, quick_gelu: bool | None = None,
                   device: str = "cpu", dtype: str = "float32") -> Reward:
    """CLIPScore of an open_clip model: ``scale * cos`` or, with ``clip_s``, ``scale * 2.5 * max(cos, 0)``.

    Args:
        model: open_clip architecture name (``ViT-L-14``, ``ViT-B-32``, ...) or a model-config JSON path.
        pretrained: open_clip pretrained tag (``openai``, ``laion2b_s32b_b82k``, ...) or a weights file; the tag's
            file must be in the local cache when offline. Ignored when ``checkpoint`` is given.
        checkpoint: a state-dict file (bare, or ``{'state_dict': ...}``, ``module.`` prefixes allowed).
        quick_gelu: activation; ``None`` takes it from the tag (OpenAI weights need QuickGELU) or the config.
        scale, clip_s: see the module docstring.

    Preprocessing is the open_clip validation transform in torch ops (bicubic, antialiased): shortest side to
    the model's image size + centre crop (or the tag's ``resize_mode``), then the tag's mean/std (OpenAI's by
    default). Raises :class:`ModelNotFoundError` (one line) when the weights are missing offline.
    """
    name = register_arch(model)
    path, tag_cfg = resolve_clip_weights(name, pretrained, checkpoint)
    gelu = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    clip = build_open_clip(name, quick_gelu=gelu)
    load_weights(clip, read_state_dict(path), path)
    resize, mean, std = clip_preprocess(clip, tag_cfg)
    reward = ClipCosine(clip, load_tokenizer(name), resize, square_image_size(clip), mean, std, scale=scale,
                        clip_s=clip_s)
    logger.info("clipscore: %s from %s (quick_gelu=%s, scale=%g, clip_s=%s)", name, path, gelu, scale, clip_s)
    return reward.to(device=device, dtype=to_dtype(dtype))
