"""``rewardtune finetune``: validate a run's config against files and registries, own its run folder, and hand
it to the trainer recipe (:class:`rewardtune.finetune.trainer.Trainer`, which documents the epoch).

Run directory: ``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``, ``reward_curve.png``, ``grids/epoch_NNNN.png``,
``before_after.png``, ``summary.json``, ``checkpoints/epoch_N/``, ``final/`` (a pipeline folder, or LoRA weights
for ``pipe.load_lora_weights``), the ownership files ``.rewardtune_run.json`` and ``.lock``
(:mod:`rewardtune.utils.runfolder`), and with ``log_with=tensorboard`` the event files of ``rewardtune/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from rewardtune.config import schema_defaults
from rewardtune.errors import UserError
from rewardtune.finetune.checkpoint import resume_candidates
from rewardtune.finetune.config import RunConfig
from rewardtune.finetune.tracking import tracker_name
from rewardtune.finetune.trainer import LORA_TARGETS

logger = logging.getLogger(__name__)


#: Settings that may differ when a run is resumed: where and how it runs, not what it computes.
RESUMABLE_FREELY = ("output_dir", "resume", "resume_allow_changes", "keep_last", "device", "log_with")

#: ``log_with`` value -> (importable modules, any of which will do; the install command named when none is).
TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
                    "wandb": (("wandb",), "pip install wandb")}


@dataclass
class RunPlan:
    """What :func:`validate_run` resolved: prompt lists and the settings that define the run."""

    prompts: list[str]
    heldout: list[str]
    settings: dict


def _prompt_list(inline: list[str] | None, path: str | None, key: str, cfg: RunConfig, split: str) -> list[str]:
    from rewardtune.prompts import read_prompts

    if path:
        prompts = read_prompts(path, cfg.prompts_column, split, unique=cfg.unique_prompts)
    else:
        prompts = [p.strip() for p in inline or []]
    if not prompts or not all(prompts):
        raise UserError(f"{key} is empty or holds an empty prompt; give at least one prompt")
    return prompts


def _check_model(model: str) -> None:
    from rewardtune.diffusion.loading import resolve_model

    source = Path(resolve_model(model))
    if (source.is_absolute() or source.exists()) and not (source / "model_index.json").is_file():
        raise UserError(f"model {model!r}: {str(source)!r} is not a diffusers pipeline folder (no model_index.json)")


def run_settings(cfg: RunConfig) -> dict:
    """The settings that define the run (everything but :data:`RESUMABLE_FREELY`), checked on resume."""
    from rewardtune.config import to_dict

    return {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_FREELY}


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_tracker(cfg: RunConfig) -> None:
    """Fail with one line naming the install command when ``log_with``'s package is missing (accelerate would
    silently drop the tracker)."""
    name = tracker_name(cfg)
    if name is None:
        return
    modules, install = TRACKER_PACKAGES[name]
    if not any(module_available(m) for m in modules):
        raise UserError(f"log_with={name} needs the {modules[0]} package, which is not installed: run "
                        f"`{install}` or set log_with=null")


def _check_allowed_changes(cfg: RunConfig, settings: dict) -> None:
    from rewardtune.utils.runfolder import flatten

    keys = flatten(settings)
    for key in cfg.resume_allow_changes:
        if not any(k == key or k.startswith(key + ".") for k in keys):
            raise UserError(f"resume_allow_changes names {key!r}, which is not a config key; use dotted keys such "
                            "as epochs, save_every or train.optim.lr")


def validate_run(cfg: RunConfig, num_processes: int = 1) -> RunPlan:
    """Every check that needs files or registries, done before any model is loaded or anything is written."""
    from rewardtune.rewards import check_reward_spec
    from rewardtune.utils.devices import resolve_device

    train = cfg.train
    check_tracker(cfg)
    resolve_device(cfg.device)
    check_reward_spec(train.reward, "train.reward")
    if cfg.gold_reward is not None:
        check_reward_spec(cfg.gold_reward, "gold_reward")
    _check_model(cfg.model)
    prompts = _prompt_list(cfg.prompts, cfg.prompts_file, "prompts", cfg, cfg.prompts_split)
    has_heldout = cfg.heldout_prompts or cfg.heldout_prompts_file
    heldout = _prompt_list(cfg.heldout_prompts, cfg.heldout_prompts_file, "heldout_prompts", cfg,
                           cfg.heldout_split) if has_heldout else []
    groups = train.groups_per_update
    if train.prompts_per_epoch % num_processes or (groups and groups % num_processes):
        raise UserError(f"train.prompts_per_epoch={train.prompts_per_epoch} (and groups_per_update) must divide "
                        f"evenly over {num_processes} processes: prompt groups are never split")
    if cfg.resume not in (None, "auto"):
        resume_candidates(cfg.resume, cfg.output_dir)  # an explicit checkpoint folder must exist
    settings = run_settings(cfg)
    _check_allowed_changes(cfg, settings)
    return RunPlan(prompts, spread(heldout, cfg.heldout_count), settings)


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spaced over ``items`` (all of them when there are fewer), in order.

    A list's first ``count`` can all be one kind (``shapes_heldout`` is sorted: its first 16 all ask for big
    objects), so the held-out evaluation takes indices ``floor(i * len / count)``, ``i = 0 .. count-1``.
    """
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def run_finetune(cfg: RunConfig) -> dict:
    """Run (or resume) the finetuning job of ``cfg``; returns the summary of :func:`summarise_run`.

    The main process owns ``output_dir`` for the whole run (:func:`rewardtune.utils.runfolder.claim_run_folder`:
    refuses a foreign folder, a folder in use, and a resume with other settings)."""
    from accelerate import Accelerator

    from rewardtune.finetune.trainer import Trainer
    from rewardtune.utils.runfolder import claim_run_folder

    check_tracker(cfg)  # before the accelerator, which would drop a tracker whose package is missing
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
                              log_with=tracker_name(cfg), project_dir=cfg.output_dir)
    plan = validate_run(cfg, accelerator.num_processes)
    owner = contextlib.nullcontext()
    if accelerator.is_main_process:
        owner = claim_run_folder(cfg.output_dir, "finetune", plan.settings, resume=cfg.resume is not None,
                                 defaults=schema_defaults(RunConfig),
                                 allow_changes=cfg.resume_allow_changes)
    with owner:
        accelerator.wait_for_everyone()
        return Trainer.build(cfg, plan, accelerator).fit()


__all__ = ["LORA_TARGETS", "RunConfig", "RunPlan", "run_finetune", "run_settings", "validate_run"]
