"""The decisive step of a trajectory: the first step after which its outcome is settled, found by binary search over
branch points (OmegaPRM, Luo et al. 2024) and checked against an exhaustive Monte Carlo sweep.

Take a binary outcome ``o = O(x_0) in {0, 1}`` of a trajectory (e.g. "the gold oracle reads the prompted colour",
:func:`oracle_outcome`) and its Monte Carlo estimates ``V_hat(j)`` under a prover at the branch indices
``j = 0..T`` (:mod:`rewardtune.process.values`; ``V_hat(T) = o``). Branch index ``j`` is **decided** when every
continuation from it ends with the trajectory's outcome, ``|V_hat(j) - o| <= tolerance`` (tolerance 0: all K agree:
OmegaPRM's "MC estimate 0" for a lost outcome, 1 for a won one). The decisive branch index ``j*`` is the first ``j``
from which the outcome stays decided; the **decisive step** is step ``j* - 1`` (``x^(j*-1) -> x^(j*)``, 0-based in
sampling order), and ``j* = 0`` means the starting noise already decided it.

* :func:`bisect_decided` assumes decidedness is monotone in ``j`` and finds ``j*`` with ``ceil(log2(T+1))`` branch
  points per trajectory (all trajectories search in lockstep, one batched Monte Carlo call per round);
* :func:`last_undecided` reads ``j*`` off an exhaustive table (all ``T`` branch points), the ground truth the
  search is checked against (where decidedness is not monotone, the two can differ).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rewardtune.process.values import Prover, ScoreFn, mc_values

DecidedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # rows [M], branch indices [M] -> bool [M]


@dataclass
class Decisive:
    """Decisive branch indices ``index [N]`` (0..T; the decisive step is ``index - 1``), the branch points each
    trajectory queried ``branch_points [N]``, the outcomes ``outcome [N]`` and the reward queries spent."""

    index: torch.Tensor
    branch_points: torch.Tensor
    outcome: torch.Tensor
    queries: int


def bisect_decided(decided: DecidedFn, n: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary search of the first decided branch index of n trajectories, assuming that once decided, a trajectory
    stays decided (``decided(T)`` is true: the outcome itself, not queried).

    ``decided(rows [M], j [M]) -> bool [M]`` is called once per round with every still-searching trajectory's
    midpoint (``ceil(log2(T+1))`` rounds). Returns ``(index [n] in 0..T, branch points queried [n])``."""
    lo, hi = torch.zeros(n, dtype=torch.long), torch.full((n,), steps, dtype=torch.long)
    queried = torch.zeros(n, dtype=torch.long)
    while bool((lo < hi).any()):
        rows = (lo < hi).nonzero().flatten()
        mid = (lo[rows] + hi[rows]) // 2
        ok = torch.as_tensor(decided(rows, mid)).bool().cpu()
        hi[rows] = torch.where(ok, mid, hi[rows])
        lo[rows] = torch.where(ok, lo[rows], mid + 1)
        queried[rows] += 1
    return hi, queried


def search_rounds(steps: int) -> int:
    """Branch points a bisection over ``0..T`` queries at most: ``ceil(log2(T + 1))``."""
    return math.ceil(math.log2(steps + 1))


def last_undecided(decided: torch.Tensor) -> torch.Tensor:
    """``j*`` from an exhaustive table ``decided [N,T+1]`` (column T, the outcome, true): one past the last
    undecided branch index (0 when all are decided). ``[N]``."""
    steps = decided.shape[1] - 1
    undecided = ~decided.bool()
    last = torch.where(undecided, torch.arange(steps + 1), torch.full_like(undecided, -1, dtype=torch.long))
    return last.max(dim=1).values + 1


def first_decided(decided: torch.Tensor) -> torch.Tensor:
    """The first decided branch index of each row of ``decided [N,T+1]`` (T when only the outcome is). ``[N]``."""
    return decided.bool().int().argmax(dim=1)


def decided_from_scores(scores: torch.Tensor, outcome: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """``|mean_k scores - outcome| <= tolerance`` for ``scores [N,K]`` of a binary predicate and ``outcome [N]``."""
    return (scores.float().mean(1) - outcome.float()).abs() <= tolerance + 1e-9


@dataclass
class Outcome:
    """A binary outcome of images, judged on a reading: ``read(images [M,3,H,W], prompts) -> [M,...]`` (a reward,
    or the oracle's attribute codes), ``reference(final_readings [B,...], prompts) -> [B,...]`` once per trajectory
    (e.g. the prompted colour, or the colour of the trajectory's own final image), and
    ``judge(readings [N,K,...], reference [N,...]) -> [N,K]`` in {0, 1}."""

    read: ScoreFn
    reference: Callable[[torch.Tensor, list[str]], torch.Tensor]
    judge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def decisive_steps(prover: Prover, latents: torch.Tensor, prompts: list[str], outcome: Outcome, k: int,
                   seed: int = 0, tolerance: float = 0.0) -> Decisive:
    """OmegaPRM's binary search on B stored trajectories ``latents [B,T+1,C,h,w]`` under ``prover``.

    Cost in reward queries: one per trajectory for its final image (outcome and reference), then K per branch point
    (at most :func:`search_rounds` ``(T)`` each), all trajectories' branch points of a round in one batched
    :func:`~rewardtune.process.values.mc_values` call. Continuations are seeded as there (rows ``0..B-1``), so an
    exhaustive sweep with the same seed (:func:`rewardtune.process.values.trajectory_values`) sees the same
    estimates at the same branch points."""
    b, steps = latents.shape[0], latents.shape[1] - 1
    rows_all = torch.arange(b)
    final = mc_values(prover, latents[:, -1], torch.full((b,), steps), prompts, outcome.read, 1, seed, rows=rows_all)
    reference = outcome.reference(final.scores[:, 0], prompts)
    won = outcome.judge(final.scores, reference)[:, 0].float()
    queries = final.queries

    def decided(rows: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        nonlocal queries
        values = mc_values(prover, latents[rows, j], j, [prompts[i] for i in rows.tolist()], outcome.read, k, seed,
                           rows=rows)
        queries += values.queries
        return decided_from_scores(outcome.judge(values.scores, reference[rows]), won[rows], tolerance)

    index, points = bisect_decided(decided, b, steps)
    return Decisive(index, points, won, queries)


@dataclass
class SweepDecisive:
    """Decisive branch indices from an exhaustive sweep: ``sweep [B]`` (:func:`last_undecided`), ``search [B]`` and
    ``branch_points [B]`` (the binary search on the same estimates), ``outcome [B]``, and the Monte Carlo value of
    the outcome ``value [B,T+1]``."""

    sweep: torch.Tensor
    search: torch.Tensor
    branch_points: torch.Tensor
    outcome: torch.Tensor
    value: torch.Tensor


def decisive_from_sweep(readings: torch.Tensor, prompts: list[str], outcome: Outcome,
                        tolerance: float = 0.0) -> SweepDecisive:
    """Decisive steps of B trajectories from an exhaustive sweep's readings ``[B,T+1,K,...]`` (e.g.
    :func:`~rewardtune.process.values.trajectory_values` ``(...).scores`` with an outcome's ``read``; the last
    branch index holds the final image's reading). Costs no query: both the sweep's and the binary search's
    answers come from the same estimates, so they differ only where decidedness is not monotone."""
    b, points, k = readings.shape[:3]
    reference = outcome.reference(readings[:, -1, 0], prompts)
    judged = outcome.judge(readings.flatten(0, 1), reference.repeat_interleave(points)).reshape(b, points, k)
    won = judged[:, -1, 0]
    decided = decided_from_scores(judged.flatten(0, 1), won.repeat_interleave(points), tolerance).reshape(b, points)
    search, queried = bisect_decided(lambda rows, j: decided[rows, j], b, points - 1)
    return SweepDecisive(last_undecided(decided), search, queried, won, judged.float().mean(2))


__all__ = ["Decisive", "DecidedFn", "Outcome", "SweepDecisive", "bisect_decided", "decided_from_scores",
           "decisive_from_sweep", "decisive_steps", "first_decided", "last_undecided", "search_rounds"]
