"""Small matplotlib helpers (Agg backend; imported lazily so the library never needs a display)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(jsonl: str | Path, keys: list[str], out: str | Path, title: str = "", x: str = "step",
                smooth: int = 1) -> Path:
    """Plot ``keys`` of a JSON-lines log against ``x`` (one panel per key) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r[x], r[key]) for r in records if key in r and r[key] is not None]
        if not pts:
            continue
        xs, ys = np.array(pts, dtype=float).T
        ax.plot(xs, ys, alpha=0.35 if smooth > 1 else 1.0)
        if smooth > 1 and len(ys) >= smooth:
            ax.plot(xs[smooth - 1:], np.convolve(ys, np.ones(smooth) / smooth, mode="valid"))
        ax.set_xlabel(x)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure to the PNG ``out`` atomically and close it."""
    import matplotlib.pyplot as plt

    from rewardtune.utils.io import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out)


def plot_against(xs, series: dict[str, list], out: str | Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    """One panel: each ``series`` (name -> values aligned with ``xs``, None for missing) against ``xs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)
