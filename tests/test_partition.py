"""Tests of the client partitions: Dirichlet label skew, iid shards, partitioned tasks, client sampling."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from conftest import PACS
from fedclip_lightning.data.domains import DomainSet, Sample, scan_domains
from fedclip_lightning.data.partition import (
    PARTITION_SCHEMES,
    Task,
    dirichlet_split,
    iid_split,
    leave_one_domain_out,
    partitioned_task,
    sample_clients,
)
from fedclip_lightning.errors import DataError


@pytest.fixture(scope="module")
def pacs() -> DomainSet:
    if not PACS.is_dir():
        pytest.fail(f"{PACS} is missing: the tests need ../shared/data beside the checkout")
    return scan_domains(PACS, check_images=False)


@pytest.fixture(scope="module")
def mini(pacs_mini) -> DomainSet:
    return scan_domains(pacs_mini, check_images=False)


def pooled(ds: DomainSet, skip: tuple[str, ...] = ()) -> list[Sample]:
    return [s for d in ds.domains if d not in skip for s in ds.samples[d]]


def paths(samples) -> list[str]:
    return [s.path for s in samples]


def assert_partition(parts: list[list[Sample]], samples: list[Sample], num_clients: int, min_size: int) -> None:
    assert len(parts) == num_clients
    flat = [s.path for p in parts for s in p]
    assert len(flat) == len(set(flat)), "clients overlap"
    assert sorted(flat) == sorted(paths(samples)), "union differs from the input"
    assert all(len(p) >= min_size for p in parts)
    assert all(paths(p) == sorted(paths(p)) for p in parts), "a client's list is not sorted by path"


def max_class_share(parts: list[list[Sample]]) -> float:
    return float(np.mean([max(Counter(s.label for s in p).values()) / len(p) for p in parts if p]))


# --------------------------------------------------------------------------- dirichlet_split


@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_dirichlet_full_pacs_seeded_disjoint_complete(pacs, alpha):
    samples = pooled(pacs)
    kw = dict(num_classes=len(pacs.classes), min_size=50, max_retries=100)
    a = dirichlet_split(samples, 10, alpha, seed=3, **kw)
    b = dirichlet_split(list(reversed(samples)), 10, alpha, seed=3, **kw)  # input order does not matter
    c = dirichlet_split(samples, 10, alpha, seed=4, **kw)
    assert_partition(a, samples, 10, 50)
    assert_partition(c, samples, 10, 50)
    assert a == b
    assert [paths(p) for p in a] != [paths(p) for p in c]


def test_dirichlet_pacs_mini_seeded_disjoint_complete(mini):
    samples = pooled(mini)
    kw = dict(num_classes=len(mini.classes), min_size=4, max_retries=200)
    a = dirichlet_split(samples, 4, 1.0, seed=0, **kw)
    assert_partition(a, samples, 4, 4)
    assert a == dirichlet_split(samples, 4, 1.0, seed=0, **kw)
    assert a != dirichlet_split(samples, 4, 1.0, seed=1, **kw)
    assert samples == pooled(mini), "the input was modified"


def test_small_alpha_skews_labels_large_alpha_does_not(pacs):
    samples = pooled(pacs)
    kw = dict(num_classes=len(pacs.classes), seed=0, min_size=20, max_retries=200)
    skewed = dirichlet_split(samples, 10, 0.05, **kw)
    uniform = dirichlet_split(samples, 10, 100.0, **kw)
    global_share = np.bincount([s.label for s in samples], minlength=7) / len(samples)
    assert max_class_share(skewed) > 0.6
    assert max_class_share(uniform) < global_share.max() + 0.08
    # near-uniform: every client's label histogram is close to the pooled one
    for p in uniform:
        hist = np.bincount([s.label for s in p], minlength=7) / len(p)
        assert 0.5 * np.abs(hist - global_share).sum() < 0.1
    # strongly skewed: most clients hold few classes
    few = [sum(c >= 0.05 * len(p) for c in Counter(s.label for s in p).values()) for p in skewed]
    assert np.mean(few) < 3


def test_dirichlet_redraws_until_min_size(mini):
    samples = pooled(mini)
    kw = dict(num_classes=len(mini.classes), seed=7, max_retries=1)
    first = dirichlet_split(samples, 4, 0.5, min_size=0, **kw)
    need = min(len(p) for p in first) + 1
    assert need * 4 <= len(samples)
    again = dirichlet_split(samples, 4, 0.5, min_size=need, num_classes=7, seed=7, max_retries=2000)
    assert_partition(again, samples, 4, need)
    assert again != first


def test_impossible_min_size_fails_at_once(mini):
    samples = pooled(mini)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        dirichlet_split(samples, 10, 0.5, num_classes=7, seed=0, min_size=10, max_retries=100_000)
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert "data.partition.min_size=10" in msg
    assert "data.partition.num_clients=10" in msg
    assert "need 100" in msg and "only 40 images" in msg and "Fix:" in msg


def test_unlikely_split_fails_after_max_retries(pacs, monkeypatch):
    samples = pooled(pacs)
    draws = []
    real_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda *a: draws.append(a) or real_rng(*a))
    with pytest.raises(DataError) as err:
        dirichlet_split(samples, 40, 0.01, num_classes=7, seed=0, min_size=150, max_retries=5)
    assert len(draws) == 5
    assert len(set(draws)) == 5, "each retry must use a new derived seed"
    msg = str(err.value)
    for part in (
        "data.partition.alpha=0.01",
        "data.partition.num_clients=40",
        "data.partition.min_size=150",
        str(len(samples)),
        "unlikely",
        "lower data.partition.min_size",
        "raise data.partition.alpha",
        "fewer clients",
    ):
        assert part in msg, part


def test_dirichlet_rejects_bad_arguments(mini):
    samples = pooled(mini)
    with pytest.raises(DataError, match=r"data\.partition\.alpha=0"):
        dirichlet_split(samples, 2, 0.0, num_classes=7, seed=0, min_size=1, max_retries=5)
    with pytest.raises(DataError, match=r"data\.partition\.num_clients=0"):
        dirichlet_split(samples, 0, 0.5, num_classes=7, seed=0, min_size=1, max_retries=5)
    with pytest.raises(DataError, match=r"data\.partition\.max_retries=0"):
        dirichlet_split(samples, 2, 0.5, num_classes=7, seed=0, min_size=1, max_retries=0)


# --------------------------------------------------------------------------- iid_split


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_iid_shards_near_equal(pacs, k):
    samples = pooled(pacs)
    a = iid_split(samples, k, seed=0, min_size=1)
    assert_partition(a, samples, k, 1)
    sizes = [len(p) for p in a]
    assert max(sizes) - min(sizes) <= 1
    assert a == iid_split(samples, k, seed=0, min_size=1)
    if k > 1:
        assert a != iid_split(samples, k, seed=1, min_size=1)


def test_iid_is_random_not_contiguous(pacs):
    samples = pooled(pacs)
    shards = iid_split(samples, 4, seed=0, min_size=1)
    for p in shards:  # every shard mixes all four domains
        assert set(s.domain for s in p) == set(pacs.domains)


def test_iid_min_size(mini):
    samples = pooled(mini)  # 40 images
    assert [len(p) for p in iid_split(samples, 4, seed=0, min_size=10)] == [10, 10, 10, 10]
    with pytest.raises(DataError) as err:
        iid_split(samples, 5, seed=0, min_size=10)
    assert "data.partition.min_size=10" in str(err.value) and "Fix:" in str(err.value)


# --------------------------------------------------------------------------- partitioned_task


def check_task(task: Task, ds: DomainSet, unseen: list[str]) -> None:
    assert task.classes == ds.classes
    assert list(task.unseen) == unseen
    for u in unseen:
        assert task.unseen[u] == ds.samples[u]
    held = {s.path for u in unseen for s in ds.samples[u]}
    everything: list[str] = []
    for c in task.clients:
        tr, va, te = set(paths(c.train)), set(paths(c.val)), set(paths(c.test))
        assert not (tr & va or tr & te or va & te), c.name
        assert c.train and c.val and c.test, c.name
        assert not ((tr | va | te) & held), f"{c.name} holds unseen images"
        everything += paths(c.train) + paths(c.val) + paths(c.test)
    assert len(everything) == len(set(everything))
    assert sorted(everything) == sorted(paths(pooled(ds, tuple(unseen))))


def kwargs(**over):
    kw = dict(num_clients=4, clients_per_domain=2, alpha=0.5, min_size=5, max_retries=200, seed=0)
    kw.update(over)
    return kw


def test_domain_scheme_is_leave_one_domain_out(pacs):
    task = partitioned_task(pacs, ["sketch"], scheme="domain", **kwargs())
    assert task == leave_one_domain_out(pacs, ["sketch"], seed=0)
    assert [c.name for c in task.clients] == ["art_painting", "cartoon", "photo"]
    check_task(task, pacs, ["sketch"])


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_pooled_schemes_full_pacs(pacs, scheme):
    task = partitioned_task(pacs, ["photo"], scheme=scheme, **kwargs(num_clients=12, min_size=50))
    assert [c.name for c in task.clients] == [f"client{i:02d}" for i in range(12)]
    check_task(task, pacs, ["photo"])
    assert task == partitioned_task(pacs, ["photo"], scheme=scheme, **kwargs(num_clients=12, min_size=50))
    # clients mix the participating domains
    assert len({s.domain for c in task.clients for s in c.train}) == 3
    sizes = [len(c.train) + len(c.val) + len(c.test) for c in task.clients]
    assert min(sizes) >= 50
    if scheme == "iid":
        assert max(sizes) - min(sizes) <= 1


def test_domain_dirichlet_full_pacs(pacs):
    kw = kwargs(clients_per_domain=3, min_size=30)
    task = partitioned_task(pacs, ["art_painting"], scheme="domain_dirichlet", **kw)
    names = [f"{d}_{i}" for d in ("cartoon", "photo", "sketch") for i in range(3)]
    assert [c.name for c in task.clients] == names
    check_task(task, pacs, ["art_painting"])
    for c in task.clients:
        domain = c.name.rsplit("_", 1)[0]
        assert {s.domain for s in c.train + c.val + c.test} == {domain}
    # per domain, the clients together hold the whole domain
    for d in ("cartoon", "photo", "sketch"):
        held = sorted(p for c in task.clients if c.name.startswith(d + "_") for p in paths(c.train + c.val + c.test))
        assert held == sorted(paths(pacs.samples[d]))


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_every_scheme_on_pacs_mini(mini, scheme):
    kw = kwargs(num_clients=3, clients_per_domain=2, alpha=1.0, min_size=3)
    task = partitioned_task(mini, ["cartoon"], scheme=scheme, **kw)
    check_task(task, mini, ["cartoon"])
    expected = {
        "domain": ["art_painting", "photo", "sketch"],
        "dirichlet": ["client00", "client01", "client02"],
        "iid": ["client00", "client01", "client02"],
        "domain_dirichlet": ["art_painting_0", "art_painting_1", "photo_0", "photo_1", "sketch_0", "sketch_1"],
    }[scheme]
    assert [c.name for c in task.clients] == expected
    assert task == partitioned_task(mini, ["cartoon"], scheme=scheme, **kw)


def test_unknown_scheme_and_unseen(mini):
    with pytest.raises(DataError) as err:
        partitioned_task(mini, [], scheme="shards", **kwargs())
    msg = str(err.value)
    assert "data.partition.scheme='shards'" in msg
    assert all(s in msg for s in PARTITION_SCHEMES)
    for scheme in PARTITION_SCHEMES:
        with pytest.raises(DataError, match=r"data\.unseen=\['nowhere'\]"):
            partitioned_task(mini, ["nowhere"], scheme=scheme, **kwargs())


def test_client_too_small_for_splits(mini):
    # 30 images in 15 iid shards of 2: a shard of 2 cannot have train, val and test
    with pytest.raises(DataError) as err:
        partitioned_task(mini, ["sketch"], scheme="iid", **kwargs(num_clients=15, min_size=1))
    msg = str(err.value)
    assert "client00" in msg and "2 images" in msg and "data.split.ratios" in msg
    assert "data.partition.min_size (to at least 3)" in msg


def test_domain_dirichlet_errors_name_domain_and_key(mini):
    with pytest.raises(DataError) as err:
        partitioned_task(mini, [], scheme="domain_dirichlet", **kwargs(clients_per_domain=4, min_size=3))
    msg = str(err.value)
    assert "domain 'art_painting'" in msg and "data.partition.clients_per_domain=4" in msg
    assert "data.partition.min_size=3" in msg


# --------------------------------------------------------------------------- sample_clients


def test_sample_clients():
    picks = sample_clients(10, 0.3, 1, 0)
    assert picks == sample_clients(10, 0.3, 1, 0)
    assert len(picks) == 3 and picks == sorted(picks) and len(set(picks)) == 3
    assert all(0 <= i < 10 for i in picks)
    rounds = [tuple(sample_clients(10, 0.3, r, 0)) for r in range(20)]
    assert len(set(rounds)) > 5, "rounds should draw different clients"
    other_seed = [tuple(sample_clients(10, 0.3, r, 1)) for r in range(20)]
    assert other_seed != rounds, "the seed must change the draws"
    # every client gets picked at some point
    assert set().union(*rounds) == set(range(10))
    assert sample_clients(7, 1.0, 5, 0) == list(range(7))
    assert len(sample_clients(10, 0.01, 0, 0)) == 1  # at least one
    assert len(sample_clients(10, 0.55, 0, 0)) == round(5.5)
    assert len(sample_clients(8, 0.5, 3, 0)) == 4


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_sample_clients_bad_fraction(bad):
    with pytest.raises(ValueError):
        sample_clients(10, bad, 0, 0)
