"""Adam for the clients: the optimiser of the reference release, made cheap to step and to keep.

* ``make_adam``: ``torch.optim.Adam`` with the reference hyperparameters, fused.
* ``adam_step``: its update without the per-call Python overhead.
* ``AdamStateArena``: every client's Adam moments (``optimizer_state=keep``)
  in one preallocated block, one row per client, so keeping them costs exactly
  their bytes: no allocator slack per client, nothing reallocated per round.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import AlgorithmConfig


def make_adam(params, a: AlgorithmConfig) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay (torch.optim.Adam's), fused where this torch supports it.

    The fused kernel computes the same update in one pass over the parameters:
    on the adapter's small matrices it halves the time of a training step.
    """
    params = list(params)
    kwargs = dict(lr=a.lr, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.Adam(params, **kwargs)


def adam_step(optimizer: torch.optim.Optimizer, buffer: torch.Tensor | None = None) -> None:
    """``optimizer.step()`` for a fused ``torch.optim.Adam``, minus its per-call Python overhead.

    On the adapter's four tensors ``Adam.step`` spends about 0.3 ms in Python
    around a 0.2 ms kernel, a third of a FedCLIP training step on a CPU. This
    calls that same kernel on the optimiser's own state (bitwise the same
    update, checked by ``tests/test_model.py``) and falls back to ``step()``
    wherever the fast path's assumptions do not hold: several groups, amsgrad,
    maximize, a tensor lr, parameters of mixed devices or dtypes, or a torch
    without the kernel.

    On the first step the state is created as ``Adam`` creates it (a zero step
    counter, zero moments), with the moments as views of ``buffer`` when one is
    given (zeroed here; ``adam_buffer_size`` values): one block per client
    instead of two tensors per parameter, or one scratch block that every client
    of a process reuses when the state is reset each round.
    """
    groups = optimizer.param_groups
    fused_adam = getattr(torch, "_fused_adam_", None)
    g = groups[0]
    if (fused_adam is None or type(optimizer) is not torch.optim.Adam or len(groups) != 1 or not g.get("fused")
            or g["amsgrad"] or g["maximize"] or g.get("decoupled_weight_decay") or isinstance(g["lr"], torch.Tensor)):
        optimizer.step()
        return
    params = [p for p in g["params"] if p.grad is not None]
    if not params or len({(p.device, p.dtype) for p in params}) != 1:
        optimizer.step()
        return
    states = [optimizer.state[p] for p in params]
    if any(not st for st in states):
        _init_adam_state(params, states, buffer)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    fused_adam(params, [p.grad for p in params], [st["exp_avg"] for st in states],
               [st["exp_avg_sq"] for st in states], [], steps, amsgrad=False, lr=g["lr"], beta1=g["betas"][0],
               beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
               grad_scale=None, found_inf=None)


def adam_buffer_size(params) -> int:
    """Values of a block that holds Adam's two moments for ``params``."""
    return 2 * sum(p.numel() for p in params)


def _init_adam_state(params: list[torch.Tensor], states: list[dict], buffer: torch.Tensor | None) -> None:
    p0 = params[0]
    fits = (buffer is not None and buffer.device == p0.device and buffer.dtype == p0.dtype
            and buffer.is_contiguous() and buffer.numel() >= adam_buffer_size(params))
    if fits:
        buffer = buffer.view(-1)[: adam_buffer_size(params)]
        buffer.zero_()
    offset = 0
    for p, st in zip(params, states):
        if st:  # only the parameters without state (all of them, in practice)
            continue
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # Adam's own for fused=True
        if fits and p.is_contiguous():
            n = p.numel()
            st["exp_avg"] = buffer[offset : offset + n].view_as(p)
            st["exp_avg_sq"] = buffer[offset + n : offset + 2 * n].view_as(p)
            offset += 2 * n
        else:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class AdamStateArena:
    """One block of Adam moments per process: a row per client (kept state) or one shared scratch row.

    ``rows`` client rows on the CPU when the state is kept between rounds
    (``optimizer_state=keep``), plus one scratch row on the training device that
    the clients use in turn when the state is reset each round (the reference),
    or while training on an accelerator. ``buffer_for`` gives the block a
    client's new state goes into; ``stash`` makes a kept state live in the
    client's row (no copy when it is already there: the CPU case).
    """

    def __init__(self, num_values: int, rows: int, device: torch.device):
        self.num_values, self.device = num_values, torch.device(device)
        # Untouched rows cost nothing: the pages are committed when a client's state is first written.
        self.rows = torch.empty(rows, num_values) if rows else None
        self.scratch = torch.empty(num_values, device=self.device)

    def buffer_for(self, row: int | None) -> torch.Tensor:
        if row is not None and self.rows is not None and self.device.type == "cpu":
            return self.rows[row]
        return self.scratch

    def stash(self, state: dict[str, Any], row: int) -> dict[str, Any]:
        """``optimizer.state_dict()`` with its moments in row ``row`` (on the CPU) and its counters on the CPU."""
        block = self.rows[row]
        lo, hi = block.data_ptr(), block.data_ptr() + block.numel() * block.element_size()
        offset = 0
        for _, st in sorted(state["state"].items()):  # parameter order: the order the moments were laid out
            for key in ("exp_avg", "exp_avg_sq"):
                t = st.get(key)
                if t is None:
                    continue
                n = t.numel()
                if not (t.device.type == "cpu" and lo <= t.data_ptr() < hi):
                    view = block[offset : offset + n].view_as(t)
                    view.copy_(t)
                    st[key] = view
                offset += n
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].cpu()
        return state
