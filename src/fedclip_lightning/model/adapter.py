"""The FedCLIP attention adapter ("AttAI").

For a raw, un-normalised CLIP image feature ``I`` of width ``d``::

    att = Softmax(dim=-1)(W2 @ tanh(W1 @ I + b1) + b2)
    I*  = normalize(att * I)

with ``W1, W2`` of shape ``d x d``: no bottleneck, no residual,
``2 (d^2 + d)`` parameters (525,312 for ViT-B-32, d = 512). The adapter always
computes in fp32, whatever precision the frozen encoder ran in.

Training on frozen features makes this adapter the whole model, so its step is
written out by hand as well (``forward_train`` / ``backward``): the same
forward operations as ``forward`` (bitwise the same features) and their
analytic gradients, without autograd's graph. On a CPU that halves a FedCLIP
training step; ``tests/test_model.py`` checks the gradients against autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionAdapter(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.tanh(self.fc1(features))), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted, L2-normalised features ``normalize(att(I) * I)``."""
        features = features.float()
        return F.normalize(self.attention(features) * features, dim=-1)


    @torch.no_grad()
    def forward_train(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``forward`` for a training step: the adapted features and what ``backward`` needs."""
        x = features.float()
        h = torch.tanh(self.fc1(x))
        a = torch.softmax(self.fc2(h), dim=-1)
        u = a * x
        n = u.norm(dim=-1, keepdim=True).clamp_min_(1e-12)  # F.normalize's eps
        f = u / n
        return f, (x, h, a, f, n)

    @torch.no_grad()
    def backward(self, saved: tuple, grad_features: torch.Tensor) -> None:
        """Set ``.grad`` of the four parameters from ``dLoss/d(adapted features)``.

        ``f = u / |u|``, ``u = a * x``, ``a = softmax(z2)``, ``z2 = W2 h + b2``,
        ``h = tanh(W1 x + b1)``; the input features are frozen (no gradient).
        """
        x, h, a, f, n = saved
        du = (grad_features - f * (f * grad_features).sum(-1, keepdim=True)).div_(n)
        da = du.mul_(x)
        dz2 = a * (da - (a * da).sum(-1, keepdim=True))
        self.fc2.weight.grad = dz2.T @ h
        self.fc2.bias.grad = dz2.sum(0)
        dz1 = (dz2 @ self.fc2.weight).mul_(1 - h * h)
        self.fc1.weight.grad = dz1.T @ x
        self.fc1.bias.grad = dz1.sum(0)


def num_adapter_params(dim: int) -> int:
    """2 (d^2 + d): the count the paper reports (525,312 for d = 512)."""
    return 2 * (dim * dim + dim)
