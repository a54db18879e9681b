"""Where is the policy gradient's signal? Per denoising step, the signal-to-noise ratio of the finetuning gradient.

    python scripts/gradient_snr.py [CONFIG] [key=value ...] [--batches 8] [--no-write]

At the start of a run (LoRA adapters at their initial value, so the policy is the base model) this script draws
``--batches`` independent epochs of rollouts exactly as the preset does (N prompts of its training set, B samples
each, its sampler and reward) and computes, for every denoising step ``t`` separately, the gradient of

    L_t = (1/S) sum_i (r_i - mean of r over i's prompt group) * log p_theta(x_{t-1}^i | x_t^i, c_i)

with respect to the trainable (LoRA) weights: ``g_t = grad L_t``, one vector per step and batch. With log-ratios at
zero, PRDP's loss gradient is this group-centred estimator up to a constant factor (its squared error over the
pairs of a group, ``sum_{i<j} (dl_ij - dr_ij / beta)^2``, differentiates to
``-2 B / beta sum_i (r_i - r_bar) grad l_i`` at dl = 0), and DDPO's/GRPO's, with per-prompt normalised advantages,
up to each prompt's reward scale. Over the batches:

    mean m_t = E_b[g_t],  noise n_t = E_b ||g_t - m_t||^2 (unbiased),  signal s_t = ||m_t||^2 - n_t / batches

so ``s_t`` is an unbiased estimate of ``||E g_t||^2``; ``SNR_t = s_t / n_t`` compares the step's expected gradient
with the spread of one epoch's estimate. The update sums the steps a pass trains (``sum_t g_t``), so a step whose
noise is large and signal small drowns the others. Writes the ``gradient-snr`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]


def group_centred(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``r_i - mean_{j in group(i)} r_j`` for ``rewards [S]`` and ``group [S]`` (long, group ids)."""
    groups = int(group.max()) + 1
    sums = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, group, rewards)
    counts = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    return rewards - (sums / counts)[group]


def snr(grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """``grads [batches,T,P]`` -> per step ``[T]``: mean norm of one batch's gradient, noise ``E||g - m||^2``,
    unbiased signal ``||m||^2 - noise / batches`` and their ratio."""
    b = grads.shape[0]
    mean = grads.mean(0)
    noise = (grads - mean).pow(2).sum(-1).sum(0) / (b - 1)
    signal = mean.pow(2).sum(-1) - noise / b
    return {"norm": grads.norm(dim=-1).mean(0), "noise": noise, "signal": signal, "snr": signal / noise}


def score_scale(scheduler, timesteps: list[int], eta: float) -> list[float]:
    """Per step, ``|d mean / d out| / std`` of the project's DDIM step (:func:`ddim_step_with_logprob`, so any
    prediction type and final alpha): how strongly a change of the model output moves the step's log-probability
    (its score ``(x_{t-1} - mean) / std^2 * d mean`` has that size per unit of output). Read off the step itself:
    with ``x_t = 0`` and output 0 the mean is 0, so ``log p(0) = -log std - log sqrt(2 pi)`` gives ``std``, and
    ``d log p(1) / d out = (d mean / d out) / std^2``. ``scheduler`` must be set to ``len(timesteps)`` steps."""
    from rewardtune.diffusion.logprob import ddim_step_with_logprob

    zero = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    out = []
    for t in timesteps:
        _, at_mean = ddim_step_with_logprob(scheduler, zero, t, zero, eta, prev_sample=zero)
        std = math.exp(-at_mean.item() - 0.5 * math.log(2 * math.pi))
        output = zero.clone().requires_grad_(True)
        _, at_one = ddim_step_with_logprob(scheduler, output, t, zero, eta, prev_sample=torch.ones_like(zero))
        (slope,) = torch.autograd.grad(at_one.sum(), output)
        out.append(abs(slope.item()) * std)
    return out


def step_gradients(model, scheduler, rollouts, weights: torch.Tensor, params: list[torch.Tensor], guidance: float,
                   eta: float) -> torch.Tensor:
    """``[T,P]``: per step ``t``, the gradient of ``mean_i weights_i * log p(x_{t-1}^i | x_t^i)`` w.r.t.
    ``params`` (flattened and concatenated)."""
    from rewardtune.diffusion.rescore import trajectory_log_probs

    every = torch.arange(rollouts.num_samples)
    rows = []
    for t in range(rollouts.num_steps):
        log_probs = trajectory_log_probs(model, scheduler, rollouts, every, torch.tensor([t]), guidance, eta)[:, 0]
        grads = torch.autograd.grad((weights * log_probs).mean(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def measure(config: Path, overrides: list[str], batches: int) -> tuple[torch.Tensor, dict]:
    """``[batches,T,P]`` per-step gradients of independent epochs at the preset's initial policy, and run facts."""
    from rewardtune.diffusion.loading import load_pipeline
    from rewardtune.finetune.rollout import collect_rollouts
    from rewardtune.finetune.run import validate_run
    from rewardtune.finetune.trainer import _add_trainable, draw_epoch, epoch_generator, seed_everything
    from rewardtune.presets import load_preset
    from rewardtune.rewards import load_reward

    cfg = load_preset(config, ROOT / "configs", overrides)
    plan = validate_run(cfg)
    seed_everything(cfg.train.seed)
    pipe = load_pipeline(cfg.model)
    for part in (pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    _add_trainable(pipe, cfg)
    unet = pipe.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    reward = load_reward(cfg.train.reward).eval()
    sampling = cfg.train.sampling
    grads, rewards_sd, start = [], [], time.time()
    for b in range(batches):
        prompts, seeds = draw_epoch(plan.prompts, cfg.train, epoch_generator(cfg.train.seed, 10_000 + b))
        rollouts = collect_rollouts(pipe, prompts, cfg.train.images_per_prompt, sampling, reward, seeds)
        weights = group_centred(rollouts.rewards.float().cpu(), rollouts.group.cpu())
        rewards_sd.append(float(weights.std()))
        grads.append(step_gradients(unet, pipe.scheduler, rollouts, weights, params, sampling.guidance, sampling.eta))
    info = {"cfg": cfg, "params": sum(p.numel() for p in params), "seconds": time.time() - start,
            "centred_sd": sum(rewards_sd) / len(rewards_sd), "timesteps": rollouts.timesteps.tolist(),
            "scale": score_scale(pipe.scheduler, rollouts.timesteps.tolist(), sampling.eta)}
    return torch.stack(grads), info


def report(grads: torch.Tensor, info: dict, windows: list[tuple[int, int]]) -> str:
    cfg, batches = info["cfg"], grads.shape[0]
    stats = snr(grads)
    noise_share = stats["noise"] / stats["noise"].sum()
    lines = ["| steps | timestep | score scale ‖dμ/dε̂‖/σ | mean norm of one epoch's g | noise E‖g−m‖² | "
             "signal ‖E g‖² | SNR | share of summed noise |", "|---|---|---|---|---|---|---|---|"]
    for t, ts in enumerate(info["timesteps"]):
        lines.append(f"| {t} | {ts} | {info['scale'][t]:.2f} | {stats['norm'][t]:.3g} | {stats['noise'][t]:.3g} | "
                     f"{stats['signal'][t]:.3g} | {stats['snr'][t]:+.3f} | {noise_share[t]:.1%} |")
    # the update's gradient when a pass trains steps a..b-1: cross-step terms included
    sums = {(a, b): snr(grads[:, a:b].sum(1, keepdim=True)) for a, b in windows}
    for (a, b), summed in sums.items():
        lines.append(f"| sum of steps {a}..{b - 1} | – | – | {summed['norm'][0]:.3g} | {summed['noise'][0]:.3g} | "
                     f"{summed['signal'][0]:.3g} | {summed['snr'][0]:+.3f} | – |")
    loudest = int(noise_share.argmax())
    reading = (f"**Reading.** Step {loudest} (t = {info['timesteps'][loudest]}) carries {noise_share[loudest]:.0%} of "
               f"the summed per-step noise (score scale {info['scale'][loudest]:.1f}, against "
               f"{min(info['scale']):.1f}-{sorted(info['scale'])[-2]:.1f} elsewhere) with a signal of "
               f"{stats['snr'][loudest]:+.3f} of its noise; the update's SNR is "
               + ", ".join(f"{v['snr'][0]:+.3f} over steps {a}..{b - 1}" for (a, b), v in sums.items()) + ".")
    return header(command_line()) + (
        f"{cfg.model}, LoRA rank {cfg.lora_rank} at its initial value ({info['params']} trainable weights); reward "
        f"`{cfg.train.reward}`; {batches} independent epochs of {cfg.train.prompts_per_epoch} prompts x "
        f"{cfg.train.images_per_prompt} samples ({cfg.train.sampling.steps} DDIM steps, eta {cfg.train.sampling.eta},"
        f" guidance {cfg.train.sampling.guidance}); group-centred rewards with sd {info['centred_sd']:.3g}; "
        f"{info['seconds']:.0f} s. Per step (sampling order), the gradient of the group-centred policy-gradient "
        "loss restricted to that step, then summed over windows of steps (what a pass that trains those steps "
        "follows); the signal is unbiased and can come out negative below the noise floor.\n\n"
        + "\n".join(lines) + "\n\n" + reading + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "prdp" / "shapes_small.yaml",
                        help="a finetuning preset (default: configs/prdp/shapes_small.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    parser.add_argument("--batches", type=int, default=8, help="independent epochs of rollouts (>= 2)")
    parser.add_argument("--windows", nargs="+", default=["0:10", "0:8"], help="a:b sums of steps a..b-1 to report")
    parser.add_argument("--section", default="gradient-snr", help="BENCHMARKS.md section")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    if args.batches < 2:
        parser.error("--batches must be at least 2 (the noise is a variance over batches)")
    windows = [tuple(int(x) for x in w.split(":")) for w in args.windows]
    grads, info = measure(args.config, args.overrides, args.batches)
    text = report(grads, info, windows)
    print(text)
    if not args.no_write:
        update_section(args.section, text)


if __name__ == "__main__":
    main()
