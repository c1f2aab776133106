"""PromptFL (Guo et al. 2023): federated CoOp. Each client learns ``n_ctx`` context vectors that replace
the prompt's first words (``[SOS] ctx_1..ctx_n <class>. [EOS]``, one context for all classes, or with
``csc=true`` CoOp's class-specific context, one per class; class token at the end); the frozen text encoder turns them into class features once per step, the image side
stays frozen (cached features), and only the context travels (16 x 512 = 8,192 values for ViT-B-32).

CoOp's hyperparameters: SGD, lr 0.002, momentum 0.9, weight decay 5e-4, cosine decay (here over the
rounds: round r trains at ``lr * (1 + cos(pi (r - 1) / R)) / 2``), cross-entropy over the classes,
context initialised at random (normal, std 0.02) or from a phrase (``ctx_init='a picture of a'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config import AlgorithmConfig
from ..data.partition import stable_seed
from ..model.heads import PromptLearner
from ..fit_plan import FitPlan
from .base import CLIPAlgorithm, Participant
from .fedclip_ft import Personalized, check_personal_epochs
from .registry import register

OPTIMIZERS = ("sgd", "adam")


@dataclass
class PromptFLConfig(AlgorithmConfig):
    name: str = "promptfl"
    loss: str = "prototype"
    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # over the rounds; or constant
    n_ctx: int = 16
    ctx_init: str | None = None  # e.g. 'a picture of a' (then n_ctx = its number of tokens)
    # CoOp's class-specific context (CSC): a context of its own for each class (C x n_ctx x width values
    # travel), instead of one shared by all classes. It cannot prompt classes it did not train on.
    csc: bool = False


@register
class PromptFL(CLIPAlgorithm):
    name = "promptfl"
    config_class = PromptFLConfig

    @classmethod
    def what_trains(cls, config) -> str:
        return "a prompt context per class (CoOp, CSC)" if getattr(config, "csc", False) else "the prompt context (CoOp)"

    @property
    def scores_any_class(self) -> bool:  # type: ignore[override]
        return not self.config.csc  # a class-specific context exists for the training classes only

    @classmethod
    def check(cls, config: PromptFLConfig, bad) -> None:
        if config.optimizer not in OPTIMIZERS:
            bad("algorithm.optimizer", config.optimizer, "unknown optimiser", f"use one of {', '.join(OPTIMIZERS)}")
        if config.optimizer == "sgd" and config.optimizer_state != "reset":
            bad("algorithm.optimizer_state", config.optimizer_state, "kept optimiser state is Adam's only",
                "use algorithm.optimizer_state=reset with SGD, or algorithm.optimizer=adam")
        if config.lr_schedule not in ("cosine", "constant"):
            bad("algorithm.lr_schedule", config.lr_schedule, "unknown schedule", "use cosine or constant")
        if not isinstance(config.csc, bool):
            bad("algorithm.csc", config.csc, "must be true or false", "algorithm.csc=true (CoOp's class-specific context)")
        if not isinstance(config.n_ctx, int) or config.n_ctx < 1:
            bad("algorithm.n_ctx", config.n_ctx, "must be a whole number >= 1", "e.g. algorithm.n_ctx=16")

    def check_text_tower(self) -> None:
        from ..errors import ConfigError

        backbone = self.ctx.backbone
        model = backbone.clip.model
        if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
            raise ConfigError(f"algorithm={self.name}: the text tower of backbone {backbone.name!r} is not CLIP's "
                              "(token embedding, argmax pooling). Fix: use an OpenAI-style CLIP backbone.")

    def make_head(self):
        self.check_text_tower()
        backbone = self.ctx.backbone
        model = backbone.clip.model
        seed = stable_seed(self.cfg.seed, "prompt-context")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PromptLearner(model, backbone.tokenizer, self.ctx.prompts, self.config.n_ctx,
                                 self.config.ctx_init, csc=self.config.csc)

    def fit_plan(self, p: Participant, server_round: int, loader) -> FitPlan:
        plan = super().fit_plan(p, server_round, loader)
        if self.config.lr_schedule == "cosine":
            # This round's share of algorithm.lr: cosine decay over the rounds.
            lr_factor = 0.5 * (1 + math.cos(math.pi * (server_round - 1) / max(1, self.cfg.federation.rounds)))
            plan = replace(plan, lr_factor=lr_factor)
        return plan


@dataclass
class PromptFLFTConfig(PromptFLConfig):
    name: str = "promptfl_ft"
    personal_epochs: int = 1  # local fine-tuning epochs of each client's own copy of the context


@register
class PromptFLFT(Personalized, PromptFL):
    """PromptFL, then personalisation (like fedclip_ft): on each evaluated round every client fine-tunes
    its own copy of the global context and is evaluated with it (``val_global``/``test_global``: the
    global context's accuracy)."""

    name = "promptfl_ft"
    config_class = PromptFLFTConfig

    @classmethod
    def check(cls, config: PromptFLFTConfig, bad) -> None:
        super().check(config, bad)
        check_personal_epochs(config, bad)
