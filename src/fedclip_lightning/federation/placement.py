"""Which clients (and unseen domains) live on which rank.

Greedy longest-processing-time assignment: items sorted by sample count (largest
first, ties by name) go to the rank with the least load so far (ties: lowest
rank). Deterministic, and within 4/3 of the best possible balance. Ranks
with nothing to do are fine.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign(sizes: Sequence[int], names: Sequence[str], world_size: int) -> list[int]:
    """Return the rank of each item."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    load = [0] * world_size
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], names[i])):
        r = min(range(world_size), key=lambda r: (load[r], r))
        ranks[i] = r
        load[r] += sizes[i]
    return ranks
