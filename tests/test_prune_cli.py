"""``rewardtune prune`` end to end on the tiny pipeline folder, its presets, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rewardtune.cli import main
from rewardtune.presets import load_preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["recover.steps=2", "recover.num_samples=4", "recover.batch_size=2", "evaluate.num_prompts=0",
        "sample_steps=2", "calibration_samples=2"]


def test_prune_cli_writes_a_pipeline_that_sample_loads(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", f"model={tiny_pipeline_dir}", "ratio=0.5", f"out={out}", *FAST]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "MACs" in text and str(out / "pipeline") in text
    for name in ("report.json", "config.yaml", "distill_log.jsonl", "pipeline/unet/config.json"):
        assert (out / name).is_file(), name
    assert main(["sample", "--model", str(out / "pipeline"), "--prompt", "a red circle", "--num-images", "1",
                 "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_prune_cli_taylor_blocks_and_lottery(tiny_pipeline_dir, tmp_path):
    runs = [(["importance=diff_pruning", "options.stride=500"], {"stride": 500}),
            (["method=blocks", "options={mid_block: false}"], {"mid_block": False}),
            (["method=lottery", "ratio=0.6", "options={rounds: 2, round_steps: 1}"], {"rounds": 2, "round_steps": 1})]
    for i, (extra, options) in enumerate(runs):
        assert main(["prune", f"model={tiny_pipeline_dir}", f"out={tmp_path / str(i)}", *FAST, *extra]) == 0
        assert yaml.safe_load((tmp_path / str(i) / "config.yaml").read_text())["options"] == options  # typed


@pytest.mark.parametrize("override, message", [
    ("ratio=1.5", "config key 'ratio' must be strictly between 0 and 1"),
    ("ratio=0", "config key 'ratio' must be strictly between 0 and 1"),
    ("method=bogus", "config key 'method' must be one of bip, blocks, granet, layers, lottery, magnitude, "
     "semi_structured, structured"),
    ("ratio=0.9", "would remove a whole layer"),
    ("recover.ema=1", "config key 'recover.ema' must be in [0, 1)"),
    ("options.round_to=eight", "config key 'options.round_to' expects int or null, got 'eight'"),
    ("options.ignored=[conv_outt]", "layer 'conv_outt' (options.ignored or options.ratios) is not a module"),
    ("lora=/nonexistent", "'/nonexistent' is not a LoRA folder"),
])
def test_prune_cli_errors_are_one_line(tiny_pipeline_dir, tmp_path, capsys, override, message):
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={tmp_path / 'o'}", *FAST, override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("rewardtune: error:")


@pytest.mark.parametrize("path", sorted((CONFIGS / "prune").glob("*.yaml")), ids=lambda p: p.name)
def test_prune_presets_validate(path):
    cfg = load_preset(path, CONFIGS)
    assert cfg.model == "shapes-tiny" and cfg.recover.steps > 0


def test_prune_cli_refuses_a_bad_plan_before_writing(tiny_pipeline_dir, tmp_path):
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={tmp_path / 'o'}", *FAST, "method=blocks",
                 "options={layers_per_block: 0}"]) == 2
    assert not (tmp_path / "o").exists()


def test_prune_cli_prunes_the_lora_finetuned_model(tiny_pipeline_dir, tmp_path):
    """``lora=FOLDER`` fuses a finetune run's LoRA weights before pruning: the kept weights are the finetuned ones."""
    import torch
    from peft import LoraConfig

    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.finetune.checkpoint import save_final_model

    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_final_model(pipe, pipe.unet, tmp_path / "final", lora=True, base_model=str(tiny_pipeline_dir))
    out = tmp_path / "pruned"
    assert main(["prune", f"model={tiny_pipeline_dir}", f"lora={tmp_path / 'final'}", "method=magnitude", "ratio=0.3",
                 f"out={out}", *FAST, "recover.steps=0"]) == 0
    pruned = load_pipeline(str(out / "pipeline")).unet.state_dict()
    finetuned = load_pipeline(str(tiny_pipeline_dir), lora=tmp_path / "final")
    finetuned.fuse_lora()
    finetuned.unload_lora_weights()
    fused, base = finetuned.unet.state_dict(), load_pipeline(str(tiny_pipeline_dir)).unet.state_dict()
    name = next(k for k in pruned if k.endswith("attn1.to_q.weight"))
    kept = pruned[name] != 0
    assert 0 < kept.sum() < kept.numel()  # masked (global magnitude: this layer loses part of its weights)
    torch.testing.assert_close(pruned[name][kept], fused[name][kept])
    assert not torch.allclose(fused[name], base[name])  # the adapter changed what was pruned
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"] == str(tmp_path / "final")
