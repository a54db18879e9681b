"""Pruning registries whose entries carry their needs: declarations, typed options, and a new method or importance
added with one function and one registry line, run through ``prune_unet`` and ``run_prune``."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import torch
import yaml
from test_prune_methods import tiny_unet

from rewardtune.config import load_config
from rewardtune.errors import ConfigError, UserError
from rewardtune.prune import IMPORTANCES, METHODS, Importance, PruneMethod, masks_of, method_options, prune_unet
from rewardtune.prune.common import merged_record, set_record
from rewardtune.prune.config import PruneConfig, RecoverConfig
from rewardtune.prune.masks import apply_masks, prunable_weights, sparsity
from rewardtune.prune.run import format_summary, run_prune

FAST = ["recover.steps=2", "recover.num_samples=4", "recover.batch_size=2", "evaluate.num_prompts=0",
        "sample_steps=2", "calibration_samples=2"]


# --- a toy method: one function (with its options) and one registry line ------------------------------------------

@dataclass
class LayerwiseOptions:
    skip: list[str] = field(default_factory=list, metadata={"help": "layers left dense"})


CALLS: list[dict] = []


def prune_layerwise(unet, ratio, options: LayerwiseOptions, context):
    """Toy: zero the ``ratio`` smallest |w| of every Conv/Linear layer separately (not in ``options.skip``)."""
    CALLS.append({"calibration": context.calibration, "options": options})
    model = copy.deepcopy(unet)
    masks = {}
    for name, w in prunable_weights(model).items():
        if name not in options.skip:
            k = int(ratio * w.numel())
            masks[name] = w.detach().abs() > (w.detach().abs().flatten().kthvalue(k).values if k else -1.0)
    apply_masks(model, masks)
    record = merged_record(unet, "layerwise", {"ratio": ratio})
    record["masked"] = sorted(masks)
    set_record(model, record)
    return model


@pytest.fixture
def layerwise():
    CALLS.clear()
    METHODS.register("layerwise", PruneMethod(prune_layerwise, LayerwiseOptions, "toy", needs_calibration=True))
    yield
    METHODS._entries.pop("layerwise")


def test_a_new_method_runs_in_prune_unet(layerwise):
    unet = tiny_unet()
    calibration = (torch.randn(3, 4, 8, 8), torch.randn(3, 6, 32))
    pruned = prune_unet(unet, method="layerwise", ratio=0.5, calibration=calibration, skip=("conv_out",))
    masks = masks_of(pruned)
    assert "conv_out" not in masks and sparsity(masks) == pytest.approx(0.5, abs=0.01)
    assert CALLS[-1]["options"].skip == ["conv_out"] and CALLS[-1]["calibration"] is calibration
    assert method_options("layerwise") == ["skip"]
    with pytest.raises(UserError, match="method 'layerwise' needs calibration="):  # its declared need
        prune_unet(unet, method="layerwise")
    with pytest.raises(ConfigError, match="'options.skip' expects a list of str"):
        prune_unet(unet, method="layerwise", calibration=calibration, skip="conv_out")


def test_a_new_method_runs_in_run_prune(layerwise, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    cfg = load_config(PruneConfig, None, [f"model={tiny_pipeline_dir}", f"out={out}", *FAST, "method=layerwise",
                                          "options.skip=[conv_out]"])
    summary = run_prune(cfg)
    assert CALLS[-1]["calibration"][0].shape[0] == 2  # calibration_samples latents, supplied because declared
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01) and summary["speeds_up_sampling"] is False
    assert "does not make sampling faster" in format_summary(summary)
    assert yaml.safe_load((out / "config.yaml").read_text())["options"] == {"skip": ["conv_out"]}
    assert json.loads((out / "report.json").read_text())["method"] == "layerwise"


# --- a toy importance ------------------------------------------------------------------------------------------

@dataclass
class NormOptions:
    p: int = field(default=1, metadata={"help": "the norm's order"})


def norm_importance(unet, options: NormOptions, context):
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=options.p)


def test_a_new_importance_joins_structured_options():
    IMPORTANCES.register("norm", Importance(norm_importance, NormOptions, "Lp norm"))
    try:
        assert method_options("structured", "norm") == ["global_pruning", "ignored", "p", "round_to"]
        assert method_options("magnitude", "norm") == ["min_keep"]  # only methods that rank channels take them
        pruned = prune_unet(tiny_unet(), ratio=0.5, importance="norm", p=1)
        assert pruned.conv_in.out_channels == 16
    finally:
        IMPORTANCES._entries.pop("norm")


# --- declarations and typed options of the shipped entries --------------------------------------------------------

def test_shipped_entries_declare_their_needs():
    structured, blocks = METHODS.get("structured"), METHODS.get("blocks")
    assert structured.uses_importance and structured.speeds_up_sampling and structured.check_plan is not None
    assert blocks.speeds_up_sampling and not blocks.uses_importance and blocks.check_plan is not None
    assert not METHODS.get("magnitude").speeds_up_sampling and not METHODS.get("magnitude").needs_training
    lottery = METHODS.get("lottery")
    assert lottery.needs_training and lottery.train_steps(lottery.options(round_steps=7)) == 7
    assert [n for n in IMPORTANCES.names() if IMPORTANCES.get(n).needs_calibration] == ["diff_pruning", "taylor"]
    granet, layers = METHODS.get("granet"), METHODS.get("layers")
    assert granet.needs_training and granet.train_steps(granet.options(round_steps=5)) == 5
    assert layers.speeds_up_sampling and not METHODS.get("bip").speeds_up_sampling
    assert layers.needs_calibration(layers.options()) and not layers.needs_calibration(layers.options(remove=["x"]))
    for registry in (METHODS, IMPORTANCES):
        for name in registry.names():
            for f in dataclasses.fields(registry.get(name).options):
                assert f.metadata.get("help"), (name, f.name)


@pytest.mark.parametrize("method, importance, expected", [
    ("structured", "magnitude", False), ("structured", "taylor", True), ("magnitude", "taylor", False),
    ("lottery", "magnitude", True), ("blocks", "magnitude", False), ("granet", "magnitude", True),
    ("bip", "magnitude", True), ("layers", "magnitude", True), ("semi_structured", "magnitude", False)])
def test_config_needs_data_follows_declarations(method, importance, expected):
    cfg = PruneConfig(method=method, importance=importance, recover=RecoverConfig(steps=0))
    assert cfg.needs_data is expected


@pytest.mark.parametrize("overrides, message", [
    (["method=lottery", "options.rounds=two"], "config key 'options.rounds' expects int, got 'two'"),
    (["method=lottery", "options.rounds=0"], "config key 'options.rounds' must be at least 1, got 0"),
    (["method=magnitude", "options.min_keep=1"], "config key 'options.min_keep' must be in [0, 1), got 1.0"),
    (["method=blocks", "options.mid_block=maybe"], "config key 'options.mid_block' expects bool, got 'maybe'"),
    (["importance=diff_pruning", "options.stride=0"], "config key 'options.stride' must be at least 1, got 0"),
    (["importance=taylor", "options.thr=0.1"], "config key 'options.thr' is not an option of method 'structured' "
                                               "with importance 'taylor'; valid options: batches, global_pruning"),
    (["method=magnitude", "options.round_to=8"], "config key 'options.round_to' is not an option of method "
                                                 "'magnitude'; valid options: min_keep"),
])
def test_options_are_checked_against_the_entries_dataclasses(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(PruneConfig, None, overrides)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_option_strings_become_typed_values():
    cfg = load_config(PruneConfig, None, ["importance=diff_pruning", "options.stride=20", "options.thr=1e-2",
                                          "options.ignored=[conv_out, conv_in]"])
    assert cfg.options == {"stride": 20, "thr": 0.01, "ignored": ["conv_out", "conv_in"]}
    assert type(cfg.options["stride"]) is int  # not the override's string
    choice = cfg.choice()
    assert choice.options.ignored == ("conv_out", "conv_in") and choice.importance_options.stride == 20
