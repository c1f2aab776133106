"""Zero-shot CLIP: the frozen model and the class prompts, nothing trained, evaluated once (round 0)."""

from __future__ import annotations

from .base import CLIPAlgorithm
from .registry import register


@register
class ZeroShot(CLIPAlgorithm):
    name = "zeroshot"
    trains = False
    communicates = False

    def make_head(self):
        return None

    @classmethod
    def what_trains(cls, config) -> str:
        return "nothing"
