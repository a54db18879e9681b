"""Distillation recovery: the moving average of the student's weights (``recover.ema``) and the guided term by
hand."""

from __future__ import annotations

import pytest
import torch

from rewardtune.prune.recover import DistillData, DistillWeights, _batch, distill, guided_loss


def _tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()


def _data():
    g = torch.Generator().manual_seed(0)
    return DistillData(torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 5, 16, generator=g),
                       torch.randn(1, 5, 16, generator=g))


def _run(ema: float, steps: int = 4):
    """Distil and return (initial weights, weights after each step, final weights)."""
    student, teacher = _tiny_unet(1), _tiny_unet(0)
    initial = [p.detach().clone() for p in student.parameters()]
    seen = []
    distill(student, teacher, _data(), steps=steps, batch_size=3, lr=1e-2, weights=DistillWeights(1, 1, 0.1),
            ema=ema, progress=lambda row: seen.append([p.detach().clone() for p in student.parameters()]))
    return initial, seen, [p.detach().clone() for p in student.parameters()]


def test_ema_by_hand():
    ema = 0.2  # binds from step 2 on: (1+k)/(10+k) = 0.1, 0.18, 0.25, 0.31
    initial, seen, final = _run(ema)
    expected = initial
    for k, weights in enumerate(seen):
        decay = min(ema, (1 + k) / (10 + k))
        expected = [decay * a + (1 - decay) * w for a, w in zip(expected, weights)]
    assert any(not torch.allclose(f, s) for f, s in zip(final, seen[-1]))
    for f, e in zip(final, expected):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


def test_no_ema_keeps_last_step():
    _, seen, final = _run(0.0, steps=2)
    for f, s in zip(final, seen[-1]):
        assert torch.equal(f, s)


@pytest.mark.parametrize("ema", [-0.1, 1.0])
def test_ema_outside_range(ema):
    with pytest.raises(ValueError, match="ema"):
        distill(_tiny_unet(1), _tiny_unet(0), _data(), steps=1, ema=ema)


def test_guided_loss_by_hand():
    # two pairs (cond rows 0-1, uncond rows 2-3), one element each: g = u + w (c - u) with w = 3
    student = torch.tensor([1.0, 2.0, 0.0, 1.0]).view(4, 1, 1, 1)
    teacher = torch.tensor([2.0, 2.0, 1.0, 0.0]).view(4, 1, 1, 1)
    g_s = torch.tensor([0 + 3.0 * (1 - 0), 1 + 3.0 * (2 - 1)])  # 3, 4
    g_t = torch.tensor([1 + 3.0 * (2 - 1), 0 + 3.0 * (2 - 0)])  # 4, 6
    expected = ((g_s - g_t) ** 2).mean()  # (1 + 4) / 2
    assert guided_loss(student, teacher, 3.0).item() == pytest.approx(expected.item())
    assert guided_loss(teacher, teacher, 3.0).item() == 0.0


def test_paired_batch_repeats_latents_with_the_empty_prompt():
    data, alphas = _data(), torch.linspace(0.99, 0.01, 50)
    noisy, t, states, noise = _batch(data, torch.Generator().manual_seed(0), 6, 0.1, alphas, paired=True)
    assert noisy.shape[0] == t.shape[0] == states.shape[0] == noise.shape[0] == 6
    torch.testing.assert_close(noisy[:3], noisy[3:])
    assert torch.equal(t[:3], t[3:]) and torch.equal(noise[:3], noise[3:])
    assert all(any(torch.equal(s, d) for d in data.states) for s in states[:3])
    assert torch.equal(states[3:], data.empty.expand(3, -1, -1))


def test_guided_distillation_logs_the_term_and_needs_pairs():
    rows = []
    distill(_tiny_unet(1), _tiny_unet(0), _data(), steps=2, batch_size=4, weights=DistillWeights(1, 1, 0, 1.0),
            progress=rows.append)
    assert all(row["guided"] > 0 for row in rows)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        distill(_tiny_unet(1), _tiny_unet(0), _data(), steps=1, batch_size=1, weights=DistillWeights(guided=1.0))
