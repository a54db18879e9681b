"""FSDP2 on two CPU processes (gloo), the path an SD3.5-size full finetune takes past one GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_sharded_step_checkpoint_and_gather_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("fsdp_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", str(worker), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sharded"] and result["local_rows"] * 2 == result["full_rows"]  # each process holds half
    assert result["moved"] > 1e-3  # the step changed the weights ...
    assert result["step_vs_single_process"] < 1e-5  # ... exactly as one process on both batches would
    assert result["restored"] == 0.0 and result["second_step_restored"] == 0.0
    assert ".metadata" in result["files"] and sum(f.endswith(".distcp") for f in result["files"]) == 2
