"""``rewardtune prune CONFIG [key=value ...]``: prune a pipeline's UNet, recover, evaluate and save, through
:func:`rewardtune.prune.run.run_prune`."""

from __future__ import annotations

from rewardtune.commands.common import add_config_arguments, load_job_config
from rewardtune.prune.config import PruneConfig

SCHEMA = PruneConfig
PRESETS = ("prune",)  # configs/prune/*.yaml

DESCRIPTION = ("Prune -> distill from the unpruned UNet -> evaluate -> save a pipeline folder that sample, score and "
               "finetune load, e.g. `rewardtune prune configs/prune/shapes_structured.yaml out=outputs/pruned "
               "recover.steps=100`.")


def add_arguments(parser) -> None:
    add_config_arguments(parser, SCHEMA)


def run(args) -> int:
    cfg = load_job_config(SCHEMA, args)  # a bad key fails at once, before torch loads

    from rewardtune.prune.run import format_summary, run_prune

    print(format_summary(run_prune(cfg)))
    return 0


__all__ = ["DESCRIPTION", "PRESETS", "SCHEMA", "add_arguments", "run"]
