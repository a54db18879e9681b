"""Load any Stable Diffusion 1.x / 2.x pipeline from a registered name, a local folder or a hub id."""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.registry import Registry

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"

MODELS: Registry[str] = Registry("model")
MODELS.register("shapes-tiny", str(ASSETS / "shapes-tiny"))
MODELS.register("sd14", "CompVis/stable-diffusion-v1-4")
MODELS.register("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5")
MODELS.register("sd21", "stabilityai/stable-diffusion-2-1")
MODELS.register("sd21-base", "stabilityai/stable-diffusion-2-1-base")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_model(model: str) -> str:
    """A registered name, an existing local folder or a hub id (``org/name``) -> what ``from_pretrained`` takes."""
    if model in MODELS:
        return MODELS.get(model)
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return model
    raise UserError(f"unknown model {model!r}; choose one of: {', '.join(MODELS.names())}, "
                    "or pass a local pipeline folder or a hub id such as CompVis/stable-diffusion-v1-4")


@functools.cache
def _dtype_kwarg() -> str:
    """diffusers renamed ``from_pretrained(torch_dtype=)`` to ``dtype=`` (PR #14205, 2026); older versions need the
    old name. The rename shipped together with its deprecation message, whose presence is the feature test."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _pruned_unet(folder: str, dtype: str | torch.dtype) -> dict:
    """``{"unet": UNet}`` when the folder's UNet has pruned channels (rebuilt by rewardtune.prune.io), else ``{}``."""
    from rewardtune.prune.io import load_pruned_unet, needs_rebuild

    unet_dir = Path(folder) / "unet"
    return {"unet": load_pruned_unet(unet_dir, to_dtype(dtype))} if needs_rebuild(unet_dir) else {}


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


def load_pipeline(model: str = "shapes-tiny", dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """A ``StableDiffusionPipeline`` with a ``DDIMScheduler``, on ``device`` in ``dtype``, progress bars off.

    Raises:
        ModelNotFoundError: the weights are not on disk and cannot be downloaded (one line naming the model and
            how to supply it).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    source = resolve_model(model)
    local = Path(source).exists()
    if local and not (Path(source) / "model_index.json").is_file():
        raise ModelNotFoundError(f"{source!r} is not a diffusers pipeline folder (no model_index.json); "
                                 "pass a folder written by save_pretrained")
    try:
        pruned = _pruned_unet(source, dtype) if local else {}
        with _loading_bar(logger.isEnabledFor(logging.INFO)):
            pipe = StableDiffusionPipeline.from_pretrained(source, **{_dtype_kwarg(): to_dtype(dtype)},
                                                           safety_checker=None, requires_safety_checker=False,
                                                           **pruned)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelNotFoundError(f"cannot load pipeline folder {source!r}: {str(exc).splitlines()[0]}") from None
        raise ModelNotFoundError(
            f"model {model!r} ({source}) is not in the local Hugging Face cache and could not be downloaded; "
            f"on a connected machine run `hf download {source}` (then copy the cache or set HF_HOME), "
            "or pass a local pipeline folder with --model PATH") from None
    from rewardtune.prune.io import check_pruned_fits

    check_pruned_fits(pipe)  # a pruned UNet saved into a mismatched pipeline folder: one-line error
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s from %s (%s, %s)", model, source, dtype, device)
    return pipe.to(device)
