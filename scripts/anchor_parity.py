"""Side-by-side checks of rewardtune against the DDPO reference implementation (kvablack/ddpo-pytorch), in one process
on the shipped ``shapes-tiny`` pipeline; writes the ``anchor-parity`` section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/anchor_parity.py [--anchor ../shared/anchors/ddpo-pytorch] [--rounds 3]

The anchor is imported at run time from ``--anchor`` (default ``../shared/anchors/ddpo-pytorch`` relative to the
repository root); nothing of it is part of rewardtune, and rewardtune's tests do not use it.

(a) log-prob parity: along trajectories sampled with rewardtune's step, the same latents, UNet outputs (classifier-
    free guidance 5), batched DDIM timesteps (10 and 50 steps) and eta 1 go to rewardtune's
    ``ddim_step_with_logprob`` and the anchor's ``diffusers_patch/ddim_with_logprob.py``: once sampling (each side
    with its own per-sample generators, seeded identically) and once re-scoring a given ``prev_sample``.
(b) epoch sampling time: the anchor's ``pipeline_with_logprob`` vs ``rewardtune.diffusion.generate`` on the same
    prompts and seeds (6 prompts x 6, 10 steps, eta 1, guidance 5, one batch of 36, VAE decode included),
    interleaved rounds; the outputs of the last round are compared too. Also the step function alone.
(c) the real LAION aesthetic head (``assets/sac+logos+ava1-l14-linearMSE.pth`` of the anchor) loaded by rewardtune's
    ``load_aesthetic_head`` and by the anchor's ``aesthetic_scorer.MLP`` (``torch.load(weights_only=True)``),
    scored on the same random unit 768-d embeddings.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = ROOT.parent / "shared" / "anchors" / "ddpo-pytorch"
HEAD_PATH = Path("ddpo_pytorch") / "assets" / "sac+logos+ava1-l14-linearMSE.pth"
GUIDANCE, ETA = 5.0, 1.0


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def import_anchor(folder: Path) -> SimpleNamespace:
    """The anchor's step, sampler and aesthetic MLP, imported from ``folder``; exits with one line when absent.

    The anchor (2023) imports ``randn_tensor`` from ``diffusers.utils``, where diffusers no longer exports it (it lives
    in ``diffusers.utils.torch_utils``). When that import fails, the error is recorded and the same function is
    aliased under the old name, so the anchor's code runs unmodified."""
    marker = folder / "ddpo_pytorch" / "diffusers_patch" / "ddim_with_logprob.py"
    if not marker.is_file():
        raise SystemExit(f"anchor_parity: no DDPO anchor at {folder} (expected {marker}); pass --anchor PATH")
    sys.path.insert(0, str(folder))
    import_error = None
    try:
        ddim = importlib.import_module("ddpo_pytorch.diffusers_patch.ddim_with_logprob")
    except ImportError as exc:
        if "randn_tensor" not in str(exc):
            raise SystemExit(f"anchor_parity: cannot import the anchor from {folder}: {_first_line(exc)}") from None
        import diffusers
        import diffusers.utils
        from diffusers.utils.torch_utils import randn_tensor

        import_error = f"{_first_line(exc)} (diffusers {diffusers.__version__})"
        diffusers.utils.randn_tensor = randn_tensor
        ddim = importlib.import_module("ddpo_pytorch.diffusers_patch.ddim_with_logprob")
    pipeline = importlib.import_module("ddpo_pytorch.diffusers_patch.pipeline_with_logprob")
    scorer = importlib.import_module("ddpo_pytorch.aesthetic_scorer")
    return SimpleNamespace(step=ddim.ddim_step_with_logprob, pipeline=pipeline.pipeline_with_logprob, MLP=scorer.MLP,
                           folder=folder, import_error=import_error)


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def logprob_parity(pipe, anchor, prompts: list[str], steps: int, seeds: list[int]) -> dict[str, float]:
    """Worst absolute differences, over all samples and steps, between rewardtune's and the anchor's DDIM step."""
    from diffusers.utils.torch_utils import randn_tensor

    from rewardtune.diffusion import ddim_step_with_logprob, encode_prompts, generators_for
    from rewardtune.diffusion.sampling import latent_shape, predict_noise

    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    batch = len(prompts)
    embeds = encode_prompts(pipe, prompts)
    negative = encode_prompts(pipe, [""]).expand(len(embeds))
    gen_rt, gen_anchor = generators_for(seeds), generators_for(seeds)
    shape = latent_shape(pipe, batch)
    x = randn_tensor(shape, generator=gen_rt, dtype=torch.float32) * scheduler.init_noise_sigma
    x_anchor = randn_tensor(shape, generator=gen_anchor, dtype=torch.float32) * scheduler.init_noise_sigma
    out = {"x_T": _max(x, x_anchor), "sample_prev": 0.0, "sample_logprob": 0.0, "score_logprob": 0.0,
           "score_vs_sampled": 0.0, "logprob_scale": 0.0}
    for t in scheduler.timesteps:
        t_batch = t.expand(batch)
        eps = predict_noise(pipe.unet, scheduler.scale_model_input(x, t), t_batch, embeds, negative, GUIDANCE)
        prev_rt, lp_rt = ddim_step_with_logprob(scheduler, eps, t_batch, x, eta=ETA, generator=gen_rt)
        prev_anchor, lp_anchor = anchor.step(scheduler, eps, t_batch, x, eta=ETA, generator=gen_anchor)
        _, score_rt = ddim_step_with_logprob(scheduler, eps, t_batch, x, eta=ETA, prev_sample=prev_rt)
        _, score_anchor = anchor.step(scheduler, eps, t_batch, x, eta=ETA, prev_sample=prev_rt)
        for key, value in (("sample_prev", _max(prev_rt, prev_anchor)), ("sample_logprob", _max(lp_rt, lp_anchor)),
                           ("score_logprob", _max(score_rt, score_anchor)),
                           ("score_vs_sampled", _max(score_rt, lp_rt)),
                           ("logprob_scale", float(lp_rt.abs().max()))):
            out[key] = max(out[key], value)
        x = prev_rt
    return out


@torch.no_grad()
def last_step_alpha_one(anchor, steps: int = 10, batch: int = 4) -> tuple[float, float]:
    """Last-step log-probs (rewardtune, anchor) of a scheduler with ``set_alpha_to_one=True`` (not shapes-tiny's):
    there the anchor clamps ``prev_t`` to 0 before choosing ``final_alpha_cumprod``, so it never uses it."""
    from diffusers import DDIMScheduler

    from rewardtune.diffusion import ddim_step_with_logprob

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x, eps, prev = (torch.randn(batch, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[-1].expand(batch)
    _, lp_rt = ddim_step_with_logprob(scheduler, eps, t, x, eta=ETA, prev_sample=prev)
    _, lp_anchor = anchor.step(scheduler, eps, t, x, eta=ETA, prev_sample=prev)
    return float(lp_rt[0]), float(lp_anchor[0])


def sampler_timing(pipe, anchor, prompts: list[str], per_prompt: int, rounds: int) -> dict:
    """Interleaved rounds of the anchor's ``pipeline_with_logprob`` and rewardtune's ``generate`` (one warm-up each,
    alternating which goes first); median seconds and the last round's output differences."""
    from rewardtune.diffusion import SamplerSettings, generate, generators_for

    seeds = list(range(len(prompts) * per_prompt))

    def run_anchor():
        return anchor.pipeline(pipe, prompt=list(prompts), num_inference_steps=10, guidance_scale=GUIDANCE, eta=ETA,
                               num_images_per_prompt=per_prompt, generator=generators_for(seeds), output_type="pt")

    def run_rewardtune():
        return generate(pipe, list(prompts), seeds, SamplerSettings(steps=10, guidance=GUIDANCE, eta=ETA,
                                                                     batch_size=len(seeds)),
                        per_prompt=per_prompt, keep_trajectories=True)

    calls = {"anchor": run_anchor, "rewardtune": run_rewardtune}
    times: dict[str, list[float]] = {name: [] for name in calls}
    results = {name: call() for name, call in calls.items()}  # warm-up
    for r in range(rounds):
        for name in (("anchor", "rewardtune") if r % 2 == 0 else ("rewardtune", "anchor")):
            start = time.perf_counter()
            results[name] = calls[name]()
            times[name].append(time.perf_counter() - start)
    images, _, latents, log_probs = results["anchor"]
    ours = results["rewardtune"]
    return {"times": times, "median": {k: statistics.median(v) for k, v in times.items()},
            "latents": _max(torch.stack(latents, 1), ours.trajectory.latents),
            "log_probs": _max(torch.stack(log_probs, 1), ours.trajectory.log_probs),
            "images": _max(images.float().cpu(), ours.images), "samples": len(seeds),
            "logprob_scale": float(ours.trajectory.log_probs.abs().max())}


def step_timing(pipe, anchor, batch: int = 36, calls: int = 100, repeats: int = 5) -> dict[str, float]:
    """Median microseconds per call of each step function, re-scoring the same tensors (10-step schedule)."""
    from rewardtune.diffusion import ddim_step_with_logprob
    from rewardtune.diffusion.sampling import latent_shape
    from rewardtune.utils.benchmarks import median_seconds

    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    shape = latent_shape(pipe, batch)
    x, eps, prev = (torch.randn(shape, generator=g) for _ in range(3))
    t = scheduler.timesteps[3].expand(batch)
    functions = {"anchor": anchor.step, "rewardtune": ddim_step_with_logprob}
    out = {}
    with torch.no_grad():
        for name, step in functions.items():
            def loop(step=step):
                for _ in range(calls):
                    step(scheduler, eps, t, x, eta=ETA, prev_sample=prev)
            out[name] = median_seconds(loop, repeats) / calls * 1e6
    return out


@torch.no_grad()
def aesthetic_parity(anchor, count: int = 64, seed: int = 0) -> dict[str, float]:
    """Scores of the real LAION head through rewardtune's loader and the anchor's MLP on the same unit embeddings."""
    from rewardtune.rewards.aesthetic import load_aesthetic_head

    path = anchor.folder / HEAD_PATH
    if not path.is_file():
        raise SystemExit(f"anchor_parity: no aesthetic head at {path}")
    ours = load_aesthetic_head(path, 768)
    theirs = anchor.MLP()
    theirs.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    theirs.eval()  # as AestheticScorer.__init__ does (self.eval()); a bare MLP() is in train mode, dropout on
    emb = torch.randn(count, 768, generator=torch.Generator().manual_seed(seed))
    emb = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
    s_ours, s_theirs = ours(emb).squeeze(-1), theirs(emb).squeeze(1)
    return {"diff": _max(s_ours, s_theirs), "min": float(s_ours.min()), "max": float(s_ours.max()), "count": count}


def _g(value: float) -> str:
    return "0 (exact)" if value == 0 else f"{value:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor", type=Path, default=DEFAULT_ANCHOR,
                        help="the ddpo-pytorch excerpt folder (default: ../shared/anchors/ddpo-pytorch from the repo)")
    parser.add_argument("--prompts", default="shapes_small", help="prompt set; every 6th prompt is used (6 prompts)")
    parser.add_argument("--per-prompt", type=int, default=2, help="trajectories per prompt for the log-prob check")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of each sampler (>= 3)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    anchor = import_anchor(args.anchor.resolve())
    warnings.filterwarnings("ignore", message=".*_encode_prompt.*")  # the anchor's sampler calls a deprecated API

    from rewardtune.diffusion import load_pipeline
    from rewardtune.prompts import read_prompts
    from rewardtune.utils.benchmarks import command_line, header, update_section

    pipe = load_pipeline("shapes-tiny")
    prompts = read_prompts(args.prompts)[::6][:6]
    batch_prompts = [p for p in prompts for _ in range(args.per_prompt)]
    seeds = list(range(100, 100 + len(batch_prompts)))
    parity = {steps: logprob_parity(pipe, anchor, batch_prompts, steps, seeds) for steps in (10, 50)}
    alpha_one = last_step_alpha_one(anchor)
    timing = sampler_timing(pipe, anchor, prompts, per_prompt=6, rounds=max(3, args.rounds))
    step_us = step_timing(pipe, anchor)
    aesthetic = aesthetic_parity(anchor)

    n = len(batch_prompts)
    rows = []
    for steps, p in parity.items():
        where = f"{n} trajectories x {steps} DDIM steps"
        rows += [
            f"| log-prob, re-scoring (same `prev_sample`) | {where} | {_g(p['score_logprob'])} | "
            f"{p['logprob_scale']:.3g} |",
            f"| log-prob, sampling (identical per-sample generators) | {where} | {_g(p['sample_logprob'])} | "
            f"{p['logprob_scale']:.3g} |",
            f"| prev sample, sampling (identical generators) | {where} | {_g(p['sample_prev'])} | |",
            f"| rewardtune: re-scored vs sampled log-prob | {where} | {_g(p['score_vs_sampled'])} | |",
        ]
    s = timing["samples"]
    rows += [
        f"| full sampler, latents (all steps) | `pipeline_with_logprob` vs `generate`, {s} samples x 10 steps | "
        f"{_g(timing['latents'])} | |",
        f"| full sampler, log-probs | same | {_g(timing['log_probs'])} | {timing['logprob_scale']:.3g} |",
        f"| full sampler, decoded images | same | {_g(timing['images'])} | 1 |",
        f"| aesthetic head scores | {aesthetic['count']} random unit 768-d embeddings | {_g(aesthetic['diff'])} | "
        f"scores {aesthetic['min']:.3f} .. {aesthetic['max']:.3f} |",
    ]
    med = timing["median"]
    rounds = {k: ", ".join(f"{v:.2f}" for v in vs) for k, vs in timing["times"].items()}
    import_note = (f"The anchor does not import as it is on this diffusers: `{anchor.import_error}`; it was run "
                   "with `diffusers.utils.randn_tensor` aliased to `diffusers.utils.torch_utils.randn_tensor` (the "
                   "same function, moved), its code unmodified." if anchor.import_error else
                   "The anchor imported as it is.")
    text = header(command_line()) + (
        "rewardtune vs the DDPO reference implementation (kvablack/ddpo-pytorch @1958463, the excerpt in "
        "`../shared/anchors/ddpo-pytorch`), in one process on shapes-tiny (float32, CPU). Prompts: every 6th of "
        f"`{args.prompts}` ({len(prompts)} prompts); guidance {GUIDANCE:g}, eta {ETA:g}. " + import_note + "\n\n"
        "| check | setting | max abs diff | scale |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Scale: the largest |log-prob| (per-element mean over C,h,w, as both sides normalise) or the score range.\n\n"
        f"Epoch sampling time, {s} samples ({len(prompts)} prompts x 6, one batch), 10 steps, VAE decode included, "
        f"interleaved rounds after one warm-up each:\n\n"
        "| sampler | median s | rounds (s) |\n|---|---|---|\n"
        f"| anchor `pipeline_with_logprob` | {med['anchor']:.2f} | {rounds['anchor']} |\n"
        f"| rewardtune `generate(..., keep_trajectories=True)` | {med['rewardtune']:.2f} | "
        f"{rounds['rewardtune']} |\n\n"
        f"Ratio anchor / rewardtune: **{med['anchor'] / med['rewardtune']:.2f}x**. The step function alone (batch 36, "
        f"re-scoring): anchor {step_us['anchor']:.0f} us, rewardtune {step_us['rewardtune']:.0f} us per call. Both "
        f"samplers run the same UNet work (one classifier-free-guidance pass of {2 * s} rows per step) and the same "
        "VAE decode, so the epoch times should differ by little more than the round-to-round spread.\n\n"
        "Notes:\n\n"
        "- Loss: not compared. The anchor's PPO-clip loss is written inline in `main()` of `scripts/train.py` (the "
        "`ratio = torch.exp(log_prob - sample[\"log_probs\"][:, j])` ... `torch.maximum(unclipped_loss, "
        "clipped_loss)` lines), not an importable function, so only its inputs, the per-step log-probs, are "
        "compared here; `rewardtune.finetune.losses.ddpo_loss` is not checked against it.\n"
        "- Last DDIM step: both sides agree because shapes-tiny (like Stable Diffusion) has `set_alpha_to_one: "
        "false`, so `final_alpha_cumprod = alphas_cumprod[0]`. With `set_alpha_to_one=True` the anchor clamps "
        "`prev_t` to 0 before its `prev_t >= 0` test and still uses `alphas_cumprod[0]`, while rewardtune uses "
        f"`final_alpha_cumprod = 1` (sigma = 0): last-step log-prob rewardtune {alpha_one[0]:.4g}, anchor "
        f"{alpha_one[1]:.4g} on the same random tensors.\n"
        "- Aesthetic head: the anchor's `MLP` is put in eval mode as its `AestheticScorer` does (a bare `MLP()` "
        "is in train mode, with dropout).\n")
    print(text)
    if not args.no_write:
        print(f"wrote {update_section('anchor-parity', text)}")


if __name__ == "__main__":
    main()
