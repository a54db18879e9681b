"""Episodic policy search with a learned perceptual reward or a true reward: generic CEM
(:func:`cross_entropy_method`, used for the procedural door/pour controllers of :mod:`.control`) and PI^2 / CEM
on MountainCar (:func:`policy_search`).

Generic CEM: each iteration samples ``K`` parameter vectors ``theta_k ~ N(mu, diag(sigma^2))``, scores each by
``objective(theta_k, episode_seed)`` and refits ``mu`` and ``sigma`` to the best ``ceil(elite * K)`` (at least 2;
ties keep the earlier sample), ``sigma`` floored at ``min_std``. ``common_scenes=True`` gives the ``K`` episodes of
an iteration one episode seed (common random numbers, as in PEGASUS, Ng & Jordan 2000): the elite is then chosen by
the policies' effect, not by which scene each drew; a new seed every iteration.

MountainCar:

The paper trains its robot with PI^2 (11 iterations x 10 sampled trajectories). Here the policy is linear in
normalised state features and bang-bang: ``a = 2 (push right) if theta . [1, x~, v~] >= 0 else 0 (push left)``
with ``x~ = (x + 0.5) / 0.7`` and ``v~ = v / 0.07``; ``theta`` starts at 0 (always push right: never reaches the
flag). Each iteration samples ``K`` parameter vectors ``theta_k ~ N(mu, sigma^2 I)``, runs one episode each (random
start state) and updates ``mu``:

* ``pi2``: probability-weighted averaging, ``w_k ∝ exp(h (S_k - max S) / (max S - min S))`` with ``h = 10``
  (uniform when all returns tie), ``sigma`` decays by 0.9 per iteration;
* ``cem``: mean and std of the best 30 % (std floored at 0.05).

Returns ``S_k`` over a fixed horizon of 200 steps. ``true``: the environment's reward (-1 per step until the flag,
i.e. ``-steps``). ``learned``: the sum of the perceptual reward of the rendered frame at every step, the flag state
being absorbing (after reaching it the last frame's reward is collected until the horizon, so dawdling never pays).
Rendered MountainCar frames depend only on the car's x-position, so the learned reward is tabulated once on a grid
of real renders (:func:`tabulate_position_reward`) and interpolated linearly during search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

MIN_X, MAX_X, GOAL_X = -1.2, 0.6, 0.5
HORIZON = 200


def policy_action(theta: np.ndarray, state: np.ndarray) -> int:
    x, v = state
    return 2 if theta[0] + theta[1] * (x + 0.5) / 0.7 + theta[2] * v / 0.07 >= 0 else 0


def run_episode(env, theta: np.ndarray, seed: int, horizon: int = HORIZON) -> np.ndarray:
    """x-positions ``[horizon+1]`` of one episode (the flag state repeated after reaching it)."""
    state, _ = env.reset(seed=int(seed))
    xs = [float(state[0])]
    for _ in range(horizon):
        state, _, terminated, _, _ = env.step(policy_action(theta, state))
        xs.append(float(state[0]))
        if terminated:
            break
    xs += [xs[-1]] * (horizon + 1 - len(xs))
    return np.array(xs)


def reached(xs: np.ndarray) -> bool:
    return bool(xs.max() >= GOAL_X)


def true_return(xs: np.ndarray) -> float:
    """The environment's return: -1 per step until the flag (``-horizon`` when never reached)."""
    hit = np.flatnonzero(xs >= GOAL_X)
    return -float(hit[0]) if len(hit) else -float(len(xs) - 1)


@dataclass
class PositionReward:
    """A reward tabulated over x: ``values[i]`` is the reward of the frame with the car at ``grid[i]``."""

    grid: np.ndarray
    values: np.ndarray

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        """Linear interpolation between grid points."""
        return np.interp(xs, self.grid, self.values)

    def episode_return(self, xs: np.ndarray) -> float:
        return float(self(xs[1:]).sum())


def tabulate_position_reward(score: Callable[[np.ndarray], np.ndarray], size: tuple[int, int] = (64, 96),
                             points: int = 1801, env=None) -> PositionReward:
    """Render the car at ``points`` positions over [-1.2, 0.6] and score the frames with ``score``
    (uint8 ``[P,H,W,3]`` -> ``[P]``)."""
    from rewardtune.perceptual.demos import mountaincar_position_frames

    grid = np.linspace(MIN_X, MAX_X, points)
    return PositionReward(grid, np.asarray(score(mountaincar_position_frames(grid, size, env)), np.float64))


@dataclass
class CemResult:
    means: list[np.ndarray] = field(default_factory=list)    # mu after every iteration
    best_returns: list[float] = field(default_factory=list)  # best sampled return of every iteration


def cem_update(thetas: np.ndarray, returns: np.ndarray, elite: float,
               min_std: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """``[K,P]`` samples and ``[K]`` returns -> ``(mu [P], sigma [P])`` of the elite (module docstring)."""
    count = max(2, int(np.ceil(elite * len(thetas))))
    best = thetas[np.argsort(-np.asarray(returns), kind="stable")[:count]]
    return best.mean(0), np.maximum(best.std(0), min_std)


def cross_entropy_method(objective: Callable[[np.ndarray, int], float], mean: np.ndarray, std: np.ndarray,
                         seed: int, iterations: int = 8, samples: int = 12, elite: float = 0.25,
                         min_std: np.ndarray | float = 0.0, common_scenes: bool = False) -> CemResult:
    """Maximise ``objective(theta, episode_seed)`` by CEM from ``N(mean, diag(std^2))`` (module docstring)."""
    rng = np.random.default_rng(seed)
    mu, sigma = np.asarray(mean, np.float64).copy(), np.asarray(std, np.float64).copy()
    result = CemResult()
    for _ in range(iterations):
        thetas = mu + sigma * rng.standard_normal((samples, len(mu)))
        scenes = ([int(rng.integers(1 << 30))] * samples if common_scenes
                  else [int(rng.integers(1 << 30)) for _ in range(samples)])
        returns = np.array([objective(t, scene) for t, scene in zip(thetas, scenes)])
        mu, sigma = cem_update(thetas, returns, elite, min_std)
        result.means.append(mu.copy())
        result.best_returns.append(float(returns.max()))
    return result


@dataclass
class SearchResult:
    success_curve: list[float] = field(default_factory=list)   # per iteration: success rate of the mean policy
    theta: np.ndarray | None = None

    def iterations_to_success(self, threshold: float = 1.0) -> int | None:
        """First iteration (1-based) whose mean policy reaches the flag from every evaluation start."""
        for i, rate in enumerate(self.success_curve):
            if rate >= threshold:
                return i + 1
        return None


def policy_search(env, episode_return: Callable[[np.ndarray], float], seed: int, method: str = "pi2",
                  iterations: int = 15, samples: int = 10, sigma: float = 1.0, eval_starts: int = 10,
                  h: float = 10.0) -> SearchResult:
    """PI^2 or CEM (module docstring) from ``theta = 0``; after every update the mean policy is evaluated on
    ``eval_starts`` fixed held-out start states (success = the flag within 200 steps)."""
    if method not in ("pi2", "cem"):
        raise ValueError(f"unknown policy search {method!r}; use pi2 or cem")
    rng = np.random.default_rng(seed)
    mu, std = np.zeros(3), np.full(3, sigma)
    result = SearchResult()
    eval_seeds = [10_000 + i for i in range(eval_starts)]
    for _ in range(iterations):
        thetas = mu + std * rng.standard_normal((samples, 3))
        returns = np.array([episode_return(run_episode(env, t, int(rng.integers(1 << 30)))) for t in thetas])
        if method == "pi2":
            span = returns.max() - returns.min()
            weights = np.exp(h * (returns - returns.max()) / span) if span > 0 else np.ones(samples)
            mu = weights @ thetas / weights.sum()
            std = std * 0.9
        else:
            elite = thetas[np.argsort(-returns, kind="stable")[:max(2, int(0.3 * samples))]]
            mu, std = elite.mean(0), np.maximum(elite.std(0), 0.05)
        result.success_curve.append(float(np.mean([reached(run_episode(env, mu, s)) for s in eval_seeds])))
    result.theta = mu
    return result


__all__ = ["cross_entropy_method", "cem_update", "CemResult",
           "policy_search", "run_episode", "true_return", "reached", "PositionReward", "tabulate_position_reward",
           "SearchResult", "policy_action"]
