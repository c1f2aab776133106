"""CoCoOp (Zhou et al., CVPR 2022), federated: CoOp's context made conditional on each image. A small
meta-net (``e -> e/16 -> width``) turns an image's features into a shift of the context, so every image gets
prompts, and class features, of its own (``model.heads.ConditionalPromptLearner``); the context and the meta-net
train and travel (35,360 values for ViT-B/32), nothing of them per class, so they prompt classes no client trained
on (``data.classes.split=base_novel``, the protocol CoCoOp introduced).

CoCoOp's settings: the context starts from ``'a photo of a'`` (four vectors), SGD at lr 0.002 with CoOp's
momentum, weight decay and cosine schedule (PromptFL's), cross-entropy over the classes. Unlike CoCoOp's
batch of one image, the run's batch size is used (``data.batch_size``): the text tower runs ``batch x classes``
prompts a step, in training and in evaluation, so a step costs about that many class prompts' text passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.partition import stable_seed
from ..model.heads import ConditionalPromptLearner
from .promptfl import PromptFL, PromptFLConfig
from .registry import register


@dataclass
class CoCoOpConfig(PromptFLConfig):
    name: str = "cocoop"
    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"  # CoCoOp's; null: CoOp's random context of n_ctx vectors


@register
class CoCoOp(PromptFL):
    name = "cocoop"
    config_class = CoCoOpConfig

    @classmethod
    def what_trains(cls, config) -> str:
        return "a prompt context shifted by a meta-net of each image (CoCoOp)"

    @classmethod
    def check(cls, config: CoCoOpConfig, bad) -> None:
        super().check(config, bad)
        if config.csc:
            bad("algorithm.csc", config.csc, "CoCoOp shifts one context shared by the classes",
                "algorithm.csc=false (or algorithm=promptfl algorithm.csc=true)")
        if config.loss != "prototype":
            bad("algorithm.loss", config.loss, "CoCoOp scores each image against its own class features, so "
                "only the cross-entropy over the classes applies", "algorithm.loss=prototype")

    # Prompts a training step runs through the text tower with gradients, above which the run is warned: their
    # activations are kept for the backward pass (ViT-B's text tower: about 2 MB a prompt, fp32).
    PROMPTS_WARN = 4096

    def warnings(self) -> list[str]:
        out = super().warnings()
        batch, classes = self.cfg.data.batch_size, len(self.ctx.prompts)
        n = batch * classes
        if n > self.PROMPTS_WARN:
            out.append(f"CoCoOp runs data.batch_size x classes = {batch} x {classes} = {n:,} prompts through the "
                       "text tower in each training step, their activations kept for the backward pass (CoCoOp's "
                       "own batch is one image): if memory runs out, lower data.batch_size")
        return out

    def make_head(self):
        self.check_text_tower()
        backbone = self.ctx.backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.cfg.seed, "prompt-context"))
            return ConditionalPromptLearner(backbone.clip.model, backbone.tokenizer, self.ctx.prompts,
                                            backbone.embed_dim, self.config.n_ctx, self.config.ctx_init)
