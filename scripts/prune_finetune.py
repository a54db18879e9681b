"""Pruning meets reward finetuning on the shapes world (issue 15): (a) PRDP on a pruned and distilled UNet, (b)
pruning a PRDP-finetuned UNet with distillation from the finetuned teacher; writes BENCHMARKS.md (prune-finetune).

    python scripts/prune_finetune.py [--finetuned outputs/demo] [--structured build/prune/shapes_structured]
                                     [--work build/prune_finetune] [--repeats 3] [--arms ...] [--seeds 0 1 2]
                                     [--no-build] [--no-write]

Arms (folders under ``--work`` made by the CLI; a finished one is reused, so a rerun only evaluates):

* ``base``: shapes-tiny.
* ``finetuned``: ``rewardtune finetune configs/prdp/shapes_small.yaml`` (PRDP, LoRA, 20 epochs; ``--finetuned`` may
  name a finished run of that preset, e.g. ``make demo``'s outputs/demo).
* ``structured`` / ``blocks``: ``rewardtune prune configs/prune/shapes_{structured,blocks}.yaml`` (structured 0.5
  with 5000 x 32 distillation, about 45 min; the mid block removed with 400 x 32), teacher the base UNet
  (``--structured`` may name a finished run of its preset).
* ``structured -> PRDP`` (a): the finetune preset with ``model=`` the structured pipeline.
* ``finetuned -> structured`` / ``finetuned -> blocks`` (b): the same prune presets with ``lora=`` the finetuned run's
  LoRA, so the finetuned UNet is pruned and is the distillation teacher.

Every model is scored by the finetune trainer's own evaluation (:func:`rewardtune.finetune.report.evaluate`: the
preset's 8 evaluation prompts x 4 seeds and its 16 held-out prompts, 10 DDIM steps, eta 1, guidance 5; proxy =
shapes_preference, gold = shapes_gold), LoRA weights fused. Speed: 20-step sampling of 16 images, interleaved rounds
(seed 0's models). Seed s runs every CLI step with seed s (``train.seed=s`` for finetuning: its prompt and noise
draws; ``seed=s`` for pruning: its data and distillation order) in ``--work/seed<s>`` (seed 0 in ``--work``
itself; ``--finetuned``/``--structured`` stand in for seed 0); numbers are mean ± std over the seeds an arm has.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from bench_prune import interleaved_medians, sampler
from runs import mean_std, paired_difference

from rewardtune.diffusion import encode_prompts, load_pipeline
from rewardtune.finetune.report import EvalSet, Scorers, evaluate
from rewardtune.finetune.run import validate_run
from rewardtune.presets import load_preset
from rewardtune.rewards import load_reward
from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "configs" / "prdp" / "shapes_small.yaml"
PRUNE = {"structured": ROOT / "configs" / "prune" / "shapes_structured.yaml",
         "blocks": ROOT / "configs" / "prune" / "shapes_blocks.yaml"}
ARMS = ["base", "finetuned", "structured", "structured -> PRDP", "finetuned -> structured", "blocks",
        "finetuned -> blocks"]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rewardtune", *args], check=True)


def folder(work: Path, arm: str) -> Path:
    return work / arm.replace(" -> ", "_to_").replace(" ", "_")


def finished(arm: str, folders: dict[str, Path]) -> bool:
    """Whether ``arm``'s model exists (the base model always does)."""
    out = folders[arm]
    return arm == "base" or (out / ("final" if arm in ("finetuned", "structured -> PRDP") else "report.json")).exists()


def build(arm: str, folders: dict[str, Path], seed: int = 0) -> tuple[str, Path | None]:
    """Make ``arm``'s model for ``seed`` unless its folder (``folders[arm]``) is finished; returns ``(pipeline, LoRA
    folder or None)``."""
    out = folders[arm]
    if arm == "base":
        return "shapes-tiny", None
    if arm == "finetuned":
        if not (out / "final").is_dir():
            cli("finetune", str(FINETUNE), f"output_dir={out}", "resume=auto", f"train.seed={seed}")
        return "shapes-tiny", out / "final"
    if arm == "structured -> PRDP":
        pruned, _ = build("structured", folders, seed)
        if not (out / "final").is_dir():
            cli("finetune", str(FINETUNE), f"model={pruned}", f"output_dir={out}", "resume=auto",
                f"train.seed={seed}")
        return pruned, out / "final"
    if not (out / "report.json").is_file():
        lora = []
        if arm.startswith("finetuned"):
            lora = [f"lora={build('finetuned', folders, seed)[1]}"]
        cli("prune", str(PRUNE[arm.split(" -> ")[-1]]), *lora, f"out={out}", "evaluate.num_prompts=0", f"seed={seed}")
    return str(out / "pipeline"), None


def score(pipe, arm: str, work: Path, cfg, heldout: list[str], scorers: Scorers) -> dict:
    """The trainer's evaluation of ``pipe`` (cached in ``work/eval/<arm>/result.json``)."""
    out = folder(work / "eval", arm)
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    shutil.rmtree(out, ignore_errors=True)
    with torch.no_grad():
        record = evaluate(pipe, scorers, EvalSet(cfg.eval_prompts, cfg.eval_seeds), heldout, cfg.train.sampling,
                          out, epoch=0)
    cached.write_text(json.dumps(record))
    return record


CONTRASTS = [  # (what the difference measures, arm a, arm b): a - b paired by seed
    ("PRDP's gain on the unpruned model", "finetuned", "base"),
    ("(a) PRDP's gain on the pruned model", "structured -> PRDP", "structured"),
    ("(b) what the finetuned teacher adds to structured pruning", "finetuned -> structured", "structured"),
    ("(b) what structured pruning costs the finetuned model", "finetuned -> structured", "finetuned"),
    ("(b) what the finetuned teacher adds to block removal", "finetuned -> blocks", "blocks"),
    ("(b) what block removal costs the finetuned model", "finetuned -> blocks", "finetuned"),
]


def contrasts(results: dict[str, dict[int, dict]]) -> str:
    """Paired differences ``a - b`` over the seeds both arms have (``base`` is one evaluation, the same for every
    seed): mean ± std and a two-sided paired t-test (:func:`runs.paired_difference`)."""
    rows = []
    for label, a, b in CONTRASTS:
        if not results.get(a) or not results.get(b):
            continue
        other = dict.fromkeys(results[a], next(iter(results[b].values()))) if b == "base" else results[b]
        seeds = [s for s in sorted(results[a]) if s in other]
        if not seeds:
            continue
        cells = [paired_difference([results[a][s][key] for s in seeds], [other[s][key] for s in seeds])
                 for key, _ in METRICS]
        rows.append(f"| {label} | {a} - {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    return ("\nDifferences paired by seed (mean ± std over seeds, p: two-sided paired t-test; one seed: the "
            "difference):\n\n| difference | arms | seeds | proxy (eval prompts) | gold (eval prompts) | proxy "
            "(held-out) | gold (held-out) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n") if rows else ""


METRICS = (("eval_reward", ".3f"), ("eval_gold", ".4f"), ("heldout_reward", ".3f"), ("heldout_gold", ".4f"))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "prune_finetune")
    parser.add_argument("--finetuned", type=Path, default=None, help="a finished run of the finetune preset")
    parser.add_argument("--structured", type=Path, default=None, help="a finished run of shapes_structured.yaml")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every trained arm")
    parser.add_argument("--no-build", action="store_true", help="score only the arms and seeds already trained")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cfg = load_preset(FINETUNE, ROOT / "configs")
    heldout = validate_run(cfg).heldout
    scorers = Scorers(load_reward(cfg.train.reward).eval(), load_reward(cfg.gold_reward).eval())
    base = load_pipeline("shapes-tiny")
    base.states, base.empty = encode_prompts(base, ["a red circle on a white background"]), encode_prompts(base, [""])
    unets, results = {}, {arm: {} for arm in args.arms}  # arm -> seed -> scores
    for seed in args.seeds:
        work = args.work / f"seed{seed}" if seed else args.work
        folders = {arm: folder(work, arm) for arm in ARMS}
        if seed == 0:
            folders.update({k: v for k, v in (("finetuned", args.finetuned), ("structured", args.structured)) if v})
        for arm in args.arms:
            if arm == "base" and results[arm]:
                continue  # nothing trained: one evaluation
            if args.no_build and not finished(arm, folders):
                continue  # --no-build: this seed of the arm is not trained; the table counts the seeds it has
            model, lora = build(arm, folders, seed)
            pipe = load_pipeline(model, lora=lora, fuse_lora=True)
            results[arm][seed] = score(pipe, arm, work, cfg, heldout, scorers)
            unets.setdefault(arm, pipe.unet)
            print(arm, seed, results[arm][seed], flush=True)
    speed = interleaved_medians({arm: sampler(base, unet, 16) for arm, unet in unets.items()}, args.repeats)
    reference = speed.get("base", next(iter(speed.values())))
    rows = [f"| {arm} | {reference / speed[arm]:.2f}x | {len(r)} | " + " | ".join(
            mean_std([x[key] for x in r.values()], fmt) for key, fmt in METRICS) + " |" for arm, r in results.items()
            if r]
    text = ("## Pruning meets reward finetuning\n\n" + header(command_line()) + __doc__.split("\n\n", 2)[2].strip()
            + "\n\n| model | sampling speed-up | seeds | proxy (eval prompts) | gold (eval prompts) | "
            "proxy (held-out) | gold (held-out) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
            + contrasts(results))
    print(text)
    if not args.no_write:
        update_section("prune-finetune", text)


if __name__ == "__main__":
    main()
