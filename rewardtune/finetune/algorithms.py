"""Registry of online finetuning algorithms. PRDP and DDPO share everything (rollouts, minibatching, recomputation,
gradient steps) except this entry: per-sample targets (rewards or advantages) and the loss on per-step log-probs.

An entry is a class (or a lazy ``"module:Class"`` string) built as ``Entry(cfg, options)`` from a
:class:`~rewardtune.finetune.config.FinetuneConfig` and its typed options, declaring what it needs:

* ``Options``: the dataclass of ``train.algorithm_options`` (None for the built-ins, whose options are the
  ``train.prdp`` / ``train.ddpo`` sections);
* ``min_images_per_prompt`` (and ``min_images_reason``): checked when the config is built;
* ``whole_groups``: True when the loss couples the B samples of a prompt (PRDP's pairs), so minibatches must hold
  whole prompt groups;
* ``uses_reference``: True when the loss reads ``log_probs_ref`` (PRDP's log-ratios); otherwise the rollouts skip
  the reference model's pass over every step (``log_probs_ref`` is then ``log_probs_old``);
* ``targets(rollouts) -> [N*B]``: computed once per epoch, before the K passes;
* ``loss(log_probs, log_probs_old, log_probs_ref, targets) -> (loss, clipfrac)`` on ``[n,k]`` log-probs and
  ``[n]`` targets; ``clipfrac`` is the fraction of steps outside the clip band;
* ``state_dict()`` / ``load_state_dict()`` for state kept across epochs (DDPO's stat tracker).

    algorithm = make_algorithm(cfg)
    ALGORITHMS.register("mine", "my_package.mine:Mine")   # a new algorithm: one file and this line

This module imports torch only inside the entries' methods, so configs validate without it.
"""

from __future__ import annotations

import importlib
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

    def __init__(self, cfg: FinetuneConfig, options: None = None) -> None:
        from rewardtune.finetune.advantages import PerPromptStatTracker

        self.cfg = cfg.ddpo
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
        """``[n,k]`` log-probs and ``[n]`` advantages -> PPO-clip loss (the reference is not used)."""
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


def algorithm_entry(name: str) -> type:
    """The registered class of algorithm ``name`` (a lazy ``"module:Class"`` entry is imported here)."""
    entry = ALGORITHMS.get(name)
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


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


def make_algorithm(cfg: FinetuneConfig) -> Algorithm:
    """The registered algorithm ``cfg.algorithm``, built from ``cfg`` and its typed options."""
    return algorithm_entry(cfg.algorithm)(cfg, algorithm_options(cfg))
