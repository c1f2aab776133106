"""Server optimisers (``federation.server_optimizer``): Reddi et al. 2021, "Adaptive Federated
Optimization" (arXiv 2003.00295), Algorithm 2, and FedAvgM (Hsu et al. 2019).

The server treats the round's aggregated client change ``Delta = agg(w_k - w)``
as a pseudo-gradient (a descent direction) and steps with its own optimiser:

* ``none``: ``w <- w + Delta`` (plain averaging; the server then keeps the
  clients' weighted mean itself, bitwise, as the reference does);
* ``momentum`` (FedAvgM): ``v <- beta1 v + Delta``, ``w <- w + eta v``;
* ``adagrad``: ``m <- beta1 m + (1 - beta1) Delta``, ``v <- v + Delta^2``;
* ``yogi``: ``m`` as above, ``v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)``;
* ``adam``: ``m`` as above, ``v <- beta2 v + (1 - beta2) Delta^2``;

and for the three adaptive ones ``w <- w + eta m / (sqrt(v) + tau)``, with
``v`` starting at ``tau^2`` and ``m`` at 0, no bias correction (as in the
paper). Defaults (the paper's): ``beta1 = 0.9``, ``beta2 = 0.99``,
``tau = 1e-3``; ``server_lr`` (eta) is 1.0 for momentum and 1e-2 for the
adaptive ones, to be tuned as the paper tunes it. The state (``m``, ``v``) is
server state: it goes into every checkpoint and comes back on resume.
"""

from __future__ import annotations

import torch

SERVER_OPTIMIZERS = ("none", "momentum", "adam", "yogi", "adagrad")


class ServerOptimizer:
    def __init__(self, kind: str, lr: float, beta1: float, beta2: float, tau: float):
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new flat weights from the old ``w`` and the pseudo-gradient ``delta`` (new tensors)."""
        if self.kind == "none":
            return w + delta
        if self.kind == "momentum":
            self.m = delta.clone() if self.m is None else self.beta1 * self.m + delta
            return w + self.lr * self.m
        m0 = torch.zeros_like(delta) if self.m is None else self.m
        v0 = torch.full_like(delta, self.tau ** 2) if self.v is None else self.v
        self.m = self.beta1 * m0 + (1 - self.beta1) * delta
        d2 = delta * delta
        if self.kind == "adagrad":
            self.v = v0 + d2
        elif self.kind == "yogi":
            self.v = v0 - (1 - self.beta2) * d2 * torch.sign(v0 - d2)
        else:  # adam
            self.v = self.beta2 * v0 + (1 - self.beta2) * d2
        return w + self.lr * self.m / (self.v.sqrt() + self.tau)

    def state(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load(self, state: dict | None) -> None:
        state = state or {}
        self.m, self.v = state.get("m"), state.get("v")
