"""Plots of step values, decisive steps and implicit step rewards (matplotlib, Agg; imported on first use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, out: str | Path) -> Path:
    out = Path(out)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_values(value: np.ndarray, se: np.ndarray, x0_reward: np.ndarray | None, out: str | Path,
                title: str = "") -> Path:
    """``V(x_j)`` ``[N,T+1]`` per trajectory (thin) and their mean with its SE band (top); the x0 step reward
    ``[N,T]`` (bottom, when given), against the branch index / step."""
    plt = _pyplot()
    rows = 2 if x0_reward is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.6 * rows + 0.6), squeeze=False)
    top = axes[0, 0]
    j = np.arange(value.shape[1])
    for n in range(value.shape[0]):
        top.errorbar(j, value[n], yerr=se[n], lw=0.7, alpha=0.35, capsize=0)
    mean = value.mean(0)
    band = value.std(0) / max(value.shape[0], 1) ** 0.5
    top.plot(j, mean, color="black", lw=2, label="mean over trajectories")
    top.fill_between(j, mean - band, mean + band, color="black", alpha=0.15)
    top.set_xlabel("branch index j (denoising steps taken; j = T is the final image)")
    top.set_ylabel("V(x_j) (Monte Carlo, +- SE)")
    top.legend(fontsize=8)
    if x0_reward is not None:
        bottom = axes[1, 0]
        steps = np.arange(x0_reward.shape[1])
        for n in range(x0_reward.shape[0]):
            bottom.plot(steps, x0_reward[n], lw=0.7, alpha=0.35)
        bottom.plot(steps, x0_reward.mean(0), color="black", lw=2)
        bottom.set_xlabel("step t (x_t's predicted clean image)")
        bottom.set_ylabel("reward of decoded x0")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, plt, out)


def plot_decisive(indices: dict[str, np.ndarray], steps: int, out: str | Path, title: str = "") -> Path:
    """One histogram per attribute of decisive branch indices (``indices[attribute] [N]`` in 0..T)."""
    plt = _pyplot()
    names = list(indices)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.0), squeeze=False, sharey=True)
    bins = np.arange(steps + 2) - 0.5
    for ax, name in zip(axes[0], names):
        ax.hist(indices[name], bins=bins, color="tab:blue")
        ax.set_title(name)
        ax.set_xlabel("decisive index j* (0 = the noise)")
        ax.set_xlim(-0.5, steps + 0.5)
    axes[0, 0].set_ylabel("trajectories")
    fig.suptitle(title)
    return _save(fig, plt, out)


def plot_implicit(rewards: np.ndarray, out: str | Path, title: str = "") -> Path:
    """Implicit step rewards ``[N,T]``: the mean per step with its SE (bars), each trajectory's as dots."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    steps = np.arange(rewards.shape[1])
    se = rewards.std(0) / max(rewards.shape[0], 1) ** 0.5
    ax.bar(steps, rewards.mean(0), yerr=se, color="tab:orange", alpha=0.8, capsize=2)
    for n in range(rewards.shape[0]):
        ax.plot(steps, rewards[n], ".", color="black", alpha=0.3, ms=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("step t (sampling order)")
    ax.set_ylabel("beta * log pi_finetuned / pi_base")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, plt, out)


__all__ = ["plot_decisive", "plot_implicit", "plot_values"]
