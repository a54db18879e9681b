"""The ``rewardtune`` command line. Heavy libraries load only inside the command that needs them."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from rewardtune import __version__
from rewardtune.errors import UserError

DESCRIPTION = """\
rewardtune: reward finetuning of diffusion models, and the vision rewards it needs.

Runs offline on the embedded default, the shapes world (a tiny Stable Diffusion trained on
procedural shape images, with a learned proxy reward and a hidden gold reward), and on real
Stable Diffusion 1.x/2.x pipelines given a hub id or a local folder.
"""

EPILOG = """\
examples:
  rewardtune finetune configs/prdp/shapes_small.yaml            # the demo: PRDP on the shapes world
  rewardtune finetune configs/prdp/shapes_small.yaml epochs=20 output_dir=outputs/prdp resume=auto
  rewardtune sample --model shapes-tiny --prompt "a red circle" --num-images 8 --out samples/
  rewardtune sample --model CompVis/stable-diffusion-v1-4 --prompts prompts.txt --steps 50
  rewardtune score --reward shapes_gold --images samples/ --prompts samples/manifest.csv
  rewardtune score --reward "pickscore:10,hpsv2:2,aesthetic:0.05" --images "out/*.png" --prompt "a cat"
  rewardtune perceptual demos --task door --count 8 --out demos/
  rewardtune perceptual learn --videos demos/ --steps 2 --features random-cnn --out reward.pt
  rewardtune perceptual score --reward reward.pt --video test.mp4 --out rewards.csv --plot rewards.png
  rewardtune models

`rewardtune COMMAND --help` shows a command's options; finetune and prune list every config key.
Bad input exits with code 2 and a one-line message; --verbose shows library logs.
"""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; text that holds line breaks (examples, key tables) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``rewardtune: error: ...``, exit 2) and whose epilog may
    be a callable, rendered only when the help is shown (so listing config keys costs nothing otherwise)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"rewardtune: error: {message} (see `{self.prog} --help`)\n")

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (no inf or nan)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a pipeline (PNGs, grid.png, manifest)",
                       description="Sample images; write PNGs, grid.png and manifest.{json,csv} mapping files to "
                                   "prompts and seeds. The same seed gives the same images.")
    p.add_argument("--model", default=None, help="registered name, local pipeline folder or hub id "
                   "(default: shapes-tiny, or the base named in the --lora folder; see `rewardtune models`)")
    p.add_argument("--lora", metavar="PATH", default=None, help="LoRA weights to load on top of --model (the "
                   "final/ folder of a LoRA finetuning run)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts", metavar="FILE", help="prompt file: .txt (one per line), .csv or .jsonl")
    p.add_argument("--num-images", type=positive_int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=positive_int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=finite_float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--eta", type=finite_float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed+k (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--height", type=positive_int, default=None, help="pixels, a multiple of the VAE scale factor "
                   "(8 for Stable Diffusion; default: the model's size)")
    p.add_argument("--width", type=positive_int, default=None, help="pixels, like --height")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    p.set_defaults(handler=_cmd_sample)


def _cmd_sample(args) -> int:
    from rewardtune.diffusion.loading import lora_base_model
    from rewardtune.sample import SampleConfig, run_sample

    model = args.model or (lora_base_model(args.lora) if args.lora else None) or "shapes-tiny"
    cfg = SampleConfig(
        model=model, lora=args.lora, prompts=args.prompt, prompts_file=args.prompts, num_images=args.num_images,
        steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
        height=args.height, width=args.width, dtype=args.dtype, device=args.device, out=args.out,
        overwrite=args.overwrite,
    )
    out = run_sample(cfg)
    print(f"wrote {out}/grid.png and manifest.csv")
    return 0


# The schema of each config job, imported only when its --help is shown (torch-free help for the rest).
CONFIG_SCHEMAS = {"finetune": "rewardtune.finetune.config:RunConfig", "prune": "rewardtune.prune.config:PruneConfig"}


def _schema_epilog(name: str):
    """A callable that renders the config keys of job ``name`` (resolved by :meth:`Parser.format_help`)."""
    def render() -> str:
        import importlib

        from rewardtune.confighelp import describe_config

        module, _, attr = CONFIG_SCHEMAS[name].partition(":")
        return describe_config(getattr(importlib.import_module(module), attr))
    return render


def _add_config_job(sub, name: str, help_text: str, description: str, handler) -> None:
    """A subcommand that takes an optional YAML preset followed by ``key=value`` overrides; its --help lists the
    config keys."""
    epilog = _schema_epilog(name) if name in CONFIG_SCHEMAS else None
    p = sub.add_parser(name, help=help_text, description=description, epilog=epilog)
    p.add_argument("config", nargs="?", help="YAML preset (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (nested keys with dots: sample.steps=10)")
    p.set_defaults(handler=handler)


def _load_job_config(schema, args):
    """The preset (if the first positional is a file rather than an override) merged with the overrides."""
    from rewardtune.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config] + overrides
    return load_config(schema, config, overrides)


def _add_finetune(sub) -> None:
    _add_config_job(sub, "finetune", "finetune a pipeline against a reward (PRDP, DDPO baseline)",
                    "Online reward finetuning, e.g. `rewardtune finetune configs/prdp/shapes_small.yaml epochs=2 "
                    "output_dir=out/run resume=auto`. Multi-process: `accelerate launch -m rewardtune finetune "
                    "CONFIG`.", _cmd_finetune)


def _cmd_finetune(args) -> int:
    from rewardtune.finetune.run import RunConfig, run_finetune

    from accelerate import PartialState

    summary = run_finetune(_load_job_config(RunConfig, args))
    if PartialState().is_main_process:  # one summary per run, not per process
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The closing lines of ``rewardtune finetune``: before -> after on the fixed evaluation, and where to look."""
    minutes, seconds = divmod(round(summary.get("seconds", 0)), 60)
    lines = [f"finetune: {summary['epochs_run']} epochs in {minutes}m{seconds:02d}s -> {summary['output_dir']}"]
    before, after = summary.get("before", {}), summary.get("after", {})
    names = {"eval_reward": "reward (eval prompts)", "eval_gold": "gold (eval prompts)",
             "heldout_reward": "reward (held-out)", "heldout_gold": "gold (held-out)"}
    rows = [(label, before[k], after[k]) for k, label in names.items()
            if isinstance(before.get(k), float) and isinstance(after.get(k), float)]
    if rows:
        epochs = summary.get("epochs", [0, 0])
        lines.append(f"  {'':24s}{'before':>9s}{'after':>10s}   (epoch {epochs[0]} -> {epochs[1]})")
        lines += [f"  {label:24s}{b:9.4g} -> {a:7.4g}   ({a - b:+.3g})" for label, b, a in rows]
    if summary.get("skipped"):
        lines.append(f"  skipped gradient steps in the last epoch: {summary['skipped']} (non-finite loss)")
    lines.append(f"  grids before | after: {summary['comparison']}")
    lines.append(f"  final model: {summary['final']}   metrics: {summary['output_dir']}/metrics.jsonl, "
                 "reward_curve.png")
    if summary.get("processes", 1) > 1:
        lines.append(f"  processes: {summary['processes']}, replicas in sync: {summary['ranks_in_sync']}")
    return "\n".join(lines)


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score images with a reward model or a weighted sum",
                       description="Score a folder or glob of images. --reward takes a registered name or a "
                                   "weighted sum such as 'pickscore:10,hpsv2:2,aesthetic:0.05'.")
    p.add_argument("--reward", required=True, help="reward name or weighted sum (see `rewardtune models`)")
    p.add_argument("--images", required=True, help="folder or glob of image files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt for every image")
    src.add_argument("--prompts", metavar="FILE", help=".txt (one per image, sorted file order) or .csv/.jsonl "
                     "with path,prompt")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--out", default=None, help="write rows to FILE (.csv or .jsonl)")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.set_defaults(handler=_cmd_score)


def _cmd_score(args) -> int:
    from tqdm.auto import tqdm

    from rewardtune.score import run_score

    def warn(message: str) -> None:
        tqdm.write(f"rewardtune: warning: {message}", file=sys.stderr)

    summary = run_score(args.reward, args.images, args.prompt, args.prompts, args.out, args.batch_size, args.strict,
                        args.device, args.dtype, warn=warn)
    print(summary.text())
    return 0


def _add_prune(sub) -> None:
    _add_config_job(sub, "prune", "prune a pipeline's UNet (channels, blocks, masks), recover, evaluate, save",
                    "Prune -> distill from the unpruned UNet -> evaluate -> save a pipeline folder that sample, "
                    "score and finetune load, e.g. `rewardtune prune configs/prune/shapes_structured.yaml "
                    "out=outputs/pruned recover.steps=100`.", _cmd_prune)


def _cmd_prune(args) -> int:
    from rewardtune.prune.run import PruneConfig, format_summary, run_prune

    print(format_summary(run_prune(_load_job_config(PruneConfig, args))))
    return 0


def _add_perceptual(sub) -> None:
    from rewardtune.perceptual.cli import add_parser

    add_parser(sub)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered pipelines and rewards")
    p.set_defaults(handler=_cmd_models)


def _cmd_models(args) -> int:
    from rewardtune.models_table import PIPELINES, reward_names

    print("pipelines (--model):")
    for name in sorted(PIPELINES):
        print(f"  {name:12s} {PIPELINES[name]}")
    print("rewards (--reward, combine as name:weight,name:weight):")
    print("  " + ", ".join(reward_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rewardtune", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"rewardtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in (_add_finetune, _add_sample, _add_score, _add_prune, _add_perceptual, _add_models):
        add(sub)
    parser.commands = sub.choices  # main() names the command whose arguments were not recognized
    return parser


def _quiet_libraries() -> None:
    """Keep diffusers/transformers warnings and weight-loading bars off the terminal (``--verbose`` shows them):
    an error stays one line. Env vars cover later imports; already imported libraries are set directly."""
    for key in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(key, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            module.utils.logging.set_verbosity_error()
            module.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    if not args.verbose:
        _quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"rewardtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rewardtune: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"rewardtune: error: {exc.strerror or exc}{where}; free space or choose a writable location, then "
              "rerun (runs continue with resume=auto)", file=sys.stderr)
        return 1


# Failures of the machine rather than of the input: one line and exit code 1 instead of a traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


if __name__ == "__main__":
    sys.exit(main())
