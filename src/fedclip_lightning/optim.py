"""The clients' optimisers: Adam of the reference release, made cheap to keep, and CoOp's SGD.

* ``build_optimizer``: the one place a client's optimiser is made, for a local fit or a
  personalisation alike: what ``algorithm.optimizer`` names at ``algorithm.lr`` times the
  fit's ``FitPlan.lr_factor``, Adam's state from the plan (a kept one, or a new one laid out
  in its block).
* ``make_adam``: ``torch.optim.Adam`` with the reference hyperparameters, fused
  where the parameters' device and dtype have the fused kernel; a new state can
  be laid out in a caller's block (``buffer``), or a kept one loaded (``state``).
* ``AdamStateArena``: every client's Adam moments (``optimizer_state=keep``)
  in one preallocated block, one row per client, so keeping them costs exactly
  their bytes: no allocator slack per client, nothing reallocated per round.

Only public ``torch.optim`` API: the step is ``optimizer.step()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import AlgorithmConfig
    from .fit_plan import FitPlan

_FUSED_SUPPORTED: dict[tuple[str, torch.dtype], bool] = {}


def _fused_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.optim.Adam(fused=True)`` steps parameters of this device type and dtype.

    Asked of Adam itself, once per (device type, dtype): one step on a one-element probe.
    """
    key = (device.type, dtype)
    if key not in _FUSED_SUPPORTED:
        ok = torch.is_floating_point(torch.empty((), dtype=dtype))
        if ok:
            try:
                probe = torch.zeros(1, dtype=dtype, device=device, requires_grad=True)
                probe.grad = torch.zeros_like(probe)
                torch.optim.Adam([probe], fused=True).step()
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                ok = False
        _FUSED_SUPPORTED[key] = ok
    return _FUSED_SUPPORTED[key]


def make_adam(params, a: AlgorithmConfig, buffer: torch.Tensor | None = None,
              state: dict[str, Any] | None = None, lr: float | None = None) -> torch.optim.Adam:
    """``torch.optim.Adam`` with coupled L2 weight decay and ``a``'s betas, eps and weight_decay, at
    ``lr`` (None: ``a.lr``).

    Fused (one kernel over all parameters) where every parameter's device and
    dtype has the fused kernel, ``foreach`` otherwise.

    ``state``: an ``optimizer.state_dict()`` to continue from (a kept state): its moments and step
    counters, at this call's ``lr`` (``load_state_dict`` alone would bring back the lr of the round the
    state was saved in, and a schedule over the rounds would stop after the first). Its moments stay where
    they are (no copy when they already sit on the parameters' device, e.g. in the client's
    ``AdamStateArena`` row).

    ``buffer`` (without a ``state`` to load): a flat block of at least
    ``adam_buffer_size(params)`` values, of the parameters' device and dtype, that
    the new state's moments become views of, zeroed here: one block per client
    instead of two tensors per parameter, or one scratch block that every client
    of a process reuses when the state is reset each round. The state is created
    exactly as ``Adam`` creates it on its first step (zero ``step`` counters of
    Adam's dtype and device, zero moments), so the updates are bitwise the same.
    A block that does not fit is not used. Never pass the block that a
    ``state`` about to be loaded lives in without passing that ``state``: zeroing
    the block would wipe it.
    """
    params = list(params)
    kwargs = dict(lr=a.lr if lr is None else lr, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay)
    fused = bool(params) and all(_fused_supported(p.device, p.dtype) for p in params)
    optimizer = torch.optim.Adam(params, fused=True, **kwargs) if fused else torch.optim.Adam(params, foreach=True, **kwargs)
    if state is not None:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:  # the kept state is the moments: the lr is this fit's (a schedule)
            group["lr"] = kwargs["lr"]
    if buffer is not None and not optimizer.state:
        init_adam_state(optimizer, buffer)
    return optimizer


def build_optimizer(params, a: AlgorithmConfig, plan: FitPlan) -> torch.optim.Optimizer:
    """The optimiser of one local fit (or personalisation) as ``plan`` says, at ``lr * plan.lr_factor``.

    ``make_adam`` (its state continued from ``plan.optimizer_state``, or new in ``plan.adam_buffer``),
    or for ``algorithm.optimizer: sgd`` (CoOp / PromptFL) SGD with ``a.momentum`` and ``a.weight_decay``
    (the buffer and the kept state are Adam's). ``lr`` is ``algorithm.lr``, scaled here and nowhere
    else (``a.lr`` is a float: a factor of 1 leaves it bitwise as it is).
    """
    lr = a.lr * plan.lr_factor
    if getattr(a, "optimizer", "adam") == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=a.momentum, weight_decay=a.weight_decay)
    return make_adam(params, a, buffer=plan.adam_buffer, state=plan.optimizer_state, lr=lr)


def adam_buffer_size(params) -> int:
    """Values of a block that holds Adam's two moments for ``params``."""
    return 2 * sum(p.numel() for p in params)


def init_adam_state(optimizer: torch.optim.Adam, buffer: torch.Tensor) -> None:
    """Create ``optimizer``'s (empty) state as ``Adam._init_group`` would, moments in ``buffer``.

    Parameter by parameter, in the optimiser's order: ``exp_avg`` then ``exp_avg_sq``,
    each a view of the next ``numel`` values of ``buffer`` (the layout
    ``AdamStateArena.stash`` keeps). The block is zeroed; a parameter that cannot be
    viewed into it (another device or dtype, not contiguous, the block too short) gets
    its own zero tensors as Adam would give it.
    """
    if optimizer.state:
        raise ValueError("init_adam_state: the optimiser already has a state")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    size = adam_buffer_size(params)
    usable = buffer.is_contiguous() and buffer.numel() >= size
    block = buffer.view(-1)[:size] if usable else None
    if block is not None:
        block.zero_()
    offset = 0
    for group in optimizer.param_groups:
        if group["amsgrad"]:
            raise ValueError("init_adam_state: amsgrad is not laid out in a block")
        for p in group["params"]:
            if group["fused"] or group["capturable"]:
                step = torch.zeros((), dtype=torch.float32 if group["fused"] else _scalar_dtype(), device=p.device)
            else:
                step = torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu")
            n = p.numel()
            if (block is not None and p.is_contiguous() and p.device == block.device
                    and p.dtype == block.dtype):
                exp_avg = block[offset : offset + n].view_as(p)
                exp_avg_sq = block[offset + n : offset + 2 * n].view_as(p)
            else:
                exp_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg_sq = torch.zeros_like(p, memory_format=torch.preserve_format)
            offset += 2 * n
            optimizer.state[p] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _scalar_dtype() -> torch.dtype:
    """The dtype of Adam's (non-fused) step counter: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamStateArena:
    """One block of Adam moments per process: a row per client (kept state) or one shared scratch row.

    ``rows`` client rows on the CPU when the state is kept between rounds
    (``optimizer_state=keep``), plus one scratch row on the training device that
    the clients use in turn when the state is reset each round (the reference),
    or while training on an accelerator. ``buffer_for`` gives the block a
    client's new state goes into (``FitPlan.adam_buffer``); ``stash``
    makes a kept state live in the client's row (no copy when it is already
    there: the CPU case).
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
