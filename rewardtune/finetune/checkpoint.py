"""Checkpoints of an online finetuning run and its final model.

A checkpoint is a folder ``output_dir/checkpoints/epoch_N`` (N = epochs completed) holding

* ``trainable.safetensors``: the trainable parameters by name (every UNet parameter for full finetuning, the LoRA
  matrices for LoRA), so the same code saves and restores both;
* ``state.pt``: optimizer state, the algorithm's ``state_dict()`` (DDPO's stat tracker), RNG states (python,
  numpy, torch) and ``epoch``; plain tensors and containers only, loadable with ``weights_only=True``.

Under FSDP (``fsdp=true``) the weights and optimizer states stay sharded: ``sharded/`` holds one
``torch.distributed.checkpoint`` file per process and ``.metadata`` instead of ``trainable.safetensors``, and
``state.pt`` has no optimizer entry (:func:`save_sharded_checkpoint`).

Folders are written under a temporary name, flushed to disk and renamed into place with ``os.replace``, so a crash
or a power loss never leaves a half-written ``epoch_N``. Only the last ``keep_last`` are kept; resuming skips an
unreadable newest checkpoint (with a warning) for the one before it.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rewardtune.errors import UserError
from rewardtune.utils.io import atomic_write_json, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SHARDS = "sharded"  # FSDP checkpoints: torch.distributed.checkpoint files, one per process
LORA_BASE = "rewardtune_base.json"  # in a LoRA final folder: {"model": the base pipeline it was trained on}
_NAME = re.compile(r"^epoch_(\d+)$")


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that require grad, detached and on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``unet``; every trainable name must be present."""
    params = dict(unet.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"checkpoint does not match this model: {len(missing)} trainable parameters missing "
                        f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); was it written with "
                        "another model or lora_rank?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_checkpoint(folder: Path) -> bool:
    """A complete checkpoint folder: ``state.pt`` and the weights (``trainable.safetensors`` or FSDP shards)."""
    weights = (folder / "trainable.safetensors").is_file() or is_sharded_checkpoint(folder)
    return (folder / "state.pt").is_file() and weights


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / SHARDS / ".metadata").is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(epoch, folder)]`` under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("epoch_*") if (m := _NAME.match(p.name)) and is_checkpoint(p)]
    return sorted(found)


def save_checkpoint(output_dir: str | Path, epoch: int, unet, optimizer, algorithm, keep_last: int,
                    extra: dict | None = None) -> Path:
    """Write ``checkpoints/epoch_{epoch}`` atomically (files and folder flushed to disk before the rename), then
    delete all but the newest ``keep_last``. ``extra``: more run state for ``state.pt`` (plain tensors and
    containers; e.g. the reward-query count and the dense advantages' implicit PRM), returned by
    :func:`load_checkpoint`.

    Raises:
        UserError: the disk is full (or another OS error); the earlier checkpoints are left intact.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"epoch_{epoch}"
    try:
        _prepare_root(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_epoch_{epoch}_", dir=root))
        try:
            _write_checkpoint_files(tmp, epoch, unet, optimizer, algorithm, extra or {})
            _replace_folder(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise _save_error(output_dir, final, exc) from None
    _keep_newest(output_dir, keep_last, final)
    return final


def _save_error(output_dir: str | Path, final: Path, exc: OSError) -> UserError:
    kept = list_checkpoints(output_dir)
    previous = f"the previous checkpoint {kept[-1][1]} is intact" if kept else "no earlier checkpoint exists"
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return UserError(f"cannot save checkpoint {final}: {reason}; {previous}; free space (or fix the folder) "
                     "and rerun with resume=auto")


def _keep_newest(output_dir: str | Path, keep_last: int, final: Path) -> None:
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)


def save_sharded_checkpoint(output_dir: str | Path, epoch: int, model, optimizer, algorithm, keep_last: int,
                            barrier, main: bool, extra: dict | None = None) -> Path:
    """:func:`save_checkpoint` for an FSDP-sharded ``model``, called by every process: each writes its shards of
    the weights and optimizer state into one temporary folder (``sharded/``), then the main process adds
    ``state.pt``, flushes and renames the folder into place. ``barrier()`` waits for every process."""
    from rewardtune.utils import fsdp

    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / f"epoch_{epoch}", root / f".tmp_epoch_{epoch}_sharded"
    try:
        if main:
            _prepare_root(root)
        barrier()
        fsdp.save_sharded(tmp / SHARDS, model, optimizer)
        barrier()
        if main:
            torch.save(_run_state(epoch, algorithm, extra), tmp / "state.pt")
            for path in [tmp / "state.pt", *(tmp / SHARDS).iterdir()]:
                fsync_file(path)
            fsync_dir(tmp / SHARDS)
            fsync_dir(tmp)
            _replace_folder(tmp, final)
    except OSError as exc:
        raise _save_error(output_dir, final, exc) from None
    finally:
        barrier()
    if main:
        _keep_newest(output_dir, keep_last, final)
    return final


def _prepare_root(root: Path) -> None:
    """Create the checkpoints folder and remove temporaries left by a killed run."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp_epoch_*"), *root.glob(".old_epoch_*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _run_state(epoch: int, algorithm, extra: dict | None) -> dict:
    """``state.pt``'s entries besides the optimizer: epoch, algorithm state, RNG states and ``extra``."""
    return {"epoch": epoch, "algorithm": algorithm.state_dict(), "rng": rng_state(),
            **({"extra": extra} if extra else {})}


def _write_checkpoint_files(folder: Path, epoch: int, unet, optimizer, algorithm, extra: dict) -> None:
    from safetensors.torch import save_file

    save_file(trainable_state(unet), str(folder / "trainable.safetensors"))
    torch.save({**_run_state(epoch, algorithm, extra), "optimizer": optimizer.state_dict()}, folder / "state.pt")
    for name in ("trainable.safetensors", "state.pt"):
        fsync_file(folder / name)
    fsync_dir(folder)


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``; an older ``final`` is renamed aside first and deleted only
    after the new one is in place, so at every moment one complete folder exists."""
    old = None
    if final.exists():
        old = final.with_name(f".old_{final.name}_{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resume_candidates(resume: str | None, output_dir: str | Path) -> list[Path]:
    """Checkpoints to try, newest first: ``None`` -> none; ``"auto"`` -> every complete checkpoint of
    ``output_dir`` (an unreadable newest one falls back to the one before); a path -> that folder only."""
    if resume is None:
        return []
    if resume == "auto":
        return [path for _, path in reversed(list_checkpoints(output_dir))]
    path = Path(resume)
    if not is_checkpoint(path):
        raise UserError(f"resume={resume!r} is not a checkpoint folder (state.pt and trainable.safetensors or "
                        f"{SHARDS}/); use resume=auto or a path like OUTPUT_DIR/checkpoints/epoch_N")
    return [path]


def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(trainable tensors, state)`` of a checkpoint folder, both read completely before anything is applied.

    Raises:
        UserError: a file is truncated, empty or not a checkpoint.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if is_sharded_checkpoint(folder):
        raise UserError(f"checkpoint {str(folder)!r} is sharded (written under FSDP); resume it with fsdp=true")
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        if not tensors or not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("empty or incomplete")
    except Exception as exc:  # safetensors, pickle and zip readers raise many types on truncated files
        detail = (str(exc).splitlines() or ["truncated"])[0].split(". ")[0]
        raise UserError(f"checkpoint {str(folder)!r} is unreadable ({type(exc).__name__}: {detail})") from None
    return tensors, state


def load_checkpoint(folders: str | Path | list[Path], unet, optimizer, algorithm) -> tuple[int, dict]:
    """Restore weights, optimizer, algorithm state and RNG states from the first readable folder of ``folders``
    (newest first; each unreadable one is skipped with a warning); returns (the epochs done, the ``extra`` state
    saved with it, {} when none)."""
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else list(folders)
    for i, folder in enumerate(folders):
        try:
            tensors, state = read_checkpoint(folder)
        except UserError as exc:
            if i + 1 == len(folders):
                raise UserError(f"{exc}; no readable checkpoint left to resume from") from None
            logger.warning("%s; falling back to %s", exc, folders[i + 1])
            continue
        load_trainable_state(unet, tensors)
        optimizer.load_state_dict(state["optimizer"])
        algorithm.load_state_dict(state["algorithm"])
        set_rng_state(state["rng"])
        logger.info("resumed from %s (epoch %d)", folder, state["epoch"])
        return int(state["epoch"]), state.get("extra", {})
    raise UserError("no checkpoint to resume from")


def save_final_model(pipe, unet, folder: str | Path, lora: bool, base_model: str | None = None) -> Path:
    """The trained model at ``folder``, written under a temporary name and renamed into place.

    Full finetuning: a diffusers pipeline folder (``pipe.save_pretrained``). LoRA: the adapter weights in the
    diffusers LoRA format, loadable with ``pipe.load_lora_weights(folder)`` on the base pipeline, and
    ``rewardtune_base.json`` naming that base (``base_model``) for ``rewardtune sample --lora``.
    """
    folder = Path(folder)
    for stale in [*folder.parent.glob(f".tmp_{folder.name}_*"), *folder.parent.glob(f".old_{folder.name}_*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (the run folder is locked: not in use)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{folder.name}_", dir=folder.parent))
    from rewardtune.diffusion.backbones import backbone_of

    try:
        if lora:
            backbone_of(pipe).save_lora(pipe, unet, tmp)
            if base_model is not None:
                atomic_write_json(tmp / LORA_BASE, {"model": base_model})
        else:
            backbone_of(pipe).save(pipe, tmp)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_sharded_checkpoint(folders: list[Path], model, optimizer, algorithm) -> tuple[int, dict]:
    """Restore an FSDP run from the newest of ``folders`` (every process reads its shards, resharded if the
    process count changed); returns ``(epochs done, extra)``. No fallback to an older checkpoint: a read that
    fails on one process only would leave the others waiting, so a damaged checkpoint is a one-line error that
    names the older one to pass as ``resume=PATH``."""
    from rewardtune.utils import fsdp

    folder = folders[0]
    if not is_sharded_checkpoint(folder):
        raise UserError(f"checkpoint {str(folder)!r} was written without FSDP; resume it with fsdp=false (and the "
                        "launch it was written with)")
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        fsdp.load_sharded(folder / SHARDS, model, optimizer)
    except Exception as exc:  # torch.distributed.checkpoint and pickle readers raise many types on damaged files
        older = f"; resume={folders[1]} resumes from the one before" if len(folders) > 1 else ""
        detail = (str(exc).splitlines() or ["damaged"])[0][:200]
        raise UserError(f"checkpoint {str(folder)!r} is unreadable ({type(exc).__name__}: {detail}){older}") from None
    algorithm.load_state_dict(state["algorithm"])
    set_rng_state(state["rng"])
    logger.info("resumed from %s (epoch %d, sharded)", folder, state["epoch"])
    return int(state["epoch"]), state.get("extra", {})
