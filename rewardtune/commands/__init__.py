"""The ``rewardtune`` commands: one module per command, each with

- ``DESCRIPTION`` (the text of its ``--help``), ``add_arguments(parser)`` and ``run(args) -> int`` (the handler);
- for a command that takes a config: ``SCHEMA`` (its dataclass; ``CONFIG [key=value ...]`` is read by
  :func:`rewardtune.commands.common.load_job_config`) and ``PRESETS`` (the folders of ``configs/`` that hold its
  YAML presets).

:data:`COMMANDS` lists them in the order of ``rewardtune --help`` with their one-line help, so the top-level parser
imports only the module of the command that runs: ``rewardtune --help`` and ``rewardtune models`` stay torch-free.
Adding a command is one module and one line here.
"""

from __future__ import annotations

import importlib
from collections import namedtuple
from pathlib import Path
from types import ModuleType


class Command(namedtuple("Command", "name module help")):
    """A registered command: its ``name``, the ``module`` that holds its parser and handler, its one-line ``help``
    (a plain named tuple: ``typing`` would cost ``rewardtune --help`` 8 ms)."""

    __slots__ = ()


COMMANDS: tuple[Command, ...] = (
    Command("finetune", "rewardtune.commands.finetune", "finetune a pipeline against a reward (PRDP, DDPO baseline)"),
    Command("sample", "rewardtune.commands.sample", "sample images from a pipeline (PNGs, grid.png, manifest)"),
    Command("score", "rewardtune.commands.score", "score images with a reward model or a weighted sum"),
    Command("prune", "rewardtune.commands.prune",
            "prune a pipeline's UNet (channels, blocks, masks), recover, evaluate, save"),
    Command("perceptual", "rewardtune.commands.perceptual", "learn rewards from demo videos (Sermanet et al. 2017)"),
    Command("steps", "rewardtune.commands.steps", "step values, decisive steps, implicit rewards of trajectories"),
    Command("models", "rewardtune.commands.models", "list registered pipelines and rewards"),
)


def command_names() -> list[str]:
    return [c.name for c in COMMANDS]


def load_command(name: str) -> ModuleType:
    """The module of command ``name`` (imported now)."""
    from rewardtune.errors import UserError

    for entry in COMMANDS:
        if entry.name == name:
            return importlib.import_module(entry.module)
    raise UserError(f"unknown command {name!r}; choose one of: {', '.join(command_names())}")


def preset_schema(job: str) -> type:
    """The config dataclass of the command whose presets live in ``configs/<job>/`` (e.g. ``prdp`` -> RunConfig)."""
    from rewardtune.errors import UserError

    folders = {}
    for entry in COMMANDS:
        module = importlib.import_module(entry.module)
        folders.update({folder: module.SCHEMA for folder in getattr(module, "PRESETS", ())})
    if job not in folders:
        raise UserError(f"no command reads presets from configs/{job}/; preset folders: {', '.join(sorted(folders))}")
    return folders[job]


def job_of(path: str | Path, root: str | Path) -> str:
    """``configs/sample/x.yaml`` -> ``sample``; ``configs/<job>.yaml`` -> ``<job>``."""
    rel = Path(path).resolve().relative_to(Path(root).resolve())
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def load_preset(path: str | Path, root: str | Path, overrides: list[str] | None = None):
    """Load and validate a shipped preset (``root`` is the ``configs/`` folder) with the schema of its command."""
    from rewardtune.config import load_config

    return load_config(preset_schema(job_of(path, root)), path, overrides)


__all__ = ["COMMANDS", "Command", "command_names", "job_of", "load_command", "load_preset", "preset_schema"]
