"""Adaptation methods, one file each, found by name.

``get_method("sifa")`` returns the class; every module in this package that defines a :class:`~.base.Method`
subclass with a ``name`` registers it. Adding a method = adding one file (and its ``methods.<name>`` entry in
params.yaml).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def _discover() -> None:
    if _REGISTRY:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in ("base", "build"):  # build: constructs methods, defines none
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.__module__ == mod.__name__:
                if obj.name in _REGISTRY and _REGISTRY[obj.name] is not obj:
                    raise RuntimeError(f"two methods named {obj.name!r}")
                _REGISTRY[obj.name] = obj


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available())}") from None
