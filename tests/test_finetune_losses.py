"""PRDP and DDPO losses and DDPO's advantages against independent hand computations."""

import itertools
import math

import pytest
import torch

from rewardtune.finetune import PerPromptStatTracker, batch_advantages, ddpo_loss, prdp_loss, prdp_loss_grouped


def hand_prdp(lp, lp_old, lp_ref, rewards, beta, eps):
    """Appendix G written out with Python loops over steps and unordered pairs."""
    B, T = len(lp), len(lp[0])
    r_hat, r_clip = [], []
    for i in range(B):
        ratios = [lp[i][t] - lp_ref[i][t] for t in range(T)]
        old = [lp_old[i][t] - lp_ref[i][t] for t in range(T)]
        clipped = [min(max(ratios[t], old[t] - eps), old[t] + eps) for t in range(T)]
        r_hat.append(sum(ratios) / T)
        r_clip.append(sum(clipped) / T)
    losses = []
    for a, b in itertools.combinations(range(B), 2):
        if rewards[a] == rewards[b]:
            continue
        if rewards[a] < rewards[b]:
            a, b = b, a
        target = (rewards[a] - rewards[b]) / beta
        losses.append(max((r_hat[a] - r_hat[b] - target) ** 2, (r_clip[a] - r_clip[b] - target) ** 2))
    return sum(losses) / len(losses) if losses else 0.0


def test_prdp_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    lp, lp_old, lp_ref = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rewards = torch.tensor([0.3, -0.2, 0.3, 1.1, 0.0], dtype=torch.float64)  # one tie (0 and 2)
    for beta, eps in [(1.0, 0.1), (0.5, 1e-3), (3e-5, 1e-6)]:
        loss = prdp_loss(lp, lp_old, lp_ref, rewards, beta, eps)
        expected = hand_prdp(lp.tolist(), lp_old.tolist(), lp_ref.tolist(), rewards.tolist(), beta, eps)
        assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_prdp_loss_tiny_example_by_hand():
    """B=2, T=1, ref 0. Rewards (1, 0), beta 0.5: target = 2. Current log-ratios (1, 0): unclipped (1-2)^2 = 1.
    Snapshot (0, 0) with eps 0.1 clips the first to 0.1: (0.1-2)^2 = 3.61. The loss is the larger, 3.61."""
    lp = torch.tensor([[1.0], [0.0]])
    loss = prdp_loss(lp, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1.0, 0.0]), beta=0.5, clip_range=0.1)
    assert loss.item() == pytest.approx(3.61)


def test_infinite_clip_range_is_the_unclipped_rdp_loss_and_its_gradient():
    """clip_range=inf (the "no proximal clipping" ablation): Eq. 14's loss, and the gradient of Eq. 14 by hand:
    dL/dlp[i,t] = (1/P) sum over pairs (a,b) of 2 (dr_hat - dr/beta) (1[i=a] - 1[i=b]) / T."""
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    lp_old, lp_ref = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g,
                                                                                     dtype=torch.float64)
    rewards, beta = torch.tensor([0.2, 0.9, -0.1], dtype=torch.float64), 0.5
    loss = prdp_loss(lp, lp_old, lp_ref, rewards, beta, float("inf"))
    loss.backward()
    r_hat = (lp - lp_ref).mean(1).tolist()
    pairs = [(1, 0), (1, 2), (0, 2)]  # (a, b) with r_a > r_b
    errors = [r_hat[a] - r_hat[b] - (rewards[a] - rewards[b]).item() / beta for a, b in pairs]
    assert loss.item() == pytest.approx(sum(e * e for e in errors) / 3, rel=1e-12)
    grad = [[0.0, 0.0] for _ in range(3)]
    for (a, b), e in zip(pairs, errors):
        for t in range(2):
            grad[a][t] += 2 * e / 2 / 3
            grad[b][t] -= 2 * e / 2 / 3
    assert torch.allclose(lp.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-12)


def test_prdp_loss_is_zero_at_the_optimum():
    """At pi* the log-ratio is r/beta + const per trajectory (Eq. 8), so every pair's error vanishes."""
    beta = 0.25
    rewards = torch.tensor([0.1, 0.7, -0.4, 0.2])
    lp_ref = torch.randn(4, 6)
    lp = lp_ref + (rewards / beta + 3.0)[:, None]  # the same offset on every step
    assert prdp_loss(lp, lp, lp_ref, rewards, beta, clip_range=1e-4).item() == pytest.approx(0.0, abs=1e-9)


def test_all_ties_give_zero_without_nan_and_grouping_averages_groups():
    lp = torch.randn(3, 4, requires_grad=True)
    loss = prdp_loss(lp, lp.detach(), torch.zeros(3, 4), torch.ones(3), beta=1.0, clip_range=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(2, 3, 4, generator=g) for _ in range(3)] + [torch.randn(2, 3, generator=g)]
    grouped = prdp_loss_grouped(*args, beta=0.7, clip_range=0.05)
    single = [prdp_loss(*(a[i] for a in args), beta=0.7, clip_range=0.05) for i in range(2)]
    assert grouped.item() == pytest.approx((single[0] + single[1]).item() / 2)


def test_clipped_branch_stops_gradients_outside_the_band():
    """When the current log-ratios move beyond +-eps of the snapshot and the clipped error is the larger one,
    the loss no longer depends on those steps."""
    lp_old = torch.zeros(2, 3)
    lp = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = prdp_loss(lp, lp_old, torch.zeros(2, 3), torch.tensor([1.0, 0.0]), beta=0.1, clip_range=0.01)
    loss.backward()
    assert lp.grad[0].abs().sum().item() == 0.0  # first trajectory is clipped on every step
    # Inside the band both branches coincide and gradients flow.
    lp2 = torch.zeros(2, 3, requires_grad=True)
    prdp_loss(lp2, lp_old, torch.zeros(2, 3), torch.tensor([1.0, 0.0]), beta=0.1, clip_range=0.01).backward()
    assert lp2.grad.abs().sum().item() > 0


def test_ddpo_loss_by_hand():
    """rho = e^0.1 = 1.10517, eps 0.05. A=+1: max(-1.10517, -1.05) = -1.05. A=-1: max(1.10517, 1.05) = 1.10517."""
    lp = torch.tensor([[0.1], [0.1]], dtype=torch.float64)
    loss = ddpo_loss(lp, torch.zeros(2, 1, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64),
                     clip_range=0.05)
    assert loss.item() == pytest.approx((-1.05 + math.exp(0.1)) / 2)


def test_per_prompt_stat_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    prompts = ["a", "a", "b"]
    rewards = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)
    adv = tracker.update(prompts, rewards)
    # "a" has 2 values (>= min_count): mean 2, std 1. "b" has 1: falls back to the batch (mean 14/3).
    batch_std = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64).std(unbiased=False).item()
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6), (10 - 14 / 3) / (batch_std + 1e-6)])
    adv = tracker.update(["a", "a"], torch.tensor([5.0, 7.0], dtype=torch.float64))
    # buffer of "a" keeps the last 3: (3, 5, 7): mean 5, std sqrt(8/3)
    std = math.sqrt(8 / 3)
    assert adv.tolist() == pytest.approx([0.0, 2 / (std + 1e-6)])
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.buffers["a"]) == [3.0, 5.0, 7.0]


def test_batch_advantages():
    adv = batch_advantages(torch.tensor([1.0, 2.0, 3.0]))
    std = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([-1 / std, 0.0, 1 / std], rel=1e-6)
