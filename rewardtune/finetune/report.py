"""What a finetuning run reports: per-epoch metrics records, ``metrics.jsonl``, the reward-curve plot, image grids
of fixed evaluation prompts and seeds with their scores (``eval.jsonl``), the held-out prompt reward, and the
closing before -> after comparison (``summary.json``, ``before_after.png``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardtune.diffusion.service import generate
from rewardtune.finetune.config import SamplingConfig
from rewardtune.utils.images import make_grid, save_png
from rewardtune.utils.io import atomic_write_json, atomic_write_text, dumps_json

logger = logging.getLogger(__name__)

HELDOUT_SEED = 1_000_000  # held-out prompt i is drawn from seed HELDOUT_SEED + i every epoch
CURVE_KEYS = ("reward_mean", "gold_reward", "heldout_reward", "heldout_gold")


@dataclass
class EvalSet:
    """Fixed evaluation prompts x seeds of the image grids (one row per prompt, one column per seed)."""

    prompts: list[str]
    seeds: list[int]


@dataclass
class Scorers:
    """What evaluations score images with: the trained ``reward`` and the optional ``gold`` reward (logged only)."""

    reward: Callable
    gold: Callable | None = None


def evaluate(pipe, scorers: Scorers, evals: EvalSet, heldout: list[str], sampling: SamplingConfig, out: Path,
             epoch: int, heldout_scores: dict[str, float] | None = None, write: bool = True) -> dict:
    """Sample the evaluation prompts (rows) x seeds (columns) into ``out/grids/epoch_NNNN.png``, score them with
    the trained reward and the gold reward, score the held-out prompts (or take ``heldout_scores`` already computed
    for this model, e.g. by the epoch's metrics), and append the scores to ``eval.jsonl``.

    Returns ``{epoch, eval_reward[, eval_gold][, heldout_reward, heldout_gold]}``. ``write=False`` (the other
    processes of an FSDP-sharded model) only runs the model's forward passes and returns ``{}``.
    """
    prompts = [p for p in evals.prompts for _ in evals.seeds]
    seeds = [s for _ in evals.prompts for s in evals.seeds]
    # independent draws: the training-time shared x_T (same_latent) would make a prompt's seeds one draw
    sampling = dataclasses.replace(sampling, same_latent=False)
    images = generate(pipe, evals.prompts, seeds, sampling, per_prompt=len(evals.seeds)).images
    if not write:
        if heldout and heldout_scores is None:
            score_heldout(pipe, scorers, heldout, sampling)
        return {}
    path = save_png(make_grid(images, ncol=len(evals.seeds)), Path(out) / "grids" / f"epoch_{epoch:04d}.png")
    logger.info("wrote %s", path)
    record = {"epoch": epoch, **_scores(scorers, images, prompts, "eval")}
    if heldout:
        record.update(heldout_scores or score_heldout(pipe, scorers, heldout, sampling))
    append_metrics(Path(out) / "eval.jsonl", record)
    return record


def _scores(scorers: Scorers, images: torch.Tensor, prompts: list[str], prefix: str) -> dict[str, float]:
    """Mean trained reward (``<prefix>_reward``) and gold reward (``<prefix>_gold``) of ``images``."""
    device = getattr(scorers.reward, "device", "cpu")
    scores = {f"{prefix}_reward": _finite_mean(scorers.reward(images.to(device), prompts))}
    if scorers.gold is not None:
        scores[f"{prefix}_gold"] = _finite_mean(scorers.gold(images.to(scorers.gold.device), prompts))
    return scores


def before_after(out: Path) -> dict:
    """The first and last ``eval.jsonl`` records as ``{"before": .., "after": ..}``, and ``before_after.png``: the
    epoch-0 grid and the last grid side by side (left: before, right: after)."""
    records = read_metrics(Path(out) / "eval.jsonl")
    if not records:
        return {}
    first, last = records[0], records[-1]
    grids = [Path(out) / "grids" / f"epoch_{r['epoch']:04d}.png" for r in (first, last)]
    if all(g.is_file() for g in grids):
        save_png(side_by_side(grids, [f"before (epoch {first['epoch']})", f"after (epoch {last['epoch']})"]),
                 Path(out) / "before_after.png")
    strip = lambda r: {k: v for k, v in r.items() if k != "epoch"}  # noqa: E731
    return {"before": strip(first), "after": strip(last), "epochs": [first["epoch"], last["epoch"]]}


def side_by_side(paths: list[Path], labels: list[str], gap: int = 12, label_height: int = 18):
    """The images at ``paths`` next to each other on white, each with its label above it."""
    from PIL import Image, ImageDraw

    images = [Image.open(p).convert("RGB") for p in paths]
    width = sum(im.width for im in images) + gap * (len(images) + 1)
    height = max(im.height for im in images) + label_height + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), gap
    for im, label in zip(images, labels):
        draw.text((x, 3), label, fill=(0, 0, 0))
        canvas.paste(im, (x, label_height))
        x += im.width + gap
    return canvas


def score_heldout(pipe, scorers: Scorers, prompts: list[str], sampling: SamplingConfig) -> dict[str, float]:
    """Mean reward (and gold reward) of one image per held-out prompt, drawn from fixed seeds."""
    images = generate(pipe, prompts, [HELDOUT_SEED + i for i in range(len(prompts))], sampling).images
    return _scores(scorers, images, prompts, "heldout")


def _finite_mean(values: torch.Tensor) -> float:
    values = values.detach().float().reshape(-1)
    values = values[torch.isfinite(values)]
    return values.mean().item() if len(values) else float("nan")


def _gathered(accelerator, values: torch.Tensor) -> torch.Tensor:
    """``[S]`` local values -> ``[P*S]`` from every process (the values themselves with one process)."""
    if accelerator.num_processes == 1:
        return values.detach().float().cpu()
    return accelerator.gather(values.detach().float().contiguous()).cpu()


def _reduced(accelerator, update: dict[str, float]) -> dict[str, float]:
    """Mean over processes of the update metrics (counts are summed)."""
    if accelerator.num_processes == 1:
        return dict(update)
    out = {}
    for key, value in update.items():
        tensor = torch.tensor(float(value), device=accelerator.device)
        out[key] = accelerator.reduce(tensor, "sum" if key in ("steps", "skipped", "nonfinite_targets")
                                      else "mean").item()
    return out


def epoch_metrics(epoch: int, accelerator, rollouts, gold: torch.Tensor | None, gold_components: dict,
                  update: dict[str, float], heldout: dict[str, float], seconds: dict[str, float]) -> dict:
    """One ``metrics.jsonl`` record (``epoch`` counts completed epochs, from 1).

    Keys: reward_mean/std (finite rewards), nonfinite_rewards, reward_components {name: mean}, gold_reward and
    gold_components (with a gold reward), heldout_reward/heldout_gold (with held-out prompts), the update's loss,
    clipfrac, approx_kl, grad_norm, steps, skipped, nonfinite_targets, samples_per_s and seconds_{sampling,
    reward,update}.
    """
    rewards = _gathered(accelerator, rollouts.rewards)
    finite = rewards[torch.isfinite(rewards)]
    record = {"epoch": epoch, "reward_mean": finite.mean().item() if len(finite) else float("nan"),
              "reward_std": finite.std(unbiased=False).item() if len(finite) else float("nan"),
              "nonfinite_rewards": int(len(rewards) - len(finite)),
              "reward_components": {k: _finite_mean(_gathered(accelerator, v))
                                    for k, v in rollouts.reward_components.items()}}
    if gold is not None:
        record["gold_reward"] = _finite_mean(_gathered(accelerator, gold))
        record["gold_components"] = {k: _finite_mean(_gathered(accelerator, v)) for k, v in gold_components.items()}
    record.update(heldout)
    record.update(_reduced(accelerator, update))
    total = sum(seconds.values())
    record["samples_per_s"] = len(rewards) / total if total > 0 else float("nan")
    record.update({f"seconds_{k}": v for k, v in seconds.items()})
    if record["nonfinite_rewards"]:
        logger.warning("epoch %d: %d non-finite rewards (left out of the statistics)", epoch,
                       record["nonfinite_rewards"])
    logger.info("epoch %d: reward %.4g +- %.3g, loss %.4g", epoch, record["reward_mean"], record["reward_std"],
                record["loss"])
    return record


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(path: str | Path, record: dict) -> Path:
    """Add ``record`` to the JSON-lines log, atomically; lines of this or later epochs (left by a run that
    crashed after logging but before its checkpoint) are dropped first."""
    kept = [r for r in read_metrics(path) if r.get("epoch", 0) < record["epoch"]]
    lines = [dumps_json(r) for r in kept + [record]]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot_reward_curve(out: str | Path) -> Path | None:
    """``out/reward_curve.png``: the reward curves present in ``out/metrics.jsonl`` against the epoch."""
    from rewardtune.utils.plots import plot_curves

    records = read_metrics(Path(out) / "metrics.jsonl")
    keys = [k for k in CURVE_KEYS if any(r.get(k) is not None for r in records)]
    if not keys:
        return None
    return plot_curves(Path(out) / "metrics.jsonl", keys, Path(out) / "reward_curve.png", x="epoch", smooth=5,
                       title="reward per epoch (held-out: fixed prompts and seeds; training: faint, 5-epoch mean)")


def summed_kl(records: list[dict]) -> list[float]:
    """The policy's drift after each epoch record: ``sum approx_kl * steps`` over that and every earlier epoch (the
    per-step approximate KL to the sampling snapshot summed over all gradient steps; a missing value counts 0)."""
    return list(itertools.accumulate((r.get("approx_kl") or 0.0) * (r.get("steps") or 0) for r in records))


def plot_overoptimisation(out: str | Path) -> Path | None:
    """``out/kl_curve.png``: gain of the proxy (trained) and the gold reward over epoch 1, against the drift of the
    policy, measured as the per-step approximate KL to the sampling snapshot summed over all gradient steps
    (``sum approx_kl * steps``): where the proxy keeps rising while gold turns down, the proxy is being hacked."""
    from rewardtune.utils.plots import plot_against

    records = read_metrics(Path(out) / "metrics.jsonl")
    if len(records) < 2:
        return None
    drift = summed_kl(records)
    series = {}
    for key, label in (("reward_mean", "proxy (training)"), ("heldout_reward", "proxy (held-out)"),
                       ("gold_reward", "gold (training)"), ("heldout_gold", "gold (held-out)")):
        first = records[0].get(key)
        if first is not None:
            series[label] = [None if r.get(key) is None else r[key] - first for r in records]
    gold = {k: v for k, v in series.items() if k.startswith("gold")}
    proxy = {k: v for k, v in series.items() if k.startswith("proxy")}
    if not gold:
        return plot_against(drift, proxy, Path(out) / "kl_curve.png", "summed approximate KL", "gain over epoch 1")
    scale = max(max(abs(y) for y in ys if y is not None) for ys in proxy.values()) or 1.0
    gscale = max(max(abs(y) for y in ys if y is not None) for ys in gold.values()) or 1.0
    scaled = {f"{k} x{gscale / scale:.2g}": [None if y is None else y * gscale / scale for y in v]
              for k, v in proxy.items()}
    return plot_against(drift, {**scaled, **gold}, Path(out) / "kl_curve.png", "summed approximate KL",
                        "gain over epoch 1", title="over-optimisation (proxy rescaled to gold's range)")


def summarise_run(record: dict, out: Path, final: Path, start: int, epochs: int, seconds: float) -> dict:
    """The run's summary (also written to ``out/summary.json``): the last epoch's headline metrics, the fixed
    evaluation's before -> after scores (``eval_*`` on the grid prompts, ``heldout_*`` on unseen prompts), the
    wall time and where things are."""
    keys = ("reward_mean", "gold_reward", "heldout_reward", "loss", "skipped")
    summary = {k: record[k] for k in keys if k in record and record[k] is not None}
    summary.update(before_after(out))
    summary.update(epochs_run=epochs - start, seconds=seconds, output_dir=str(out), final=str(final),
                   comparison=str(out / "before_after.png"))
    summary = _rounded(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value
