"""The ``rewardtune`` command line: the top-level parser over the commands of :data:`rewardtune.commands.COMMANDS`,
and the handling of errors. Only the module of the command that runs is imported (each imports its heavy libraries
inside its handler), so ``rewardtune --help`` and ``rewardtune models`` stay torch-free."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from rewardtune import __version__
from rewardtune.commands import COMMANDS
from rewardtune.commands.common import Parser
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
  rewardtune sample configs/sample/shapes_heldout.yaml num_images=1 out=outputs/heldout
  rewardtune score --reward shapes_gold --images samples/ --prompts samples/manifest.csv
  rewardtune score --reward "pickscore:10,hpsv2:2,aesthetic:0.05" --images "out/*.png" --prompt "a cat"
  rewardtune perceptual demos --task door --count 8 --out demos/
  rewardtune perceptual learn --videos demos/ --steps 2 --features random-cnn --out reward.pt
  rewardtune perceptual score --reward reward.pt --video test.mp4 --out rewards.csv --plot rewards.png
  rewardtune models

`rewardtune COMMAND --help` shows a command's options; finetune, prune and sample list every config key.
Bad input exits with code 2 and a one-line message; --verbose shows library logs.
"""


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``rewardtune`` parser. Only the modules of ``commands`` (default: all) are imported and their arguments
    added; the others are listed with their one-line help, enough for ``--help`` and an unknown-choice error."""
    parser = Parser(prog="rewardtune", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"rewardtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for entry in COMMANDS:
        if commands is not None and entry.name not in commands:
            sub.add_parser(entry.name, help=entry.help)
            continue
        module = importlib.import_module(entry.module)
        p = sub.add_parser(entry.name, help=entry.help, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (one-line errors, exit 2), importing only the named command's module. ``key=value`` words
    after a flag are overrides too (argparse takes only those before the first flag: ``sample CONFIG --out x
    steps=2``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)  # top-level options take no value
    parser = build_parser([command] if command else [])
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        build_parser([]).print_help()
        return 2
    if not args.verbose:
        _quiet_libraries()
    import logging  # here, not at the top: --help answers without it

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
    except BrokenPipeError:  # `rewardtune models | head`: the reader left; stop quietly as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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
