"""Why does the learned reward track progress worse on door than on pour? Writes the `perceptual-spearman` section
of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/perceptual_spearman.py [--no-write]      # ~3 min

Same demos as ``scripts/eval_perceptual.py``: 10 training demos (seeds 0-9), held-out expert / failed / random
rollouts (seeds 2000-2009), pooled Spearman of a total reward with true progress (``metrics.progress_spearman``).

1. **The metric's ceiling for a reward that sees only the picture.** Random rollouts have progress 0 in every
   frame, but a wandering hand (door) or bottle (pour) that happens to sit on the expert's path looks exactly like an
   expert frame of the first phase. The best any appearance-only reward can do is pay such frames the expert's
   progress at that point of the path (within ``tol`` px) and every other wandering frame less than all task frames:
   that reward's Spearman is the ceiling.
2. **Per kind:** the learned reward (``gaussian_ml``, 3 steps, ``expected``) within expert and within failed rollouts,
   the pooled value, and the mean total of each kind.
3. **Can the features tell a wandering frame from a task frame?** AUC of the distance to the nearest training-demo
   frame (standardised features, median over demos): P(random frame farther than an expert frame).
4. **A progress estimate by alignment:** per training demo the normalised time of its nearest frame, median over
   the demos (no steps, no classifiers), as a total reward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardtune.perceptual import demos  # noqa: E402
from rewardtune.perceptual.demos import KINDS, procedural_rollout  # noqa: E402
from rewardtune.perceptual.features import load_extractor  # noqa: E402
from rewardtune.perceptual.metrics import progress_spearman  # noqa: E402
from rewardtune.perceptual.reward import PerceptualReward, combine_steps  # noqa: E402
from rewardtune.utils.benchmarks import command_line, header, update_section  # noqa: E402

EXTRACTORS = {"pixels": {}, "time-contrastive": {"size": 32, "width": 8, "steps": 300, "batch": 32}}
TOLERANCES = (0.5, 1.5, 3.0)


def wandering_positions(task: str, seed: int, size: int = 64) -> tuple[dict, np.ndarray]:
    """The style and the ``[T,2]`` hand/bottle positions of ``procedural_rollout(task, seed, "random")`` (its random
    draws replayed in the same order)."""
    rng = np.random.default_rng([seed, demos.TASKS.index(task)])
    style = demos._style(rng, size)
    length = len(demos._expert_progress(rng, (10, 23)))
    walk = np.cumsum(rng.normal(0, 2.5, (length, 2)), 0) + rng.uniform(8, 56, 2)
    return style, np.clip(walk, 4, 60) * size / 64


def first_phase_path(task: str, style: dict, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Progress values ``[K]`` in the first phase and the expert's hand/bottle position ``[K,2]`` at each."""
    s, progress = size / 64, np.linspace(0, 1 / 3, 400)
    u = demos._smooth(3 * progress)[:, None]
    if task == "door":
        start, end = demos.hand_start(style, s), demos.door_handle(style, s, 0.0, 0.0)[1] + [0, 3 * s]
    else:
        start, end, _ = demos.bottle_places(style, s)
    return progress, start + (end - start) * u


def appearance_ceiling(task: str, held: dict, tol: float) -> tuple[float, float]:
    """(Spearman of the best appearance-only reward, fraction of wandering frames on the expert path)."""
    totals, on_path = [r.progress for k in ("expert", "failed") for r in held[k]], []
    for rollout, seed in zip(held["random"], range(2000, 2000 + len(held["random"]))):
        style, positions = wandering_positions(task, seed)
        progress, path = first_phase_path(task, style)
        distance = np.linalg.norm(positions[:, None] - path[None], axis=-1)
        nearest = distance.argmin(1)
        near = distance[np.arange(len(positions)), nearest] <= tol
        totals.append(np.where(near, progress[nearest], -1.0))
        on_path.append(near)
    truth = [r.progress for k in KINDS for r in held[k]]
    return progress_spearman(totals, truth), float(np.concatenate(on_path).mean())


def auc(higher: np.ndarray, lower: np.ndarray) -> float:
    """P(a draw of ``higher`` > a draw of ``lower``), ties counting half."""
    a, b = np.asarray(higher)[:, None], np.asarray(lower)[None]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def alignment(train_features: list[torch.Tensor], features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of ``features [T,D]``: median over training demos of (normalised time of the nearest frame, its
    distance), in features standardised over all training frames."""
    bank = torch.cat(train_features)
    center, scale = bank.mean(0), bank.std(0) + 1e-6
    z = (features - center) / scale
    times, dists = [], []
    for demo in train_features:
        d = torch.cdist(z, (demo - center) / scale)
        dists.append(d.min(1).values)
        times.append(d.argmin(1).float() / (len(demo) - 1))
    return torch.stack(times, 1).median(1).values.numpy(), torch.stack(dists, 1).median(1).values.numpy()


def rows_for(task: str) -> tuple[list[str], list[str]]:
    train = [procedural_rollout(task, s) for s in range(10)]
    held = {k: [procedural_rollout(task, 2000 + s, k) for s in range(10)] for k in KINDS}
    truth = [r.progress for k in KINDS for r in held[k]]
    ceiling = [appearance_ceiling(task, held, tol) for tol in TOLERANCES]
    ceiling_row = f"| {task} | " + " | ".join(f"{sp:.3f} ({100 * frac:.1f} %)" for sp, frac in ceiling) + " |"
    rows = []
    for name, options in EXTRACTORS.items():
        extractor = load_extractor(name, options)
        if extractor.needs_training:
            extractor.fit([r.frames for r in train])
        train_features = [extractor.embed(r.frames) for r in train]
        held_features = {k: [extractor.embed(r.frames) for r in v] for k, v in held.items()}
        reward = PerceptualReward.fit_features(train_features, 3, extractor, objective="gaussian_ml")
        totals = {k: [combine_steps(reward.score_features(f)[0], "expected").numpy() for f in v]
                  for k, v in held_features.items()}
        within = {k: progress_spearman(totals[k], [r.progress for r in held[k]]) for k in ("expert", "failed")}
        means = " / ".join(f"{np.concatenate(totals[k]).mean():.2f}" for k in KINDS)
        aligned = {k: [alignment(train_features, f) for f in v] for k, v in held_features.items()}
        far = {k: np.concatenate([a[1] for a in v]) for k, v in aligned.items()}
        rows.append(f"| {task} | {name} | {progress_spearman(sum(totals.values(), []), truth):.2f} | "
                    f"{within['expert']:.2f} | {within['failed']:.2f} | {means} | "
                    f"{auc(far['random'], far['expert']):.2f} | {auc(far['random'], far['failed']):.2f} | "
                    f"{progress_spearman([a[0] for v in aligned.values() for a in v], truth):.2f} |")
        print(rows[-1], flush=True)
    return [ceiling_row], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    torch.manual_seed(0)
    ceilings, rows = [], []
    for task in ("door", "pour"):
        c, r = rows_for(task)
        ceilings += c
        rows += r
    text = ("## Perceptual rewards: why door's reward tracks progress less well\n\n" + header(command_line())
            + __doc__.split("\n\n", 2)[2].strip() + "\n\nCeiling (1): Spearman of the best appearance-only reward "
            "(fraction of wandering frames on the expert path) at each tolerance:\n\n| task | "
            + " | ".join(f"tol {t} px" for t in TOLERANCES) + " |\n|---|" + "---|" * len(TOLERANCES) + "\n"
            + "\n".join(ceilings) + "\n\n(2)-(4) per extractor:\n\n| task | extractor | Spearman, pooled | within "
            "expert | within failed | mean total (expert / failed / random) | AUC random farther than expert | "
            "AUC random farther than failed | alignment total, pooled Spearman |\n|---|---|---|---|---|---|---|---|"
            "---|\n" + "\n".join(rows) + "\n")
    print(text)
    if not args.no_write:
        print(f"wrote {update_section('perceptual-spearman', text)}")


if __name__ == "__main__":
    main()
