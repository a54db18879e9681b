"""One online PRDP / DDPO epoch on the tiny random pipeline: rollouts, recomputed log-probs, reference models,
minibatching, gradient steps, skipped steps and config errors."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch

from rewardtune.config import from_dict
from rewardtune.errors import ConfigError, UserError
from rewardtune.finetune.algorithms import ALGORITHMS, PRDP, make_algorithm
from rewardtune.finetune.config import DDPOConfig, FinetuneConfig, OptimConfig, PRDPConfig, SamplingConfig
from rewardtune.finetune.losses import prdp_loss_grouped
from rewardtune.finetune.rollout import ADAPTERS_DISABLED, collect_rollouts, epoch_reference
from rewardtune.finetune.update import make_optimizer, plan_minibatches, trajectory_log_probs, update_epoch

PROMPTS = ["a red circle", "a blue square on a white background"]
N, B, T = 2, 3, 4


class Brightness:
    """Mean pixel value per image; ``nan_at`` makes the reward of that sample (counted over calls) NaN."""

    def __init__(self, nan_at: int | None = None) -> None:
        self.nan_at, self.seen = nan_at, 0

    def __call__(self, images, prompts):
        scores = images.mean((1, 2, 3)).clone()
        if self.nan_at is not None and 0 <= self.nan_at - self.seen < len(scores):
            scores[self.nan_at - self.seen] = float("nan")
        self.seen += len(scores)
        return scores


@pytest.fixture
def pipe(fresh_pipe):
    return fresh_pipe


def make_cfg(algorithm="prdp", guidance=5.0, lr=1e-3, **overrides) -> FinetuneConfig:
    sampling = SamplingConfig(steps=T, guidance=guidance, eta=1.0, batch_size=4)  # 6 samples -> chunks of 4 and 2
    fields = dict(algorithm=algorithm, reward="jpeg_incompressibility", prompts_per_epoch=N, images_per_prompt=B,
                  inner_steps=1, seed=0, sampling=sampling, optim=OptimConfig(lr=lr))
    return FinetuneConfig(**{**fields, **overrides})


def all_log_probs(unet, scheduler, rollouts, cfg, steps=None):
    steps = torch.arange(T) if steps is None else steps
    with torch.no_grad():
        return trajectory_log_probs(unet, scheduler, rollouts, torch.arange(N * B), steps, cfg.sampling.guidance,
                                    cfg.sampling.eta, chunk=5)


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module, state):
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_recomputed_log_probs_equal_recorded_before_any_update(pipe, guidance):
    """DDPO's debug check: the importance ratio is 1.0 before the first update (with and without CFG)."""
    cfg = make_cfg(guidance=guidance)
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=0)
    assert rollouts.latents.shape == (N * B, T + 1, 4, 8, 8) and rollouts.log_probs_old.shape == (N * B, T)
    assert rollouts.images.shape == (N * B, 3, 32, 32) and rollouts.rewards.shape == (N * B,)
    assert rollouts.group.tolist() == [0, 0, 0, 1, 1, 1] and rollouts.prompts[3] == PROMPTS[1]
    assert (rollouts.negative_embeds is None) == (guidance == 1.0)
    steps = torch.argsort(torch.rand(N * B, T, generator=torch.Generator().manual_seed(0)), dim=1)  # per sample
    recomputed = all_log_probs(pipe.unet, pipe.scheduler, rollouts, cfg, steps)
    recorded = rollouts.log_probs_old.gather(1, steps)
    torch.testing.assert_close(recomputed, recorded, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.exp(recomputed - recorded), torch.ones_like(recorded), rtol=0, atol=1e-5)


def test_prdp_first_loss_matches_hand_computation(pipe):
    from rewardtune.rewards import load_reward

    cfg = make_cfg("prdp", prdp=PRDPConfig(beta=1e-2, clip_range=1e-6))
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, load_reward("jpeg_incompressibility"), seeds=10)
    assert rollouts.log_probs_ref is rollouts.log_probs_old  # reference None: the snapshot, no second pass
    assert set(rollouts.reward_components) == {"jpeg_incompressibility"}
    old = rollouts.log_probs_old.reshape(N, B, T)
    rewards = rollouts.rewards.reshape(N, B)
    expected = prdp_loss_grouped(old, old, old, rewards, beta=1e-2, clip_range=1e-6).item()
    # by hand: log p == log p_old == log p_ref, so every r_hat is 0 and a pair costs (dr / beta)^2
    per_group = []
    for g in range(N):
        costs = [((rewards[g, a] - rewards[g, b]).item() / 1e-2) ** 2
                 for a, b in itertools.combinations(range(B), 2) if rewards[g, a] != rewards[g, b]]
        per_group.append(sum(costs) / len(costs) if costs else 0.0)
    assert any(per_group), "rewards tie everywhere; the check would be vacuous"
    assert expected == pytest.approx(sum(per_group) / N, rel=1e-5)
    optimizer = make_optimizer(pipe.unet.parameters(), cfg.optim)
    metrics = update_epoch(pipe.unet, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["steps"] == 1 and metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["approx_kl"] < 1e-9  # first step: log p == log p_old up to float noise


@pytest.mark.parametrize("algorithm", ["prdp", "ddpo"])
def test_update_changes_unet_and_leaves_frozen_parts(pipe, algorithm):
    cfg = make_cfg(algorithm)
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=20)
    unet_before, vae_before = clone_state(pipe.unet), clone_state(pipe.vae)
    text_before = clone_state(pipe.text_encoder)
    optimizer = make_optimizer(pipe.unet.parameters(), cfg.optim)
    metrics = update_epoch(pipe.unet, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["steps"] == 1 and metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert not same_state(pipe.unet, unet_before)
    assert same_state(pipe.vae, vae_before) and same_state(pipe.text_encoder, text_before)
    moved = all_log_probs(pipe.unet, pipe.scheduler, rollouts, cfg)
    assert (moved - rollouts.log_probs_old).abs().max() > 1e-6


def test_lora_reference_is_the_base_unet_with_adapters_disabled(pipe):
    from peft import LoraConfig

    pipe.unet.requires_grad_(False)
    base = copy.deepcopy(pipe.unet)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    cfg = make_cfg("prdp", lr=3e-2, prdp=PRDPConfig(beta=1e-2, clip_range=1e-6))
    before = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=30, reference=ADAPTERS_DISABLED)
    assert {n for n, p in pipe.unet.named_parameters() if p.requires_grad} == trainable  # flags restored
    torch.testing.assert_close(before.log_probs_ref, all_log_probs(base, pipe.scheduler, before, cfg),
                               rtol=0, atol=1e-6)
    lora_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in trainable}
    optimizer = make_optimizer(pipe.unet.parameters(), cfg.optim)
    metrics = update_epoch(pipe.unet, optimizer, before, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["steps"] == 1
    assert any(not torch.equal(p, lora_before[n]) for n, p in pipe.unet.named_parameters() if n in trainable)
    after = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=40, reference=ADAPTERS_DISABLED)
    torch.testing.assert_close(after.log_probs_ref, all_log_probs(base, pipe.scheduler, after, cfg),
                               rtol=0, atol=1e-6)  # still the base model: the update only touched the adapters
    assert (after.log_probs_old - after.log_probs_ref).abs().max() > 1e-4  # the adapted model has moved away


def test_frozen_reference_unet_and_bad_reference(pipe):
    cfg = make_cfg("prdp")
    reference = copy.deepcopy(pipe.unet).requires_grad_(False)
    with torch.no_grad():
        next(reference.parameters()).add_(0.05)  # a different model than the snapshot
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=50, reference=reference)
    torch.testing.assert_close(rollouts.log_probs_ref, all_log_probs(reference, pipe.scheduler, rollouts, cfg))
    assert not torch.equal(rollouts.log_probs_ref, rollouts.log_probs_old)
    with pytest.raises(ValueError, match="adapters"):
        collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=50, reference=ADAPTERS_DISABLED)
    with pytest.raises(ValueError, match="one seed per sample"):
        collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=[1, 2])
    with pytest.raises(ValueError, match="unknown reference"):
        collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=0, reference="base")
    assert epoch_reference(0, reference) is None and epoch_reference(3, reference) is reference
    assert epoch_reference(3, reference, uses_reference=False) is None  # DDPO: no reference pass
    rollouts.timesteps = rollouts.timesteps + 1  # not what this scheduler produces
    with pytest.raises(ValueError, match="differ from the recorded"):
        all_log_probs(pipe.unet, pipe.scheduler, rollouts, cfg)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(reference.parameters(), cfg.optim)


@pytest.mark.parametrize("whole_groups", [True, False])
def test_minibatch_plan(whole_groups):
    cfg = FinetuneConfig(prompts_per_epoch=4, images_per_prompt=3, inner_steps=2, groups_per_update=2,
                         timestep_fraction=0.5)
    passes = plan_minibatches(4, 3, 6, cfg, whole_groups, torch.Generator().manual_seed(0))
    assert len(passes) == 2 and all(len(p) == 2 for p in passes)
    for minibatches in passes:
        assert sorted(torch.cat([m.index for m in minibatches]).tolist()) == list(range(12))  # each sample once
        for batch in minibatches:
            assert batch.steps.shape == (6, 3)
            assert all(len(set(row)) == 3 and max(row) < 6 for row in batch.steps.tolist())
            if whole_groups:  # PRDP: G whole groups, each group's B samples contiguous
                rows = batch.index.reshape(2, 3)
                assert (rows // 3 == rows[:, :1] // 3).all() and (rows % 3 == torch.arange(3)).all()
    all_steps = torch.cat([m.steps for m in passes[0]])
    assert len({tuple(r) for r in all_steps.tolist()}) > 1  # independent per-sample timestep shuffles


def test_prdp_groups_are_whole_in_every_update(pipe):
    cfg = make_cfg("prdp", groups_per_update=1, inner_steps=2)
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=60)
    algorithm, seen = PRDP(cfg), []
    loss = algorithm.loss
    algorithm.loss = lambda lp, old, ref, targets: (seen.append(targets.clone()), loss(lp, old, ref, targets))[1]
    metrics = update_epoch(pipe.unet, make_optimizer(pipe.unet.parameters(), cfg.optim), rollouts, cfg, algorithm,
                           scheduler=pipe.scheduler)
    assert metrics["steps"] == 4 and len(seen) == 4
    groups = rollouts.rewards.reshape(N, B)
    assert all(any(torch.equal(t, g) for g in groups) for t in seen)


@pytest.mark.parametrize("algorithm", ["prdp", "ddpo"])
def test_nan_reward_skips_the_step(pipe, algorithm, caplog):
    cfg = make_cfg(algorithm)
    with caplog.at_level(logging.WARNING):
        rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(nan_at=1), seeds=70)
    assert "not finite" in caplog.text
    unet_before = clone_state(pipe.unet)
    optimizer = make_optimizer(pipe.unet.parameters(), cfg.optim)
    metrics = update_epoch(pipe.unet, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["skipped"] == 1 and metrics["steps"] == 0 and metrics["nonfinite_targets"] == 1
    assert same_state(pipe.unet, unet_before)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_an_overflowing_fp16_step_still_lets_the_scaler_back_off(pipe):
    """With a gradient scaler (accelerate's fp16), a non-finite gradient norm must still reach ``optimizer.step()``:
    the scaler then skips the update and lowers its scale; skipping the call would leave it unscaled and the next
    step's ``unscale_`` would raise."""
    cfg = make_cfg("ddpo")
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=80)

    class ScaledOptimizer(torch.optim.SGD):
        scaler, calls = object(), 0

        def step(self, closure=None):  # what accelerate's AcceleratedOptimizer does: scaler.step skips on inf
            self.calls += 1

    optimizer = ScaledOptimizer([p for p in pipe.unet.parameters()], lr=1e-3)
    unet_before = clone_state(pipe.unet)
    metrics = update_epoch(pipe.unet, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler,
                           clip_grad_norm=lambda params, max_norm: torch.tensor(float("inf")))
    assert metrics["skipped"] == 1 and metrics["steps"] == 0 and optimizer.calls == 1
    assert same_state(pipe.unet, unet_before) and all(p.grad is None for p in pipe.unet.parameters())


class GradientRecorder(torch.optim.SGD):
    """SGD that keeps a flat copy of the gradient it is asked to apply."""

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        return super().step(closure)


def test_chunked_two_pass_gradient_equals_single_pass(pipe):
    cfg_one = make_cfg("prdp", prdp=PRDPConfig(beta=1e-2, clip_range=1.0), forward_chunk=1000,
                       optim=OptimConfig(max_grad_norm=1e9))  # no clipping (a 1e-6 band would flip on float noise)
    cfg_chunked = copy.deepcopy(cfg_one)
    cfg_chunked.forward_chunk = 5  # 24 pairs -> 5 chunks
    rollouts = collect_rollouts(pipe, PROMPTS, B, cfg_one.sampling, Brightness(), seeds=80)
    grads, losses = [], []
    for cfg in (cfg_one, cfg_chunked):
        unet = copy.deepcopy(pipe.unet)
        optimizer = GradientRecorder(unet.parameters(), lr=1e-3)
        metrics = update_epoch(unet, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
        losses.append(metrics["loss"])
        grads.append(optimizer.grads)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    scale = grads[0].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * scale)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'images_per_prompt'"):
        FinetuneConfig(algorithm="prdp", images_per_prompt=1)
    assert FinetuneConfig(algorithm="ddpo", images_per_prompt=1).images_per_prompt == 1
    for bad in (0.0, -1e-6):
        with pytest.raises(ConfigError, match="'clip_range'"):
            PRDPConfig(clip_range=bad)
        with pytest.raises(ConfigError, match="'clip_range'"):
            DDPOConfig(clip_range=bad)
    with pytest.raises(ConfigError, match="'prdp.clip_range'"):
        from_dict(FinetuneConfig, {"prdp": {"clip_range": 0}})
    with pytest.raises(ConfigError, match="'sampling.eta'"):
        from_dict(FinetuneConfig, {"sampling": {"eta": 0}})
    with pytest.raises(ConfigError, match="'timestep_fraction'"):
        FinetuneConfig(timestep_fraction=0.0)
    with pytest.raises(ConfigError, match="'groups_per_update'"):
        FinetuneConfig(prompts_per_epoch=32, groups_per_update=3)
    with pytest.raises(ConfigError, match="'algorithm'"):
        from_dict(FinetuneConfig, {"algorithm": "ppo"})
    with pytest.raises(UserError, match="choose one of: ddpo, grpo, prdp"):
        ALGORITHMS.get("ppo")
