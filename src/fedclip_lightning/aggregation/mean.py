"""Aggregation: the server's rules, as functions of the clients' rows (flat CPU tensors).

FedAvg over client adapters: ``w_global = sum_k a_k * w_k`` with

* ``uniform`` (the reference release): ``a_k = 1 / K``;
* ``samples`` (standard FedAvg): ``a_k = n_k / sum_j n_j``, ``n_k`` the
  number of training samples of client ``k``.

Sums always run in the fixed client order ``k = 0..K-1`` so the result does
not depend on how many processes computed the client updates.

A rule is linear (``WeightedMean``: a row at a time streams into the sum, so
memory stays one row however many clients) or needs every row at once (a
coordinate-wise median, say: ``linear = False``, and ``aggregate_rows`` gathers
the whole table first). ``rows.py`` only moves the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


def aggregation_weights(num_samples: Sequence[int], mode: str) -> list[float]:
    if not num_samples:
        raise ValueError("no clients to aggregate")
    if mode == "uniform":
        return [1.0 / len(num_samples)] * len(num_samples)
    if mode == "samples":
        total = sum(num_samples)
        if total <= 0:
            raise ValueError("sample-weighted aggregation needs clients with training samples")
        return [n / total for n in num_samples]
    raise ValueError(f"unknown aggregation {mode!r}")


def weighted_sum_rows(rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_k weights[k] * rows[k]``, accumulated in row order."""
    if rows.shape[0] != len(weights):
        raise ValueError(f"{rows.shape[0]} rows but {len(weights)} weights")
    acc = torch.zeros_like(rows[0])
    for k, w in enumerate(weights):
        acc.add_(rows[k], alpha=float(w))
    return acc


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of a state dict as one flat fp32 vector (in key order)."""
    return torch.cat([t.detach().reshape(-1).float() for t in state.values()])


def unflatten(vector: torch.Tensor, template: Mapping[str, torch.Tensor]) -> State:
    out: State = {}
    offset = 0
    for k, t in template.items():
        n = t.numel()
        out[k] = vector[offset : offset + n].view_as(t).to(t.dtype).clone()
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, template needs {offset}")
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for one copy of a state: counted from the tensors themselves."""
    return sum(t.numel() * t.element_size() for t in state.values())


class WeightedMean:
    """``sum_k w_k * row_k`` in client order: FedAvg's rule, streamed (linear)."""

    linear = True

    def start(self, width: int) -> torch.Tensor:
        return torch.zeros(width, dtype=torch.float32)

    def add(self, acc: torch.Tensor, row: torch.Tensor, weight: float) -> None:
        acc.add_(row, alpha=float(weight))

    def __call__(self, table: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        return weighted_sum_rows(table, weights)


def aggregate_rows(fabric, rule, row_of: Callable[[int], torch.Tensor | None], order: list[int],
                   weights: Sequence[float], width: int,
                   transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Apply ``rule`` to the rows of the clients in ``order`` (``row_of(i)`` on the rank owning client
    ``i``, None elsewhere); every rank gets the same result. ``transform(i, row)``, if given, turns client
    ``i``'s row into what the rule sees (the server update's ``w_k - w``, clipped, attacked, noised), in
    client order, after the row has travelled. A linear rule streams the rows (memory: one row); any other
    rule gathers the whole table first."""
    from .rows import gather_rows, stream_rows

    if getattr(rule, "linear", False):
        acc = rule.start(width)
        for k, row in stream_rows(fabric, row_of, order, width):
            rule.add(acc, row if transform is None else transform(order[k], row), weights[k])
        return acc
    rows = {k: r for k, i in enumerate(order) if (r := row_of(i)) is not None}
    table = gather_rows(fabric, rows, len(order), width)
    if transform is not None:
        table = torch.stack([transform(i, table[k]) for k, i in enumerate(order)])
    return rule(table, weights)
