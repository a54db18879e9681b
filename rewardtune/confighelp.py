"""The config keys of a dataclass schema as help text: ``describe_config(RunConfig)`` for ``finetune --help``.

Each key is listed with its type, default and one line of help, grouped by section (``train.optim.lr``). The help
comes from ``field(metadata={"help": ...})`` or, failing that, a "``key``: text" fragment of the class
docstring (the text up to the next ``;`` or sentence end); keys without either show type and default only.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

LINE_WIDTH = 118
KEY_WIDTH = 46
_KEYS = re.compile(r"((?:``\w+``\s*(?:/|,|and|or)\s*)*``\w+``)\s*:\s+")
_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def type_name(tp: Any) -> str:
    """A short type label: ``int``, ``str|null``, ``list[str]``, ``prdp|ddpo`` (a Literal lists its values)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return "|".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is dict or tp is dict:
        return "mapping"
    if origin in (list, tuple):
        args = [type_name(a) for a in typing.get_args(tp) if a is not Ellipsis]
        return f"{origin.__name__}[{','.join(args)}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _clean(text: str) -> str:
    """Docstring markup -> plain text on one line."""
    text = _ROLE.sub(r"\1", text).replace("``", "")
    return re.sub(r"\s+", " ", text).strip()


def _first_clause(text: str) -> str:
    """The text up to the first ``;`` or sentence end outside parentheses."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth <= 0 and (char == ";" or (char == "." and (i + 1 == len(text) or text[i + 1] == " "))):
            text = text[:i]
            break
    return text.strip().rstrip(",")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3].rsplit(" ", 1)[0] + "..."


def docstring_help(schema: type) -> dict[str, str]:
    """``{key: help}`` from the "``key``: text" (or "``a`` / ``b``: text")
    fragments of ``schema``'s docstring."""
    doc = schema.__doc__ or ""
    matches = list(_KEYS.finditer(doc))
    helps: dict[str, str] = {}
    for match, after in zip(matches, matches[1:] + [None]):
        text = _clean(doc[match.end(): after.start() if after else len(doc)])
        for key in re.findall(r"``(\w+)``", match.group(1)):
            helps.setdefault(key, _first_clause(text))
    return helps


def section_summary(schema: type) -> str:
    """The first sentence of a section's docstring (without its key fragments)."""
    doc = (schema.__doc__ or "").split("\n\n")[0]
    if doc.startswith(schema.__name__ + "("):  # the dataclass default: no docstring
        return ""
    match = _KEYS.search(doc)
    return _first_clause(_clean(doc[:match.start()] if match else doc))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "(required)"


PACKAGE = Path(__file__).resolve().parent


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        if value.startswith(str(PACKAGE) + "/"):  # shipped files: rewardtune/assets/...
            value = "rewardtune/" + value[len(str(PACKAGE)) + 1:]
        return repr(value) if not value else value if len(value) <= 48 else "..." + value[-45:]
    return _shorten(repr(value), 48)


def _rows(schema: type, prefix: str) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, type]]]:
    """``(key, type, default, help)`` rows of ``schema``'s own keys and its nested ``(prefix, section)`` list."""
    hints = typing.get_type_hints(schema)
    helps = docstring_help(schema)
    rows, sections = [], []
    for field in dataclasses.fields(schema):
        if not field.init:
            continue
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            sections.append((prefix + field.name, tp))
            continue
        help_text = field.metadata.get("help") or helps.get(field.name, "")
        rows.append((prefix + field.name, type_name(tp), _format_default(_default(field)), help_text))
    return rows, sections


def describe_config(schema: type, title: str = "config keys (key=value overrides; nested keys with dots)") -> str:
    """Every key of the dataclass ``schema`` with type, default and help, grouped by section."""
    blocks, queue = [], [("", schema)]
    while queue:
        prefix, section = queue.pop(0)
        rows, nested = _rows(section, prefix + "." if prefix else "")
        queue = nested + queue
        if not rows:
            continue
        summary = section_summary(section) if prefix else ""
        header = _shorten(f"{prefix}: {summary}", LINE_WIDTH) if summary else f"{prefix or 'top level'}:"
        width = min(KEY_WIDTH, max(len(f"{key} ({tp}) = {default}") for key, tp, default, _ in rows))
        room = max(30, LINE_WIDTH - width - 4)
        lines = [f"  {f'{key} ({tp}) = {default}':{width}s}  {_shorten(help_text, room)}".rstrip()
                 for key, tp, default, help_text in rows]
        blocks.append("\n".join([header, *lines]))
    return title + ":\n\n" + "\n\n".join(blocks) + "\n"


__all__ = ["describe_config", "docstring_help", "type_name"]
