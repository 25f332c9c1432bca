"""One registry per extensible kind: init methods, growth policies, datasets and model families.

A registry is the one source of truth for its names: config validation, the CLI's ``--help``
choices, the docs tables and the Ray backend all read it. Built-in entries are declared here as
``"module:attribute"`` strings and imported on first use, so listing or checking a name never
imports torch. A third-party package adds an entry in one of three ways:

- ``dils_search.registry.INITS.register("my-init", fn)`` (or as a decorator) at import time;
- an entry point in the group the registry names (``dils_search.inits``, ``dils_search.policies``,
  ``dils_search.datasets``, ``dils_search.families``), loaded when the name is first asked for;
- for a one-off script, either of the above before the study starts.

An unknown name is an :class:`~dils_search.errors.InputError` whose one line names the field, the
value and every allowed name. This module imports only the standard library and ``errors``.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar, overload

from .errors import InputError

__all__ = ["Registry", "INITS", "POLICIES", "DATASETS", "FAMILIES"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind mapped to objects, with lazy built-ins and an entry-point group."""

    def __init__(self, kind: str, field: str, group: str, builtins: dict[str, str]) -> None:
        self.kind = kind  # "init method"
        self.field = field  # the config field that names one, for error messages
        self.group = group  # the entry-point group third-party packages register under
        self._lazy: dict[str, str] = dict(builtins)  # name -> "module:attribute", imported on first get
        self._items: dict[str, T] = {}
        self._order: list[str] = list(builtins)  # names in registration order, for stable messages
        self._scanned = False

    def _scan(self) -> None:
        if not self._scanned:
            self._scanned = True
            for ep in entry_points(group=self.group):
                if ep.name not in self._order:
                    self._lazy[ep.name] = ep.value
                    self._order.append(ep.name)

    @overload
    def register(self, name: str, obj: T, *, replace: bool = ...) -> T: ...
    @overload
    def register(self, name: str, obj: None = ..., *, replace: bool = ...) -> Callable[[T], T]: ...

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` (or use as ``@REGISTRY.register(name)``); a clash needs ``replace=True``."""
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{self.kind} name={name!r} must be a non-empty string")

        def add(value: T) -> T:
            if not replace and name in self:
                raise InputError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
            self._lazy.pop(name, None)
            self._items[name] = value
            if name not in self._order:
                self._order.append(name)
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plugins that clean up after themselves)."""
        self._items.pop(name, None)
        self._lazy.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-ins first, in registration order."""
        self._scan()
        return tuple(self._order)

    def __contains__(self, name: object) -> bool:
        self._scan()
        return name in self._items or name in self._lazy

    def check(self, name: Any, field: str | None = None) -> str:
        """``name`` if registered, else one-line :class:`InputError` naming field, value and allowed names."""
        if not isinstance(name, str) or name not in self:
            raise InputError(f"{field or self.field}={name!r} is not a known {self.kind}; allowed: {', '.join(self.names())}")
        return name

    def get(self, name: Any, field: str | None = None) -> T:
        """The object registered as ``name``, importing a lazy entry on first use."""
        self.check(name, field)
        if name not in self._items:
            self._items[name] = pkgutil.resolve_name(self._lazy.pop(name))
        return self._items[name]


#: init methods: an ``InitMethod`` (what it needs of a spec, see ``core/inits.py``) or a plain
#: ``fn(ctx: InitContext) -> None`` (``core/inits.py``'s ``InitFn``) that applies anywhere
INITS: Registry[Any] = Registry("init method", "init", "dils_search.inits", {
    "dils-analytic": "dils_search.core.inits:DILS_ANALYTIC",
    "dils-approx": "dils_search.core.inits:DILS_APPROX",
    "identity": "dils_search.core.inits:IDENTITY",
    "zero": "dils_search.core.inits:ZERO",
    "random": "dils_search.core.inits:RANDOM",
})
#: growth policies: a ``Policy`` subclass (see ``search/policies.py``)
POLICIES: Registry[Any] = Registry("growth policy", "search.policy", "dils_search.policies", {
    "optuna": "dils_search.search.policies:OptunaPolicy",
    "random": "dils_search.search.policies:RandomPolicy",
    "greedy": "dils_search.search.policies:GreedyPolicy",
    "stack": "dils_search.search.policies:StackPolicy",
    "scratch": "dils_search.search.policies:ScratchPolicy",
    "plain": "dils_search.search.policies:PlainPolicy",
})
#: datasets: ``loader(*, seed, num_samples, path, label_column, options) -> (x, y, test or None)``
#: (see ``core/data.py``; ``num_samples``/``path``/``label_column`` may be None, ``options`` is a dict)
DATASETS: Registry[Any] = Registry("dataset", "data.dataset", "dils_search.datasets", {
    "digits": "dils_search.core.data:_load_digits",
    "mnist1d": "dils_search.core.data:_load_mnist1d",
    "synthetic": "dils_search.core.data:_load_synthetic",
    "file": "dils_search.core.data:_load_file",
})
#: model families: a ``Family`` object, named as a spec's ``kind`` (see ``core/family.py``)
FAMILIES: Registry[Any] = Registry("model family", "model.kind", "dils_search.families", {
    "mlp": "dils_search.core.family:MLP",
    "conv": "dils_search.core.family:CONV",
})
