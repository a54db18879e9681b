"""Pruning benchmarks: size, MACs, speed and shapes-world quality of pruned UNets; writes BENCHMARKS.md (prune).

    python scripts/bench_prune.py [--part all|shapes|sd15|target] [--recovered build/prune] [--repeats 5]
                                  [--num-prompts 64] [--no-write]

* SD 1.5 UNet architecture (random weights, built from its config; no hub): parameters, MACs and UNet forward
  latency at 32x32 latents (batch 1), and 20-step DDIM sampling latency with classifier-free guidance at 16x16
  latents through rewardtune's sampler, each as a ratio to the original measured side by side in this run.
* shapes-tiny: the same for the embedded model (8x8 latents, sampling at batch 16), and quality on held-out prompts
  (gold fidelity and taste, proxy reward, Frechet distance on tiny-CLIP features to the original's samples for the
  same prompts and seeds) before recovery and after recovery. Recovered models are the pipeline folders written by
  ``rewardtune prune configs/prune/<preset>.yaml out=<recovered>/<preset>``; missing ones are listed as not run,
  found ones with the recovery settings of their run (``<recovered>/<preset>/config.yaml``).
* Masks (global magnitude, lottery): sparsity against quality; dense kernels do the same work, so no speed-up.
* target (issue 15): the runs of the ``TARGET_PRESETS`` found under ``--recovered``: sampling speed-up, and gold
  fidelity on ``2 x --num-prompts`` held-out samples with standard errors of the mean and of the paired change.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from rewardtune.diffusion import encode_prompts, generators_for, load_pipeline, sample_trajectories
from rewardtune.diffusion.backbones import Conditioning
from rewardtune.prompts import read_prompts
from rewardtune.prune import prune_unet
from rewardtune.prune.common import count_macs, count_params, example_inputs
from rewardtune.prune.evaluate import ShapesQuality, sample_images
from rewardtune.prune.masks import masks_of, sparsity
from rewardtune.utils.benchmarks import command_line, header, update_section

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "rewardtune" / "assets" / "prompts" / "shapes_heldout.txt"
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SHAPES_VARIANTS = {  # name -> (prune_unet kwargs, preset whose CLI run gives the recovered model)
    "structured 0.5 (magnitude)": (dict(method="structured", ratio=0.5), "shapes_structured"),
    "blocks: no mid block (BK-SDM-Small)": (dict(method="blocks", mid_block=False), "shapes_blocks"),
}
MASK_RATIOS = (0.3, 0.5, 0.7, 0.9)


def sampler(pipe, unet, batch: int, size: int | None = None, steps: int = 20):
    """A call that samples ``batch`` latents with ``unet`` in 20 DDIM steps (guidance 5, eta 0): ``pipe.unet`` is
    swapped for the call (``pipe.states``/``pipe.empty`` hold the prompt and empty-prompt states)."""
    embeds, negative = pipe.states[:1].expand(batch), pipe.empty.expand(batch)
    hw = None if size is None else size * pipe.vae_scale_factor

    def call():
        original = pipe.unet
        object.__setattr__(pipe, "unet", unet)  # a plain swap: no pipeline config update for a timing call
        try:
            return sample_trajectories(pipe, embeds, negative, generators_for(range(batch)), steps=steps,
                                       guidance=5.0, eta=0.0, height=hw, width=hw)
        finally:
            object.__setattr__(pipe, "unet", original)
    return call


class BarePipeline(StableDiffusionPipeline):
    """A UNet and a scheduler typed as a Stable Diffusion pipeline (timing random-weight architectures: no VAE or
    text encoder); ``states``/``empty`` are the conditioning the sampler reuses."""

    def __init__(self, unet, scheduler, states: Conditioning, empty: Conditioning, vae_scale_factor: int = 8):
        for key, value in dict(unet=unet, scheduler=scheduler, states=states, empty=empty,
                               vae_scale_factor=vae_scale_factor).items():
            object.__setattr__(self, key, value)


def interleaved_medians(calls: dict[str, callable], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call, timing the calls in turn each round, so load drift on a shared machine hits
    every model alike (a ratio of two medians then compares like with like)."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_rows(pipe, variants: dict, inputs, batch: int, repeats: int, size: int | None = None,
               sample_repeats: int = 3, sample_warmup: int = 1) -> list[str]:
    """Table rows: params, MACs, forward and sampling latency, speed-ups relative to the first (original) row."""
    fwd = interleaved_medians({n: (lambda u=u: u(**inputs)) for n, u in variants.items()}, repeats)
    smp = interleaved_medians({n: sampler(pipe, u, batch, size) for n, u in variants.items()}, sample_repeats,
                              sample_warmup)
    rows, ref = [], next(iter(variants))
    for name, unet in variants.items():
        params, macs = count_params(unet), count_macs(unet, inputs)
        masks = masks_of(unet)
        sparse = f"{sparsity(masks):.2f}" if masks else "–"
        rows.append(f"| {name} | {params / 1e6:.2f}M | {macs / 1e9:.3f}G | {sparse} | {fwd[name] * 1e3:.1f} ms | "
                    f"{fwd[ref] / fwd[name]:.2f}x | {smp[name]:.2f} s | {smp[ref] / smp[name]:.2f}x |")
        print(rows[-1], flush=True)
    return rows


SPEED_HEAD = ("| model | params | MACs | sparsity | UNet forward | speed-up | 20-step sampling | speed-up |\n"
              "|---|---|---|---|---|---|---|---|\n")


def bench_sd15(repeats: int) -> str:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from rewardtune.shapes.tiny_models import scheduler_config

    torch.manual_seed(0)
    original = UNet2DConditionModel(**SD15_UNET).eval()
    trace = example_inputs(original, batch=1, tokens=77, size=16)
    variants = {"original": original,
                "structured 0.4": prune_unet(original, ratio=0.4, example_inputs=trace),
                "blocks BK-SDM-Base (layers_per_block 1)": prune_unet(original, method="blocks", mid_block=True),
                "blocks BK-SDM-Small (+ no mid block)": prune_unet(original, method="blocks")}
    g = torch.Generator().manual_seed(0)
    states, empty = (Conditioning(torch.randn(1, 77, 768, generator=g)) for _ in range(2))
    pipe = BarePipeline(original, DDIMScheduler(**scheduler_config()), states, empty)
    inputs = example_inputs(original, batch=1, tokens=77, size=32)
    rows = speed_rows(pipe, variants, inputs, batch=1, repeats=repeats, size=16, sample_repeats=1,
                      sample_warmup=0)
    del variants, original
    gc.collect()
    return ("SD 1.5 UNet architecture (random weights).\n\nMACs and UNet forward at 32x32 latents (256 px), batch "
            "1, 77 tokens (interleaved rounds, median of --repeats); 20-step sampling at 16x16 latents, batch 1 with "
            "guidance (UNet batch 2), one interleaved timed round. Random weights: speed only, no quality.\n\n"
            + SPEED_HEAD + "\n".join(rows) + "\n")


def shapes_quality(pipe, unet, scorer, items, seeds, reference) -> dict[str, float]:
    return scorer(sample_images(pipe, items, seeds, unet=unet), items, reference)


def quality_row(name: str, q: dict, base: dict) -> str:
    change = 100 * (q["fidelity"] - base["fidelity"]) / base["fidelity"]
    return (f"| {name} | {q['fidelity']:.3f} ({change:+.1f} %) | {q['taste']:.3f} | {q['proxy']:.2f} | "
            f"{q.get('fd', 0.0):.2f} |")


def recovery_settings(run_dir: Path) -> str:
    """The ``recover`` block of a ``rewardtune prune`` run's resolved config, as one line."""
    from rewardtune.config import read_yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return "settings unknown (no config.yaml)"
    r = read_yaml(path).get("recover", {})
    return (f"{r.get('steps')} steps on {r.get('data')} data ({r.get('num_samples')} latents), batch "
            f"{r.get('batch_size')}, lr {r.get('lr')} (cosine to 10 %), loss weights task/output/feature "
            f"{r.get('task_weight')}/{r.get('output_weight')}/{r.get('feature_weight')}, weight EMA "
            f"{r.get('ema', 0.0) or 'off'}")


def bench_shapes(recovered: Path, repeats: int, num_prompts: int) -> str:
    pipe = load_pipeline("shapes-tiny")
    pipe.states = encode_prompts(pipe, ["a red circle on a white background"])
    pipe.empty = encode_prompts(pipe, [""])
    original = pipe.unet
    variants = {"original": original}
    variants.update({name: prune_unet(original, **kw) for name, (kw, _) in SHAPES_VARIANTS.items()})
    found = {name: recovered / preset / "pipeline" for name, (_, preset) in SHAPES_VARIANTS.items()
             if (recovered / preset / "pipeline").is_dir()}
    recovered_unets = {f"{name}, recovered": load_pipeline(str(path)).unet for name, path in found.items()}
    speed = {**variants, **recovered_unets, "magnitude 0.5 (mask)": prune_unet(original, method="magnitude")}
    inputs = example_inputs(original, batch=32, tokens=32)
    rows = speed_rows(pipe, speed, inputs, batch=16, repeats=repeats)

    prompts = read_prompts(HELDOUT)[:num_prompts]
    items, seeds = [p for p in prompts for _ in range(2)], list(range(2 * len(prompts)))
    scorer = ShapesQuality()
    images = sample_images(pipe, items, seeds)
    reference = scorer.features(images)
    base = scorer(images, items, reference)
    qrows = [quality_row("original", base, base)]
    for name, unet in [*variants.items(), *recovered_unets.items()][1:]:
        qrows.append(quality_row(name, shapes_quality(pipe, unet, scorer, items, seeds, reference), base))
        print(qrows[-1], flush=True)
    mrows = []
    for method in ("magnitude", "lottery"):
        for ratio in MASK_RATIOS:
            masked = prune_unet(original, method=method, ratio=ratio)
            q = shapes_quality(pipe, masked, scorer, items, seeds, reference)
            mrows.append(quality_row(f"{method} {ratio} (sparsity {sparsity(masks_of(masked)):.2f})", q, base))
            print(mrows[-1], flush=True)
    missing = [p for name, (_, p) in SHAPES_VARIANTS.items() if name not in found]
    settings = "".join(f"- {name}: {recovery_settings(path.parent)}\n" for name, path in found.items())
    return ("shapes-tiny.\n\nUNet forward at batch 32 (8x8 latents); 20-step sampling of 16 images with guidance "
            "(UNet batch 32). Models are timed in turn, round after round (interleaved): medians of --repeats "
            "rounds (sampling: 3 rounds), speed-ups are ratios of medians from the same rounds.\n\n"
            + SPEED_HEAD + "\n".join(rows) + "\n\n"
            f"Quality on {len(items)} held-out samples ({len(prompts)} prompts x 2 seeds, 20 DDIM steps, guidance 5); "
            "fidelity change relative to the original in brackets; FD = Frechet distance of tiny-CLIP image "
            "features to the original's samples.\n\n| model | gold fidelity | taste | proxy reward | FD |\n"
            "|---|---|---|---|---|\n" + "\n".join(qrows) + "\n"
            + (f"\nRecovery (distillation from the original) of the recovered rows:\n\n{settings}" if settings else "")
            + (f"\nNot run (no recovered folder under `{recovered}`): {', '.join(missing)}.\n" if missing else "")
            + "\nMasks without retraining (lottery: 3 rounds of global magnitude pruning with rewinding, no "
            "training between rounds here). Zeroed weights in dense tensors: same MACs, same latency.\n\n"
            "| mask | gold fidelity | taste | proxy reward | FD |\n|---|---|---|---|---|\n" + "\n".join(mrows) + "\n")


def seeded(row: str, folder: str, seeds=range(3)) -> dict[str, str]:
    """``row, seed S`` -> ``folder`` for seed 0, ``folder_seedS`` otherwise: one recipe run with several seeds (the
    table adds their mean ± std, :func:`seed_rows`)."""
    return {f"{row}, seed {s}": folder + (f"_seed{s}" if s else "") for s in seeds}


TARGET_PRESETS = {  # row name -> folder under --recovered of a `rewardtune prune` run (its command beside it)
    # [seed=S out=.../NAME_seedS] for the seeded rows (layer tickets: also options.seed=S, its initialisation)
    # shapes_structured.yaml recover.timesteps=20 out=.../shapes_structured_sampler_timesteps
    "structured 0.5, sampler-timestep distillation": "shapes_structured_sampler_timesteps",
    **seeded("structured 0.5, all-timestep distillation on 4096 renders", "shapes_structured"),
    "structured 0.5, same architecture from scratch (equal compute)": "shapes_structured_scratch",
    **seeded("layer tickets at initialisation (2 of 6 units)", "shapes_layer_tickets"),
    "structured 0.5, stage 1 at 0.25 (32/96), all-timestep distillation": "shapes_structured_mild",
    **seeded("blocks: no mid block (BK-SDM-Small)", "shapes_blocks"),
    **seeded("blocks: no mid block, same architecture from scratch (equal compute)", "shapes_blocks_scratch"),
    # the guided term's control: shapes_structured.yaml recover.guided_weight=1 out=.../shapes_structured_guided_plain
    "structured 0.5, all-timestep + guided distillation": "shapes_structured_guided_plain",
    "structured 0.5, attention q/k/v kept (32/64), all-timestep + guided distillation": "shapes_structured_guided",
    # the target recipe's two changes one at a time: shapes_structured.yaml recover.num_samples=16384 (or
    # recover.steps=10000) out=.../shapes_structured_16k (shapes_structured_10k)
    "structured 0.5, all-timestep distillation on 16384 renders": "shapes_structured_16k",
    "structured 0.5, all-timestep distillation on 4096 renders, 2x steps": "shapes_structured_10k",
    **seeded("structured 0.5, target recipe (2x steps on 16384 renders)", "shapes_structured_target"),
    # shapes_structured_target.yaml recover.init=scratch out=.../shapes_structured_target_scratch
    **seeded("structured 0.5, target recipe, same architecture from scratch (equal compute)",
             "shapes_structured_target_scratch"),
    "structured 0.5 but stage-1 down block at 0.25 (96), 2x steps on 16384 renders": "shapes_structured_wide_down",
}


MILDER_PLANS = {  # speed only: milder structured cuts than halving every width (widths stage 0 / stage 1)
    "structured 0.25 (64/128 -> 32/96)": lambda unet: dict(ratio=0.25),
}


def meets_target(q: dict) -> bool:
    """Issue 15's target: >= 2x sampling at <= 5 % gold-fidelity loss."""
    return q["speedup"] >= 2 and q["change"] >= -0.05


def seed_rows(results: dict[str, dict]) -> list[str]:
    """One row per recipe measured with several seeds (rows named ``..., seed S``): mean ± std over seeds of the
    speed-up, fidelity and change; the target counts as met only if every seed meets it."""
    groups: dict[str, list[dict]] = {}
    for name, q in results.items():
        if ", seed " in name:
            groups.setdefault(name.rsplit(", seed ", 1)[0], []).append(q)

    from runs import mean_std

    rows = []
    for recipe, qs in groups.items():
        if len(qs) < 2:
            continue
        speed, fidelity = mean_std([q["speedup"] for q in qs], ".2f"), mean_std([q["mean"] for q in qs], ".3f")
        change = mean_std([100 * q["change"] for q in qs], "+.1f")
        rows.append(f"| **{recipe}, mean ± std over {len(qs)} seeds** | – | {speed}x | {fidelity} | {change} % | "
                    f"{'yes' if all(map(meets_target, qs)) else 'no'} |")
    return rows


def run_compute(run_dir: Path) -> str:
    """``steps x batch`` spent by a ``rewardtune prune`` run (its report), with the recovery's initialisation."""
    import json

    report = json.loads((run_dir / "report.json").read_text())
    c = report.get("compute", {})
    return f"{c.get('steps')} x {c.get('batch_size')} ({c.get('recover_init', 'pruned')} init)"


def sampled_quality(pipe, unet, scorer: ShapesQuality, items, seeds, base: dict, reference) -> dict[str, float]:
    """Gold fidelity of ``unet``'s samples of ``items``/``seeds`` with its change paired against ``base`` (the
    original's per-sample scores, :func:`rewardtune.prune.evaluate.paired_change`), and from the same images the
    mean taste, proxy reward and FD to the original's tiny-CLIP features ``reference``."""
    from rewardtune.prune.evaluate import frechet_distance, paired_change

    images = sample_images(pipe, items, seeds, unet=unet)
    s = scorer.scores(images, items)
    return {**paired_change(s["fidelity"], base["fidelity"]), "taste": float(s["taste"].mean()),
            "proxy": float(s["proxy"].mean()), "fd": frechet_distance(scorer.features(images), reference)}


def bench_target(recovered: Path, repeats: int, num_prompts: int) -> str:
    """Issue 15's target: >= 2x 20-step sampling at <= 5 % gold-fidelity loss on >= 256 held-out samples; and per
    model its parameters, MACs, forward speed-up, taste, proxy and FD (issue 15's evidence)."""
    pipe = load_pipeline("shapes-tiny")
    pipe.states, pipe.empty = encode_prompts(pipe, ["a red circle on a white background"]), encode_prompts(pipe, [""])
    found = {name: recovered / preset for name, preset in TARGET_PRESETS.items()
             if (recovered / preset / "report.json").is_file()}
    unets = {"original": pipe.unet, **{name: load_pipeline(str(d / "pipeline")).unet for name, d in found.items()}}
    with torch.enable_grad():
        milder = {name: prune_unet(pipe.unet, **plan(pipe.unet)) for name, plan in MILDER_PLANS.items()}
    inputs = example_inputs(pipe.unet, batch=32, tokens=32)
    forward = interleaved_medians({n: (lambda u=u: u(**inputs)) for n, u in unets.items()}, 3 * repeats)
    speed = interleaved_medians({n: sampler(pipe, u, 16) for n, u in {**unets, **milder}.items()}, repeats)
    prompts = read_prompts(HELDOUT)[:num_prompts]
    items, seeds = [p for p in prompts for _ in range(2)], list(range(2 * len(prompts)))
    scorer = ShapesQuality()
    images = sample_images(pipe, items, seeds)
    base, reference = scorer.scores(images, items), scorer.features(images)
    se = float(base["fidelity"].std() / len(items) ** 0.5)
    rows = [f"| original | – | 1.00x | {float(base['fidelity'].mean()):.3f} ± {se:.3f} | – | – |"]
    original = {**{key: float(v.mean()) for key, v in base.items()}, "fd": 0.0}
    costs = [cost_row("original", pipe.unet, inputs, 1.0, original)]
    results = {}
    for name, run_dir in found.items():
        q = results[name] = {**sampled_quality(pipe, unets[name], scorer, items, seeds, base, reference),
                             "speedup": speed["original"] / speed[name]}
        met = "yes" if meets_target(q) else "no"
        rows.append(f"| {name} | {run_compute(run_dir)} | {q['speedup']:.2f}x | {q['mean']:.3f} ± {q['se']:.3f} | "
                    f"{100 * q['change']:+.1f} ± {100 * q['change_se']:.1f} % | {met} |")
        costs.append(cost_row(name, unets[name], inputs, forward["original"] / forward[name], q))
        print(rows[-1], flush=True)
    rows += seed_rows(results)
    rows += [f"| {name} (not recovered: speed only) | – | {speed['original'] / speed[name]:.2f}x | – | – | no |"
             for name in milder]
    missing = [p for n, p in TARGET_PRESETS.items() if n not in found]
    return (f"Target: >= 2x 20-step sampling at <= 5 % gold-fidelity loss. Speed: 20-step sampling of 16 images with "
            f"guidance, interleaved rounds, ratio of medians of {repeats} rounds. Quality: {len(items)} held-out "
            f"samples ({len(prompts)} prompts x 2 seeds, 20 DDIM steps, guidance 5), mean ± standard error; the "
            "change is paired (same prompts and seeds as the original), ± its standard error. Compute = "
            "distillation steps x batch of the run.\n\n| model | compute | sampling speed-up | gold fidelity | "
            "fidelity change | target met |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
            + (f"\nNot run (no `rewardtune prune` folder under `{recovered}`): {', '.join(missing)}.\n"
               if missing else "")
            + f"\nThe same models: parameters, MACs and UNet forward at batch 32 (8x8 latents, 32 tokens; "
            f"interleaved, median of {3 * repeats} rounds); taste (gold), proxy reward (shapes_preference) and FD "
            "(Frechet distance of tiny-CLIP image features to the original's samples) on the same samples as the "
            "table above.\n\n"
            "| model | params | MACs | forward speed-up | taste | proxy | FD |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(costs) + "\n")


def cost_row(name: str, unet, inputs, forward_speedup: float, q: dict) -> str:
    """Params, MACs, forward speed-up and ``q``'s mean taste, proxy and FD."""
    return (f"| {name} | {count_params(unet) / 1e6:.2f}M | {count_macs(unet, inputs) / 1e9:.3f}G | "
            f"{forward_speedup:.2f}x | {q['taste']:.3f} | {q['proxy']:.2f} | {q['fd']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recovered", type=Path, default=ROOT / "build" / "prune")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=64, help="held-out prompts (x 2 seeds); the target "
                        "part needs >= 128 (256 samples); the file has 200")
    parser.add_argument("--part", choices=["all", "shapes", "sd15", "target"], default="all",
                        help="which section to measure (each writes its own section of BENCHMARKS.md)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    parts = {"shapes": lambda: bench_shapes(args.recovered, args.repeats, args.num_prompts),
             "sd15": lambda: bench_sd15(args.repeats),
             "target": lambda: bench_target(args.recovered, args.repeats, args.num_prompts)}
    for name, run in parts.items():
        if args.part not in ("all", name):
            continue
        t0 = time.time()
        title = {"shapes": "shapes-tiny", "sd15": "SD 1.5 UNet architecture", "target": "shapes-tiny target"}[name]
        text = (f"## Pruning: {title}\n\n" + header(command_line()) + run()
                + f"\nWall time of this part: {time.time() - t0:.0f} s.\n")
        print(text)
        if not args.no_write:
            update_section(f"prune-{name}", text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
