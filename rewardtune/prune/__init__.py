"""UNet pruning: structured channels (Diff-Pruning on Torch-Pruning), BK-SDM block removal, layer tickets, global
magnitude, lottery-ticket, GraNet and BiP masks, 2:4 semi-structured sparsity, PQ-index analysis, distillation
recovery (or training from scratch), and save/load of pruned pipelines.

    from rewardtune.prune import prune_unet, summarize
    small = prune_unet(pipe.unet, method="structured", ratio=0.5, importance="magnitude")
    print(summarize(pipe.unet, small))   # achieved parameter and MAC ratios

Only ``structured``, ``blocks`` and ``layers`` make dense kernels faster; the mask methods zero weights in place
(``semi_structured`` runs on sparse kernels only on CUDA GPUs of compute capability >= 8.0).
Each method and importance is a registry entry declaring its options and needs (:mod:`rewardtune.prune.registry`).
The names below load on first use (torch is imported then), so ``rewardtune.prune.config`` and ``prune --help``
stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prune_unet": "api", "summarize": "api", "method_options": "api", "METHODS": "registry",
    "IMPORTANCES": "registry", "PruneMethod": "registry", "Importance": "registry", "PruneContext": "registry",
    "get_record": "common", "masks_of": "masks", "pq_index": "pqindex", "sap_ratio": "pqindex",
    "sparsity_report": "pqindex",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["prune_unet", "summarize", "method_options", "METHODS", "IMPORTANCES", "PruneMethod", "Importance",
           "PruneContext", "get_record", "pq_index", "sap_ratio", "sparsity_report", "masks_of"]
