"""What a client needs for one local fit, besides itself and its data: one argument, made by its algorithm."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare as booleans
class FitPlan:
    """Everything one local fit of a client needs besides the client and its data, made by its algorithm.

    * ``epochs``: passes over the loader; ``max_steps``: a straggler's budget of optimiser steps
      (None: no budget).
    * ``lr_factor``: this fit's share of ``algorithm.lr`` (a schedule over rounds; the optimiser
      trains at ``lr * lr_factor``, see ``optim.build_optimizer``).
    * ``anchor``, ``mu``: FedProx's proximal term ``(mu/2) ||w - anchor||^2`` added to the loss
      (``anchor`` None: no term); the anchor's tensors on the training device.
    * ``adam_buffer``: the block a new Adam state's moments are laid out in (the client's row of the
      process's ``AdamStateArena`` or its shared scratch row; None: Adam allocates them).
    * ``optimizer_state``: a kept ``optimizer.state_dict()`` to continue from (None: a new state).
    """

    epochs: int
    max_steps: int | None = None
    lr_factor: float = 1.0
    anchor: Mapping[str, torch.Tensor] | None = None
    mu: float = 0.0
    adam_buffer: torch.Tensor | None = None
    optimizer_state: dict[str, Any] | None = None
