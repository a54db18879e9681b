"""Loss-landscape diagnostics of pruned models (the three-regime model of pruning, Zhou et al. 2023): linear mode
connectivity between two retrained copies and representation similarity (linear CKA) to the dense model.

Loss barrier along the straight line ``theta(a) = (1 - a) theta_A + a theta_B``:

    B = max_a [ L(theta(a)) - ((1 - a) L(theta_A) + a L(theta_B)) ]

(``B ~ 0``: the two solutions are linearly connected). Linear CKA of representations ``X [N,D]``, ``Y [N,E]`` of the
same ``N`` inputs, columns centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

(1 for identical representations up to rotation and isotropic scaling).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of ``x [N,D]`` and ``y [N,E]`` (rows are the same inputs)."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need the same number (>= 2) of rows, got {x.shape[0]} and {y.shape[0]}")
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


@torch.no_grad()
def loss_barrier(model: nn.Module, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                 loss_fn: Callable[[nn.Module], float], alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
                 ) -> dict[str, object]:
    """``loss_fn(model)`` at the parameters ``(1 - a) state_a + a state_b`` for each ``a`` in ``alphas`` (loaded into
    ``model``, which is left at ``state_b``); returns ``{"alphas", "losses", "barrier"}`` with the barrier of the
    module docstring (0 when every point lies on or below the chord)."""
    if set(state_a) != set(state_b):
        raise ValueError("the two states name different tensors")
    # copies: a model's state_dict() shares storage with the parameters that loading overwrites
    state_a, state_b = ({k: v.detach().clone() for k, v in s.items()} for s in (state_a, state_b))
    alphas = [float(a) for a in alphas]
    if alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ValueError(f"alphas must run from 0 to 1, got {alphas}")
    losses = []
    for a in alphas:
        model.load_state_dict({k: torch.lerp(state_a[k].float(), state_b[k].float(), a).to(state_a[k].dtype)
                               if state_a[k].is_floating_point() else state_b[k] for k in state_a})
        losses.append(float(loss_fn(model)))
    chord = [(1 - a) * losses[0] + a * losses[-1] for a in alphas]
    return {"alphas": alphas, "losses": losses, "barrier": max(0.0, max(v - c for v, c in zip(losses, chord)))}


__all__ = ["linear_cka", "loss_barrier"]
