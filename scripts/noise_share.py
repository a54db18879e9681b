"""Which part of a sample's reward can the policy gradient see? The initial noise vs the denoising steps' noise.

    python scripts/noise_share.py [--noises 8] [--continuations 8] [--heldout 16] [--no-write]

DDPO, GRPO and PRDP credit a sample's reward to the log-probabilities of its *denoising steps*
``log p(x_{t-1} | x_t, c)``; the initial latent ``x_T ~ N(0, I)`` has no parameter and gets no credit. For each
prompt this script draws ``M = --noises`` initial latents and ``K = --continuations`` trajectories from each (the
same ``x_T``, fresh step noise: the sampler's ``same_latent``) with the finetuning presets' sampler (10 DDIM steps,
eta 1, guidance 5) and splits the variance of each score ``r[m, k]`` over the ``M*K`` samples (law of total
variance, population variances):

    Var(r) = Var_m(E_k r[m, k])  +  E_m Var_k(r[m, k])
             (decided by x_T)       (decided by the steps)

The second share is the part of the reward differences between samples that the steps' log-probabilities can
explain; the first is, for these estimators, zero-mean noise in the advantage (or, for PRDP, in the regression
target ``(r_i - r_j) / beta``). Also reported: the room of best-of-K *continuations of one x_T* (mean over m of
``max_k - mean_k``) against best-of-M *initial latents* (one continuation each).

Writes the ``noise-share`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from headroom import fmt, preset_sampler

from rewardtune.config import read_yaml
from rewardtune.diffusion import SamplerSettings, generate, load_pipeline
from rewardtune.finetune.run import spread
from rewardtune.prompts import read_prompts
from rewardtune.rewards import load_reward
from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("gold", "fidelity", "taste", "proxy")


def variance_split(r: torch.Tensor) -> dict[str, torch.Tensor]:
    """``r [P,M,K]`` (prompt, initial noise, continuation) -> per prompt ``[P]``: total, between-x_T and
    within-x_T population variances (``total = between + within``), their shares of the total (NaN for a prompt
    whose score never varies) and the best-of rooms."""
    total = r.flatten(1).var(dim=1, unbiased=False)
    between = r.mean(dim=2).var(dim=1, unbiased=False)
    within = r.var(dim=2, unbiased=False).mean(dim=1)
    varies = torch.where(total > 1e-10, total, float("nan"))
    return {"total": total, "between": between, "within": within,
            "between_share": between / varies, "within_share": within / varies,
            "room_steps": (r.amax(dim=2) - r.mean(dim=2)).mean(dim=1),
            "room_noises": (r[:, :, 0].amax(dim=1) - r[:, :, 0].mean(dim=1))}


def sample_scores(pipe, prompts: list[str], settings: SamplerSettings, m: int, k: int, gold, proxy
                  ) -> dict[str, torch.Tensor]:
    """``{score: [P,M,K]}``: group ``(p, j)`` is prompt ``p`` from the initial noise of seed ``j*K``, its ``K``
    continuations from seeds ``j*K .. j*K+K-1`` (the sampler's ``same_latent``)."""
    groups = [p for p in prompts for _ in range(m)]
    seeds = [j * k + c for _ in prompts for j in range(m) for c in range(k)]
    images = generate(pipe, groups, seeds, settings, per_prompt=k).images
    items = [p for p in groups for _ in range(k)]
    gold(images, items)
    scores = {name: gold.components[name].float().cpu() for name in ("gold", "fidelity", "taste")}
    with torch.no_grad():
        scores["proxy"] = proxy(images, items).float().cpu()
    return {name: v.reshape(len(prompts), m, k) for name, v in scores.items()}


def table(name: str, scores: dict[str, torch.Tensor], k: int, m: int) -> str:
    lines = [f"| {name} | total sd | share decided by x_T | share decided by the steps | room: best-of-{k} "
             f"continuations of one x_T | room: best-of-{m} initial latents |", "|---|---|---|---|---|---|"]
    for score in SCORES:
        split = variance_split(scores[score])
        lines.append(f"| {score} | {fmt(split['total'].sqrt())} | {fmt(split['between_share'])} | "
                     f"{fmt(split['within_share'])} | {fmt(split['room_steps'], True)} | "
                     f"{fmt(split['room_noises'], True)} |")
    return "\n".join(lines) + "\n"


def reading(gold: torch.Tensor, k: int) -> str:
    """One sentence on what the evaluation prompts' gold split means for the policy-gradient estimators."""
    split = variance_split(gold)
    steps = float(split["within_share"].nanmean())
    verdict = ("so most reward differences between samples are ones the loss can credit to its actions, and the "
               "initial noise is not what keeps the trainer from the room" if steps >= 0.5 else
               "so most reward differences between samples come from x_T, which no step's log-probability explains: "
               "noise in the advantage (or PRDP's target) that sharing x_T within a group would remove")
    return (f"**Reading.** On the evaluation prompts the denoising steps decide {steps:.0%} of gold's variance, "
            f"{verdict}; best-of-{k} continuations of one x_T already finds "
            f"{float(split['room_steps'].mean()):+.3f} gold.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "prdp" / "shapes_small.yaml")
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--noises", type=int, default=8, help="M initial latents per prompt")
    parser.add_argument("--continuations", type=int, default=8, help="K trajectories from each initial latent")
    parser.add_argument("--heldout", type=int, default=16, help="prompts of shapes_heldout, spread over it")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    if args.noises < 2 or args.continuations < 2:
        parser.error("--noises and --continuations must be at least 2 (a variance needs two values)")

    config = read_yaml(args.config)
    settings = preset_sampler(config, same_latent=True)
    sets = {"evaluation prompts": list(config["eval_prompts"]),
            "held-out prompts": spread(read_prompts("shapes_heldout"), args.heldout)}
    pipe = load_pipeline(args.model)
    gold, proxy = load_reward("shapes_gold"), load_reward("shapes_preference")
    start = time.time()
    results = {name: sample_scores(pipe, prompts, settings, args.noises, args.continuations, gold, proxy)
               for name, prompts in sets.items()}
    seconds = time.time() - start

    m, k = args.noises, args.continuations
    text = header(command_line()) + (
        f"{args.model}, {settings.steps} DDIM steps, eta {settings.eta}, guidance {settings.guidance}; per prompt "
        f"{m} initial latents x {k} continuations (same x_T, fresh step noise); mean ± std over prompts "
        f"({len(sets['evaluation prompts'])} evaluation prompts of {args.config.name}, {len(sets['held-out prompts'])}"
        f" of shapes_heldout spread over it); {seconds:.0f} s in all. Shares: Var_m(E_k r) / Var(r) and "
        "E_m Var_k(r) / Var(r) per prompt (they sum to 1), over the prompts whose score varies; rooms: the "
        "score gained by picking the best sample (mean over x_T of the best of its K continuations minus their "
        "mean; the best of the M initial latents, one continuation each, minus their mean).\n\n"
        + "\n".join(table(f"{name} ({len(sets[name])})", scores, k, m) for name, scores in results.items()))
    text += "\n" + reading(results["evaluation prompts"]["gold"], k) + "\n"
    print(text)
    if not args.no_write:
        update_section("noise-share", text)


if __name__ == "__main__":
    main()
