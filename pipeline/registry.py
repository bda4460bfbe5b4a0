"""One small registry type for every plug-in family (stages, sources, networks, recipes, ...).

Members register with a decorator in their own file. ``pipeline`` never imports a plug-in by name; a registry
finds its members lazily, the first time it is asked for a name it does not hold, through:

* its entry-point group (``distillery.<family>``): one entry per member, for third-party plug-ins;
* its plug-in group (``distillery.plugins``): callables that import every member module of an in-tree package
  (``stages:register_stages`` walks ``stages/``), so a new stage file is found without reinstalling.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError, ValueError):
    """Unknown or duplicate registry member; the message lists what is available."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> object mapping with decorator registration and lazy entry-point discovery."""

    def __init__(self, family: str, entry_point_group: str | None = None, plugin_group: str | None = None) -> None:
        self.family = family
        self.entry_point_group = entry_point_group
        self.plugin_group = plugin_group
        self._members: dict[str, T] = {}
        self._discovered = entry_point_group is None and plugin_group is None

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
            existing = self._members.get(key)
            if existing is not None and existing is not obj and _qualname(existing) != _qualname(obj):
                raise RegistryError(f"{self.family} '{key}' is already registered by {_qualname(existing)}")
            self._members[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if self.plugin_group:
            for ep in entry_points(group=self.plugin_group):
                ep.load()()  # imports the package's member modules; their decorators register them
        if self.entry_point_group:
            for ep in entry_points(group=self.entry_point_group):
                if ep.name not in self._members:
                    self._members[ep.name] = ep.load()

    def entry_point_names(self) -> dict[str, str]:
        """Entry-point name -> target (``module:attr``) of this family's group, without loading them."""
        if not self.entry_point_group:
            return {}
        return {ep.name: ep.value for ep in entry_points(group=self.entry_point_group)}

    def get(self, name: str) -> T:
        if name not in self._members:
            self._discover()
        try:
            return self._members[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.family} '{name}'; available: {', '.join(sorted(self.names())) or '(none)'}"
            ) from None

    def create(self, spec: Any, key: str, error: type[Exception] = ValueError) -> Any:
        """Build a member class from its spec: ``{key: name, ...params}``, a bare name (its defaults) or a pydantic
        model (its dump), as ``cls(cls.Params.model_validate(spec))``; ``error`` when the spec names no member."""
        if hasattr(spec, "model_dump"):
            spec = spec.model_dump()
        if isinstance(spec, str):
            spec = {key: spec}
        if key not in spec:
            raise error(f"a {self.family} needs '{key}' (one of: {', '.join(self.names())})")
        cls: Any = self.get(spec[key])
        return cls(cls.Params.model_validate(spec))

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._members)

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def import_modules(package: str, path: Iterable[str]) -> None:
    """Import the top-level modules of a package (not sub-packages, not ``_private``): how an in-tree package
    registers the plug-ins defined in its files."""
    for m in pkgutil.iter_modules(list(path)):
        if not m.ispkg and not m.name.startswith("_"):
            importlib.import_module(f"{package}.{m.name}")
