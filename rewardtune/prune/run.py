"""``rewardtune prune CONFIG``: prune -> recover (distillation) -> evaluate -> save, with progress and a summary.

Writes ``OUT/pipeline`` (a diffusers pipeline folder that ``rewardtune sample/score/finetune model=OUT/pipeline``
load), ``OUT/report.json`` (achieved parameter/MAC ratios, quality before/after recovery), ``OUT/distill_log.jsonl``
and the resolved ``OUT/config.yaml``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rewardtune.config import require, save_config
from rewardtune.utils.io import atomic_write_json

logger = logging.getLogger(__name__)
PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts"


@dataclass
class RecoverConfig:
    """Distillation from the unpruned model (``steps: 0`` skips recovery; ``ema``: decay of the moving average of
    the student's weights that recovery ends with, 0 for the last step's weights)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    data: Literal["teacher", "shapes"] = "teacher"
    num_samples: int = 512
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    ema: float = 0.0

    def __post_init__(self) -> None:
        require(self.steps >= 0, "steps", ">= 0", self.steps)
        require(0 <= self.ema < 1, "ema", "in [0, 1)", self.ema)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.num_samples >= 1, "num_samples", "at least 1", self.num_samples)


@dataclass
class EvalConfig:
    """Shapes-world quality on held-out prompts (``num_prompts: 0`` skips evaluation, e.g. for SD models)."""

    num_prompts: int = 32
    images_per_prompt: int = 2
    steps: int = 20
    guidance: float = 5.0
    before_recovery: bool = True

    def __post_init__(self) -> None:
        require(self.num_prompts >= 0, "num_prompts", ">= 0", self.num_prompts)
        require(self.images_per_prompt >= 1, "images_per_prompt", "at least 1", self.images_per_prompt)


@dataclass
class PruneConfig:
    """What to prune and how; ``options`` are passed to the method (see :func:`rewardtune.prune.prune_unet`)."""

    model: str = "shapes-tiny"
    method: str = "structured"
    ratio: float = 0.5
    importance: str = "magnitude"
    options: dict[str, Any] = field(default_factory=dict)
    calibration_samples: int = 16
    prompts_file: str = str(PROMPTS / "shapes_large.txt")
    sample_steps: int = 20
    guidance: float = 5.0
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    out: str = "outputs/prune"
    overwrite: bool = False
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from rewardtune.prune import IMPORTANCES, METHODS

        require(self.method in METHODS, "method", "one of " + ", ".join(METHODS.names()), self.method)
        require(self.importance in IMPORTANCES, "importance", "one of " + ", ".join(IMPORTANCES.names()),
                self.importance)
        require(0 < self.ratio < 1, "ratio", "strictly between 0 and 1 (the fraction to remove)", self.ratio)
        require(self.calibration_samples >= 1, "calibration_samples", "at least 1", self.calibration_samples)


def check_plan_early(unet, cfg: PruneConfig) -> None:
    """Refuse an impossible plan before minutes of sampling and training are spent."""
    from rewardtune.prune.blocks import blocks_config
    from rewardtune.prune.common import check_unet, public_config
    from rewardtune.prune.structured import check_plan

    check_unet(unet)
    if cfg.method == "structured":
        check_plan(unet, cfg.ratio, set(cfg.options.get("ignored", ("conv_out",))))
    elif cfg.method == "blocks":
        blocks_config(public_config(unet.config), cfg.options.get("layers_per_block"),
                      bool(cfg.options.get("mid_block", False)))


def _distill_data(pipe, cfg: PruneConfig):
    from tqdm.auto import tqdm

    from rewardtune.prompts import read_prompts
    from rewardtune.prune.recover import shapes_data, teacher_data

    n = max(cfg.recover.num_samples, cfg.calibration_samples)
    if cfg.recover.data == "shapes":
        return shapes_data(pipe, n, seed=cfg.seed)
    prompts = read_prompts(cfg.prompts_file)
    rng = torch.Generator().manual_seed(cfg.seed)
    chosen = [prompts[i] for i in torch.randint(0, len(prompts), (n,), generator=rng).tolist()]
    with tqdm(total=n, desc="teacher samples", unit="img") as bar:
        return teacher_data(pipe, chosen, list(range(cfg.seed, cfg.seed + n)), steps=cfg.sample_steps,
                            guidance=cfg.guidance, progress=bar.update)


def _recover(student, teacher, data, cfg: PruneConfig, steps: int, masks=None, desc: str = "distilling"):
    from tqdm.auto import tqdm

    from rewardtune.prune.recover import DistillWeights, distill

    r = cfg.recover
    weights = DistillWeights(r.task_weight, r.output_weight, r.feature_weight)
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        def progress(row):
            bar.update()
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        return distill(student, teacher, data, steps=steps, batch_size=r.batch_size, lr=r.lr, weights=weights,
                       masks=masks, seed=cfg.seed, progress=progress, ema=r.ema)


def prune_pipeline_unet(pipe, cfg: PruneConfig, data) -> torch.nn.Module:
    """Run the configured method on ``pipe.unet`` (calibration and lottery training use ``data``)."""
    from rewardtune.prune import prune_unet

    options = dict(cfg.options)
    alphas = pipe.scheduler.alphas_cumprod.float()
    if cfg.importance in ("taylor", "diff_pruning"):
        k = cfg.calibration_samples
        options.update(calibration=(data.latents[:k], data.states[:k]), alphas=alphas)
    if cfg.method == "lottery" and data is not None:
        round_steps = int(options.pop("round_steps", max(1, cfg.recover.steps // 2)))
        options["train_fn"] = lambda model, masks: _recover(model, pipe.unet, data, cfg, round_steps, masks,
                                                            desc="lottery round")
    return prune_unet(pipe.unet, method=cfg.method, ratio=cfg.ratio, importance=cfg.importance, **options)


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


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Prune -> recover -> evaluate -> save (see the module docstring); returns the summary."""
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.prune import masks_of, summarize
    from rewardtune.prune.io import save_pruned_pipeline
    from rewardtune.sample import prepare_out_dir

    pipe = load_pipeline(cfg.model, device=cfg.device)
    check_plan_early(pipe.unet, cfg)
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    save_config(cfg, out / "config.yaml")
    needs_data = cfg.recover.steps > 0 or cfg.importance != "magnitude" or cfg.method == "lottery"
    data = _distill_data(pipe, cfg) if needs_data else None
    pruned = prune_pipeline_unet(pipe, cfg, data)
    report: dict[str, Any] = {"method": cfg.method, "ratio": cfg.ratio, **summarize(pipe.unet, pruned)}
    report["pq_index"], report["sap_ratio"] = _sap(pipe.unet)
    scorer, reference = _reference(pipe, cfg)
    if reference is not None:
        report["quality_original"] = reference["quality"]
        if cfg.evaluate.before_recovery:
            report["quality_pruned"] = _evaluate(pipe, pruned, cfg, scorer, reference)
    if cfg.recover.steps > 0:
        history = _recover(pruned, pipe.unet, data, cfg, cfg.recover.steps, masks_of(pruned) or None)
        (out / "distill_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
        report["distill_loss"] = [history[0]["loss"], history[-1]["loss"]]
        if reference is not None:
            report["quality_recovered"] = _evaluate(pipe, pruned, cfg, scorer, reference)
    save_pruned_pipeline(pipe, pruned, out / "pipeline")
    atomic_write_json(out / "report.json", report)
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
        lines.append(f"weight sparsity {summary['sparsity']:.3f} (masks: dense kernels gain no speed)")
    for key in ("quality_original", "quality_pruned", "quality_recovered"):
        if key in summary:
            lines.append(f"{key.split('_')[1]:>9}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary[key].items()))
    return "\n".join(lines)


__all__ = ["PruneConfig", "RecoverConfig", "EvalConfig", "run_prune", "format_summary"]
