"""Where a run's numbers go besides ``metrics.jsonl``: the progress bar, the curve plots, and accelerate's
trackers (TensorBoard or Weights & Biases, ``log_with``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rewardtune.finetune.config import RunConfig
from rewardtune.finetune.report import append_metrics, plot_overoptimisation, plot_reward_curve, read_metrics

TRACKER_PROJECT = "rewardtune"  # accelerate's run name: TensorBoard writes to output_dir/rewardtune


def tracker_name(cfg: RunConfig) -> str | None:
    """The accelerate tracker of ``cfg.log_with`` (None for null or ``none``)."""
    return None if cfg.log_with in (None, "none") else cfg.log_with


def tracker_scalars(record: dict, prefix: str = "") -> dict[str, float | int]:
    """The numeric scalars of a metrics record, nested dicts flattened as ``KEY/NAME``; ``epoch`` (the step),
    None and non-numbers left out."""
    scalars: dict[str, float | int] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            scalars.update(tracker_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            scalars[prefix + key] = value
    return scalars


def tracker_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """The run's config as flat ``{dotted key: scalar}`` (lists as their text, None left out) for hyperparameter
    tables."""
    from rewardtune.config import to_dict
    from rewardtune.utils.runfolder import flatten

    flat = {}
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif isinstance(value, (list, tuple)):
            flat[key] = str(list(value))
    return flat


class Trackers:
    """accelerate's trackers of a run (``log_with``; a no-op without one): the flat config at the start, the
    epoch metrics and evaluation scores at step = epoch, and the evaluation grids."""

    def __init__(self, cfg: RunConfig, accelerator, out: Path) -> None:
        self.cfg, self.accelerator, self.out = cfg, accelerator, out
        self.name = tracker_name(cfg)

    def log(self, record: dict, step: int, prefix: str = "") -> None:
        """The numeric scalars of ``record`` (see :func:`tracker_scalars`) at ``step``."""
        if self.name is not None:
            self.accelerator.log(tracker_scalars(record, prefix), step=step)

    def start(self, start: int) -> None:
        """``accelerator.init_trackers`` on the main process with the flat config. A resumed run appends to the
        same TensorBoard folder; events its crashed predecessor logged after the checkpoint are purged."""
        name = self.name
        if name is None or not self.accelerator.is_main_process:
            return
        init = {"tensorboard": {"purge_step": start + 1}} if start else {}
        if name == "wandb":
            init = {"wandb": {"dir": str(self.out), "name": self.out.name}}
        self.accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(self.cfg), init_kwargs=init)

    def stop(self, failed: bool = False) -> None:
        """Close the trackers: ``accelerator.end_training()`` after a finished run; after a failure only the
        trackers are closed (their files flushed), leaving the process group to the error."""
        if self.name is None:
            return
        if failed:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            return
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def grid(self, path: Path, epoch: int) -> None:
        """The evaluation grid image of ``epoch`` to the tracker (TensorBoard ``add_image``, ``wandb.Image``)."""
        from PIL import Image

        if self.name is None:
            return
        with Image.open(path) as image:
            grid = image.convert("RGB")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("eval/grid", np.asarray(grid), global_step=epoch, dataformats="HWC")
                tracker.writer.flush()
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"eval/grid": [grid]}, step=epoch)


class MetricsLog:
    """The epochs to run with a progress bar (main process); each record goes to ``metrics.jsonl`` and
    the curves (``reward_curve.png``, ``kl_curve.png``), its numeric scalars to the ``trackers`` and its rewards
    to the bar."""

    def __init__(self, out: Path, main: bool, epochs: range, algorithm: str, trackers: Trackers) -> None:
        from tqdm.auto import tqdm

        self.out, self.main, self.trackers = out, main, trackers
        self.bar = tqdm(epochs, desc=f"{algorithm} epochs", unit="epoch", disable=not main, initial=epochs.start,
                        total=epochs.stop)

    def __iter__(self):
        return iter(self.bar)

    def last(self, epoch: int) -> dict:
        """The logged record of ``epoch`` ({} when there is none)."""
        records = read_metrics(self.out / "metrics.jsonl") if self.main else []
        return next((r for r in records if r.get("epoch") == epoch), {})

    def append(self, record: dict) -> None:
        if not self.main:
            return
        append_metrics(self.out / "metrics.jsonl", record)
        plot_reward_curve(self.out)
        plot_overoptimisation(self.out)
        self.trackers.log(record, record["epoch"])
        keys = {"reward": "reward_mean", "gold": "gold_reward", "heldout": "heldout_reward"}
        self.bar.set_postfix({k: f"{record[v]:.3g}" for k, v in keys.items()
                              if isinstance(record.get(v), float) and math.isfinite(record[v])})
