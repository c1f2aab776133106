"""A FedCLIP client: a LightningModule holding its own adapter and a shared
reference to the frozen backbone.

The backbone and the class-prompt text features are *not* submodules: every
client of a process points at the same objects, so a client's own state is just
its adapter (and, with ``optimizer_state=keep``, its Adam state), and
``state_dict()`` holds adapter tensors only. The client knows nothing of rounds
or of other clients; the orchestrator drives it.

Losses (``I*`` adapted, normalised image features; ``T`` normalised prompt
features; ``s = exp(logit_scale)`` of the frozen model):

* ``contrastive`` (reference): ``L = s * I* @ T[y]^T`` over the batch,
  ``loss = (CE(L, arange B) + CE(L^T, arange B)) / 2``; batches of one image
  are skipped. Same-class images in a batch count as negatives.
* ``prototype``: ``CE(s * I* @ T^T, y)`` over all classes.

Prediction is ``argmax_c I* @ T_c`` in both cases.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from .config import AlgorithmConfig
from .model.adapter import AttentionAdapter
from .model.backbone import Backbone
from .optim import make_adam


def clip_loss(kind: str, scale: float, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``contrastive``: symmetric in-batch CLIP loss against each image's own prompt;
    ``prototype``: cross-entropy over all class prompts."""
    if kind == "contrastive":
        logits = scale * feats @ text[y].T
        targets = torch.arange(y.numel(), device=y.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    return F.cross_entropy(scale * feats @ text.T, y)


@torch.no_grad()
def clip_loss_and_grad(kind: str, scale: float, feats: torch.Tensor, text: torch.Tensor,
                       y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clip_loss`` (the same value) and its gradient with respect to ``feats``, written out.

    ``contrastive``: with ``L = s * I* T[y]^T`` (B x B),
    ``dL = (softmax_rows(L) + softmax_cols(L) - 2 I) / 2B`` and ``dI* = s * dL T[y]``.
    ``prototype``: ``dlogits = (softmax(logits) - onehot(y)) / B`` and ``dI* = s * dlogits T``.
    """
    b = y.numel()
    if kind == "contrastive":
        t = text[y]
        logits = scale * feats @ t.T
        targets = torch.arange(b, device=y.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        g = logits.softmax(dim=1) + logits.softmax(dim=0)
        g.diagonal().sub_(2.0)
        return loss, (g @ t).mul_(scale / (2 * b))
    logits = scale * feats @ text.T
    loss = F.cross_entropy(logits, y)
    g = logits.softmax(dim=1)
    g[torch.arange(b, device=y.device), y] -= 1.0
    return loss, (g @ text).mul_(scale / b)


def proximal_term(mu: float, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor] | None) -> torch.Tensor | float:
    """FedProx: ``(mu / 2) * sum_k ||w_k - w_global_k||^2`` over the trainable tensors."""
    if mu == 0 or anchor is None:
        return 0.0
    return (mu / 2) * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())


class _CLIPClient(L.LightningModule):
    """What every client shares: the CLIP losses, evaluation, Adam, and the tensors that travel.

    A subclass says how it makes features (``features``), what it compares them
    with (``class_features``: one normalised prompt feature per class), its
    ``scale`` (``exp(logit_scale)``) and which tensors train (``trainable``).
    """

    def __init__(self, name: str, algorithm: AlgorithmConfig, num_classes: int):
        super().__init__()
        self.client_name = name
        self.algorithm = algorithm
        self.num_classes = num_classes
        # Adam state between rounds (optimizer_state=keep), kept on the CPU.
        self.optimizer_state: dict[str, Any] | None = None
        # FedProx: the global weights of this round, on the training device (None: no proximal term).
        self.prox_anchor: dict[str, torch.Tensor] | None = None
        # local / fedclip_ft: the client's own trained tensors between rounds, on the CPU.
        self.own_state: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``exp(logit_scale) * I* @ T^T``."""
        return self.scale * self.features(x) @ self.class_features().T

    # -- Lightning hooks -----------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor] | None:
        x, y = batch
        if y.numel() < 2:  # the reference skips batches of one
            return None
        feats, text = self.features(x), self.class_features()
        loss = clip_loss(self.algorithm.loss, self.scale, feats, text, y)
        if self.prox_anchor is not None:
            loss = loss + proximal_term(self.algorithm.mu, self.trainable(), self.prox_anchor)
        with torch.no_grad():
            preds = (feats @ text.T).argmax(dim=-1)
        return {"loss": loss, "preds": preds, "target": y}

    def fit_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward and backward of one training batch: sets ``.grad`` of the trainable tensors and returns
        ``(loss, number correct)``, or None for a skipped batch. Here: ``training_step`` and autograd."""
        out = self.training_step((x, y), 0)
        if out is None:
            return None
        for p in self.trainable().values():
            p.grad = None
        out["loss"].backward()
        return out["loss"].detach(), (out["preds"] == out["target"]).sum()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return {
            "loss_sum": F.cross_entropy(logits, y, reduction="sum"),
            "preds": logits.argmax(dim=-1),
            "target": y,
        }

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.trainable()
        if not params:
            raise RuntimeError(f"client {self.client_name!r} has nothing to optimise")
        return make_adam(params.values(), self.algorithm)

    # -- federation interface ------------------------------------------------
    def get_state(self) -> dict[str, torch.Tensor]:
        """The tensors that train and travel."""
        return {k: v.detach().clone() for k, v in self.trainable().items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        if state.keys() != params.keys():
            raise KeyError(f"state keys {sorted(state)[:3]}... do not match the trainable tensors of this client")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


class ClientModule(_CLIPClient):
    """A FedCLIP client: its own attention adapter on the shared frozen backbone (no adapter: zero-shot)."""

    def __init__(self, name: str, backbone: Backbone, text_features: torch.Tensor, algorithm: AlgorithmConfig,
                 use_adapter: bool = True):
        super().__init__(name, algorithm, int(text_features.shape[0]))
        # Shared by reference, deliberately not registered as submodules/buffers.
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "text_features", text_features)
        self.adapter = AttentionAdapter(backbone.embed_dim) if use_adapter else None

    @property
    def scale(self) -> float:
        return self.backbone.logit_scale

    def class_features(self) -> torch.Tensor:
        return self.text_features

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.adapter.named_parameters()) if self.adapter is not None else {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted, normalised features from images ``[B,3,H,W]`` or frozen features ``[B,d]``."""
        raw = self.backbone.image_features(x) if x.dim() == 4 else x.float()
        if self.adapter is None:  # zero-shot CLIP
            return F.normalize(raw, dim=-1)
        return self.adapter(raw)

    def fit_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``training_step`` + backward with the adapter's and the loss's gradients written out (no autograd
        graph): the same loss, gradients equal to autograd's to float rounding, in half the time. Both the
        cached-feature and the image path come here, so they compute the same thing. FedProx's proximal
        term goes through autograd."""
        if self.adapter is None or self.prox_anchor is not None:
            return super().fit_batch(x, y)
        if y.numel() < 2:  # the reference skips batches of one
            return None
        with torch.no_grad():
            raw = self.backbone.image_features(x) if x.dim() == 4 else x
        feats, saved = self.adapter.forward_train(raw)
        text = self.text_features
        loss, grad = clip_loss_and_grad(self.algorithm.loss, self.scale, feats, text, y)
        self.adapter.backward(saved, grad)
        return loss, ((feats @ text.T).argmax(dim=-1) == y).sum()


class FullCLIPClient(_CLIPClient):
    """A client that fine-tunes CLIP itself (the paper's FedAvg / FedProx baselines).

    ``algorithm.trainable`` picks the tensors that train and travel: ``image``
    (the image tower) or ``all`` (every parameter, ``logit_scale`` included:
    151,277,313 for ViT-B-32, the paper's count). The towers stay in eval mode
    (BatchNorm statistics frozen). Every client of a process works in one
    shared working copy of the model: before a client's turn the orchestrator
    loads the global weights into it, so a process holds one trainable copy of
    CLIP, not one per client. The prompt features come from the text tower in
    every step (it may be training).
    """

    def __init__(self, name: str, model: torch.nn.Module, tokens: torch.Tensor, algorithm: AlgorithmConfig):
        super().__init__(name, algorithm, int(tokens.shape[0]))
        object.__setattr__(self, "model", model)  # the shared working copy, not a submodule
        object.__setattr__(self, "tokens", tokens)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.float().exp()

    def class_features(self) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokens).float(), dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.visual.parameters()).dtype
        return F.normalize(self.model.encode_image(x.to(dtype)).float(), dim=-1)


def make_working_copy(backbone: Backbone, trainable: str) -> torch.nn.Module:
    """A trainable copy of the backbone's CLIP (fp32), on its device, in eval mode.

    ``image``: the image tower trains; ``all``: every parameter (both towers and ``logit_scale``).
    """
    import copy

    model = copy.deepcopy(backbone.clip.model).float()
    model.eval()
    model.requires_grad_(False)
    if trainable == "image":
        model.visual.requires_grad_(True)
    elif trainable == "all":
        model.requires_grad_(True)
    else:
        raise ValueError(f"make_working_copy needs trainable=image|all, not {trainable!r}")
    return model
