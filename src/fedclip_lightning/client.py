"""Clients: LightningModules that wrap the frozen CLIP and train what their algorithm trains.

The backbone and the class-prompt text features are *not* submodules: every
client of a process points at the same objects, so a client's own state is just
what trains (an adapter, or the shared working copy of CLIP for fine-tuning),
and ``state_dict()`` holds nothing else. A client knows nothing of rounds or of
other clients: its algorithm (``fedclip_lightning.algorithms``) decides what it
starts from and what becomes of its result, and ``local_fit`` (Fabric) runs
its hooks with that fit's ``FitPlan`` (epochs, lr factor, FedProx's anchor,
Adam's block or kept state): per-round settings are arguments, never
attributes of the client.

Losses (``I*`` adapted, normalised image features; ``T`` normalised prompt
features; ``s = exp(logit_scale)`` of the frozen model), from
``model.losses.LOSSES``:

* ``contrastive`` (reference): ``L = s * I* @ T[y]^T`` over the batch,
  ``loss = (CE(L, arange B) + CE(L^T, arange B)) / 2``; batches of one image
  are skipped. Same-class images in a batch count as negatives.
* ``prototype``: ``CE(s * I* @ T^T, y)`` over all classes.

Prediction is ``argmax_c I* @ T_c`` in both cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F

from .config import AlgorithmConfig
from .model.adapter import AttentionAdapter
from .model.backbone import Backbone
from .model.losses import clip_loss, proximal_term
from .optim import build_optimizer

if TYPE_CHECKING:
    from .fit_plan import FitPlan


def scores(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``feats [B, d]`` against the class features: ``feats @ T^T`` for ``T [C, d]``, or each image against its own
    (``[B, C, d]``, a conditioned head's) -> ``[B, C]``."""
    return torch.einsum("bd,bcd->bc", feats, text) if text.dim() == 3 else feats @ text.T


class CLIPClient(L.LightningModule):
    """What every client shares: the CLIP losses, the evaluation step, Adam, and the tensors that travel.

    A subclass says how it makes features (``features``), what it compares them
    with (``class_features``: one normalised prompt feature per class), its
    ``scale`` (``exp(logit_scale)``) and which tensors train (``trainable``).
    What a local fit is run with (Adam's block or kept state, the lr factor,
    FedProx's anchor) comes with that fit's ``FitPlan``, not as attributes.
    """

    def __init__(self, name: str, config: AlgorithmConfig, num_classes: int):
        super().__init__()
        self.client_name = name
        self.config = config  # the algorithm's config (algorithm.*)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``exp(logit_scale) * I* @ T^T`` (each image against its own class features where the
        head conditions them on the image: CoCoOp)."""
        feats = self.features(x)
        return scores(self.scale * feats, self.class_features_for(feats))

    def class_features_for(self, feats: torch.Tensor) -> torch.Tensor:
        """The class features the images ``feats [B, d]`` are scored against: ``[C, d]``, the same for every
        image, or ``[B, C, d]``, each image's own (a head with ``conditioned``, CoCoOp's)."""
        return self.class_features()

    # -- Lightning hooks -----------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                      plan: FitPlan | None = None) -> dict[str, torch.Tensor] | None:
        """The loss of a batch (plus FedProx's proximal term where ``plan`` has an anchor) and its
        number of correct predictions; None for a batch of one."""
        x, y = batch
        if y.numel() < 2:  # the reference skips batches of one
            return None
        feats = self.features(x)
        text = self.class_features_for(feats)
        if text.dim() == 3:  # each image's own class features (CoCoOp): cross-entropy over the classes
            loss = F.cross_entropy(self.scale * scores(feats, text), y)
        else:
            loss = clip_loss(self.config.loss, self.scale, feats, text, y)
        if plan is not None and plan.anchor is not None:
            loss = loss + proximal_term(plan.mu, self.trainable(), plan.anchor)
        with torch.no_grad():
            correct = (scores(feats, text).argmax(dim=-1) == y).sum()
        return {"loss": loss, "correct": correct}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return {
            "loss_sum": F.cross_entropy(logits, y, reduction="sum"),
            "preds": logits.argmax(dim=-1),
            "target": y,
        }

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self, plan: FitPlan) -> torch.optim.Optimizer:
        """``optim.build_optimizer`` over ``trainable()``: Adam (SGD where the algorithm says so) at
        ``plan.lr_factor`` times its lr, a new state laid out in ``plan.adam_buffer`` or
        ``plan.optimizer_state`` (a kept ``optimizer.state_dict()``) continued where its moments
        already live."""
        params = self.trainable()
        if not params:
            raise RuntimeError(f"client {self.client_name!r} has nothing to optimise")
        return build_optimizer(params.values(), self.config, plan)

    # -- federation interface ------------------------------------------------
    def get_state(self) -> dict[str, torch.Tensor]:
        """A copy of the tensors that train and travel."""
        return {k: v.detach().clone() for k, v in self.trainable().items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        if state.keys() != params.keys():
            raise KeyError(f"state keys {sorted(state)[:3]}... do not match the trainable tensors of this client")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


class AdapterClient(CLIPClient):
    """A client that trains a head on the shared frozen backbone: FedCLIP's attention adapter by default,
    or any head of ``model.heads`` (CLIP-Adapter, a linear probe, CoOp's context); ``head=None`` is
    zero-shot CLIP. A head may replace the class features (``head.class_features(text)``)."""

    def __init__(self, name: str, backbone: Backbone, text_features: torch.Tensor, config: AlgorithmConfig,
                 head: torch.nn.Module | None | str = "adapter"):
        super().__init__(name, config, int(text_features.shape[0]))
        # Shared by reference, deliberately not registered as submodules/buffers.
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "text_features", text_features)
        self.adapter = AttentionAdapter(backbone.embed_dim) if head == "adapter" else head

    @property
    def scale(self) -> float:
        return self.backbone.logit_scale

    def class_features(self) -> torch.Tensor:
        if self.adapter is not None and hasattr(self.adapter, "class_features"):
            return self.adapter.class_features(self.text_features)
        return self.text_features

    def class_features_for(self, feats: torch.Tensor) -> torch.Tensor:
        if getattr(self.adapter, "conditioned", False):
            return self.adapter.class_features_for(feats)
        return self.class_features()

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.adapter.named_parameters()) if self.adapter is not None else {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted, normalised features from images ``[B,3,H,W]`` or frozen features ``[B,d]``."""
        if x.dim() == 4:
            with torch.no_grad():
                x = self.backbone.image_features(x)
        if self.adapter is None:  # zero-shot CLIP
            return F.normalize(x.float(), dim=-1)
        return self.adapter(x)


class FullCLIPClient(CLIPClient):
    """A client that fine-tunes CLIP itself (the paper's FedAvg / FedProx baselines).

    ``trainable`` picks the tensors that train and travel: ``image`` (the image
    tower) or ``all`` (every parameter, ``logit_scale`` included: 151,277,313
    for ViT-B-32, the paper's count). The towers stay in eval mode (BatchNorm
    statistics frozen). Every client of a process works in one shared working
    copy of the model: before a client's turn its algorithm loads the global
    weights into it, so a process holds one trainable copy of CLIP, not one per
    client. The prompt features come from the text tower in every step (it may
    be training).
    """

    def __init__(self, name: str, model: torch.nn.Module, tokens: torch.Tensor, config: AlgorithmConfig):
        super().__init__(name, config, int(tokens.shape[0]))
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
        from .model.backbone import input_dtype

        return F.normalize(self.model.encode_image(x.to(input_dtype(self.model.visual))).float(), dim=-1)


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
