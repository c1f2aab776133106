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
    "federation.dp_target_epsilon": ("federation.dp", lambda v: v != "none",
                                     "add federation.dp=server (or client), or drop dp_target_epsilon"),
    "federation.dp_secure": ("federation.dp", lambda v: v != "none",
                             "add federation.dp=server (or client), or drop dp_secure"),
    "federation.attack_fraction": ("federation.attack", lambda v: v != "none",
                                   "add federation.attack=sign_flip (or scaled, gaussian), or drop attack_fraction"),
    "federation.trim_beta": ("federation.aggregator", lambda v: v == "trimmed_mean",
                             "add federation.aggregator=trimmed_mean, or drop trim_beta"),
    "federation.krum_f": ("federation.aggregator", lambda v: v in ("krum", "multi_krum"),
                          "add federation.aggregator=krum (or multi_krum), or drop krum_f"),
    "federation.multi_krum_m": ("federation.aggregator", lambda v: v == "multi_krum",
                                "add federation.aggregator=multi_krum, or drop multi_krum_m"),
}



def check_config(f: FederationConfig, p: Problems) -> None:
    bad = p.bad
    p.choice("federation.aggregation", f.aggregation, AGGREGATIONS)
    p.choice("federation.server_optimizer", f.server_optimizer, server_optimizer_names())  # plugins loaded
    p.choice("federation.aggregator", f.aggregator, AGGREGATORS)
    p.choice("federation.attack", f.attack, ATTACKS)
    p.choice("federation.dp", f.dp, DP_MODES)
    for key in ("server_beta1", "server_beta2"):
        if not 0 <= getattr(f, key) < 1:
            bad(f"federation.{key}", getattr(f, key), "must be in [0, 1)", f"e.g. federation.{key}=0.9")
    if f.server_lr is not None and not f.server_lr > 0:
        bad("federation.server_lr", f.server_lr, "must be > 0", "e.g. federation.server_lr=1e-2, or null for the default")
    if not f.server_tau > 0:
        bad("federation.server_tau", f.server_tau, "must be > 0", "e.g. federation.server_tau=1e-3")
    if not 0 <= f.trim_beta < 0.5:
        bad("federation.trim_beta", f.trim_beta, "must be in [0, 0.5)", "e.g. federation.trim_beta=0.1")
    if f.krum_f < 0:
        bad("federation.krum_f", f.krum_f, "must be >= 0", "e.g. federation.krum_f=1")
    if f.multi_krum_m is not None and f.multi_krum_m < 1:
        bad("federation.multi_krum_m", f.multi_krum_m, "must be >= 1 (or null: K - f)", "e.g. federation.multi_krum_m=2")
    for key in ("attack_fraction", "dropout", "straggler_fraction"):
        if not 0 <= getattr(f, key) < 1:
            bad(f"federation.{key}", getattr(f, key), "must be in [0, 1)", f"e.g. federation.{key}=0.2")
    if f.attack != "none" and f.attack_fraction == 0:
        bad("federation.attack_fraction", 0.0, f"federation.attack={f.attack} needs attackers",
            "e.g. federation.attack_fraction=0.34")
    if not 0 < f.straggler_work <= 1:
        bad("federation.straggler_work", f.straggler_work, "must be in (0, 1]", "e.g. federation.straggler_work=0.5")
    if not (f.dp_clip > 0 and f.dp_noise_multiplier >= 0 and 0 < f.dp_delta < 1):
        bad("federation.dp_clip/dp_noise_multiplier/dp_delta", (f.dp_clip, f.dp_noise_multiplier, f.dp_delta),
            "need a clip > 0, a noise multiplier >= 0 and a delta in (0, 1)", "e.g. dp_clip=1 dp_noise_multiplier=1 dp_delta=1e-5")
    if f.dp_target_epsilon is not None and not f.dp_target_epsilon > 0:
        bad("federation.dp_target_epsilon", f.dp_target_epsilon, "must be > 0", "e.g. federation.dp_target_epsilon=8")
    if not math.isfinite(f.attack_scale):
        bad("federation.attack_scale", f.attack_scale, "must be a finite number", "e.g. federation.attack_scale=100")
    # A setting that does nothing where it stands is refused, not ignored (the run would look as if it had used it).
    for key, (enabler, enables, fix) in ONLY_WITH.items():
        name, on = key.split(".", 1)[1], enabler.split(".", 1)[1]
        if getattr(f, name) != getattr(FederationConfig, name) and not enables(getattr(f, on)):
            bad(key, getattr(f, name), f"has no effect with {enabler}={getattr(f, on)}", fix)
    if f.dp != "none" and f.aggregator != "mean":
        bad("federation.aggregator", f.aggregator, "DP-FedAvg noises a sum: it needs the mean",
            "use federation.aggregator=mean with federation.dp")
    r = f.local_epochs_range
    if r is not None and not (len(r) == 2 and 1 <= r[0] <= r[1]):
        bad("federation.local_epochs_range", list(r), "need [lo, hi] with 1 <= lo <= hi", "e.g. federation.local_epochs_range=[1,3]")


def server_options_set(f: FederationConfig) -> list[str]:
    """The server-side options changed from plain averaging (``federation.<key>``)."""
    return [k for k, d in (("server_optimizer", "none"), ("aggregator", "mean"), ("attack", "none"), ("dp", "none"))
            if getattr(f, k) != d]
