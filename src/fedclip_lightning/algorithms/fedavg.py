"""FedAvg (McMahan et al. 2017) fine-tuning CLIP itself: the FedCLIP paper's baseline.

``trainable`` picks what trains and travels: ``all`` (both towers and
``logit_scale``, the paper's baseline), ``image`` (the image tower) or
``adapter`` (FedAvg over the FedCLIP adapter; with ``prompt: null`` this is
exactly ``fedclip``). Fine-tuning runs in one working copy of CLIP per
process, shared by that process's clients in turn; the prompt is the paper's
"a photo of a {}".
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..client import CLIPClient, FullCLIPClient, make_working_copy
from ..config import AlgorithmConfig
from ..aggregation.mean import flatten
from .base import CLIPAlgorithm, Participant
from .registry import register

TRAINABLES = ("adapter", "image", "all")


@dataclass
class FedAvgConfig(AlgorithmConfig):
    name: str = "fedavg"
    # adapter (FedCLIP's adapter), image (the image tower) or all (both towers and logit_scale).
    trainable: str = "all"
    # Overrides data.prompt (the paper's FedAvg used "a photo of a {}"); null: data.prompt.
    prompt: str | None = "a photo of a {}"


@register
class FedAvg(CLIPAlgorithm):
    name = "fedavg"
    config_class = FedAvgConfig
    side_by_side = True  # trainable=adapter: make_client and upload are FedCLIP's

    @classmethod
    def encoder_frozen(cls, config: FedAvgConfig) -> bool:
        return config.trainable == "adapter"

    @classmethod
    def what_trains(cls, config: FedAvgConfig) -> str:
        return {"adapter": "the attention adapter", "image": "the image tower",
                "all": "both towers"}.get(config.trainable, config.trainable)

    @classmethod
    def check(cls, config: FedAvgConfig, bad) -> None:
        if config.trainable not in TRAINABLES:
            bad("algorithm.trainable", config.trainable, "unknown value", f"use one of {', '.join(TRAINABLES)}")
        if config.prompt is not None and "{}" not in config.prompt:
            bad("algorithm.prompt", config.prompt, "the prompt has no '{}' for the class name",
                "e.g. algorithm.prompt='a photo of a {}'")

    @property
    def full_model(self) -> bool:
        return self.config.trainable != "adapter"

    @property
    def state_file(self) -> str:  # type: ignore[override]
        return "model" if self.full_model else "adapter"

    def prompt(self) -> str:
        return self.config.prompt or self.cfg.data.prompt

    def setup(self, ctx) -> None:
        if not self.full_model:
            super().setup(ctx)
            return
        self.ctx = ctx
        # One trainable working copy of CLIP per process, shared by this rank's clients.
        self.work = make_working_copy(ctx.backbone, self.config.trainable)
        self.tokens = ctx.backbone.tokenizer([self.prompt().format(c) for c in ctx.prompts]).to(ctx.device)
        self.template = {k: v.detach().cpu().clone() for k, v in self.work.named_parameters() if v.requires_grad}
        self.global_state = {k: v.clone() for k, v in self.template.items()}
        self._setup_adam(ctx)
        self._setup_server(ctx)
        self._setup_side_by_side(self.work)  # one at a time: the working copy of CLIP trains

    @contextmanager
    def classes_of(self, ctx):
        if not self.full_model:
            with super().classes_of(ctx):
                yield
            return
        saved = self.ctx, self.tokens
        self.ctx = ctx
        self.tokens = ctx.backbone.tokenizer([self.prompt().format(c) for c in ctx.prompts]).to(ctx.device)
        try:
            yield
        finally:
            self.ctx, self.tokens = saved

    def make_client(self, p: Participant) -> CLIPClient:
        if not self.full_model:
            return super().make_client(p)
        return FullCLIPClient(p.name, self.work, self.tokens, self.config)

    def adam_buffer(self, p: Participant) -> torch.Tensor | None:
        """Fine-tuning CLIP: Adam allocates its own moments (None); the adapter: as FedCLIP."""
        return None if self.full_model else super().adam_buffer(p)

    def upload(self, client: CLIPClient) -> Callable[[], torch.Tensor]:
        if not self.full_model:
            return super().upload(client)
        row = flatten(client.get_state()).cpu()  # the shared working copy is about to serve the next client
        return lambda: row
