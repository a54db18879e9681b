"""Load a Stable Diffusion pipeline (SD 1.x / 2.x and SDXL UNets, SD3 / SD3.5 transformers: the kinds of
:data:`rewardtune.diffusion.backbones.BACKBONES`) from a registered name, a local folder or a hub id."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.modelfiles import is_hub_id, not_found_error, offline_unless_reachable
from rewardtune.models_table import PIPELINES, UNET_LOADER_HOOKS
from rewardtune.registry import Registry
from rewardtune.utils.devices import DTYPES, to_dtype  # noqa: F401  (re-exported: loading.DTYPES)

logger = logging.getLogger(__name__)


MODELS: Registry[str] = Registry("model")
for _name, _source in PIPELINES.items():
    MODELS.register(_name, _source)

# UNet loaders/checks keyed by the ``unet/config.json`` entry that marks a UNet ``from_pretrained`` cannot load
# alone (see rewardtune.models_table.UNET_LOADER_HOOKS): {"load": fn or "module:function", "check": ...}. Features
# (e.g. pruning) are imported only when a loaded folder carries their key, so this layer imports none of them.
UNET_LOADERS: Registry[dict[str, Any]] = Registry("UNet loader")
for _key, _hooks in UNET_LOADER_HOOKS.items():
    UNET_LOADERS.register(_key, dict(_hooks))


def register_unet_loader(key: str, load: Callable | str | None = None, check: Callable | str | None = None) -> None:
    """Add a UNet loader for UNets whose config carries ``key``: ``load(unet_folder: Path, dtype) -> UNet | None``
    (None: plain ``from_pretrained`` loads it), ``check(pipe)`` raises a one-line UserError for a misfit.
    Either may be a callable or a lazy ``"module:function"`` string."""
    UNET_LOADERS.register(key, {"load": load, "check": check})


def _hook(key: str, role: str) -> Callable | None:
    target = UNET_LOADERS.get(key).get(role)
    if isinstance(target, str):
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)
    return target


def _unet_config_keys(config: dict) -> list[str]:
    return [key for key in UNET_LOADERS.names() if config.get(key) is not None]


def _custom_unet(folder: str, dtype: str | torch.dtype) -> dict:
    """``{"unet": UNet}`` when a registered UNet loader rebuilds the folder's UNet (e.g. pruned channels), else
    ``{}`` (plain ``from_pretrained``). Only the loaders whose key is in ``unet/config.json`` are imported."""
    config_path = Path(folder) / "unet" / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError):
        return {}  # from_pretrained reports the unreadable config
    for key in _unet_config_keys(config if isinstance(config, dict) else {}):
        load = _hook(key, "load")
        unet = load(config_path.parent, to_dtype(dtype)) if load is not None else None
        if unet is not None:
            return {"unet": unet}
    return {}


def _check_unet(pipe) -> None:
    """Run the registered checks of the loaded UNet's config keys (a misfit UNet: one-line UserError)."""
    for key in _unet_config_keys(dict(pipe.unet.config)):
        check = _hook(key, "check")
        if check is not None:
            check(pipe)


def resolve_model(model: str) -> str:
    """A registered name, an existing local folder or a hub id (``org/name``) -> what ``from_pretrained`` takes."""
    if model in MODELS:
        return MODELS.get(model)
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    if is_hub_id(model):
        return model
    raise UserError(f"unknown model {model!r}; choose one of: {', '.join(MODELS.names())}, "
                    "or pass a local pipeline folder or a hub id such as CompVis/stable-diffusion-v1-4")


@functools.cache
def _dtype_kwarg() -> str:
    """diffusers renamed ``from_pretrained(torch_dtype=)`` to ``dtype=`` (PR #14205, 2026); older versions need the
    old name. The rename shipped together with its deprecation message, whose presence is the feature test."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


@contextmanager
def _loading_bar(show: bool):
    """diffusers' "Loading pipeline components" bar only when ``show`` (verbose logging); restored afterwards."""
    from diffusers.utils import logging as diffusers_logging

    was = diffusers_logging.is_progress_bar_enabled()
    (diffusers_logging.enable_progress_bar if show else diffusers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (diffusers_logging.enable_progress_bar if was else diffusers_logging.disable_progress_bar)()


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_BASE_NOTE = "rewardtune_base.json"


def lora_base_model(folder: str | Path) -> str | None:
    """The base model named in a LoRA folder's ``rewardtune_base.json`` (``{"model": ...}``), else ``None``."""
    note = Path(folder) / LORA_BASE_NOTE
    if not note.is_file():
        return None
    try:
        model = json.loads(note.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        model = None
    if not isinstance(model, str) or not model:
        raise UserError(f"{str(note)!r} should hold {{'model': 'BASE'}} as JSON; fix it or pass --model BASE")
    return model


def _check_pipeline_folder(source: str) -> None:
    """A local ``source`` must be a pipeline folder; a LoRA folder gets a one-line pointer to ``--lora``."""
    folder = Path(source)
    if (folder / "model_index.json").is_file():
        return
    if (folder / LORA_WEIGHTS).is_file():
        base = lora_base_model(folder) or "BASE"
        raise ModelNotFoundError(f"{source!r} holds LoRA weights, not a pipeline; pass the base model and the "
                                 f"LoRA: --model {base} --lora {source}")
    raise ModelNotFoundError(f"{source!r} is not a diffusers pipeline folder (no model_index.json); "
                             "pass a folder written by save_pretrained")


def lora_weights(lora: str | Path) -> tuple[Path, str]:
    """``(folder, weight_name)`` of a LoRA folder holding ``pytorch_lora_weights.safetensors``, or of a
    ``.safetensors`` file; a one-line :class:`UserError` for anything else."""
    path = Path(lora).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent, path.name
    if (path / LORA_WEIGHTS).is_file():
        return path, LORA_WEIGHTS
    raise UserError(f"--lora {str(lora)!r} is not a LoRA folder (no {LORA_WEIGHTS}) or .safetensors file; "
                    "pass the final/ folder of a LoRA finetuning run")


def load_lora(pipe, lora: str | Path) -> None:
    """``pipe.load_lora_weights`` of :func:`lora_weights` (one line if it does not fit the pipeline)."""
    folder, name = lora_weights(lora)
    try:
        pipe.load_lora_weights(str(folder), weight_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load LoRA {str(lora)!r} into this model: {str(exc).splitlines()[0]}; "
                        "pass the --model it was trained from") from None


def pipeline_class(source: str, local: bool) -> type:
    """The diffusers pipeline class that ``model_index.json`` of ``source`` names; a one-line UserError for a kind
    rewardtune does not support."""
    import diffusers

    from rewardtune.diffusion.backbones import BACKBONES

    if local:
        name = json.loads((Path(source) / "model_index.json").read_text()).get("_class_name")
    else:
        name = diffusers.DiffusionPipeline.load_config(source).get("_class_name")
    if name not in BACKBONES:
        raise UserError(f"{source!r} is a {name} pipeline; rewardtune supports " + ", ".join(BACKBONES.names()))
    return getattr(diffusers, name)


def _absent_components(cls: type, source: str, local: bool) -> dict:
    """``{name: None}`` for each component a local folder's ``model_index.json`` leaves out or names as null (a
    T5-less SD3's ``text_encoder_3``): diffusers' ``from_pretrained`` refuses such a folder unless they are passed."""
    from rewardtune.diffusion.backbones import missing_components

    if not local:
        return {}
    index = json.loads((Path(source) / "model_index.json").read_text())
    return dict.fromkeys(missing_components(cls, index))


def load_pipeline(model: str = "shapes-tiny", dtype: str | torch.dtype = "float32", device: str = "cpu",
                  lora: str | Path | None = None, fuse_lora: bool = False):
    """The pipeline ``model_index.json`` names (SD and SDXL with a ``DDIMScheduler``; SD3 with its flow-matching
    scheduler and exact T5-less attention, :mod:`rewardtune.diffusion.sd3`), on ``device`` in ``dtype``, progress
    bars off;
    with ``lora``, the LoRA weights of that folder loaded on top, and with ``fuse_lora`` also merged into the weights
    (the adapter layers removed: a plain finetuned model, e.g. to prune or time it).

    Raises:
        ModelNotFoundError: the weights are not on disk and cannot be downloaded (one line naming the model and
            how to supply it), or ``model`` is a LoRA folder (use ``lora``).
    """
    from rewardtune.diffusion.backbones import BACKBONES

    source = resolve_model(model)
    local = Path(source).exists()
    if local:
        _check_pipeline_folder(source)
    if lora is not None:
        lora_weights(lora)  # before the (slow) base model load
    try:
        hub = contextlib.nullcontext() if local else offline_unless_reachable()  # no minute of retries offline
        with hub, _loading_bar(logger.isEnabledFor(logging.INFO)):
            cls = pipeline_class(source, local)
            backbone = BACKBONES.get(cls.__name__)
            parts = {**_absent_components(cls, source, local), **backbone.load_kwargs}
            if local and backbone.attribute == "unet":
                parts.update(_custom_unet(source, dtype))
            pipe = cls.from_pretrained(source, **{_dtype_kwarg(): to_dtype(dtype)}, **parts)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelNotFoundError(f"cannot load pipeline folder {source!r}: {str(exc).splitlines()[0]}") from None
        what = f"model {model!r}" + (f" ({source})" if source != model else "")
        raise not_found_error(what, source, option="--model", local="pipeline folder") from None
    if backbone.attribute == "unet":
        _check_unet(pipe)  # e.g. a pruned UNet saved into a mismatched pipeline folder: one-line error
    backbone.prepare(pipe)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora(pipe, lora)
        if fuse_lora:
            pipe.fuse_lora()
            pipe.unload_lora_weights()
    logger.info("loaded %s from %s (%s, %s)%s", model, source, dtype, device, f" + LoRA {lora}" if lora else "")
    return pipe.to(device)
