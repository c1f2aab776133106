"""Algorithms by name.

``@register`` puts an :class:`~.base.Algorithm` subclass under its ``name``;
``get(name)`` finds it. The built-in algorithms register when
``fedclip_lightning.algorithms`` is imported; others come from modules named
in ``$FEDCLIP_PLUGINS`` (comma-separated, imported on the first lookup) or
from the ``fedclip_lightning.algorithms`` entry-point group of an installed
package, so a new algorithm is one module and one YAML file, outside this
package if you like.
"""

from __future__ import annotations

import importlib
import os

from ..errors import ConfigError

_REGISTRY: dict[str, type] = {}
_plugins_loaded = False


def register(cls: type) -> type:
    """Class decorator: make ``cls`` selectable as ``algorithm=<cls.name>``."""
    name = getattr(cls, "name", "")
    if not name or not name.isidentifier():
        raise ValueError(f"an algorithm needs a `name` that is an identifier, not {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"algorithm {name!r} is registered twice ({old.__module__}.{old.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in filter(None, (m.strip() for m in os.environ.get("FEDCLIP_PLUGINS", "").split(","))):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(f"FEDCLIP_PLUGINS={os.environ['FEDCLIP_PLUGINS']!r}: cannot import {mod!r} ({exc}). "
                              "Fix: name importable modules (on PYTHONPATH), comma-separated.") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedclip_lightning.algorithms"):
        ep.load()


def get(name: str) -> type:
    """The algorithm class registered as ``name``; a ConfigError naming the known ones otherwise."""
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise ConfigError(f"algorithm.name={name!r}: unknown algorithm. Fix: use one of {', '.join(names())} "
                          "(or register your own: see 'Adding an algorithm' in docs/algorithms.md).")
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered algorithm, in registration order (the built-ins first, in the tables' order)."""
    _load_plugins()
    return list(_REGISTRY)


def encoder_frozen(cfg) -> bool:
    """Does the image encoder stay frozen for ``cfg``'s algorithm (so its features never change)?"""
    return get(cfg.algorithm.name).encoder_frozen(cfg.algorithm)


def uses_feature_cache(cfg) -> bool:
    """Train on cached frozen features? (Only where that is exact.)"""
    return cfg.features.cache != "off" and encoder_frozen(cfg)
