"""The command layer: every registered command has a --help and a handler, presets load with their command's
schema, `rewardtune sample CONFIG [key=value ...]` runs the shipped presets, and rewardtune.cli imports no torch."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rewardtune.cli import build_parser, main
from rewardtune.commands import COMMANDS, load_preset, preset_schema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("entry", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_command_has_help_and_a_handler(entry, capsys):
    module = importlib.import_module(entry.module)
    assert callable(module.run) and callable(module.add_arguments) and module.DESCRIPTION
    parser = build_parser()
    assert parser.commands[entry.name].get_default("handler") is module.run
    assert build_parser([entry.name]).commands[entry.name].get_default("handler") is module.run
    with pytest.raises(SystemExit) as exit_info:
        main([entry.name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rewardtune {entry.name}") and module.DESCRIPTION.split()[0] in out
    if hasattr(module, "SCHEMA"):  # a config command lists its keys
        assert "config keys" in out and "CONFIG" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for entry in COMMANDS:
        assert f"{entry.name:12s} {entry.help.split()[0]}" in out


def test_preset_folders_belong_to_the_commands_that_read_them():
    from rewardtune.commands.sample import SampleConfig
    from rewardtune.finetune.config import RunConfig
    from rewardtune.prune.config import PruneConfig

    assert preset_schema("prdp") is RunConfig and preset_schema("ddpo") is RunConfig
    assert preset_schema("prune") is PruneConfig and preset_schema("sample") is SampleConfig
    shipped = {p.parent.name for p in CONFIGS.rglob("*.yaml")} - {"accelerate"}  # launch configs of accelerate
    for job in shipped:
        preset_schema(job)  # every folder of configs/ has a command


@pytest.mark.parametrize("name", ["sd15", "shapes_heldout"])
def test_sample_presets_load_with_the_sample_schema(name):
    from rewardtune.commands.sample import SampleConfig

    cfg = load_preset(CONFIGS / "sample" / f"{name}.yaml", CONFIGS)
    assert isinstance(cfg, SampleConfig) and cfg.prompt_list()
    assert set(yaml.safe_load((CONFIGS / "sample" / f"{name}.yaml").read_text())) <= set(vars(cfg))


def test_sample_config_preset_with_overrides_on_the_tiny_pipeline(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's relative out must not be used: out= overrides it
    out = tmp_path / "heldout"
    assert main(["sample", str(CONFIGS / "sample" / "shapes_heldout.yaml"), f"model={tiny_pipeline_dir}", "steps=2",
                 "num_images=1", "batch_size=100", f"out={out}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    heldout = (Path(__file__).resolve().parents[1] / "rewardtune" / "assets" / "prompts" / "shapes_heldout.txt")
    assert [row["prompt"] for row in manifest] == [p for p in heldout.read_text().splitlines() if p.strip()]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(tiny_pipeline_dir) and saved["steps"] == 2 and saved["guidance"] == 5.0
    assert not (tmp_path / "outputs").exists()


def test_sample_preset_flags_and_overrides_mix(tiny_pipeline_dir, tmp_path, capsys):
    preset = CONFIGS / "sample" / "sd15.yaml"  # the GPU preset, redirected to the tiny pipeline on the CPU
    out = tmp_path / "sd15"
    assert main(["sample", str(preset), f"model={tiny_pipeline_dir}", "--device", "cpu", "dtype=float32", "--out",
                 str(out), "steps=2", "num_images=1"]) == 0  # key=value words after flags are overrides too
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["guidance"] == 7.5 and saved["device"] == "cpu" and saved["prompts"] == yaml.safe_load(
        preset.read_text())["prompts"]
    # a prompt given on the command line replaces the preset's prompt source
    assert main(["sample", str(CONFIGS / "sample" / "shapes_heldout.yaml"), "--prompt", "a red circle",
                 f"model={tiny_pipeline_dir}", "steps=2", "num_images=2", "--out", str(tmp_path / "one")]) == 0
    rows = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2
    capsys.readouterr()
    assert main(["sample", str(preset), "--steps", "3", "steps=2", "--out", str(tmp_path / "x")]) == 2
    assert "'steps' is given twice" in capsys.readouterr().err
    assert main(["sample", str(preset), "stepz=2", "--out", str(tmp_path / "x")]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_without_a_prompt_is_one_line(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rewardtune: error: no prompt given") and len(err.splitlines()) == 1


def test_old_import_paths_still_work():
    from rewardtune import presets, sample, score
    from rewardtune.commands import sample as sample_command
    from rewardtune.commands import score as score_command

    assert sample.SampleConfig is sample_command.SampleConfig and sample.run_sample is sample_command.run_sample
    assert sample.prepare_out_dir is sample_command.prepare_out_dir
    assert score.find_images is score_command.find_images and score.run_score is score_command.run_score
    assert presets.load_preset is load_preset


def test_a_closed_output_pipe_ends_quietly():
    """`rewardtune models | head -0`: the reader is gone before the first line; no traceback, exit 141."""
    process = subprocess.Popen([sys.executable, "-m", "rewardtune", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr
