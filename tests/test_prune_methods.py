"""Pruning methods on tiny random UNets: shapes, head counts, untouched inputs, hand-computed numerics, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rewardtune.errors import UserError
from rewardtune.prune import get_record, prune_unet, summarize
from rewardtune.prune.common import example_inputs
from rewardtune.prune.evaluate import frechet_distance
from rewardtune.prune.masks import global_magnitude_masks, masks_of, sparsity
from rewardtune.prune.pqindex import pq_index, sap_ratio, sparsity_report


def tiny_unet(layers_per_block: int = 1, seed: int = 0):
    """block_out_channels (32, 64), 8 heads (head_dim 4 / 8), GroupNorm(8): 4 / 8 channels per group."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=8).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs(unet):
    return example_inputs(unet, batch=2, tokens=6)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _attention(model):
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def test_structured_shrinks_tensors_keeps_io_and_heads(unet, inputs):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ref = _out(unet, inputs)
    pruned = prune_unet(unet, method="structured", ratio=0.5)
    assert _out(pruned, inputs).shape == ref.shape
    # 4 channels per GroupNorm group keep int(4 * 0.5) = 2: 32 -> 16 at the first stage, 64 -> 32 at the second
    assert pruned.conv_in.out_channels == 16 and pruned.conv_in.weight.shape == (16, 4, 3, 3)
    assert pruned.down_blocks[1].resnets[0].conv1.out_channels == 32
    assert pruned.conv_out.out_channels == 4
    for attn in _attention(pruned):
        assert attn.heads == 8 and attn.to_q.out_features % attn.heads == 0
        assert attn.to_k.out_features == attn.to_q.out_features and attn.inner_dim == attn.to_q.out_features
        assert attn.to_k.in_features in (attn.to_q.in_features, 32)  # cross-attention keeps the text width
    for name, tensor in unet.state_dict().items():  # the input model is untouched
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(_out(unet, inputs), ref)
    stats = summarize(unet, pruned, inputs)
    assert stats["params_pruned"] < 0.35 * stats["params"] and stats["mac_ratio"] < 0.35
    record = get_record(pruned)
    assert record["history"][-1]["method"] == "structured" and "conv_in" in record["modules"]


def test_attention_scale_fix_keeps_logits_of_kept_dims():
    """Hand check: keeping dims {0,1} of each 4-dim head must reproduce the original logits on those dims."""
    from diffusers.models.attention_processor import Attention

    from rewardtune.prune.structured import fix_after_pruning

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = torch.randn(1, 5, 8)
    keep = torch.tensor([0, 1, 4, 5])
    q, k = attn.to_q(x)[..., keep].view(1, 5, 2, 2), attn.to_k(x)[..., keep].view(1, 5, 2, 2)
    expected = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(4)  # original scale 1/sqrt(4)
    for name in ("to_q", "to_k", "to_v"):
        old = getattr(attn, name)
        new = nn.Linear(8, 4, bias=False)
        new.weight.data = old.weight.data[keep].clone()
        setattr(attn, name, new)
    fix_after_pruning(attn, {"": 4})
    q2, k2 = attn.to_q(x).view(1, 5, 2, 2), attn.to_k(x).view(1, 5, 2, 2)
    got = torch.einsum("bihd,bjhd->bhij", q2, k2) * attn.scale
    assert torch.allclose(got, expected, atol=1e-6)
    assert attn.scale == pytest.approx(2 ** -0.5) and attn.inner_dim == 4
    sdpa = torch.einsum("bihd,bjhd->bhij", q2, k2) / math.sqrt(2)  # what SDPA's default scale computes
    assert torch.allclose(sdpa, expected, atol=1e-6)


@pytest.mark.parametrize("importance, options", [("taylor", {"batches": 2}), ("diff_pruning", {"stride": 250})])
def test_gradient_importances_run_on_calibration(unet, inputs, importance, options):
    calibration = (torch.randn(4, 4, 8, 8), torch.randn(4, 6, 32))
    pruned = prune_unet(unet, ratio=0.5, importance=importance, calibration=calibration, **options)
    assert _out(pruned, inputs).shape == (2, 4, 8, 8)
    assert all(p.grad is None for p in pruned.parameters())
    with pytest.raises(UserError, match="needs calibration"):
        prune_unet(unet, ratio=0.5, importance=importance)


def test_blocks_bk_sdm_small(inputs):
    teacher = tiny_unet(layers_per_block=2)
    student = prune_unet(teacher, method="blocks", layers_per_block=1, mid_block=False)
    assert student.config.layers_per_block == 1 and student.mid_block is None
    assert len(student.down_blocks[0].resnets) == 1 and len(student.up_blocks[0].resnets) == 2
    assert _out(student, inputs).shape == (2, 4, 8, 8)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["down_blocks.0.resnets.0.conv1.weight"], t["down_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(s["up_blocks.0.resnets.0.conv1.weight"], t["up_blocks.0.resnets.0.conv1.weight"])
    # the student's last up layer takes the teacher's last one (it consumes the stage-input skip)
    assert torch.equal(s["up_blocks.1.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert summarize(teacher, student, inputs)["param_ratio"] < 0.75


def test_global_magnitude_threshold_by_hand():
    weights = {"a": torch.tensor([0.1, -0.5, 0.2, 0.9]), "b": torch.tensor([[0.05, 0.3], [-0.02, 0.4]])}
    masks = global_magnitude_masks(weights, ratio=0.5, min_keep=0.0)
    # |w| sorted: .02 .05 .1 .2 .3 .4 .5 .9 -> floor(0.5*8)=4 smallest (<= 0.2) go
    assert masks["a"].tolist() == [False, True, False, True]
    assert masks["b"].tolist() == [[False, True], [False, True]]
    # a per-layer minimum of ceil(0.25 * 8) = 2 weights protects layer b's two largest even at ratio 0.75
    masks = global_magnitude_masks(weights, ratio=0.75, min_keep=0.25)
    assert masks["b"].tolist() == [[False, True], [False, True]] and masks["a"].sum() == 2
    assert sparsity(masks) == 0.5  # 6 candidates could go, but only 4 are not protected


def test_magnitude_masks_zero_weights_and_keep_every_layer(unet, inputs):
    pruned = prune_unet(unet, method="magnitude", ratio=0.9)
    masks = masks_of(pruned)
    assert sparsity(masks) == pytest.approx(0.9, abs=0.01)
    assert all(m.sum() >= 1 for m in masks.values())
    assert summarize(unet, pruned, inputs)["mac_ratio"] == 1.0  # dense kernels: same work


def test_lottery_rewinds_survivors_and_trains_each_round(unet):
    calls = []

    def train_fn(model, masks):
        calls.append(sparsity(masks) if masks else 0.0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)

    pruned = prune_unet(unet, method="lottery", ratio=0.75, rounds=2, train_fn=train_fn)
    masks = masks_of(pruned)
    assert len(calls) == 2 and calls[1] == pytest.approx(0.5, abs=0.01)  # 1 - (1-0.75)^(1/2)
    assert sparsity(masks) == pytest.approx(0.75, abs=0.01)
    name = next(iter(masks))
    w, w0 = pruned.get_submodule(name).weight, unet.get_submodule(name).weight
    assert torch.equal(w[masks[name]], w0[masks[name]])  # survivors are rewound


def test_pq_index_and_sap_by_hand():
    assert pq_index(torch.ones(4)) == pytest.approx(0.0, abs=1e-12)
    assert pq_index(torch.tensor([4.0, 0, 0, 0])) == pytest.approx(0.75)  # 1 - 4^(1-2) * 4/4
    assert pq_index(torch.tensor([1.0, 2.0])) == pytest.approx(1 - 0.5 * (1 + math.sqrt(2)) ** 2 / 3)
    # p=.5, q=1: r = d (1+eta)^-2 (1-I)^1 = 4 * 0.25 = 1 -> c = min(1.2 * (1 - 1/4), 0.9) = 0.9
    assert sap_ratio(0.75, 4, eta=0.0) == pytest.approx(0.9)
    assert sap_ratio(0.1, 100, eta=0.0) == pytest.approx(1.2 * 0.1)
    model = tiny_unet()
    rows = sparsity_report(model)
    assert rows[-1].name == "<global>" and all(0 <= r.pq_index < 1 for r in rows)
    flat = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert rows[-1].pq_index == pytest.approx(pq_index(flat), rel=1e-9)  # the global row adds per-layer sums


def test_frechet_distance_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = a * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([1.0, 0.0, 0.0])
    # diagonal covariances: |mu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 with s_b = k^2 s_a
    var = a.var(0)
    expected = 1.0 + float(((var.sqrt() - (var * torch.tensor([1.0, 4.0, 9.0])).sqrt()) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5, "half"])
def test_ratio_outside_open_interval(unet, ratio):
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        prune_unet(unet, ratio=ratio)


def test_plan_that_removes_a_whole_layer(unet):
    with pytest.raises(UserError, match="would remove a whole layer.*GroupNorm"):
        prune_unet(unet, ratio=0.8)  # 4 channels per group keep int(4 * 0.2) = 0
    with pytest.raises(UserError, match="would remove a whole layer"):
        prune_unet(tiny_unet(layers_per_block=1), method="blocks", layers_per_block=0)


def test_unsupported_modules_and_names(unet):
    with pytest.raises(UserError, match="unsupported module type Linear"):
        prune_unet(nn.Linear(4, 4))

    class LoraLinear(nn.Linear):
        pass

    wrapped = tiny_unet()
    old = wrapped.time_embedding.linear_1
    wrapped.time_embedding.linear_1 = LoraLinear(old.in_features, old.out_features)
    with pytest.raises(UserError, match="unsupported module type LoraLinear"):
        prune_unet(wrapped)
    with pytest.raises(UserError, match="unknown pruning method 'bogus'; choose one of: bip, blocks, granet"):
        prune_unet(unet, method="bogus")
    with pytest.raises(UserError, match="unknown pruning importance"):
        prune_unet(unet, importance="random")
    with pytest.raises(UserError, match=r"layer 'conv_outt' \(options.ignored or options.ratios\) is not a module"):
        prune_unet(unet, ignored=("conv_outt",))


def test_ignored_patterns_keep_every_matching_layer(unet):
    pruned = prune_unet(unet, ratio=0.5, ignored=("conv_out", "*.to_q", "*.to_k", "*.to_v"))
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v")):
            kept = pruned.get_submodule(name)
            assert kept.out_features == module.out_features, name  # outputs kept; inputs follow the layer before
    assert pruned.get_submodule("conv_in").out_channels == unet.conv_in.out_channels // 2
    out = pruned(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 5, 32))
    assert out.sample.shape == (2, 4, 8, 8)
    with pytest.raises(UserError, match=r"layer '\*\.to_qq' \(options.ignored or options.ratios\) is not a module"):
        prune_unet(unet, ignored=("*.to_qq",))
