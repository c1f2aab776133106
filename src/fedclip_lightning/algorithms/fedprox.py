"""FedProx (Li et al. 2020): FedAvg plus ``(mu/2) ||w - w_global||^2`` in each client's loss."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..fit_plan import FitPlan
from .base import Participant
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

    def fit_plan(self, p: Participant, server_round: int, loader) -> FitPlan:
        plan = super().fit_plan(p, server_round, loader)
        if self.config.mu > 0:
            # This round's global weights, on the training device, anchor the proximal term.
            plan = replace(plan, anchor={k: v.to(self.ctx.device) for k, v in self.global_state.items()},
                           mu=self.config.mu)
        return plan
