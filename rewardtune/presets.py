"""Which schema validates a shipped preset: kept for callers of ``rewardtune.presets.load_preset``; the table is
the command layer's (each command module names its ``SCHEMA`` and its ``PRESETS`` folders of ``configs/``)."""

from rewardtune.commands import job_of, load_preset, preset_schema

__all__ = ["job_of", "load_preset", "preset_schema"]
