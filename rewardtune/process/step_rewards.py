"""Step rewards of denoising trajectories, ``r [B,T]`` with step ``t`` the ``t``-th denoising step
``x^(t) -> x^(t+1)`` (sampling order; branch indices as in :mod:`rewardtune.process.values`):

* ``x0``: the reward of each step's decoded clean-latent prediction, ``R(decode(x0_hat_t))`` (the guided model's
  prediction at the step's input, ``Trajectory.x0_predictions``): cheap (one query per step, no continuation) but
  hackable, the raw learned step score that Clip and Delta refine (:mod:`rewardtune.process.transforms`).
* ``progress``: PAV's advantage under a prover (Setlur et al. 2024, "Rewarding Progress"),
  ``A_t = V(x^(t+1)) - V(x^(t))``, with ``V`` Monte Carlo values (:func:`rewardtune.process.values.
  trajectory_values`) and standard error ``sqrt(se_{t+1}^2 + se_t^2)`` (independent continuations); the
  progress of a trajectory sums to ``R(x_0) - V(x_T)``.
* ``implicit``: PRIME's implicit process reward (Cui et al. 2025), ``beta * log pi_phi(x^(t+1) | x^(t)) /
  pi_ref(x^(t+1) | x^(t))`` from a model pair through the one re-scoring path
  (:func:`rewardtune.diffusion.rescore.trajectory_log_probs`; log-probs averaged over latent dimensions, the DDPO /
  PRDP normalisation). Needs a stochastic sampler (``eta > 0``), where each step has a density.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rewardtune.diffusion.sampling import Trajectory
from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.process.values import ScoreFn, StepValues, _score_latents

STEP_REWARD_KINDS: tuple[str, ...] = ("x0", "progress", "implicit")


def x0_step_rewards(pipe, x0_predictions: torch.Tensor, prompts: list[str], reward: ScoreFn,
                    batch_size: int = 64) -> tuple[torch.Tensor, int]:
    """``(R(decode(x0_hat)) [B,T], reward queries B*T)`` of ``x0_predictions [B,T,C,h,w]`` (sampled with
    ``keep_x0=True``) for ``prompts`` (B), decoded and scored in batches of ``batch_size``."""
    b, steps = x0_predictions.shape[:2]
    flat_prompts = [p for p in prompts for _ in range(steps)]
    scores = _score_latents(pipe, x0_predictions.flatten(0, 1), flat_prompts, reward, batch_size)
    return scores.reshape(b, steps, *scores.shape[1:]), b * steps


def progress_step_rewards(values: StepValues) -> tuple[torch.Tensor, torch.Tensor]:
    """PAV progress ``(V[:, t+1] - V[:, t], sqrt(se[:, t+1]^2 + se[:, t]^2))``, each ``[B,T]``, from values at all
    branch indices (``mean, se [B,T+1]``)."""
    mean, se = values.mean, values.se
    return mean[:, 1:] - mean[:, :-1], (se[:, 1:] ** 2 + se[:, :-1] ** 2).sqrt()


def transitions_of(pipe, trajectory: Trajectory, prompts: list[str], settings: SamplerSettings) -> SimpleNamespace:
    """The re-scoring view (:mod:`rewardtune.diffusion.rescore`) of a full trajectory sampled by ``pipe`` with
    ``settings`` (``keep_latents``) for ``prompts``: one conditioning row per sample."""
    from rewardtune.diffusion.backbones import family_of
    from rewardtune.diffusion.sampling import encode_negative, encode_prompts

    if trajectory.start_step:
        raise ValueError("implicit step rewards need full trajectories (start_step 0), not continuations")
    size = (settings.height, settings.width)
    negative = encode_negative(pipe, settings.negative_prompt, *size) if settings.guidance != 1.0 else None
    return SimpleNamespace(latents=trajectory.latents, timesteps=trajectory.timesteps,
                           prompt_embeds=encode_prompts(pipe, list(prompts), *size),
                           group=torch.arange(len(prompts)), negative_embeds=negative,
                           family=family_of(pipe, settings.scheduler))


@torch.no_grad()
def implicit_step_rewards(policy_pipe, reference_pipe, trajectory: Trajectory, prompts: list[str],
                          settings: SamplerSettings, beta: float = 1.0, chunk: int | None = 64) -> torch.Tensor:
    """PRIME's implicit step rewards ``beta * (log pi_phi - log pi_ref) [B,T]`` of a trajectory's recorded steps
    (``latents [B,T+1,...]``), the policy's and the reference's denoisers both through
    :func:`~rewardtune.diffusion.rescore.trajectory_log_probs` with the sampler's guidance and ``eta``. Both pipelines
    share the text encoder and scheduler (the policy's conditioning is used for both), as a finetuned model and its
    base do."""
    from rewardtune.diffusion.backbones import denoiser
    from rewardtune.diffusion.rescore import trajectory_log_probs
    from rewardtune.errors import UserError

    if settings.eta <= 0 or settings.sde_window is not None:
        raise UserError("implicit step rewards need a density at every step: sample with eta > 0 and no sde_window")
    if trajectory.latents.shape[1] != len(trajectory.timesteps) + 1:
        raise UserError("implicit step rewards need every step's latents: sample with keep_latents/keep_trajectories")
    transitions = transitions_of(policy_pipe, trajectory, prompts, settings)
    index, steps = torch.arange(len(prompts)), torch.arange(len(trajectory.timesteps))

    def log_probs(pipe) -> torch.Tensor:
        return trajectory_log_probs(denoiser(pipe), policy_pipe.scheduler, transitions, index, steps,
                                    settings.guidance, settings.eta, chunk)

    return beta * (log_probs(policy_pipe) - log_probs(reference_pipe)).float().cpu()


__all__ = ["STEP_REWARD_KINDS", "implicit_step_rewards", "progress_step_rewards", "transitions_of",
           "x0_step_rewards"]
