"""The statistics of the benchmark scripts (scripts/runs.py): Student's t p-values against closed forms and tables."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from runs import paired_difference, student_t_p_value  # noqa: E402


@pytest.mark.parametrize("t, df, p", [
    (12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (9.925, 2, 0.01), (0.0, 3, 1.0)])
def test_p_values_match_t_tables(t, df, p):
    assert student_t_p_value(t, df) == pytest.approx(p, abs=2e-4)
    assert student_t_p_value(-t, df) == student_t_p_value(t, df)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 7.0])
def test_p_values_match_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert student_t_p_value(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-9)
    assert student_t_p_value(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-9)


def test_paired_difference_by_hand():
    # differences 0.5, 0.8, 0.1: mean 0.4667, sd 0.3512, t = 0.4667 / (0.3512 / sqrt 3) = 2.3014, df 2
    mean = 1.4 / 3
    t = mean / (math.sqrt(((0.5 - mean) ** 2 + (0.8 - mean) ** 2 + (0.1 - mean) ** 2) / 2) / math.sqrt(3))
    p = 1 - t / math.sqrt(t * t + 2)
    assert paired_difference([1.0, 2.0, 3.0], [0.5, 1.2, 2.9]) == f"+0.467 ± 0.351 (p = {p:.2f})"
    assert paired_difference([1.0], [0.25]) == "+0.750"
    assert paired_difference([1.0, 2.0], [1.0, 2.0]) == "+0.000 ± 0.000 (p = 1.00)"


def test_seed_rows_give_mean_and_std_over_seeds_and_need_every_seed_to_meet_the_target():
    from bench_prune import seed_rows

    def q(speedup, mean, change):
        return dict(speedup=speedup, mean=mean, change=change)

    results = {"plan A, seed 0": q(2.0, 0.97, -0.01), "plan A, seed 1": q(2.2, 0.98, -0.02),
               "plan A, seed 2": q(2.4, 0.99, -0.03), "plan B, seed 0": q(1.9, 0.99, 0.0),
               "plan B, seed 1": q(2.1, 0.99, 0.0), "plan C, seed 0": q(3.0, 0.99, 0.0), "plan D": q(3.0, 0.99, 0.0)}
    # plan A: speed-ups 2.0/2.2/2.4 -> 2.20 ± 0.20; fidelity 0.980 ± 0.010; change -2.0 ± 1.0 %; every seed meets it
    # plan B: 1.9 misses 2x in one seed -> "no"; plan C (one seed) and plan D (no seed) get no summary row
    assert seed_rows(results) == [
        "| **plan A, mean ± std over 3 seeds** | – | 2.20 ± 0.20x | 0.980 ± 0.010 | -2.0 ± 1.0 % | yes |",
        "| **plan B, mean ± std over 2 seeds** | – | 2.00 ± 0.14x | 0.990 ± 0.000 | +0.0 ± 0.0 % | no |"]


def test_mask_screen_rows_give_standard_errors_for_one_seed_and_std_over_seeds():
    from prune_masks_equal_compute import row

    one = {"mean": 0.5, "se": 0.02, "change": -0.25, "change_se": 0.015, "sparsity": 0.9, "seconds": 100.0}
    assert row("GraNet", [one]) == "| GraNet | 1 | 0.900 | 0.500 ± 0.020 | -25.0 ± 1.5 % | 100 s |"
    # fidelities 0.5, 0.6, 0.7: mean 0.6, sample std 0.1; changes -25, -15, -5 %: mean -15, std 10
    qs = [{**one, "mean": m, "change": c, "seconds": s} for m, c, s in ((0.5, -0.25, 90.0), (0.6, -0.15, 100.0),
                                                                         (0.7, -0.05, 110.0))]
    assert row("GraNet", qs) == "| GraNet | 3 | 0.900 | 0.600 ± 0.100 | -15.0 ± 10.0 % | 100 s |"


def test_prune_finetune_contrasts_pair_by_seed_and_reuse_the_one_base_evaluation():
    from prune_finetune import contrasts

    def scores(gold):
        return {"eval_reward": 8.0, "eval_gold": gold, "heldout_reward": 8.0, "heldout_gold": gold}

    results = {"base": {0: scores(0.80)},
               "finetuned": {0: scores(0.83), 1: scores(0.85), 2: scores(0.84)},
               "structured": {0: scores(0.82), 2: scores(0.80)},
               "finetuned -> structured": {0: scores(0.84), 1: scores(0.90), 2: scores(0.83)}}
    lines = {line.split(" | ")[0]: line for line in contrasts(results).splitlines() if line.startswith("| (") or
             line.startswith("| PRDP")}
    # finetuned - base: 0.03, 0.05, 0.04 -> mean 0.04, sd 0.01, t = 0.04 / (0.01 / sqrt 3) = 6.93, df 2
    t = 0.04 / (0.01 / 3 ** 0.5)
    p = 1 - t / (t * t + 2) ** 0.5
    gain = lines["| PRDP's gain on the unpruned model"]
    assert f"| 3 | +0.000 ± 0.000 (p = 1.00) | +0.040 ± 0.010 (p = {p:.2f}) |" in gain
    # finetuned -> structured - structured: only seeds 0 and 2 have both: 0.02, 0.03
    teacher = lines["| (b) what the finetuned teacher adds to structured pruning"]
    assert "| 2 |" in teacher and "+0.025 ± 0.007" in teacher
    assert not any("PRDP's gain on the pruned model" in line for line in lines)  # structured -> PRDP not run


def test_a_trial_run_keeps_its_figures_out_of_docs(tmp_path):
    from argparse import Namespace

    from runs import FIGURES, ROOT, figures_dir, shown

    assert figures_dir(Namespace(out=tmp_path, no_write=True)) == tmp_path
    assert figures_dir(Namespace(out=tmp_path, no_write=False)) == FIGURES
    assert shown(FIGURES / "a.png") == "docs/figures/a.png"
    assert shown(tmp_path / "a.png") == str(tmp_path / "a.png") and not (tmp_path / "a.png").is_relative_to(ROOT)


def test_each_claim_is_decided_by_a_seed_paired_difference():
    from reproduce_prdp import deciding_pair, paired_line

    rows = lambda *gold: [{"d_eval_reward": 0.0, "d_eval_gold": g, "d_heldout_gold": 0.0} for g in gold]  # noqa: E731
    line = paired_line(1, [1.0, 100.0], {"prdp_small": rows(0.5, 0.9, 0.2), "ddpo_small": rows(0.0, 0.1, 0.1)})
    assert line.startswith("prdp_small − ddpo_small, paired by seed: ")
    assert "Δ gold (eval) " + paired_difference([0.5, 0.9, 0.2], [0.0, 0.1, 0.1]) in line  # +0.467 ± 0.351
    assert paired_line(2, [1.0], {"prdp_small": rows(0.1)}) == ""  # its arms did not run
    assert deciding_pair(4, [10.0, 1.0, 100.0])[:2] == ("prdp_small", "prdp_small_beta100")  # beta 1 is the preset


def test_noise_share_splits_the_variance_by_hand():
    from noise_share import variance_split

    # one prompt, M = 2 initial latents x K = 2 continuations: rows [1, 3] and [5, 5]
    r = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]])
    split = variance_split(r)
    # total: mean 3.5, squared deviations 6.25 + 0.25 + 2.25 + 2.25 = 11 -> 2.75
    # between: row means 2 and 5 -> population variance 2.25; within: variances 1 and 0 -> mean 0.5
    assert split["total"].item() == pytest.approx(2.75)
    assert split["between"].item() == pytest.approx(2.25)
    assert split["within"].item() == pytest.approx(0.5)
    assert (split["between"] + split["within"]).item() == pytest.approx(split["total"].item())
    assert split["between_share"].item() == pytest.approx(2.25 / 2.75)
    assert split["within_share"].item() == pytest.approx(0.5 / 2.75)
    # a prompt whose score never varies has no share (NaN), not 0/0 noise or a made-up 0
    assert variance_split(torch.ones(1, 2, 2))["within_share"].isnan().all()
    # best of each row's continuations minus its mean: (3 - 2 + 5 - 5) / 2; best first continuation: 5 - 3
    assert split["room_steps"].item() == pytest.approx(0.5)
    assert split["room_noises"].item() == pytest.approx(2.0)


def test_gradient_snr_by_hand():
    from gradient_snr import group_centred, snr

    centred = group_centred(torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0]), torch.tensor([0, 0, 1, 1, 1]))
    assert torch.allclose(centred, torch.tensor([-1.0, 1.0, -10.0, 0.0, 10.0]))
    # 2 batches x 1 step x 2 weights: g = (1, 0) and (3, 2); mean (2, 1)
    grads = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])
    stats = snr(grads)
    # noise: (||(-1,-1)||^2 + ||(1,1)||^2) / (2 - 1) = 4; signal: ||(2,1)||^2 - 4 / 2 = 3
    assert stats["noise"].item() == pytest.approx(4.0)
    assert stats["signal"].item() == pytest.approx(3.0)
    assert stats["snr"].item() == pytest.approx(0.75)
    assert stats["norm"].item() == pytest.approx((1.0 + 13 ** 0.5) / 2)


def test_gradient_snr_signal_is_unbiased_for_pure_noise():
    from gradient_snr import snr

    torch.manual_seed(0)
    # 4 batches x 1000 steps x 3 weights of zero-mean, unit-variance gradients: ||mean||^2 is 3/4 on average, the
    # unbiased signal 0 (sd of its mean over the steps ~0.02); the noise is 3 (the summed variance)
    grads = torch.randn(4, 1000, 3)
    stats = snr(grads)
    assert grads.mean(0).pow(2).sum(-1).mean().item() == pytest.approx(0.75, abs=0.1)
    assert abs(stats["signal"].mean().item()) < 0.1
    assert stats["noise"].mean().item() == pytest.approx(3.0, abs=0.2)


def test_final_scores_read_a_longer_run_as_it_stood_at_an_epoch(tmp_path):
    import json

    from runs import final_scores

    evals = [{"epoch": e, "eval_gold": 0.8 + 0.01 * e / 5, "eval_reward": float(e)} for e in (0, 5, 10)]
    metrics = [{"epoch": e, "approx_kl": 0.5, "steps": 2, "seconds_sampling": 30.0, "seconds_reward": 0.0,
                "seconds_update": 30.0} for e in range(1, 11)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    at5, last = final_scores(tmp_path, 5), final_scores(tmp_path)
    assert at5["d_eval_gold"] == pytest.approx(0.01) and last["d_eval_gold"] == pytest.approx(0.02)
    assert at5["kl"] == pytest.approx(5 * 0.5 * 2) and last["kl"] == pytest.approx(10 * 0.5 * 2)
    assert at5["minutes"] == pytest.approx(5.0) and last["minutes"] == pytest.approx(10.0)
    with pytest.raises(SystemExit, match="no evaluation at epoch 7"):
        final_scores(tmp_path, 7)


def test_score_scale_matches_the_ddim_step_by_hand():
    from diffusers import DDIMScheduler
    from gradient_snr import score_scale

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps.tolist()
    scales = score_scale(scheduler, timesteps, 1.0)
    # by hand, epsilon prediction: mean = sqrt(a_prev) (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - s^2)
    # eps, s^2 = (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev); the last step's a_prev is alphas_cumprod[0]
    alphas = scheduler.alphas_cumprod.double()
    for t, scale in zip(timesteps, scales):
        a_t, a_prev = alphas[t], alphas[t - 100] if t >= 100 else alphas[0]
        s = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        d_mean = -a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt() + (1 - a_prev - s**2).sqrt()
        assert scale == pytest.approx(float(d_mean.abs() / s), rel=1e-6)
    assert scales[timesteps.index(101)] == pytest.approx(8.32, abs=0.01)  # the 10-step schedule's last large jump


def test_every_control_arm_is_a_valid_finetune_config():
    # an arm's overrides are only parsed when its run starts, hours into a study: a typo must fail here instead
    from controls import CONTROLS, PRESET, SETTINGS, arms
    from runs import ROOT

    from rewardtune.commands import load_preset

    plan = arms(list(SETTINGS), list(CONTROLS), PRESET)
    assert len(plan) == len(SETTINGS) * len(CONTROLS)
    configs = {arm.name: load_preset(ROOT / arm.preset, ROOT / "configs", arm.overrides) for arm in plan}
    eps = configs["lora8-lr5e-4-beta10-eps1e-3-proxy"].train
    assert (eps.optim.eps, eps.prdp.beta) == (1e-3, 10)
    assert configs["full-lr5e-5-oracle"].lora_rank is None


def test_a_claim_holding_only_in_seed_means_is_reported_within_noise():
    from reproduce_prdp import verdicts

    rows = lambda *gold: [{"d_eval_reward": 0.0, "d_eval_gold": g, "d_heldout_gold": 0.01} for g in gold]  # noqa: E731
    # claim 2's rule holds in the means (0.016 > 0.015 > 0) but the paired differences +0.1, -0.1, +0.003 are noise
    noisy = verdicts({"prdp_large": rows(0.1, -0.05, 0.0), "ddpo_large": rows(0.0, 0.05, -0.003)}, [1.0])[2]
    p = student_t_p_value((0.003 / 3) / (statistics.stdev([0.1, -0.1, 0.003]) / math.sqrt(3)), 2)
    assert noisy.startswith("Within noise (the rule holds in the seed means, but its paired difference has "
                            f"p = {p:.2f})")
    clear = verdicts({"prdp_large": rows(0.10, 0.11, 0.12), "ddpo_large": rows(0.0, 0.0, 0.01)}, [1.0])[2]
    assert clear.startswith("Reproduced: PRDP Δgold +0.110")
    failed = verdicts({"prdp_large": rows(0.0, 0.0, 0.01), "ddpo_large": rows(0.10, 0.11, 0.12)}, [1.0])[2]
    assert failed.startswith("Not reproduced")
    one = verdicts({"prdp_large": rows(0.1), "ddpo_large": rows(0.0)}, [1.0])[2]
    assert one.startswith("Holds in one seed (untested)")
