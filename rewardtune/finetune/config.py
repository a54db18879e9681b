"""Typed configs of online reward finetuning (PRDP Algorithm 1 and the DDPO baseline).

Defaults follow PRDP's small-scale preset (Table 4: N=32 prompts x B=16 images per epoch, K=10 gradient updates,
beta=3e-5, stepwise clip 1e-6, AdamW lr 1e-5 wd 1e-4, grad clip 1.0) and its sampler (50 DDPM steps = DDIM eta=1,
CFG 5.0). DDPO's defaults follow kvablack/ddpo-pytorch (clip 1e-4, advantages clipped to +-5, per-prompt stat
tracking with buffer 32 / min count 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rewardtune.config import require


@dataclass
class PRDPConfig:
    """``beta``: KL weight (the target is ``dr / beta``, Eq. 14); ``clip_range``: stepwise clip eps (Eqs. 20-21)."""

    beta: float = 3e-5
    clip_range: float = 1e-6

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", "> 0 (the KL weight divides the reward difference)", self.beta)
        require(self.clip_range > 0, "clip_range", "> 0 (PRDP is unstable without proximal clipping)",
                self.clip_range)


@dataclass
class DDPOConfig:
    """PPO-clip range on the importance ratio, advantage clipping, and DDPO's per-prompt reward normalisation."""

    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stats: bool = True
    stat_buffer: int = 32
    stat_min_count: int = 16

    def __post_init__(self) -> None:
        require(self.clip_range > 0, "clip_range", "> 0 (the PPO ratio band 1 +- clip_range)", self.clip_range)
        require(self.adv_clip_max > 0, "adv_clip_max", "> 0", self.adv_clip_max)
        require(self.stat_buffer >= 1, "stat_buffer", "at least 1", self.stat_buffer)
        require(1 <= self.stat_min_count <= self.stat_buffer, "stat_min_count",
                f"in [1, stat_buffer={self.stat_buffer}] (otherwise per-prompt stats are never used)",
                self.stat_min_count)


@dataclass
class SamplingConfig:
    """DDIM sampler of the rollouts. ``eta`` must be > 0: a deterministic step has no log-probability.

    ``batch_size``: samples per sampling call (and (sample, step) pairs per UNet call of the reference pass).
    """

    steps: int = 50
    guidance: float = 5.0
    eta: float = 1.0
    negative_prompt: str = ""
    batch_size: int = 16

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "a positive number of denoising steps", self.steps)
        require(self.guidance >= 0, "guidance", ">= 0 (1 disables classifier-free guidance)", self.guidance)
        require(0 < self.eta <= 1, "eta", "in (0, 1] (eta=0 is deterministic and has no log-probability)",
                self.eta)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        require(0 < self.lr <= 1, "lr", "in (0, 1] (AdamW; finetuning uses ~1e-5)", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                "two numbers in [0, 1)", self.betas)
        require(self.eps > 0, "eps", "> 0", self.eps)
        require(self.max_grad_norm > 0, "max_grad_norm", "> 0", self.max_grad_norm)


@dataclass
class FinetuneConfig:
    """One online epoch: sample ``images_per_prompt`` (B) trajectories for each of ``prompts_per_epoch`` (N)
    prompts from the snapshot, score them, then ``inner_steps`` (K) passes over the N prompt groups with
    ``groups_per_update`` groups per gradient step (None: all N, one step per pass as in PRDP's Algorithm 1).

    ``timestep_fraction``: share of the T steps trained on per sample (a random subset, DDPO's option; PRDP uses 1).
    ``forward_chunk``: (sample, step) pairs per UNet forward in the update; bigger minibatches use an exact
    two-pass gradient (see :mod:`rewardtune.finetune.update`).
    """

    algorithm: Literal["prdp", "ddpo"] = "prdp"
    reward: str = "shapes_preference"
    prompts_per_epoch: int = 32
    images_per_prompt: int = 16
    inner_steps: int = 10
    groups_per_update: int | None = None
    timestep_fraction: float = 1.0
    forward_chunk: int = 64
    seed: int = 0
    prdp: PRDPConfig = field(default_factory=PRDPConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        require(self.algorithm in ("prdp", "ddpo"), "algorithm", "one of 'prdp', 'ddpo'", self.algorithm)
        require(bool(self.reward.strip()), "reward", "a reward name or weighted sum (e.g. shapes_preference)",
                self.reward)
        require(self.prompts_per_epoch >= 1, "prompts_per_epoch", "at least 1", self.prompts_per_epoch)
        minimum = 2 if self.algorithm == "prdp" else 1
        require(self.images_per_prompt >= minimum, "images_per_prompt",
                "at least 2 for prdp (its loss compares images of the same prompt)" if minimum == 2
                else "at least 1", self.images_per_prompt)
        require(self.inner_steps >= 1, "inner_steps", "at least 1", self.inner_steps)
        groups = self.groups_per_update
        require(groups is None or (groups >= 1 and self.prompts_per_epoch % groups == 0), "groups_per_update",
                f"null or a divisor of prompts_per_epoch={self.prompts_per_epoch}", groups)
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]", self.timestep_fraction)
        require(self.forward_chunk >= 1, "forward_chunk", "at least 1", self.forward_chunk)
        require(self.seed >= 0, "seed", ">= 0", self.seed)
