"""The prepared GPU check (``scripts/device_check.py``, run on a GPU by ``scripts/device_check.sh``) at toy size on
the CPU, so that it cannot rot: the same builders, loading path, trainer calls and JSON report as the full-size run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"
WRAPPER = ROOT / "scripts" / "device_check.sh"
# Run order: the reward-scoring row, then per model LoRA (without/with checkpointing), GRPO, full finetuning.
CASES = ["reward-aesthetic", "sd15-lora-gc-prdp", "sd15-full-nogc-prdp", "sd35m-lora-nogc-grpo", "sd35m-full-gc-prdp"]
ROW_KEYS = {"name", "model", "status", "algorithm", "lora", "gradient_checkpointing", "mixed_precision",
            "seconds_per_epoch", "epoch_seconds", "phase_seconds", "rollout_samples_per_s", "generate_samples_per_s",
            "peak_gpu_mem_gib", "gradient_steps", "skipped_steps", "case_seconds"}


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def run(device_check, tmp_path, *args) -> tuple[int, dict]:
    out = tmp_path / "out"
    code = device_check.main(["--size", "toy", "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work"),
                              *args])
    return code, json.loads((out / "device_check.json").read_text())


def test_every_selected_case_runs_at_toy_size(device_check, tmp_path, capsys):
    code, report = run(device_check, tmp_path, "--cases", ",".join(CASES))
    assert code == 0
    assert {"schema", "size", "driver", "max_seconds", "selected", "settings", "device", "models", "cases",
            "reward_scoring", "elapsed_seconds"} <= set(report)
    assert report["size"] == "toy" and report["driver"] == "epochs" and report["selected"] == CASES
    assert report["device"]["device"] == "cpu" and report["device"]["torch"] and report["device"]["gpu"] is None
    assert [row["name"] for row in report["cases"]] == CASES
    assert all(row["status"] == "ok" for row in report["cases"]), report["cases"]

    scoring = report["reward_scoring"]
    assert scoring["name"] == "reward-aesthetic" and scoring["images"] == device_check.TOY.reward_images
    assert scoring["batched_seconds"] > 0 and scoring["one_per_call_seconds"] > 0 and scoring["ratio"] > 0

    for row in report["cases"][1:]:
        assert ROW_KEYS <= set(row), row
        assert row["mixed_precision"] == "bf16" and row["peak_gpu_mem_gib"] is None  # CPU: bf16 autocast, no GPU
        assert row["seconds_per_epoch"] > 0 and len(row["epoch_seconds"]) == 2 and min(row["epoch_seconds"]) > 0
        assert min(row["epoch_wall_seconds"]) > 0 and min(row["phase_seconds"].values()) > 0
        assert row["rollout_samples_per_s"] > 0 and row["generate_samples_per_s"] > 0
        assert row["gradient_steps"] == 1 and row["skipped_steps"] == 0
    assert report["cases"][3]["algorithm"] == "grpo" and report["cases"][4]["gradient_checkpointing"] is True

    for model in ("sd15", "sd35m"):  # built, saved and loaded back through load_pipeline
        assert report["models"][model]["denoiser_params"] > 0
        assert (Path(report["models"][model]["path"]) / "model_index.json").is_file()
    assert report["models"]["sd35m"]["denoiser_config"]["dual_attention_layers"] == [0]
    assert "sd35m-full-gc-prdp" in capsys.readouterr().out  # the table


def test_the_run_driver_and_the_time_budget(device_check, tmp_path):
    code, report = run(device_check, tmp_path / "run", "--driver", "run", "--cases", "sd15-lora-nogc-prdp")
    row = report["cases"][0]
    assert code == 0 and row["status"] == "ok" and row["seconds_per_epoch"] > 0 and row["gradient_steps"] == 1
    assert row["epoch_wall_seconds"] is None  # run_finetune's metrics.jsonl has the phase seconds only

    code, report = run(device_check, tmp_path / "budget", "--max-seconds", "0", "--cases", "sd35m-*")
    assert code == 0 and report["models"] == {}  # nothing started, nothing built
    assert [row["status"] for row in report["cases"]] == ["skipped"] * 5
    assert all("over budget" in row["reason"] for row in report["cases"])


def test_the_wrapper_runs_the_full_size_and_prints_the_json_path(tmp_path):
    fake = tmp_path / "python"  # stands in for Python: records its arguments
    fake.write_text('#!/usr/bin/env bash\n[[ "$1" == -c ]] && exit 0\necho "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "o"), "ARGS_FILE": str(tmp_path / "args")}
    done = subprocess.run(["bash", str(WRAPPER), "--cases", "sd15-*"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"{tmp_path / 'o'}/device_check.json"
    assert (tmp_path / "args").read_text().split() == [str(SCRIPT), "--size", "full", "--out", str(tmp_path / "o"),
                                                       "--cases", "sd15-*"]


def test_two_four_sparsity_row_says_why_it_cannot_run_on_the_cpu(device_check, tmp_path):
    code, report = run(device_check, tmp_path, "--cases", device_check.SPARSE_CASE)
    assert code == 0  # unsupported hardware is a result, not a failure
    row = report["cases"][0]
    assert row["name"] == "sparse24-sd15" and row["status"] == "unsupported"
    assert "compute capability >= 8.0" in row["reason"] and "cpu" in row["reason"]
    assert row["layers"] > 0 and row["zero_fraction"] == 0.5  # the 2:4 masks were applied before the check
    assert "sd15" in report["models"]
