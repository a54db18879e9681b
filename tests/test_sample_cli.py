"""`rewardtune sample` end to end on a tiny random pipeline, and every bad-input path of the foundation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def test_sample_writes_images_grid_and_manifest(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompts", prompts, "--num-images", 3,
                   "--steps", 3, "--seed", 10, "--out", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["prompt"] for r in manifest] == ["a red circle"] * 3 + ["a blue square"] * 3
    assert [r["seed"] for r in manifest] == list(range(10, 16))
    assert (out / "manifest.csv").read_text().splitlines()[0] == "file,prompt,seed"
    for row in manifest:
        assert Image.open(out / row["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] > 3 * 32
    assert "steps: 3" in (out / "config.yaml").read_text()
    assert not list(out.glob(".*tmp"))  # no half-written files left behind


def _pixels(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


def test_same_seed_same_images_whatever_the_batch_size(tiny_pipeline_dir, tmp_path):
    common = ["sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--prompt", "a blue square",
              "--num-images", 2, "--steps", 2, "--eta", 1.0]
    assert run_cli(*common, "--out", tmp_path / "a", "--batch-size", 4) == 0
    assert run_cli(*common, "--out", tmp_path / "a2", "--batch-size", 4) == 0
    assert run_cli(*common, "--out", tmp_path / "b", "--batch-size", 1) == 0
    assert run_cli(*common, "--out", tmp_path / "c", "--seed", 99) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "a"), _pixels(tmp_path / "a2"))  # bit-identical
    # Other batch sizes only change float summation order in the kernels: at most 1/255 apart.
    assert np.abs(_pixels(tmp_path / "a").astype(int) - _pixels(tmp_path / "b").astype(int)).max() <= 1
    assert np.abs(_pixels(tmp_path / "a").astype(int) - _pixels(tmp_path / "c").astype(int)).max() > 10


def test_sampler_log_probs_are_finite_with_eta(tiny_pipe):
    from rewardtune.diffusion import encode_prompts, generators_for, sample_trajectories

    embeds = encode_prompts(tiny_pipe, ["a red circle", "a cat"])
    traj = sample_trajectories(tiny_pipe, embeds, encode_prompts(tiny_pipe, ["", ""]), generators_for([0, 1]),
                               steps=4, guidance=3.0, eta=1.0)
    assert traj.latents.shape == (2, 5, 4, 8, 8) and traj.log_probs.shape == (2, 4)
    assert torch.isfinite(traj.log_probs).all()


@pytest.mark.parametrize("args, message", [
    (["--num-images", "0"], "must be at least 1"),
    (["--steps", "-3"], "must be at least 1"),
    (["--height", "-8"], "must be at least 1"),
    (["--guidance", "inf"], "finite"),
    (["--eta", "nan"], "finite"),
])
def test_argument_errors_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        run_cli("sample", "--prompt", "a red circle", "--out", tmp_path / "o", *args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def _prompt_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"\n  \n", "holds no prompt"),
    ("binary.txt", b"\x00\x01\x02abc", "looks binary"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not valid UTF-8"),
    ("bad.jsonl", b'{"prompt": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ("bad.csv", b"label\na red circle\n", "no prompt column"),
])
def test_bad_prompt_files_give_one_line_errors(tiny_pipeline_dir, tmp_path, capsys, name, content, message):
    path = _prompt_file(tmp_path, name, content)
    out = tmp_path / "out"
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompts", path, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written half-way


def test_missing_and_unknown_models(tmp_path, capsys):
    assert run_cli("sample", "--model", "no-such-model", "--prompt", "x", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "shapes-tiny" in err and "sd15" in err
    assert run_cli("sample", "--model", "someorg/missing-pipeline", "--prompt", "x", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert (
        "someorg/missing-pipeline" in err
        and "hf download someorg/missing-pipeline" in err
        and len(err.splitlines()) == 1
    )
    (tmp_path / "empty_folder").mkdir()
    assert run_cli("sample", "--model", tmp_path / "empty_folder", "--prompt", "x", "--out", tmp_path / "o") == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_refuses_to_write_into_a_non_empty_folder(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.png").write_bytes(b"keep me")
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "x", "--out", out) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.png").read_bytes() == b"keep me"


def test_console_script_help_and_bad_config_key(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "rewardtune", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "sample" in help_run.stdout and "finetune" in help_run.stdout
    preset = Path(__file__).resolve().parents[1] / "configs" / "prdp" / "shapes_small.yaml"
    bad = subprocess.run([sys.executable, "-m", "rewardtune", "finetune", str(preset), "train.sampling.stepz=2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    error = bad.stderr.strip()
    assert error.startswith("rewardtune: error: unknown config key 'train.sampling.stepz'; valid keys here: ")
    assert len(error.splitlines()) == 1 and {"batch_size", "eta", "guidance", "steps"} <= set(
        error.split("valid keys here: ")[1].split(", "))


def test_sample_output_scores_with_its_own_manifest(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli("sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--prompt", "a blue square",
                   "--num-images", 2, "--steps", 2, "--out", out) == 0
    scores = tmp_path / "scores.csv"
    assert run_cli("score", "--reward", "shapes_gold", "--images", out / "0*.png", "--prompts",
                   out / "manifest.csv", "--out", scores) == 0
    rows = scores.read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["a red circle"] * 2 + ["a blue square"] * 2
