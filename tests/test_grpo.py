"""GRPO (group-relative advantages, PPO-clip and a k3 KL to the reference) against hand computations in plain
Python floats, its options and presets, and one epoch / one run on the tiny random pipeline."""

from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rewardtune.cli import main
from rewardtune.config import load_config
from rewardtune.errors import ConfigError
from rewardtune.finetune.algorithms import GRPO, GRPOOptions, make_algorithm
from rewardtune.finetune.config import FinetuneConfig, OptimConfig, RunConfig, SamplingConfig
from rewardtune.finetune.losses import ddpo_loss, grpo_loss, kl_k3
from rewardtune.finetune.rollout import collect_rollouts, epoch_reference
from rewardtune.finetune.update import make_optimizer, trajectory_log_probs, update_epoch

NAN = float("nan")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def grpo(**options) -> GRPO:
    cfg = FinetuneConfig(algorithm="grpo", images_per_prompt=3, algorithm_options=options)
    return make_algorithm(cfg)


def targets(algorithm: GRPO, rewards: list[float], group_size: int = 3) -> list[float]:
    rollouts = SimpleNamespace(rewards=torch.tensor(rewards), images_per_prompt=group_size)
    out = algorithm.targets(rollouts)
    assert out.shape == (len(rewards),) and out.dtype == torch.float32
    return out.tolist()


def population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def assert_same(got: list[float], want: list[float]) -> None:
    assert [math.isnan(g) for g in got] == [math.isnan(w) for w in want], (got, want)
    assert [g for g in got if not math.isnan(g)] == pytest.approx([w for w in want if not math.isnan(w)], rel=1e-6)


# ----- advantages -----

def test_group_advantages_with_a_nan_reward_and_a_constant_group():
    # group 0: finite (1, 2): mean 1.5, population std 0.5; the NaN is left out and gets NaN.
    # group 1: (3, 3, 3): std 0 -> (3 - 3) / (0 + 1e-4) = 0, no NaN.
    got = targets(grpo(), [1.0, 2.0, NAN, 3.0, 3.0, 3.0])
    assert_same(got, [-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), NAN, 0.0, 0.0, 0.0])


def test_group_advantages_use_the_population_std_of_each_group():
    std_a, std_b = population_std([0.0, 1.0, 5.0]), population_std([2.0, 4.0, 9.0])  # sqrt(14/3), sqrt(26/3)
    assert std_a == pytest.approx(math.sqrt(14 / 3))
    want = [(r - 2.0) / (std_a + 1e-4) for r in (0.0, 1.0, 5.0)]  # group means 2 and 5
    want += [(r - 5.0) / (std_b + 1e-4) for r in (2.0, 4.0, 9.0)]
    assert_same(targets(grpo(), [0.0, 1.0, 5.0, 2.0, 4.0, 9.0]), want)
    assert_same(targets(grpo(std_eps=0.5), [0.0, 1.0, 5.0]), [(r - 2.0) / (std_a + 0.5) for r in (0.0, 1.0, 5.0)])


def test_global_std_divides_by_the_std_of_all_finite_rewards():
    # finite rewards (1, 2, 3, 3, 3): mean 2.4, population variance (1.96 + 0.16 + 3 * 0.36) / 5 = 0.64, std 0.8;
    # each group still subtracts its own mean (1.5 and 3).
    got = targets(grpo(global_std=True), [1.0, 2.0, NAN, 3.0, 3.0, 3.0])
    assert population_std([1.0, 2.0, 3.0, 3.0, 3.0]) == pytest.approx(0.8)
    assert_same(got, [-0.5 / (0.8 + 1e-4), 0.5 / (0.8 + 1e-4), NAN, 0.0, 0.0, 0.0])


def test_advantages_are_clipped_and_all_nan_groups_stay_nan():
    std = math.sqrt(14 / 3)  # (0, 1, 5): advantages -0.926, -0.463, 1.389 before clipping to +-0.9
    got = targets(grpo(adv_clip_max=0.9), [0.0, 1.0, 5.0, NAN, NAN, NAN])
    assert_same(got, [-0.9, -1.0 / (std + 1e-4), 0.9, NAN, NAN, NAN])
    # one group of 37: 36 zeros and a one -> the one's advantage is sqrt(36) = 6 (over std + eps), clipped to 5
    assert targets(grpo(), [0.0] * 36 + [1.0], group_size=37)[-1] == pytest.approx(5.0)
    assert targets(grpo(), [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]) == [0.0] * 6


# ----- losses -----

def test_k3_by_hand():
    lp = torch.tensor([0.3, 0.0, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64)
    # d = ref - lp = (-0.2, 0.5, 0): e^d - d - 1
    want = [math.exp(-0.2) + 0.2 - 1, math.exp(0.5) - 0.5 - 1, 0.0]
    assert kl_k3(lp, ref).tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert want[0] == pytest.approx(0.018730753, rel=1e-6) and want[1] == pytest.approx(0.148721271, rel=1e-6)


def test_grpo_loss_by_hand():
    """Policy term as DDPO's test: rho = e^0.1, eps 0.05 -> (-1.05 + e^0.1) / 2. k3 at d = (0.2, -0.3)."""
    lp = torch.tensor([[0.1], [0.1]], dtype=torch.float64)
    old = torch.zeros(2, 1, dtype=torch.float64)
    ref = torch.tensor([[0.3], [-0.2]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    kl = ((math.exp(0.2) - 0.2 - 1) + (math.exp(-0.3) + 0.3 - 1)) / 2
    loss, kl_value = grpo_loss(lp, old, ref, adv, clip_range=0.05, kl_beta=0.5)
    assert kl_value.item() == pytest.approx(kl) and not kl_value.requires_grad
    assert loss.item() == pytest.approx((-1.05 + math.exp(0.1)) / 2 + 0.5 * kl)
    loss0, kl0 = grpo_loss(lp, old, ref, adv, clip_range=0.05, kl_beta=0.0)
    assert loss0.item() == pytest.approx((-1.05 + math.exp(0.1)) / 2) and kl0.item() == pytest.approx(kl)
    assert loss0.item() == ddpo_loss(lp, old, adv, 0.05).item()


def test_before_the_first_update_the_gradient_is_minus_advantage_over_numel():
    """l == l_old == l_ref: every ratio is exactly 1 (inside the band), the KL term is 0 with zero gradient, so
    dL/dl_it = -A_i / (n * k)."""
    torch.manual_seed(0)
    values = torch.randn(2, 3, dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    lp = values.clone().requires_grad_(True)
    loss, kl = grpo_loss(lp, values, values, adv, clip_range=1e-4, kl_beta=0.04)
    assert kl.item() == 0.0
    assert loss.item() == pytest.approx(-(0.7 - 1.3) * 3 / 6)
    loss.backward()
    torch.testing.assert_close(lp.grad, (-adv / 6)[:, None].expand(2, 3))
    lp_kl = values.clone().requires_grad_(True)
    kl_k3(lp_kl, values).sum().backward()
    assert torch.count_nonzero(lp_kl.grad) == 0


def test_entry_loss_and_clipfrac():
    algorithm = grpo(clip_range=0.05, kl_beta=0.5)
    lp = torch.tensor([[0.1, 0.0], [0.1, 0.0]], dtype=torch.float64)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, clipfrac = algorithm.loss(zeros, zeros, zeros, adv)
    assert loss.item() == 0.0 and clipfrac.item() == 0.0  # before the first update: nothing is clipped
    loss, clipfrac = algorithm.loss(lp, zeros, zeros, adv)
    assert clipfrac.item() == 0.5  # the steps with |e^0.1 - 1| > 0.05
    want, _ = grpo_loss(lp, zeros, zeros, adv, 0.05, 0.5)
    assert loss.item() == want.item()


# ----- options, entry declarations and presets -----

def test_options_defaults_and_validation():
    opt = GRPOOptions()
    assert (opt.clip_range, opt.adv_clip_max, opt.kl_beta, opt.std_eps, opt.global_std) == (1e-4, 5.0, 0.04, 1e-4,
                                                                                            False)
    with pytest.raises(ConfigError, match=r"'train.algorithm_options.clip_range' must be a finite number > 0"):
        FinetuneConfig(algorithm="grpo", algorithm_options={"clip_range": -1.0})
    with pytest.raises(ConfigError, match=r"'train.algorithm_options.kl_beta' must be a finite number"):
        FinetuneConfig(algorithm="grpo", algorithm_options={"kl_beta": math.inf})
    with pytest.raises(ConfigError, match=r"'kl_beta' must be a finite number >= 0"):
        GRPOOptions(kl_beta=math.inf)
    for bad in ({"kl_beta": -0.1}, {"std_eps": 0.0}, {"adv_clip_max": 0.0}, {"clip_range": math.nan},
                {"global_std": 1}):
        with pytest.raises(ConfigError, match=f"'{next(iter(bad))}' must be"):
            GRPOOptions(**bad)
    with pytest.raises(ConfigError, match="train.algorithm_options.beta"):  # PRDP's name, not GRPO's
        FinetuneConfig(algorithm="grpo", algorithm_options={"beta": 0.1})
    with pytest.raises(ConfigError, match=r"'images_per_prompt' must be at least 2 for grpo \(its advantages"):
        FinetuneConfig(algorithm="grpo", images_per_prompt=1)


def test_bad_option_is_one_line_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", f"output_dir={out}", "prompts=[a red circle]",
                 "train.algorithm=grpo", "train.algorithm_options={kl_beta: .inf}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rewardtune: error:") and "\n" not in err, err
    assert "train.algorithm_options.kl_beta" in err and "finite" in err and not out.exists()


def test_uses_reference_follows_kl_beta():
    assert GRPO.uses_reference is True and GRPO.whole_groups is False and GRPO.min_images_per_prompt == 2
    with_kl, without = grpo(kl_beta=0.01), grpo(kl_beta=0.0)
    assert with_kl.uses_reference is True and without.uses_reference is False
    assert epoch_reference(3, "ref", with_kl.uses_reference) == "ref"
    assert epoch_reference(3, "ref", without.uses_reference) is None  # no reference pass over the steps
    assert without.state_dict() == {}


@pytest.mark.parametrize("size", ["small", "large"])
def test_presets_load_with_typed_options(size):
    from rewardtune.presets import load_preset

    cfg = load_preset(CONFIGS / "grpo" / f"shapes_{size}.yaml", CONFIGS)
    assert cfg.train.algorithm == "grpo" and cfg.lora_rank == 8
    algorithm = make_algorithm(cfg.train)
    assert isinstance(algorithm, GRPO) and algorithm.uses_reference
    assert algorithm.options == GRPOOptions(clip_range=1e-2, adv_clip_max=5.0, kl_beta=0.04, std_eps=1e-4,
                                            global_std=False)


# ----- on the tiny pipeline -----

PROMPTS = ["a red circle", "a blue square on a white background"]
N, B, T = 2, 3, 4


@pytest.fixture
def pipe(fresh_pipe):
    return fresh_pipe


def brightness(images, prompts):
    return images.mean((1, 2, 3))


def make_cfg(**options) -> FinetuneConfig:
    return FinetuneConfig(algorithm="grpo", algorithm_options=options, reward="jpeg_incompressibility",
                          prompts_per_epoch=N, images_per_prompt=B, inner_steps=1, seed=0,
                          sampling=SamplingConfig(steps=T, guidance=5.0, eta=1.0, batch_size=4),
                          optim=OptimConfig(lr=1e-3))


def test_one_epoch_updates_and_the_kl_reads_the_reference(pipe):
    cfg = make_cfg(clip_range=0.5, kl_beta=0.04)
    reference = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, brightness, seeds=20)
    algorithm = make_algorithm(cfg)
    metrics = update_epoch(pipe.unet, make_optimizer(pipe.unet.parameters(), cfg.optim), rollouts, cfg, algorithm,
                           scheduler=pipe.scheduler)
    assert metrics["steps"] == 1 and metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert metrics["clipfrac"] == 0.0 and metrics["nonfinite_targets"] == 0
    # epoch 2: the moved model samples, the reference pass scores the same transitions under the base model
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, brightness, seeds=40,
                                reference=epoch_reference(1, reference, algorithm.uses_reference))
    old, ref = rollouts.log_probs_old, rollouts.log_probs_ref
    assert (old - ref).abs().max() > 1e-7
    with torch.no_grad():
        lp = trajectory_log_probs(pipe.unet, pipe.scheduler, rollouts, torch.arange(N * B), torch.arange(T),
                                  cfg.sampling.guidance, cfg.sampling.eta)
    adv = algorithm.targets(rollouts)
    loss, _ = algorithm.loss(lp, old, ref, adv)
    loss_no_kl, _ = make_algorithm(make_cfg(clip_range=0.5, kl_beta=0.0)).loss(lp, old, ref, adv)
    k3 = (torch.exp(ref - lp) - (ref - lp) - 1).mean()
    assert k3 > 0 and (loss - loss_no_kl).item() == pytest.approx(0.04 * k3.item(), rel=1e-4)


def test_a_nan_reward_skips_only_its_step(pipe):
    cfg = make_cfg()

    def nan_first(images, prompts):
        scores = brightness(images, prompts).clone()
        scores[0] = NAN if len(scores) == 4 else scores[0]  # the first call holds sample 0
        return scores

    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, nan_first, seeds=70)
    metrics = update_epoch(pipe.unet, make_optimizer(pipe.unet.parameters(), cfg.optim), rollouts, cfg,
                           make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["nonfinite_targets"] == 1 and metrics["skipped"] == 1 and metrics["steps"] == 0


@pytest.mark.integration
def test_a_lora_run_of_two_epochs(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Epoch 1 has no reference pass (the snapshot is the base model); epoch 2 scores the base model with the LoRA
    adapters disabled."""
    from rewardtune.finetune import rollout
    from rewardtune.finetune.run import run_finetune

    references, real = [], rollout.reference_log_probs

    def spy(*args, **kwargs):
        references.append(inspect.signature(real).bind(*args, **kwargs).arguments["reference"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout, "reference_log_probs", spy)

    out = tmp_path / "grpo"
    cfg = load_config(RunConfig, None, [
        f"model={tiny_pipeline_dir}", f"output_dir={out}", "prompts=[a red circle, a blue square]", "epochs=2",
        "save_every=2", "lora_rank=2", "eval_prompts=[a red circle]", "eval_seeds=[0]", "train.algorithm=grpo",
        "train.algorithm_options={clip_range: 0.5, kl_beta: 0.1}", "train.reward=jpeg_incompressibility",
        "train.prompts_per_epoch=2", "train.images_per_prompt=3", "train.inner_steps=1", "train.sampling.steps=2",
        "train.optim.lr=1e-2"])
    run_finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [1, 1] and all(r["skipped"] == 0 for r in records)
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in records)
    assert references == [None, rollout.ADAPTERS_DISABLED] and (out / "final").is_dir()
