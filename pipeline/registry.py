"""A name -> object registry (as timm's ``create_model``): configs name things, a registry finds them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, config_key: str):
        self.what, self.config_key = what, config_key
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``."""
        return lambda item: self.add(name, item)

    def get(self, name: str, config_key: str | None = None) -> T:
        """The item ``name``; an unknown name is a ``ConfigError`` naming ``config_key`` (default: the registry's)."""
        if name not in self._items:
            raise ConfigError(f"config key '{config_key or self.config_key}': unknown {self.what} {name!r}; "
                              f"expected one of {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
