"""Reward finetuning: PRDP and DDPO losses, advantages, and the online trainer (:mod:`rewardtune.finetune.run`).

Attributes load on first use, so ``rewardtune.finetune.config`` (the typed configs) imports without torch.
"""

import importlib

_EXPORTS = {"PerPromptStatTracker": "advantages", "batch_advantages": "advantages", "ddpo_loss": "losses",
            "prdp_loss": "losses", "prdp_loss_grouped": "losses"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewardtune.finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rewardtune.finetune.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
