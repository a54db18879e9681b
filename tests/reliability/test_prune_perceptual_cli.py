"""Issue 10's drill of `rewardtune prune`, `rewardtune perceptual`, the parser, `--help` and offline hub rewards:
every bad input is one line and exit 2 before anything slow runs, nothing half-written is left behind."""

from __future__ import annotations

import csv
import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rewardtune.cli import main

FAST = ["recover.steps=1", "recover.num_samples=2", "recover.batch_size=2", "evaluate.num_prompts=0",
        "sample_steps=2", "calibration_samples=2"]
PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not PROC.is_dir(), reason="needs /proc (an unwritable folder even for root)")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rewardtune: error:") and err.count("\n") == 1, err
    return err.strip()


def final_error(capsys) -> str:
    """The error line that ends a run which already drew progress bars (no traceback before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err.rstrip("\n").split("\n")[-1]
    assert line.startswith("rewardtune: error:"), err
    return line


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- prune ------------------------------------------------------------------------------------------------------

def test_prune_recover_lr_inf_is_one_line(tiny_pipeline_dir, tmp_path, capsys):
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={tmp_path / 'o'}", *FAST, "recover.lr=inf"]) == 2
    assert "'recover.lr' must be a finite number" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_prune_diverged_recovery_saves_nothing(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST, "recover.steps=3",
                 "recover.lr=1e30"]) == 2
    err = final_error(capsys)
    assert "non-finite weights after recovery" in err and "nothing was saved" in err and "recover.lr" in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("method, extra, valid", [
    ("structured", [], "global_pruning, ignored, ratios, round_to"),
    ("structured", ["importance=diff_pruning"], "global_pruning, ignored, ratios, round_to, seed, stride, thr"),
    ("blocks", [], "layers_per_block, mid_block"),
    ("magnitude", [], "min_keep"),
    ("lottery", [], "min_keep, round_steps, rounds"),
])
def test_prune_unknown_option_lists_the_methods_options(tmp_path, capsys, method, extra, valid):
    missing_model = tmp_path / "no-model"  # the options are checked before any model loads
    assert main(["prune", f"model={missing_model}", f"out={tmp_path / 'o'}", f"method={method}", *extra,
                 "options={nosuch: 1}"]) == 2
    err = one_line_error(capsys)
    assert "'options.nosuch' is not an option of method" in err and err.endswith(f"valid options: {valid}")


def test_prune_bad_prompts_file_fails_before_the_model_loads(tmp_path, capsys):
    args = ["prune", f"model={tmp_path / 'no-model'}", f"out={tmp_path / 'o'}", *FAST]
    assert main([*args, f"prompts_file={tmp_path / 'missing.txt'}"]) == 2
    assert "missing.txt" in one_line_error(capsys)
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02")
    assert main([*args, f"prompts_file={tmp_path / 'binary.txt'}"]) == 2
    assert "binary.txt" in one_line_error(capsys)
    # not read when unused (no teacher samples): the next error is the model's
    assert main([*args, "recover.steps=0", f"prompts_file={tmp_path / 'missing.txt'}"]) == 2
    assert "no-model" in one_line_error(capsys)


@needs_proc
def test_prune_unwritable_out_fails_before_the_model_loads(tmp_path, capsys):
    assert main(["prune", f"model={tmp_path / 'no-model'}", "out=/proc/foo", *FAST]) == 2
    assert "cannot write output folder '/proc/foo'" in one_line_error(capsys)


def test_prune_interrupted_run_leaves_no_trace(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    import rewardtune.prune.run as run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "o"
    with monkeypatch.context() as patch:
        patch.setattr(run, "save_config", killed)  # interrupted while writing the last files
        assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST]) == 130
    assert not out.exists() and leftovers(tmp_path) == []
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST]) == 0
    assert {p.name for p in out.iterdir()} == {"pipeline", "report.json", "config.yaml", "distill_log.jsonl"}


def test_prune_replaces_an_interrupted_runs_files_but_nothing_else(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("model: shapes-tiny\n")  # what a killed run of an older version left
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST]) == 0
    assert (out / "report.json").is_file() and "interrupted `rewardtune prune` run" in capsys.readouterr().err
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST]) == 2  # a finished run stays
    assert "is not empty" in one_line_error(capsys)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.yaml", "notes.txt"):
        (other / name).write_text("mine\n")
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={other}", *FAST]) == 2
    assert "is not empty" in one_line_error(capsys)
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "notes.txt"]


def test_prune_overwrite_replaces_the_pipeline(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST]) == 0
    (out / "keep.txt").write_text("mine\n")
    assert main(["prune", f"model={tiny_pipeline_dir}", f"out={out}", *FAST, "overwrite=true", "ratio=0.25"]) == 0
    assert (out / "keep.txt").read_text() == "mine\n" and "ratio: 0.25" in (out / "config.yaml").read_text()
    assert leftovers(out) == [] and leftovers(tmp_path) == []


# --- perceptual -------------------------------------------------------------------------------------------------

@needs_proc
@pytest.mark.parametrize("argv, flag", [
    (["learn", "--videos", "no-such-demos", "--steps", "2", "--out", "/proc/foo.pt"], "--out '/proc/foo.pt'"),
    (["learn", "--videos", "no-such-demos", "--steps", "2", "--out", "r.pt", "--plot", "/proc/x.png"], "--plot"),
    (["score", "--reward", "no-such.pt", "--video", "v.gif", "--out", "/proc/x.csv"], "--out '/proc/x.csv'"),
    (["score", "--reward", "no-such.pt", "--video", "v.gif", "--plot", "/proc/x.png"], "--plot '/proc/x.png'"),
    (["score", "--reward", "no-such.pt", "--video", "v.gif", "--steps-plot", "/proc/s.png"], "--steps-plot"),
])
def test_perceptual_unwritable_outputs_fail_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["perceptual", *argv]) == 2
    err = one_line_error(capsys)
    assert f"cannot write {flag}" in err and "choose a writable path" in err
    assert list(tmp_path.iterdir()) == []


def test_demos_learn_score_end_to_end(tmp_path, capsys):
    demos, frames = tmp_path / "demos", tmp_path / "frames"
    assert main(["perceptual", "demos", "--task", "door", "--count", "3", "--format", "gif", "--size", "32",
                 "--out", str(demos)]) == 0
    assert sorted(p.name for p in demos.iterdir()) == [f"door_expert_{k:04d}.gif" for k in range(3)]
    assert main(["perceptual", "demos", "--task", "door", "--count", "1", "--seed", "7", "--format", "frames",
                 "--size", "32", "--out", str(frames)]) == 0
    reward = tmp_path / "reward.pt"
    assert main(["perceptual", "learn", "--videos", str(demos), "--steps", "2", "--features", "pixels",
                 "--feature-option", "size=8", "--out", str(reward)]) == 0
    test_video = frames / "door_expert_0007"
    assert main(["perceptual", "score", "--reward", str(reward), "--video", str(test_video), "--out",
                 str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == len(list(test_video.iterdir())) and float(rows[-1]["total"]) > float(rows[0]["total"])
    capsys.readouterr()
    assert main(["score", "--reward", f"perceptual:{reward}", "--images", str(test_video), "--prompt", "x",
                 "--out", str(tmp_path / "s.csv")]) == 0
    scores = [float(r["total"]) for r in csv.DictReader((tmp_path / "s.csv").open())]
    assert len(scores) == len(rows) and max(scores) > min(scores)


def test_demos_mountaincar_or_a_one_line_install_hint(tmp_path, monkeypatch, capsys):
    import importlib.util

    pytest.importorskip("gymnasium")
    pytest.importorskip("pygame")
    from rewardtune.perceptual.video import read_video

    out = tmp_path / "mc"
    assert main(["perceptual", "demos", "--task", "mountaincar", "--count", "1", "--format", "gif", "--size", "16",
                 "--out", str(out)]) == 0
    assert read_video(out / "mountaincar_expert_0000.gif").shape[1:] == (16, 24, 3)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gymnasium" else real(name, *a))
    assert main(["perceptual", "demos", "--task", "mountaincar", "--out", str(tmp_path / "mc2")]) == 2
    assert "pip install 'rewardtune[rl]'" in one_line_error(capsys) and not (tmp_path / "mc2").exists()


def test_demos_refuse_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    assert main(["perceptual", "demos", "--task", "pour", "--out", str(tmp_path / "d")]) == 2
    assert "is not empty" in one_line_error(capsys)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["mine.txt"] and leftovers(tmp_path) == []


def test_demo_task_names_match_the_library():
    from rewardtune.commands.perceptual import DEMO_TASKS
    from rewardtune.perceptual.demos import DEMO_TASKS as LIBRARY_TASKS

    assert tuple(DEMO_TASKS) == LIBRARY_TASKS


# --- parser, --help, startup ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message, command", [
    (["--bogus"], "unrecognized arguments: --bogus", "rewardtune"),
    (["nosuch"], "invalid choice: 'nosuch'", "rewardtune"),
    (["prune", "--bogus"], "unrecognized arguments: --bogus", "rewardtune prune"),
    (["sample", "--prompt", "a", "--out", "x", "--num-images", "0"], "must be at least 1", "rewardtune sample"),
    (["score", "--images", "x"], "the following arguments are required", "rewardtune score"),
    (["perceptual"], "the following arguments are required: ACTION", "rewardtune perceptual"),
    (["perceptual", "learn", "--steps", "x"], "expected an integer, got 'x'", "rewardtune perceptual learn"),
    (["perceptual", "demos", "--task", "nope", "--out", "d"], "invalid choice: 'nope'", "rewardtune perceptual demos"),
])
def test_parse_errors_are_one_line(argv, message, command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert message in err and err.endswith(f"(see `{command} --help`)")


def test_prune_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for line in ("recover.lr (float) = 0.0005", "evaluate.num_prompts (int) = 32", "options (mapping) = {}",
                 "recover.data (teacher|shapes) = teacher", "prompts_file (str) = rewardtune/assets/prompts/"):
        assert line in text
    assert "AdamW steps; 0 skips recovery" in text and "recover: Distillation from the unpruned model" in text


@dataclasses.dataclass
class Inner:
    """Inner things. ``lr``: step size (not 0); ``beta`` / ``gamma``: two weights. Sentence two."""

    lr: float = 1e-3
    beta: float = 0.5
    gamma: int | None = None


@dataclasses.dataclass
class Outer:
    name: str = dataclasses.field(default="x", metadata={"help": "the name"})
    steps: list = dataclasses.field(default_factory=lambda: [1, 2])
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_describe_config_reads_docstrings_metadata_and_sections():
    from rewardtune.confighelp import describe_config

    text = describe_config(Outer)
    assert "name (str) = x" in text and "the name" in text and "steps (list) = [1, 2]" in text
    assert "inner: Inner things" in text and "inner.lr (float) = 0.001" in text and "step size (not 0)" in text
    assert "inner.gamma (int|null) = null" in text and text.count("two weights") == 2
    assert text.index("top level:") < text.index("inner:")


def test_finetune_help_lists_nested_keys(capsys):
    pytest.importorskip("rewardtune.finetune.run", exc_type=ImportError)
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "train.optim.lr (float) = 1e-05" in text and "train.prdp.beta (float)" in text
    assert "gold_reward (str|null) = null" in text


def test_help_and_models_import_no_torch():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from rewardtune.cli import main
        for argv in (["--help"], ["prune", "--help"], ["perceptual", "demos", "--help"], ["sample", "--help"],
                     ["score", "--help"], ["models"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv)
                except SystemExit:
                    pass
            assert out.getvalue(), argv
        print(sorted(m for m in ("torch", "diffusers", "transformers", "numpy") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_models_table_matches_the_registries(capsys):
    from rewardtune.diffusion.loading import MODELS
    from rewardtune.models_table import PIPELINES, REWARD_FACTORIES, reward_names
    from rewardtune.rewards import PATH_REWARDS, REWARDS
    from rewardtune.rewards import reward_names as registry_reward_names

    assert PIPELINES == {name: MODELS.get(name) for name in MODELS.names()}
    assert REWARD_FACTORIES == {name: REWARDS.get(name) for name in REWARDS.names()}
    assert reward_names() == registry_reward_names() and "perceptual" in PATH_REWARDS
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "shapes-tiny" in text and "pickscore" in text and "perceptual:PATH" in text


# --- offline hub rewards ----------------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_hub_reachability_check(monkeypatch):
    from rewardtune import hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    start = time.monotonic()
    assert not hub.hub_reachable(f"http://127.0.0.1:{closed_port()}")
    assert time.monotonic() - start < 3
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_mode() and not hub.use_network()


def test_hub_file_uses_the_cache_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rewardtune import hub
    from rewardtune.errors import ModelNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "w.pt").write_bytes(b"x")
    monkeypatch.setattr(hub, "use_network", lambda: pytest.fail("the network must not be asked for a cached file"))
    assert hub.hub_file("org/name", "w.pt", explain="absent").read_bytes() == b"x"
    monkeypatch.setattr(hub, "use_network", lambda: False)
    with pytest.raises(ModelNotFoundError, match="^absent$"):
        hub.hub_file("org/name", "other.pt", explain="absent")


def test_unreachable_hub_is_one_line_at_once(tmp_path):
    """`score --reward pickscore,hpsv2` with HF_HUB_OFFLINE unset and the hub endpoint on a closed port: before the
    fix, ~55 s of retry warnings; now the cache is checked and the one line comes at once (imports dominate)."""
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "img" / "a.png")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rewardtune", "score", "--reward", "pickscore:10,hpsv2:2",
                             "--images", str(tmp_path / "img"), "--prompt", "x"], env=env, capture_output=True,
                            text=True, timeout=300)
    seconds = time.monotonic() - start
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("rewardtune: error: PickScore model 'yuvalkirstain/PickScore_v1'")
    assert seconds < 30, f"{seconds:.1f} s"  # imports only (~10-20 s on 2 busy cores); it was ~60 s of retries
