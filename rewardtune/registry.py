"""A small generic registry: ``register`` by decorator, ``get`` by name with an error that lists valid names."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from rewardtune.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (rewards, algorithms, models, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """``registry.register("x", obj)`` or ``@registry.register("x")`` on a function or class."""
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add(entry) if entry is not None else add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def load(self, name: str) -> T:
        """:meth:`get`, importing a lazy ``"package.module:Attribute"`` string entry on first use."""
        entry = self.get(name)
        if isinstance(entry, str):
            import importlib

            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
