"""``rewardtune demo``: the embedded default end to end on 2 CPU cores.

Samples the shapes world's small prompt set from ``shapes-tiny`` and scores every image with the oracle's gold
reward (fidelity and the hidden taste rule). Writes the sample folder plus ``scores.csv`` and ``summary.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rewardtune.sample import SampleConfig, run_sample
from rewardtune.utils.io import atomic_write_json, write_csv

logger = logging.getLogger(__name__)


def _default_sample() -> SampleConfig:
    from rewardtune.shapes.captions import small_prompt_set

    return SampleConfig(prompts=small_prompt_set(), num_images=4, out="outputs/demo")


@dataclass
class DemoConfig:
    sample: SampleConfig = field(default_factory=_default_sample)


def run_demo(cfg: DemoConfig) -> dict:
    import json

    import torch

    from rewardtune.shapes.oracle import gold_scores
    from rewardtune.utils.images import load_images

    out = run_sample(cfg.sample)
    rows = json.loads((out / "manifest.json").read_text())
    images = load_images([out / r["file"] for r in rows])
    scores = gold_scores(images, [r["prompt"] for r in rows])
    for i, row in enumerate(rows):
        row.update({k: round(float(v[i]), 4) for k, v in scores.items()})
    write_csv(out / "scores.csv", rows)
    summary = {k: round(float(torch.mean(v)), 4) for k, v in scores.items()}
    summary["images"] = len(rows)
    atomic_write_json(out / "summary.json", summary)
    logger.info("gold reward over %d images: %s", len(rows), summary)
    return summary
