"""What a sampler needs to know, without importing torch: :class:`SamplerSettings` (the ``sampling`` part of every
config that samples) and the registry of scheduler families.

A scheduler family is a :class:`SchedulerFamily` entry of ``"module:function"`` strings: its step with a
log-probability, ``step(scheduler, model_output, t, sample, eta, prev_sample=None, generator=None) -> (prev_sample,
log_prob [B])``, used both to sample (:func:`rewardtune.diffusion.sampling.sample_trajectories`) and to re-score
stored transitions (:mod:`rewardtune.diffusion.rescore`); and its prediction of the clean latent,
``x0(scheduler, model_output, t, sample) -> x0 [B,C,h,w]`` (the sampler's ``keep_x0``). Adding a family (e.g. flow
matching's SDE step) is one registry line.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from rewardtune.config import require
from rewardtune.registry import Registry


@dataclass(frozen=True)
class SchedulerFamily:
    """A scheduler family's functions, as ``"module:function"`` strings imported on first use: ``step`` (one
    denoising step with its log-probability) and ``x0`` (the clean latent predicted from the model output)."""

    step: str
    x0: str


SCHEDULER_FAMILIES: Registry[SchedulerFamily] = Registry("scheduler family")
SCHEDULER_FAMILIES.register("ddim", SchedulerFamily(step="rewardtune.diffusion.logprob:ddim_step_with_logprob",
                                                    x0="rewardtune.diffusion.logprob:ddim_predicted_x0"))
SCHEDULER_FAMILIES.register("flow", SchedulerFamily(step="rewardtune.diffusion.flow:flow_family_step",
                                                    x0="rewardtune.diffusion.flow:flow_predicted_x0"))
AUTO_FAMILY = "auto"  # the pipeline's own family (rewardtune.diffusion.backbones)


def _resolve(spec: str) -> Callable:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


@functools.cache
def family_step(name: str) -> Callable:
    """The step-with-log-probability function of scheduler family ``name`` (imported on first use)."""
    return _resolve(SCHEDULER_FAMILIES.get(name).step)


@functools.cache
def family_x0(name: str) -> Callable:
    """The clean-latent prediction ``x0(scheduler, model_output, t, sample) -> [B,C,h,w]`` of scheduler family
    ``name`` (DDIM: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``; flow: ``x_t - sigma_t v``)."""
    return _resolve(SCHEDULER_FAMILIES.get(name).x0)


def stochastic_steps(sde_window: list[int] | None, steps: int) -> range:
    """The step indices (0-based, in sampling order) of ``steps`` that run the stochastic step: ``sde_window``'s
    ``[a, b)``, or all of them without one."""
    return range(*sde_window) if sde_window else range(steps)


@dataclass
class SamplerSettings:
    """How to sample. ``eta``: 0 is deterministic DDIM, 1 DDPM-like (every step then has a log-probability);
    ``guidance``: classifier-free guidance scale (1 disables it); ``negative_prompt``: the unconditional prompt;
    ``batch_size``: samples per denoising call; ``height``/``width``: None for the UNet's native size;
    ``scheduler``: the scheduler family (an entry of :data:`SCHEDULER_FAMILIES`: ``ddim``, or ``flow`` whose SDE
    step takes ``eta`` as its noise level), or ``auto`` for the pipeline's own (DDIM for SD, flow for SD3);
    ``sde_window``: ``[a, b]`` runs the stochastic step (``eta``) only on steps ``a <= i < b`` (0-based, in sampling
    order) and the deterministic one elsewhere, so only those steps have log-probabilities and are trained (the
    "Fast" variants of Flow-GRPO / MixGRPO); None: every step. ``same_latent``: the samples of a prompt start from
    one ``x_T`` (that of the prompt's first seed) and differ only in the stochastic steps' noise (Flow-GRPO's
    ``same_latent``)."""

    steps: int = 20
    guidance: float = 5.0
    eta: float = 0.0
    negative_prompt: str = ""
    batch_size: int = 16
    height: int | None = None
    width: int | None = None
    scheduler: str = AUTO_FAMILY
    sde_window: list[int] | None = None
    same_latent: bool = False

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "a positive number of denoising steps", self.steps)
        require(math.isfinite(self.guidance) and self.guidance >= 0, "guidance",
                "a finite number >= 0 (1 disables classifier-free guidance)", self.guidance)
        require(0 <= self.eta <= 1, "eta", "in [0, 1]", self.eta)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, "a positive number of pixels", value)
        window = self.sde_window
        require(window is None or (len(window) == 2 and 0 <= window[0] < window[1] <= self.steps), "sde_window",
                f"null or [a, b] with 0 <= a < b <= steps ({self.steps})", window)
        require(self.scheduler == AUTO_FAMILY or self.scheduler in SCHEDULER_FAMILIES, "scheduler",
                "one of " + ", ".join([AUTO_FAMILY, *SCHEDULER_FAMILIES.names()]), self.scheduler)
