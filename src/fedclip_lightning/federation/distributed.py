"""The only place that calls collectives.

Each round, every rank fills the rows of the clients it owns in a zero
``[num_clients, width]`` buffer and one ``all_reduce(sum)`` assembles the full
table on every rank. Adding zeros is exact, so every rank then holds bit-for-bit
the values each client produced, and the aggregation that follows (a weighted
sum in fixed client order) is the same arithmetic whether 1 or N processes ran.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.fabric import Fabric


def gather_rows(fabric: Fabric, rows: Mapping[int, torch.Tensor], num_rows: int, width: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Assemble ``{row index: vector}`` from all ranks into a ``[num_rows, width]`` CPU tensor."""
    buf = torch.zeros(num_rows, width, dtype=dtype, device=fabric.device)
    for i, v in rows.items():
        buf[i] = v.to(device=fabric.device, dtype=dtype)
    if fabric.world_size > 1:
        buf = fabric.all_reduce(buf, reduce_op="sum")
    return buf.cpu()


def reduce_weighted(fabric: Fabric, row_of, order: list[int], weights: list[float], width: int,
                    chunk: int = 64) -> torch.Tensor:
    """``sum_k weights[k] * row_k`` over the clients in ``order``, summed in that order on every rank.

    ``row_of(i)`` gives client ``i``'s flat state on the rank that owns it (None elsewhere). Rows
    travel ``chunk`` clients at a time, so memory stays bounded however many clients there are,
    and the sum is the same arithmetic as :func:`..strategy.weighted_sum_rows` (bit for bit).
    """
    acc = torch.zeros(width, dtype=torch.float32)
    if fabric.world_size == 1:  # every row is here: no buffer (the same sums: the buffer only adds zeros)
        for i, w in zip(order, weights):
            acc.add_(row_of(i).to("cpu", torch.float32), alpha=float(w))
        return acc
    for start in range(0, len(order), chunk):
        ids = order[start : start + chunk]
        rows = {j: r for j, i in enumerate(ids) if (r := row_of(i)) is not None}
        buf = gather_rows(fabric, rows, len(ids), width)
        for j in range(len(ids)):
            acc.add_(buf[j], alpha=float(weights[start + j]))
    return acc
