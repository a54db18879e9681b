"""Imitation by RL on the procedural door and pour tasks: CEM over scripted-controller parameters with the true
reward and with a perceptual reward learned from the demos. Writes the `perceptual-rl` section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/perceptual_rl.py [--no-write] [--seeds 10] [--features pixels]
        [--scenes fresh common] [--n-features 32 128]        # ~10 min on one core

Policies (`rewardtune.perceptual.control`): door ``theta = (gx, gy, turn, pull)``, pour ``theta = (dx, dy,
tilt)``. CEM (`policy_search.cross_entropy_method`) starts from an imperfect demonstration (door ``(-3, 3, 0.6,
0.6)``, pour ``(-4, 4, 0.5)``, sigma ``(2, 2, 0.25[, 0.25])``: its mean policy never succeeds, like the paper's
PI^2 start from a kinesthetic demo that rarely works), ``iterations x samples`` episodes, elite 25 %, sigma floored
at 0.5 units / 0.1. Scenes: ``fresh`` = every sampled episode runs in its own random scene; ``common`` = the
12 episodes of an iteration share one random scene (common random numbers; a new scene each iteration), so the elite
is chosen by what the policies do rather than by which scene each drew. Returns: ``true`` = the sum over frames of
the true progress (dense: it includes the hand's or bottle's distance to the grip / pouring place); ``true, steps
only`` = the sum over frames of the completed thirds of true progress ``floor(3 p) / 3`` (what a perfect
step detector could pay: no signal inside a step); ``learned`` = the sum over the rendered frames of the learned
total reward (fitted once per task on the same 10 training demos as `scripts/eval_perceptual.py`). Success of a
seed = the success rate of its final mean policy over 10 held-out scenes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardtune.perceptual.control import DEMONSTRATED, episode  # noqa: E402
from rewardtune.perceptual.demos import TASKS, procedural_rollout  # noqa: E402
from rewardtune.perceptual.features import load_extractor  # noqa: E402
from rewardtune.perceptual.metrics import progress_spearman  # noqa: E402
from rewardtune.perceptual.policy_search import cross_entropy_method  # noqa: E402
from rewardtune.perceptual.reward import PerceptualReward  # noqa: E402
from rewardtune.utils.benchmarks import command_line, header, update_section  # noqa: E402

START = {"door": (np.array([-3.0, 3.0, 0.6, 0.6]), np.array([2.0, 2.0, 0.25, 0.25])),
         "pour": (np.array([-4.0, 4.0, 0.5]), np.array([2.0, 2.0, 0.25]))}
MIN_STD = {"door": np.array([0.5, 0.5, 0.1, 0.1]), "pour": np.array([0.5, 0.5, 0.1])}
EVAL_SCENES = [50_000 + i for i in range(10)]
TCN_OPTIONS = {"size": 32, "width": 8, "steps": 300, "batch": 32}


def success_rate(task: str, theta: np.ndarray) -> float:
    return float(np.mean([episode(task, theta, s, render=False).success for s in EVAL_SCENES]))


def learn_reward(task: str, args, n_features: int) -> PerceptualReward:
    options = TCN_OPTIONS if args.features == "time-contrastive" else ({"size": 16} if args.features == "pixels"
                                                                        else {})
    demos = [procedural_rollout(task, s).frames for s in range(10)]
    return PerceptualReward.fit(demos, args.steps, load_extractor(args.features, options),
                                objective=args.objective, combine=args.combine, n_features=n_features)


def true_objectives(task: str):
    def true(theta, scene):
        return float(episode(task, theta, scene, render=False).progress.sum())

    def true_steps(theta, scene):
        return float((np.floor(3 * episode(task, theta, scene, render=False).progress + 1e-9) / 3).sum())

    return {"true": true, "true, steps only": true_steps}


def learned_objective(task: str, reward: PerceptualReward):
    def learned(theta, scene):
        return float(reward.score_frames(episode(task, theta, scene).frames)[1].sum())

    return learned


def reward_check(task: str, reward: PerceptualReward) -> str:
    """Spearman of the learned total with true progress over controller episodes around the start."""
    rng = np.random.default_rng(7)
    mean, std = START[task]
    episodes = [episode(task, mean + std * rng.standard_normal(len(mean)), 60_000 + i) for i in range(20)]
    episodes.append(episode(task, DEMONSTRATED[task], 60_100))
    totals = [reward.score_frames(e.frames)[1].numpy() for e in episodes]
    return f"{progress_spearman(totals, [e.progress for e in episodes]):.2f}"


def search(task: str, objective, scenes: str, args) -> list[float]:
    """Success rate of CEM's final mean policy, one per seed."""
    return [success_rate(task, cross_entropy_method(objective, *START[task], seed, args.iterations, args.samples,
                                                    0.25, MIN_STD[task], common_scenes=scenes == "common").means[-1])
            for seed in range(args.seeds)]


def run(args, log) -> list[str]:
    """One row per (scene protocol, task, reward): the true rewards once per protocol, the learned reward for every
    ``--n-features``."""
    rows = []
    start_success = {task: success_rate(task, START[task][0]) for task in TASKS}

    def add(scenes, task, source, kept, rates, ratio="-", check="-"):
        rows.append("| " + " | ".join([
            scenes, task, source, kept, f"{100 * start_success[task]:.0f} %",
            f"**{100 * np.mean(rates):.0f} %**", " ".join(f"{100 * r:.0f}" for r in rates), ratio, check]) + " |")

    rewards = {(task, n): learn_reward(task, args, n) for task in TASKS for n in args.n_features}
    checks = {key: reward_check(key[0], reward) for key, reward in rewards.items()}
    for scenes in args.scenes:
        for task in TASKS:
            true_rates = {}
            for source, objective in true_objectives(task).items():
                true_rates[source] = search(task, objective, scenes, args)
                add(scenes, task, source, "-", true_rates[source])
            for n in args.n_features:
                start = time.perf_counter()
                rates = search(task, learned_objective(task, rewards[task, n]), scenes, args)
                log(f"{scenes} {task} learned ({n} features): {np.mean(rates):.2f} in "
                    f"{time.perf_counter() - start:.0f} s")
                truth = np.mean(true_rates["true"])
                ratio = f"{100 * np.mean(rates) / truth:.0f} %" if truth > 0 else "nan"
                add(scenes, task, "learned", str(n), rates, ratio, checks[task, n])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--features", default="pixels")
    parser.add_argument("--objective", default="linear_ml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--combine", default="expected")
    parser.add_argument("--n-features", type=int, nargs="+", default=[32, 128],
                        help="features kept per step (Eq. 1; the paper keeps 32); one learned row each")
    parser.add_argument("--scenes", choices=["fresh", "common"], nargs="+", default=["fresh", "common"],
                        help="per CEM iteration, every episode in its own random scene (fresh) or all in one "
                        "(common random numbers); one block of rows each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    rows = run(args, log)
    text = "\n".join([
        "## Perceptual rewards: imitation by RL on the procedural tasks", "", header(command_line()).rstrip(), "",
        f"Run time {(time.perf_counter() - start) / 60:.1f} min. {__doc__.split(chr(10) + chr(10), 2)[2].strip()}",
        "", f"Learned reward: `{args.features}` features, `{args.objective}` steps, {args.steps} steps, "
        f"`{args.combine}` combination. CEM: {args.iterations} iterations x {args.samples} episodes, "
        f"{args.seeds} seeds. Target: learned-reward success >= 90 % of the true-reward success.", "",
        "| scenes | task | reward | features kept per step | start policy success | final success (mean over seeds) "
        "| per seed (%) | learned / true | Spearman of the learned reward with progress on 21 controller episodes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""])
    if args.no_write:
        print(text)
    else:
        print(f"wrote {update_section('perceptual-rl', text)}")


if __name__ == "__main__":
    main()
