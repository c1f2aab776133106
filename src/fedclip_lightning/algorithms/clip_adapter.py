"""CLIP-Adapter (Gao et al. 2021), federated like FedCLIP: each client trains a residual two-layer MLP on
the frozen image features, ``normalize(alpha * MLP(x) + (1 - alpha) * x)`` (reduction 4, alpha 0.2, no
biases, as github.com/gaopengcuhk/CLIP-Adapter), the server averages the MLPs. Class prompts stay the
zero-shot ones; the loss is cross-entropy over the classes (``loss: prototype``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AlgorithmConfig
from ..model.heads import ResidualMLPAdapter
from .base import CLIPAlgorithm
from .registry import register


@dataclass
class CLIPAdapterConfig(AlgorithmConfig):
    name: str = "clip_adapter"
    loss: str = "prototype"
    reduction: int = 4  # hidden width d / reduction
    alpha: float = 0.2  # the residual ratio: 0 is zero-shot CLIP


@register
class CLIPAdapter(CLIPAlgorithm):
    name = "clip_adapter"
    config_class = CLIPAdapterConfig

    @classmethod
    def what_trains(cls, config) -> str:
        return "the residual MLP adapter (CLIP-Adapter)"

    @classmethod
    def check(cls, config: CLIPAdapterConfig, bad) -> None:
        if not isinstance(config.reduction, int) or config.reduction < 1:
            bad("algorithm.reduction", config.reduction, "must be a whole number >= 1", "e.g. algorithm.reduction=4")
        if not 0.0 <= config.alpha <= 1.0:
            bad("algorithm.alpha", config.alpha, "must lie in [0, 1]", "e.g. algorithm.alpha=0.2")

    def make_head(self):
        d = self.ctx.backbone.embed_dim
        if d // self.config.reduction < 1:
            from ..errors import ConfigError

            raise ConfigError(f"algorithm.reduction={self.config.reduction}: larger than the feature width {d}. "
                              f"Fix: algorithm.reduction={max(1, d // 4)} or less.")
        return ResidualMLPAdapter(d, self.config.reduction, self.config.alpha)
