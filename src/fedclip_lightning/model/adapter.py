"""The FedCLIP attention adapter ("AttAI").

For a raw, un-normalised CLIP image feature ``I`` of width ``d``::

    att = Softmax(dim=-1)(W2 @ tanh(W1 @ I + b1) + b2)
    I*  = normalize(att * I)

with ``W1, W2`` of shape ``d x d``: no bottleneck, no residual,
``2 (d^2 + d)`` parameters (525,312 for ViT-B-32, d = 512). The adapter always
computes in fp32, whatever precision the frozen encoder ran in.
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


def num_adapter_params(dim: int) -> int:
    """2 (d^2 + d): the count the paper reports (525,312 for d = 512)."""
    return 2 * (dim * dim + dim)
