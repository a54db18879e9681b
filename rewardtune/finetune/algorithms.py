"""Registry of online finetuning algorithms. PRDP, DDPO and GRPO share everything (rollouts, minibatching,
recomputation, gradient steps) except this entry: per-sample targets (rewards or advantages) and the loss on per-step
log-probs.

An entry is a class (or a lazy ``"module:Class"`` string) built as ``Entry(cfg, options)`` from a
:class:`~rewardtune.finetune.config.FinetuneConfig` and its typed options, declaring what it needs:

* ``Options``: the dataclass of ``train.algorithm_options`` (None for PRDP and DDPO, whose options are the
  ``train.prdp`` / ``train.ddpo`` sections; GRPO's are :class:`GRPOOptions`);
* ``min_images_per_prompt`` (and ``min_images_reason``): checked when the config is built;
* ``whole_groups``: True when the loss couples the B samples of a prompt (PRDP's pairs), so minibatches must hold
  whole prompt groups;
* ``uses_reference``: True when the loss reads ``log_probs_ref`` (PRDP's log-ratios, GRPO's KL term); otherwise the
  rollouts skip the reference model's pass over every step (``log_probs_ref`` is then ``log_probs_old``). The
  trainer reads it on the instance, so it may depend on the options (GRPO: ``kl_beta > 0``);
* ``per_step_advantages``: True when the loss also takes per-step targets ``[n,k]`` (advantages of each step, as
  built by :mod:`rewardtune.finetune.dense` from ``train.dense``); then ``adv_clip_max`` bounds the combined
  advantages;
* ``targets(rollouts) -> [N*B]``: computed once per epoch, before the K passes;
* ``loss(log_probs, log_probs_old, log_probs_ref, targets) -> (loss, clipfrac)`` on ``[n,k]`` log-probs and
  ``[n]`` (or, with ``per_step_advantages``, ``[n,k]``) targets; ``clipfrac`` is the fraction of steps outside the
  clip band;
* ``state_dict()`` / ``load_state_dict()`` for state kept across epochs (DDPO's stat tracker).

    algorithm = make_algorithm(cfg)
    ALGORITHMS.register("mine", "my_package.mine:Mine")   # a new algorithm: one file and this line

This module imports torch only inside the entries' methods, so configs validate without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rewardtune.config import from_dict, require
from rewardtune.registry import Registry

if TYPE_CHECKING:
    import torch

    from rewardtune.finetune.config import FinetuneConfig
    from rewardtune.finetune.rollout import Rollouts


class Algorithm(Protocol):
    Options: type | None
    min_images_per_prompt: int
    whole_groups: bool
    uses_reference: bool

    def targets(self, rollouts: Rollouts) -> torch.Tensor: ...

    def loss(self, log_probs: torch.Tensor, log_probs_old: torch.Tensor, log_probs_ref: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


ALGORITHMS: Registry[type | str] = Registry("algorithm")


@ALGORITHMS.register("prdp")
class PRDP:
    """Proximal reward difference prediction: targets are the raw rewards; the loss is Eq. 18 with stepwise
    clipping (Eqs. 19-21) as in Appendix G, per prompt group, averaged over groups."""

    Options = None
    min_images_per_prompt, min_images_reason = 2, "its loss compares images of the same prompt"
    whole_groups = True
    uses_reference = True
    per_step_advantages = False  # its targets are rewards of whole trajectories

    def __init__(self, cfg: FinetuneConfig, options: None = None) -> None:
        self.beta, self.clip_range = cfg.prdp.beta, cfg.prdp.clip_range
        self.group_size = cfg.images_per_prompt

    def targets(self, rollouts: Rollouts) -> torch.Tensor:
        return rollouts.rewards

    def loss(self, log_probs, log_probs_old, log_probs_ref, targets):
        """``[n,k]`` log-probs of ``n = G*B`` group-contiguous samples, ``[n]`` rewards -> scalar loss."""
        from rewardtune.finetune.losses import prdp_loss_grouped

        n, k = log_probs.shape
        shape = (n // self.group_size, self.group_size, k)
        loss = prdp_loss_grouped(log_probs.reshape(shape), log_probs_old.reshape(shape),
                                 log_probs_ref.reshape(shape), targets.reshape(shape[:2]), self.beta, self.clip_range)
        # the log-ratio moves with log p (the reference cancels): clipped when |l - l_old| > eps
        clipfrac = ((log_probs - log_probs_old).abs() > self.clip_range).float().mean()
        return loss, clipfrac

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@ALGORITHMS.register("ddpo")
class DDPO:
    """DDPO-IS (PPO-clip per step): targets are advantages normalised per prompt (stat tracker) or over the batch,
    clipped to ``+-adv_clip_max``. Non-finite rewards are kept out of the statistics and get a NaN advantage, so
    only the minibatches holding them are skipped."""

    Options = None
    min_images_per_prompt, min_images_reason = 1, ""
    whole_groups = False
    uses_reference = False  # PPO-clip needs only the snapshot's log-probs
    per_step_advantages = True

    def __init__(self, cfg: FinetuneConfig, options: None = None) -> None:
        from rewardtune.finetune.advantages import PerPromptStatTracker

        self.cfg = cfg.ddpo
        self.adv_clip_max = cfg.ddpo.adv_clip_max
        self.tracker = (PerPromptStatTracker(cfg.ddpo.stat_buffer, cfg.ddpo.stat_min_count)
                        if cfg.ddpo.per_prompt_stats else None)

    def targets(self, rollouts: Rollouts) -> torch.Tensor:
        import torch

        from rewardtune.finetune.advantages import batch_advantages

        rewards = rollouts.rewards
        finite = torch.isfinite(rewards)
        advantages = torch.full_like(rewards, float("nan"))
        if finite.any():
            kept = [p for p, ok in zip(rollouts.prompts, finite.tolist()) if ok]
            values = rewards[finite]
            normalised = self.tracker.update(kept, values) if self.tracker else batch_advantages(values)
            advantages[finite] = normalised.to(rewards.device)
        return advantages.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    def loss(self, log_probs, log_probs_old, log_probs_ref, targets):
        """``[n,k]`` log-probs and ``[n]`` (or per-step ``[n,k]``) advantages -> PPO-clip loss (the reference is not
        used)."""
        import torch

        from rewardtune.finetune.losses import ddpo_loss

        loss = ddpo_loss(log_probs, log_probs_old, targets, self.cfg.clip_range)
        ratio = torch.exp(log_probs.detach() - log_probs_old)
        clipfrac = ((ratio - 1.0).abs() > self.cfg.clip_range).float().mean()
        return loss, clipfrac

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker and state.get("tracker"):
            self.tracker.load_state_dict(state["tracker"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GRPOOptions:
    """``train.algorithm_options`` of GRPO. Defaults are Flow-GRPO's SD3.5-M settings (yifan123/flow_grpo
    ``config/base.py`` and ``config/grpo.py``):

    * ``clip_range``: per-step PPO clip on the importance ratio, band ``1 +- clip_range`` (Flow-GRPO: 1e-4);
    * ``adv_clip_max``: advantages clipped to ``+-adv_clip_max`` (Flow-GRPO: 5);
    * ``kl_beta``: weight of the KL penalty to the reference model; 0 drops the term and the reference pass
      (Flow-GRPO: 0.04 for GenEval and OCR, 0.01 for PickScore, 0 in its base config). Flow-GRPO's KL is the
      per-dimension closed form, this one is k3 on per-dimension-mean log-probs (see :class:`GRPO`): the same
      number is not the same strength, retune it per model;
    * ``std_eps``: added to the std of the advantages' denominator (Flow-GRPO's stat tracker: 1e-4);
    * ``global_std``: divide by the std of all the epoch's rewards (this process's) instead of the group's
      (Flow-GRPO's ``sample.global_std``; its SD3.5 configs set it True; the group mean is subtracted either way).
    """

    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    kl_beta: float = 0.04
    std_eps: float = 1e-4
    global_std: bool = False

    def __post_init__(self) -> None:
        require(_finite(self.clip_range) and self.clip_range > 0, "clip_range",
                "a finite number > 0 (the PPO ratio band 1 +- clip_range)", self.clip_range)
        require(_finite(self.adv_clip_max) and self.adv_clip_max > 0, "adv_clip_max", "a finite number > 0",
                self.adv_clip_max)
        require(_finite(self.kl_beta) and self.kl_beta >= 0, "kl_beta",
                "a finite number >= 0 (0 turns the KL penalty and the reference pass off)", self.kl_beta)
        require(_finite(self.std_eps) and self.std_eps > 0, "std_eps",
                "a finite number > 0 (a group with equal rewards would divide 0 by 0)", self.std_eps)
        require(isinstance(self.global_std, bool), "global_std", "true or false", self.global_std)


@ALGORITHMS.register("grpo")
class GRPO:
    """Group-relative policy optimisation (DeepSeekMath's GRPO; Flow-GRPO and DanceGRPO for diffusion).

    Targets: each sample's reward minus its prompt group's mean, over the group's std (or the batch's with
    ``global_std``) plus ``std_eps``, clipped to ``+-adv_clip_max``. Statistics are population ones (``ddof=0``,
    as Flow-GRPO's ``np.std``), over the group's finite rewards; a non-finite reward gets a NaN advantage, so only
    the minibatches holding it are skipped (as DDPO). A group of equal rewards gets zero advantages. Groups are the
    epoch's prompt groups (Flow-GRPO groups by prompt text over the gathered batch of all processes; here each
    process normalises its own groups, and ``global_std`` is this process's batch std).

    Loss (:func:`~rewardtune.finetune.losses.grpo_loss`): DDPO's per-step PPO-clip on the ratios to the snapshot,
    plus ``kl_beta * mean(k3)`` with ``k3 = exp(l_ref - l) - (l_ref - l) - 1`` on the reference log-probs of the
    sampled transitions, recorded once per epoch at rollout time. Flow-GRPO instead uses the exact per-dimension KL
    of the two Gaussian steps, ``|mu_theta - mu_ref|^2 / (2 sigma^2)``, which needs a reference forward pass in every
    update. The log-probs here are means over latent dimensions, so k3 is a proximity penalty to the reference
    (>= 0, zero with zero gradient at ``l = l_ref``) rather than an unbiased KL estimate; the transitions are drawn
    from the snapshot, not from ``pi_theta``, as in GRPO.
    """

    Options = GRPOOptions
    min_images_per_prompt = 2
    min_images_reason = "its advantages compare images of the same prompt (one image has zero advantage)"
    whole_groups = False  # advantages are computed once per epoch over all rollouts; the loss is per sample
    uses_reference = True  # the default options' kl_beta > 0; each instance sets its own
    per_step_advantages = True

    def __init__(self, cfg: FinetuneConfig, options: GRPOOptions | None = None) -> None:
        self.options = options if options is not None else GRPOOptions()
        self.uses_reference = self.options.kl_beta > 0
        self.adv_clip_max = self.options.adv_clip_max

    def targets(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N*B]`` group-relative advantages of the group-contiguous rewards (NaN where a reward is not finite)."""
        import torch

        opt = self.options
        rewards = rollouts.rewards
        values = rewards.detach().double().reshape(-1, rollouts.images_per_prompt)  # [N,B]
        finite = torch.isfinite(values)
        kept = torch.where(finite, values, torch.zeros_like(values))
        count = finite.sum(1, keepdim=True)
        mean = kept.sum(1, keepdim=True) / count.clamp_min(1)
        if opt.global_std:
            flat = values[finite]
            std = flat.std(unbiased=False) if flat.numel() else values.new_zeros(())
        else:
            std = (torch.where(finite, values - mean, torch.zeros_like(values)) ** 2).sum(1, keepdim=True)
            std = (std / count.clamp_min(1)).sqrt()
        advantages = torch.where(finite, (values - mean) / (std + opt.std_eps), torch.full_like(values, float("nan")))
        return advantages.clamp(-opt.adv_clip_max, opt.adv_clip_max).reshape(-1).to(rewards.dtype)

    def loss(self, log_probs, log_probs_old, log_probs_ref, targets):
        """``[n,k]`` log-probs and ``[n]`` (or per-step ``[n,k]``) advantages -> (PPO-clip + ``kl_beta`` * k3 loss,
        clipfrac)."""
        import torch

        from rewardtune.finetune.losses import grpo_loss

        opt = self.options
        loss, _ = grpo_loss(log_probs, log_probs_old, log_probs_ref, targets, opt.clip_range, opt.kl_beta)
        ratio = torch.exp(log_probs.detach() - log_probs_old)
        clipfrac = ((ratio - 1.0).abs() > opt.clip_range).float().mean()
        return loss, clipfrac

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def algorithm_entry(name: str) -> type:
    """The registered class of algorithm ``name`` (a lazy ``"module:Class"`` entry is imported here)."""
    return ALGORITHMS.load(name)


def algorithm_options(cfg: FinetuneConfig) -> Any:
    """``train.algorithm_options`` validated against the algorithm's ``Options`` dataclass (None without one)."""
    entry = algorithm_entry(cfg.algorithm)
    if entry.Options is None:
        require(not cfg.algorithm_options, "algorithm_options", f"empty: {cfg.algorithm} takes its options from "
                f"the train.{cfg.algorithm} section", cfg.algorithm_options)
        return None
    return from_dict(entry.Options, cfg.algorithm_options, prefix="train.algorithm_options.")


def check_algorithm(cfg: FinetuneConfig) -> None:
    """The config's algorithm exists and ``cfg`` meets what it declares (called when the config is built)."""
    require(cfg.algorithm in ALGORITHMS, "algorithm", "one of " + ", ".join(map(repr, ALGORITHMS.names())),
            cfg.algorithm)
    entry = algorithm_entry(cfg.algorithm)
    minimum = entry.min_images_per_prompt
    require(cfg.images_per_prompt >= minimum, "images_per_prompt", f"at least {minimum}" + (
        f" for {cfg.algorithm} ({entry.min_images_reason})" if minimum > 1 else ""), cfg.images_per_prompt)
    algorithm_options(cfg)
    if cfg.dense.kind != "none":
        dense_ready = [name for name in ALGORITHMS.names() if getattr(algorithm_entry(name), "per_step_advantages",
                                                                      False)]
        require(getattr(entry, "per_step_advantages", False), "dense.kind", f"'none' with {cfg.algorithm} (dense "
                "step rewards need an algorithm with per-step advantages: " + ", ".join(dense_ready) + ")",
                cfg.dense.kind)
        require(cfg.images_per_prompt >= 2, "images_per_prompt", "at least 2 with a dense kind (the dense term is "
                "standardised within each prompt group)", cfg.images_per_prompt)


def make_algorithm(cfg: FinetuneConfig) -> Algorithm:
    """The registered algorithm ``cfg.algorithm``, built from ``cfg`` and its typed options."""
    return algorithm_entry(cfg.algorithm)(cfg, algorithm_options(cfg))
