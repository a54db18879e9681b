"""Issue 12 item 7: `rewardtune finetune log_with=tensorboard|wandb` sends the epoch metrics, evaluation scores and
evaluation grids to accelerate's tracker (offline: TensorBoard event files read back), a resumed run appends to
the same TensorBoard folder, and a tracker whose package is missing is a one-line error before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from finetune_cli import args, one_line_error

from rewardtune.cli import main

pytestmark = pytest.mark.integration


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out: Path):
    """The run's TensorBoard folder, read back (scalars and images of every event file in it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "rewardtune"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def tensorboard_run(tiny_pipeline_dir, tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("trackers") / "run"
    assert main(args(tiny_pipeline_dir, out, "log_with=tensorboard")) == 0
    return out


def test_tensorboard_gets_the_metrics_and_the_evaluation_grids(tensorboard_run):
    out = tensorboard_run
    assert list((out / "rewardtune").glob("events.out.tfevents.*"))
    logged = events(out)
    record = metrics(out)[0]
    [reward] = logged.Scalars("reward_mean")
    assert reward.step == 1 and reward.value == pytest.approx(record["reward_mean"], rel=1e-6)
    [component] = logged.Scalars("reward_components/jpeg_incompressibility")
    assert component.value == pytest.approx(record["reward_components"]["jpeg_incompressibility"], rel=1e-6)
    assert {"loss", "clipfrac", "seconds_update", "eval/eval_reward"} <= set(logged.Tags()["scalars"])
    assert "epoch" not in logged.Tags()["scalars"]
    grids = logged.Images("eval/grid")
    assert [g.step for g in grids] == [0, 1]  # the epoch-0 evaluation and the checkpoint's
    assert grids[0].width > 0 and grids[0].height > 0


def test_a_resumed_run_appends_to_the_same_tensorboard_folder(tensorboard_run, tiny_pipeline_dir, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "resumed"
    shutil.copytree(tensorboard_run, out)
    with SummaryWriter(str(out / "rewardtune")) as stale:  # a crashed run's epoch 2, logged before its checkpoint
        stale.add_scalar("reward_mean", 123.0, global_step=2)
    assert main(args(tiny_pipeline_dir, out, "log_with=tensorboard", "epochs=2", "resume=auto",
                     "resume_allow_changes=[epochs]")) == 0
    logged = events(out)
    assert len(list((out / "rewardtune").glob("events.out.tfevents.*"))) == 3
    want = [(r["epoch"], r["reward_mean"]) for r in metrics(out)]
    got = [(e.step, e.value) for e in logged.Scalars("reward_mean")]
    assert [s for s, _ in got] == [1, 2] and [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [g.step for g in logged.Images("eval/grid")] == [0, 1, 2]


def test_log_with_may_change_when_resuming(tensorboard_run, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "switched"
    shutil.copytree(tensorboard_run, out)
    assert main(args(tiny_pipeline_dir, out, "resume=auto")) == 0  # log_with=null; nothing left to run
    assert len(list((out / "rewardtune").glob("events.out.tfevents.*"))) == 1  # only the first run's


@pytest.mark.parametrize("tracker, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_is_a_one_line_error_before_any_model_loads(tiny_pipeline_dir, tmp_path, capsys,
                                                                              monkeypatch, tracker, module):
    import rewardtune.diffusion.loading
    import rewardtune.finetune.run

    monkeypatch.setattr(rewardtune.finetune.run, "module_available", lambda name: False)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(rewardtune.diffusion.loading, "load_pipeline", no_model)
    out = tmp_path / "run"
    assert main(args(tiny_pipeline_dir, out, f"log_with={tracker}")) == 2
    err = one_line_error(capsys)
    assert f"log_with={tracker} needs the {module} package" in err and f"pip install {module}" in err
    assert not out.exists()


def test_an_unknown_tracker_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    assert main(args(tiny_pipeline_dir, tmp_path / "run", "log_with=mlflow")) == 2
    assert "log_with" in one_line_error(capsys)
