"""Imitation by RL on the procedural door and pour tasks: CEM over scripted-controller parameters with the true
reward and with a perceptual reward learned from the demos. Writes the `perceptual-rl` section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/perceptual_rl.py [--no-write] [--seeds 10] [--features pixels]   # ~15 min

Policies (`rewardtune.perceptual.control`): door ``theta = (gx, gy, turn, pull)``, pour ``theta = (dx, dy,
tilt)``. CEM (`policy_search.cross_entropy_method`) starts from an imperfect demonstration (door ``(-3, 3, 0.6,
0.6)``, pour ``(-4, 4, 0.5)``, sigma ``(2, 2, 0.25[, 0.25])``: its mean policy never succeeds, like the paper's
PI^2 start from a kinesthetic demo that rarely works), ``iterations x samples`` episodes, elite 25 %, sigma floored
at 0.5 units / 0.1. Every sampled episode runs in a fresh random scene. Returns: ``true`` = the sum over frames of
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


def learn_reward(task: str, args) -> PerceptualReward:
    options = TCN_OPTIONS if args.features == "time-contrastive" else ({"size": 16} if args.features == "pixels"
                                                                        else {})
    demos = [procedural_rollout(task, s).frames for s in range(10)]
    return PerceptualReward.fit(demos, args.steps, load_extractor(args.features, options),
                                objective=args.objective, combine=args.combine)


def objectives(task: str, reward: PerceptualReward):
    def true(theta, scene):
        return float(episode(task, theta, scene, render=False).progress.sum())

    def true_steps(theta, scene):
        return float((np.floor(3 * episode(task, theta, scene, render=False).progress + 1e-9) / 3).sum())

    def learned(theta, scene):
        return float(reward.score_frames(episode(task, theta, scene).frames)[1].sum())

    return {"true": true, "true, steps only": true_steps, "learned": learned}


def reward_check(task: str, reward: PerceptualReward) -> str:
    """Spearman of the learned total with true progress over controller episodes around the start."""
    rng = np.random.default_rng(7)
    mean, std = START[task]
    episodes = [episode(task, mean + std * rng.standard_normal(len(mean)), 60_000 + i) for i in range(20)]
    episodes.append(episode(task, DEMONSTRATED[task], 60_100))
    totals = [reward.score_frames(e.frames)[1].numpy() for e in episodes]
    return f"{progress_spearman(totals, [e.progress for e in episodes]):.2f}"


def run(args, log) -> list[str]:
    rows = []
    for task in TASKS:
        reward = learn_reward(task, args)
        check = reward_check(task, reward)
        rates = {}
        for source, objective in objectives(task, reward).items():
            start = time.perf_counter()
            rates[source] = [success_rate(task, cross_entropy_method(
                objective, *START[task], seed, args.iterations, args.samples, 0.25, MIN_STD[task]).means[-1])
                for seed in range(args.seeds)]
            log(f"{task} {source}: {np.mean(rates[source]):.2f} in {time.perf_counter() - start:.0f} s")
        ratio = np.mean(rates["learned"]) / np.mean(rates["true"]) if np.mean(rates["true"]) > 0 else float("nan")
        for source in rates:
            rows.append("| " + " | ".join([
                task, source, f"{100 * success_rate(task, START[task][0]):.0f} %",
                f"**{100 * np.mean(rates[source]):.0f} %**", " ".join(f"{100 * r:.0f}" for r in rates[source]),
                f"{100 * ratio:.0f} %" if source == "learned" else "-", check if source == "learned" else "-"]) + " |")
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
        "| task | reward | start policy success | final success (mean over seeds) | per seed (%) | learned / true "
        "| Spearman of the learned reward with progress on 21 controller episodes |",
        "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""])
    if args.no_write:
        print(text)
    else:
        print(f"wrote {update_section('perceptual-rl', text)}")


if __name__ == "__main__":
    main()
