"""Issue 10's drill of `rewardtune finetune` run folders: foreign folders, locks, resume fingerprints, divergence,
full disks, truncated checkpoints, interrupted evaluations, JSON without NaN, file modes and presets anywhere."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from finetune_cli import args, one_line_error

from rewardtune.cli import main


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def two_epochs(tiny_pipeline_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run: the reference for every resume below."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(args(tiny_pipeline_dir, out, "epochs=2")) == 0
    return out


def test_a_foreign_folder_is_refused_and_left_untouched(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "thesis"
    (out / "final").mkdir(parents=True)
    (out / "final" / "thesis.tex").write_text("x")
    for extra in ([], ["resume=auto"]):
        assert main(args(tiny_pipeline_dir, out, *extra)) == 2
        assert "is not empty and was not made by rewardtune finetune" in one_line_error(capsys)
    assert tree(out) == {"final/thesis.tex": b"x"}


def test_an_empty_folder_is_used(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(args(tiny_pipeline_dir, out, "train.inner_steps=1")) == 0
    assert (out / "final" / "model_index.json").is_file()


def test_a_folder_in_use_is_refused_naming_the_holder(tiny_pipeline_dir, two_epochs, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from rewardtune.utils.runfolder import claim_run_folder
        with claim_run_folder({str(tmp_path / 'busy')!r}, "finetune", {{}}, resume=False):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args(tiny_pipeline_dir, tmp_path / "busy", "resume=auto")) == 2
        assert f"in use by another rewardtune process (pid {holder.pid})" in one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("change, key", [
    ("train.optim.lr=2e-3", "train.optim.lr (0.001 -> 0.002)"),
    ("train.seed=1", "train.seed (0 -> 1)"),
    ("train.algorithm=ddpo", "train.algorithm ('prdp' -> 'ddpo')"),
    ("epochs=3", "epochs (2 -> 3)"),
])
def test_resume_with_other_settings_is_refused(tiny_pipeline_dir, two_epochs, capsys, change, key):
    before = tree(two_epochs)
    assert main(args(tiny_pipeline_dir, two_epochs, "epochs=2", "resume=auto", change)) == 2
    err = one_line_error(capsys)
    assert "settings differ from the run's" in err and key in err and "resume_allow_changes=[" in err
    assert tree(two_epochs) == before  # config.yaml, metrics, checkpoints untouched


def test_resume_allow_changes_extends_a_run_and_records_the_change(tiny_pipeline_dir, two_epochs, tmp_path):
    out = tmp_path / "extended"
    assert main(args(tiny_pipeline_dir, out)) == 0
    assert main(args(tiny_pipeline_dir, out, "epochs=2", "resume=auto", "resume_allow_changes=[epochs]")) == 0
    marker = json.loads((out / ".rewardtune_run.json").read_text())
    assert marker["settings"]["epochs"] == 2 and marker["changes"][0]["changes"] == {"epochs": [1, 2]}
    want, got = weights(two_epochs), weights(out)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_allow_changes_names_only_config_keys(tiny_pipeline_dir, tmp_path, capsys):
    assert main(args(tiny_pipeline_dir, tmp_path / "r", "resume_allow_changes=[epoch]")) == 2
    assert "resume_allow_changes names 'epoch', which is not a config key" in one_line_error(capsys)


@pytest.mark.parametrize("setting", ["train.optim.lr=inf", "train.sampling.guidance=inf", "train.prdp.beta=nan",
                                     "train.optim.max_grad_norm=-inf"])
def test_non_finite_settings_are_refused(tiny_pipeline_dir, tmp_path, capsys, setting):
    assert main(args(tiny_pipeline_dir, tmp_path / "r", setting)) == 2
    assert "must be a finite number" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_pipeline_dir, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "diverge"
    assert main(args(tiny_pipeline_dir, out)) == 0
    before = tree(out)
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **k):  # what an overflowing update does to a weight
        result = real_step(self, *a, **k)
        self.param_groups[0]["params"][3].data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    assert main(args(tiny_pipeline_dir, out, "epochs=2", "resume=auto", "resume_allow_changes=[epochs]")) == 2
    err = one_line_error(capsys)
    assert "training diverged in epoch 2: non-finite weights or optimizer state after a gradient step (1 of" in err
    assert "checkpoints/epoch_1" in err
    after = tree(out)
    assert not (out / "checkpoints" / "epoch_2").exists()
    ours = lambda files: {k: v for k, v in files.items() if "checkpoints" in k or k.startswith("final")}  # noqa
    assert ours(after) == ours(before)


def test_a_learning_rate_out_of_range_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    assert main(args(tiny_pipeline_dir, tmp_path / "r", "train.optim.lr=1e39")) == 2
    assert "'train.optim.lr' must be in (0, 1]" in one_line_error(capsys)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tiny_pipeline_dir, tmp_path, capsys,
                                                                              monkeypatch):
    from rewardtune.finetune import checkpoint

    real, calls = checkpoint._write_checkpoint_files, []

    def fill_disk_on_second(folder, *rest):
        calls.append(folder)
        if len(calls) == 2:
            (folder / "trainable.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, *rest)

    monkeypatch.setattr(checkpoint, "_write_checkpoint_files", fill_disk_on_second)
    out = tmp_path / "full"
    assert main(args(tiny_pipeline_dir, out, "epochs=2")) == 2
    err = one_line_error(capsys)
    assert "cannot save checkpoint" in err and "no space left on device" in err and "epoch_1 is intact" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_1"]  # no temporary folder left


@pytest.mark.parametrize("damage", ["truncate state.pt", "empty safetensors"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tiny_pipeline_dir, two_epochs, tmp_path,
                                                                    capsys, damage):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(two_epochs, out)
    shutil.rmtree(out / "final")
    latest = out / "checkpoints" / "epoch_2"
    if damage == "truncate state.pt":
        data = (latest / "state.pt").read_bytes()
        (latest / "state.pt").write_bytes(data[:len(data) // 2])
    else:
        (latest / "trainable.safetensors").write_bytes(b"")
    assert main(args(tiny_pipeline_dir, out, "epochs=2", "resume=auto")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "is unreadable" in line]
    assert len(warning) == 1 and "epoch_2" in warning[0] and warning[0].endswith("falling back to " +
                                                                                 str(out / "checkpoints/epoch_1"))
    want, got = weights(two_epochs), weights(out)
    assert all(torch.equal(got[k], v) for k, v in want.items())  # epoch 2 redone from epoch 1


def test_an_interrupted_evaluation_is_redone_and_a_finished_run_keeps_its_summary(tiny_pipeline_dir, two_epochs,
                                                                                   tmp_path):
    import shutil

    out = tmp_path / "noeval"
    shutil.copytree(two_epochs, out)
    lines = (out / "eval.jsonl").read_text().splitlines()
    (out / "eval.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # killed after checkpoint 2, before its eval
    (out / "grids" / "epoch_0002.png").unlink()
    summary = json.loads((two_epochs / "summary.json").read_text())
    assert main(args(tiny_pipeline_dir, out, "epochs=2", "resume=auto")) == 0
    assert (out / "eval.jsonl").read_text().splitlines() == lines
    assert (out / "grids" / "epoch_0002.png").is_file()
    again = json.loads((out / "summary.json").read_text())
    assert again["reward_mean"] == summary["reward_mean"] and again["after"] == summary["after"]


def test_json_outputs_never_hold_a_bare_nan(tmp_path):
    from rewardtune.utils.io import atomic_write_json

    path = atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.0}})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2.0}}


def test_atomic_files_get_the_umask_mode(tmp_path):
    from rewardtune.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_presets_run_from_any_working_directory(tmp_path, monkeypatch):
    from rewardtune.config import load_config
    from rewardtune.finetune.run import RunConfig, validate_run

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    for preset in ("prdp/shapes_small.yaml", "ddpo/shapes_large.yaml"):
        plan = validate_run(load_config(RunConfig, repo / "configs" / preset))
        assert plan.prompts and plan.heldout


def test_relative_paths_in_a_config_resolve_against_the_config_file(tmp_path, monkeypatch):
    from rewardtune.config import load_config
    from rewardtune.finetune.run import RunConfig, validate_run

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mine.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "cfg" / "run.yaml").write_text("prompts_file: mine.txt\n")
    monkeypatch.chdir(tmp_path)
    assert validate_run(load_config(RunConfig, "cfg/run.yaml")).prompts == ["a red circle", "a blue square"]


def test_a_learned_perceptual_reward_finetunes(tiny_pipeline_dir, tmp_path):
    """Issue 10 item 10: demo videos -> perceptual reward file -> `finetune train.reward=perceptual:PATH`."""
    from rewardtune.perceptual.demos import procedural_rollout
    from rewardtune.perceptual.reward import PerceptualReward

    demos = [procedural_rollout("door", seed, size=32).frames for seed in range(3)]
    path = tmp_path / "door.pt"
    PerceptualReward.fit(demos, n_steps=2, features="pixels", feature_options={"size": 12}).save(path)
    out = tmp_path / "run"
    assert main(args(tiny_pipeline_dir, out, f"train.reward=perceptual:{path}",
                     f"gold_reward=perceptual:{path}:2,jpeg_compressibility:1")) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["steps"] == 1 and record["skipped"] == 0 and 0 <= record["reward_mean"] <= 1
    assert set(record["reward_components"]) >= {f"perceptual:{path}"}


def test_a_full_disk_anywhere_else_is_one_line_with_exit_1(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    from rewardtune.finetune import trainer

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "final"))

    monkeypatch.setattr(trainer, "save_final_model", no_space)
    assert main(args(tiny_pipeline_dir, tmp_path / "r")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"rewardtune: error: No space left on device while writing {tmp_path / 'r' / 'final'}; free "
                   "space or choose a writable location, then rerun (runs continue with resume=auto)")
    assert (tmp_path / "r" / "checkpoints" / "epoch_1").is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_before_any_output(tiny_pipeline_dir, tmp_path, capsys):
    assert main(args(tiny_pipeline_dir, tmp_path / "r", "device=cuda")) == 2
    assert "device 'cuda' requested but CUDA is not available" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_a_setting_added_after_the_run_started_resumes_at_its_default(tiny_pipeline_dir, tmp_path, capsys):
    """A run written before a setting existed (its marker lacks ``fsdp`` and ``train.dense``) resumes when the
    setting is at its default, which is what that run did; the same missing key at another value is refused."""
    out = tmp_path / "old"
    assert main(args(tiny_pipeline_dir, out)) == 0
    marker_path = out / ".rewardtune_run.json"
    marker = json.loads(marker_path.read_text())
    del marker["settings"]["fsdp"], marker["settings"]["train"]["dense"]
    marker_path.write_text(json.dumps(marker))
    assert main(args(tiny_pipeline_dir, out, "epochs=2", "resume=auto", "train.dense.weight=0.5",
                     "resume_allow_changes=[epochs]")) == 2
    err = one_line_error(capsys)
    assert "train.dense.weight (None -> 0.5)" in err and "fsdp" not in err and "dense.kind" not in err
    assert main(args(tiny_pipeline_dir, out, "epochs=2", "resume=auto", "resume_allow_changes=[epochs]")) == 0
