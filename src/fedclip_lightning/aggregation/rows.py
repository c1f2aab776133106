"""The only place that calls collectives, and it only moves rows.

Every rank fills the rows of the clients it owns in a zero ``[n, width]``
table and ``all_reduce(sum)`` assembles it on every rank, in pieces of at most
``BUFFER_BYTES``.
Adding zeros is exact, so every rank then holds bit-for-bit the values each
client produced, and the aggregation rule that follows (``mean.py``: a
weighted sum in fixed client order, say) is the same arithmetic whether 1 or N
processes ran.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.fabric import Fabric


# What one collective moves at most: a round's rows travel in pieces of this many bytes, however many clients
# there are and however wide a row is (a full-model row of ViT-B/32 is 605 MB).
BUFFER_BYTES = 64 << 20


def gather_rows(fabric: Fabric, rows: Mapping[int, torch.Tensor], num_rows: int, width: int,
                dtype: torch.dtype = torch.float32, budget: int = BUFFER_BYTES) -> torch.Tensor:
    """Assemble ``{row index: vector}`` from all ranks into a ``[num_rows, width]`` CPU tensor; between
    processes the table travels in all_reduces of at most ``budget`` bytes each."""
    out = torch.zeros(num_rows, width, dtype=dtype)
    for i, v in rows.items():
        out[i] = v.to(device="cpu", dtype=dtype)
    if fabric.world_size > 1:
        flat = out.view(-1)
        step = max(1, budget // out.element_size())
        for lo in range(0, flat.numel(), step):
            piece = fabric.all_reduce(flat[lo : lo + step].to(fabric.device), reduce_op="sum")
            flat[lo : lo + step].copy_(piece)
    return out


def stream_rows(fabric: Fabric, row_of, order: list[int], width: int, budget: int = BUFFER_BYTES):
    """Yield ``(position, row)`` for the clients in ``order``, in that order, on every rank.

    ``row_of(i)`` gives client ``i``'s flat state on the rank that owns it (None elsewhere). Rows travel
    as many at a time as ``budget`` bytes hold (a row wider than that, alone, in pieces), so memory stays
    bounded by bytes, whatever the number of clients or the width of a row. One process reads each row
    straight from its client (no buffer: the same values, the buffer only adds zeros). Moving rows is all
    this does: what they are summed into is the server's aggregation rule.
    """
    if fabric.world_size == 1:
        for k, i in enumerate(order):
            yield k, row_of(i).to("cpu", torch.float32)
        return
    chunk = max(1, budget // (4 * max(1, width)))
    for start in range(0, len(order), chunk):
        ids = order[start : start + chunk]
        rows = {j: r for j, i in enumerate(ids) if (r := row_of(i)) is not None}
        buf = gather_rows(fabric, rows, len(ids), width, budget=budget)
        for j in range(len(ids)):
            yield start + j, buf[j]
