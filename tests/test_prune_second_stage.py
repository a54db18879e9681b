"""Issue 15's methods on tiny random UNets: GraNet's regrowth step, BiP's mask update, layer tickets that plain
diffusers loads, 2:4 masks and their capability check, scratch re-initialisation, per-module structured ratios and
sampler-timestep distillation; hand-computed cases where the method has arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from test_prune_methods import tiny_unet

from rewardtune.errors import UserError
from rewardtune.prune import get_record, masks_of, prune_unet
from rewardtune.prune.bip import score_update
from rewardtune.prune.common import example_inputs
from rewardtune.prune.granet import cubic_sparsity, prune_and_regrow, regrow_rate
from rewardtune.prune.layers import layer_units, layers_config
from rewardtune.prune.masks import sparsity
from rewardtune.prune.semi_structured import two_four_mask


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def calibration(unet):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 6, 32, generator=g)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


# GraNet ------------------------------------------------------------------------------------------------------------

def test_regrowth_step_by_hand():
    weight = torch.tensor([0.1, 0.5, -0.3, 0.0, 0.2])
    grad = torch.tensor([0.9, 0.0, 0.0, 2.0, 0.1])
    mask = torch.tensor([True, True, True, False, True])
    # nnz 4, fraction 0.25 -> ceil(1.0) = 1: drop |w| = 0.1 (index 0), regrow the dead position of largest |grad|
    # among {0 (just dropped), 3}: |2.0| at index 3
    assert prune_and_regrow(weight, grad, mask, 0.25).tolist() == [False, True, True, True, True]
    # fraction 0.5 -> 2: drop indices 0 and 4 (0.1, 0.2); regrow the 2 largest |grad| among {0, 3, 4}: 3 and 0
    assert prune_and_regrow(weight, grad, mask, 0.5).tolist() == [True, True, True, True, False]
    assert prune_and_regrow(weight, grad, mask, 0.0).equal(mask)


def test_granet_schedules_by_hand():
    assert cubic_sparsity(0, 4, 0.9) == 0.0 and cubic_sparsity(4, 4, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(2, 4, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))  # 0.7875
    assert cubic_sparsity(1, 2, 0.9, 0.5) == pytest.approx(0.9 - 0.4 * 0.125)
    assert regrow_rate(0, 4, 0.5) == pytest.approx(0.5) and regrow_rate(4, 4, 0.5) == pytest.approx(0.005)
    assert regrow_rate(2, 4, 0.5) == pytest.approx(0.005 + 0.495 * 0.5)


@pytest.mark.parametrize("initial", [0.0, 0.5])
def test_granet_trains_between_rounds_and_ends_at_the_ratio(unet, calibration, initial):
    seen, g = [], torch.Generator().manual_seed(0)

    def train_fn(model, masks):
        seen.append(sparsity(masks))
        with torch.no_grad():  # "training": every surviving weight moves (regrown zeros become live weights)
            for name, mask in masks.items():
                weight = model.get_submodule(name).weight
                weight.add_(0.01 * torch.randn(weight.shape, generator=g) * mask)

    pruned = prune_unet(unet, method="granet", ratio=0.8, calibration=calibration, train_fn=train_fn, updates=2,
                        initial_sparsity=initial)
    assert len(seen) == 2 and seen[0] == pytest.approx(initial, abs=0.01)
    assert seen[1] == pytest.approx(cubic_sparsity(1, 2, 0.8, initial), abs=0.01)
    assert sparsity(masks_of(pruned)) == pytest.approx(0.8, abs=0.01)
    assert get_record(pruned)["history"][-1]["method"] == "granet"


# BiP ---------------------------------------------------------------------------------------------------------------

def test_bip_score_update_by_hand():
    scores, theta = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    grad, mask = torch.tensor([2.0, 3.0]), torch.tensor([True, False])
    # g_m = theta*G = [1, -3]; g_theta = m*G = [2, 0]; s - 0.1*(g_m - 0.5*g_m*g_theta) = [1 - 0.1*(1-1), 2 + 0.3]
    assert score_update(scores, theta, grad, mask, 0.1, 0.5).tolist() == pytest.approx([1.0, 2.3])


def test_bip_zero_iterations_is_magnitude_and_iterations_keep_the_density(unet, calibration):
    magnitude = masks_of(prune_unet(unet, method="magnitude", ratio=0.7))
    zero = masks_of(prune_unet(unet, method="bip", ratio=0.7, calibration=calibration, iterations=0))
    assert all(zero[n].equal(magnitude[n]) for n in magnitude)
    pruned = prune_unet(unet, method="bip", ratio=0.7, calibration=calibration, iterations=2, score_lr=10.0,
                        batch_size=2)
    masks = masks_of(pruned)
    assert sparsity(masks) == pytest.approx(0.7, abs=0.01)
    assert any(not masks[n].equal(magnitude[n]) for n in masks)  # the scores moved the mask
    assert all(p.requires_grad == q.requires_grad for p, q in zip(pruned.parameters(), unet.parameters()))


# layer tickets -----------------------------------------------------------------------------------------------------

def test_layer_units_and_configs(unet):
    config = dict(unet.config)
    assert list(layer_units(config)) == ["down_blocks.0.attentions", "down_blocks.1.attentions",
                                         "up_blocks.0.attentions", "up_blocks.1.attentions", "mid_block.attentions",
                                         "mid_block"]
    new = layers_config(config, ["up_blocks.0.attentions", "mid_block.attentions"])
    assert new["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D"] and new["mid_block_type"] == "UNetMidBlock2D"
    assert layers_config(config, ["mid_block"])["mid_block_type"] is None
    with pytest.raises(UserError, match="layer unit 'down_blocks.2.attentions' is not removable"):
        layers_config(config, ["down_blocks.2.attentions"])


def test_layer_removal_is_a_loadable_diffusers_unet(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    inputs = example_inputs(unet, batch=2, tokens=6)
    pruned = prune_unet(unet, method="layers", weights="trained", remove=["mid_block.attentions",
                                                                          "down_blocks.0.attentions"])
    assert pruned.mid_block.attentions is None or len(pruned.mid_block.attentions) == 0
    assert len(pruned.mid_block.resnets) == 1 and not hasattr(pruned.down_blocks[0], "attentions")
    key = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(pruned.state_dict()[key], unet.state_dict()[key])
    pruned.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()  # plain diffusers, no rewardtune code
    assert torch.allclose(_out(loaded, inputs), _out(pruned, inputs), atol=1e-6)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in unet.parameters())


def test_layer_tickets_remove_the_lowest_snip_units_at_initialisation(unet, calibration):
    pruned = prune_unet(unet, method="layers", ratio=0.3, calibration=calibration, seed=5)  # round(0.3*6) = 2 units
    record = get_record(pruned)["history"][-1]
    scores = record["scores"]
    assert record["removed"] == sorted(scores, key=scores.get)[:2] and record["weights"] == "init"
    fresh = not torch.equal(pruned.conv_in.weight, unet.conv_in.weight)
    assert fresh  # a random initialisation, not unet's weights
    with pytest.raises(UserError, match="count 7 exceeds the 6 removable layer units"):
        prune_unet(unet, method="layers", calibration=calibration, count=7)


# 2:4 ---------------------------------------------------------------------------------------------------------------

def test_two_four_mask_by_hand():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -6.0, 0.0]])
    assert two_four_mask(w).int().tolist() == [[0, 1, 1, 0, 1, 0, 1, 0]]


def test_semi_structured_on_cpu_gives_a_clear_message_or_dense_zeros(unet):
    with pytest.raises(UserError, match=r"need a CUDA GPU of compute capability >= 8.0; this UNet is on cpu; set "
                                        r"options.accelerate=false"):
        prune_unet(unet, method="semi_structured", accelerate=True)
    pruned = prune_unet(unet, method="semi_structured")
    masks = masks_of(pruned)
    assert masks and sparsity(masks) == pytest.approx(0.5)
    for mask in masks.values():  # exactly 2 of every 4
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


# scratch baseline, structured ratios, sampler timesteps --------------------------------------------------------------

def test_reinitialise_keeps_shapes_and_masks(unet):
    from rewardtune.prune.recover import reinitialise

    masked = prune_unet(unet, method="magnitude", ratio=0.6)
    before = masks_of(masked)
    with torch.no_grad():
        reinitialise(masked, seed=3)
    after = masks_of(masked)
    assert all(torch.equal(before[n], after[n] | before[n]) and not (after[n] & ~before[n]).any() for n in before)
    assert not torch.equal(masked.conv_in.weight, unet.conv_in.weight)


def test_structured_per_module_ratios(unet):
    pruned = prune_unet(unet, ratio=0.5, ratios={"down_blocks.1.resnets.0.conv1": 0.0})
    assert pruned.down_blocks[1].resnets[0].conv1.out_channels == 64  # kept whole
    assert pruned.down_blocks[0].resnets[0].conv1.out_channels == 16  # halved
    with pytest.raises(UserError, match="'down_blocks.7' .* is not a module"):
        prune_unet(unet, ratio=0.5, ratios={"down_blocks.7": 0.1})


def test_distillation_draws_only_the_sampler_timesteps():
    from diffusers import DDIMScheduler

    from rewardtune.prune.recover import DistillData, _batch
    from rewardtune.prune.run import sampler_timesteps
    from rewardtune.shapes.tiny_models import scheduler_config

    grid = sampler_timesteps(DDIMScheduler(**scheduler_config()), 20)
    assert len(grid) == 20 and grid[0] > grid[-1]
    data = DistillData(torch.zeros(3, 4, 2, 2), torch.zeros(3, 5, 8), torch.zeros(1, 5, 8))
    alphas = torch.linspace(0.99, 0.01, 1000)
    _, t, _, _ = _batch(data, torch.Generator().manual_seed(0), 256, 0.1, alphas, grid)
    assert set(t.tolist()) <= set(grid.tolist()) and len(set(t.tolist())) > 10
    assert math.isclose(float(alphas[0]), 0.99, rel_tol=1e-6)


@pytest.mark.slow
def test_new_methods_run_from_the_cli(tiny_pipeline_dir, tmp_path):
    import json

    from test_prune_cli import FAST

    from rewardtune.cli import main

    runs = {"granet": ["method=granet", "ratio=0.8", "options={updates: 2, round_steps: 1, batch_size: 2}"],
            "bip": ["method=bip", "ratio=0.6", "options={iterations: 1, batch_size: 2}"],
            "layers": ["method=layers", "options={count: 1}"],
            "semi": ["method=semi_structured", "options={min_features: 4}"],
            "scratch": ["recover.init=scratch", "recover.timesteps=3"]}
    for name, extra in runs.items():
        assert main(["prune", f"model={tiny_pipeline_dir}", f"out={tmp_path / name}", *FAST, *extra]) == 0, name
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["compute"]["steps"] == (2 * 1 + 2 if name == "granet" else 2), name
        # layer tickets keep a random initialisation (options.weights defaults to init): trained from scratch
        assert report["compute"]["recover_init"] == ("scratch" if name in ("layers", "scratch") else "pruned"), name


def test_paired_change_by_hand():
    from rewardtune.prune.evaluate import paired_change

    base, values = torch.tensor([1.0, 1.0, 0.5, 0.5]), torch.tensor([1.0, 0.5, 0.5, 0.5])
    q = paired_change(values, base)  # d = [0, -0.5, 0, 0]: mean -0.125, sd 0.25; mean(base) 0.75
    assert q["mean"] == pytest.approx(0.625) and q["change"] == pytest.approx(-0.125 / 0.75)
    assert q["change_se"] == pytest.approx(0.25 / 2 / 0.75) and q["se"] == pytest.approx(0.25 / 2)
