"""Diffusion: pipeline loading, the DDIM step with log-probability, and trajectory sampling."""

from rewardtune.diffusion.loading import MODELS, load_pipeline, resolve_model
from rewardtune.diffusion.logprob import ddim_step_with_logprob
from rewardtune.diffusion.sampling import (
    Trajectory,
    decode_latents,
    encode_prompts,
    generators_for,
    sample_trajectories,
)

__all__ = ["MODELS", "load_pipeline", "resolve_model", "ddim_step_with_logprob", "Trajectory", "decode_latents",
           "encode_prompts", "generators_for", "sample_trajectories"]
