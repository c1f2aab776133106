"""Robust aggregation rules (``federation.aggregator.name``): functions of the whole table of client rows.

Each rule takes ``rows`` ``[K, P]`` (the clients in fixed order) and their
weights, and returns one row. They cannot use sample weights (a median has no
weighted form here), so the server warns when ``federation.aggregation=samples``
is combined with one of them.

* ``median``: the coordinate-wise median (Yin et al. 2018); with an even K the
  mean of the two middle values. Breakdown point 1/2: fewer than half the
  clients cannot move it arbitrarily far.
* ``trimmed_mean``: per coordinate, drop the ``floor(beta K)`` smallest and
  largest values and average the rest (Yin et al. 2018). Tolerates up to
  ``floor(beta K)`` attackers.
* ``krum``: the row whose summed squared distance to its ``K - f - 2`` nearest
  other rows is smallest (Blanchard et al. 2017); needs ``K > 2f + 2``.
* ``multi_krum``: the mean of the ``m`` rows with the best Krum scores
  (``m = K - f`` by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError


class Median:
    linear = False
    uses_weights = False

    def __call__(self, rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        k = rows.shape[0]
        s = rows.sort(dim=0).values
        if k % 2:
            return s[k // 2].clone()
        return (s[k // 2 - 1] + s[k // 2]) / 2


class TrimmedMean:
    linear = False
    uses_weights = False

    def __init__(self, beta: float):
        self.beta = beta

    def __call__(self, rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        k = rows.shape[0]
        t = int(math.floor(self.beta * k))
        if k - 2 * t < 1:
            t = (k - 1) // 2
        s = rows.sort(dim=0).values
        return s[t : k - t].mean(dim=0)


def krum_scores(rows: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's summed squared distance to its ``K - f - 2`` nearest other rows."""
    k = rows.shape[0]
    d = torch.cdist(rows.double(), rows.double()).pow(2)
    d.fill_diagonal_(float("inf"))
    nearest = max(1, k - f - 2)
    return d.sort(dim=1).values[:, :nearest].sum(dim=1)


class Krum:
    linear = False
    uses_weights = False

    def __init__(self, f: int, m: int | None = 1):
        self.f, self.m = f, m

    def __call__(self, rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        k = rows.shape[0]
        if k <= 2 * self.f + 2:
            raise ConfigError(f"federation.aggregator.krum_f={self.f}: Krum needs more than 2f + 2 = {2 * self.f + 2} clients in "
                              f"a round, this round has {k}. Fix: lower federation.aggregator.krum_f, or use "
                              "federation.aggregator.name=median.")
        m = self.m if self.m is not None else k - self.f
        if m > k:
            raise ConfigError(f"federation.aggregator.multi_krum_m={m}: this round has only {k} clients, so multi-Krum would "
                              "average every row (the plain mean). Fix: lower federation.aggregator.multi_krum_m (null: K - f).")
        chosen = krum_scores(rows, self.f).argsort()[:m].sort().values  # ties: the lower client index
        return rows[chosen].mean(dim=0) if m > 1 else rows[chosen[0]].clone()


AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")


def make_rule(fed):
    """The rule ``federation.aggregator.name`` names (``mean``: the streamed weighted mean)."""
    from .mean import WeightedMean

    name = fed.aggregator.name
    if name == "mean":
        return WeightedMean()
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        return TrimmedMean(fed.aggregator.trim_beta)
    if name == "krum":
        return Krum(fed.aggregator.krum_f, 1)
    if name == "multi_krum":
        return Krum(fed.aggregator.krum_f, fed.aggregator.multi_krum_m)
    raise ConfigError(f"federation.aggregator.name={name!r}: unknown rule. Fix: use one of {', '.join(AGGREGATORS)}.")
