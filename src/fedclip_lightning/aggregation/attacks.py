"""A byzantine-client simulator for testing robust aggregation (``federation.attack.name``).

A seeded fraction of the clients (``federation.attack.fraction``, chosen once
per run) send a corrupted update instead of their honest one ``u = w_k - w``:

* ``sign_flip``: ``-s * u``;
* ``scaled``: ``s * u`` (a boosted update; Bhagoji et al. 2019);
* ``gaussian``: noise ``N(0, (s * rms(u))^2)`` in place of ``u``;

with ``s = federation.attack.scale`` (default 100). The noise is seeded by the
(round, client) pair, so every rank, and a resumed run, corrupts alike.
"""

from __future__ import annotations

import random

import torch

from ..data.partition import stable_seed

ATTACKS = ("none", "sign_flip", "gaussian", "scaled")


def attackers(num_clients: int, fraction: float, seed: int) -> set[int]:
    n = int(round(fraction * num_clients))
    return set(random.Random(stable_seed(seed, "attackers")).sample(range(num_clients), n))


def corrupt(kind: str, u: torch.Tensor, scale: float, seed: int, server_round: int, client: int) -> torch.Tensor:
    if kind == "sign_flip":
        return -scale * u
    if kind == "scaled":
        return scale * u
    if kind == "gaussian":
        g = torch.Generator().manual_seed(stable_seed(seed, "attack", server_round, client))
        rms = float(u.double().pow(2).mean().sqrt())
        return torch.randn(u.shape, generator=g, dtype=u.dtype) * (scale * rms)
    return u
