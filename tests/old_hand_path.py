"""The project's previous hand-written training path, verbatim: the reference that the autograd Functions
must match bitwise (``tests/test_step_functions.py``).

``AttentionAdapter.forward_train`` / ``backward`` and ``client.clip_loss_and_grad`` wrote the gradients
out by hand, outside autograd; the package no longer has them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedclip_lightning.model.adapter import AttentionAdapter


def old_forward(adapter: AttentionAdapter, features: torch.Tensor) -> torch.Tensor:
    """The previous AttentionAdapter.forward (plain ops)."""
    features = features.float()
    return F.normalize(torch.softmax(adapter.fc2(torch.tanh(adapter.fc1(features))), dim=-1) * features, dim=-1)


@torch.no_grad()
def old_forward_train(adapter: AttentionAdapter, features: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    x = features.float()
    h = torch.tanh(adapter.fc1(x))
    a = torch.softmax(adapter.fc2(h), dim=-1)
    u = a * x
    n = u.norm(dim=-1, keepdim=True).clamp_min_(1e-12)
    f = u / n
    return f, (x, h, a, f, n)


@torch.no_grad()
def old_backward(adapter: AttentionAdapter, saved: tuple, grad_features: torch.Tensor) -> None:
    x, h, a, f, n = saved
    du = (grad_features - f * (f * grad_features).sum(-1, keepdim=True)).div_(n)
    da = du.mul_(x)
    dz2 = a * (da - (a * da).sum(-1, keepdim=True))
    adapter.fc2.weight.grad = dz2.T @ h
    adapter.fc2.bias.grad = dz2.sum(0)
    dz1 = (dz2 @ adapter.fc2.weight).mul_(1 - h * h)
    adapter.fc1.weight.grad = dz1.T @ x
    adapter.fc1.bias.grad = dz1.sum(0)


def old_clip_loss(kind, scale, feats, text, y):
    if kind == "contrastive":
        logits = scale * feats @ text[y].T
        targets = torch.arange(y.numel(), device=y.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    return F.cross_entropy(scale * feats @ text.T, y)


@torch.no_grad()
def old_clip_loss_and_grad(kind, scale, feats, text, y):
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
