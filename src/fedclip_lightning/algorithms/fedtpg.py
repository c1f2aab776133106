"""FedTPG (Qiu et al., ICLR 2024): a text-driven prompt generator, learned by the clients together. A small
network maps the text features of the task's class names to the prompt's context (cross-attention of
``n_ctx`` learned queries over the class names, then an MLP; ``model.heads.PromptGenerator``), so the
context follows the classes it is asked about and can prompt classes no client trained on
(``data.classes.split=base_novel``). Only the generator trains and travels; nothing of it is per class.
PromptFL's (CoOp's) optimiser and schedule; FedTPG's four context vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.partition import stable_seed
from ..model.heads import PromptGenerator
from .promptfl import PromptFL, PromptFLConfig
from .registry import register


@dataclass
class FedTPGConfig(PromptFLConfig):
    name: str = "fedtpg"
    n_ctx: int = 4
    hidden: int = 128  # the generator's attention and MLP width


@register
class FedTPG(PromptFL):
    name = "fedtpg"
    config_class = FedTPGConfig

    @classmethod
    def what_trains(cls, config) -> str:
        return "a prompt generator from the class names' text (FedTPG)"

    @classmethod
    def check(cls, config: FedTPGConfig, bad) -> None:
        super().check(config, bad)
        if config.csc:
            bad("algorithm.csc", config.csc, "FedTPG generates one context for the task's classes",
                "algorithm.csc=false (or algorithm=promptfl algorithm.csc=true)")
        if config.ctx_init is not None:
            bad("algorithm.ctx_init", config.ctx_init, "FedTPG's context is generated, not initialised from words",
                "algorithm.ctx_init=null")
        if not isinstance(config.hidden, int) or isinstance(config.hidden, bool) or config.hidden < 1:
            bad("algorithm.hidden", config.hidden, "must be a whole number >= 1", "e.g. algorithm.hidden=128")

    def make_head(self):
        self.check_text_tower()
        backbone = self.ctx.backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.cfg.seed, "prompt-generator"))
            # self.text: the prompt features of this run's classes (of the novel ones, scoring base-to-novel)
            return PromptGenerator(backbone.clip.model, backbone.tokenizer, self.ctx.prompts, self.text,
                                   self.config.n_ctx, self.config.hidden)
