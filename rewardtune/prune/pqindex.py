"""PQ Index and the SAP adaptive pruning rule (Diao et al., ICLR 2023): how far each layer can be pruned.

``I_{p,q}(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q`` for ``0 < p < q``, ``d`` the number of (unmasked) entries.
``I = 0`` for a vector of equal magnitudes, ``I -> 1 - d^(1/q-1/p)`` for a one-hot vector: larger is sparser, more
compressible. SAP keeps ``r = d (1+eta)^(-q/(q-p)) (1-I)^(qp/(q-p))`` weights and suggests the prune ratio
``c = min(gamma (1 - r/d), beta)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewardtune.prune.masks import prunable_weights


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0, mask: torch.Tensor | None = None) -> float:
    """PQ Index of ``w`` (any shape; only entries where ``mask`` is True count)."""
    if not 0 < p < q:
        raise ValueError(f"PQ index needs 0 < p < q, got p={p}, q={q}")
    v = w.detach().double().flatten().abs()
    if mask is not None:
        v = v[mask.flatten()]
    d = v.numel()
    norm_q = v.pow(q).sum().pow(1 / q)
    if d == 0 or norm_q == 0:
        return 0.0
    norm_p = v.pow(p).sum().pow(1 / p)
    return float(1 - d ** (1 / q - 1 / p) * norm_p / norm_q)


def sap_ratio(index: float, d: int, p: float = 0.5, q: float = 1.0, eta: float = 0.001, gamma: float = 1.2,
              beta: float = 0.9) -> float:
    """SAP's suggested prune ratio ``min(gamma (1 - r/d), beta)`` for a layer of ``d`` weights with PQ ``index``."""
    kept = d * (1 + eta) ** (-q / (q - p)) * (1 - index) ** (q * p / (q - p))
    return float(min(gamma * (1 - kept / d), beta))


@dataclass
class LayerSparsity:
    name: str
    size: int
    pq_index: float
    suggested_ratio: float


def sparsity_report(unet: nn.Module, p: float = 0.5, q: float = 1.0, **sap_options) -> list[LayerSparsity]:
    """Per Conv/Linear layer PQ Index and SAP suggestion, plus a ``<global>`` row over all weights (zeros of a
    masked model are left out)."""
    rows, flat = [], []
    for name, w in prunable_weights(unet).items():
        mask = w != 0
        index = pq_index(w, p, q, mask)
        rows.append(LayerSparsity(name, int(mask.sum()), index, sap_ratio(index, int(mask.sum()), p, q,
                                                                             **sap_options)))
        flat.append(w.detach().flatten()[mask.flatten()])
    allw = torch.cat(flat)
    index = pq_index(allw, p, q)
    rows.append(LayerSparsity("<global>", allw.numel(), index, sap_ratio(index, allw.numel(), p, q, **sap_options)))
    return rows


def format_report(rows: list[LayerSparsity], top: int = 10) -> str:
    """A markdown table: the global row and the ``top`` most compressible layers."""
    layers = sorted(rows[:-1], key=lambda r: -r.pq_index)[:top]
    lines = ["| layer | weights | PQ index | SAP ratio |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.size} | {r.pq_index:.4f} | {r.suggested_ratio:.3f} |" for r in [rows[-1], *layers]]
    return "\n".join(lines)


__all__ = ["pq_index", "sap_ratio", "sparsity_report", "format_report", "LayerSparsity"]
