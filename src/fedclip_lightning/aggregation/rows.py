"""The only place that calls collectives, and it only moves rows.

Every rank fills the rows of the clients it owns in a zero ``[n, width]``
buffer and one ``all_reduce(sum)`` assembles the full table on every rank.
Adding zeros is exact, so every rank then holds bit-for-bit the values each
client produced, and the aggregation rule that follows (``mean.py``: a
weighted sum in fixed client order, say) is the same arithmetic whether 1 or N
processes ran.
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


def stream_rows(fabric: Fabric, row_of, order: list[int], width: int, chunk: int = 64):
    """Yield ``(position, row)`` for the clients in ``order``, in that order, on every rank.

    ``row_of(i)`` gives client ``i``'s flat state on the rank that owns it (None elsewhere). Rows
    travel ``chunk`` clients at a time, so memory stays bounded however many clients there are. One
    process reads each row straight from its client (no buffer: the same values, the buffer only adds
    zeros). Moving rows is all this does: what they are summed into is the server's aggregation rule.
    """
    if fabric.world_size == 1:
        for k, i in enumerate(order):
            yield k, row_of(i).to("cpu", torch.float32)
        return
    for start in range(0, len(order), chunk):
        ids = order[start : start + chunk]
        rows = {j: r for j, i in enumerate(ids) if (r := row_of(i)) is not None}
        buf = gather_rows(fabric, rows, len(ids), width)
        for j in range(len(ids)):
            yield start + j, buf[j]
