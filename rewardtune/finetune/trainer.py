"""The trainer recipe of an online finetuning run (PRDP Algorithm 1; DDPO and any registered algorithm in the same
harness): :class:`Trainer` owns setup, epochs, updates, evaluation, checkpoints and resume; losses stay pure
functions in :mod:`rewardtune.finetune.losses` behind :mod:`rewardtune.finetune.algorithms`.

Each epoch ``e`` (0-based):

1. draw N prompts and N*B sample seeds from a generator seeded by ``(train.seed, e)`` (so a resumed run draws the
   same ones as an uninterrupted run);
2. sample B trajectories per prompt from the current model, which *is* the snapshot theta_old, recording per-step
   log-probs under it and under the reference (the base UNet: a frozen copy for full finetuning, the same UNet
   with its adapters off for LoRA; no second pass at epoch 0), and score the images with ``train.reward``;
3. score the same images with ``gold_reward`` (logged only, never trained on);
4. with ``train.dense``, per-step advantages ``[N*B,T]`` (:mod:`rewardtune.finetune.dense`: x0 step rewards,
   PRIME's implicit PRM updated on the outcome rewards, or PAV progress by Monte Carlo);
5. K passes of gradient steps (:func:`rewardtune.finetune.update.update_epoch`) with accelerate's backward and
   gradient clipping;
6. append one line to ``metrics.jsonl`` (with a dense kind also ``reward_queries``: the training reward's queries
   so far, outcome, x0 and Monte Carlo ones; outcome-only runs query N*B per epoch), redraw ``reward_curve.png``;
   every ``save_every`` epochs write a checkpoint (:mod:`rewardtune.finetune.checkpoint`) and an image grid of the
   fixed evaluation prompts and seeds.

With ``log_with`` the epoch records (numeric scalars, ``reward_components/NAME``), the evaluation scores
(``eval/KEY``) and grids (``eval/grid``) also go to accelerate's tracker, at step = completed epochs.

With several processes each process takes a contiguous block of N / P whole prompt groups; the UNet is wrapped by
``accelerator.prepare`` (DDP averages the gradients) and only the main process writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rewardtune.config import save_config
from rewardtune.diffusion.backbones import UNetBackbone, backbone_of
from rewardtune.errors import UserError
from rewardtune.finetune.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    resume_candidates,
    save_checkpoint,
    save_final_model,
    save_sharded_checkpoint,
)
from rewardtune.finetune.config import FinetuneConfig, RunConfig
from rewardtune.finetune.report import (
    EvalSet,
    Scorers,
    epoch_metrics,
    evaluate,
    read_metrics,
    score_heldout,
    summarise_run,
)
from rewardtune.finetune.tracking import MetricsLog, Trackers
from rewardtune.utils import fsdp

if TYPE_CHECKING:
    from rewardtune.finetune.algorithms import Algorithm
    from rewardtune.finetune.dense import DenseAdvantages
    from rewardtune.finetune.rollout import Reference, Rollouts
    from rewardtune.finetune.run import RunPlan

logger = logging.getLogger(__name__)

LORA_TARGETS = UNetBackbone.lora_targets  # SD's; each backbone names its own (backbone_of(pipe).lora_targets)
HELDOUT_KEYS = ("heldout_reward", "heldout_gold")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Wraps a reward and adds up the seconds spent in its calls (to split sampling from scoring time) and the
    images it scored (``queries``: one reward query per image)."""

    def __init__(self, reward) -> None:
        self.reward, self.seconds, self.queries = reward, 0.0, 0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        start = time.perf_counter()
        self.queries += len(images)
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


@dataclass
class Trainer:
    """The live objects of one run and its steps. ``unet`` is the trained denoiser (SD's UNet or SD3's transformer)
    as prepared by accelerate (maybe DDP-wrapped; :meth:`bare` is the pipeline's own); ``reference`` the model of
    PRDP's log-ratios (see :mod:`rewardtune.finetune.rollout`); ``dense`` the per-step advantages of ``train.dense``
    (None: outcome only); ``reward_queries`` the training reward's queries so far (outcome, dense ``x0`` and Monte
    Carlo ones; evaluation, held-out and gold scoring are measurements and not counted); ``sharded``: the denoiser
    is FSDP-sharded over the processes (:mod:`rewardtune.utils.fsdp`), so every process takes part in each of its
    forward passes (grids and held-out scores included; only the main process writes) and checkpoints."""

    cfg: RunConfig
    plan: RunPlan
    accelerator: object
    pipe: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    algorithm: Algorithm
    reference: Reference
    scorers: Scorers
    out: Path
    evals: EvalSet
    trackers: Trackers
    dense: DenseAdvantages | None = None
    reward_queries: int = 0
    sharded: bool = False

    @classmethod
    def build(cls, cfg: RunConfig, plan: RunPlan, accelerator) -> Trainer:
        """Pipeline (VAE and text encoders frozen), trainable denoiser or LoRA adapters, reference, optimizer,
        rewards."""
        from rewardtune.diffusion.loading import load_pipeline
        from rewardtune.finetune.algorithms import make_algorithm
        from rewardtune.rewards import load_reward

        seed_everything(cfg.train.seed)
        device = str(accelerator.device)
        pipe = load_pipeline(cfg.model, device=device)
        backbone = backbone_of(pipe)
        for part in backbone.frozen_parts(pipe):
            part.requires_grad_(False)
        reference = _add_trainable(pipe, cfg)
        algorithm = make_algorithm(cfg.train)
        dense = _make_dense(cfg, algorithm, backbone.denoiser(pipe), accelerator.num_processes)
        sharded = fsdp.fsdp_requested(accelerator, cfg.fsdp)
        unet, optimizer = _prepare_denoiser(backbone.denoiser(pipe), backbone, cfg, accelerator, sharded)
        reward = load_reward(cfg.train.reward, device=device).to(device).eval()
        gold = load_reward(cfg.gold_reward, device=device).to(device).eval() if cfg.gold_reward else None
        out = Path(cfg.output_dir)
        return cls(cfg, plan, accelerator, pipe, unet, optimizer, algorithm, reference,
                   Scorers(reward, gold), out, EvalSet(cfg.eval_prompts, cfg.eval_seeds),
                   Trackers(cfg, accelerator, out), dense, sharded=sharded)

    @property
    def bare(self) -> torch.nn.Module:
        """The pipeline's own (unwrapped) denoiser."""
        return backbone_of(self.pipe).denoiser(self.pipe)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def resume(self) -> int:
        """Restore the latest readable checkpoint (``cfg.resume``); returns the epochs already done."""
        from rewardtune.finetune.update import apply_optim_config

        candidates = resume_candidates(self.cfg.resume, self.out)
        start, extra = 0, {}
        if candidates and self.sharded:
            start, extra = load_sharded_checkpoint(candidates, self.unet, self.optimizer, self.algorithm)
        elif candidates:
            start, extra = load_checkpoint(candidates, self.bare, self.optimizer, self.algorithm)
        self.reward_queries = int(extra.get("reward_queries", 0))
        if self.dense is not None and "dense" in extra:
            self.dense.load_state_dict(extra["dense"])
        apply_optim_config(self.optimizer, self.cfg.train.optim)  # the restored state holds the old settings
        return start

    def epoch(self, epoch: int) -> dict:
        """One online epoch (steps 1-5 of the module docstring); returns the gathered metrics record (dense metrics
        and reward queries: this process's, times the process count for the queries)."""
        from rewardtune.finetune.rollout import collect_rollouts, epoch_reference

        acc, train = self.accelerator, self.cfg.train
        generator = epoch_generator(train.seed, epoch)
        prompts, seeds = draw_epoch(self.plan.prompts, train, generator)
        local = local_config(train, acc.num_processes)
        n, b = local.prompts_per_epoch, train.images_per_prompt
        prompts = prompts[acc.process_index * n:(acc.process_index + 1) * n]
        seeds = seeds[acc.process_index * n * b:(acc.process_index + 1) * n * b]
        reward, start = TimedReward(self.scorers.reward), time.perf_counter()
        dense = self.dense
        uses_reference = self.algorithm.uses_reference or (dense is not None and dense.needs_reference)
        rollouts = collect_rollouts(self.pipe, prompts, b, train.sampling, reward, seeds,
                                    reference=epoch_reference(epoch, self.reference, uses_reference),
                                    keep_x0=dense is not None and dense.needs_x0)
        gold = TimedReward(self.scorers.gold) if self.scorers.gold is not None else None
        gold_scores = gold(rollouts.images.to(gold.device), rollouts.prompts) if gold else None
        gold_components = dict(gold.components) if gold else {}  # before held-out scoring overwrites them
        sampled = time.perf_counter()
        reward_seconds = reward.seconds + (gold.seconds if gold else 0.0)
        targets, dense_metrics = self.dense_targets(rollouts, reward)
        densed = time.perf_counter()
        update = self.update(rollouts, local, generator, epoch, targets)
        updated = time.perf_counter()
        seconds = {"sampling": sampled - start - reward_seconds, "reward": reward_seconds,
                   **({"dense": densed - sampled} if dense is not None else {}), "update": updated - densed}
        heldout = {}
        if self.plan.heldout and (self.main or self.sharded):
            heldout = score_heldout(self.pipe, self.scorers, self.plan.heldout, train.sampling)
        record = epoch_metrics(epoch + 1, acc, rollouts, gold_scores, gold_components, update, heldout, seconds)
        if dense is not None:  # outcome only: today's record, key for key (its queries are N*B per epoch)
            self.reward_queries += reward.queries * acc.num_processes  # every process scores an equal share
            record.update(reward_queries=self.reward_queries,
                          reward_queries_epoch=reward.queries * acc.num_processes, **dense_metrics)
        return record

    def dense_targets(self, rollouts: Rollouts, reward: TimedReward) -> tuple[torch.Tensor | None, dict]:
        """Per-step advantages ``[S,T]`` of ``train.dense`` (and their metrics); (None, {}) without a dense kind,
        when the algorithm computes its own targets in the update."""
        from rewardtune.finetune.dense import DenseContext

        if self.dense is None:
            return None, {}
        outcome = self.algorithm.targets(rollouts)
        return self.dense(rollouts, outcome, DenseContext(self.pipe, reward, self.cfg.train, self.reference))

    def update(self, rollouts: Rollouts, local: FinetuneConfig, generator: torch.Generator, epoch: int,
               targets: torch.Tensor | None = None) -> dict:
        """K passes of gradient steps; a divergence stops the run with one line naming the last good checkpoint."""
        from rewardtune.finetune.update import DivergedError, update_epoch

        acc = self.accelerator
        try:
            return update_epoch(self.unet, self.optimizer, rollouts, local, self.algorithm,
                                scheduler=self.pipe.scheduler, generator=generator, backward=acc.backward,
                                clip_grad_norm=clip_sharded_grad_norm if self.sharded else acc.clip_grad_norm_,
                                targets=targets)
        except DivergedError as exc:
            kept = list_checkpoints(self.out)
            last = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
            raise DivergedError(f"training diverged in epoch {epoch + 1}: {exc}; nothing was saved after it and "
                                f"{last}; lower train.optim.lr (resume with resume=auto "
                                "resume_allow_changes=[train.optim.lr])") from None

    def evaluate(self, epoch: int, heldout_scores: dict[str, float] | None = None) -> dict:
        """The fixed evaluation grid and scores of the current model (see :func:`report.evaluate`), also sent to
        the tracker."""
        record = evaluate(self.pipe, self.scorers, self.evals, self.plan.heldout, self.cfg.train.sampling,
                          self.out, epoch, heldout_scores, write=self.main)
        if not self.main:  # a sharded model's other processes only took part in its forward passes
            return record
        self.trackers.log(record, epoch, prefix="eval/")
        self.trackers.grid(self.out / "grids" / f"epoch_{epoch:04d}.png", epoch)
        return record

    def evaluate_if_missing(self, epoch: int) -> None:
        """Evaluate the model of ``epoch`` unless ``eval.jsonl`` has it: epoch 0 of a new run, or the resumed
        checkpoint's evaluation when a kill came between saving the checkpoint and evaluating it."""
        if any(r.get("epoch") == epoch for r in read_metrics(self.out / "eval.jsonl")):
            return
        record = next((r for r in read_metrics(self.out / "metrics.jsonl") if r.get("epoch") == epoch), {})
        self.evaluate(epoch, {k: record[k] for k in HELDOUT_KEYS if record.get(k) is not None} or None)

    def checkpoint(self, done: int, record: dict) -> None:
        """Checkpoint ``done`` epochs, then evaluate that model (held-out scores reused from the epoch's record)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        extra = {} if self.dense is None else {"reward_queries": self.reward_queries, "dense": self.dense.state_dict()}
        if self.sharded:
            save_sharded_checkpoint(self.out, done, self.unet, self.optimizer, self.algorithm, self.cfg.keep_last,
                                    acc.wait_for_everyone, self.main, extra)
        elif self.main:
            save_checkpoint(self.out, done, self.bare, self.optimizer, self.algorithm, self.cfg.keep_last, extra)
        if self.main or self.sharded:
            self.evaluate(done, {k: record[k] for k in HELDOUT_KEYS if k in record})

    def finish(self, record: dict, start: int, began: float) -> dict:
        """Save ``final/`` and ``summary.json`` (main process) after checking that the replicas agree."""
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / "final"
        in_sync = True if self.sharded else ranks_in_sync(acc, acc.unwrap_model(self.unet))
        model = gather_sharded(self.unet) if self.sharded else acc.unwrap_model(self.unet)
        summary = {}
        if self.main:
            backbone_of(self.pipe).set_denoiser(self.pipe, model)
            save_final_model(self.pipe, self.bare, final, lora=bool(self.cfg.lora_rank),
                             base_model=base_model_name(self.cfg.model))
            summary = summarise_run(record, self.out, final, start, self.cfg.epochs, time.perf_counter() - began)
        return {**summary, "processes": acc.num_processes, "ranks_in_sync": in_sync}

    def fit(self) -> dict:
        """Resume, then epochs with checkpoints and evaluations, then the final model; returns the summary."""
        start, began = self.resume(), time.perf_counter()
        self.trackers.start(start)
        try:
            if self.main:
                save_config(self.cfg, self.out / "config.yaml")
            if self.main or self.sharded:
                self.evaluate_if_missing(start)
            log = MetricsLog(self.out, self.main, range(start, self.cfg.epochs), self.cfg.train.algorithm,
                             self.trackers)
            record = log.last(start)  # a finished run's last epoch, when there is nothing left to run
            for epoch in log:
                record = self.epoch(epoch)
                log.append(record)
                done = epoch + 1
                if done % self.cfg.save_every == 0 or done == self.cfg.epochs:
                    self.checkpoint(done, record)
            summary = self.finish(record, start, began)
        except BaseException:
            self.trackers.stop(failed=True)
            raise
        self.trackers.stop()
        return summary


def _make_dense(cfg: RunConfig, algorithm: Algorithm, model: torch.nn.Module, processes: int
                ) -> DenseAdvantages | None:
    """The run's dense advantages (:func:`rewardtune.finetune.dense.make_dense`), built from the denoiser before
    any update (PRIME's implicit PRM starts as a copy of it)."""
    from rewardtune.finetune.dense import make_dense

    if cfg.train.dense.kind == "implicit" and processes > 1:
        raise UserError("train.dense.kind=implicit (PRIME) runs in one process: its implicit PRM is not "
                        "synchronised across processes; launch without accelerate or pick another dense kind")
    return make_dense(cfg.train, algorithm, model)


def _prepare_denoiser(model: torch.nn.Module, backbone, cfg: RunConfig, accelerator, sharded: bool
                      ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The trained denoiser and its optimizer: FSDP-sharded block by block (the optimizer then holds the shards),
    or prepared by accelerate (DDP-wrapped over several processes)."""
    from rewardtune.finetune.update import make_optimizer

    if sharded:
        if cfg.lora_rank:
            raise UserError("the launch asks for FSDP (accelerate's FSDP config) but lora_rank is set: FSDP shards "
                            "full finetuning; set lora_rank=null or launch without the FSDP config")
        fsdp.shard(model, backbone.shard_units(model))
        return model, make_optimizer(model.parameters(), cfg.train.optim)
    return accelerator.prepare(model, make_optimizer(model.parameters(), cfg.train.optim))


def clip_sharded_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded parameters: the norm of the full gradient (its shards' norms combined)."""
    return fsdp.full_grad_norm(torch.nn.utils.clip_grad_norm_(list(parameters), max_norm))


def gather_sharded(model: torch.nn.Module) -> torch.nn.Module | None:
    """An unsharded copy of the FSDP-sharded ``model`` on the main process (None elsewhere); every process calls
    this (the full weights are gathered once)."""
    state = fsdp.full_state_dict(model)
    if not state:
        return None
    plain = type(model).from_config(model.config)
    plain.load_state_dict(state)
    return plain.to(next(iter(state.values())).dtype)


def _add_trainable(pipe, cfg: RunConfig) -> Reference:
    """Make the denoiser (or LoRA adapters on it) trainable; returns the reference of PRDP's log-ratios."""
    from rewardtune.finetune.rollout import ADAPTERS_DISABLED

    backbone = backbone_of(pipe)
    model = backbone.denoiser(pipe)
    if cfg.lora_rank:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                     init_lora_weights="gaussian", target_modules=backbone.lora_targets))
        reference = ADAPTERS_DISABLED
    else:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return reference


def base_model_name(model: str) -> str:
    """What a LoRA final folder names as its base: a registered name or hub id as given, a local folder as an
    absolute path (so the note works from any working directory)."""
    from rewardtune.models_table import PIPELINES

    path = Path(model).expanduser()
    return str(path.resolve()) if model not in PIPELINES and path.exists() else model


def ranks_in_sync(accelerator, model: torch.nn.Module) -> bool:
    """True when every process holds the same trainable weights (per-tensor float64 sums gathered and compared):
    a cheap end-of-run check that gradient synchronisation kept the replicas identical."""
    params = [p for p in model.parameters() if p.requires_grad]
    fingerprint = torch.stack([p.detach().double().sum() for p in params]).to(accelerator.device)
    gathered = accelerator.gather(fingerprint[None]).reshape(accelerator.num_processes, -1)
    return bool((gathered == gathered[0]).all())
