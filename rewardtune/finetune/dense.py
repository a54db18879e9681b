"""Dense (per-step) advantages from step rewards (``train.dense``): DDPO and GRPO trained on outcome plus process
rewards of the denoising steps.

Step ``t`` (0-based, sampling order) is the transition ``x_{T-t} -> x_{T-t-1}``. A dense kind supplies step
rewards ``r [S,T]`` (S = N*B samples, group-major); the advantage of step ``t`` of sample ``b`` is

    A[b,t] = clip(A_out[b] + w * Z[b,t], +-adv_clip_max)
    Z[b,t] = (D[b,t] - mean_{b' in g(b)} D[b',t]) / (std_{b' in g(b)} D[b',t] + std_eps)   (population std)
    D      = accumulate(transform(lookahead(r)))

with ``A_out [S]`` the algorithm's own outcome advantages (GRPO's group-relative ones, DDPO's normalised ones),
``w = dense.weight``, ``g(b)`` the prompt group of sample b, and

* ``lookahead``: ReARTeR's TD look-ahead ``c_t = (1 - lam) r_t + lam c_{t+1}`` (``dense.td_lambda``; off by default);
* ``transform``: ``none``, ``clip`` (``min(r_t - eta, 0)``) or ``delta`` (``r_t - r_{t+1}``, last ``r_{T-1}``), the
  refinements of "On Designing Effective RL Reward at Training Time" (:mod:`rewardtune.process.transforms`);
* ``accumulate``: returns-to-go ``D_t = sum_{k>=t} gamma^(k-t) r_k`` (the step's action earns every later step
  reward: PRIME's return) or the step itself ``D_t = r_t`` (PAV's prover advantage of the step).

Kinds (:data:`DENSE_KINDS`; each declares what the rollouts must carry):

* ``x0``: ``r_t = R(decode(x0_hat(x_{T-t-1})))``, the training reward of the clean image predicted from the state
  *after* step t (the sampler's ``x0_predictions[:, t+1]``); for the last step the state after it is ``x_0``, whose
  reward is the outcome already queried. Costs ``S*(T-1)`` extra reward queries per epoch.
* ``implicit`` (PRIME): ``r_t = beta * (log pi_phi(x_{T-t-1}|x_{T-t}) - log pi_ref(...))`` from an implicit PRM phi
  trained online on the outcome rewards (:mod:`rewardtune.finetune.prime`); no extra reward queries.
* ``progress`` (PAV): ``r_t = V(x_{T-t-1}) - V(x_{T-t})``, the step's advantage under the base model as prover, ``V``
  by K Monte Carlo continuations (:func:`rewardtune.process.values.trajectory_values`) and ``V(x_0) = R(x_0)``, the
  outcome. Costs ``S*T*K`` reward queries and ``S*K*T(T+1)/2`` denoiser steps per epoch.

Statistics skip non-finite entries (as GRPO's); a sample with a non-finite step or outcome reward gets NaN
advantages (returns-to-go spread a NaN over the whole row), so only the minibatches holding it are skipped.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from rewardtune.process.transforms import apply_transform, returns_to_go, td_lookahead
from rewardtune.registry import Registry

if TYPE_CHECKING:
    from rewardtune.finetune.config import DenseConfig, FinetuneConfig
    from rewardtune.finetune.rollout import Rollouts

logger = logging.getLogger(__name__)


# ----- pure tensor functions -----

def standardise_per_step(dense: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """``Z[b,t] = (D[b,t] - mean_g D[:,t]) / (std_g D[:,t] + eps)`` within each prompt group g of ``group_size``
    contiguous samples and each step; population std over the group's finite entries, NaN where ``D`` is NaN.
    ``dense [S,T]`` -> ``[S,T]`` (float64 inside, the input's dtype out)."""
    samples, steps = dense.shape
    values = dense.detach().double().reshape(samples // group_size, group_size, steps)  # [G,B,T]
    finite = torch.isfinite(values)
    kept = torch.where(finite, values, torch.zeros_like(values))
    count = finite.sum(1, keepdim=True).clamp_min(1)
    mean = kept.sum(1, keepdim=True) / count
    var = (torch.where(finite, values - mean, torch.zeros_like(values)) ** 2).sum(1, keepdim=True) / count
    out = torch.where(finite, (values - mean) / (var.sqrt() + eps), torch.full_like(values, float("nan")))
    return out.reshape(samples, steps).to(dense.dtype)


def dense_term(step_rewards: torch.Tensor, cfg: DenseConfig, accumulate: str) -> torch.Tensor:
    """``D = accumulate(transform(lookahead(r)))`` of step rewards ``r [S,T]`` (module docstring); ``accumulate``
    is ``returns_to_go`` or ``step`` (the resolved ``dense.accumulate``)."""
    r = step_rewards if cfg.td_lambda is None else td_lookahead(step_rewards, cfg.td_lambda)
    r = apply_transform(cfg.transform, r, cfg.clip_eta)
    return returns_to_go(r, cfg.gamma) if accumulate == "returns_to_go" else r


def combine_advantages(outcome: torch.Tensor, standardised: torch.Tensor, weight: float,
                       clip_max: float) -> torch.Tensor:
    """``clip(A_out[b] + weight * Z[b,t], +-clip_max)``: ``outcome [S]``, ``standardised [S,T]`` -> ``[S,T]`` in
    the outcome's dtype (NaN stays NaN)."""
    combined = outcome.double()[:, None] + weight * standardised.double()
    return combined.clamp(-clip_max, clip_max).to(outcome.dtype)


# ----- step-reward kinds -----

@dataclass
class DenseContext:
    """What step rewards may need: the pipeline (its VAE and scheduler), the ``reward`` that counts its queries,
    the training config (sampler settings, ``forward_chunk``) and the run's reference (the base model)."""

    pipe: object
    reward: Callable
    cfg: FinetuneConfig
    reference: object = None  # the base model: ADAPTERS_DISABLED (LoRA) or a frozen denoiser (PAV's prover)


class StepRewards(Protocol):
    accumulate: str  # the kind's own accumulation (``dense.accumulate: auto``)
    needs_x0: bool  # the rollouts must carry the sampler's x0 predictions
    needs_reference: bool  # the rollouts must carry the reference model's log-probs at every epoch

    def __call__(self, rollouts: Rollouts, ctx: DenseContext) -> tuple[torch.Tensor, dict]: ...


DENSE_KINDS: Registry[type | str] = Registry("dense kind")


@DENSE_KINDS.register("x0")
class X0StepRewards:
    """``r[:, t] = R(decode(x0_predictions[:, t+1]))`` for ``t < T-1`` and ``r[:, T-1] = R(x_0)`` (the outcome),
    scored in batches of ``sampling.batch_size`` images with the counted training reward."""

    accumulate, needs_x0, needs_reference = "returns_to_go", True, False

    def __init__(self, cfg: FinetuneConfig, model=None) -> None:
        pass

    def __call__(self, rollouts: Rollouts, ctx: DenseContext) -> tuple[torch.Tensor, dict]:
        from rewardtune.process.step_rewards import x0_step_rewards

        predictions = rollouts.x0_predictions  # [S,T,C,h,w], predicted from the state before each step
        if predictions is None:
            raise ValueError("dense kind x0 needs rollouts collected with keep_x0=True")
        after, _ = x0_step_rewards(ctx.pipe, predictions[:, 1:], rollouts.prompts, ctx.reward,
                                   ctx.cfg.sampling.batch_size)  # [S,T-1]: the states after steps 0..T-2
        outcome = rollouts.rewards.float()[:, None]
        return torch.cat([after.to(outcome.device), outcome], 1), {}


DENSE_KINDS.register("implicit", "rewardtune.finetune.prime:ImplicitPRM")


@contextmanager
def base_model(pipe, reference):
    """The pipeline sampling as the base model inside the block: LoRA adapters off (``ADAPTERS_DISABLED``), or the
    frozen reference denoiser swapped in and the trained one put back on exit."""
    from rewardtune.diffusion.backbones import backbone_of
    from rewardtune.finetune.rollout import ADAPTERS_DISABLED, adapters_disabled

    backbone = backbone_of(pipe)
    if reference == ADAPTERS_DISABLED:
        with adapters_disabled(backbone.denoiser(pipe)):
            yield pipe
        return
    trained = backbone.denoiser(pipe)
    backbone.set_denoiser(pipe, reference)
    try:
        yield pipe
    finally:
        backbone.set_denoiser(pipe, trained)


@DENSE_KINDS.register("progress")
class ProgressStepRewards:
    """PAV progress ``r[:, t] = V[:, t+1] - V[:, t]`` with ``V [S,T+1]`` the base model's Monte Carlo values at the
    latents before each step (``dense.progress_continuations`` continuations each, seeded from the epoch's first
    sample seed) and ``V[:, T] = R(x_0)``, the outcome (no extra query)."""

    accumulate, needs_x0, needs_reference = "step", False, False

    def __init__(self, cfg: FinetuneConfig, model=None) -> None:
        self.k = cfg.dense.progress_continuations

    def __call__(self, rollouts: Rollouts, ctx: DenseContext) -> tuple[torch.Tensor, dict]:
        from rewardtune.process.values import Prover, trajectory_values

        if ctx.reference is None:
            raise ValueError("dense kind progress needs the base model (the run's reference) as prover")
        with base_model(ctx.pipe, ctx.reference), torch.no_grad():
            values = trajectory_values(Prover(ctx.pipe, ctx.cfg.sampling), rollouts.latents, rollouts.prompts,
                                       ctx.reward, self.k, seed=int(rollouts.seeds[0]),
                                       branches=torch.arange(rollouts.num_steps))
        outcome = rollouts.rewards.float()[:, None]
        v = torch.cat([values.mean.float().to(outcome.device), outcome], 1)  # [S,T+1]
        return v[:, 1:] - v[:, :-1], {"progress_value_se": values.se.float().mean().item()}


def dense_kind(name: str) -> type:
    """The registered class of dense kind ``name`` (a lazy ``"module:Class"`` entry is imported here)."""
    return DENSE_KINDS.load(name)


class DenseAdvantages:
    """The per-step advantages of one run's ``train.dense``: step rewards of the configured kind, then the math of
    the module docstring. Owns the kind's state (PRIME's implicit PRM), saved in checkpoints."""

    def __init__(self, cfg: FinetuneConfig, clip_max: float, model: torch.nn.Module | None = None) -> None:
        self.cfg, self.clip_max = cfg, clip_max
        self.kind = dense_kind(cfg.dense.kind)(cfg, model)
        self.accumulate = self.kind.accumulate if cfg.dense.accumulate == "auto" else cfg.dense.accumulate

    @property
    def needs_x0(self) -> bool:
        return self.kind.needs_x0

    @property
    def needs_reference(self) -> bool:
        return self.kind.needs_reference

    def __call__(self, rollouts: Rollouts, outcome: torch.Tensor, ctx: DenseContext) -> tuple[torch.Tensor, dict]:
        """``outcome [S]`` advantages -> (``[S,T]`` dense advantages, metrics of the step rewards)."""
        dense = self.cfg.dense
        raw, metrics = self.kind(rollouts, ctx)
        term = dense_term(raw, dense, self.accumulate)
        z = standardise_per_step(term, rollouts.images_per_prompt, dense.std_eps)
        advantages = combine_advantages(outcome, z, dense.weight, self.clip_max)
        return advantages, {**metrics, **step_reward_metrics(raw, apply_transform(dense.transform, raw,
                                                                                   dense.clip_eta))}

    def state_dict(self) -> dict:
        return self.kind.state_dict() if hasattr(self.kind, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.kind, "load_state_dict"):
            self.kind.load_state_dict(state)


def step_reward_metrics(raw: torch.Tensor, transformed: torch.Tensor) -> dict:
    """Means over samples (finite rows) of the summed raw step rewards (``dense_raw_sum``: what an inflating
    dense reward inflates), of the summed transformed ones (``dense_sum``), and the per-step means of the raw ones
    (``dense_step_means``, a list of T)."""
    finite = torch.isfinite(raw).all(1) & torch.isfinite(transformed).all(1)
    if not finite.any():
        return {"dense_raw_sum": float("nan"), "dense_sum": float("nan")}
    raw, transformed = raw[finite].double(), transformed[finite].double()
    return {"dense_raw_sum": raw.sum(1).mean().item(), "dense_sum": transformed.sum(1).mean().item(),
            "dense_step_means": [round(v, 6) for v in raw.mean(0).tolist()]}


def make_dense(cfg: FinetuneConfig, algorithm, model: torch.nn.Module | None = None) -> DenseAdvantages | None:
    """The run's :class:`DenseAdvantages` (None for ``dense.kind: none``). ``model``: the denoiser as it is before
    training (PRIME's implicit PRM starts as a copy of it)."""
    if cfg.dense.kind == "none":
        return None
    return DenseAdvantages(cfg, algorithm.adv_clip_max, model)
