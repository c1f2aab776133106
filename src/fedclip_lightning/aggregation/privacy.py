"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"), and its accounting with Opacus.

Each client's update ``u_k = w_k - w`` is clipped to L2 norm ``C``
(``federation.privacy.clip``); Gaussian noise of std ``sigma * C``
(``federation.privacy.noise_multiplier``) is added to the sum of the round's clipped
updates on the server (``federation.privacy.mode=server``), or to each clipped update on
its client (``federation.privacy.mode=client``: local DP, the server never sees an
un-noised update). The average then divides by the number of clients that
sent an update, with uniform weights.

The privacy spent is Opacus's RDP accountant (no accounting written here):
one Gaussian mechanism of noise multiplier ``sigma`` per round with sampling
rate ``q = federation.client_fraction`` (clients are drawn as a fixed-size
subset; the accountant assumes Poisson sampling of rate q, the usual
approximation, and dropped clients only lower the true rate).
``federation.privacy.target_epsilon`` picks ``sigma`` for the planned rounds with
Opacus's ``get_noise_multiplier``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

DP_MODES = ("none", "server", "client")


def _opacus():
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise ConfigError("federation.privacy.mode needs Opacus for its privacy accounting. Fix: pip install opacus "
                          "(or pip install -e '.[dp]').") from None
    return RDPAccountant, get_noise_multiplier


def clip(u: torch.Tensor, c: float) -> torch.Tensor:
    """``u * min(1, C / ||u||)`` (a new tensor)."""
    norm = float(u.double().norm())
    return u * min(1.0, c / norm) if norm > 0 else u.clone()


class Privacy:
    def __init__(self, fed, rounds: int):
        dp = fed.privacy
        self.mode, self.c, self.delta = dp.mode, dp.clip, dp.delta
        self.q = fed.client_fraction
        RDPAccountant, get_noise_multiplier = _opacus()
        if dp.target_epsilon is not None:
            try:
                self.sigma = float(get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=self.delta,
                                                        sample_rate=self.q, steps=max(1, rounds), accountant="rdp"))
            except ValueError as exc:  # Opacus: no noise multiplier it tries reaches the target
                raise ConfigError(f"federation.privacy.target_epsilon={dp.target_epsilon:g}: no noise multiplier "
                                  f"reaches it for {rounds} rounds at delta {self.delta:g} and sampling rate {self.q:g} "
                                  f"(Opacus: {exc}). Fix: a larger federation.privacy.target_epsilon (e.g. 8), fewer "
                                  "rounds, or federation.privacy.noise_multiplier instead of a target.") from None
        else:
            self.sigma = dp.noise_multiplier
        self.secure = bool(dp.secure)
        self._accountant_class = RDPAccountant

    def noise(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise of std ``sigma * C``: from ``generator`` (simulation), or with ``federation.privacy.secure`` from the
        operating system's entropy (``os.urandom``, Box-Muller in float64), which no config reproduces."""
        if self.secure:
            return secure_normal(like.numel()).view(like.shape).to(like.dtype) * (self.sigma * self.c)
        return torch.randn(like.shape, generator=generator, dtype=like.dtype) * (self.sigma * self.c)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (replayed: every round is the same mechanism)."""
        if rounds <= 0:
            return 0.0
        acc = self._accountant_class()
        acc.history = [(self.sigma, self.q, rounds)]
        return float(acc.get_epsilon(self.delta))


def secure_normal(n: int) -> torch.Tensor:
    """``n`` standard normal float64 values from the operating system's entropy (Box-Muller over 53-bit uniforms)."""
    import math
    import os

    m = (n + 1) // 2
    bits = torch.frombuffer(bytearray(os.urandom(16 * m)), dtype=torch.int64).view(2, m)
    u = ((bits >> 11) & ((1 << 53) - 1)).double() * 2.0 ** -53  # uniform in [0, 1)
    r = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: log never sees 0
    theta = (2 * math.pi) * u[1]
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n]

