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
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from .config import AlgorithmConfig
from .model.adapter import AttentionAdapter
from .model.backbone import Backbone


def make_adam(params, a: AlgorithmConfig) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay (torch.optim.Adam's), fused where this torch supports it.

    The fused kernel computes the same update in one pass over the parameters:
    on the adapter's small matrices it halves the time of a training step.
    """
    params = list(params)
    kwargs = dict(lr=a.lr, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.Adam(params, **kwargs)


class ClientModule(L.LightningModule):
    def __init__(self, name: str, backbone: Backbone, text_features: torch.Tensor, algorithm: AlgorithmConfig,
                 use_adapter: bool = True):
        super().__init__()
        self.client_name = name
        self.algorithm = algorithm
        # Shared by reference, deliberately not registered as submodules/buffers.
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "text_features", text_features)
        self.adapter = AttentionAdapter(backbone.embed_dim) if use_adapter else None
        # Adam state between rounds (optimizer_state=keep), kept on the CPU.
        self.optimizer_state: dict[str, Any] | None = None
        # Metrics live with the client (created once; their state is not part of state_dict()).
        num_classes = text_features.shape[0]
        self.accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False)
        self.loss_sum = SumMetric(sync_on_compute=False)

    # -- model ---------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted, normalised features from images ``[B,3,H,W]`` or frozen features ``[B,d]``."""
        raw = self.backbone.image_features(x) if x.dim() == 4 else x.float()
        if self.adapter is None:  # zero-shot CLIP
            return F.normalize(raw, dim=-1)
        return self.adapter(raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``exp(logit_scale) * I* @ T^T``."""
        return self.backbone.logit_scale * self.features(x) @ self.text_features.T

    # -- Lightning hooks -----------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor] | None:
        x, y = batch
        if y.numel() < 2:  # the reference skips batches of one
            return None
        feats = self.features(x)
        scale = self.backbone.logit_scale
        if self.algorithm.loss == "contrastive":
            logits = scale * feats @ self.text_features[y].T
            targets = torch.arange(y.numel(), device=y.device)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        else:
            loss = F.cross_entropy(scale * feats @ self.text_features.T, y)
        with torch.no_grad():
            preds = (feats @ self.text_features.T).argmax(dim=-1)
        return {"loss": loss, "preds": preds, "target": y}

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
        a = self.algorithm
        if self.adapter is None:
            raise RuntimeError("zero-shot clients have nothing to optimise")
        return make_adam(self.adapter.parameters(), a)

    # -- federation interface ------------------------------------------------
    def get_adapter_state(self) -> dict[str, torch.Tensor]:
        assert self.adapter is not None
        return {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}

    def set_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        assert self.adapter is not None
        self.adapter.load_state_dict(state)
