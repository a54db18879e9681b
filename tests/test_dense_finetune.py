"""Dense-reward finetuning on the tiny random pipeline: x0 step rewards and PRIME's implicit step rewards against
hand computations, runs with each kind (reward queries counted, the implicit PRM resumed), and ``kind: none``
giving the outcome-only run bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from rewardtune.config import load_config
from rewardtune.diffusion.sampling import decode_latents
from rewardtune.finetune.config import DenseConfig, FinetuneConfig, OptimConfig, PRMConfig, RunConfig, SamplingConfig
from rewardtune.finetune.dense import DenseContext, X0StepRewards
from rewardtune.finetune.losses import prdp_loss_grouped
from rewardtune.finetune.prime import ImplicitPRM
from rewardtune.finetune.rollout import collect_rollouts
from rewardtune.finetune.update import trajectory_log_probs

PROMPTS = ["a red circle", "a blue square on a white background"]
N, B, T = 2, 3, 4


class Brightness:
    """Mean pixel value per image, counting the images it scored."""

    def __init__(self) -> None:
        self.queries = 0

    def __call__(self, images, prompts):
        self.queries += len(images)
        return images.mean((1, 2, 3))


def make_cfg(kind: str, **dense) -> FinetuneConfig:
    return FinetuneConfig(algorithm="grpo", algorithm_options={"clip_range": 0.5, "kl_beta": 0.0},
                          reward="jpeg_incompressibility", prompts_per_epoch=N, images_per_prompt=B, inner_steps=1,
                          sampling=SamplingConfig(steps=T, guidance=5.0, eta=1.0, batch_size=4),
                          optim=OptimConfig(lr=1e-2), dense=DenseConfig(kind=kind, **dense))


def test_x0_step_rewards_score_each_state_after_its_step(fresh_pipe):
    cfg = make_cfg("x0")
    reward = Brightness()
    rollouts = collect_rollouts(fresh_pipe, PROMPTS, B, cfg.sampling, reward, seeds=0, keep_x0=True)
    assert rollouts.x0_predictions.shape == (N * B, T, 4, 8, 8) and reward.queries == N * B
    got, _ = X0StepRewards(cfg)(rollouts, DenseContext(fresh_pipe, reward, cfg))
    assert got.shape == (N * B, T) and reward.queries == N * B * T  # (T-1) more per sample
    with torch.no_grad():  # by hand: step t's reward is the decoded x0 prediction of the state after it
        for t in range(T - 1):
            want = decode_latents(fresh_pipe, rollouts.x0_predictions[:, t + 1]).mean((1, 2, 3))
            torch.testing.assert_close(got[:, t], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:, -1], rollouts.rewards)  # the last step's state is x_0: the outcome


def test_progress_step_rewards_are_value_differences_under_the_base_model(fresh_pipe):
    """PAV: r_t = V(after step t) - V(before), V by K continuations of the *base* model (the policy here has a moved
    copy: the prover must not be it), V(x_0) = the outcome; K*T reward queries per sample."""
    from rewardtune.finetune.dense import ProgressStepRewards
    from rewardtune.process.values import Prover, trajectory_values

    cfg = make_cfg("progress", progress_continuations=2)
    base = copy.deepcopy(fresh_pipe.unet).requires_grad_(False)
    reward = Brightness()
    rollouts = collect_rollouts(fresh_pipe, PROMPTS, B, cfg.sampling, reward, seeds=0)
    with torch.no_grad():
        for p in fresh_pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the policy moved; the prover stays the base model
    got, metrics = ProgressStepRewards(cfg)(rollouts, DenseContext(fresh_pipe, reward, cfg, base))
    assert reward.queries == N * B + N * B * T * 2 and fresh_pipe.unet is not base
    trained = fresh_pipe.unet
    fresh_pipe.unet = base  # by hand: the values under the base model with the same seeds
    values = trajectory_values(Prover(fresh_pipe, cfg.sampling), rollouts.latents, rollouts.prompts, Brightness(), 2,
                               seed=rollouts.seeds[0], branches=torch.arange(T))
    fresh_pipe.unet = trained
    v = torch.cat([values.mean, rollouts.rewards[:, None]], 1)
    torch.testing.assert_close(got, v[:, 1:] - v[:, :-1])
    assert got.sum(1).tolist() == pytest.approx((rollouts.rewards - values.mean[:, 0]).tolist(), abs=1e-6)
    assert metrics["progress_value_se"] > 0


def test_implicit_step_rewards_and_the_prm_update_by_hand(fresh_pipe):
    """Epoch 1: phi is the reference, every step reward is 0 (up to float noise between the sampler's batch and the
    re-scoring's). Epoch 2: beta * (log pi_phi - log pi_ref) of phi after
    one PRDP step, recomputed here with trajectory_log_probs on copies of phi and of the reference."""
    beta = 0.5
    cfg = make_cfg("implicit", prm=PRMConfig(beta=beta, clip_range=0.1, lr=1e-2))
    reference = copy.deepcopy(fresh_pipe.unet).requires_grad_(False)
    prm = ImplicitPRM(cfg, fresh_pipe.unet)
    ctx = DenseContext(fresh_pipe, Brightness(), cfg)
    first = collect_rollouts(fresh_pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=0)
    rewards, metrics = prm(first, ctx)
    assert rewards.abs().max() < 1e-5 and metrics["prm_grad_norm"] > 0
    # the loss of phi's step: PRDP's on phi's log-probs (= the reference's here), i.e. sum over pairs (dr / beta)^2
    shape = (N, B, T)
    lp = first.log_probs_old.reshape(shape)
    assert metrics["prm_loss"] == pytest.approx(prdp_loss_grouped(lp, lp, lp, first.rewards.reshape(N, B), beta,
                                                                  0.1).item(), rel=1e-3)
    phi = copy.deepcopy(prm.model)
    second = collect_rollouts(fresh_pipe, PROMPTS, B, cfg.sampling, Brightness(), seeds=10, reference=reference)
    rewards, _ = prm(second, ctx)
    every, steps = torch.arange(N * B), torch.arange(T)
    with torch.no_grad():
        lp_phi = trajectory_log_probs(phi, fresh_pipe.scheduler, second, every, steps, 5.0, 1.0)
        lp_ref = trajectory_log_probs(reference, fresh_pipe.scheduler, second, every, steps, 5.0, 1.0)
    want = beta * (lp_phi - lp_ref)
    assert want.abs().max() > 1e-6  # phi moved away from the reference
    torch.testing.assert_close(rewards, want, rtol=1e-4, atol=1e-7)
    assert not any(p.grad is not None for p in prm.model.parameters())


def run(tiny_pipeline_dir, out, *extra):
    from rewardtune.finetune.run import run_finetune

    cfg = load_config(RunConfig, None, [
        f"model={tiny_pipeline_dir}", f"output_dir={out}", "prompts=[a red circle, a blue square]", "epochs=1",
        "lora_rank=2", "eval_prompts=[a red circle]", "eval_seeds=[0]", "train.algorithm=grpo",
        "train.algorithm_options={clip_range: 0.5, kl_beta: 0.0}", "train.reward=jpeg_incompressibility",
        "train.prompts_per_epoch=2", "train.images_per_prompt=3", "train.inner_steps=1", "train.sampling.steps=3",
        "train.optim.lr=1e-2", *extra])
    run_finetune(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    return load_file(str(out / "checkpoints" / "epoch_1" / "trainable.safetensors"))


SHARED = ("reward_mean", "reward_std", "loss", "clipfrac", "approx_kl", "grad_norm", "steps", "skipped")


def test_kind_none_is_the_outcome_run_and_weight_zero_changes_nothing(tiny_pipeline_dir, tmp_path):
    """``dense.kind: none`` is today's outcome-only path; an x0 run at weight 0 feeds per-step advantages equal to the
    outcome advantage through the whole dense path and must end with the same weights and losses, bit for bit."""
    none = run(tiny_pipeline_dir, tmp_path / "none")
    zero = run(tiny_pipeline_dir, tmp_path / "zero", "train.dense.kind=x0", "train.dense.weight=0.0")
    assert zero[0]["reward_queries"] == zero[0]["reward_queries_epoch"] == 6 * 3  # + (T-1) x0 images each
    assert "reward_queries" not in none[0]  # outcome only: today's record, key for key
    assert {k: none[0][k] for k in SHARED} == {k: zero[0][k] for k in SHARED}
    a, b = final_weights(tmp_path / "none"), final_weights(tmp_path / "zero")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "dense_raw_sum" not in none[0] and "seconds_dense" not in none[0]
    assert zero[0]["dense_raw_sum"] == pytest.approx(sum(zero[0]["dense_step_means"]), rel=1e-4)


def test_prime_run_resumes_its_implicit_prm(tiny_pipeline_dir, tmp_path):
    """One PRIME epoch, then a second one resumed from the checkpoint: the query count carries over, and the second
    epoch's implicit rewards are not ~0, which they would be had phi restarted from the reference."""
    prime = ("train.dense.kind=implicit", "train.dense.prm={beta: 0.5, lr: 1.0e-2}", "save_every=1")
    first = run(tiny_pipeline_dir, tmp_path / "run", "epochs=1", *prime)
    assert abs(first[0]["dense_raw_sum"]) < 1e-5 and first[0]["prm_grad_norm"] > 0  # phi is the reference
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1" / "state.pt", weights_only=True)
    assert state["extra"]["reward_queries"] == 6 and state["extra"]["dense"]["weights"]
    both = run(tiny_pipeline_dir, tmp_path / "run", "epochs=2", "resume=auto", "resume_allow_changes=[epochs]",
               *prime)
    assert [r["reward_queries"] for r in both] == [6, 12] and both[0] == first[0]
    assert max(abs(v) for v in both[1]["dense_step_means"]) > 1e-4 and both[1]["steps"] == 1
