"""Loss barrier and linear CKA against hand computations."""

import pytest
import torch
from torch import nn

from rewardtune.prune.landscape import linear_cka, loss_barrier


def test_linear_cka_hand_computed():
    # x = [1, 2, 3]^T centred -> [-1, 0, 1]; y = [1, 1, 4]^T centred -> [-1, -1, 2].
    # ||y^T x||^2 = (1 + 0 + 2)^2 = 9; ||x^T x|| = 2; ||y^T y|| = 6 -> CKA = 9 / 12 = 0.75.
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [1.0], [4.0]])
    assert linear_cka(x, y) == pytest.approx(0.75)


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(50, 4, generator=g)) < 0.5


def test_linear_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))


def test_loss_barrier_hand_computed():
    # One weight w on the line from -1 to 1, loss (w^2 - 1)^2: endpoints 0, w = -0.5 -> 0.5625, w = 0 -> 1.
    model = nn.Linear(1, 1, bias=False)
    a, b = {"weight": torch.tensor([[-1.0]])}, {"weight": torch.tensor([[1.0]])}
    out = loss_barrier(model, a, b, lambda m: float((m.weight.squeeze() ** 2 - 1) ** 2))
    assert out["losses"] == pytest.approx([0.0, 0.5625, 1.0, 0.5625, 0.0])
    assert out["barrier"] == pytest.approx(1.0)
    assert float(model.weight) == 1.0  # left at state_b


def test_loss_barrier_convex_path_is_zero():
    # Loss w^2 from w = 1 to w = 3: the chord lies above the parabola everywhere, so no barrier.
    model = nn.Linear(1, 1, bias=False)
    out = loss_barrier(model, {"weight": torch.tensor([[1.0]])}, {"weight": torch.tensor([[3.0]])},
                       lambda m: float(m.weight.squeeze() ** 2))
    assert out["losses"] == pytest.approx([1.0, 2.25, 4.0, 6.25, 9.0])
    assert out["barrier"] == 0.0


def test_loss_barrier_accepts_the_models_own_state():
    # state_b = model.state_dict() shares storage with the weights being overwritten; the path must not drift.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    out = loss_barrier(model, {"weight": torch.tensor([[-1.0]])}, model.state_dict(),
                       lambda m: float((m.weight.squeeze() ** 2 - 1) ** 2))
    assert out["losses"] == pytest.approx([0.0, 0.5625, 1.0, 0.5625, 0.0])
