"""Pruned UNets and pipelines: save -> load round trips (no pickled modules), load_pipeline, mismatch errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_prune_methods import tiny_unet

from rewardtune.errors import UserError
from rewardtune.prune import prune_unet
from rewardtune.prune.common import RECORD_KEY, example_inputs
from rewardtune.prune.io import load_pruned_unet, needs_rebuild, save_pruned_pipeline


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("plan", [
    [("structured", {})],
    [("blocks", {"layers_per_block": 1}), ("structured", {})],
    [("magnitude", {})],
])
def test_save_load_round_trip_is_exact(tmp_path, plan):
    from diffusers import UNet2DConditionModel

    model = tiny_unet(layers_per_block=2)
    for method, options in plan:
        model = prune_unet(model, method=method, ratio=0.5, **options)
    inputs = example_inputs(model, batch=2, tokens=5)
    model.save_pretrained(tmp_path / "unet")
    assert not list(tmp_path.glob("unet/*.bin")) and not list(tmp_path.glob("unet/*.pt"))
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert [h["method"] for h in config[RECORD_KEY]["history"]] == [m for m, _ in plan]
    structural = plan[-1][0] == "structured"
    assert needs_rebuild(tmp_path / "unet") == structural
    loaded = load_pruned_unet(tmp_path / "unet") if structural else UNet2DConditionModel.from_pretrained(
        tmp_path / "unet")
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    loaded.save_pretrained(tmp_path / "again")  # the record survives a second save (e.g. after finetuning)
    assert torch.equal(_out(load_pruned_unet(tmp_path / "again") if structural else loaded, inputs),
                       _out(model, inputs))


def test_pruned_pipeline_loads_and_samples(tiny_pipe, tmp_path):
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.prune.evaluate import sample_images

    pruned = prune_unet(tiny_pipe.unet, ratio=0.5)
    save_pruned_pipeline(tiny_pipe, pruned, tmp_path / "pipe")
    assert tiny_pipe.unet is not pruned
    pipe = load_pipeline(str(tmp_path / "pipe"))
    assert pipe.unet.conv_in.out_channels == pruned.conv_in.out_channels < tiny_pipe.unet.conv_in.out_channels
    inputs = example_inputs(tiny_pipe.unet, batch=1, tokens=4)
    assert torch.equal(_out(pipe.unet, inputs), _out(pruned, inputs))
    images = sample_images(pipe, ["a red circle"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32)


def test_mismatched_pipeline_is_a_one_line_error(tiny_pipe, tiny_pipeline_dir, tmp_path):
    from rewardtune.diffusion.loading import load_pipeline

    foreign = prune_unet(tiny_unet(), ratio=0.5)  # attends to 32-wide text states; the tiny pipeline gives 16
    with pytest.raises(UserError, match="does not fit this pipeline.*32-wide text states.*16"):
        save_pruned_pipeline(tiny_pipe, foreign, tmp_path / "x")
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    shutil.rmtree(folder / "unet")
    foreign.save_pretrained(folder / "unet")
    with pytest.raises(UserError, match="does not fit this pipeline") as info:
        load_pipeline(str(folder))
    assert "\n" not in str(info.value)


def test_weights_from_another_pruning_are_refused(tmp_path):
    a = prune_unet(tiny_unet(), ratio=0.5)
    b = prune_unet(tiny_unet(layers_per_block=2), method="blocks", layers_per_block=1)
    a.save_pretrained(tmp_path / "unet")
    b.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", tmp_path / "unet")
    with pytest.raises(UserError, match="does not match its config"):
        load_pruned_unet(tmp_path / "unet")


def test_shapes_quality_scores_images_and_is_zero_against_itself():
    from rewardtune.prune.evaluate import ShapesQuality

    scorer = ShapesQuality()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"] * 3
    reference = scorer.features(images)
    quality = scorer(images, prompts, reference)
    assert set(quality) == {"fidelity", "taste", "proxy", "fd"}
    assert 0 <= quality["fidelity"] <= 1 and 0 <= quality["taste"] <= 1
    assert quality["fd"] == pytest.approx(0.0, abs=1e-3)
    assert scorer(images.flip(0), prompts, reference)["fd"] == pytest.approx(0.0, abs=1e-3)  # order-free
    per_sample = scorer.scores(images, prompts)
    assert {key: v.shape for key, v in per_sample.items()} == {k: (6,) for k in ("fidelity", "taste", "proxy")}
    assert all(quality[key] == pytest.approx(float(v.mean())) for key, v in per_sample.items())
