"""Evidence 1 of issue 14: when, in the denoising, does shapes-tiny decide an image's colour, shape, size, position
and background? And does OmegaPRM's binary search find the decisive step that an exhaustive Monte Carlo sweep finds,
at what cost in reward queries?

Per seed: B fully specified training-combination prompts, one trajectory each (DDIM eta=1, T steps, guidance 5);
the prover is the same model and sampler (the policy's own value). At every branch index j = 0..T-1, K continuations
are decoded and read by the gold oracle (all five attributes at once): the exhaustive sweep, T*K queries per
trajectory. Two outcomes per attribute:

* ``final``: the oracle reads the value the trajectory's own final image shows (always won; when is the attribute
  that the image ends with decided?);
* ``prompt``: the oracle reads the prompted value (won or lost).

A branch index is decided when all K continuations end with the trajectory's outcome; the decisive index j* is the
first from which it stays decided (the decisive step is step j* - 1; j* = 0: the initial noise decided). The binary
search (:func:`rewardtune.process.decisive.bisect_decided`) asks the same seeded Monte Carlo estimates, so
disagreement comes from non-monotone decidedness, not from Monte Carlo noise; a live run of
:func:`rewardtune.process.decisive.decisive_steps` on the first seed (colour, prompt) checks the batched path gives
the same answers and counts its queries.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/process_decisive_steps.py
    ... --analyse-only            # re-plot and re-tabulate from outputs/process_decisive_steps/seed*.pt
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from rewardtune.diffusion.loading import load_pipeline
from rewardtune.diffusion.service import generate
from rewardtune.diffusion.settings import SamplerSettings
from rewardtune.process.decisive import decisive_from_sweep, decisive_steps
from rewardtune.process.shapes import ATTRIBUTES, oracle_outcome, read_attribute_codes
from rewardtune.process.values import Prover, trajectory_values
from rewardtune.utils.benchmarks import command_line, header, update_section

logger = logging.getLogger("process_decisive_steps")
ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "process_decisive_steps.png"
TARGETS = ("final", "prompt")


SPLITS = {"train": "training-combination", "heldout": "held-out-combination"}


def fully_specified_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """``n`` captions naming all five attributes of scenes of the ``train`` or ``heldout`` attribute combinations."""
    from rewardtune.shapes.captions import caption
    from rewardtune.shapes.world import sample_scenes

    rng = np.random.default_rng(10_000 + seed)
    return [caption(scene, rng, mention_prob=1.0) for scene in sample_scenes(n, seed=10_000 + seed, split=split)]


def record_path(out: Path, split: str, seed: int) -> Path:
    return out / (f"seed{seed}.pt" if split == "train" else f"{split}_seed{seed}.pt")


def run_seed(pipe, settings: SamplerSettings, n: int, k: int, seed: int, live: bool, split: str = "train") -> dict:
    """Trajectories, the exhaustive sweep's readings ``[B,T+1,K,5]`` and (``live``) the batched search's result."""
    prompts = fully_specified_prompts(n, seed, split)
    start = time.perf_counter()
    trajectory = generate(pipe, prompts, [1000 * seed + i for i in range(n)], settings, keep_trajectories=True,
                          decode=False).trajectory
    prover = Prover(pipe, settings)
    sweep = trajectory_values(prover, trajectory.latents, prompts, read_attribute_codes, k, seed)
    record = {"prompts": prompts, "readings": sweep.scores.long(), "sweep_queries": sweep.queries,
              "sweep_seconds": time.perf_counter() - start, "k": k, "steps": settings.steps, "seed": seed,
              "split": split}
    if live:
        start = time.perf_counter()
        found = decisive_steps(prover, trajectory.latents, prompts, oracle_outcome("color", "prompt"), k, seed)
        record["live"] = {"index": found.index, "points": found.branch_points, "queries": found.queries,
                          "seconds": time.perf_counter() - start}
    logger.info("seed %d: %d trajectories, sweep %.0f s", seed, n, record["sweep_seconds"])
    return record


def analyse(record: dict, attribute: str, target: str) -> dict:
    """Exhaustive j*, the search's j* on the same estimates and its branch points, outcomes, value curve."""
    found = decisive_from_sweep(record["readings"], record["prompts"], oracle_outcome(attribute, target))
    return {"sweep": found.sweep, "search": found.search, "points": found.branch_points, "won": found.outcome,
            "value": found.value}


def summarise(records: list[dict]) -> tuple[str, dict]:
    """The markdown table (mean over seeds, +- the spread of the seed means) and the pooled histograms."""
    steps, k = records[0]["steps"], records[0]["k"]
    rows, pooled = [], {}
    for target in TARGETS:
        for attribute in ATTRIBUTES:
            per_seed = [analyse(r, attribute, target) for r in records]
            pooled[target, attribute] = per_seed
            rows.append(_table_row(target, attribute, per_seed, steps, k))
    head = ("| outcome | attribute | won | decisive index j*: mean, median [IQR] | decided by the noise (j* = 0) | "
            "search = sweep | mean abs(search - sweep) | queries: search / sweep per trajectory |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows), pooled


def _mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    mean = float(np.mean(values))
    return fmt.format(mean) + (f" ± {fmt.format(float(np.std(values)))}" if len(values) > 1 else "")


def _table_row(target: str, attribute: str, per_seed: list[dict], steps: int, k: int) -> str:
    sweep = torch.cat([a["sweep"] for a in per_seed]).float()
    q1, med, q3 = (float(torch.quantile(sweep, q)) for q in (0.25, 0.5, 0.75))
    won = _mean_sd([float(a["won"].mean()) for a in per_seed])
    noise = _mean_sd([float((a["sweep"] == 0).float().mean()) for a in per_seed])
    agree = _mean_sd([float((a["search"] == a["sweep"]).float().mean()) for a in per_seed])
    gap = _mean_sd([float((a["search"] - a["sweep"]).abs().float().mean()) for a in per_seed])
    search_cost = float(np.mean([float(1 + k * a["points"].float().mean()) for a in per_seed]))
    return (f"| {target} | {attribute} | {won} | {float(sweep.mean()):.2f}, {med:.0f} [{q1:.0f}, {q3:.0f}] | "
            f"{noise} | {agree} | {gap} | "
            f"{search_cost:.1f} / {1 + k * steps} |")


def plot(pooled: dict, steps: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ATTRIBUTES), figsize=(3.2 * len(ATTRIBUTES), 5.6), sharey="row")
    bins = np.arange(steps + 2) - 0.5
    for col, attribute in enumerate(ATTRIBUTES):
        sweep = torch.cat([a["sweep"] for a in pooled["final", attribute]]).numpy()
        search = torch.cat([a["search"] for a in pooled["final", attribute]]).numpy()
        ax = axes[0, col]
        ax.hist([sweep, search], bins=bins, label=["exhaustive MC", "binary search"])
        ax.set_title(attribute)
        ax.set_xlabel("decisive index j* (0 = the noise)")
        value = torch.cat([a["value"] for a in pooled["prompt", attribute]])  # [N,T+1]
        won = torch.cat([a["won"] for a in pooled["prompt", attribute]]).bool()
        for mask, name in ((won, "won"), (~won, "lost")):
            if mask.any():
                curve = value[mask]
                se = curve.std(0, correction=0) / max(int(mask.sum()), 1) ** 0.5
                axes[1, col].plot(range(steps + 1), curve.mean(0), label=f"{name} ({int(mask.sum())})")
                axes[1, col].fill_between(range(steps + 1), curve.mean(0) - se, curve.mean(0) + se, alpha=0.25)
        axes[1, col].set_xlabel("branch index j (steps taken)")
    axes[0, 0].set_ylabel("trajectories")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].set_ylabel("V(x_j): P(oracle reads the prompted value)")
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("shapes-tiny: when is each attribute decided? (top: the final image's value; bottom: the prompted)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def live_check(records: list[dict], k: int) -> str:
    live = [r for r in records if "live" in r]
    if not live:
        return ""
    r = live[0]
    expected = analyse(r, "color", "prompt")
    same = bool(torch.equal(r["live"]["index"], expected["search"]))
    per = r["live"]["queries"] / len(r["prompts"])
    return (f"Live check (seed {r['seed']}, colour, prompted outcome): the batched `decisive_steps` found "
            f"{'the same' if same else 'DIFFERENT'} j* as the search on the sweep's estimates, with "
            f"{r['live']['queries']} reward queries ({per:.1f} per trajectory) in {r['live']['seconds']:.0f} s; "
            f"the sweep took {r['sweep_seconds']:.0f} s for {r['sweep_queries']} queries.\n")


def describe(records: list[dict], figure: Path) -> str:
    """The markdown of one split: setting, table, column notes, the live check, the figure."""
    table, pooled = summarise(records)
    plot(pooled, records[0]["steps"], figure)
    r0 = records[0]
    seconds = sum(r["sweep_seconds"] for r in records)
    split = r0.get("split", "train")
    return (f"### {SPLITS[split]} prompts\n\n"
            f"shapes-tiny, {r0['steps']} DDIM steps (eta 1, guidance 5), {len(r0['prompts'])} trajectories x "
            f"{len(records)} seeds ({', '.join(str(r['seed']) for r in records)}) of fully specified {SPLITS[split]} "
            f"prompts; prover = the same model and sampler; K = {r0['k']} continuations per branch point, each read "
            f"by the gold oracle; sweep wall time {seconds:.0f} s in all (shared, contended CPU). Run: "
            f"`OMP_NUM_THREADS=1 python scripts/process_decisive_steps.py --split {split} --seeds "
            f"{' '.join(str(r['seed']) for r in records)} --trajectories {len(r0['prompts'])} --steps {r0['steps']} "
            f"--k {r0['k']}`.\n\n"
            + table + "\n\n" + live_check(records, r0["k"])
            + f"\n![decisive steps, {split}](docs/figures/{figure.name})\n")


NOTES = ("Columns: *won* is the fraction of trajectories whose final image meets the outcome (mean ± sd over seeds); "
         "*j\\** is the first branch index from which every one of the K continuations ends with the trajectory's "
         "outcome (the decisive step is step j\\* − 1; j\\* = 0: the initial noise decided it; pooled over seeds); "
         "*search = sweep* is the fraction where the binary search (OmegaPRM; asking the same seeded Monte Carlo "
         "estimates) returns the sweep's j\\* (they differ only where decidedness is not monotone in j); queries "
         "count decoded images scored (1 for the final image + K per branch point; the sweep's are shared by the "
         "five attributes, since one oracle read gives all five). Outcome *final*: the oracle reads the value the "
         "trajectory's own final image shows; *prompt*: it reads the prompted value (won or lost). Caveat: decided "
         "means no counterexample among K continuations; at K = 8 a branch point whose true value is 0.95 passes "
         "66 % of the time, so j\\* leans early (raise --k for stricter calls).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trajectories", type=int, default=16, help="per seed")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--k", type=int, default=8, help="continuations per branch point")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "process_decisive_steps"))
    parser.add_argument("--split", choices=tuple(SPLITS), default="train", help="the prompts' attribute combinations")
    parser.add_argument("--analyse-only", action="store_true", help="reuse the saved seed*.pt")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        pipe = load_pipeline("shapes-tiny")
        settings = SamplerSettings(steps=args.steps, guidance=args.guidance, eta=args.eta, batch_size=args.batch_size)
        for i, seed in enumerate(args.seeds):
            record = run_seed(pipe, settings, args.trajectories, args.k, seed, live=i == 0, split=args.split)
            torch.save(record, record_path(out, args.split, seed))
    parts = []
    for split in SPLITS:  # every split whose records exist for these seeds
        paths = [record_path(out, split, s) for s in args.seeds if record_path(out, split, s).exists()]
        if paths:
            records = [torch.load(p, weights_only=False) for p in paths]
            figure = FIGURE if split == "train" else FIGURE.with_name(f"process_decisive_steps_{split}.png")
            parts.append(describe(records, figure))
    text = header(command_line()) + "\n".join(parts) + "\n" + NOTES
    print(text)
    if not args.no_write:
        update_section("process-decisive-steps", "## When is it decided? Decisive denoising steps in the shapes "
                       "world (issue 14, evidence 1)\n\n" + text)


if __name__ == "__main__":
    main()
