"""Config system: dataclass schemas, YAML presets, key=value overrides, clear errors; every shipped YAML loads."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from rewardtune.commands import load_preset
from rewardtune.config import from_dict, load_config, parse_overrides, require, save_config
from rewardtune.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Optim:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self):
        require(self.lr > 0, "lr", "> 0", self.lr)


@dataclass
class Job:
    name: str = "run"
    epochs: int = 3
    mode: Literal["full", "lora"] = "full"
    weights: dict[str, float] = field(default_factory=dict)
    resume: str | None = None
    fast: bool = False
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_merge(tmp_path):
    preset = tmp_path / "job.yaml"
    preset.write_text("epochs: 5\noptim:\n  lr: 3.0e-4\nweights: {a: 1, b: 0.5}\n")
    cfg = load_config(Job, preset, ["optim.lr=1e-3", "mode=lora", "name=123", "resume=null", "fast=true"])
    assert cfg == Job(name="123", epochs=5, mode="lora", weights={"a": 1.0, "b": 0.5}, resume=None, fast=True,
                      optim=Optim(lr=1e-3))
    assert isinstance(cfg.weights["a"], float) and isinstance(cfg.name, str)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Job, None, ["optim.betas=[0.5, 0.9]", "weights={x: 2}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert from_dict(Job, yaml.safe_load(path.read_text())) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["epohcs=3"], "unknown config key 'epohcs'; valid keys here: epochs, fast, mode, name, optim, resume, weights"),
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys here: betas, lr"),
    (["epochs=three"], "config key 'epochs' expects int, got 'three'"),
    (["epochs=2.5"], "config key 'epochs' expects int, got 2.5"),
    (["fast=1"], "config key 'fast' expects bool, got 1"),
    (["mode=half"], "config key 'mode' expects one of 'full', 'lora', got 'half'"),
    (["optim.lr=-1"], "config key 'optim.lr' must be > 0, got -1.0"),
    (["optim.betas=0.9"], "config key 'optim.betas' expects a list of float, got 0.9"),
    (["optim=3"], "optim must be a mapping, got 3"),
    (["noequals"], "override 'noequals' is not of the form key=value (e.g. steps=20)"),
])
def test_errors_name_the_key_and_what_is_expected(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(Job, None, overrides)
    assert str(exc.value) == message


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(Job, broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Job, listy)


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": "1"}, "d": "x"}}


LAUNCHERS = CONFIGS / "accelerate"  # accelerate launch configs, read by `accelerate launch`, not rewardtune presets
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if LAUNCHERS not in p.parents)


def test_there_are_shipped_presets():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_preset(path, CONFIGS)
    assert cfg is not None
    data = yaml.safe_load(path.read_text())
    assert data, f"{path} is empty"


@dataclass
class WithPreset:
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, betas=[0.1, 0.2]))


def test_a_section_overrides_its_default_factory_key_by_key():
    cfg = load_config(WithPreset, None, ["optim.lr=0.25"])
    assert cfg.optim == Optim(lr=0.25, betas=[0.1, 0.2])


def test_the_accelerate_fsdp_config_turns_on_sharding(monkeypatch):
    """configs/accelerate/fsdp.yaml asks accelerate for FSDP2, which accelerate announces as ACCELERATE_USE_FSDP;
    rewardtune shards on that (or on fsdp=true) whatever accelerate decides for the device."""
    from rewardtune.utils.fsdp import fsdp_requested

    launch = yaml.safe_load((LAUNCHERS / "fsdp.yaml").read_text())
    assert launch["distributed_type"] == "FSDP" and launch["fsdp_config"]["fsdp_version"] == 2
    plain = type("Accelerator", (), {"distributed_type": "DistributedType.MULTI_CPU"})()
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested(plain) and fsdp_requested(plain, flag=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_requested(plain)
