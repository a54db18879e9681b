"""Step values by Monte Carlo branching: ``V(x_j)`` of stored latents under a prover policy.

A denoising trajectory of T steps visits latents ``x^(0) = x_T, x^(1), ..., x^(T) = x_0``; the *branch index* ``j``
(0..T) names the latent after ``j`` steps. Its value under a prover ``mu`` (a pipeline with sampler settings: the
base model, or another guidance scale; PAV, Setlur et al. 2024) and an outcome ``R`` (any reward
``R(images [B,3,H,W] in [0,1], prompts) -> [B]``, or a predicate) is

    V(x^(j)) = E_{x_0 ~ mu(. | x^(j))} [ R(decode(x_0)) ]

estimated from K continuations, steps ``j..T-1`` of the prover's sampler from ``x^(j)``
(:func:`rewardtune.diffusion.sampling.sample_trajectories` with ``start_step=j``), each decoded and scored once:
``V_hat = mean_k R_k`` with standard error ``std_k(R_k) / sqrt(K)`` (sample standard deviation, ``ddof=1``; 0 for
``K = 1``). ``j = T`` is the outcome itself: one query, repeated K times, SE 0. This is OmegaPRM's Monte Carlo step
estimate (Luo et al. 2024) with a real-valued reward.

All ``N x K`` continuations of a call run through the sampler in batches of ``settings.batch_size`` rows, grouped by
branch index (rows of one branch index share the timesteps). Continuation ``k`` of row ``n`` at branch index ``j``
draws its noise from a generator seeded :func:`branch_seed` ``(seed, row, j, k)``: the same (seed, row, j, k) always
gives the same continuation, in whichever call or batch it is drawn, so a binary search and an exhaustive sweep
that ask for the same branch point see the same Monte Carlo estimate.

Reward queries (decoded images scored) are counted in :attr:`StepValues.queries`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rewardtune.diffusion.backbones import Conditioning
from rewardtune.diffusion.sampling import (
    decode_latents,
    encode_negative,
    encode_prompts,
    generators_for,
    sample_trajectories,
)
from rewardtune.diffusion.settings import SamplerSettings

logger = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images [B,3,H,W], prompts -> [B] or [B,A]


@dataclass
class StepValues:
    """Monte Carlo values of N branch points. ``scores [N,K,...]`` the K continuations' scores (a score function
    may return ``[B]`` or ``[B,A]``); ``mean`` and ``se`` ``[N,...]``; ``queries`` the reward queries spent."""

    scores: torch.Tensor
    mean: torch.Tensor
    se: torch.Tensor
    queries: int

    @classmethod
    def from_scores(cls, scores: torch.Tensor, queries: int) -> StepValues:
        mean, se = value_stats(scores)
        return cls(scores, mean, se, queries)

    def reshape(self, *shape: int) -> StepValues:
        """Rows regrouped, e.g. ``[B*(T+1)] -> [B,T+1]`` (the K axis and score axes follow)."""
        rest = self.scores.shape[1:]
        return StepValues(self.scores.reshape(*shape, *rest), self.mean.reshape(*shape, *rest[1:]),
                          self.se.reshape(*shape, *rest[1:]), self.queries)


def value_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, standard error)`` over the K axis (dim 1) of ``scores [N,K,...]``: ``mean_k``,
    ``std_k(ddof=1) / sqrt(K)`` (0 when K == 1)."""
    scores = scores.float()
    k = scores.shape[1]
    mean = scores.mean(1)
    if k == 1:
        return mean, torch.zeros_like(mean)
    return mean, scores.std(1, correction=1) / k**0.5


def branch_seed(seed: int, row: int, branch: int, k: int) -> int:
    """The generator seed of continuation ``k`` from branch index ``branch`` of trajectory ``row``:
    ``((seed * 1_000_003 + row) * 10_007 + branch) * 1_009 + k`` modulo ``2**63 - 1`` (a torch generator takes at
    most 64 bits; a finetuning epoch's sample seeds reach 2**31). Distinct for rows < 1,000,003, branch indices
    < 10,007 and K < 1,009 at one seed; across seeds, distinct below ~900,000 and equal only by chance above."""
    return (((int(seed) * 1_000_003 + int(row)) * 10_007 + int(branch)) * 1_009 + int(k)) % (2**63 - 1)


@dataclass
class Prover:
    """The policy that continues from a branch point: a pipeline and its sampler settings (``steps`` must be the
    trajectories' number of steps; ``eta > 0`` for stochastic continuations, else every continuation is the same
    and the value is the deterministic outcome with SE 0)."""

    pipe: object
    settings: SamplerSettings

    def conditioning(self, prompts: list[str]) -> tuple[Conditioning, torch.Tensor, Conditioning | None]:
        """``(unique prompts' conditioning, row -> unique index [N], negative one-row conditioning or None)``."""
        unique = sorted(set(prompts))
        position = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([position[p] for p in prompts])
        s = self.settings
        cond = encode_prompts(self.pipe, unique, s.height, s.width)
        negative = encode_negative(self.pipe, s.negative_prompt, s.height, s.width) if s.guidance != 1.0 else None
        return cond, index, negative

    def continue_from(self, latents: torch.Tensor, start_step: int, cond: Conditioning,
                      negative: Conditioning | None, seeds: list[int]) -> torch.Tensor:
        """Final latents ``[M,C,h,w]`` of continuations of ``latents [M,C,h,w]`` from step ``start_step`` (the
        conditioning ``cond`` of M rows), one generator per row seeded ``seeds``."""
        s = self.settings
        device = cond.device
        trajectory = sample_trajectories(
            self.pipe, cond, None if negative is None else negative.expand(len(cond)), generators_for(seeds, device),
            steps=s.steps, guidance=s.guidance, eta=s.eta, height=s.height, width=s.width, family=s.scheduler,
            keep_latents=False, sde_window=s.sde_window, start_step=start_step, start_latents=latents.to(device))
        return trajectory.final


def mc_values(prover: Prover, latents: torch.Tensor, branches: torch.Tensor, prompts: list[str], score: ScoreFn,
              k: int, seed: int = 0, rows: torch.Tensor | None = None) -> StepValues:
    """Monte Carlo values of N branch points (see the module docstring).

    Args:
        prover: the continuing policy.
        latents: ``[N,C,h,w]``, the latent at each branch point (``trajectory.latents[n, j]``).
        branches: ``[N]`` branch indices ``j`` in ``0..T`` (T = ``prover.settings.steps``); ``j = T`` scores
            ``latents`` itself once.
        prompts: N prompts (conditioning and reward).
        score: ``score(images [M,3,H,W] in [0,1], prompts) -> [M]`` or ``[M,A]`` (a reward or a predicate).
        k: continuations per branch point.
        seed, rows: the continuations' seeds are :func:`branch_seed` ``(seed, rows[n], branches[n], k)``; ``rows``
            ``[N]`` (default ``0..N-1``) names each branch point's trajectory.

    Returns:
        :class:`StepValues` with ``scores [N,K,...]``, ``mean``/``se [N,...]`` and the reward queries spent.
    """
    steps = prover.settings.steps
    branches = torch.as_tensor(branches).long().cpu()
    rows = torch.arange(len(branches)) if rows is None else torch.as_tensor(rows).long().cpu()
    _check_branch_points(latents, branches, prompts, rows, steps, k)
    if prover.settings.eta == 0 and bool((branches < steps).any()):
        logger.warning("prover eta is 0: every continuation is the same; values are outcomes with SE 0")
    cond, prompt_index, negative = prover.conditioning(prompts)
    parts, order, queries = [], [], 0
    for j in branches.unique().tolist():
        where = (branches == j).nonzero().flatten()
        scores, spent = _branch_scores(prover, latents[where], j, [prompts[i] for i in where.tolist()],
                                       cond[prompt_index[where].to(cond.device)], negative, rows[where], k, seed,
                                       score)
        parts.append(scores)
        order.append(where)
        queries += spent
    order = torch.cat(order)
    stacked = torch.cat(parts)
    out = torch.empty_like(stacked)
    out[order] = stacked
    return StepValues.from_scores(out, queries)


def _check_branch_points(latents, branches, prompts, rows, steps: int, k: int) -> None:
    n = len(branches)
    if latents.shape[0] != n or len(prompts) != n or len(rows) != n:
        raise ValueError(f"need one latent, prompt and row per branch point: {latents.shape[0]} latents, "
                         f"{len(prompts)} prompts, {len(rows)} rows, {n} branch indices")
    if n and not (0 <= int(branches.min()) and int(branches.max()) <= steps):
        raise ValueError(f"branch indices must be in 0..{steps} (the prover's steps), got {branches.tolist()}")
    if k < 1:
        raise ValueError(f"need at least one continuation per branch point, got k={k}")


def _branch_scores(prover: Prover, latents: torch.Tensor, j: int, prompts: list[str], cond: Conditioning,
                   negative: Conditioning | None, rows: torch.Tensor, k: int, seed: int,
                   score: ScoreFn) -> tuple[torch.Tensor, int]:
    """``([n,K,...] scores, queries)`` of the n branch points at branch index ``j`` (all K continuations each)."""
    n = len(latents)
    if j == prover.settings.steps:  # the outcome itself: no step left, one query each
        finals = _score_latents(prover.pipe, latents, prompts, score, prover.settings.batch_size)
        return finals[:, None].expand(n, k, *finals.shape[1:]), n
    rep = torch.arange(n).repeat_interleave(k)  # row-major: branch point, then continuation
    seeds = [branch_seed(seed, int(rows[i]), j, c) for i in range(n) for c in range(k)]
    size = prover.settings.batch_size
    out = []
    for start in range(0, n * k, size):
        part = rep[start:start + size]
        finals = prover.continue_from(latents[part], j, cond[part.to(cond.device)], negative,
                                      seeds[start:start + size])
        out.append(_score_latents(prover.pipe, finals, [prompts[i] for i in part.tolist()], score, size))
    scores = torch.cat(out)
    return scores.reshape(n, k, *scores.shape[1:]), n * k


@torch.no_grad()
def _score_latents(pipe, latents: torch.Tensor, prompts: list[str], score: ScoreFn, batch: int) -> torch.Tensor:
    """``score(decode(latents), prompts)`` in chunks of ``batch``, on the CPU as float: ``[M]`` or ``[M,A]``."""
    parts = []
    for start in range(0, len(latents), batch):
        images = decode_latents(pipe, latents[start:start + batch])
        parts.append(torch.as_tensor(score(images, prompts[start:start + batch])).detach().float().cpu())
    return torch.cat(parts)


def trajectory_values(prover: Prover, latents: torch.Tensor, prompts: list[str], score: ScoreFn, k: int,
                      seed: int = 0, branches: torch.Tensor | None = None) -> StepValues:
    """Values at branch indices ``branches`` (default all, ``0..T``) of B stored trajectories
    ``latents [B,T+1,C,h,w]`` (``Trajectory.latents`` sampled with ``keep_latents``), in one batched
    :func:`mc_values` call: ``mean``/``se`` ``[B,len(branches)]``, ``scores [B,len(branches),K,...]``. Trajectory
    ``b``'s continuations use rows ``b``."""
    b, points = latents.shape[0], latents.shape[1]
    branches = torch.arange(points) if branches is None else torch.as_tensor(branches).long().cpu()
    if points != prover.settings.steps + 1:
        raise ValueError(f"trajectories have {points - 1} steps but the prover samples {prover.settings.steps}; "
                         "keep every step's latents (keep_latents/keep_trajectories) and use the same steps")
    flat_rows = torch.arange(b).repeat_interleave(len(branches))
    flat_branches = branches.repeat(b)
    values = mc_values(prover, latents[flat_rows, flat_branches], flat_branches,
                       [prompts[i] for i in flat_rows.tolist()], score, k, seed, rows=flat_rows)
    return values.reshape(b, len(branches))


__all__ = ["Prover", "ScoreFn", "StepValues", "branch_seed", "mc_values", "trajectory_values", "value_stats"]
