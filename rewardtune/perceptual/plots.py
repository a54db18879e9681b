"""Plots of perceptual rewards over time and of the demos' discovered step boundaries (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewardtune.utils.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rewards(per_step: np.ndarray, total: np.ndarray, out: str | Path, title: str = "") -> Path:
    """Per-step rewards ``[T,S]`` (top) and the combined reward ``[T]`` (bottom) against the frame index."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
    for k in range(per_step.shape[1]):
        top.plot(per_step[:, k], label=f"step {k + 1}")
    top.axhline(0.5, color="grey", lw=0.8, ls=":")
    top.set_ylim(-0.05, 1.05)
    top.set_ylabel("step reward")
    top.legend(loc="upper left", fontsize=8)
    bottom.plot(total, color="black")
    bottom.set_ylabel("total reward")
    bottom.set_xlabel("frame")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, plt, out)


def plot_boundaries(demos: list[dict], out: str | Path, title: str = "discovered steps of the demos") -> Path:
    """One bar per demo, coloured by discovered step (``demos``: ``{"name", "length", "splits"}`` each)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * len(demos)))
    colours = plt.get_cmap("tab10")
    for row, demo in enumerate(demos):
        bounds = [0, *demo["splits"], demo["length"]]
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            ax.barh(row, b - a, left=a, color=colours(k % 10), edgecolor="white",
                    label=f"step {k + 1}" if row == 0 else None)
    ax.set_yticks(range(len(demos)), [d["name"] for d in demos], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("frame")
    ax.legend(loc="lower right", fontsize=7, ncol=4)
    ax.set_title(title)
    return _save(fig, plt, out)


def _save(fig, plt, out: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out)


__all__ = ["plot_rewards", "plot_boundaries"]
