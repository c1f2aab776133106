"""A federated linear probe: class weights on the frozen, normalised image features, initialised with
the class-prompt features (round 0 is zero-shot CLIP), trained with cross-entropy and averaged by the
server like FedCLIP's adapter. ``C x d`` parameters (no bias)."""

from __future__ import annotations

from ..model.heads import LinearProbe
from .base import CLIPAlgorithm
from .registry import register


@register
class LinearProbeAlgorithm(CLIPAlgorithm):
    name = "linear_probe"
    scores_any_class = False  # a weight per training class

    @classmethod
    def what_trains(cls, config) -> str:
        return "a linear head (zero-shot initialised)"

    def make_head(self):
        return LinearProbe(self.text)
