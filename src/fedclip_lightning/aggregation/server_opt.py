"""Server optimisers (``federation.server_optimizer.name``), by name: Reddi et al. 2021, "Adaptive Federated
Optimization" (arXiv 2003.00295), Algorithm 2, and FedAvgM (Hsu et al. 2019), plus any registered.

The server treats the round's aggregated client change ``Delta = agg(w_k - w)``
as a pseudo-gradient (a descent direction) and steps with its own optimiser:

* ``none``: ``w <- w + Delta`` (plain averaging; the server then keeps the
  clients' weighted mean itself, bitwise, as the reference does);
* ``momentum`` (FedAvgM): ``v <- beta1 v + Delta``, ``w <- w + eta v``;
* ``adagrad``: ``m <- beta1 m + (1 - beta1) Delta``, ``v <- v + Delta^2``;
* ``yogi``: ``m`` as above, ``v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)``;
* ``adam``: ``m`` as above, ``v <- beta2 v + (1 - beta2) Delta^2``;

and for the three adaptive ones ``w <- w + eta m / (sqrt(v) + tau)``, with
``v`` starting at ``tau^2`` and ``m`` at 0, no bias correction (as in the
paper). Defaults (the paper's): ``beta1 = 0.9``, ``beta2 = 0.99``,
``tau = 1e-3``; ``lr`` (eta) is 1.0 for momentum and 1e-2 for the
adaptive ones, to be tuned as the paper tunes it. The state (``m``, ``v``) is
server state: it goes into every checkpoint and comes back on resume.

**Adding one.** A server optimiser is a :class:`ServerOptimizer` subclass
registered under a name with ``@register_server_optimizer("name")``; it is then
selectable as ``federation.server_optimizer.name=name`` with every algorithm that
sends something, and composes with the robust rules, DP and the attack
simulator (``update.py`` hands it the round's ``Delta`` after them). The
interface:

* ``__init__(lr, beta1, beta2, tau)``: ``federation.server_optimizer.lr`` (or the
  class's ``default_lr`` where that is null), ``beta1``,
  ``beta2``, ``tau`` of ``federation.server_optimizer``; use what you need;
* ``step(w, delta) -> new w``: flat fp32 tensors, the old global weights and
  the pseudo-gradient; return a new tensor (do not change ``w`` or ``delta``
  in place). Every rank calls it with the same arguments, so it must be
  deterministic;
* ``state() -> dict`` and ``load(state)``: everything ``step`` carries from
  round to round (tensors, numbers), for checkpoints; after ``load(state())``
  the next step must be bitwise the same. The base keeps ``m`` and ``v``.

Plugins come from the modules named in ``$FEDCLIP_PLUGINS`` (comma-separated,
imported by :func:`load_plugins` on the first lookup of a name not yet
registered, and before the config check lists the names) or from the
``fedclip_lightning.server_optimizers`` or ``fedclip_lightning.algorithms``
entry-point groups of an installed package; the algorithm registry loads
plugins through the same function. See "Adding a server optimiser" in
docs/server-side.md.
"""

from __future__ import annotations

import importlib
import os
from typing import ClassVar

import torch

from ..errors import ConfigError

PLUGINS_ENV = "FEDCLIP_PLUGINS"
ENTRY_POINT_GROUPS = ("fedclip_lightning.algorithms", "fedclip_lightning.server_optimizers")
_imported: set[str] = set()
_entry_points_loaded = False


def load_plugins() -> None:
    """Import the modules named in ``$FEDCLIP_PLUGINS`` (each once; a module added to the variable later is
    imported on the next call) and, once, the packages of the plugin entry-point groups. A plugin module
    registers algorithms (``fedclip_lightning.algorithms.register``), server optimisers
    (:func:`register_server_optimizer`) or both, when it is imported."""
    global _entry_points_loaded
    spec = os.environ.get(PLUGINS_ENV, "")
    for mod in filter(None, (m.strip() for m in spec.split(","))):
        if mod in _imported:
            continue
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(f"{PLUGINS_ENV}={spec!r}: cannot import {mod!r} ({exc}). "
                              "Fix: name importable modules (on PYTHONPATH), comma-separated.") from None
        _imported.add(mod)
    if not _entry_points_loaded:
        _entry_points_loaded = True
        from importlib.metadata import entry_points

        for group in ENTRY_POINT_GROUPS:
            for ep in entry_points(group=group):
                ep.load()


class ServerOptimizer:
    """The interface of a server optimiser (see the module docstring); subclasses implement ``step``."""

    name: ClassVar[str] = ""
    # federation.server_optimizer.lr where that is null.
    default_lr: ClassVar[float] = 1.0
    # True only for ``step(w, delta) = w + delta`` with no state: then, with no DP and no attack, the server
    # computes the clients' weighted mean directly (the reference's numbers, bitwise) and never calls ``step``.
    plain: ClassVar[bool] = False

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new flat weights from the old ``w`` and the pseudo-gradient ``delta`` (new tensors)."""
        raise NotImplementedError

    def state(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load(self, state: dict | None) -> None:
        state = state or {}
        self.m, self.v = state.get("m"), state.get("v")


# The registry: name -> class, the built-ins first, then plugins as they are imported (use
# ``server_optimizer_names()`` for a list with the plugins loaded).
SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {}


def register_server_optimizer(name: str):
    """Class decorator: make a :class:`ServerOptimizer` subclass selectable as ``federation.server_optimizer.name=name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a server optimiser needs a name that is an identifier, not {name!r}")

    def deco(cls: type[ServerOptimizer]) -> type[ServerOptimizer]:
        if not (isinstance(cls, type) and issubclass(cls, ServerOptimizer)):
            raise TypeError(f"server optimiser {name!r}: {cls!r} is not a ServerOptimizer subclass")
        old = SERVER_OPTIMIZERS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"server optimiser {name!r} is registered twice ({old.__module__}.{old.__qualname__} "
                             f"and {cls.__module__}.{cls.__qualname__})")
        cls.name = name
        SERVER_OPTIMIZERS[name] = cls
        return cls

    return deco


def server_optimizer_names() -> list[str]:
    """Every registered server optimiser, plugins loaded (the built-ins first)."""
    load_plugins()
    return list(SERVER_OPTIMIZERS)


def get_server_optimizer(name: str) -> type[ServerOptimizer]:
    """The class registered as ``name``; a ConfigError naming the registered ones otherwise."""
    if name not in SERVER_OPTIMIZERS:
        load_plugins()
    if name not in SERVER_OPTIMIZERS:
        raise ConfigError(f"federation.server_optimizer.name={name!r}: unknown server optimiser. Fix: use one of "
                          f"{', '.join(SERVER_OPTIMIZERS)} (or register your own: see 'Adding a server optimiser' in "
                          "docs/server-side.md).")
    return SERVER_OPTIMIZERS[name]


def make_server_optimizer(name: str, lr: float | None, beta1: float, beta2: float, tau: float) -> ServerOptimizer:
    """An instance of ``name``, at its ``default_lr`` where ``lr`` is None."""
    cls = get_server_optimizer(name)
    return cls(cls.default_lr if lr is None else lr, beta1, beta2, tau)


# -- the built-ins, in the order the docs list them --------------------------------------------------------

@register_server_optimizer("none")
class Plain(ServerOptimizer):
    plain = True

    def step(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return w + delta


@register_server_optimizer("momentum")
class Momentum(ServerOptimizer):
    """FedAvgM: ``m <- beta1 m + Delta`` (``m`` starts at ``Delta``), ``w <- w + lr m``."""

    def step(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.m = delta.clone() if self.m is None else self.beta1 * self.m + delta
        return w + self.lr * self.m


class Adaptive(ServerOptimizer):
    """FedAdam, FedYogi, FedAdagrad: the first moment and the step are shared; ``second_moment`` differs."""

    default_lr = 1e-2

    def second_moment(self, v0: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m0 = torch.zeros_like(delta) if self.m is None else self.m
        v0 = torch.full_like(delta, self.tau ** 2) if self.v is None else self.v
        self.m = self.beta1 * m0 + (1 - self.beta1) * delta
        self.v = self.second_moment(v0, delta * delta)
        return w + self.lr * self.m / (self.v.sqrt() + self.tau)


@register_server_optimizer("adam")
class Adam(Adaptive):
    def second_moment(self, v0: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v0 + (1 - self.beta2) * d2


@register_server_optimizer("yogi")
class Yogi(Adaptive):
    def second_moment(self, v0: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v0 - (1 - self.beta2) * d2 * torch.sign(v0 - d2)


@register_server_optimizer("adagrad")
class Adagrad(Adaptive):
    def second_moment(self, v0: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v0 + d2
