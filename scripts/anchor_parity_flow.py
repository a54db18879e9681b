"""Side-by-side check of rewardtune's flow-matching SDE step against the Flow-GRPO reference implementation
(yifan123/flow_grpo), in one process on CPU; prints a markdown table, and with ``--write`` puts it in the
``anchor-parity-flow`` section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/anchor_parity_flow.py [--anchor ../shared/anchors/flow_grpo] [--rounds 5]
        [--write]

The anchor is imported at run time from ``--anchor`` (default ``../shared/anchors/flow_grpo`` relative to the
repository root); nothing of it is part of rewardtune, and rewardtune's tests do not use it.

On ``FlowMatchEulerDiscreteScheduler``s with shift 1 and 3 and 10 and 40 steps, at noise levels 0.7 and 1.0, every
step of the schedule is taken by a batch whose samples sit at different steps (sample ``i`` at step ``k + i``), with
rectified-flow inputs ``x_t = (1 - sigma) x_0 + sigma eps`` and a perturbed velocity ``eps - x_0``. The same tensors
go to rewardtune's ``flow_sde_step_with_logprob`` and the anchor's ``sde_step_with_logprob``:

(a) re-scoring a given ``prev_sample`` (the one rewardtune sampled): log-prob max abs difference;
(b) sampling with identical per-sample generators: ``prev_sample`` and log-prob max abs differences.

Also the step functions' time (median microseconds per call at batch 32, interleaved rounds), re-scoring and sampling.
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = ROOT.parent / "shared" / "anchors" / "flow_grpo"
STEP_MODULE = "flow_grpo.diffusers_patch.sd3_sde_with_logprob"
SCHEDULES = [(1.0, 10), (3.0, 10), (1.0, 40), (3.0, 40)]  # (shift, steps)
NOISE_LEVELS = (0.7, 1.0)
PARITY_SHAPE, TIMING_SHAPES = (16, 4, 16, 16), [(32, 4, 8, 8), (32, 16, 64, 64)]


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _alias_moved_symbol(exc: ImportError) -> bool:
    """Put a symbol that diffusers moved into ``diffusers.utils.torch_utils`` back under the name the anchor imports
    (``cannot import name 'X' from 'diffusers.utils'``); False when the error is of another kind."""
    found = re.search(r"cannot import name '(\w+)' from '(diffusers[\w.]*)'", str(exc))
    if not found:
        return False
    name, module = found.groups()
    torch_utils = importlib.import_module("diffusers.utils.torch_utils")
    if not hasattr(torch_utils, name):
        return False
    setattr(importlib.import_module(module), name, getattr(torch_utils, name))
    return True


def import_anchor(folder: Path) -> SimpleNamespace:
    """The anchor's SDE step, imported from ``folder``; exits with one line when absent or not importable.

    When the import fails because diffusers moved a symbol the anchor imports (e.g. ``randn_tensor``, now in
    ``diffusers.utils.torch_utils``), the error is recorded and the same object is aliased under the old name, so the
    anchor's code runs unmodified."""
    marker = folder / Path(*STEP_MODULE.split(".")).with_suffix(".py")
    if not marker.is_file():
        raise SystemExit(f"anchor_parity_flow: no Flow-GRPO anchor at {folder} (expected {marker}); "
                         "pass --anchor PATH")
    sys.path.insert(0, str(folder))
    import_error = None
    try:
        module = importlib.import_module(STEP_MODULE)
    except ImportError as exc:
        if not _alias_moved_symbol(exc):
            raise SystemExit(f"anchor_parity_flow: cannot import the anchor from {folder}: "
                             f"{_first_line(exc)}") from None
        import diffusers

        import_error = f"{_first_line(exc)} (diffusers {diffusers.__version__})"
        module = importlib.import_module(STEP_MODULE)
    return SimpleNamespace(step=module.sde_step_with_logprob, folder=folder, import_error=import_error)


def make_scheduler(shift: float, steps: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def flow_inputs(scheduler, index: torch.Tensor, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """``(x_t, velocity)`` of a rectified flow at the steps ``index`` ``[B]``: ``x_t = (1 - sigma) x_0 + sigma eps``,
    velocity ``eps - x_0`` plus 10% noise (a model's error)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps, err = (torch.randn(shape, generator=g) for _ in range(3))
    sigma = scheduler.sigmas[index].reshape((-1,) + (1,) * (len(shape) - 1))
    return (1 - sigma) * x0 + sigma * eps, eps - x0 + 0.1 * err


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def parity(anchor, shift: float, steps: int, noise_level: float) -> dict[str, float]:
    """Worst absolute differences over every step of one schedule (batches of mixed per-sample timesteps)."""
    from rewardtune.diffusion.flow import flow_sde_step_with_logprob
    from rewardtune.diffusion.sampling import generators_for

    scheduler = make_scheduler(shift, steps)
    batch = PARITY_SHAPE[0]
    out = {"score_logprob": 0.0, "sample_prev": 0.0, "sample_logprob": 0.0, "score_vs_sampled": 0.0,
           "logprob_scale": 0.0, "first_last": 0.0}
    for k in range(steps):
        index = (k + torch.arange(batch)) % steps
        t = scheduler.timesteps[index]
        x, v = flow_inputs(scheduler, index, PARITY_SHAPE, seed=1000 * steps + k)
        seeds = [10_000 * k + i for i in range(batch)]
        prev, lp = flow_sde_step_with_logprob(scheduler, v, t, x, noise_level, generator=generators_for(seeds))
        prev_a, lp_a, _, _ = anchor.step(scheduler, v, t, x, noise_level, generator=generators_for(seeds))
        _, score = flow_sde_step_with_logprob(scheduler, v, t, x, noise_level, prev_sample=prev)
        _, score_a, _, _ = anchor.step(scheduler, v, t, x, noise_level, prev_sample=prev)
        edge = (index == 0) | (index == steps - 1)
        for key, value in (("score_logprob", _max(score, score_a)), ("sample_prev", _max(prev, prev_a)),
                           ("sample_logprob", _max(lp, lp_a)), ("score_vs_sampled", _max(score, lp)),
                           ("logprob_scale", float(lp.abs().max())),
                           ("first_last", _max(score[edge], score_a[edge]))):
            out[key] = max(out[key], value)
    return out


def step_timing(anchor, shape: tuple[int, ...], rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Median microseconds per call of each step function (shift 3, 10 steps, mixed per-sample timesteps), re-scoring
    and sampling (one generator per sample); interleaved rounds, alternating which goes first, after a warm-up."""
    from rewardtune.diffusion.flow import flow_sde_step_with_logprob
    from rewardtune.diffusion.sampling import generators_for

    scheduler = make_scheduler(3.0, 10)
    batch = shape[0]
    index = torch.arange(batch) % 10
    t = scheduler.timesteps[index]
    x, v = flow_inputs(scheduler, index, shape, seed=1)
    prev = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    seeds = list(range(batch))
    ours = flow_sde_step_with_logprob
    calls_by_name = {
        ("anchor", "score"): lambda: anchor.step(scheduler, v, t, x, 0.7, prev_sample=prev),
        ("rewardtune", "score"): lambda: ours(scheduler, v, t, x, 0.7, prev_sample=prev),
        ("anchor", "sample"): lambda: anchor.step(scheduler, v, t, x, 0.7, generator=generators_for(seeds)),
        ("rewardtune", "sample"): lambda: ours(scheduler, v, t, x, 0.7, generator=generators_for(seeds)),
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls_by_name}
    with torch.no_grad():
        for call in calls_by_name.values():
            call()  # warm-up
        for r in range(rounds):
            for mode in ("score", "sample"):
                for name in (("anchor", "rewardtune") if r % 2 == 0 else ("rewardtune", "anchor")):
                    call = calls_by_name[(name, mode)]
                    start = time.perf_counter()
                    for _ in range(calls):
                        call()
                    times[(name, mode)].append((time.perf_counter() - start) / calls * 1e6)
    return {mode: {name: statistics.median(times[(name, mode)]) for name in ("anchor", "rewardtune")}
            for mode in ("score", "sample")}


def _g(value: float) -> str:
    return "0 (exact)" if value == 0 else f"{value:.2e}"


def report(anchor, results: dict, timing: dict, rounds: int) -> str:
    from rewardtune.utils.benchmarks import command_line, header

    rows = []
    for (shift, steps, noise), p in results.items():
        rows.append(f"| {shift:g} | {steps} | {noise:g} | {_g(p['score_logprob'])} | {_g(p['first_last'])} | "
                    f"{_g(p['sample_prev'])} | {_g(p['sample_logprob'])} | {_g(p['score_vs_sampled'])} | "
                    f"{p['logprob_scale']:.3g} |")
    time_rows = []
    for shape, by_mode in timing.items():
        for mode, med in by_mode.items():
            time_rows.append(f"| {list(shape)} | {mode} | {med['anchor']:.0f} | {med['rewardtune']:.0f} | "
                             f"{med['anchor'] / med['rewardtune']:.2f}x |")
    import_note = (f"The anchor does not import as it is on this diffusers: `{anchor.import_error}`; it was run with "
                   "the moved symbol aliased under its old name (the same object), its code unmodified."
                   if anchor.import_error else "The anchor imported as it is.")
    b = PARITY_SHAPE[0]
    return header(command_line()) + (
        "rewardtune's `flow_sde_step_with_logprob` vs Flow-GRPO's `sde_step_with_logprob` (yifan123/flow_grpo "
        "@ac4c86e, the excerpt in `../shared/anchors/flow_grpo`), in one process (float32, CPU), on diffusers "
        f"`FlowMatchEulerDiscreteScheduler`s. Every step of each schedule, in batches of {b} latents "
        f"{list(PARITY_SHAPE[1:])} whose samples sit at different steps (sample i at step k + i); rectified-flow "
        "inputs `x_t = (1 - sigma) x_0 + sigma eps`, velocity `eps - x_0` + 10% noise. " + import_note + "\n\n"
        "| shift | steps | noise level | log-prob, re-scoring | same, first & last steps | prev sample, sampling "
        "| log-prob, sampling | rewardtune re-scored vs sampled | scale |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        "Max abs differences. Re-scoring: both score the `prev_sample` rewardtune sampled; sampling: each side "
        "draws with its own per-sample generators, seeded identically. Scale: the largest |log-prob| (per-element "
        "mean over C,h,w, as both sides normalise).\n\n"
        f"Step function time, median us per call over {rounds} interleaved rounds (shift 3, 10 steps, noise level "
        "0.7, per-sample timesteps; sampling draws with one generator per sample):\n\n"
        "| latents | mode | anchor us | rewardtune us | anchor / rewardtune |\n|---|---|---|---|---|\n"
        + "\n".join(time_rows) + "\n\n"
        "The anchor maps timesteps to step indices with one `index_for_timestep` call (a `.item()`) per sample; "
        "rewardtune compares the batch against `scheduler.timesteps` at once, folds the per-sample coefficients "
        "before touching the latents and averages the squared residual before dividing by the variance (hence "
        "float32 differences in the last bits, not 0). rewardtune returns `prev_sample` in the input's dtype and "
        "scores it after that cast; the anchor returns float32 (identical here, float32 inputs).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor", type=Path, default=DEFAULT_ANCHOR,
                        help="the flow_grpo excerpt folder (default: ../shared/anchors/flow_grpo from the repo)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of each step (>= 3)")
    parser.add_argument("--calls", type=int, default=20, help="calls per timing round")
    parser.add_argument("--write", action="store_true", help="write the anchor-parity-flow section of BENCHMARKS.md")
    args = parser.parse_args()
    anchor = import_anchor(args.anchor.resolve())
    rounds = max(3, args.rounds)

    results = {(shift, steps, noise): parity(anchor, shift, steps, noise)
               for shift, steps in SCHEDULES for noise in NOISE_LEVELS}
    timing = {shape: step_timing(anchor, shape, rounds, args.calls) for shape in TIMING_SHAPES}
    text = report(anchor, results, timing, rounds)
    print(text)
    if args.write:
        from rewardtune.utils.benchmarks import update_section

        print(f"wrote {update_section('anchor-parity-flow', text)}")


if __name__ == "__main__":
    main()
