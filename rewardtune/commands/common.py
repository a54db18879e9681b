"""What the commands share: the parser whose usage errors are one line, argparse types, and one way to read a
config (YAML preset + ``key=value`` overrides) for every command that takes one. Imports only the standard
library, so that building a parser stays fast."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


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
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# --- CONFIG [key=value ...] ----------------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser, schema: type, examples: str = "") -> None:
    """The positionals ``CONFIG [key=value ...]`` of a command whose settings are the dataclass ``schema``. Its
    ``--help`` ends with ``examples`` and every key of ``schema`` (type, default, help), rendered only when shown."""
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="YAML preset (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings that replace the preset's (nested keys with dots: a.b=1)")

    def render() -> str:
        from rewardtune.confighelp import describe_config

        return (examples.rstrip() + "\n\n" if examples else "") + describe_config(schema)

    parser.epilog = render


def preset_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``(preset path or None, overrides)``: a first positional that holds ``=`` and is no file is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    return config, overrides


def load_job_config(schema: type, args: argparse.Namespace, values: dict[str, object] | None = None,
                    alternatives: tuple[tuple[str, ...], ...] = ()):
    """The settings of a command: defaults of ``schema`` <- the YAML preset (``args.config``) <- ``values`` (the
    command's own flags, already typed) <- ``key=value`` overrides (``args.overrides``), validated.

    ``alternatives``: groups of keys that are one choice (``("prompts", "prompts_file")``): a key of the group given
    on the command line replaces the preset's setting of the others. A key given both as a flag and as
    ``key=value`` is an error."""
    from rewardtune.config import from_dict, parse_overrides, read_yaml, resolve_paths
    from rewardtune.errors import ConfigError

    path, overrides = preset_and_overrides(args)
    preset = resolve_paths(schema, read_yaml(path), Path(path).resolve().parent) if path is not None else {}
    given, values = parse_overrides(overrides), dict(values or {})
    twice = sorted(set(values) & set(given))
    if twice:
        raise ConfigError(f"config key {twice[0]!r} is given twice (as a flag and as {twice[0]}=...); give it once")
    given = {**values, **given}
    for group in alternatives:
        if any(key in given for key in group):
            preset = {key: value for key, value in preset.items() if key not in group}
    return from_dict(schema, merge_trees(preset, given))


def merge_trees(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


__all__ = ["HelpFormatter", "Parser", "add_config_arguments", "finite_float", "load_job_config", "merge_trees",
           "positive_int", "preset_and_overrides"]
