"""``rewardtune finetune``: the online finetuning run (PRDP Algorithm 1; DDPO in the same harness).

Each epoch ``e`` (0-based):

1. draw N prompts and N*B sample seeds from a generator seeded by ``(train.seed, e)`` (so a resumed run draws the
   same ones as an uninterrupted run);
2. sample B trajectories per prompt from the current model, which *is* the snapshot theta_old, recording per-step
   log-probs under it and under the reference (the base UNet: a frozen copy for full finetuning, the same UNet
   with its adapters off for LoRA; no second pass at epoch 0), and score the images with ``train.reward``;
3. score the same images with ``gold_reward`` (logged only, never trained on);
4. K passes of gradient steps (:func:`rewardtune.finetune.update.update_epoch`) with accelerate's backward and
   gradient clipping;
5. append one line to ``metrics.jsonl``, redraw ``reward_curve.png``; every ``save_every`` epochs write a
   checkpoint (:mod:`rewardtune.finetune.checkpoint`) and an image grid of the fixed evaluation prompts and seeds.

With several processes (``accelerate launch -m rewardtune finetune CONFIG``) each process takes a contiguous
block of N / P whole prompt groups; the UNet is wrapped by ``accelerator.prepare`` (DDP averages the gradients)
and only the main process writes files.

Run directory: ``config.yaml``, ``metrics.jsonl``, ``reward_curve.png``, ``grids/epoch_NNNN.png``,
``checkpoints/epoch_N/``, ``final/`` (a pipeline folder, or LoRA weights for ``pipe.load_lora_weights``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rewardtune.config import save_config
from rewardtune.errors import UserError
from rewardtune.finetune.checkpoint import load_checkpoint, resume_candidates, save_checkpoint, save_final_model
from rewardtune.finetune.config import FinetuneConfig, RunConfig
from rewardtune.finetune.report import (EvalSet, append_metrics, before_after, epoch_metrics, evaluate,
                                        plot_reward_curve, read_metrics, score_heldout)

logger = logging.getLogger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


#: Settings that may differ when a run is resumed: where and how it runs, not what it computes.
RESUMABLE_FREELY = ("output_dir", "resume", "resume_allow_changes", "keep_last", "device")


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
    return RunPlan(prompts, heldout[:cfg.heldout_count], settings)


@dataclass
class Session:
    """The live objects of a run (built once by :func:`build_session`)."""

    pipe: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    algorithm: object
    reference: object
    reward: object
    gold: object | None
    accelerator: object


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_session(cfg: RunConfig, accelerator) -> Session:
    """Pipeline (VAE and text encoder frozen), trainable UNet or LoRA adapters, reference, optimizer, rewards."""
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.finetune.algorithms import make_algorithm
    from rewardtune.finetune.rollout import ADAPTERS_DISABLED
    from rewardtune.finetune.update import make_optimizer
    from rewardtune.rewards import load_reward

    device = str(accelerator.device)
    pipe = load_pipeline(cfg.model, device=device)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if cfg.lora_rank:
        from peft import LoraConfig

        pipe.unet.requires_grad_(False)
        pipe.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                         init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        reference = ADAPTERS_DISABLED
    else:
        reference = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(pipe.unet.parameters(), cfg.train.optim)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    reward = load_reward(cfg.train.reward, device=device).to(device).eval()
    gold = load_reward(cfg.gold_reward, device=device).to(device).eval() if cfg.gold_reward else None
    return Session(pipe, unet, optimizer, make_algorithm(cfg.train), reference, reward, gold, accelerator)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator of epoch ``epoch``'s prompt, seed and minibatch draws; independent of the run's history."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def draw_epoch(prompts: list[str], cfg: FinetuneConfig, generator: torch.Generator) -> tuple[list[str], list[int]]:
    """N prompts (without replacement when the set is large enough) and ``N*B`` sample seeds (group-major)."""
    n = cfg.prompts_per_epoch
    if n <= len(prompts):
        index = torch.randperm(len(prompts), generator=generator)[:n]
    else:
        index = torch.randint(len(prompts), (n,), generator=generator)
    seeds = torch.randint(0, 2**31 - 1, (n * cfg.images_per_prompt,), generator=generator)
    return [prompts[i] for i in index.tolist()], seeds.tolist()


def local_config(cfg: FinetuneConfig, num_processes: int) -> FinetuneConfig:
    """This process's share: ``N / P`` prompt groups (and ``groups_per_update / P``)."""
    if num_processes == 1:
        return cfg
    groups = cfg.groups_per_update and cfg.groups_per_update // num_processes
    return dataclasses.replace(cfg, prompts_per_epoch=cfg.prompts_per_epoch // num_processes,
                               groups_per_update=groups)


class TimedReward:
    """Wraps a reward and adds up the seconds spent in its calls (to split sampling from scoring time)."""

    def __init__(self, reward) -> None:
        self.reward, self.seconds = reward, 0.0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.reward(images, prompts)
        finally:
            self.seconds += time.perf_counter() - start

    @property
    def components(self) -> dict[str, torch.Tensor]:
        return getattr(self.reward, "components", {})

    @property
    def device(self):
        return getattr(self.reward, "device", torch.device("cpu"))


def run_epoch(session: Session, cfg: RunConfig, plan: RunPlan, epoch: int) -> dict:
    """One online epoch (steps 1-4 of the module docstring); returns the gathered metrics record."""
    from rewardtune.finetune.rollout import collect_rollouts, epoch_reference
    from rewardtune.finetune.update import update_epoch

    acc, train = session.accelerator, cfg.train
    generator = epoch_generator(train.seed, epoch)
    prompts, seeds = draw_epoch(plan.prompts, train, generator)
    local = local_config(train, acc.num_processes)
    n, b = local.prompts_per_epoch, train.images_per_prompt
    prompts = prompts[acc.process_index * n:(acc.process_index + 1) * n]
    seeds = seeds[acc.process_index * n * b:(acc.process_index + 1) * n * b]
    reward, start = TimedReward(session.reward), time.perf_counter()
    rollouts = collect_rollouts(session.pipe, prompts, b, train.sampling, reward, seeds,
                                reference=epoch_reference(epoch, session.reference))
    gold = TimedReward(session.gold) if session.gold is not None else None
    gold_scores = gold(rollouts.images.to(gold.device), rollouts.prompts) if gold else None
    gold_components = dict(gold.components) if gold else {}  # before held-out scoring overwrites them
    sampled = time.perf_counter()
    update = update_epoch(session.unet, session.optimizer, rollouts, local, session.algorithm,
                          scheduler=session.pipe.scheduler, generator=generator, backward=acc.backward,
                          clip_grad_norm=acc.clip_grad_norm_)
    updated = time.perf_counter()
    reward_seconds = reward.seconds + (gold.seconds if gold else 0.0)
    seconds = {"sampling": sampled - start - reward_seconds, "reward": reward_seconds, "update": updated - sampled}
    heldout = score_heldout(session, plan.heldout, train.sampling) if plan.heldout and acc.is_main_process else {}
    return epoch_metrics(epoch + 1, acc, rollouts, gold_scores, gold_components, update, heldout, seconds)


def run_finetune(cfg: RunConfig) -> dict:
    """Run (or resume) the finetuning job of ``cfg``; returns the summary of :func:`summarise_run`.

    The main process owns ``output_dir`` for the whole run (:func:`rewardtune.utils.runfolder.claim_run_folder`:
    refuses a foreign folder, a folder in use, and a resume with other settings)."""
    from accelerate import Accelerator

    from rewardtune.utils.runfolder import claim_run_folder

    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    plan = validate_run(cfg, accelerator.num_processes)
    owner = contextlib.nullcontext()
    if accelerator.is_main_process:
        owner = claim_run_folder(cfg.output_dir, "finetune", plan.settings, resume=cfg.resume is not None,
                                 allow_changes=cfg.resume_allow_changes)
    with owner:
        accelerator.wait_for_everyone()
        return _train(cfg, plan, accelerator)


def _train(cfg: RunConfig, plan: RunPlan, accelerator) -> dict:
    """Build the session, resume, then epochs, checkpoints and evaluations; the final model and summary."""
    from rewardtune.finetune.update import apply_optim_config

    seed_everything(cfg.train.seed)
    session = build_session(cfg, accelerator)
    out, main = Path(cfg.output_dir), accelerator.is_main_process
    candidates = resume_candidates(cfg.resume, out)
    start = load_checkpoint(candidates, session.pipe.unet, session.optimizer, session.algorithm) if candidates else 0
    apply_optim_config(session.optimizer, cfg.train.optim)  # the restored state holds the run's old settings
    evals, began = EvalSet(cfg.eval_prompts, cfg.eval_seeds), time.perf_counter()
    if main:
        save_config(cfg, out / "config.yaml")
        evaluate_if_missing(session, evals, plan, cfg.train.sampling, out, start)
    records = read_metrics(out / "metrics.jsonl") if main else []
    record: dict = next((r for r in records if r.get("epoch") == start), {})  # a finished run's last epoch
    bar = epoch_bar(range(start, cfg.epochs), main, cfg.train.algorithm)
    for epoch in bar:
        record = _guarded_epoch(session, cfg, plan, epoch)
        done = epoch + 1
        if main:
            append_metrics(out / "metrics.jsonl", record)
            plot_reward_curve(out)
            show_rewards(bar, record)
        if done % cfg.save_every == 0 or done == cfg.epochs:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, done, session.pipe.unet, session.optimizer, session.algorithm, cfg.keep_last)
                scored = {k: record[k] for k in ("heldout_reward", "heldout_gold") if k in record}
                evaluate(session, evals, plan.heldout, cfg.train.sampling, out, done, scored)  # held-out not redrawn
    accelerator.wait_for_everyone()
    final = out / "final"
    in_sync = ranks_in_sync(accelerator, accelerator.unwrap_model(session.unet))
    summary = {}
    if main:
        session.pipe.unet = accelerator.unwrap_model(session.unet)
        save_final_model(session.pipe, session.pipe.unet, final, lora=bool(cfg.lora_rank),
                         base_model=base_model_name(cfg.model))
        summary = summarise_run(record, out, final, start, cfg.epochs, time.perf_counter() - began)
    return {**summary, "processes": accelerator.num_processes, "ranks_in_sync": in_sync}


def _guarded_epoch(session: Session, cfg: RunConfig, plan: RunPlan, epoch: int) -> dict:
    """:func:`run_epoch`; a divergence stops the run with one line naming the last good checkpoint."""
    from rewardtune.finetune.checkpoint import list_checkpoints
    from rewardtune.finetune.update import DivergedError

    try:
        return run_epoch(session, cfg, plan, epoch)
    except DivergedError as exc:
        kept = list_checkpoints(cfg.output_dir)
        last = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        raise DivergedError(f"training diverged in epoch {epoch + 1}: {exc}; nothing was saved after it and {last}; "
                            "lower train.optim.lr (resume with resume=auto resume_allow_changes=[train.optim.lr])"
                            ) from None


def evaluate_if_missing(session: Session, evals: EvalSet, plan: RunPlan, sampling, out: Path, epoch: int) -> None:
    """Evaluate the model of ``epoch`` unless ``eval.jsonl`` has it: epoch 0 of a new run, or the resumed
    checkpoint's evaluation when a kill came between saving the checkpoint and evaluating it."""
    if any(r.get("epoch") == epoch for r in read_metrics(out / "eval.jsonl")):
        return
    record = next((r for r in read_metrics(out / "metrics.jsonl") if r.get("epoch") == epoch), {})
    scored = {k: record[k] for k in ("heldout_reward", "heldout_gold") if record.get(k) is not None}
    evaluate(session, evals, plan.heldout, sampling, out, epoch, scored or None)


def base_model_name(model: str) -> str:
    """What a LoRA final folder names as its base: a registered name or hub id as given, a local folder as an
    absolute path (so the note works from any working directory)."""
    from rewardtune.diffusion.loading import MODELS

    path = Path(model).expanduser()
    return str(path.resolve()) if model not in MODELS and path.exists() else model


def epoch_bar(epochs: range, enabled: bool, algorithm: str):
    """A tqdm bar over the epochs (shown by the main process only)."""
    from tqdm.auto import tqdm

    return tqdm(epochs, desc=f"{algorithm} epochs", unit="epoch", disable=not enabled, initial=epochs.start,
                total=epochs.stop)


def show_rewards(bar, record: dict) -> None:
    """The last epoch's rewards as the bar's postfix."""
    keys = {"reward": "reward_mean", "gold": "gold_reward", "heldout": "heldout_reward"}
    bar.set_postfix({k: f"{record[v]:.3g}" for k, v in keys.items()
                     if isinstance(record.get(v), float) and math.isfinite(record[v])})


def ranks_in_sync(accelerator, model: torch.nn.Module) -> bool:
    """True when every process holds the same trainable weights (per-tensor float64 sums gathered and compared):
    a cheap end-of-run check that gradient synchronisation kept the replicas identical."""
    params = [p for p in model.parameters() if p.requires_grad]
    fingerprint = torch.stack([p.detach().double().sum() for p in params]).to(accelerator.device)
    gathered = accelerator.gather(fingerprint[None]).reshape(accelerator.num_processes, -1)
    return bool((gathered == gathered[0]).all())


def summarise_run(record: dict, out: Path, final: Path, start: int, epochs: int, seconds: float) -> dict:
    """The run's summary (also written to ``out/summary.json``): the last epoch's headline metrics, the fixed
    evaluation's before -> after scores (``eval_*`` on the grid prompts, ``heldout_*`` on unseen prompts), the
    wall time and where things are."""
    from rewardtune.utils.io import atomic_write_json

    keys = ("reward_mean", "gold_reward", "heldout_reward", "loss", "skipped")
    summary = {k: record[k] for k in keys if k in record and record[k] is not None}
    summary.update(before_after(out))
    summary.update(epochs_run=epochs - start, seconds=seconds, output_dir=str(out), final=str(final),
                   comparison=str(out / "before_after.png"))
    summary = _rounded(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value
