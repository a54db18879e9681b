"""``rewardtune prune CONFIG``: prune -> recover (distillation) -> evaluate -> save, with progress and a summary.

Writes ``OUT/pipeline`` (a diffusers pipeline folder that ``rewardtune sample/score/finetune model=OUT/pipeline``
load), ``OUT/report.json`` (achieved parameter/MAC ratios, quality before/after recovery), ``OUT/distill_log.jsonl``
and the resolved ``OUT/config.yaml``. They appear together when the run completes (staged in a hidden sibling
folder until then): an interrupted or diverged run leaves ``OUT`` as it was. The schema is in
:mod:`rewardtune.prune.config`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rewardtune.config import save_config
from rewardtune.errors import UserError
from rewardtune.outputs import StagedFolder
from rewardtune.prune.config import PROMPTS, EvalConfig, PruneConfig, RecoverConfig
from rewardtune.utils.io import atomic_write_json, dumps_json

logger = logging.getLogger(__name__)
OUTPUT_NAMES = {"pipeline", "report.json", "distill_log.jsonl", "config.yaml"}


def check_plan_early(unet, cfg: PruneConfig) -> None:
    """Refuse an impossible plan (the method's own check) before minutes of sampling and training are spent."""
    from rewardtune.prune.common import check_unet

    check_unet(unet)
    cfg.choice().check(unet, cfg.ratio)


def _distill_data(pipe, cfg: PruneConfig, prompts: list[str] | None):
    from tqdm.auto import tqdm

    from rewardtune.prune.recover import shapes_data, teacher_data

    n = max(cfg.recover.num_samples, cfg.calibration_samples)
    if cfg.recover.data == "shapes":
        return shapes_data(pipe, n, seed=cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    chosen = [prompts[i] for i in torch.randint(0, len(prompts), (n,), generator=rng).tolist()]
    with tqdm(total=n, desc="teacher samples", unit="img") as bar:
        return teacher_data(pipe, chosen, list(range(cfg.seed, cfg.seed + n)), steps=cfg.sample_steps,
                            guidance=cfg.guidance, progress=bar.update)


def sampler_timesteps(scheduler, steps: int) -> torch.Tensor | None:
    """The timesteps ``[steps]`` an ``steps``-step sampler of ``scheduler``'s config visits (None for 0)."""
    if steps == 0:
        return None
    grid = type(scheduler).from_config(scheduler.config)
    grid.set_timesteps(steps)
    return grid.timesteps.long().cpu()


def _recover(student, teacher, data, cfg: PruneConfig, steps: int, masks=None, desc: str = "distilling",
             scheduler=None):
    from tqdm.auto import tqdm

    from rewardtune.prune.recover import DistillWeights, distill

    r = cfg.recover
    timesteps = sampler_timesteps(scheduler, r.timesteps) if scheduler is not None else None
    weights = DistillWeights(r.task_weight, r.output_weight, r.feature_weight, r.guided_weight)
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        def progress(row):
            bar.update()
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        return distill(student, teacher, data, steps=steps, batch_size=r.batch_size, lr=r.lr, weights=weights,
                       masks=masks, seed=cfg.seed, progress=progress, ema=r.ema, timesteps=timesteps,
                       guidance=cfg.guidance)


def prune_pipeline_unet(pipe, cfg: PruneConfig, data, spent: dict | None = None) -> torch.nn.Module:
    """Run the configured method on ``pipe.unet``, supplying what its entries declare they need from ``data``:
    calibration latents, and a distillation ``train_fn`` for methods that train between pruning steps (their
    steps add up in ``spent["train_steps"]``)."""
    from rewardtune.prune import prune_unet

    choice, supplied = cfg.choice(), {}
    if choice.needs_calibration:
        k = cfg.calibration_samples
        supplied.update(calibration=(data.latents[:k], data.states[:k]),
                        alphas=pipe.scheduler.alphas_cumprod.float())
    if choice.method.needs_training:
        steps = choice.method.train_steps(choice.options) or max(1, cfg.recover.steps // 2)
        spent = {} if spent is None else spent

        def train_fn(model, masks):
            spent["train_steps"] = spent.get("train_steps", 0) + steps
            return _recover(model, pipe.unet, data, cfg, steps, masks, desc="training round",
                            scheduler=pipe.scheduler)
        supplied["train_fn"] = train_fn
    return prune_unet(pipe.unet, method=cfg.method, ratio=cfg.ratio, importance=cfg.importance, **cfg.options,
                      **supplied)


def _evaluate(pipe, unet, cfg: PruneConfig, scorer, reference) -> dict[str, float]:
    from rewardtune.prune.evaluate import sample_images

    prompts, seeds = reference["prompts"], reference["seeds"]
    original = pipe.unet
    pipe.unet = unet
    try:
        images = sample_images(pipe, prompts, seeds, cfg.evaluate.steps, cfg.evaluate.guidance)
    finally:
        pipe.unet = original
    return scorer(images, prompts, reference.get("features"))


def _reference(pipe, cfg: PruneConfig):
    """Held-out prompts, seeds, the unpruned model's quality and its tiny-CLIP features (or None)."""
    from rewardtune.prompts import read_prompts
    from rewardtune.prune.evaluate import ShapesQuality, sample_images

    e = cfg.evaluate
    if e.num_prompts == 0:
        return None, None
    prompts = read_prompts(PROMPTS / "shapes_heldout.txt")[: e.num_prompts]
    items = [p for p in prompts for _ in range(e.images_per_prompt)]
    seeds = list(range(len(items)))
    scorer = ShapesQuality(cfg.device)
    images = sample_images(pipe, items, seeds, e.steps, e.guidance)
    reference = {"prompts": items, "seeds": seeds, "features": scorer.features(images)}
    reference["quality"] = scorer(images, items, reference["features"])
    return scorer, reference


def _sap(unet) -> tuple[float, float]:
    """Global PQ index of the unpruned UNet and SAP's suggested prune ratio (Diao et al. 2023)."""
    from rewardtune.prune.pqindex import sparsity_report

    row = sparsity_report(unet)[-1]
    return row.pq_index, row.suggested_ratio


def _read_prompts(cfg: PruneConfig) -> list[str] | None:
    """The teacher prompts, read before any model loads (None when the run samples no teacher data)."""
    from rewardtune.prompts import read_prompts

    return read_prompts(cfg.prompts_file) if cfg.reads_prompts else None


def check_finite(unet: torch.nn.Module, cfg: PruneConfig, history: list[dict] | None) -> None:
    """Refuse to save a UNet with NaN/inf weights (recovery diverged): one line, nothing written."""
    bad = [name for name, tensor in unet.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        last = f"; last distillation loss {history[-1]['loss']:.4g}" if history else ""
        raise UserError(f"the pruned UNet has non-finite weights after recovery ({len(bad)} tensors, e.g. "
                        f"{bad[0]}{last}); nothing was saved; lower recover.lr (now {cfg.recover.lr:g}) or set "
                        "recover.steps=0")


def _prune_and_recover(pipe, cfg: PruneConfig, prompts: list[str] | None, stage) -> tuple[Any, dict[str, Any]]:
    """Prune, evaluate, recover and evaluate again; returns the pruned UNet and the report."""
    from rewardtune.prune import masks_of, summarize

    data = _distill_data(pipe, cfg, prompts) if cfg.needs_data else None
    spent = {"train_steps": 0}
    pruned = prune_pipeline_unet(pipe, cfg, data, spent)
    choice = cfg.choice()
    report: dict[str, Any] = {"method": cfg.method, "ratio": cfg.ratio, **summarize(pipe.unet, pruned),
                              "speeds_up_sampling": choice.method.speeds_up_sampling,
                              "compute": {"steps": spent["train_steps"] + cfg.recover.steps,
                                          "batch_size": cfg.recover.batch_size,
                                          "recover_init": choice.recover_init or cfg.recover.init}}
    report["pq_index"], report["sap_ratio"] = _sap(pipe.unet)
    scorer, reference = _reference(pipe, cfg)
    if reference is not None:
        report["quality_original"] = reference["quality"]
        if cfg.evaluate.before_recovery:
            report["quality_pruned"] = _evaluate(pipe, pruned, cfg, scorer, reference)
    history = None
    if cfg.recover.init == "scratch":
        from rewardtune.prune.recover import reinitialise

        with torch.no_grad():
            reinitialise(pruned, cfg.seed)
    if cfg.recover.steps > 0:
        history = _recover(pruned, pipe.unet, data, cfg, cfg.recover.steps, masks_of(pruned) or None,
                           scheduler=pipe.scheduler)
        check_finite(pruned, cfg, history)
        (stage / "distill_log.jsonl").write_text("".join(dumps_json(row) + "\n" for row in history))
        report["distill_loss"] = [history[0]["loss"], history[-1]["loss"]]
        if reference is not None:
            report["quality_recovered"] = _evaluate(pipe, pruned, cfg, scorer, reference)
    check_finite(pruned, cfg, history)
    return pruned, report


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Prune -> recover -> evaluate -> save (see the module docstring); returns the summary.

    The output folder, the prompts file and the plan are checked before the slow parts; the files are written
    into a hidden staging folder next to ``cfg.out`` and moved in at the end, so an interrupted run leaves
    ``cfg.out`` as it was.
    """
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.prune.io import save_pruned_pipeline

    staged = StagedFolder(cfg.out, cfg.overwrite, OUTPUT_NAMES, done="report.json", command="prune")
    staged.check()
    prompts = _read_prompts(cfg)
    # with cfg.lora, one finetuned UNet: student source and teacher alike
    pipe = load_pipeline(cfg.model, device=cfg.device, lora=cfg.lora, fuse_lora=True)
    check_plan_early(pipe.unet, cfg)
    with staged as stage:
        pruned, report = _prune_and_recover(pipe, cfg, prompts, stage)
        save_pruned_pipeline(pipe, pruned, stage / "pipeline")
        save_config(cfg, stage / "config.yaml")
        atomic_write_json(stage / "report.json", report)
        out = staged.commit()
    logger.info("wrote %s", out)
    return {"out": str(out / "pipeline"), **report}


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the CLI."""
    lines = [f"pruned pipeline: {summary['out']}  (method {summary['method']}, ratio {summary['ratio']})",
             f"parameters {summary['params']:,} -> {summary['params_pruned']:,} (x{summary['param_ratio']:.3f}), "
             f"MACs {summary['macs']:,} -> {summary['macs_pruned']:,} (x{summary['mac_ratio']:.3f})"]
    lines.append(f"PQ index of the unpruned weights {summary['pq_index']:.4f}: SAP suggests pruning "
                 f"{summary['sap_ratio']:.3f} of the weights")
    if "sparsity" in summary:
        lines.append(f"weight sparsity {summary['sparsity']:.3f}")
    if not summary.get("speeds_up_sampling", True):
        lines.append(f"method {summary['method']} does not make sampling faster (dense kernels do the same work)")
    for key in ("quality_original", "quality_pruned", "quality_recovered"):
        if key in summary:
            lines.append(f"{key.split('_')[1]:>9}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary[key].items()))
    return "\n".join(lines)


__all__ = ["PruneConfig", "RecoverConfig", "EvalConfig", "run_prune", "format_summary", "check_finite"]
