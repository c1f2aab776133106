"""FedProx (Li et al. 2020): FedAvg plus ``(mu/2) ||w - w_global||^2`` in each client's loss."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ClientResult, Participant
from .fedavg import FedAvg, FedAvgConfig
from .registry import register


@dataclass
class FedProxConfig(FedAvgConfig):
    name: str = "fedprox"
    mu: float = 0.01  # the proximal coefficient; 0 is FedAvg


@register
class FedProx(FedAvg):
    name = "fedprox"
    config_class = FedProxConfig

    @classmethod
    def check(cls, config: FedProxConfig, bad) -> None:
        super().check(config, bad)
        if config.mu < 0:
            bad("algorithm.mu", config.mu, "the FedProx coefficient must be >= 0", "e.g. algorithm.mu=0.01")

    def warnings(self) -> list[str]:
        return ["algorithm.mu=0: FedProx without its proximal term is FedAvg"] if self.config.mu == 0 else []

    def fit_client(self, client, p: Participant, rnd: int) -> ClientResult:
        if self.config.mu > 0:
            # This round's global weights, on the training device, anchor the proximal term.
            client.anchor = {k: v.to(self.ctx.device) for k, v in self.global_state.items()}
            client.mu = self.config.mu
        try:
            return super().fit_client(client, p, rnd)
        finally:
            client.anchor = None
