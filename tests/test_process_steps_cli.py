"""`rewardtune steps` end to end on the tiny pipeline, and its one-line errors."""

from __future__ import annotations

import csv
import json

import pytest

from rewardtune.cli import main


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_steps_writes_values_decisive_steps_and_implicit_rewards(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "steps"
    code = main(["steps", "--model", str(tiny_pipeline_dir), "--finetuned", str(tiny_pipeline_dir),
                 "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", "1", "--steps", "2",
                 "--k", "2", "--out", str(out), "--attributes", "color,shape"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"values.csv", "steps.csv", "decisive.csv", "values.png",
                                              "decisive.png", "implicit.png", "summary.json"}
    values, steps, decisive = (_rows(out / f"{name}.csv") for name in ("values", "steps", "decisive"))
    assert len(values) == 2 * 3 and {r["branch"] for r in values} == {"0", "1", "2"}
    assert len(steps) == 2 * 2 and all(float(r["implicit"]) == 0.0 for r in steps)  # the same model twice
    assert len(decisive) == 2 * 2 and all(0 <= int(r["decisive_index"]) <= 2 for r in decisive)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_queries"] == {"values": 2 * (2 * 2 + 1), "x0": 2 * 2}
    final = [r for r in values if r["branch"] == "2"]
    assert all(float(r["value_se"]) == 0.0 for r in final)  # the final image: one query, no spread


@pytest.mark.parametrize("args, message", [
    (["--attributes", "mood"], "--attributes: unknown attribute 'mood'"),
    (["--eta", "0"], "--eta must be in (0, 1]"),
    (["--reward", "nonesuch"], "--reward: unknown reward"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = main(["steps", "--prompt", "a red circle", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_non_empty_out_needs_overwrite(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["steps", "--prompt", "a red circle", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_missing_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["steps"])
    assert exc.value.code == 2
