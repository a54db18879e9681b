"""``rewardtune models``: the registered pipeline and reward names, from the torch-free
:mod:`rewardtune.models_table` (answers at once)."""

from __future__ import annotations

DESCRIPTION = "List the registered pipelines (for --model) and rewards (for --reward)."


def add_arguments(parser) -> None:
    """``models`` takes no arguments."""


def run(args) -> int:
    from rewardtune.models_table import PIPELINES, reward_names

    print("pipelines (--model):")
    width = max(map(len, PIPELINES))
    for name in sorted(PIPELINES):
        print(f"  {name:{width}s} {PIPELINES[name]}")
    print("rewards (--reward, combine as name:weight,name:weight):")
    print("  " + ", ".join(reward_names()))
    return 0


__all__ = ["DESCRIPTION", "add_arguments", "run"]
