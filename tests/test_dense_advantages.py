"""Dense (per-step) advantages against hand computations in plain Python floats: the PPO-clip losses with per-step
advantages, per-group per-step standardisation, transforms and returns-to-go, the combination with the outcome
advantage, and the config's one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from rewardtune.cli import main
from rewardtune.errors import ConfigError
from rewardtune.finetune.config import DenseConfig, FinetuneConfig, PRMConfig
from rewardtune.finetune.dense import combine_advantages, dense_term, standardise_per_step
from rewardtune.finetune.losses import ddpo_loss, grpo_loss
from rewardtune.finetune.prime import implicit_step_rewards

NAN = float("nan")


def approx(values, **kw):
    return pytest.approx(values, rel=1e-9, abs=1e-12, **kw)


def close(got: torch.Tensor, want: list, rtol: float = 1e-9) -> None:
    """``got`` equals the nested list ``want`` (NaN where ``want`` has NaN)."""
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=1e-12,
                               equal_nan=True)


# ----- losses with per-step advantages -----

def test_ddpo_loss_with_per_step_advantages_by_hand():
    """rho = e^(l - l_old) per step, eps 0.05; A per step. Each term is max(-A rho, -A clip(rho)):
    step (0,0): A 1, rho e^0.1 = 1.105 -> max(-1.105, -1.05) = -1.05; (0,1): A -2, rho 1 -> 2;
    (1,0): A -1, rho e^0.1 -> max(1.105, 1.05) = e^0.1; (1,1): A 0.5, rho e^-0.2 = 0.819 -> max(-0.409, -0.475)."""
    lp = torch.tensor([[0.1, 0.0], [0.1, -0.2]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0], [-1.0, 0.5]], dtype=torch.float64)
    terms = [-1.05, 2.0, math.exp(0.1), max(-0.5 * math.exp(-0.2), -0.5 * 0.95)]
    assert ddpo_loss(lp, old, adv, 0.05).item() == approx(sum(terms) / 4)


def test_per_step_advantages_equal_to_the_sample_advantage_give_the_same_loss():
    torch.manual_seed(0)
    lp, old, ref = (torch.randn(3, 4, dtype=torch.float64) * 0.1 for _ in range(3))
    adv = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    per_step = adv[:, None].expand(3, 4)
    assert ddpo_loss(lp, old, per_step, 0.05).item() == ddpo_loss(lp, old, adv, 0.05).item()
    assert grpo_loss(lp, old, ref, per_step, 0.05, 0.1)[0].item() == grpo_loss(lp, old, ref, adv, 0.05, 0.1)[0].item()


def test_grpo_loss_gradient_with_per_step_advantages_is_minus_advantage_over_numel():
    """Before the first update (l == l_old == l_ref) dL/dl_it = -A_it / (n k): each step its own advantage."""
    values = torch.randn(2, 3, dtype=torch.float64)
    adv = torch.tensor([[0.7, -1.3, 0.0], [2.0, 0.5, -0.25]], dtype=torch.float64)
    lp = values.clone().requires_grad_(True)
    loss, kl = grpo_loss(lp, values, values, adv, clip_range=1e-4, kl_beta=0.04)
    assert kl.item() == 0.0 and loss.item() == approx(-adv.sum().item() / 6)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 6)


# ----- the dense term -----

def test_standardise_per_step_within_each_group():
    # group 0, step 0: (1, 3) mean 2 std 1 -> (-1, 1) / (1 + eps); step 1: (5, 5) -> 0, 0 (no 0/0).
    # group 1 (rows 2-3), steps 0 and 1: (0, 4) and (1, 2): means 2 and 1.5, stds 2 and 0.5.
    # groups of 3 (rows 2-4), step 0: (0, 4, NaN): finite (0, 4) mean 2 std 2 -> -2/2, 2/2, NaN; step 1: (1, 2, 6)
    # mean 3, std sqrt(14/3).
    eps = 1e-4
    dense = torch.tensor([[1.0, 5.0], [3.0, 5.0], [0.0, 1.0], [4.0, 2.0], [NAN, 6.0], [0.0, 0.0]])
    close(standardise_per_step(dense[:4].double(), 2, eps), [
        [-1 / (1 + eps), 0.0], [1 / (1 + eps), 0.0], [-2 / (2 + eps), -0.5 / (0.5 + eps)],
        [2 / (2 + eps), 0.5 / (0.5 + eps)]])
    std = math.sqrt(14 / 3)
    close(standardise_per_step(dense[2:5].double(), 3, eps), [
        [-2 / (2 + eps), -2 / (std + eps)], [2 / (2 + eps), -1 / (std + eps)], [NAN, 3 / (std + eps)]])
    assert standardise_per_step(dense[:4], 2, eps).dtype == torch.float32


def test_dense_term_transforms_then_returns_to_go():
    r = torch.tensor([[1.0, 4.0, 2.0]], dtype=torch.float64)
    term = lambda **kw: dense_term(r, DenseConfig(kind="x0", **kw), "returns_to_go")[0].tolist()  # noqa: E731
    assert term() == approx([7.0, 6.0, 2.0])  # raw: sums from each step on
    assert term(gamma=0.5) == approx([1 + 0.5 * 4 + 0.25 * 2, 4 + 0.5 * 2, 2.0])
    # clip eta 3: min(r - 3, 0) = (-2, 0, -1) -> returns (-3, -1, -1)
    assert term(transform="clip", clip_eta=3.0) == approx([-3.0, -1.0, -1.0])
    # delta: (1 - 4, 4 - 2, 2) = (-3, 2, 2): the return telescopes to r_t itself
    assert term(transform="delta") == approx([1.0, 4.0, 2.0])
    # TD look-ahead lam 0.5 before the transform: c = (0.5*1 + 0.5*c1, 0.5*4 + 0.5*2, 2) = (2, 3, 2), summed (7, 5, 2)
    assert term(td_lambda=0.5) == approx([7.0, 5.0, 2.0])
    assert dense_term(r, DenseConfig(kind="x0", transform="delta"), "step")[0].tolist() == approx([-3.0, 2.0, 2.0])


def test_combine_adds_the_weighted_dense_term_and_clips():
    outcome = torch.tensor([1.0, -1.0, NAN])
    z = torch.tensor([[0.5, -0.5], [2.0, 0.0], [1.0, 1.0]])
    got = combine_advantages(outcome, z, 2.0, clip_max=2.5)
    assert got.dtype == torch.float32
    close(got[:2], [[2.0, 0.0], [2.5, -1.0]])
    assert torch.isnan(got[2]).all()
    assert combine_advantages(outcome[:2], z[:2], 0.0, 5.0).tolist() == [[1.0, 1.0], [-1.0, -1.0]]


def test_implicit_step_rewards_are_beta_times_the_log_ratio():
    lp_phi = torch.tensor([[0.2, NAN, -0.1]], dtype=torch.float64)
    lp_ref = torch.tensor([[0.1, NAN, 0.3]], dtype=torch.float64)
    close(implicit_step_rewards(lp_phi, lp_ref, 2.0), [[0.2, 0.0, -0.8]])


# ----- config -----

def test_dense_defaults_are_off():
    cfg = FinetuneConfig(algorithm="grpo", images_per_prompt=2)
    assert cfg.dense == DenseConfig() and cfg.dense.kind == "none" and cfg.dense.prm == PRMConfig()


@pytest.mark.parametrize("dense, match", [
    ({"kind": "x1"}, r"'train.dense.kind' expects one of 'none', 'x0', 'implicit', 'progress'"),
    ({"transform": "log"}, r"'train.dense.transform' expects one of 'none', 'clip', 'delta'"),
    ({"kind": "x0", "weight": -1.0}, r"'train.dense.weight' must be >= 0"),
    ({"kind": "x0", "gamma": 0.0}, r"'train.dense.gamma' must be in \(0, 1\]"),
    ({"kind": "x0", "td_lambda": 2.0}, r"'train.dense.td_lambda' must be null or in \[0, 1\]"),
    ({"kind": "implicit", "prm": {"beta": 0.0}}, r"'train.dense.prm.beta' must be > 0"),
])
def test_bad_dense_settings_are_one_line(dense, match):
    from rewardtune.config import from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(FinetuneConfig, {"algorithm": "grpo", "images_per_prompt": 2, "dense": dense}, prefix="train.")


def test_dense_needs_an_algorithm_with_per_step_advantages_and_groups():
    with pytest.raises(ConfigError, match=r"'dense.kind' must be 'none' with prdp \(dense step rewards need an "
                                          r"algorithm with per-step advantages: ddpo, grpo\)"):
        FinetuneConfig(algorithm="prdp", images_per_prompt=2, dense=DenseConfig(kind="x0"))
    with pytest.raises(ConfigError, match=r"'images_per_prompt' must be at least 2 with a dense kind"):
        FinetuneConfig(algorithm="ddpo", images_per_prompt=1, dense=DenseConfig(kind="implicit"))
    FinetuneConfig(algorithm="ddpo", images_per_prompt=2, dense=DenseConfig(kind="x0"))


def test_a_bad_dense_override_is_one_line_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", f"output_dir={out}", "prompts=[a red circle]", "train.algorithm=prdp",
                 "train.dense.kind=x0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rewardtune: error:") and "\n" not in err, err
    assert "train.dense.kind" in err and "per-step advantages" in err and not out.exists()


def test_presets_load():
    from pathlib import Path

    from rewardtune.presets import load_preset

    configs = Path(__file__).resolve().parents[1] / "configs"
    x0 = load_preset(configs / "grpo" / "shapes_small_dense_x0.yaml", configs)
    prime = load_preset(configs / "grpo" / "shapes_small_prime.yaml", configs)
    base = load_preset(configs / "grpo" / "shapes_small.yaml", configs)
    assert (x0.train.dense.kind, x0.train.dense.transform, prime.train.dense.kind) == ("x0", "none", "implicit")
    for cfg in (x0, prime):  # the outcome-only preset otherwise, so the arms differ only in the dense term
        assert cfg.train.sampling == base.train.sampling and cfg.train.optim == base.train.optim
        assert (cfg.train.prompts_per_epoch, cfg.train.images_per_prompt, cfg.epochs, cfg.lora_rank) == (
            base.train.prompts_per_epoch, base.train.images_per_prompt, base.epochs, base.lora_rank)
        assert cfg.train.algorithm_options == base.train.algorithm_options
