"""Typed configs of online reward finetuning (PRDP Algorithm 1 and the DDPO baseline).

Defaults follow PRDP's small-scale preset (Table 4: N=32 prompts x B=16 images per epoch, K=10 gradient updates,
beta=3e-5, stepwise clip 1e-6, AdamW lr 1e-5 wd 1e-4, grad clip 1.0) and its sampler (50 DDPM steps = DDIM eta=1,
CFG 5.0). DDPO's defaults follow kvablack/ddpo-pytorch (clip 1e-4, advantages clipped to +-5, per-prompt stat
tracking with buffer 32 / min count 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rewardtune.config import PATH, require
from rewardtune.diffusion.settings import SamplerSettings


@dataclass
class PRDPConfig:
    """``beta``: KL weight (the target is ``dr / beta``, Eq. 14); ``clip_range``: stepwise clip eps (Eqs. 20-21)."""

    beta: float = 3e-5
    clip_range: float = 1e-6

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", "> 0 (the KL weight divides the reward difference)", self.beta)
        require(self.clip_range > 0, "clip_range", "> 0 (PRDP is unstable without proximal clipping)",
                self.clip_range)


@dataclass
class DDPOConfig:
    """PPO-clip range on the importance ratio, advantage clipping, and DDPO's per-prompt reward normalisation."""

    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stats: bool = True
    stat_buffer: int = 32
    stat_min_count: int = 16

    def __post_init__(self) -> None:
        require(self.clip_range > 0, "clip_range", "> 0 (the PPO ratio band 1 +- clip_range)", self.clip_range)
        require(self.adv_clip_max > 0, "adv_clip_max", "> 0", self.adv_clip_max)
        require(self.stat_buffer >= 1, "stat_buffer", "at least 1", self.stat_buffer)
        require(1 <= self.stat_min_count <= self.stat_buffer, "stat_min_count",
                f"in [1, stat_buffer={self.stat_buffer}] (otherwise per-prompt stats are never used)",
                self.stat_min_count)


@dataclass
class SamplingConfig(SamplerSettings):
    """The rollout sampler: :class:`~rewardtune.diffusion.settings.SamplerSettings` with PRDP's defaults (50 DDIM
    steps, eta 1). ``eta`` must be > 0: a deterministic step has no log-probability. ``batch_size``: samples per
    sampling call (and (sample, step) pairs per UNet call of the reference pass)."""

    steps: int = 50
    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.eta <= 1, "eta", "in (0, 1] (eta=0 is deterministic and has no log-probability)",
                self.eta)


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        require(0 < self.lr <= 1, "lr", "in (0, 1] (AdamW; finetuning uses ~1e-5)", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                "two numbers in [0, 1)", self.betas)
        require(self.eps > 0, "eps", "> 0", self.eps)
        require(self.max_grad_norm > 0, "max_grad_norm", "> 0", self.max_grad_norm)


@dataclass
class PRMConfig:
    """The implicit process reward model of PRIME mode (``train.dense.kind: implicit``): ``phi``, a copy of the
    reference denoiser (its own LoRA adapter with ``lora_rank``), trained online on each epoch's outcome rewards with
    PRDP's reward-difference regression (:func:`~rewardtune.finetune.losses.prdp_loss_grouped`) so that
    ``beta * mean_t log pi_phi/pi_ref`` predicts the reward up to a per-group constant.

    ``beta``: the implicit reward's scale (the regression target is ``dr / beta``); ``clip_range``: PRDP's stepwise
    proximal clip; ``lr``: AdamW's learning rate on phi's trainable weights (weight decay, betas and gradient clipping
    as ``train.optim``)."""

    beta: float = 1.0
    clip_range: float = 1e-2
    lr: float = 5e-4

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", "> 0 (the implicit reward's scale divides the reward difference)", self.beta)
        require(self.clip_range > 0, "clip_range", "> 0 (PRDP's stepwise clip)", self.clip_range)
        require(0 < self.lr <= 1, "lr", "in (0, 1]", self.lr)


@dataclass
class DenseConfig:
    """Dense (per-step) advantages: ``A[b,t] = A_outcome[b] + weight * Z[b,t]`` with ``Z`` the dense term ``D``
    standardised per prompt group and step (:mod:`rewardtune.finetune.dense` has the math).

    ``kind``: ``none`` (outcome only: today's per-sample advantages, bit for bit), ``x0`` (the training reward of each
    step's decoded clean-image prediction: S*(T-1) more reward queries per epoch), ``implicit`` (PRIME:
    ``beta * log pi_phi/pi_ref`` per step from an implicit PRM trained online, see ``prm``; no extra reward queries)
    or ``progress`` (PAV: ``V(x_{t-1}) - V(x_t)`` under the base model, by Monte Carlo).
    ``transform``: ``none``, ``clip`` (``min(r - clip_eta, 0)``) or ``delta`` (``r_t - r_{t+1}``) on the step rewards.
    ``accumulate``: ``returns_to_go`` (``D_t = sum_{k>=t} gamma^(k-t) r_k``), ``step`` (``D_t = r_t``) or ``auto``
    (the kind's own: returns-to-go for ``x0`` and ``implicit``, as PRIME; the step itself for ``progress``, as PAV's
    prover advantage). ``td_lambda``: ReARTeR's TD look-ahead on the step rewards before the transform (null: off).
    ``std_eps``: added to the per-step group std. ``progress_continuations``: K Monte Carlo continuations per value.
    """

    kind: Literal["none", "x0", "implicit", "progress"] = "none"
    weight: float = 1.0
    transform: Literal["none", "clip", "delta"] = "none"
    clip_eta: float = 0.0
    accumulate: Literal["auto", "returns_to_go", "step"] = "auto"
    gamma: float = 1.0
    td_lambda: float | None = None
    std_eps: float = 1e-4
    progress_continuations: int = 2
    prm: PRMConfig = field(default_factory=PRMConfig)

    def __post_init__(self) -> None:
        require(self.weight >= 0, "weight", ">= 0 (the dense term's weight next to the outcome advantage)",
                self.weight)
        require(0 < self.gamma <= 1, "gamma", "in (0, 1] (the returns-to-go discount)", self.gamma)
        require(self.td_lambda is None or 0 <= self.td_lambda <= 1, "td_lambda", "null or in [0, 1]",
                self.td_lambda)
        require(self.std_eps > 0, "std_eps", "> 0 (a group of equal dense terms would divide 0 by 0)", self.std_eps)
        require(self.progress_continuations >= 1, "progress_continuations", "at least 1",
                self.progress_continuations)


@dataclass
class FinetuneConfig:
    """One online epoch: sample ``images_per_prompt`` (B) trajectories for each of ``prompts_per_epoch`` (N)
    prompts from the snapshot, score them, then ``inner_steps`` (K) passes over the N prompt groups with
    ``groups_per_update`` groups per gradient step (None: all N, one step per pass as in PRDP's Algorithm 1).

    ``algorithm``: an entry of :data:`rewardtune.finetune.algorithms.ALGORITHMS` (``prdp``, ``ddpo``, ...);
    ``algorithm_options``: the options of an algorithm that declares an ``Options`` dataclass.
    ``timestep_fraction``: share of the T steps trained on per sample (a random subset, DDPO's option; PRDP uses 1).
    ``forward_chunk``: (sample, step) pairs per UNet forward in the update; bigger minibatches use an exact
    two-pass gradient (see :mod:`rewardtune.finetune.update`).
    ``dense``: per-step advantages from step rewards (:class:`DenseConfig`; default ``none``: outcome only).
    """

    algorithm: str = "prdp"
    algorithm_options: dict[str, Any] = field(default_factory=dict)
    reward: str = "shapes_preference"
    prompts_per_epoch: int = 32
    images_per_prompt: int = 16
    inner_steps: int = 10
    groups_per_update: int | None = None
    timestep_fraction: float = 1.0
    forward_chunk: int = 64
    seed: int = 0
    prdp: PRDPConfig = field(default_factory=PRDPConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)

    def __post_init__(self) -> None:
        from rewardtune.finetune.algorithms import check_algorithm

        require(bool(self.reward.strip()), "reward", "a reward name or weighted sum (e.g. shapes_preference)",
                self.reward)
        require(self.prompts_per_epoch >= 1, "prompts_per_epoch", "at least 1", self.prompts_per_epoch)
        check_algorithm(self)  # the registered entry's constraints (e.g. PRDP needs 2 images per prompt)
        require(self.inner_steps >= 1, "inner_steps", "at least 1", self.inner_steps)
        groups = self.groups_per_update
        require(groups is None or (groups >= 1 and self.prompts_per_epoch % groups == 0), "groups_per_update",
                f"null or a divisor of prompts_per_epoch={self.prompts_per_epoch}", groups)
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]", self.timestep_fraction)
        require(self.forward_chunk >= 1, "forward_chunk", "at least 1", self.forward_chunk)
        require(self.seed >= 0, "seed", ">= 0", self.seed)


def _default_eval_prompts() -> list[str]:
    return ["a red circle", "a blue square", "a green triangle", "a yellow circle on a black background"]


@dataclass
class RunConfig:
    """One finetuning run. The trained reward and the seed are ``train.reward`` and ``train.seed``.

    ``gold_reward``: a reward spec scored on every epoch's samples and the held-out prompts, never trained on.
    ``prompts`` / ``prompts_file``: the training prompt set, exactly one: inline, or any source of
    :func:`rewardtune.prompts.read_prompts` (text/CSV/JSON(L)/Parquet files, local HF dataset folders, the HPDv2
    and Pick-a-Pic layouts); ``prompts_column`` / ``prompts_split`` pick the column and split of tables and
    datasets (``heldout_split`` for the held-out source); repeated prompts are dropped (``unique_prompts``) so
    every distinct prompt is drawn equally often.
    ``heldout_prompts`` / ``heldout_prompts_file``: optional; ``heldout_count`` of them, evenly spaced over the
    list, are sampled once per epoch (one image each, fixed seeds) and scored. ``lora_rank``: None trains the full
    UNet; a rank trains LoRA adapters on the attention projections (``lora_alpha`` defaults to the rank).
    ``resume``: None, ``auto`` (latest readable checkpoint of ``output_dir``, or a fresh start) or a checkpoint
    folder; a resume must keep the run's settings except the dotted keys (or sections) listed in
    ``resume_allow_changes``, e.g. ``[epochs]`` to extend a run (``output_dir``, ``resume``, ``keep_last`` and
    ``device`` may always change). ``save_every``: checkpoint and grid every that many epochs (and after the last);
    ``keep_last``: checkpoints kept. ``mixed_precision``:
    autocast of the UNet forward by accelerate (weights and optimizer stay fp32; log-probs are computed in fp32);
    ``gradient_checkpointing``: recompute UNet activations in the backward pass (less memory, ~30 % more time).
    ``fsdp``: shard the denoiser's weights, gradients and optimizer states over the processes (torch's FSDP2,
    :mod:`rewardtune.utils.fsdp`; full finetuning only, bf16 or fp32; also on when accelerate is launched with an
    FSDP config such as ``configs/accelerate/fsdp.yaml``): checkpoints stay sharded, ``final/`` is gathered.
    ``log_with``: null/none, tensorboard or wandb: the accelerate tracker that also gets each epoch's metrics and
    every evaluation grid (TensorBoard writes event files to output_dir/rewardtune, appended to on resume; needs
    pip install tensorboard or pip install wandb); it may change on resume.
    """

    model: str = field(default="shapes-tiny", metadata=PATH)
    gold_reward: str | None = None
    prompts: list[str] | None = None
    prompts_file: str | None = field(default=None, metadata=PATH)
    prompts_column: str | None = None
    prompts_split: str = "train"
    unique_prompts: bool = True
    heldout_prompts: list[str] | None = None
    heldout_prompts_file: str | None = field(default=None, metadata=PATH)
    heldout_split: str = "test"
    heldout_count: int = 8
    output_dir: str = "outputs/finetune"
    epochs: int = 10
    save_every: int = 5
    keep_last: int = 2
    resume: str | None = None
    resume_allow_changes: list[str] = field(default_factory=list)
    lora_rank: int | None = None
    lora_alpha: float | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False
    eval_prompts: list[str] = field(default_factory=_default_eval_prompts)
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    device: str = "cpu"
    log_with: str | None = None
    train: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", "at least 1", self.epochs)
        require(self.save_every >= 1, "save_every", "at least 1", self.save_every)
        require(self.keep_last >= 1, "keep_last", "at least 1", self.keep_last)
        require(self.heldout_count >= 1, "heldout_count", "at least 1", self.heldout_count)
        require(self.lora_rank is None or self.lora_rank >= 1, "lora_rank", "null (full UNet) or at least 1",
                self.lora_rank)
        require(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "null or > 0", self.lora_alpha)
        require(self.mixed_precision in (None, "no", "fp16", "bf16"), "mixed_precision",
                "null (as accelerate launch says), 'no', 'fp16' or 'bf16'", self.mixed_precision)
        require((self.prompts is None) != (self.prompts_file is None), "prompts",
                "set either prompts (a list) or prompts_file, exactly one", self.prompts)
        require(not (self.heldout_prompts and self.heldout_prompts_file), "heldout_prompts",
                "null when heldout_prompts_file is set (give one of them)", self.heldout_prompts)
        require(bool(self.eval_prompts) and all(p.strip() for p in self.eval_prompts), "eval_prompts",
                "a non-empty list of non-empty prompts", self.eval_prompts)
        require(bool(self.eval_seeds) and all(s >= 0 for s in self.eval_seeds), "eval_seeds",
                "a non-empty list of seeds >= 0", self.eval_seeds)
        require(bool(str(self.output_dir).strip()), "output_dir", "a folder path", self.output_dir)
        require(not (self.fsdp and self.lora_rank), "fsdp",
                "false with LoRA (FSDP shards full finetuning; adapters are small): set lora_rank=null or fsdp=false",
                self.fsdp)
        require(not (self.fsdp and self.train.dense.kind not in ("none", "x0")), "fsdp",
                "false with train.dense.kind implicit or progress (their extra models are not sharded)", self.fsdp)
        require(not (self.fsdp and self.mixed_precision == "fp16"), "fsdp",
                "false with mixed_precision=fp16 (use bf16 with FSDP)", self.fsdp)
        require(self.log_with in (None, "none", "tensorboard", "wandb"), "log_with",
                "null, 'none', 'tensorboard' or 'wandb'", self.log_with)
