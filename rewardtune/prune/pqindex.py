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


def _sums(w: torch.Tensor, p: float, q: float, mask: torch.Tensor | None = None) -> tuple[int, float, float]:
    """``(d, sum |w|^p, sum |w|^q)`` over the entries where ``mask`` is True (additive across layers)."""
    v = w.detach().flatten().abs().double()
    if mask is not None:
        v = v[mask.flatten()]
    return v.numel(), float(v.pow(p).sum()), float(v.pow(q).sum())


def _from_sums(d: int, sum_p: float, sum_q: float, p: float, q: float) -> float:
    if d == 0 or sum_q == 0:
        return 0.0
    return float(1 - d ** (1 / q - 1 / p) * sum_p ** (1 / p) / sum_q ** (1 / q))


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0, mask: torch.Tensor | None = None) -> float:
    """PQ Index of ``w`` (any shape; only entries where ``mask`` is True count)."""
    if not 0 < p < q:
        raise ValueError(f"PQ index needs 0 < p < q, got p={p}, q={q}")
    return _from_sums(*_sums(w, p, q, mask), p, q)


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
    rows, total = [], [0, 0.0, 0.0]
    for name, w in prunable_weights(unet).items():
        d, sum_p, sum_q = _sums(w, p, q, w != 0)
        index = _from_sums(d, sum_p, sum_q, p, q)
        rows.append(LayerSparsity(name, d, index, sap_ratio(index, d, p, q, **sap_options)))
        total = [total[0] + d, total[1] + sum_p, total[2] + sum_q]
    index = _from_sums(*total, p, q)
    rows.append(LayerSparsity("<global>", total[0], index, sap_ratio(index, total[0], p, q, **sap_options)))
    return rows


def format_report(rows: list[LayerSparsity], top: int = 10) -> str:
    """A markdown table: the global row and the ``top`` most compressible layers."""
    layers = sorted(rows[:-1], key=lambda r: -r.pq_index)[:top]
    lines = ["| layer | weights | PQ index | SAP ratio |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.size} | {r.pq_index:.4f} | {r.suggested_ratio:.3f} |" for r in [rows[-1], *layers]]
    return "\n".join(lines)


__all__ = ["pq_index", "sap_ratio", "sparsity_report", "format_report", "LayerSparsity"]
