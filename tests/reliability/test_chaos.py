"""Chaos: kill -9 a 4-epoch finetuning run at five seeded random moments, resume=auto after each kill; the final
weights, metrics and evaluations equal those of the uninterrupted run (slow: about seven CLI start-ups)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from finetune_cli import args

pytestmark = pytest.mark.slow
TIMING = ("samples_per_s", "seconds_sampling", "seconds_reward", "seconds_update")


def command(model, out) -> list[str]:
    return [sys.executable, "-m", "rewardtune",
            *args(model, out, "epochs=4", "keep_last=1", "heldout_prompts=[a photo of a dog]", "resume=auto")]


def records(path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def test_five_random_kills_then_resume_equal_the_uninterrupted_run(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    from rewardtune.finetune.checkpoint import list_checkpoints

    reference = tmp_path / "reference"
    began = time.monotonic()
    subprocess.run(command(tiny_pipeline_dir, reference), check=True, capture_output=True)
    duration = time.monotonic() - began
    chaos, rng, kills = tmp_path / "chaos", random.Random(10), 0
    for _ in range(5):
        done = max([e for e, _ in list_checkpoints(chaos)], default=0)
        remaining = duration * (0.5 + 0.5 * (4 - done) / 4)  # start-up (about half) + the epochs left
        process = subprocess.Popen(command(tiny_pipeline_dir, chaos), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.9) * remaining)
        process.send_signal(signal.SIGKILL)
        kills += process.wait() == -signal.SIGKILL
    assert kills >= 3, "most kills should land while the run is still working"
    subprocess.run(command(tiny_pipeline_dir, chaos), check=True, capture_output=True)
    weights = "final/unet/diffusion_pytorch_model.safetensors"
    want, got = load_file(str(reference / weights)), load_file(str(chaos / weights))
    assert set(want) == set(got) and all(torch.equal(got[k], v) for k, v in want.items())
    assert records(chaos / "metrics.jsonl") == records(reference / "metrics.jsonl")
    assert records(chaos / "eval.jsonl") == records(reference / "eval.jsonl")
    leftovers = [p.name for p in chaos.rglob(".*") if p.name not in (".lock", ".rewardtune_run.json")]
    assert leftovers == []
