"""What the server does with a round's client rows, as ``federation.*`` configures it.

With every option at its default (``aggregator=mean``, ``server_optimizer=none``,
no attack, no DP) the new global model is the clients' weighted mean, streamed
row by row in fixed client order: the reference, bitwise. Otherwise the server
works on updates ``u_k = w_k - w``: a simulated attacker corrupts its own
(``attacks.py``), DP clips each (and a client adds its noise: ``privacy.py``),
the rule (``robust.py``, or the weighted mean) makes one update of them (DP on
the server adds its noise to the sum), and the server optimiser
(``server_opt.py``: a built-in or a registered plugin, by name) takes its step
from ``w``. Every rank computes the same, from the same rows and the same
seeded noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..data.partition import stable_seed
from ..errors import ConfigError
from .attacks import attackers, corrupt
from .privacy import Privacy, clip
from .robust import make_rule
from .server_opt import make_server_optimizer
from .mean import aggregate_rows

log = logging.getLogger(__name__)


class ServerUpdate:
    def __init__(self, fed, seed: int, num_clients: int, rounds: int, clients_noise: bool = False):
        """``clients_noise``: the clients live elsewhere (a deployment) and, with local DP, clip and noise their
        own updates before they leave them (``noise_update``): the server takes them as they come."""
        self.fed, self.seed, self.clients_noise = fed, seed, clients_noise
        self.rule = make_rule(fed)
        so = fed.server_optimizer
        self.optimizer = make_server_optimizer(so.name, so.lr, so.beta1, so.beta2, so.tau)
        self.privacy = Privacy(fed, rounds) if fed.privacy.mode != "none" else None
        self.attackers = attackers(num_clients, fed.attack.fraction, seed) if fed.attack.name != "none" else set()
        if fed.attack.name != "none" and not self.attackers:
            raise ConfigError(f"federation.attack.fraction={fed.attack.fraction:g}: of {num_clients} clients that "
                              f"rounds to 0 attackers, so federation.attack.name={fed.attack.name} would change nothing. "
                              f"Fix: set federation.attack.fraction={1 / num_clients:.2f} or more (one attacker).")
        m = fed.aggregator.multi_krum_m
        if fed.aggregator.name == "multi_krum" and m is not None and m > num_clients:
            raise ConfigError(f"federation.aggregator.multi_krum_m={m}: more rows than the {num_clients} clients, "
                              "so multi-Krum would average every row (the plain mean). "
                              f"Fix: set federation.aggregator.multi_krum_m to at most {num_clients} (null: K - krum_f).")
        self.plain = self.optimizer.plain and self.privacy is None and not self.attackers

    def warnings(self) -> list[str]:
        out = []
        if not getattr(self.rule, "uses_weights", True) and self.fed.aggregation == "samples":
            out.append(f"federation.aggregator.name={self.fed.aggregator.name} cannot use sample weights: "
                       "federation.aggregation=samples is ignored")
        if self.attackers:
            out.append(f"simulated attack {self.fed.attack.name!r} (scale {self.fed.attack.scale:g}) by "
                       f"client(s) {sorted(self.attackers)}")
        if self.privacy is not None:
            out.append(f"client-level DP ({self.fed.privacy.mode}): clip {self.fed.privacy.clip:g}, noise multiplier "
                       f"{self.privacy.sigma:.4g}, delta {self.fed.privacy.delta:g}; " +
                       ("each node clips its update and adds noise from its operating system's entropy before the "
                        "update leaves it" if self.clients_noise and self.privacy.mode == "client" else
                        "noise from the operating system's entropy (federation.privacy.secure)" if self.privacy.secure else
                        "noise from a stream seeded by the config: a simulation, reproducible by anyone with the "
                        "config (federation.privacy.secure=true draws it from the OS's entropy)"))
        return out

    def __call__(self, fabric, server_round: int, order: list[int], row_of: Callable[[int], torch.Tensor | None],
                 weights: Sequence[float], w_of: Callable[[], torch.Tensor], width: int) -> torch.Tensor:
        """The new flat global weights from the old ones (``w_of()``) and the rows of the clients in ``order``."""
        if self.plain:
            return aggregate_rows(fabric, self.rule, row_of, order, weights, width)
        w = w_of()
        if self.privacy is not None:
            weights = [1.0 / len(order)] * len(order)  # DP-FedAvg: uniform, over the clients that sent
        delta = aggregate_rows(fabric, self.rule, row_of, order, weights, width,
                               transform=lambda i, row: self._update(server_round, i, row, w))
        if self.privacy is not None and self.privacy.mode == "server":
            g = torch.Generator().manual_seed(stable_seed(self.seed, "dp-server", server_round))
            delta = delta + self.privacy.noise(delta, g) / len(order)
        return self.optimizer.step(w, delta)

    def _update(self, server_round: int, client: int, row: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        u = row - w
        if client in self.attackers:
            u = corrupt(self.fed.attack.name, u, self.fed.attack.scale, self.seed, server_round, client)
        if self.privacy is not None and not (self.privacy.mode == "client" and self.clients_noise):
            u = clip(u, self.privacy.c)
            if self.privacy.mode == "client":
                g = torch.Generator().manual_seed(stable_seed(self.seed, "dp-client", server_round, client))
                u = u + self.privacy.noise(u, g)
        return u

    def metrics(self, rounds_run: int) -> dict[str, float]:
        if self.privacy is None:
            return {}
        return {"privacy/epsilon": self.privacy.epsilon(rounds_run), "privacy/delta": self.privacy.delta,
                "privacy/noise_multiplier": self.privacy.sigma}

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state()}

    def load(self, state: dict | None) -> None:
        self.optimizer.load((state or {}).get("optimizer"))


def noise_update(fed, rounds: int, row: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Local DP on a client of a deployment: its row ``w + u`` with ``u`` clipped to ``federation.privacy.clip``
    and Gaussian noise of std ``sigma * C`` from the operating system's entropy added, before it leaves."""
    privacy = Privacy(fed, rounds)
    privacy.secure = True  # never a stream the config could reproduce, on a real client
    u = clip(row - w, privacy.c)
    return w + u + privacy.noise(u, None)
