"""Full finetuning under FSDP2 on two CPU processes (gloo): the same run as data parallelism (DDP) to float
tolerance, sharded checkpoints that resume, and a gathered final model that plain diffusers loads."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration


def _launch(config: dict, path, port: int, *overrides: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "rewardtune", "finetune", str(path), *overrides],
                          capture_output=True, text=True, env=env, timeout=600)


def _unet(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


CONFIG = {
    "prompts": ["a red circle", "a blue square"], "epochs": 2, "save_every": 1, "eval_prompts": ["a red circle"],
    "eval_seeds": [0], "lora_rank": None, "heldout_prompts": ["a green triangle", "a yellow square"],
    "heldout_count": 2,
    "train": {"algorithm": "prdp", "reward": "jpeg_incompressibility", "prompts_per_epoch": 2,
              "images_per_prompt": 2, "inner_steps": 1, "seed": 0, "prdp": {"beta": 1.0, "clip_range": 0.1},
              "sampling": {"steps": 2, "guidance": 3.0, "eta": 1.0, "batch_size": 4}, "optim": {"lr": 1e-3}},
}


@pytest.mark.slow  # two 2-process launches (~1.5 min); tests/test_fsdp.py checks the sharded step by default
def test_fsdp_trains_keeps_sharded_checkpoints_resumes_and_saves_a_diffusers_model(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "fsdp"
    config = {**CONFIG, "model": str(tiny_pipeline_dir), "output_dir": str(out), "fsdp": True, "epochs": 1}
    run = _launch(config, tmp_path / "fsdp.yaml", 29543)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = out / "checkpoints" / "epoch_1" / "sharded"
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (out / "checkpoints" / "epoch_1" / "trainable.safetensors").exists()

    run = _launch({**config, "epochs": 2}, tmp_path / "resume.yaml", 29545, "resume=auto",
                  "resume_allow_changes=[epochs]")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1/2" in run.stderr  # the progress bar starts after the resumed epoch
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1, 2] and all("heldout_reward" in e for e in evals)
    trained, base = _unet(out / "final"), _unet(tiny_pipeline_dir)
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 1e-4
    pipe = StableDiffusionPipeline.from_pretrained(out / "final", safety_checker=None, requires_safety_checker=False)
    assert torch.isfinite(pipe("a red circle", num_inference_steps=2, output_type="pt").images).all()


@pytest.mark.slow
def test_fsdp_ends_where_data_parallelism_ends(tiny_pipeline_dir, tmp_path):
    """Sharding changes where the weights live, not the training: FSDP and DDP runs of the same config end with
    the same weights to float tolerance (both average the two processes' gradients)."""
    finals = {}
    for name, port, fsdp in (("ddp", 29541, False), ("fsdp", 29547, True)):
        config = {**CONFIG, "model": str(tiny_pipeline_dir), "output_dir": str(tmp_path / name), "fsdp": fsdp}
        run = _launch(config, tmp_path / f"{name}.yaml", port)
        assert run.returncode == 0, run.stderr[-3000:]
        finals[name] = _unet(tmp_path / name / "final")
    base = _unet(tiny_pipeline_dir)
    assert max(float((finals["fsdp"][k] - base[k]).abs().max()) for k in base) > 1e-4
    assert max(float((finals["fsdp"][k] - finals["ddp"][k]).abs().max()) for k in base) < 1e-4


def test_fsdp_with_lora_is_a_config_error(tiny_pipeline_dir, tmp_path, capsys):
    from rewardtune.cli import main

    code = main(["finetune", "configs/prdp/shapes_small.yaml", f"model={tiny_pipeline_dir}", "fsdp=true",
                 f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "fsdp" in err and "lora_rank=null" in err
