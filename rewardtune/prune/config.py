"""The schema of ``rewardtune prune`` (imports no torch, so ``prune --help`` can list its keys at once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rewardtune.config import PATH, require

PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RecoverConfig:
    """Distillation from the unpruned model (the teacher) after pruning."""

    steps: int = field(default=300, metadata=_help("AdamW steps; 0 skips recovery"))
    batch_size: int = field(default=32, metadata=_help("noisy latents per step"))
    lr: float = field(default=5e-4, metadata=_help("peak learning rate (cosine to 10 %)"))
    data: Literal["teacher", "shapes"] = field(default="teacher", metadata=_help(
        "teacher: samples of the unpruned model for prompts_file; shapes: rendered shapes"))
    num_samples: int = field(default=512, metadata=_help("distillation latents to draw"))
    task_weight: float = field(default=1.0, metadata=_help("weight of the noise-prediction loss"))
    output_weight: float = field(default=1.0, metadata=_help("weight of matching the teacher's output"))
    feature_weight: float = field(default=1.0, metadata=_help("weight of matching the teacher's block features"))
    guided_weight: float = field(default=0.0, metadata=_help(
        "weight of matching the teacher's classifier-free-guided prediction at the run's guidance; > 0 trains on "
        "conditional/unconditional pairs of the same noisy latents"))
    ema: float = field(default=0.0, metadata=_help("decay of a moving average of the weights; 0: last step's"))
    init: Literal["pruned", "scratch"] = field(default="pruned", metadata=_help(
        "pruned: recover from the pruned weights; scratch: re-initialise them first (the same architecture and "
        "mask trained from random weights with the same steps: Liu et al.'s Scratch-E baseline)"))
    timesteps: int = field(default=0, metadata=_help(
        "0: noise levels drawn from all training timesteps; N: only the N-step DDIM sampler's timesteps (a student "
        "specialised for N-step sampling)"))

    def __post_init__(self) -> None:
        require(self.steps >= 0, "steps", ">= 0", self.steps)
        require(self.timesteps >= 0, "timesteps", ">= 0", self.timesteps)
        require(0 <= self.ema < 1, "ema", "in [0, 1)", self.ema)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.guided_weight >= 0, "guided_weight", ">= 0", self.guided_weight)
        require(self.guided_weight == 0 or self.batch_size >= 2, "batch_size", "at least 2 with guided_weight > 0",
                self.batch_size)
        require(self.num_samples >= 1, "num_samples", "at least 1", self.num_samples)


@dataclass
class EvalConfig:
    """Shapes-world quality on held-out prompts."""

    num_prompts: int = field(default=32, metadata=_help("held-out prompts; 0 skips evaluation (e.g. SD models)"))
    images_per_prompt: int = field(default=2, metadata=_help("images per prompt (seeds 0, 1, ...)"))
    steps: int = field(default=20, metadata=_help("DDIM steps of the evaluation samples"))
    guidance: float = field(default=5.0, metadata=_help("classifier-free guidance of the evaluation samples"))
    before_recovery: bool = field(default=True, metadata=_help("also evaluate the pruned UNet before recovery"))

    def __post_init__(self) -> None:
        require(self.num_prompts >= 0, "num_prompts", ">= 0", self.num_prompts)
        require(self.images_per_prompt >= 1, "images_per_prompt", "at least 1", self.images_per_prompt)


@dataclass
class PruneConfig:
    """What to prune and how (see :func:`rewardtune.prune.prune_unet`)."""

    model: str = field(default="shapes-tiny", metadata=PATH | _help(
        "registered name, pipeline folder or hub id"))
    lora: str | None = field(default=None, metadata=PATH | _help(
        "LoRA folder (e.g. a finetune run's final/) fused into model's UNet first: prunes the finetuned model, "
        "which is then also the distillation teacher"))
    method: str = field(default="structured", metadata=_help(
        "structured, blocks, layers, magnitude, lottery, granet, bip or semi_structured"))
    ratio: float = field(default=0.5, metadata=_help("fraction to remove, in (0, 1): channels or weights"))
    importance: str = field(default="magnitude", metadata=_help(
        "channel scores of structured: magnitude, taylor or diff_pruning"))
    options: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "method (and importance) options, e.g. {mid_block: false}; an unknown name lists the valid ones"))
    calibration_samples: int = field(default=16, metadata=_help(
        "latents for importances that need calibration (taylor, diff_pruning)"))
    prompts_file: str = field(default=str(PROMPTS / "shapes_large.txt"), metadata=PATH | _help(
        "prompts of the teacher samples (recover.data=teacher)"))
    sample_steps: int = field(default=20, metadata=_help("DDIM steps of the teacher samples"))
    guidance: float = field(default=5.0, metadata=_help("classifier-free guidance of the teacher samples"))
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    out: str = field(default="outputs/prune", metadata=_help("output folder (new, empty, or overwrite=true)"))
    overwrite: bool = field(default=False, metadata=_help("replace the files of a non-empty out"))
    seed: int = field(default=0, metadata=_help("seed of the teacher samples and of recovery"))
    device: str = field(default="cpu", metadata=_help("cpu, cuda, cuda:1, mps ..."))

    def __post_init__(self) -> None:
        from rewardtune.prune.registry import IMPORTANCES, METHODS

        require(self.method in METHODS, "method", "one of " + ", ".join(METHODS.names()), self.method)
        require(self.importance in IMPORTANCES, "importance", "one of " + ", ".join(IMPORTANCES.names()),
                self.importance)
        require(0 < self.ratio < 1, "ratio", "strictly between 0 and 1 (the fraction to remove)", self.ratio)
        require(self.calibration_samples >= 1, "calibration_samples", "at least 1", self.calibration_samples)
        self.options = self.choice().given(self.options)  # typed values of the keys given

    def choice(self):
        """The method and importance entries with their typed options (a ``PruneChoice``)."""
        from rewardtune.prune.registry import resolve

        return resolve(self.method, self.importance, self.options)

    @property
    def needs_data(self) -> bool:
        """Whether the run samples distillation/calibration data (recovery, calibration, training methods)."""
        choice = self.choice()
        return self.recover.steps > 0 or choice.needs_calibration or choice.method.needs_training

    @property
    def reads_prompts(self) -> bool:
        """Whether the run reads ``prompts_file`` (teacher samples)."""
        return self.needs_data and self.recover.data == "teacher"


def check_options(method: str, importance: str, options: dict[str, Any]) -> None:
    """Refuse an option the method (or its importance) does not take or a value of the wrong type: one line naming
    ``options.KEY`` (see :func:`rewardtune.prune.registry.resolve`)."""
    from rewardtune.prune.registry import resolve

    resolve(method, importance, options)


__all__ = ["PruneConfig", "RecoverConfig", "EvalConfig", "check_options", "PROMPTS"]
