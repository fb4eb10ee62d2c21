"""Registries: the one place each kind of strategy is looked up by name.

Presets, losses, feature modules, architectures, backbones, CAM methods, TTA modes, schedules and
samplings each live in a ``Registry``. The implementation registers itself where it is defined
(``@LOSSES.register("onss")``), and everything that offers a choice reads the registry: the
config checks, the CLI's ``choices``, the widgets' combo boxes and the contract tests. Adding a
strategy is one decorated function or class; nothing else lists its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order."""

    def __init__(self, kind: str):
        #: What the entries are, for messages: "loss", "method", "backbone"...
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` over a function or class."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """The entry called ``name``, or one ``ConfigError`` listing the valid names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.kind} '{name}': choose one of {', '.join(self._entries)}"
            ) from None

    def remove(self, name: str) -> None:
        """Forget ``name`` (a registration meant to be temporary, as in tests)."""
        self.get(name)
        del self._entries[name]

    def check(self, name: str) -> str:
        """``name`` if it is registered (a config check that needs no entry)."""
        self.get(name)
        return name

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


class RegistryNames:
    """The names of a registry in a module imported only when the names are first needed.

    For argparse ``choices``: building the parser must not import torch (``histo-wsss --help``
    would take seconds), while checking a value or printing a command's usage may.
    """

    def __init__(self, module: str, registry: str):
        self.module = module
        self.registry = registry

    def _names(self) -> tuple[str, ...]:
        return getattr(importlib.import_module(self.module), self.registry).names()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())
