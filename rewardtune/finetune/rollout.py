"""Rollouts of one online epoch (PRDP Algorithm 1, "sample B trajectories per prompt from the snapshot and
query rewards"): trajectories with their per-step log-probs under the snapshot and the reference model, images and
rewards, in one container with documented shapes.

Sample ``i`` belongs to prompt group ``i // B`` (group-major order) and is drawn from its own seed.

The reference model ``pi_ref`` of PRDP's log-ratios (Eq. 10) is one of:

* ``None``: the snapshot *is* the reference (epoch 0 of a run); ``log_probs_ref`` is ``log_probs_old`` (the same
  tensor, no second pass);
* ``ADAPTERS_DISABLED``: the same denoiser with its peft (LoRA) adapters switched off, i.e. the base model, with
  no second model in memory;
* a module: a frozen reference denoiser (full finetuning).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, Union

import torch

from rewardtune.diffusion.backbones import Conditioning, denoiser, family_of
from rewardtune.diffusion.rescore import trajectory_log_probs
from rewardtune.diffusion.service import generate_batches
from rewardtune.diffusion.settings import stochastic_steps
from rewardtune.finetune.config import SamplingConfig

logger = logging.getLogger(__name__)

ADAPTERS_DISABLED = "adapters_disabled"
Reference = Union[torch.nn.Module, Literal["adapters_disabled"], None]


@dataclass
class Rollouts:
    """N prompt groups of B samples over T steps (``S = N*B`` samples).

    prompts: ``[S]`` prompt of each sample. group: ``[S]`` long, its prompt group in ``[0, N)``.
    latents: ``[S,T+1,C,h,w]`` (``x_T`` first, ``x_0`` last). timesteps: ``[T]`` in sampling order.
    log_probs_old: ``[S,T]`` ``log p_old(x_{t-1}|x_t,c)`` recorded while sampling from the snapshot.
    log_probs_ref: ``[S,T]`` the same transitions under the reference model.
    prompt_embeds: a :class:`~rewardtune.diffusion.backbones.Conditioning` of N rows, one per group.
    negative_embeds: one row, or None without CFG.
    rewards: ``[S]`` (on the latents' device). reward_components: ``{name: [S]}``.
    images: ``[S,3,H,W]`` in [0,1], on the CPU. seeds: ``[S]``. family: the scheduler family that sampled them.
    x0_predictions: ``[S,T,C,h,w]`` (collected with ``keep_x0``) or None: at step ``t`` the clean latent predicted
    from ``latents[:, t]`` (the state before the step), for dense ``x0`` step rewards.
    """

    prompts: list[str]
    group: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs_old: torch.Tensor
    log_probs_ref: torch.Tensor
    prompt_embeds: Conditioning
    negative_embeds: Conditioning | None
    rewards: torch.Tensor
    images: torch.Tensor
    seeds: list[int]
    images_per_prompt: int
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    family: str = "ddim"
    x0_predictions: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_groups(self) -> int:
        return len(self.prompt_embeds)


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its base model: every peft tuner layer off inside the block, and on exit each layer's
    previous on/off state and every parameter's ``requires_grad`` restored (peft's toggle changes both)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("reference 'adapters_disabled' needs a UNet with peft (LoRA) adapters; pass a frozen "
                         "reference UNet instead for full finetuning")
    grads = [(p, p.requires_grad) for p in model.parameters()]
    states = [(layer, layer.disable_adapters) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in states:
            layer.enable_adapters(not was_disabled)
        for param, flag in grads:
            param.requires_grad_(flag)


@torch.no_grad()
def reference_log_probs(model, scheduler, rollouts: Rollouts, reference: Reference, cfg: SamplingConfig
                        ) -> torch.Tensor:
    """``[S,T]`` log-probs of the recorded transitions under ``reference`` (see the module docstring), in denoiser
    calls of ``cfg.batch_size`` (sample, step) pairs; only the steps of ``cfg.sde_window`` are scored (the others
    are deterministic: NaN, as recorded)."""
    if reference is None:
        return rollouts.log_probs_old
    every = torch.arange(rollouts.num_samples)
    steps = torch.tensor(list(stochastic_steps(cfg.sde_window, rollouts.num_steps)))
    if isinstance(reference, str):
        if reference != ADAPTERS_DISABLED:
            raise ValueError(f"unknown reference {reference!r}; use None, {ADAPTERS_DISABLED!r} or a UNet")
        with adapters_disabled(model):
            scored = trajectory_log_probs(model, scheduler, rollouts, every, steps, cfg.guidance, cfg.eta,
                                          cfg.batch_size)
    else:
        scored = trajectory_log_probs(reference, scheduler, rollouts, every, steps, cfg.guidance, cfg.eta,
                                      cfg.batch_size)
    out = torch.full_like(rollouts.log_probs_old, float("nan"))
    out[:, steps.to(out.device)] = scored
    return out


def epoch_reference(epoch: int, reference: Reference, uses_reference: bool = True) -> Reference:
    """What to pass as ``reference`` at ``epoch`` (0-based) of a run that starts at the reference model: None at
    epoch 0, where no update has happened and the snapshot is the reference, and None for an algorithm whose loss
    does not use it (DDPO): no second pass over the trajectories."""
    return None if epoch == 0 or not uses_reference else reference


def _score(reward: Callable, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """``[b]`` rewards of ``images [b,3,H,W]`` and the reward's components of this call."""
    device = getattr(reward, "device", images.device)
    scores = reward(images.to(device), prompts).detach().float().reshape(-1)
    components = {k: v.detach().float().reshape(-1) for k, v in getattr(reward, "components", {}).items()}
    return scores, components


def _concat_components(parts: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    """Concatenate per-chunk components; names missing from some chunk are dropped."""
    names = set(parts[0]).intersection(*parts[1:]) if parts else set()
    return {name: torch.cat([p[name].to(device) for p in parts]) for name in sorted(names)}


@torch.no_grad()
def collect_rollouts(pipe, prompts: Sequence[str], images_per_prompt: int, cfg: SamplingConfig, reward: Callable,
                     seeds: int | Sequence[int], reference: Reference = None, keep_x0: bool = False) -> Rollouts:
    """Sample ``B = images_per_prompt`` trajectories per prompt with the pipeline's denoiser (the snapshot) and score
    them.

    Args:
        prompts: N prompts (the epoch's groups).
        reward: ``reward(images [b,3,H,W] in [0,1], prompts) -> [b]`` (e.g. ``load_reward(spec)``).
        seeds: one per sample (``N*B``, group-major) or an int ``s`` meaning ``s, s+1, ...``.
        reference: see the module docstring.
        keep_x0: also keep each step's predicted clean latent (``Rollouts.x0_predictions``).

    Sampling runs through :func:`rewardtune.diffusion.service.generate_batches` in chunks of ``cfg.batch_size``
    samples, each scored as it finishes.
    """
    prompts = list(prompts)
    if not prompts or images_per_prompt < 1:
        raise ValueError(f"need at least one prompt and one image per prompt, got {len(prompts)} x "
                         f"{images_per_prompt}")
    total = len(prompts) * images_per_prompt
    seeds = list(range(seeds, seeds + total)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(seeds) != total:
        raise ValueError(f"need one seed per sample: {len(prompts)} prompts x {images_per_prompt} = {total}, "
                         f"got {len(seeds)}")
    device = denoiser(pipe).device
    latents, log_probs, rewards, images, components, x0s = [], [], [], [], [], []
    for part in generate_batches(pipe, prompts, seeds, cfg, per_prompt=images_per_prompt, keep_trajectories=True,
                                 keep_x0=keep_x0):
        scores, parts = _score(reward, part.images, [prompts[int(g)] for g in part.group.tolist()])
        latents.append(part.trajectory.latents)
        x0s.append(part.trajectory.x0_predictions)
        log_probs.append(part.trajectory.log_probs)
        rewards.append(scores.to(device))
        images.append(part.images)
        components.append(parts)
    group = torch.arange(len(prompts), device=device).repeat_interleave(images_per_prompt)
    log_probs_old = torch.cat(log_probs)
    rollouts = Rollouts(
        prompts=[prompts[int(g)] for g in group.tolist()], group=group, latents=torch.cat(latents),
        timesteps=part.trajectory.timesteps, log_probs_old=log_probs_old, log_probs_ref=log_probs_old,
        prompt_embeds=part.prompt_embeds, negative_embeds=part.negative_embeds, rewards=torch.cat(rewards),
        images=torch.cat(images), seeds=seeds, images_per_prompt=images_per_prompt,
        reward_components=_concat_components(components, device), family=family_of(pipe, cfg.scheduler),
        x0_predictions=torch.cat(x0s) if keep_x0 else None)
    rollouts.log_probs_ref = reference_log_probs(denoiser(pipe), pipe.scheduler, rollouts, reference, cfg)
    bad = int((~torch.isfinite(rollouts.rewards)).sum())
    if bad:
        logger.warning("%d of %d rewards are not finite; gradient steps on their minibatches will be skipped",
                       bad, total)
    logger.info("collected %d rollouts (%d prompts x %d), mean reward %.4g", total, len(prompts),
                images_per_prompt, rollouts.rewards[torch.isfinite(rollouts.rewards)].mean().item() if bad < total
                else float("nan"))
    return rollouts
