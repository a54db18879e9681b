"""``rewardtune steps``: step-level (process) rewards of a model's denoising trajectories.

For each prompt, ``--num-images`` trajectories are sampled (by ``--finetuned`` when given, else by ``--model``) with
every step's latents and predicted clean latents kept. Then, under the prover ``--model`` (its own sampler, or
``--prover-guidance``):

* ``V(x_j)`` at every branch index ``j = 0..T`` by Monte Carlo: ``--k`` continuations from the stored latent,
  decoded and scored by ``--reward``, with standard errors (PAV progress = ``V(x_{j+1}) - V(x_j)``);
* the ``x0`` step reward (``--reward`` of each step's decoded clean-latent prediction);
* the decisive step per attribute (``--attributes``, read by the shapes world's gold oracle from the same
  continuations: no extra queries): the first branch index from which every continuation ends with the
  trajectory's outcome, by the exhaustive sweep and by OmegaPRM's binary search on the same estimates;
* with ``--finetuned``, PRIME's implicit step rewards ``beta * log pi_finetuned / pi_base`` per step: which steps did
  finetuning change?

Writes ``values.csv`` (per trajectory and branch index), ``steps.csv`` (per trajectory and step), ``decisive.csv``,
the plots ``values.png``, ``decisive.png``, ``implicit.png`` and ``summary.json`` (settings, reward queries) to
``--out``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rewardtune.commands.common import finite_float, positive_int
from rewardtune.errors import UserError

logger = logging.getLogger(__name__)

ALL_ATTRIBUTES = ("color", "shape", "size", "position", "background")  # rewardtune.process.shapes.ATTRIBUTES
OUTPUTS = {"values.csv", "steps.csv", "decisive.csv", "values.png", "decisive.png", "implicit.png", "summary.json"}

DESCRIPTION = ("Step-level rewards of denoising trajectories: Monte Carlo step values V(x_t) with standard errors "
               "under a prover (PAV progress), x0 step rewards, the decisive step of each attribute (OmegaPRM "
               "binary search vs the exhaustive sweep), and with --finetuned the implicit step rewards "
               "beta*log pi_finetuned/pi_base (PRIME). Writes CSVs and PNGs.")

EPILOG = """\
examples:
  rewardtune steps --prompt "a red circle in the top left corner on a black background" --num-images 8 --out steps/
  rewardtune steps --prompts prompts.txt --steps 20 --k 16 --reward shapes_preference --attributes color,shape
  rewardtune steps --prompt "a blue square" --finetuned outputs/prdp/final --out steps_prdp/

outputs (in --out): values.csv (image, prompt, seed, branch j, value, value_se), steps.csv (image, step t,
x0_reward, progress, progress_se[, implicit]), decisive.csv (image, attribute, won, decisive_index j*,
decisive_step = j*-1, search_index, search_branch_points), values.png, decisive.png, implicit.png, summary.json.
Branch index j is the latent after j of the T steps (0 = the noise, T = the final image).

cost: about num_images x prompts x K x T(T+1)/2 denoising steps for the values; reward queries (decoded images
scored) are num_images x prompts x (K x T + 1) for the values plus T each for the x0 step rewards.
The decisive steps read the gold oracle of the shapes world (--attributes none outside it)."""


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--model", default="shapes-tiny", help="the base model and prover: a registered name, "
                        "local pipeline folder or hub id (default shapes-tiny)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", dest="prompts", metavar="PROMPT", help="a prompt (repeatable)")
    src.add_argument("--prompts", metavar="FILE", dest="prompts_file", help="prompt file (.txt, .csv or .jsonl)")
    parser.add_argument("--num-images", type=positive_int, default=4, help="trajectories per prompt (default 4)")
    parser.add_argument("--steps", type=positive_int, default=10, help="denoising steps T (default 10)")
    parser.add_argument("--guidance", type=finite_float, default=5.0, help="guidance scale (default 5)")
    parser.add_argument("--eta", type=finite_float, default=1.0, help="sampler noise in (0, 1]: the continuations "
                        "must be random for values to carry information (default 1)")
    parser.add_argument("--prover-guidance", type=finite_float, default=None,
                        help="the prover's guidance scale (default: --guidance)")
    parser.add_argument("--k", type=positive_int, default=8, help="continuations per branch point (default 8)")
    parser.add_argument("--reward", default="shapes_gold", help="reward of V(x_t) and the x0 step rewards: a name "
                        "or weighted sum (see `rewardtune models`; default shapes_gold)")
    parser.add_argument("--attributes", default=",".join(ALL_ATTRIBUTES),
                        help="comma-separated attributes whose decisive steps the gold oracle reads, or none "
                        "(default: all five)")
    parser.add_argument("--outcome", choices=("final", "prompt"), default="final",
                        help="decided = every continuation shows the final image's value (final) or keeps the "
                        "trajectory's win/loss against the prompted value (prompt); default final")
    parser.add_argument("--finetuned", metavar="MODEL", default=None, help="a finetuned pipeline or LoRA folder "
                        "of --model: its trajectories are analysed and its implicit step rewards written")
    parser.add_argument("--beta", type=finite_float, default=1.0, help="implicit reward scale (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="trajectory i uses seed+i (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="rows per denoising call (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("--out", default="outputs/steps", help="output folder, new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")


def parse_attributes(text: str) -> list[str]:
    """``"color,shape"`` -> ``["color", "shape"]``; ``"none"`` -> ``[]``; an unknown name is one line."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if names == ["none"]:
        return []
    unknown = [a for a in names if a not in ALL_ATTRIBUTES]
    if unknown or not names:
        raise UserError(f"--attributes: unknown attribute {(unknown or [text])[0]!r}; choose from "
                        f"{', '.join(ALL_ATTRIBUTES)} (comma-separated) or none")
    return names


def check_args(args) -> tuple[list[str], list[str]]:
    """Everything checkable before a model loads: ``(prompts, attributes)``."""
    from rewardtune.commands.sample import check_out_dir
    from rewardtune.rewards import check_reward_spec

    if not 0 < args.eta <= 1:
        raise UserError(f"--eta must be in (0, 1] (random continuations), got {args.eta:g}")
    if args.prover_guidance is not None and args.prover_guidance < 0:
        raise UserError(f"--prover-guidance must be >= 0, got {args.prover_guidance:g}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    attributes = parse_attributes(args.attributes)
    check_reward_spec(args.reward)
    prompts = _prompts(args)
    check_out_dir(args.out, args.overwrite)
    return prompts, attributes


def _prompts(args) -> list[str]:
    from rewardtune.prompts import read_prompts

    prompts = read_prompts(args.prompts_file) if args.prompts_file else [p.strip() for p in args.prompts]
    if not prompts or not all(prompts):
        raise UserError("no prompt given: pass --prompt TEXT (non-empty) or --prompts FILE")
    return prompts


def run(args) -> int:
    prompts, attributes = check_args(args)
    out = run_steps(args, prompts, attributes)
    print(f"wrote values, steps, decisive-step and implicit-reward tables and plots to {out}")
    return 0


def _load_models(args):
    """``(base, policy)`` pipelines: ``policy`` is ``--finetuned`` (a pipeline, or a LoRA folder on the base)."""
    from rewardtune.diffusion.loading import LORA_WEIGHTS, load_pipeline

    base = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    if args.finetuned is None:
        return base, base
    path = Path(args.finetuned).expanduser()
    lora = (path.is_file() and path.suffix == ".safetensors") or (path / LORA_WEIGHTS).is_file()
    policy = load_pipeline(args.model if lora else args.finetuned, dtype=args.dtype, device=args.device,
                           lora=args.finetuned if lora else None)
    return base, policy


def _score_fn(reward, attributes: list[str]):
    """Images -> ``[M, 1 + 5]``: the reward, then the oracle's attribute codes (``[M,1]`` without attributes)."""
    import torch

    from rewardtune.process.shapes import read_attribute_codes

    def score(images, prompts):
        value = reward(images.to(reward.device), prompts).detach().float().cpu()[:, None]
        if not attributes:
            return value
        return torch.cat([value, read_attribute_codes(images).float()], 1)

    return score


def run_steps(args, prompts: list[str], attributes: list[str]) -> Path:
    """Sample, measure and write (see the module docstring); returns the output folder."""
    import dataclasses

    from rewardtune.diffusion.service import generate
    from rewardtune.diffusion.settings import SamplerSettings
    from rewardtune.process.values import Prover, trajectory_values
    from rewardtune.rewards import load_reward

    reward = load_reward(args.reward, device=args.device)
    base, policy = _load_models(args)
    settings = SamplerSettings(steps=args.steps, guidance=args.guidance, eta=args.eta, batch_size=args.batch_size)
    n = len(prompts) * args.num_images
    sample_prompts = [p for p in prompts for _ in range(args.num_images)]
    trajectory = generate(policy, prompts, [args.seed + i for i in range(n)], settings, per_prompt=args.num_images,
                          keep_trajectories=True, keep_x0=True, decode=False).trajectory
    prover_settings = settings if args.prover_guidance is None else dataclasses.replace(
        settings, guidance=args.prover_guidance)
    values = trajectory_values(Prover(base, prover_settings), trajectory.latents, sample_prompts,
                               _score_fn(reward, attributes), args.k, args.seed)
    tables = _tables(args, base, policy, reward, trajectory, values, sample_prompts, attributes, settings)
    return _write(args, tables, values.queries)


def _tables(args, base, policy, reward, trajectory, values, prompts, attributes, settings) -> dict:
    """The rows of values.csv, steps.csv and decisive.csv and the arrays the plots need."""
    from rewardtune.process.step_rewards import implicit_step_rewards, progress_step_rewards, x0_step_rewards
    from rewardtune.process.values import StepValues

    reward_values = StepValues(values.scores[..., 0], values.mean[..., 0], values.se[..., 0], values.queries)
    progress, progress_se = progress_step_rewards(reward_values)
    x0, x0_queries = x0_step_rewards(policy, trajectory.x0_predictions, prompts, lambda im, p: reward(
        im.to(reward.device), p).detach().float().cpu(), args.batch_size)
    implicit = None
    if args.finetuned is not None:
        implicit = implicit_step_rewards(policy, base, trajectory, prompts, settings, args.beta)
    n, points = reward_values.mean.shape
    ids = [dict(image=i, prompt=prompts[i], seed=args.seed + i) for i in range(n)]
    value_rows = [{**ids[i], "branch": j, "value": float(reward_values.mean[i, j]),
                   "value_se": float(reward_values.se[i, j])} for i in range(n) for j in range(points)]
    step_rows = [{**ids[i], "step": t, "x0_reward": float(x0[i, t]), "progress": float(progress[i, t]),
                  "progress_se": float(progress_se[i, t]),
                  **({} if implicit is None else {"implicit": float(implicit[i, t])})}
                 for i in range(n) for t in range(points - 1)]
    decisive_rows, decisive = _decisive(args, values, prompts, attributes, ids)
    return {"values": value_rows, "steps": step_rows, "decisive": decisive_rows, "decisive_index": decisive,
            "value": reward_values.mean.numpy(), "value_se": reward_values.se.numpy(), "x0": x0.numpy(),
            "implicit": None if implicit is None else implicit.numpy(), "x0_queries": x0_queries}


def _decisive(args, values, prompts, attributes, ids) -> tuple[list[dict], dict]:
    from rewardtune.process.decisive import decisive_from_sweep
    from rewardtune.process.shapes import oracle_outcome

    rows, found = [], {}
    codes = values.scores[..., 1:].long()  # [N,T+1,K,5]
    for attribute in attributes:
        result = decisive_from_sweep(codes, prompts, oracle_outcome(attribute, args.outcome))
        found[attribute] = result.sweep.numpy()
        rows += [{**ids[i], "attribute": attribute, "outcome": args.outcome, "won": int(result.outcome[i]),
                  "decisive_index": int(result.sweep[i]), "decisive_step": int(result.sweep[i]) - 1,
                  "search_index": int(result.search[i]), "search_branch_points": int(result.branch_points[i])}
                 for i in range(len(ids))]
    return rows, found


def _write(args, tables: dict, value_queries: int) -> Path:
    from rewardtune.outputs import StagedFolder
    from rewardtune.process.plots import plot_decisive, plot_implicit, plot_values
    from rewardtune.utils.io import atomic_write_json, write_csv

    folder = StagedFolder(args.out, args.overwrite, OUTPUTS, "summary.json", "steps",
                          hint="choose a new --out or pass --overwrite")
    with folder as stage:
        write_csv(stage / "values.csv", tables["values"])
        write_csv(stage / "steps.csv", tables["steps"])
        plot_values(tables["value"], tables["value_se"], tables["x0"], stage / "values.png",
                    f"{args.model}: V(x_j) under {args.reward}, K={args.k}")
        if tables["decisive"]:
            write_csv(stage / "decisive.csv", tables["decisive"])
            plot_decisive(tables["decisive_index"], args.steps, stage / "decisive.png",
                          f"decisive steps ({args.outcome} outcome, oracle)")
        if tables["implicit"] is not None:
            plot_implicit(tables["implicit"], stage / "implicit.png", f"{args.finetuned} vs {args.model}")
        summary = {"model": args.model, "finetuned": args.finetuned, "reward": args.reward, "k": args.k,
                   "steps": args.steps, "guidance": args.guidance, "eta": args.eta,
                   "prover_guidance": args.prover_guidance, "outcome": args.outcome,
                   "reward_queries": {"values": value_queries, "x0": tables["x0_queries"]},
                   "mean_value": tables["value"].mean(0).tolist()}
        atomic_write_json(stage / "summary.json", summary)
        folder.commit()
    return Path(args.out)


__all__ = ["DESCRIPTION", "add_arguments", "parse_attributes", "run", "run_steps"]
