"""Step-level (process) rewards for denoising trajectories.

A denoising trajectory is a chain of T steps with one outcome reward, the object the process-reward papers study
for LLM reasoning. Step ``t`` is the ``t``-th denoising step in sampling order; branch index ``j`` (0..T) the
latent after ``j`` steps.

* :mod:`rewardtune.process.transforms`: Clip / Delta refinements against reward hacking, returns-to-go, ReARTeR's TD
  look-ahead; ``TRANSFORMS`` names them for configs.
* :mod:`rewardtune.process.values`: Monte Carlo step values ``V(x_j)`` with standard errors under a prover (PAV),
  batched through the sampler's continuations (``sample_trajectories(start_step=, start_latents=)``), queries counted.
* :mod:`rewardtune.process.step_rewards`: step rewards ``x0`` (decoded predictions), ``progress`` (PAV) and
  ``implicit`` (PRIME's ``beta log pi_phi / pi_ref``).
* :mod:`rewardtune.process.decisive`: the decisive step, OmegaPRM's binary search and the exhaustive sweep.
* :mod:`rewardtune.process.shapes`: outcomes read by the shapes world's gold oracle (evaluation only).
* :mod:`rewardtune.process.plots`: the figures of ``rewardtune steps``.
"""
