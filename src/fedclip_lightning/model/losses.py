"""The clients' losses: FedCLIP's CLIP losses and FedProx's proximal term.

``I*``: adapted (or fine-tuned), normalised image features ``[B, d]``;
``T``: normalised class-prompt features ``[C, d]``; ``s = exp(logit_scale)``.

* ``contrastive`` (reference): ``L = s * I* @ T[y]^T`` over the batch,
  ``loss = (CE(L, arange B) + CE(L^T, arange B)) / 2``. Same-class images in a
  batch count as negatives. Batches of one image are the caller's to skip
  (the reference does).
* ``prototype``: ``CE(s * I* @ T^T, y)`` over all classes.

``clip_loss`` picks the implementation. With frozen prompts and a fixed
scale (a Python number: FedCLIP's adapter on a frozen CLIP) it is an
``autograd.Function`` whose forward also computes the gradient with respect to
``I*`` in closed form (the softmaxes it needs are those of the loss itself),
and whose backward hands it on. When the prompts or the scale train (CLIP
itself fine-tuned), or when the caller asks for ``plain=True``, it is the same
formula in plain differentiable operations and autograd derives every
gradient. Both give bitwise the same loss; the gradients agree to float
rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["LOSSES", "ContrastiveLoss", "PrototypeLoss", "clip_loss", "proximal_term"]


class ContrastiveLoss(torch.autograd.Function):
    """Symmetric in-batch CLIP loss against each image's own prompt; ``apply(feats, text, y, scale)``.

    With ``L = s * I* T[y]^T`` (B x B): ``dL = (softmax_rows(L) + softmax_cols(L) - 2 I) / 2B`` and
    ``dI* = s * dL T[y]``. ``text``, ``y`` and ``scale`` get no gradient.
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        b = y.numel()
        t = text[y]
        logits = scale * feats @ t.T
        targets = torch.arange(b, device=y.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        if ctx.needs_input_grad[0]:
            g = logits.softmax(dim=1) + logits.softmax(dim=0)
            g.diagonal().sub_(2.0)
            ctx.save_for_backward((g @ t).mul_(scale / (2 * b)))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_feats,) = ctx.saved_tensors
        return grad_feats * grad_loss, None, None, None  # grad_loss is 1 for loss.backward(): exact

    @staticmethod
    def plain(scale, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same loss from differentiable operations (gradients for ``text`` and ``scale`` too)."""
        logits = scale * feats @ text[y].T
        targets = torch.arange(y.numel(), device=y.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class PrototypeLoss(torch.autograd.Function):
    """Cross-entropy over all class prompts; ``apply(feats, text, y, scale)``.

    ``dlogits = (softmax(logits) - onehot(y)) / B`` and ``dI* = s * dlogits T``.
    ``text``, ``y`` and ``scale`` get no gradient.
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        b = y.numel()
        logits = scale * feats @ text.T
        loss = F.cross_entropy(logits, y)
        if ctx.needs_input_grad[0]:
            g = logits.softmax(dim=1)
            g[torch.arange(b, device=y.device), y] -= 1.0
            ctx.save_for_backward((g @ text).mul_(scale / b))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_feats,) = ctx.saved_tensors
        return grad_feats * grad_loss, None, None, None

    @staticmethod
    def plain(scale, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scale * feats @ text.T, y)


LOSSES: dict[str, type[torch.autograd.Function]] = {"contrastive": ContrastiveLoss, "prototype": PrototypeLoss}


def clip_loss(kind: str, scale: float | torch.Tensor, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor,
              *, plain: bool = False) -> torch.Tensor:
    """The ``kind`` loss of ``feats`` (``[B, d]``) against the prompt features ``text`` (``[C, d]``), labels ``y``.

    The ``autograd.Function`` when ``scale`` is a Python number and ``text`` does not require grad
    (the gradient with respect to ``feats`` written out); plain differentiable operations otherwise,
    or always with ``plain=True``. A tensor ``scale`` always takes the plain operations, with or
    without grad: that is the fine-tuned-CLIP case, whose gradients have always been autograd's.
    """
    try:
        fn = LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss {kind!r}: known losses are {sorted(LOSSES)}") from None
    if plain or isinstance(scale, torch.Tensor) or text.requires_grad:
        return fn.plain(scale, feats, text, y)
    return fn.apply(feats, text, y, float(scale))


def proximal_term(mu: float, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor] | None) -> torch.Tensor | float:
    """FedProx: ``(mu / 2) * sum_k ||w_k - w_global_k||^2`` over the trainable tensors."""
    if mu == 0 or anchor is None:
        return 0.0
    return (mu / 2) * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
