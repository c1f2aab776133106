"""FedCLIP (Lu et al., arXiv 2302.13485): each client trains the attention adapter on the frozen CLIP;
the server averages the adapters (``federation.aggregation``: uniform, as the reference, or by samples)."""

from __future__ import annotations

from .base import AdapterAlgorithm
from .registry import register


@register
class FedCLIP(AdapterAlgorithm):
    name = "fedclip"
