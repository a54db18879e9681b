"""Typed configs: dataclasses are the schema, YAML files are presets, ``key=value`` strings override.

    cfg = load_config(SampleConfig, "configs/sample.yaml", ["steps=20", "guidance=5.0"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key and what is expected.
Dataclasses check their own cross-field rules in ``__post_init__`` (raise ``ConfigError`` there too).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from rewardtune.errors import ConfigError
from rewardtune.utils.io import atomic_write_text

C = TypeVar("C")


class _Raw(str):
    """An override value exactly as typed: parsed as YAML unless the field is a string."""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": _Raw("1")}, "c": _Raw("x")}``."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. steps=20)")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field inside {part!r}, which is not a section")
        node[parts[-1]] = _Raw(value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


#: ``field(metadata=PATH)`` marks a setting that names a file or folder: a relative value in a YAML file means
#: relative to that file when it exists there (so presets work from any working directory).
PATH = {"path": True}


def load_config(schema: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults of ``schema`` <- YAML file at ``path`` <- ``key=value`` overrides, validated."""
    data = resolve_paths(schema, read_yaml(path), Path(path).resolve().parent) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(schema, data)


def resolve_paths(schema: type, data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with each relative value of a :data:`PATH` field that exists under ``base`` made absolute (other
    values, e.g. shipped names such as ``shapes_small`` or hub ids, stay as written)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return data
    hints, out = typing.get_type_hints(schema), dict(data)
    for f in dataclasses.fields(schema):
        value = out.get(f.name)
        if f.metadata.get("path") and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if (base / value).exists():
                out[f.name] = str(base / value)
        elif dataclasses.is_dataclass(hints.get(f.name)) and isinstance(value, dict):
            out[f.name] = resolve_paths(hints[f.name], value, base)
    return out


def from_dict(schema: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build the dataclass ``schema`` from a (nested) dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    known = {f.name for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(known))}")
    defaults = {f.name: f.default_factory for f in dataclasses.fields(schema)
                if f.default_factory is not dataclasses.MISSING}
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and name in defaults and isinstance(value, dict):
            value = _merge(to_dict(defaults[name]()), value)  # a section overrides its default, key by key
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return schema(**kwargs)
    except _ValueRuleError as exc:
        raise _ValueRuleError(prefix + exc.key, exc.expected, exc.value) from None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; override strings are parsed as YAML unless ``tp`` is str."""
    if isinstance(value, _Raw) and tp is not str:
        try:
            value = yaml.safe_load(str(value)) if str(value).strip() else None
        except yaml.YAMLError:
            value = str(value)
        if isinstance(value, str):
            value = str(value)
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key {key!r} expects {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # inf/nan settings would reach the weights (NaN UNets, black images)
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not -2**63 <= value < 2**64:  # seeds and counts beyond 64 bits overflow torch and numpy
            raise ConfigError(f"config key {key!r} must fit in 64 bits, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return str(value)
    raise ConfigError(f"config key {key!r} has an unsupported annotation {tp!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def schema_defaults(schema: type) -> dict[str, Any]:
    """The nested defaults of a config dataclass: ``{field: default}`` for every field that has one (a nested
    config section becomes its own dict)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


class _ValueRuleError(ConfigError):
    """A value that breaks a rule of its schema; nested sections prefix the key on the way out."""

    def __init__(self, key: str, expected: str, value: Any) -> None:
        self.key, self.expected, self.value = key, expected, value
        super().__init__(f"config key {key!r} must be {expected}, got {value!r}")


def require(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``condition`` holds (for ``__post_init__`` checks)."""
    if not condition:
        raise _ValueRuleError(key, expected, value)
