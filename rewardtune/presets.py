"""Which schema validates which shipped preset: ``configs/<job>.yaml`` or ``configs/<job>/*.yaml``."""

from __future__ import annotations

from pathlib import Path

from rewardtune.config import load_config
from rewardtune.registry import Registry

SCHEMAS: Registry[type] = Registry("config job")


def _register_builtin() -> None:
    from rewardtune.finetune.run import RunConfig
    from rewardtune.prune.run import PruneConfig
    from rewardtune.sample import SampleConfig

    SCHEMAS.register("sample", SampleConfig)
    SCHEMAS.register("prdp", RunConfig)
    SCHEMAS.register("ddpo", RunConfig)
    SCHEMAS.register("prune", PruneConfig)


_register_builtin()


def job_of(path: str | Path, root: str | Path) -> str:
    """``configs/sample/x.yaml`` -> ``sample``; ``configs/<job>.yaml`` -> ``<job>``."""
    rel = Path(path).resolve().relative_to(Path(root).resolve())
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def load_preset(path: str | Path, root: str | Path, overrides: list[str] | None = None):
    """Load and validate a shipped preset with the schema of its job."""
    return load_config(SCHEMAS.get(job_of(path, root)), path, overrides)
