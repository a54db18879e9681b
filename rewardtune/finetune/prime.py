"""PRIME mode (``train.dense.kind: implicit``): an implicit process reward model trained online from outcome rewards
supplies dense step rewards (Cui et al. 2025, "Process Reinforcement through Implicit Rewards").

The implicit PRM ``phi`` is a denoiser initialised as the reference (a copy of the base model: with LoRA, a copy of
the policy's UNet whose fresh adapter is still the identity). Its step reward is the log-ratio

    r_t = beta * (log pi_phi(x_{T-t-1} | x_{T-t}, c) - log pi_ref(x_{T-t-1} | x_{T-t}, c))        [S,T]

(per-step log-probs are means over latent dimensions, as everywhere in rewardtune). phi is trained on each epoch's
rollouts with PRDP's objective (:func:`~rewardtune.finetune.losses.prdp_loss_grouped`): for pairs of one prompt
group, ``(mean_t r_hat_a - mean_t r_hat_b - (R_a - R_b) / beta)^2`` with ``r_hat = log pi_phi - log pi_ref`` --
a regression of outcome-reward differences onto differences of implicit rewards, so ``beta * mean_t r_hat`` learns
the outcome reward up to a per-group constant (``sum_t r_t = T * beta * mean_t r_hat``). This is PRIME's implicit
PRM with PRDP's reward-difference regression in place of its cross-entropy on binary outcomes (the rewards here are
real-valued).

Per epoch: one gradient step of phi on all of the epoch's samples and stochastic steps; the step rewards are taken
from that step's forward pass, i.e. from phi as it stood before this epoch's update (with one step per epoch the
PRDP proximal clip is inert: the snapshot is phi itself). At epoch 0 phi is the reference and every ``r_t`` is 0.
phi costs no reward queries: it learns from the outcome rewards the rollouts already have.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import torch

from rewardtune.diffusion.settings import stochastic_steps
from rewardtune.finetune.checkpoint import load_trainable_state, trainable_state
from rewardtune.finetune.losses import prdp_loss_grouped

if TYPE_CHECKING:
    from rewardtune.finetune.config import FinetuneConfig
    from rewardtune.finetune.dense import DenseContext
    from rewardtune.finetune.rollout import Rollouts

logger = logging.getLogger(__name__)


def implicit_step_rewards(log_probs_phi: torch.Tensor, log_probs_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * (log pi_phi - log pi_ref)``, ``[S,T]`` each -> ``[S,T]`` (NaN entries, the deterministic steps
    outside an ``sde_window``, become 0: they carry no log-ratio)."""
    r = beta * (log_probs_phi - log_probs_ref)
    return torch.where(torch.isfinite(r), r, torch.zeros_like(r))


class ImplicitPRM:
    """The implicit PRM phi with its own AdamW (``train.dense.prm``); one update per epoch; see the module
    docstring. A dense kind (:data:`rewardtune.finetune.dense.DENSE_KINDS`)."""

    accumulate, needs_x0, needs_reference = "returns_to_go", False, True

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module | None = None) -> None:
        from rewardtune.finetune.update import make_optimizer

        if model is None:
            raise ValueError("the implicit PRM needs the denoiser to copy (as it is before training)")
        self.cfg, self.prm = cfg, cfg.dense.prm
        self.model = copy.deepcopy(model)
        self.model.train()
        self.optimizer = make_optimizer(self.model.parameters(), dataclasses.replace(cfg.optim, lr=self.prm.lr))

    def __call__(self, rollouts: Rollouts, ctx: DenseContext) -> tuple[torch.Tensor, dict]:
        """One update of phi on ``rollouts``; returns (``[S,T]`` step rewards of phi before the update, metrics)."""
        log_probs, loss, grad_norm = self.update(rollouts, ctx.pipe.scheduler)
        window = list(stochastic_steps(self.cfg.sampling.sde_window, rollouts.num_steps))
        full = torch.full_like(rollouts.log_probs_old, float("nan"))
        full[:, window] = log_probs.to(full.device, full.dtype)
        rewards = implicit_step_rewards(full, rollouts.log_probs_ref, self.prm.beta)
        return rewards, {"prm_loss": loss, "prm_grad_norm": grad_norm}

    def update(self, rollouts: Rollouts, scheduler) -> tuple[torch.Tensor, float, float]:
        """One PRDP step of phi on every sample and stochastic step of ``rollouts``; returns (phi's log-probs
        ``[S,W]`` before the step, the loss, the gradient norm). A non-finite loss or gradient skips the step."""
        from rewardtune.finetune.update import Minibatch, StepContext, check_finite_state, loss_and_backward

        steps = torch.tensor(list(stochastic_steps(self.cfg.sampling.sde_window, rollouts.num_steps)))
        samples, group = rollouts.num_samples, rollouts.images_per_prompt
        batch = Minibatch(torch.arange(samples), steps.expand(samples, -1))
        ref = rollouts.log_probs_ref[:, steps.to(rollouts.log_probs_ref.device)]
        shape = (samples // group, group, len(steps))
        rewards = rollouts.rewards.reshape(shape[:2])

        def loss_fn(lp):
            loss = prdp_loss_grouped(lp.reshape(shape), lp.detach().reshape(shape), ref.to(lp).reshape(shape),
                                     rewards.to(lp), self.prm.beta, self.prm.clip_range)
            return loss, loss.new_zeros(())

        ctx = StepContext(self.model, self.optimizer, scheduler, self.cfg, None, lambda loss: loss.backward(),
                          torch.nn.utils.clip_grad_norm_)
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, log_probs = loss_and_backward(ctx, rollouts, batch, loss_fn)
        grad_norm = float("nan")
        if math.isfinite(loss.item()):
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
            if math.isfinite(grad_norm):
                self.optimizer.step()
                check_finite_state(self.optimizer)
        else:
            logger.warning("implicit PRM: non-finite loss, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return log_probs, loss.item(), grad_norm

    def state_dict(self) -> dict:
        return {"weights": trainable_state(self.model), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_trainable_state(self.model, state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
