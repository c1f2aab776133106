"""Tests of the federation layer: aggregation, placement of clients on ranks, row gathering."""

from __future__ import annotations

import random

import pytest
import torch
from lightning.fabric import Fabric

from fedclip_lightning.aggregation.rows import gather_rows
from fedclip_lightning.federation.placement import assign
from fedclip_lightning.aggregation.mean import (
    aggregation_weights,
    flatten,
    state_bytes,
    unflatten,
    weighted_sum_rows,
)



def weighted_average(states, weights):
    """The weighted mean of whole state dicts, key by key (the reference the row path is held against)."""
    keys = list(states[0].keys())
    for s in states[1:]:
        if list(s.keys()) != keys:
            raise ValueError("client states have different keys")
    return {k: weighted_sum_rows(torch.stack([s[k] for s in states]), weights) for k in keys}


def random_states(k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (6, 6), "fc1.bias": (6,), "fc2.weight": (6, 6), "fc2.bias": (6,)}
    return [{n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()} for _ in range(k)]


# -- weights -------------------------------------------------------------------------------------

def test_uniform_weights():
    assert aggregation_weights([10, 200, 3], "uniform") == pytest.approx([1 / 3] * 3)
    assert aggregation_weights([5], "uniform") == [1.0]


def test_sample_weights():
    w = aggregation_weights([10, 30, 60], "samples")
    assert w == pytest.approx([0.1, 0.3, 0.6])
    assert sum(w) == pytest.approx(1.0)
    assert aggregation_weights([0, 4], "samples") == pytest.approx([0.0, 1.0])


def test_weight_errors():
    with pytest.raises(ValueError):
        aggregation_weights([], "uniform")
    with pytest.raises(ValueError):
        aggregation_weights([0, 0], "samples")
    with pytest.raises(ValueError, match="median"):
        aggregation_weights([1, 2], "median")


# -- averaging -----------------------------------------------------------------------------------

def test_weighted_average_uniform_is_mean():
    states = random_states(4, seed=1)
    avg = weighted_average(states, aggregation_weights([1, 1, 1, 1], "uniform"))
    assert list(avg) == list(states[0])
    for k in avg:
        by_hand = (states[0][k] + states[1][k] + states[2][k] + states[3][k]) / 4
        torch.testing.assert_close(avg[k], by_hand, rtol=1e-6, atol=1e-6)
        assert avg[k].shape == states[0][k].shape and avg[k].dtype == torch.float32


def test_weighted_average_by_samples():
    states = random_states(3, seed=2)
    n = [12, 3, 45]
    avg = weighted_average(states, aggregation_weights(n, "samples"))
    for k in avg:
        by_hand = sum(n_i * s[k].double() for n_i, s in zip(n, states)) / sum(n)
        torch.testing.assert_close(avg[k].double(), by_hand, rtol=1e-6, atol=1e-6)
        # Differs from the uniform mean for such unequal clients.
        assert not torch.allclose(avg[k], sum(s[k] for s in states) / 3, atol=1e-4)


def test_weighted_average_does_not_modify_inputs_and_checks_keys():
    states = random_states(2, seed=3)
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    weighted_average(states, [0.5, 0.5])
    for s, c in zip(states, copies):
        assert all(torch.equal(s[k], c[k]) for k in s)
    bad = dict(states[1])
    bad.pop("fc2.bias")
    with pytest.raises(ValueError):
        weighted_average([states[0], bad], [0.5, 0.5])


def test_weighted_sum_rows():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(5, 17, generator=g)
    w = [0.1, 0.2, 0.3, 0.25, 0.15]
    by_hand = sum(w[k] * rows[k].double() for k in range(5))
    torch.testing.assert_close(weighted_sum_rows(rows, w).double(), by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weighted_sum_rows(rows, [1 / 5] * 5), rows.mean(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(weighted_sum_rows(rows, [0, 0, 1, 0, 0]), rows[2])
    with pytest.raises(ValueError):
        weighted_sum_rows(rows, [0.5, 0.5])


def test_rows_and_states_agree():
    """Averaging flattened rows equals averaging the state dicts (what the orchestrator relies on)."""
    states = random_states(3, seed=5)
    w = aggregation_weights([7, 1, 2], "samples")
    rows = torch.stack([flatten(s) for s in states])
    from_rows = unflatten(weighted_sum_rows(rows, w), states[0])
    from_states = weighted_average(states, w)
    for k in from_states:
        assert torch.equal(from_rows[k], from_states[k])


# -- flatten / bytes -----------------------------------------------------------------------------

def test_flatten_unflatten_round_trip():
    state = random_states(1, seed=6)[0]
    vec = flatten(state)
    assert vec.dim() == 1 and vec.dtype == torch.float32
    assert vec.numel() == sum(t.numel() for t in state.values())
    assert torch.equal(vec[:36], state["fc1.weight"].reshape(-1))  # key order
    back = unflatten(vec, state)
    assert list(back) == list(state)
    for k in state:
        assert back[k].shape == state[k].shape and back[k].dtype == state[k].dtype
        assert torch.equal(back[k], state[k])
    # A copy, not a view of the vector.
    vec.zero_()
    assert not torch.equal(back["fc1.weight"], torch.zeros(6, 6))
    with pytest.raises(ValueError):
        unflatten(torch.zeros(vec.numel() + 1), state)


def test_flatten_unflatten_keeps_fp16_dtype():
    state = random_states(1, seed=7, dtype=torch.float16)[0]
    back = unflatten(flatten(state), state)
    for k in state:
        assert back[k].dtype == torch.float16 and torch.equal(back[k], state[k])


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float16, 2), (torch.float64, 8)])
def test_state_bytes(dtype, size):
    state = random_states(1, seed=8, dtype=dtype)[0]
    numel = 2 * 36 + 2 * 6
    assert state_bytes(state) == numel * size == sum(t.numel() * t.element_size() for t in state.values())
    # The ViT-B-32 adapter: 525,312 fp32 values.
    adapter = {"w1": torch.zeros(512, 512), "b1": torch.zeros(512), "w2": torch.zeros(512, 512), "b2": torch.zeros(512)}
    assert state_bytes(adapter) == 525_312 * 4
    assert state_bytes({}) == 0


# -- placement -----------------------------------------------------------------------------------

def loads(sizes, ranks, world_size):
    out = [0] * world_size
    for s, r in zip(sizes, ranks):
        out[r] += s
    return out


def test_assign_deterministic_and_complete():
    rng = random.Random(0)
    for trial in range(50):
        n = rng.randint(1, 12)
        world = rng.randint(1, 6)
        sizes = [rng.randint(0, 1000) for _ in range(n)]
        names = [f"client{i}" for i in range(n)]
        ranks = assign(sizes, names, world)
        assert ranks == assign(list(sizes), list(names), world)  # deterministic
        assert len(ranks) == n and all(0 <= r < world for r in ranks)
        ld = loads(sizes, ranks, world)
        assert sum(ld) == sum(sizes)
        assert max(ld) - min(ld) <= max(sizes), (sizes, world, ranks)


def test_assign_is_balanced_example():
    sizes = [100, 90, 50, 40, 30, 20]
    ranks = assign(sizes, list("abcdef"), 2)
    assert sorted(loads(sizes, ranks, 2)) == [160, 170]
    # Largest first, ties broken by name then lowest rank.
    assert assign([5, 5], ["b", "a"], 2) == [1, 0]


def test_assign_more_ranks_than_items():
    ranks = assign([10, 20, 30], ["x", "y", "z"], 5)
    assert sorted(ranks) == [0, 1, 2]  # each item alone; ranks 3 and 4 idle
    assert len(set(ranks)) == 3
    assert assign([], [], 3) == []


def test_assign_single_rank():
    assert assign([3, 1, 4, 1, 5], list("abcde"), 1) == [0] * 5
    with pytest.raises(ValueError):
        assign([1], ["a"], 0)


# -- gather_rows ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


def test_gather_rows_single_process(fabric):
    assert fabric.world_size == 1
    g = torch.Generator().manual_seed(9)
    rows = {0: torch.randn(5, generator=g), 2: torch.randn(5, generator=g)}
    out = gather_rows(fabric, rows, num_rows=4, width=5)
    assert out.shape == (4, 5) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out[0], rows[0]) and torch.equal(out[2], rows[2])
    assert torch.equal(out[1], torch.zeros(5)) and torch.equal(out[3], torch.zeros(5))


def test_gather_rows_dtype_and_empty(fabric):
    v = torch.randn(3, dtype=torch.float64)
    out = gather_rows(fabric, {1: v}, num_rows=2, width=3, dtype=torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out[1], v) and torch.equal(out[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(gather_rows(fabric, {}, num_rows=3, width=2), torch.zeros(3, 2))


def _peak_growth(fn):
    """``(bytes the resident set rose to above where it stood, fn's result)``: the peak reset first, and large
    blocks always mapped and unmapped by malloc (a fixed mmap threshold), so freed rows leave the resident set
    and the peak is what was live, not what the allocator kept."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, no longer adjusted on free
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size

    def field(name: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(name))

    base = field("VmRSS:")
    out = fn()
    return field("VmHWM:") - base, out


def _stream_on_two(fabric, width: int, n: int, budget: int):
    from fedclip_lightning.aggregation.rows import stream_rows

    rows = {i: torch.full((width,), float(i + 1)) for i in range(n) if i % 2 == fabric.global_rank}

    def total():
        acc = torch.zeros(width)
        for _, row in stream_rows(fabric, rows.get, list(range(n)), width, budget=budget):
            acc.add_(row)
        return float(acc[0]), float(acc[-1])

    return _peak_growth(total)


def test_rows_travel_between_two_processes_in_bounded_memory():
    """Two real processes (Fabric, forked, gloo): eight 16 MiB rows stream to every rank through all_reduces
    of at most 4 MiB (each row in pieces), so a rank's memory rises by about a row for the sum and one for the
    row in flight, not by the eight rows of a buffer sized by clients (measured too, so the measure is seen to
    tell the two apart)."""
    from fedclip_lightning.aggregation.rows import BUFFER_BYTES

    width, n, row = 4 << 20, 8, 16 << 20
    assert BUFFER_BYTES <= 64 << 20
    two = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    grew, sums = two.launch(_stream_on_two, width, n, 4 << 20)
    assert sums == (36.0, 36.0)  # 1 + ... + 8, every row arrived whole
    assert grew < 4 * row, f"peak rose by {grew / row:.1f} rows"
    grew_unbounded, _ = two.launch(_stream_on_two, width, n, 1 << 40)
    assert grew_unbounded > n * row > 2 * grew


# -- aggregation rules -----------------------------------------------------------------------------

def test_aggregate_rows_streams_a_linear_rule_and_gathers_for_one_that_needs_every_row(fabric):
    """The weighted mean streams row by row (bitwise weighted_sum_rows); a rule that is not linear, a
    coordinate-wise median here, gets the whole table of the clients in order."""
    from fedclip_lightning.aggregation.mean import WeightedMean, aggregate_rows

    g = torch.Generator().manual_seed(10)
    rows = torch.randn(5, 7, generator=g)
    order, weights = [4, 0, 2], [0.5, 0.25, 0.25]
    mean = aggregate_rows(fabric, WeightedMean(), lambda i: rows[i], order, weights, 7)
    assert torch.equal(mean, weighted_sum_rows(rows[order], weights))

    class Median:
        linear = False

        def __call__(self, table, w):
            assert w == weights and torch.equal(table, rows[order])
            return table.median(dim=0).values

    med = aggregate_rows(fabric, Median(), lambda i: rows[i], order, weights, 7)
    assert torch.equal(med, rows[order].median(dim=0).values)


def test_sample_weights_come_from_the_clients_replies():
    """federation.aggregation=samples weighs each active client by the training examples its reply reports."""
    from fedclip_lightning.algorithms.base import ClientResult, client_sizes
    from fedclip_lightning.training import SplitResult

    fabric = Fabric(accelerator="cpu", devices=1)
    train = SplitResult(0.5, 1.0, 4)
    replies = {0: ClientResult(train, num_examples=7), 2: ClientResult(train, num_examples=3)}
    assert client_sizes(fabric, 3, [0, 2], replies) == (7, 3)
    assert aggregation_weights(client_sizes(fabric, 3, [2, 0], replies), "samples") == pytest.approx([0.3, 0.7])
