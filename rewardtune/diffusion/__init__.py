"""Diffusion: pipeline loading, the step with log-probability, trajectory sampling, the sampling service
(:mod:`rewardtune.diffusion.service`) and re-scoring of stored transitions (:mod:`rewardtune.diffusion.rescore`).

Attributes load on first use, so :mod:`rewardtune.diffusion.settings` (the typed sampler settings) imports without
torch.
"""

import importlib

_EXPORTS = {
    "MODELS": "loading", "load_pipeline": "loading", "resolve_model": "loading",
    "ddim_step_with_logprob": "logprob", "flow_sde_step_with_logprob": "flow",
    "Trajectory": "sampling", "decode_latents": "sampling", "encode_prompts": "sampling",
    "generators_for": "sampling", "sample_trajectories": "sampling",
    "SamplerSettings": "settings", "SCHEDULER_FAMILIES": "settings",
    "Generated": "service", "generate": "service", "generate_batches": "service",
    "trajectory_log_probs": "rescore",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewardtune.diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rewardtune.diffusion.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
