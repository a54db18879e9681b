"""Registry of online finetuning algorithms. PRDP and DDPO share everything (rollouts, minibatching, recomputation,
gradient steps) except this entry: per-sample targets (rewards or advantages) and the loss on per-step log-probs.

An entry is a class built from a :class:`~rewardtune.finetune.config.FinetuneConfig` with

* ``whole_groups``: True when the loss couples the B samples of a prompt (PRDP's pairs), so minibatches must hold
  whole prompt groups;
* ``targets(rollouts) -> [N*B]``: computed once per epoch, before the K passes;
* ``loss(log_probs, log_probs_old, log_probs_ref, targets) -> (loss, clipfrac)`` on ``[n,k]`` log-probs and
  ``[n]`` targets; ``clipfrac`` is the fraction of steps outside the clip band;
* ``state_dict()`` / ``load_state_dict()`` for state kept across epochs (DDPO's stat tracker).

    algorithm = make_algorithm(cfg)      # ALGORITHMS.get(cfg.algorithm)(cfg)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from rewardtune.finetune.advantages import PerPromptStatTracker, batch_advantages
from rewardtune.finetune.losses import ddpo_loss, prdp_loss_grouped
from rewardtune.registry import Registry

if TYPE_CHECKING:
    from rewardtune.finetune.config import FinetuneConfig
    from rewardtune.finetune.rollout import Rollouts


class Algorithm(Protocol):
    whole_groups: bool

    def targets(self, rollouts: Rollouts) -> torch.Tensor: ...

    def loss(self, log_probs: torch.Tensor, log_probs_old: torch.Tensor, log_probs_ref: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


ALGORITHMS: Registry[type] = Registry("algorithm")


@ALGORITHMS.register("prdp")
class PRDP:
    """Proximal reward difference prediction: targets are the raw rewards; the loss is Eq. 18 with stepwise
    clipping (Eqs. 19-21) as in Appendix G, per prompt group, averaged over groups."""

    whole_groups = True

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.beta, self.clip_range = cfg.prdp.beta, cfg.prdp.clip_range
        self.group_size = cfg.images_per_prompt

    def targets(self, rollouts: Rollouts) -> torch.Tensor:
        return rollouts.rewards

    def loss(self, log_probs, log_probs_old, log_probs_ref, targets):
        """``[n,k]`` log-probs of ``n = G*B`` group-contiguous samples, ``[n]`` rewards -> scalar loss."""
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

    whole_groups = False

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg.ddpo
        self.tracker = (PerPromptStatTracker(cfg.ddpo.stat_buffer, cfg.ddpo.stat_min_count)
                        if cfg.ddpo.per_prompt_stats else None)

    def targets(self, rollouts: Rollouts) -> torch.Tensor:
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
        loss = ddpo_loss(log_probs, log_probs_old, targets, self.cfg.clip_range)
        ratio = torch.exp(log_probs.detach() - log_probs_old)
        clipfrac = ((ratio - 1.0).abs() > self.cfg.clip_range).float().mean()
        return loss, clipfrac

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker and state.get("tracker"):
            self.tracker.load_state_dict(state["tracker"])


def make_algorithm(cfg: FinetuneConfig) -> Algorithm:
    """The registered algorithm ``cfg.algorithm``, built from ``cfg``."""
    return ALGORITHMS.get(cfg.algorithm)(cfg)
