"""Federated algorithms, one module each, behind one interface (:class:`.base.Algorithm`).

The built-ins register on import, in the order the sweep tables show them.
"""

from . import registry
from .base import CLIPAlgorithm, Algorithm, ClientResult, Participant, RunContext
from .registry import get, names, register

# Registration order is the tables' column order: floors first, then the paper's baselines, then FedCLIP,
# then the other parameter-efficient methods.
from . import zeroshot, local, fedavg, fedprox, fedclip, fedclip_ft  # noqa: E402,F401  (isort: skip)
from . import promptfl, fedtpg, cocoop, clip_adapter, linear_probe  # noqa: E402,F401  (isort: skip)

__all__ = ["CLIPAlgorithm", "Algorithm", "ClientResult", "Participant", "RunContext", "get", "names", "register", "registry"]
