"""Algorithms by name.

``@register`` puts an :class:`~.base.Algorithm` subclass under its ``name``;
``get(name)`` finds it. The built-in algorithms register when
``fedclip_lightning.algorithms`` is imported; others come from modules named
in ``$FEDCLIP_PLUGINS`` (comma-separated, imported on the first lookup) or
from the ``fedclip_lightning.algorithms`` entry-point group of an installed
package, so a new algorithm is one module and one YAML file, outside this
package if you like. The loader is ``aggregation.server_opt.load_plugins``,
shared with the server optimisers (a plugin module may register both).
"""

from __future__ import annotations

from ..aggregation.server_opt import load_plugins
from ..errors import ConfigError

_REGISTRY: dict[str, type] = {}


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


def get(name: str) -> type:
    """The algorithm class registered as ``name``; a ConfigError naming the known ones otherwise."""
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise ConfigError(f"algorithm.name={name!r}: unknown algorithm. Fix: use one of {', '.join(names())} "
                          "(or register your own: see 'Adding an algorithm' in docs/algorithms.md).")
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered algorithm, in registration order (the built-ins first, in the tables' order)."""
    load_plugins()
    return list(_REGISTRY)


def encoder_frozen(cfg) -> bool:
    """Does the image encoder stay frozen for ``cfg``'s algorithm (so its features never change)?"""
    return get(cfg.algorithm.name).encoder_frozen(cfg.algorithm)


def uses_feature_cache(cfg) -> bool:
    """Train on cached frozen features? (Only where that is exact.)"""
    return cfg.features.cache != "off" and encoder_frozen(cfg)
