"""Where do discovered step boundaries fall against the true ones, per demo? Writes the `perceptual-diagnosis`
section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/perceptual_diagnose.py [--no-write] [--features pixels]   # ~10 s

For every task x step count and every step objective: per training demo (the same 10 seeds as
``scripts/eval_perceptual.py``), the true boundaries (first frame of each true step after the first), the found
ones and their signed offsets in frames (found - true), plus the mean absolute offset. The motion of the frames
(mean absolute change of the features from the previous frame) at the true boundaries shows the near-static
stretches there.

A control separates step discovery from the step classifiers: Table 2 (per-step reward >= 0.5 against the true
steps of the 10 held-out demos, seeds 1000-1009) for step models fitted on the discovered steps (``linear_ml``) and
on the true steps of the same training demos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardtune.perceptual.constants import OBJECTIVES  # noqa: E402
from rewardtune.perceptual.demos import TASKS, procedural_rollout  # noqa: E402
from rewardtune.perceptual.features import load_extractor  # noqa: E402
from rewardtune.perceptual.metrics import jaccard  # noqa: E402
from rewardtune.perceptual.reward import default_min_size, fit_step_models  # noqa: E402
from rewardtune.perceptual.steps import discover_steps, labels_from_splits  # noqa: E402
from rewardtune.utils.benchmarks import command_line, header, update_section  # noqa: E402


def true_boundaries(labels: np.ndarray, n: int) -> list[int]:
    return [int(np.flatnonzero(labels == k)[0]) for k in range(1, n)]


def motion_at(features, bounds: list[int]) -> float:
    """Mean over the boundaries of the feature motion in the 3 frames around each, relative to the demo's mean
    motion (1 = average speed; near 0 = static)."""
    motion = (features[1:] - features[:-1]).abs().mean(1).numpy()
    return float(np.mean([motion[max(0, b - 2):b + 1].mean() for b in bounds]) / motion.mean())


def diagnose(task: str, n: int, features, rollouts) -> list[str]:
    rows = []
    for objective in OBJECTIVES:
        offsets = []
        cells = []
        for feats, rollout in zip(features, rollouts):
            truth = true_boundaries(rollout.steps(task, n), n)
            found = discover_steps(feats, n, default_min_size(len(feats), n, 0.25), objective)
            offsets.append(np.subtract(found, truth))
            cells.append(f"{truth}->{found}")
        mean_abs = float(np.abs(offsets).mean())
        signed = " / ".join(f"{v:+.1f}" for v in np.mean(offsets, axis=0))
        rows.append(f"| {task}, {n} | {objective} | {mean_abs:.1f} | {signed} | {' '.join(cells)} |")
    return rows


def table2_true_vs_found(task: str, n: int, extractor, features, rollouts) -> str:
    """Table 2 mean Jaccard (%) of step models fitted on discovered (``linear_ml``) and on true training steps."""
    held = [procedural_rollout(task, 1000 + s) for s in range(10)]
    held_features = [extractor.embed(r.frames) for r in held]
    found = [labels_from_splits(discover_steps(f, n, default_min_size(len(f), n, 0.25), "linear_ml"), len(f))
             for f in features]
    cells = []
    for labels in (found, [r.steps(task, n) for r in rollouts]):
        inside = [torch.from_numpy(lab) >= 0 for lab in labels]  # true labels are -1 outside the task
        models = fit_step_models(torch.cat([f[k] for f, k in zip(features, inside)]),
                                 torch.cat([torch.from_numpy(lab)[k] for lab, k in zip(labels, inside)]), n)
        scores = [[jaccard(m[:, k], r.steps(task, n) == k) for k in range(n)]
                  for m, r in zip((models.rewards(f).numpy() >= 0.5 for f in held_features), held)]
        cells.append(f"{100 * np.mean(scores):.1f}")
    return f"| {task}, {n} | {' | '.join(cells)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--features", default="pixels", help="extractor name (default pixels, size 16)")
    args = parser.parse_args()
    extractor = load_extractor(args.features, {"size": 16} if args.features == "pixels" else {})
    rows, still, control = [], [], []
    for task in TASKS:
        rollouts = [procedural_rollout(task, s) for s in range(10)]
        if extractor.needs_training:
            extractor.fit([r.frames for r in rollouts])
        features = [extractor.embed(r.frames) for r in rollouts]
        for n in (2, 3):
            rows += diagnose(task, n, features, rollouts)
            control.append(table2_true_vs_found(task, n, extractor, features, rollouts))
        motion = np.mean([motion_at(f, true_boundaries(r.phase, 3)) for f, r in zip(features, rollouts)])
        still.append(f"{task} {motion:.2f}")
    text = "\n".join([
        "## Perceptual rewards: where discovered step boundaries fall", "", header(command_line()).rstrip(), "",
        f"Training demos of `scripts/eval_perceptual.py` (seeds 0-9), features `{args.features}`, auto min size. "
        "Per demo `true -> found` boundaries (frame index of the first frame of steps 2..n); offsets are found - "
        "true in frames, mean over demos per boundary. Feature motion in the frames at the true phase boundaries, "
        "relative to the demo's mean motion: " + ", ".join(still) + " (every phase eases in and out, so each true "
        "boundary sits in a near-static stretch).", "",
        "| task, steps | objective | mean abs offset | mean signed offset per boundary | per demo |",
        "| --- | --- | --- | --- | --- |", *rows, "",
        f"Table 2 (held-out demos, features `{args.features}`), step models fitted on the discovered vs the true "
        "training steps:", "", "| task, steps | discovered (`linear_ml`) | true steps |", "| --- | --- | --- |",
        *control, ""])
    if args.no_write:
        print(text)
    else:
        print(f"wrote {update_section('perceptual-diagnosis', text)}")


if __name__ == "__main__":
    main()
