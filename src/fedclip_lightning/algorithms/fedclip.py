"""FedCLIP (Lu et al., arXiv 2302.13485): each client trains the attention adapter on the frozen CLIP;
the server averages the adapters (``federation.aggregation``: uniform, as the reference, or by samples).
``algorithm.adapter_hidden`` shrinks the adapter (the size ablation; null: the paper's)."""

from __future__ import annotations

from .base import CLIPAlgorithm, AdapterConfig, check_adapter_hidden
from .registry import register


@register
class FedCLIP(CLIPAlgorithm):
    name = "fedclip"
    config_class = AdapterConfig

    @classmethod
    def check(cls, config: AdapterConfig, bad) -> None:
        check_adapter_hidden(config, bad)
