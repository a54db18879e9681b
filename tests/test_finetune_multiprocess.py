"""Two CPU processes under torch.distributed (what `accelerate launch` sets up): groups split across processes,
gradients synchronised, only the main process writes, and both replicas end with identical weights."""

import json
import os
import subprocess
import sys

import yaml


def test_two_processes_end_with_identical_weights(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow circle\n")
    out = tmp_path / "run"
    config = {
        "model": str(tiny_pipeline_dir), "prompts_file": str(prompts), "output_dir": str(out), "epochs": 2,
        "save_every": 1, "eval_seeds": [0],
        "train": {"algorithm": "prdp", "reward": "jpeg_incompressibility", "prompts_per_epoch": 4,
                  "images_per_prompt": 2, "inner_steps": 1, "seed": 0, "prdp": {"beta": 1.0, "clip_range": 0.1},
                  "sampling": {"steps": 2, "guidance": 3.0, "eta": 1.0, "batch_size": 8}, "optim": {"lr": 1e-3}},
    }
    path = tmp_path / "mp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "rewardtune", "finetune", str(path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summaries = [line for line in run.stdout.splitlines() if line.startswith("finetune:")]
    assert len(summaries) == 1  # only the main process reports
    assert "processes: 2, replicas in sync: True" in run.stdout
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # written once, by the main process
    assert (out / "final" / "unet").is_dir()
