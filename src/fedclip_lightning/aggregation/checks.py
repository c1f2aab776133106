"""The server side's own keys (``federation.*`` that the aggregation package acts on), checked."""

from __future__ import annotations

import math
from typing import Any

from ..config import AGGREGATIONS, FederationConfig
from ..errors import Problems
from .attacks import ATTACKS
from .privacy import DP_MODES
from .robust import AGGREGATORS
from .server_opt import server_optimizer_names

# Settings that act only where another setting turns them on: key -> (that setting, whether a value of it turns
# the key on, the fix). Set to anything but its default elsewhere, the key is refused; a sweep whose axis turns the
# feature off leaves the key out of those runs (sweep.plan).
ONLY_WITH: dict[str, tuple[str, Any, str]] = {
    "federation.privacy.target_epsilon": ("federation.privacy.mode", lambda v: v != "none",
                                          "add federation.privacy.mode=server (or client), or drop it"),
    "federation.privacy.secure": ("federation.privacy.mode", lambda v: v != "none",
                                  "add federation.privacy.mode=server (or client), or drop it"),
    "federation.attack.fraction": ("federation.attack.name", lambda v: v != "none",
                                   "add federation.attack.name=sign_flip (or scaled, gaussian), or drop it"),
    "federation.aggregator.trim_beta": ("federation.aggregator.name", lambda v: v == "trimmed_mean",
                                        "add federation.aggregator.name=trimmed_mean, or drop it"),
    "federation.aggregator.krum_f": ("federation.aggregator.name", lambda v: v in ("krum", "multi_krum"),
                                     "add federation.aggregator.name=krum (or multi_krum), or drop it"),
    "federation.aggregator.multi_krum_m": ("federation.aggregator.name", lambda v: v == "multi_krum",
                                           "add federation.aggregator.name=multi_krum, or drop it"),
}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_config(f: FederationConfig, p: Problems) -> None:
    bad = p.bad
    p.choice("federation.aggregation", f.aggregation, AGGREGATIONS)
    so, ag, dp, at, un = f.server_optimizer, f.aggregator, f.privacy, f.attack, f.unreliable
    p.choice("federation.server_optimizer.name", so.name, server_optimizer_names())  # plugins loaded
    p.choice("federation.aggregator.name", ag.name, AGGREGATORS)
    p.choice("federation.attack.name", at.name, ATTACKS)
    p.choice("federation.privacy.mode", dp.mode, DP_MODES)
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(so, key) < 1:
            bad(f"federation.server_optimizer.{key}", getattr(so, key), "must be in [0, 1)",
                f"e.g. federation.server_optimizer.{key}=0.9")
    if so.lr is not None and not so.lr > 0:
        bad("federation.server_optimizer.lr", so.lr, "must be > 0",
            "e.g. federation.server_optimizer.lr=1e-2, or null for the default")
    if not so.tau > 0:
        bad("federation.server_optimizer.tau", so.tau, "must be > 0", "e.g. federation.server_optimizer.tau=1e-3")
    if not 0 <= ag.trim_beta < 0.5:
        bad("federation.aggregator.trim_beta", ag.trim_beta, "must be in [0, 0.5)",
            "e.g. federation.aggregator.trim_beta=0.1")
    if ag.krum_f < 0:
        bad("federation.aggregator.krum_f", ag.krum_f, "must be >= 0", "e.g. federation.aggregator.krum_f=1")
    if ag.multi_krum_m is not None and ag.multi_krum_m < 1:
        bad("federation.aggregator.multi_krum_m", ag.multi_krum_m, "must be >= 1 (or null: K - f)",
            "e.g. federation.aggregator.multi_krum_m=2")
    for key, value in (("attack.fraction", at.fraction), ("unreliable.dropout", un.dropout),
                       ("unreliable.straggler_fraction", un.straggler_fraction)):
        if not 0 <= value < 1:
            bad(f"federation.{key}", value, "must be in [0, 1)", f"e.g. federation.{key}=0.2")
    if at.name != "none" and at.fraction == 0:
        bad("federation.attack.fraction", 0.0, f"federation.attack.name={at.name} needs attackers",
            "e.g. federation.attack.fraction=0.34")
    if not 0 < un.straggler_work <= 1:
        bad("federation.unreliable.straggler_work", un.straggler_work, "must be in (0, 1]",
            "e.g. federation.unreliable.straggler_work=0.5")
    if not (dp.clip > 0 and dp.noise_multiplier >= 0 and 0 < dp.delta < 1):
        bad("federation.privacy.clip/noise_multiplier/delta", (dp.clip, dp.noise_multiplier, dp.delta),
            "need a clip > 0, a noise multiplier >= 0 and a delta in (0, 1)",
            "e.g. federation.privacy.clip=1 federation.privacy.noise_multiplier=1 federation.privacy.delta=1e-5")
    if dp.target_epsilon is not None and not dp.target_epsilon > 0:
        bad("federation.privacy.target_epsilon", dp.target_epsilon, "must be > 0",
            "e.g. federation.privacy.target_epsilon=8")
    if not math.isfinite(at.scale):
        bad("federation.attack.scale", at.scale, "must be a finite number", "e.g. federation.attack.scale=100")
    # A setting that does nothing where it stands is refused, not ignored (the run would look as if it had used it).
    default = FederationConfig()
    for key, (enabler, enables, fix) in ONLY_WITH.items():
        name, on = key.split(".", 1)[1], enabler.split(".", 1)[1]
        if _get(f, name) != _get(default, name) and not enables(_get(f, on)):
            bad(key, _get(f, name), f"has no effect with {enabler}={_get(f, on)}", fix)
    if dp.mode != "none" and ag.name != "mean":
        bad("federation.aggregator.name", ag.name, "DP-FedAvg noises a sum: it needs the mean",
            "use federation.aggregator.name=mean with federation.privacy.mode")
    r = un.local_epochs_range
    if r is not None and not (len(r) == 2 and 1 <= r[0] <= r[1]):
        bad("federation.unreliable.local_epochs_range", list(r), "need [lo, hi] with 1 <= lo <= hi",
            "e.g. federation.unreliable.local_epochs_range=[1,3]")


# The choosers of the server side and their plain-averaging values.
CHOOSERS = ("server_optimizer.name", "aggregator.name", "attack.name", "privacy.mode")


def server_options_set(f: FederationConfig) -> list[tuple[str, Any]]:
    """The server-side options changed from plain averaging (their defaults): (``federation.<key>``, value)."""
    plain = FederationConfig()
    return [(f"federation.{k}", _get(f, k)) for k in CHOOSERS if _get(f, k) != _get(plain, k)]
