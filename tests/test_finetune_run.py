"""The finetuning run end to end on the tiny random pipeline: run directory, checkpoints, resume, final model
(full pipeline folder and LoRA weights), NaN rewards, and bad configs that fail before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from rewardtune.cli import main
from rewardtune.config import from_dict, load_config
from rewardtune.finetune.checkpoint import list_checkpoints, load_trainable_state
from rewardtune.finetune.run import LORA_TARGETS, RunConfig, run_finetune
from rewardtune.rewards.base import Reward

PROMPTS = "[a red circle, a blue square on a white background, a photo of a dog]"
TIMING = ("samples_per_s", "seconds_sampling", "seconds_reward", "seconds_update")
RECORD_KEYS = {"epoch", "reward_mean", "reward_std", "nonfinite_rewards", "reward_components", "gold_reward",
               "gold_components", "heldout_reward", "heldout_gold", "loss", "clipfrac", "approx_kl", "grad_norm",
               "steps", "skipped", "nonfinite_targets", *TIMING}


def overrides(model, out, *extra) -> list[str]:
    """A run of 2 prompts x 2 images, T=2 steps, one gradient step per epoch."""
    return [f"model={model}", f"output_dir={out}", f"prompts={PROMPTS}", "heldout_prompts=[a painting of a cat]",
            "gold_reward=shapes_gold", "epochs=2", "save_every=1", "keep_last=1", "eval_prompts=[a red circle]",
            "eval_seeds=[0, 1]", "train.reward=jpeg_incompressibility", "train.prompts_per_epoch=2",
            "train.images_per_prompt=2", "train.inner_steps=1", "train.sampling.steps=2",
            "train.sampling.batch_size=4", "train.optim.lr=1e-3", "train.prdp.beta=1e-2", *extra]


def run(model, out, *extra) -> dict:
    return run_finetune(load_config(RunConfig, None, overrides(model, out, *extra)))


def read_metrics_file(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_metrics(out) -> list[dict]:
    return read_metrics_file(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def full_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    return out, run(tiny_pipeline_dir, out)


def test_run_directory_contents(full_run, tiny_pipeline_dir):
    from safetensors.torch import load_file

    from rewardtune.diffusion.loading import load_pipeline

    out, summary = full_run
    assert summary["epochs_run"] == 2 and summary["final"] == str(out / "final")
    saved = from_dict(RunConfig, yaml.safe_load((out / "config.yaml").read_text()))
    assert saved == load_config(RunConfig, None, overrides(tiny_pipeline_dir, out))
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert set(records[0]["reward_components"]) == {"jpeg_incompressibility"}
    assert set(records[0]["gold_components"]) == {"fidelity", "taste", "gold"}
    assert records[0]["gold_components"]["gold"] == pytest.approx(records[0]["gold_reward"])
    assert all(r["steps"] == 1 and r["skipped"] == 0 and r["loss"] is not None for r in records)
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"epoch_000{i}.png" for i in range(3)]
    evals = read_metrics_file(out / "eval.jsonl")
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert all(set(r) == {"epoch", "eval_reward", "eval_gold", "heldout_reward", "heldout_gold"} for r in evals)
    assert summary["before"] == pytest.approx({k: v for k, v in evals[0].items() if k != "epoch"}, abs=1e-4)
    assert summary["after"] == pytest.approx({k: v for k, v in evals[2].items() if k != "epoch"}, abs=1e-4)
    assert json.loads((out / "summary.json").read_text())["before"] == summary["before"]
    from PIL import Image

    with Image.open(out / "before_after.png") as both, Image.open(out / "grids" / "epoch_0000.png") as one:
        assert both.width > 2 * one.width and both.height > one.height
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "kl_curve.png").stat().st_size > 0
    assert [e for e, _ in list_checkpoints(out)] == [2]  # keep_last=1
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folders left
    pipe = load_pipeline(str(out / "final"))
    trained = load_file(str(out / "checkpoints" / "epoch_2" / "trainable.safetensors"))
    base = load_pipeline(str(tiny_pipeline_dir)).unet.state_dict()
    final = pipe.unet.state_dict()
    assert set(trained) == set(final)
    assert all(torch.equal(final[k], v) for k, v in trained.items())
    assert not all(torch.equal(final[k], base[k]) for k in final)  # training moved the UNet


def test_resume_after_crash_equals_uninterrupted_run(full_run, tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    out, _ = full_run
    resumed = tmp_path / "resumed"
    run(tiny_pipeline_dir, resumed, "epochs=1")  # "crashes" after epoch 1 (its checkpoint is written)
    summary = run(tiny_pipeline_dir, resumed, "resume=auto", "resume_allow_changes=[epochs]")
    assert summary["epochs_run"] == 1
    reference, again = read_metrics(out), read_metrics(resumed)
    assert [r["epoch"] for r in again] == [1, 2]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert strip(again[1]) == strip(reference[1])
    assert strip(again[0]) == strip(reference[0])
    weights = "final/unet/diffusion_pytorch_model.safetensors"  # restored weights *and* AdamW moments
    want, got = load_file(str(out / weights)), load_file(str(resumed / weights))
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_existing_run_needs_resume_and_keeps_its_data(full_run, tiny_pipeline_dir, capsys):
    out, _ = full_run
    before = (out / "metrics.jsonl").read_text()
    assert main(["finetune", *overrides(tiny_pipeline_dir, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run; pass resume=auto" in err
    assert (out / "metrics.jsonl").read_text() == before


def test_kill_9_then_resume_matches_the_uninterrupted_run(full_run, tiny_pipeline_dir, tmp_path, capsys):
    """A real crash: SIGKILL the CLI while it works on epoch 2, then resume=auto from the epoch-1 checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    out, _ = full_run
    crashed = tmp_path / "crashed"
    command = [sys.executable, "-m", "rewardtune", "finetune", *overrides(tiny_pipeline_dir, crashed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (crashed / "checkpoints" / "epoch_1").is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, "the run never wrote its epoch-1 checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "final").exists()
    assert main(["finetune", *overrides(tiny_pipeline_dir, crashed, "resume=auto")]) == 0
    printed = capsys.readouterr().out
    assert "finetune: 1 epochs in" in printed and "(epoch 0 -> 2)" in printed
    assert "gold (held-out)" in printed and "before_after.png" in printed
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in read_metrics(crashed)] == [strip(r) for r in read_metrics(out)]
    weights = "final/unet/diffusion_pytorch_model.safetensors"
    want, got = load_file(str(out / weights)), load_file(str(crashed / weights))
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process; mixed precision is fixed when it is first built."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_and_gradient_checkpointing_train(tiny_pipeline_dir, tmp_path, fresh_accelerator_state):
    out = tmp_path / "bf16"
    summary = run(tiny_pipeline_dir, out, "epochs=1", "mixed_precision=bf16", "gradient_checkpointing=true",
                  "heldout_prompts=null")
    record = read_metrics(out)[0]
    assert summary["epochs_run"] == 1 and record["steps"] == 1 and record["skipped"] == 0
    assert record["loss"] is not None and record["grad_norm"] > 0


def lora_reference_unet(model, checkpoint, rank):
    """The base UNet with a fresh rank-``rank`` adapter holding a checkpoint's LoRA weights."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from rewardtune.diffusion.loading import load_pipeline

    unet = load_pipeline(str(model)).unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    load_trainable_state(unet, load_file(str(checkpoint / "trainable.safetensors")))
    return unet


def test_lora_run_saves_weights_loadable_with_load_lora_weights(tiny_pipeline_dir, tmp_path):
    from rewardtune.diffusion.loading import load_pipeline

    out = tmp_path / "lora"
    run(tiny_pipeline_dir, out, "lora_rank=2", "epochs=1", "train.algorithm=ddpo", "train.optim.lr=1e-2",
        "gold_reward=null")
    record = read_metrics(out)[0]
    assert "gold_reward" not in record and record["steps"] == 1
    assert not (out / "final" / "model_index.json").exists()  # LoRA weights only, not a whole pipeline
    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.load_lora_weights(str(out / "final"))
    expected = lora_reference_unet(tiny_pipeline_dir, out / "checkpoints" / "epoch_1", rank=2)
    base = load_pipeline(str(tiny_pipeline_dir)).unet
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 5, 16)
    with torch.no_grad():
        got = pipe.unet(x, t, encoder_hidden_states=text).sample
        want = expected(x, t, encoder_hidden_states=text).sample
        untouched = base(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, untouched, rtol=0, atol=1e-7)  # the adapters were trained and are applied


class NaNFirstReward(Reward):
    """Image brightness with the first score of every call NaN."""

    def score(self, images, prompts):
        scores = images.mean((1, 2, 3)).clone()
        scores[0] = float("nan")
        return scores


def load_nan_reward(device="cpu", dtype="float32"):
    return NaNFirstReward()


def test_nan_rewards_are_skipped_and_reported(tiny_pipeline_dir, tmp_path, monkeypatch):
    from rewardtune.rewards import REWARDS

    monkeypatch.setitem(REWARDS._entries, "nan_first", f"{__name__}:load_nan_reward")
    out = tmp_path / "nan"
    summary = run(tiny_pipeline_dir, out, "epochs=1", "train.reward=nan_first", "heldout_prompts=null",
                  "gold_reward=null")
    record = read_metrics(out)[0]  # valid JSON: NaN is written as null
    assert record["nonfinite_rewards"] == 1 and record["skipped"] == 1 and record["steps"] == 0
    assert record["loss"] is None and record["reward_mean"] is not None
    assert "heldout_reward" not in record and summary["skipped"] == 1
    assert (out / "final" / "model_index.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["train.images_per_prompt=1"], "'train.images_per_prompt' must be at least 2 for prdp"),
    (["train.reward=nope"], "train.reward: unknown reward 'nope'; choose one of:"),
    (["gold_reward=shapes_gold:1,nope:2"], "gold_reward: unknown reward 'nope'"),
    (["prompts=[]"], "prompts is empty or holds an empty prompt"),
    (["prompts=null", "prompts_file=MISSING"], "not found; give a file or folder path, or a shipped set"),
    (["mixed_precision=fp8"], "'mixed_precision' must be null"),
    (["train.prdp.clip_range=0"], "'train.prdp.clip_range' must be > 0"),
    (["train.algorithm=ddpo", "train.ddpo.clip_range=-1"], "'train.ddpo.clip_range' must be > 0"),
    (["resume=MISSING"], "is not a checkpoint folder"),
    (["epochs=0"], "'epochs' must be at least 1"),
    (["model=MISSING"], "unknown model"),
    (["lora_rank=0"], "'lora_rank' must be null (full UNet) or at least 1"),
])
def test_bad_configs_fail_before_any_output(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    extra = [e.replace("MISSING", str(tmp_path / "missing")) for e in extra]
    assert main(["finetune", *overrides(tiny_pipeline_dir, out, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rewardtune: error:") and "\n" not in err and message in err, err
    assert not out.exists()


def test_preset_files_load_and_cli_accepts_them(tmp_path):
    from pathlib import Path

    from rewardtune.presets import load_preset

    configs = Path(__file__).resolve().parents[1] / "configs"
    for job in ("prdp", "ddpo", "grpo"):
        cfg = load_preset(configs / job / "shapes_small.yaml", configs)
        assert cfg.train.algorithm == job and cfg.gold_reward == "shapes_gold"
        assert cfg.train.reward == "shapes_preference" and cfg.model == "shapes-tiny"
    for size in ("small", "large"):  # PRDP, DDPO and GRPO presets: equal budgets, only the loss differs
        prdp, *others = (load_preset(configs / job / f"shapes_{size}.yaml", configs)
                         for job in ("prdp", "ddpo", "grpo"))
        for other in others:
            assert (prdp.lora_rank, prdp.epochs, prdp.prompts_file) == (other.lora_rank, other.epochs,
                                                                        other.prompts_file)
            for key in ("prompts_per_epoch", "images_per_prompt", "inner_steps", "timestep_fraction", "optim",
                        "sampling"):
                assert getattr(prdp.train, key) == getattr(other.train, key), (other.train.algorithm, key)
    for job in ("prdp", "ddpo", "grpo"):  # the flow presets: the UNet ones with the model and the SDE noise level
        unet, flow = (load_preset(configs / job / f"shapes_{kind}small.yaml", configs) for kind in ("", "flow_"))
        sampling = flow.train.sampling
        assert (flow.model, sampling.eta, sampling.scheduler) == ("shapes-tiny-flow", 0.7, "auto")
        flow.train.sampling.eta, flow.model, flow.output_dir = 1.0, unet.model, unet.output_dir
        assert flow == unet


def test_heldout_prompts_are_spread_over_the_list():
    from rewardtune.finetune.run import spread
    from rewardtune.prompts import read_prompts
    from rewardtune.shapes.captions import parse_prompt

    assert spread(list("abcdefghij"), 4) == ["a", "c", "f", "h"]  # floor(i * 10 / 4) = 0, 2, 5, 7
    assert spread(list("abc"), 8) == ["a", "b", "c"]
    heldout = spread(read_prompts("shapes_heldout"), 16)
    assert len(set(heldout)) == 16
    assert {"small", "medium", "large"} <= {parse_prompt(p)["size"] for p in heldout}  # the first 16 are all large


def test_summed_kl_accumulates_approx_kl_times_steps():
    from rewardtune.finetune.report import summed_kl

    records = [{"approx_kl": 0.5, "steps": 2}, {"approx_kl": None, "steps": 4}, {"steps": 3},
               {"approx_kl": 0.25, "steps": 4}]
    assert summed_kl(records) == [1.0, 1.0, 1.0, 2.0]  # 0.5*2, +0 (None), +0 (missing), +0.25*4
    assert summed_kl([]) == []


def test_evaluation_draws_each_seed_independently_even_when_training_shares_x_T(tiny_pipe, tmp_path):
    """same_latent groups a prompt's training samples on one x_T; the evaluation grid's seeds stay separate draws."""
    from rewardtune.finetune.config import SamplingConfig
    from rewardtune.finetune.report import EvalSet, Scorers, evaluate

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    evals = EvalSet(["a red circle"], [0, 1, 2])
    records = {}
    for shared in (False, True):
        sampling = SamplingConfig(steps=3, eta=1.0, guidance=1.0, batch_size=8, same_latent=shared)
        records[shared] = evaluate(tiny_pipe, Scorers(brightness), evals, [], sampling, tmp_path / str(shared), 0)
    assert records[True]["eval_reward"] == records[False]["eval_reward"]
    grids = [(tmp_path / str(shared) / "grids" / "epoch_0000.png").read_bytes() for shared in (False, True)]
    assert grids[0] == grids[1]
