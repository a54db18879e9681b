"""Positive and negative controls of reward finetuning in the shapes world (issue 12), before any comparison of
methods; writes a table into BENCHMARKS.md (section ``controls``) and a grid figure into docs/figures.

    python scripts/controls.py [--settings preset ...] [--controls oracle proxy taste noclip] [--seeds 0 1 2]

Each row is one *setting* of the trainer (the preset, or the preset with the overrides a diagnosis step tried) run
with one *control* reward:

* ``oracle``: the gold reward itself as the training reward, at the proxy's scale (``shapes_gold:40``: gold
  differences within a prompt group are ~0.05-0.1, the proxy's ~2-4). If this does not raise gold on the training
  prompts and hold it on held-out prompts, no comparison of methods means anything.
* ``proxy``: the learned reward the presets train on (``shapes_preference``).
* ``taste``: the hidden taste alone (``shapes_taste:40``): bolder, larger, crisper objects, visible in the grid.
* ``noclip``: the negative control, PRDP without its proximal clip
  (``train.prdp.clip_range=1e9``: no log-ratio is ever clipped; settings must be finite), which collapses.

Runs live in ``--out`` (default ``outputs/controls``) as SETTING-CONTROL/seedS; they resume and are reused
(scripts/runs.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runs import ORACLE, ROOT, Arm, add_run_arguments, figures_dir, final_scores, finished, run_all, shown, table

PRESET = "configs/prdp/shapes_small.yaml"
CONTROLS = {
    "oracle": [ORACLE],
    "proxy": [],
    "taste": ["train.reward=shapes_taste:40"],
    "noclip": ["train.prdp.clip_range=1e9"],
    # visible-effect control: JPEG size at the proxy's scale (within-prompt std of base samples 0.053 kB x 25 ~ 1.3,
    # the proxy's 1.24); DDPO's incompressibility reward turns images textured, which anyone can see
    "incompressibility": ["train.reward=jpeg_incompressibility:25"],
}
# Trainer settings tried while diagnosing, in the order they were tried (each justified by a control's row).
SETTINGS = {
    # the shapes_small preset before issue 12: full finetuning at lr 5e-5
    "full-lr5e-5": ["lora_rank=null", "train.optim.lr=5e-5"],
    "full-lr5e-5-g1": ["lora_rank=null", "train.optim.lr=5e-5", "train.groups_per_update=1"],  # 6 steps per pass
    # LoRA rank 8 on the attention projections (the preset since issue 12)
    "lora8-lr5e-4": ["lora_rank=8", "train.optim.lr=5e-4"],
    "lora8-lr2e-3": ["lora_rank=8", "train.optim.lr=2e-3"],
    "lora8-lr2e-3-g1": ["lora_rank=8", "train.optim.lr=2e-3", "train.groups_per_update=1"],
    "lora8-lr5e-3": ["lora_rank=8", "train.optim.lr=5e-3"],  # can the trainer move the images visibly at all?
    # the preset's lr with 6 optimizer steps per pass instead of 1 (same samples): does the policy move further?
    "lora8-lr5e-4-g1": ["lora_rank=8", "train.optim.lr=5e-4", "train.groups_per_update=1"],
    # train on the 8 evaluation prompts only: ~4.5 samples per prompt and epoch instead of 1
    "lora8-lr5e-4-eval8": ["lora_rank=8", "train.optim.lr=5e-4", "prompts_file=null", "prompts=EVAL"],
    # the samples of a prompt share x_T: reward differences only from the steps the loss credits (noise-share)
    "lora8-lr5e-4-same": ["lora_rank=8", "train.optim.lr=5e-4", "train.sampling.same_latent=true"],
    # steps 8 and 9 (t = 101 -> 1 -> 0) deterministic and untrained: step 8 carries ~90 % of the gradient's noise and
    # no measurable signal (gradient-snr); their eta-1 noise is 0.04 and 0.02, so the samples hardly change
    "lora8-lr5e-4-sde08": ["lora_rank=8", "train.optim.lr=5e-4", "train.sampling.sde_window=[0,8]"],
    # the same for full finetuning, whose update SNR is ~4x LoRA's (gradient-snr-full)
    "full-lr5e-5-sde08": ["lora_rank=null", "train.optim.lr=5e-5", "train.sampling.sde_window=[0,8]"],
    # ... which collapses at lr 5e-5: Adam's steps no longer go mostly to step 8's noise; a 5x smaller step
    "full-lr1e-5-sde08": ["lora_rank=null", "train.optim.lr=1e-5", "train.sampling.sde_window=[0,8]"],
    # claim 4's drift at beta 10 (reproduce-prdp-10x): beta scales PRDP's targets dr/beta, and Adam undoes a gradient's
    # scale except through eps; eps 1e-3 shrinks the steps of coordinates whose gradients are below ~1e-3
    "lora8-lr5e-4-beta10": ["lora_rank=8", "train.optim.lr=5e-4", "train.prdp.beta=10"],
    "lora8-lr5e-4-beta10-eps1e-3": ["lora_rank=8", "train.optim.lr=5e-4", "train.prdp.beta=10",
                                    "train.optim.eps=1e-3"],
    # ... which also cuts the per-epoch KL ~20x from epoch 1: is it just a smaller step? lr / 10 at the default eps
    "lora8-lr5e-5-beta10": ["lora_rank=8", "train.optim.lr=5e-5", "train.prdp.beta=10"],
}
COLUMNS = [("d_eval_gold", "Δ gold (eval prompts)"), ("d_heldout_gold", "Δ gold (held-out)"),
           ("min_gold", "worst Δ gold"), ("d_eval_reward", "Δ training reward (eval)"), ("kl", "summed KL", ".3g")]


def arms(settings: list[str], controls: list[str], preset: str) -> list[Arm]:
    """One arm per setting x control; ``prompts=EVAL`` becomes the preset's evaluation prompts."""
    from rewardtune.presets import load_preset

    evals = "prompts=[" + ", ".join(load_preset(ROOT / preset, ROOT / "configs").eval_prompts) + "]"
    return [Arm(f"{s}-{c}", preset, [evals if o == "prompts=EVAL" else o for o in [*SETTINGS[s], *CONTROLS[c]]])
            for s in settings for c in controls]


def grid_figure(names: list[str], out: Path, seed: int, path: Path, epoch: int | None = None) -> Path:
    """Before (epoch 0) and after grids of each run (after its last epoch, or after ``epoch``), one row per run, into
    ``path``."""
    from PIL import Image, ImageDraw

    from rewardtune.finetune.report import side_by_side

    def row(folder: Path) -> Image.Image:
        if epoch is None:
            return Image.open(folder / "before_after.png").convert("RGB")
        grids = [folder / "grids" / f"epoch_{e:04d}.png" for e in (0, epoch)]
        return side_by_side(grids, ["before (epoch 0)", f"after (epoch {epoch})"])

    rows = [row(out / n / f"seed{seed}") for n in names]
    rows = [r.resize((r.width // 3, r.height // 3), Image.LANCZOS) for r in rows]  # a readable, small figure
    width, label = max(r.width for r in rows), 16
    canvas = Image.new("RGB", (width, sum(r.height + label for r in rows)), "white")
    y = 0
    for name, row in zip(names, rows):
        ImageDraw.Draw(canvas).text((4, y + 2), name, fill="black")
        canvas.paste(row, (0, y + label))
        y += row.height + label
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--controls", nargs="+", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--preset", default=PRESET)
    add_run_arguments(parser, "controls", [0], 2)
    parser.add_argument("--section", default="controls")
    parser.add_argument("--note", default="", help="a paragraph put above the table")
    parser.add_argument("--existing", action="store_true", help="only the runs that have finished; start none")
    parser.add_argument("--at-epoch", type=int, default=None,
                        help="tabulate every run as it stood after this many (evaluated) epochs, e.g. a 20-epoch "
                             "budget read from longer runs linked into --out")
    args = parser.parse_args()
    plan = arms(args.settings, args.controls, args.preset)
    if args.existing:  # tabulate what has run, start nothing
        plan = finished(plan, args.seeds, args.out)
    runs = run_all(plan, args.seeds, args.out, args.epochs, args.workers, args.threads)
    results = {name: [final_scores(folder, args.at_epoch) for folder in folders] for name, folders in runs.items()}
    names = [a.name for a in plan]
    figure = grid_figure(names, args.out, args.seeds[0], figures_dir(args) / f"{args.section}.png", args.at_epoch)
    from rewardtune.utils.benchmarks import command_line, header, update_section

    text = "\n".join([
        header(command_line().replace(args.note, "TEXT") if args.note else command_line()), args.note, "",
        f"Preset `{args.preset}`; seeds {args.seeds}; Δ = after "
        + (f"epoch {args.at_epoch}" if args.at_epoch else "the last epoch") + " minus before finetuning on the fixed "
        "evaluation (the preset's 8 evaluation prompts x 4 seeds, and 16 held-out prompts spread over "
        "shapes_heldout, one image each); mean ± std over seeds. Settings: "
        + "; ".join(f"`{s}` = {' '.join(SETTINGS[s]) or 'the preset'}" for s in args.settings)
        + ". Controls: " + "; ".join(f"`{c}` = {' '.join(CONTROLS[c]) or 'the preset reward'}" for c in args.controls)
        + ".", "", table(names, results, COLUMNS), "",
        f"![{args.section}]({shown(figure)}) Before (left) and after (right) grids of seed "
        f"{args.seeds[0]}, one row per run, in the table's order."])
    print(text)
    if not args.no_write:
        update_section(args.section, text)


if __name__ == "__main__":
    main()
