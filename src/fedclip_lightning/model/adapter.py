"""The FedCLIP attention adapter ("AttAI").

For a raw, un-normalised CLIP image feature ``I`` of width ``d``::

    att = Softmax(dim=-1)(W2 @ tanh(W1 @ I + b1) + b2)
    I*  = normalize(att * I)

with ``W1, W2`` of shape ``d x d``: no bottleneck, no residual,
``2 (d^2 + d)`` parameters (525,312 for ViT-B-32, d = 512). The adapter always
computes in fp32, whatever precision the frozen encoder ran in.

Training on frozen features makes this adapter the whole model, so its
gradient is written out in a ``torch.autograd.Function`` (``AdapterFunction``):
its forward runs the same operations as the plain-op formula (bitwise the same
features, with or without grad mode) and saves the few intermediates that the
analytic backward needs, instead of autograd recording a node per operation.
``AttentionAdapter.forward`` goes through it for training and evaluation alike;
``loss.backward()`` (or ``fabric.backward``) fills the parameters' ``.grad``
as for any module. ``forward_autograd`` computes the same features from plain
differentiable operations, for callers whose gradients must be autograd's own
(a different rounding in the last bits). ``tests/test_step_functions.py``
checks the Function against autograd and ``gradcheck``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_NORMALIZE_EPS = 1e-12  # F.normalize's


class AdapterFunction(torch.autograd.Function):
    """``normalize(softmax(W2 tanh(W1 x + b1) + b2) * x)`` over the last dimension, with its gradient written out.

    ``apply(x, w1, b1, w2, b2)``: ``x`` of shape ``[..., d]``, ``w1`` of shape ``[h, d]``, ``b1`` of
    shape ``[h]``, ``w2`` of shape ``[d, h]``, ``b2`` of shape ``[d]`` (``nn.Linear`` layout; h = d in
    FedCLIP, less with a bottleneck), all of one dtype.

    Backward, with ``f = u / |u|``, ``u = a * x``, ``a = softmax(z2)``,
    ``z2 = W2 h + b2``, ``h = tanh(z1)``, ``z1 = W1 x + b1`` and ``g = dL/df``::

        du  = (g - f <f, g>) / |u|
        dz2 = a * (du * x - <a, du * x>)        dW2 = dz2^T h,  db2 = sum_batch dz2
        dz1 = (dz2 W2) * (1 - h^2)              dW1 = dz1^T x,  db1 = sum_batch dz1
        dx  = du * a + dz1 W1                   (only when x requires grad)

    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, w1, b1))
        a = torch.softmax(F.linear(h, w2, b2), dim=-1)
        u = a * x
        n = u.norm(dim=-1, keepdim=True).clamp_min_(_NORMALIZE_EPS)
        f = u / n
        # W1 only for dx: frozen features need nothing of it.
        ctx.save_for_backward(x, w1 if ctx.needs_input_grad[0] else None, w2, h, a, f, n)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: torch.Tensor):
        x, w1, w2, h, a, f, n = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        d, k = x.shape[-1], h.shape[-1]  # feature width, hidden width (d unless a bottleneck)
        dx = dw1 = db1 = dw2 = db2 = None
        du = (grad_f - f * (f * grad_f).sum(-1, keepdim=True)).div_(n)
        if need_x:
            dx = du * a  # before du becomes da in place
        da = du.mul_(x)
        dz2 = a * (da - (a * da).sum(-1, keepdim=True))
        dz2_2d = dz2.reshape(-1, d)  # a view for the usual [B, d] input
        if need_w2:
            dw2 = dz2_2d.T @ h.reshape(-1, k)
        if need_b2:
            db2 = dz2_2d.sum(0)
        if need_x or need_w1 or need_b1:
            dz1 = (dz2 @ w2).mul_(1 - h * h)
            dz1_2d = dz1.reshape(-1, k)
            if need_w1:
                dw1 = dz1_2d.T @ x.reshape(-1, d)
            if need_b1:
                db1 = dz1_2d.sum(0)
            if need_x:
                dx = dx.add_(dz1 @ w1)
        return dx, dw1, db1, dw2, db2


class AttentionAdapter(nn.Module):
    """FedCLIP's adapter; ``hidden`` < ``dim`` makes ``fc1`` a bottleneck (``algorithm.adapter_hidden``,
    the size ablation): ``2 d h + h + d`` parameters."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.dim, self.hidden = dim, hidden or dim
        self.fc1 = nn.Linear(dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, dim)

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.tanh(self.fc1(features))), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted, L2-normalised features ``normalize(att(I) * I)`` (fp32), through ``AdapterFunction``."""
        features = features.float()
        return AdapterFunction.apply(features, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

    def forward_autograd(self, features: torch.Tensor) -> torch.Tensor:
        """``forward`` from plain differentiable operations: bitwise the same features; autograd derives
        the gradients (equal to ``AdapterFunction``'s to float rounding, not bitwise)."""
        features = features.float()
        return F.normalize(self.attention(features) * features, dim=-1)
