"""What every pipeline kind (SD, SDXL, SD3) must do the same way through the one sampling service and trainer:
re-score its own rollouts exactly before an update, train from the same config with only ``model`` changed, save a
final model that plain diffusers loads, and sample from the command line. Kind-specific checks (conditioning,
parity with each pipeline's own ``__call__``) are in test_sdxl.py and test_flow_pipeline.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

PROMPTS = ["a red circle", "a blue square on a white background"]
KINDS = {  # kind -> (folder fixture, scheduler family, plain diffusers loader of a folder)
    "sd": ("tiny_pipeline_dir", "ddim", lambda folder: _plain("StableDiffusionPipeline", folder,
                                                              safety_checker=None, requires_safety_checker=False)),
    "sdxl": ("tiny_sdxl_pipeline_dir", "ddim", lambda folder: _plain("StableDiffusionXLPipeline", folder)),
    "sd3": ("tiny_flow_pipeline_dir", "flow",
            lambda folder: _plain("StableDiffusion3Pipeline", folder, text_encoder_3=None, tokenizer_3=None)),
}


def _plain(name: str, folder, **kwargs):
    import diffusers

    return getattr(diffusers, name).from_pretrained(folder, **kwargs)


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param, request.getfixturevalue(KINDS[request.param][0])


def test_deterministic_sampling_matches_the_pipelines_own_call(kind):
    """eta 0 (DDIM for the UNets, the Euler step of the flow ODE for SD3) reproduces the pipeline's ``__call__``
    with the same scheduler seed for seed, guidance included."""
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.diffusion.service import generate
    from rewardtune.diffusion.settings import SamplerSettings

    pipe = load_pipeline(str(kind[1]))
    out = generate(pipe, PROMPTS, [5, 6], SamplerSettings(steps=4, guidance=3.0, eta=0.0), keep_trajectories=True)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    latents = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=generators,
                   output_type="latent").images
    assert (out.final_latents - latents).abs().max() < 1e-4
    assert out.images.shape == (2, 3, 32, 32) and torch.isnan(out.trajectory.log_probs).all()


def test_ratio_is_one_before_the_first_update_and_an_update_moves_it(kind):
    """Recomputed log-probs equal the recorded ones (ratio exactly 1) until a GRPO step moves the denoiser; the VAE
    and text encoders stay frozen."""
    from rewardtune.diffusion.backbones import backbone_of
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.diffusion.rescore import trajectory_log_probs
    from rewardtune.finetune.algorithms import make_algorithm
    from rewardtune.finetune.config import FinetuneConfig, OptimConfig, SamplingConfig
    from rewardtune.finetune.rollout import collect_rollouts
    from rewardtune.finetune.update import make_optimizer, update_epoch

    name, folder = kind
    pipe = load_pipeline(str(folder))
    backbone = backbone_of(pipe)
    frozen = backbone.frozen_parts(pipe)
    for part in frozen:
        part.requires_grad_(False)
    model = backbone.denoiser(pipe)
    sampling = SamplingConfig(steps=3, guidance=3.0, eta=0.7, batch_size=4)
    cfg = FinetuneConfig(algorithm="grpo", reward="jpeg_incompressibility", prompts_per_epoch=2, images_per_prompt=3,
                         inner_steps=1, sampling=sampling, optim=OptimConfig(lr=1e-2),
                         algorithm_options={"clip_range": 0.5, "kl_beta": 0.0})
    rollouts = collect_rollouts(pipe, PROMPTS, 3, sampling, lambda images, prompts: images.mean((1, 2, 3)), seeds=0)
    assert rollouts.family == KINDS[name][1] and rollouts.latents.shape == (6, 4, 4, 8, 8)
    assert torch.isfinite(rollouts.log_probs_old).all()

    def rescored():
        with torch.no_grad():
            return trajectory_log_probs(model, pipe.scheduler, rollouts, torch.arange(6), torch.arange(3),
                                        sampling.guidance, sampling.eta, chunk=4)

    torch.testing.assert_close(rescored(), rollouts.log_probs_old, rtol=0, atol=1e-5)
    before = [copy.deepcopy(part.state_dict()) for part in frozen]
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    metrics = update_epoch(model, optimizer, rollouts, cfg, make_algorithm(cfg), scheduler=pipe.scheduler)
    assert metrics["steps"] == 1 and metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert (rescored() - rollouts.log_probs_old).abs().max() > 1e-6
    for part, state in zip(frozen, before):
        assert all(torch.equal(v, state[k]) for k, v in part.state_dict().items())


@pytest.mark.parametrize("algorithm, lora, extra", [("prdp", 2, []), ("ddpo", None, []),
                                                    ("grpo", None, ["train.sampling.sde_window=[1, 2]"])])
def test_finetune_runs_and_plain_diffusers_loads_the_result(kind, tmp_path, algorithm, lora, extra):
    """The same finetuning config trains every kind (only ``model`` differs); ``final/`` loads in plain diffusers
    (a pipeline folder, or LoRA weights on the base) and generates. The GRPO run trains the full denoiser on its
    second step only (an SDE window), with the KL to a frozen reference."""
    from rewardtune.config import load_config
    from rewardtune.finetune.run import RunConfig, run_finetune

    name, folder = kind
    out = tmp_path / algorithm
    cfg = load_config(RunConfig, None, [
        f"model={folder}", f"output_dir={out}", "prompts=[a red circle, a blue square]", "epochs=2",
        "save_every=1", f"lora_rank={lora or 'null'}", "eval_prompts=[a red circle]", "eval_seeds=[0]",
        f"train.algorithm={algorithm}", "train.reward=jpeg_incompressibility", "train.prompts_per_epoch=2",
        "train.images_per_prompt=2", "train.inner_steps=1", "train.sampling.steps=2", "train.sampling.eta=0.7",
        "train.optim.lr=1e-3", *extra])
    run_finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["steps"] == 1 and r["grad_norm"] > 0 for r in records)
    final, load = out / "final", KINDS[name][2]
    pipe = load(folder if lora else final)
    model = pipe.transformer if name == "sd3" else pipe.unet
    if lora:
        pipe.load_lora_weights(final)
        names = {n for n, _ in model.named_parameters() if "lora" in n}
        assert any("to_q.lora" in n for n in names) and any("to_k.lora" in n for n in names)
    else:
        base = (load(folder).transformer if name == "sd3" else load(folder).unet).state_dict()
        assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_sample_command(kind, tmp_path):
    from rewardtune.cli import main

    _, folder = kind
    assert main(["sample", "--model", str(folder), "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2 and (tmp_path / "s" / "grid.png").is_file()


def test_an_unsupported_pipeline_kind_is_one_line_naming_the_supported_ones(tiny_pipeline_dir, tmp_path, capsys):
    """A pipeline folder of a kind without a backbone entry (here: FLUX) fails before any weight loads, from the
    command line as one line with exit 2; in the library ``backbone_of`` names the kinds it supports."""
    import shutil

    from rewardtune.cli import main
    from rewardtune.diffusion.backbones import backbone_of

    folder = tmp_path / "flux"
    shutil.copytree(tiny_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    assert main(["sample", "--model", str(folder), "--prompt", "a red circle", "--num-images", "1",
                 "--out", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "is a FluxPipeline pipeline; rewardtune supports StableDiffusion3Pipeline" in error
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="unsupported pipeline object; rewardtune supports .*StableDiffusion3"):
        backbone_of(object())
