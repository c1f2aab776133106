"""Turning a :class:`~fedclip_lightning.data.domains.DomainSet` into a federated task.

Each participating domain becomes one client with its own train/val/test split;
the unseen (held-out) domains are kept whole for out-of-domain testing.

All functions are pure: randomness comes only from ``random.Random`` instances
seeded with :func:`stable_seed`, never from a global generator or from Python's
per-process salted ``hash()``, so a split depends on nothing but its inputs.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np

from ..errors import DataError
from .domains import DomainSet, Sample

T = TypeVar("T")

_round = round  # sample_clients has a parameter named ``round``

PARTITION_SCHEMES: tuple[str, ...] = ("domain", "dirichlet", "domain_dirichlet", "iid")
"""Valid values of ``data.partition.scheme``."""


@dataclass(frozen=True)
class ClientSplit:
    """One client (a participating domain) and its train/val/test samples."""

    name: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


@dataclass(frozen=True)
class Task:
    """A federated domain-generalisation task.

    Attributes:
        classes: the shared class vocabulary (``Sample.label`` indexes it).
        clients: one split per participating domain, in the DomainSet's
            domain order with the unseen domains left out.
        unseen: every image of each held-out domain, for testing only.
    """

    classes: list[str]
    clients: list[ClientSplit]
    unseen: dict[str, list[Sample]]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``repr(parts)`` with SHA-256.

    The same parts give the same seed in every process and on every platform
    (unlike ``hash()``, which Python salts per process).
    """
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float]:
    r = list(ratios)
    if len(r) not in (2, 3) or any(not (0.0 <= x <= 1.0) for x in r) or r[0] + r[1] > 1.0 + 1e-9:
        raise DataError(
            f"data.split.ratios={r!r}: need train/val/test fractions in [0, 1] with train+val <= 1 "
            "(test takes the rest). Fix: e.g. data.split.ratios=[0.6,0.2,0.2]."
        )
    return float(r[0]), float(r[1])


def random_split(
    samples: Sequence[T],
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    key: str = "",
) -> tuple[list[T], list[T], list[T]]:
    """Shuffle ``samples`` reproducibly and cut them into train, val and test.

    The order is shuffled with ``random.Random(stable_seed(seed, key))``;
    train is the first ``int(r0 * n)`` items, val the next up to
    ``int((r0 + r1) * n)``, test the rest (so only the first two ratios are
    used for cutting). The three lists are disjoint and together hold every
    input item exactly once. The input is not modified.
    """
    r0, r1 = _check_ratios(ratios)
    items = list(samples)
    random.Random(stable_seed(seed, key)).shuffle(items)
    n = len(items)
    a = int(r0 * n)
    b = max(a, min(n, int((r0 + r1) * n)))
    return items[:a], items[a:b], items[b:]


def _resolve_unseen(ds: DomainSet, unseen: Sequence[str]) -> tuple[list[str], list[str]]:
    """Validate ``unseen``; return (participating, unseen) domain names in DomainSet order."""
    names = list(ds.samples)
    unknown = [u for u in unseen if u not in ds.samples]
    if unknown:
        raise DataError(
            f"data.unseen={list(unseen)!r}: {unknown} not among the data set's domains {names}. "
            "Fix: name unseen domains from that list (or [] for none)."
        )
    held = set(unseen)
    participating = [d for d in names if d not in held]
    if not participating:
        raise DataError(
            f"data.unseen={list(unseen)!r}: every domain ({names}) is unseen, so no client is left to train. "
            "Fix: leave at least one domain out of data.unseen."
        )
    return participating, [d for d in names if d in held]


def _split_clients(named: list[tuple[str, list[Sample]]], ratios: Sequence[float], seed: int,
                   describe) -> list[ClientSplit]:
    """Split each named sample list train/val/test (seeded by its name); report every client left with an
    empty split at once. ``describe(name, n, sizes, empty)`` words the problem for the caller's setting."""
    r0, r1 = _check_ratios(ratios)
    wanted = {"train": r0 > 0, "val": r1 > 0, "test": 1.0 - r0 - r1 > 1e-9}
    clients: list[ClientSplit] = []
    problems: list[str] = []
    for name, part in named:
        train, val, test = random_split(part, ratios, seed, key=name)
        sizes = {"train": len(train), "val": len(val), "test": len(test)}
        empty = [k for k, v in sizes.items() if v == 0 and wanted[k]]
        if empty:
            problems.append(describe(name, len(part), sizes, empty, wanted))
        clients.append(ClientSplit(name=name, train=train, val=val, test=test))
    if problems:
        raise DataError(problems)
    return clients


def leave_one_domain_out(
    ds: DomainSet,
    unseen: Sequence[str],
    *,
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> Task:
    """Clients from the participating domains, with the unseen domains held out.

    Every participating domain is split with
    ``random_split(samples, ratios, seed, key=domain)``, so a domain's split
    does not depend on which other domains take part. Each unseen domain
    contributes all its images to ``Task.unseen``.

    Raises:
        DataError: an unknown unseen domain (``data.unseen``); no participating
            domain left; a participating domain too small for a split whose
            ratio is positive to get at least one image.
    """
    participating, held = _resolve_unseen(ds, unseen)

    def describe(d, n, sizes, empty, wanted):
        return (f"domain {d!r} has only {n} images, so data.split.ratios={list(ratios)!r} gives "
                f"train/val/test sizes {sizes['train']}/{sizes['val']}/{sizes['test']} (empty: {', '.join(empty)}). "
                f"Fix: add images to {d!r}, move it to data.unseen, or leave it out of data.domains.")

    clients = _split_clients([(d, ds.samples[d]) for d in participating], ratios, seed, describe)
    return Task(classes=list(ds.classes), clients=clients, unseen={u: list(ds.samples[u]) for u in held})


def _read_list(
    list_file: Path,
    domain: str,
    ds: DomainSet,
    skipped: set[str],
    missing: list[str],
    problems: list[str],
) -> list[Sample]:
    """Parse one official list of ``domain`` into samples, dropping duplicate lines (first kept).

    Absent images are appended to ``missing`` and other problems to
    ``problems``, so one call of :func:`official_split` reports them all.
    """
    index = {c: i for i, c in enumerate(ds.classes)}
    out: list[Sample] = []
    seen: set[str] = set()
    for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        rel = PurePosixPath(fields[0].replace("\\", "/"))
        if len(rel.parts) < 2:
            problems.append(
                f"{list_file}:{lineno}: {fields[0]!r} is not a '<domain>/<class>/<file>' path. "
                "Fix: correct the line or point data.split.official_dir at the official PACS lists."
            )
            continue
        path = str(ds.root.joinpath(*rel.parts))
        if path in seen:
            continue  # e.g. art_painting_crossval_kfold.txt names dog/pic_248.jpg twice
        seen.add(path)
        if path in skipped:
            continue  # corrupt, dropped by the scan (data.on_corrupt=skip)
        cls = rel.parts[-2]
        if cls not in index:
            problems.append(
                f"{list_file}:{lineno}: class {cls!r} of {fields[0]!r} is not among the data set's classes "
                f"{ds.classes}. Fix: use lists that match data.root, or include the domain that has this class."
            )
            continue
        if not os.path.isfile(path):
            missing.append(path)
            continue
        out.append(Sample(path=path, label=index[cls], domain=domain))
    return out


def official_split(ds: DomainSet, unseen: Sequence[str], split_dir: str | os.PathLike[str]) -> Task:
    """Clients from the official PACS train/crossval lists.

    For each participating domain ``d``: train is ``<d>_train_kfold.txt`` and
    val is ``<d>_crossval_kfold.txt``. The official lists have no held-in test
    split (``<d>_test_kfold.txt`` is the whole domain, used for leave-one-
    domain-out testing), so a client's ``test`` is the crossval list as well.
    Unseen domains contribute all their scanned images.

    Each listed path (``domain/class/file``) is resolved relative to
    ``ds.root``; the label is the index of its class folder in ``ds.classes``
    (the 1..7 number on the line is ignored). Duplicate lines are dropped,
    keeping the first (``art_painting_crossval_kfold.txt`` names pic_248
    twice). Images dropped as corrupt by the scan are left out.

    Raises:
        DataError: unknown unseen domain (``data.unseen``); list files missing
            from ``split_dir`` (``data.split.official_dir``); listed images
            absent under ``ds.root``; malformed lines.
    """
    participating, held = _resolve_unseen(ds, unseen)
    sdir = Path(split_dir).expanduser()
    if not sdir.is_dir():
        raise DataError(
            f"data.split.official_dir={str(split_dir)!r}: not a folder. "
            "Fix: point it at the folder holding <domain>_train_kfold.txt and <domain>_crossval_kfold.txt."
        )
    wanted = {d: (sdir / f"{d}_train_kfold.txt", sdir / f"{d}_crossval_kfold.txt") for d in participating}
    absent = [f.name for pair in wanted.values() for f in pair if not f.is_file()]
    if absent:
        raise DataError(
            f"data.split.official_dir={str(split_dir)!r}: missing list file(s) {absent}. "
            "Fix: point data.split.official_dir at the official PACS split lists, or use data.split.mode=random."
        )

    skipped = set(ds.skipped)
    missing: list[str] = []
    problems: list[str] = []
    clients: list[ClientSplit] = []
    for d, (train_file, val_file) in wanted.items():
        train = _read_list(train_file, d, ds, skipped, missing, problems)
        val = _read_list(val_file, d, ds, skipped, missing, problems)
        if not train or not val:
            problems.append(
                f"domain {d!r}: the official lists give {len(train)} train and {len(val)} crossval images. "
                "Fix: check data.split.official_dir and data.root belong to the same data set."
            )
        clients.append(ClientSplit(name=d, train=train, val=val, test=list(val)))
    if missing:
        shown = ", ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
        problems.insert(
            0,
            f"{len(missing)} image(s) named in the lists of data.split.official_dir={str(split_dir)!r} are absent "
            f"under data.root={str(ds.root)!r}: {shown}. "
            "Fix: restore the images, or point data.root at the complete data set.",
        )
    if problems:
        raise DataError(problems[:30] + ([f"... and {len(problems) - 30} more problems"] if len(problems) > 30 else []))
    return Task(classes=list(ds.classes), clients=clients, unseen={u: list(ds.samples[u]) for u in held})


# --------------------------------------------------------------------------
# Partitions with more (or other) clients than domains
# --------------------------------------------------------------------------


def _by_path(samples: Sequence[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: s.path)


def _check_partition_args(key: str, clients_key: str, num_clients: int, min_size: int) -> None:
    problems = []
    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        problems.append(f"{clients_key}={num_clients!r}: need a whole number >= 1. Fix: set {clients_key} to e.g. 4.")
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
        problems.append(f"{key}.min_size={min_size!r}: need a whole number >= 0. Fix: set {key}.min_size to e.g. 10.")
    if problems:
        raise DataError(problems)


def _dirichlet_split(
    samples: Sequence[Sample],
    num_clients: int,
    alpha: float,
    *,
    num_classes: int,
    seed: int,
    min_size: int,
    max_retries: int,
    key: str,
    clients_key: str,
) -> list[list[Sample]]:
    """:func:`dirichlet_split`, with the config key of the client count given separately."""
    _check_partition_args(key, clients_key, num_clients, min_size)
    problems = []
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and np.isfinite(alpha) and alpha > 0):
        problems.append(f"{key}.alpha={alpha!r}: need a finite number > 0. Fix: set {key}.alpha to e.g. 0.5.")
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 1:
        problems.append(
            f"{key}.max_retries={max_retries!r}: need a whole number >= 1. Fix: set {key}.max_retries to e.g. 100."
        )
    if problems:
        raise DataError(problems)
    bad = sorted({s.label for s in samples if not (0 <= s.label < num_classes)})
    if bad:
        raise ValueError(f"labels {bad} are outside range(num_classes={num_classes})")

    n = len(samples)
    if num_clients * min_size > n:
        raise DataError(
            f"{key}.min_size={min_size} is impossible: {clients_key}={num_clients} clients of at least {min_size} "
            f"images need {num_clients * min_size}, but there are only {n} images. "
            f"Fix: lower {key}.min_size (to at most {n // num_clients}) or use fewer clients ({clients_key})."
        )

    # Per class, a fixed order (by path) so the result depends only on the set of samples.
    per_class = [_by_path([s for s in samples if s.label == c]) for c in range(num_classes)]
    per_class = [group for group in per_class if group]
    smallest_seen = -1
    for attempt in range(max_retries):
        rng = np.random.default_rng(stable_seed(seed, "dirichlet", attempt))
        clients: list[list[Sample]] = [[] for _ in range(num_clients)]
        for group in per_class:
            order = rng.permutation(len(group))
            p = np.nan_to_num(rng.dirichlet(np.full(num_clients, float(alpha))), nan=0.0)
            total = float(p.sum())
            if total <= 0.0:  # underflow with a tiny alpha: everything to one client
                p = np.zeros(num_clients)
                p[int(rng.integers(num_clients))] = 1.0
            else:
                p = p / total
            cuts = (np.cumsum(p)[:-1] * len(group)).astype(int)
            for i, part in enumerate(np.split(order, cuts)):
                clients[i].extend(group[j] for j in part)
        smallest = min(len(c) for c in clients)
        smallest_seen = max(smallest_seen, smallest)
        if smallest >= min_size:
            return [_by_path(c) for c in clients]
    raise DataError(
        f"{key}: no Dirichlet label-skew split of {n} images into {clients_key}={num_clients} clients with "
        f"{key}.alpha={alpha} gave every client at least {key}.min_size={min_size} images in "
        f"{key}.max_retries={max_retries} draws (the best draw's smallest client had {smallest_seen}); "
        f"such a split is impossible or very unlikely with these numbers. "
        f"Fix: lower {key}.min_size, raise {key}.alpha, or use fewer clients ({clients_key})."
    )


def dirichlet_split(
    samples: list[Sample],
    num_clients: int,
    alpha: float,
    *,
    num_classes: int,
    seed: int,
    min_size: int,
    max_retries: int,
    key: str = "data.partition",
) -> list[list[Sample]]:
    """Label-skewed partition of ``samples`` into ``num_clients`` clients.

    For each class, proportions ``p ~ Dir(alpha)`` over the clients are drawn
    and that class's samples (sorted by path, then shuffled) are cut at the
    cumulative proportions. Small ``alpha`` gives each client few classes;
    large ``alpha`` gives near-uniform label histograms. A draw that leaves a
    client with fewer than ``min_size`` samples is redrawn with the next
    derived seed (``stable_seed(seed, "dirichlet", attempt)``), at most
    ``max_retries`` draws in all.

    Returns one list per client, each sorted by path; together they hold
    every input sample exactly once. ``key`` is the config prefix named in
    error messages.

    Raises:
        DataError: ``num_clients * min_size > len(samples)`` (at once, without
            drawing); no draw in ``max_retries`` met ``min_size``; bad
            ``num_clients``/``alpha``/``min_size``/``max_retries``.
        ValueError: a label outside ``range(num_classes)``.
    """
    return _dirichlet_split(
        samples,
        num_clients,
        alpha,
        num_classes=num_classes,
        seed=seed,
        min_size=min_size,
        max_retries=max_retries,
        key=key,
        clients_key=f"{key}.num_clients",
    )


def iid_split(
    samples: list[Sample],
    num_clients: int,
    *,
    seed: int,
    min_size: int,
    key: str = "data.partition",
) -> list[list[Sample]]:
    """Uniform random shards: a seeded shuffle cut into ``num_clients`` near-equal parts.

    Shard sizes differ by at most one (the first ``len % num_clients`` shards
    get the extra sample). The shuffle uses
    ``random.Random(stable_seed(seed, "iid"))`` on the samples sorted by
    path; each shard is returned sorted by path.

    Raises:
        DataError: a shard would hold fewer than ``min_size`` samples; bad
            ``num_clients``/``min_size``.
    """
    clients_key = f"{key}.num_clients"
    _check_partition_args(key, clients_key, num_clients, min_size)
    items = _by_path(samples)
    n = len(items)
    if n // num_clients < min_size:
        raise DataError(
            f"{key}.min_size={min_size}: {n} images cut into {clients_key}={num_clients} iid shards give "
            f"shards of only {n // num_clients} images. "
            f"Fix: lower {key}.min_size (to at most {n // num_clients}) or use fewer clients ({clients_key})."
        )
    random.Random(stable_seed(seed, "iid")).shuffle(items)
    base, extra = divmod(n, num_clients)
    shards: list[list[Sample]] = []
    start = 0
    for i in range(num_clients):
        size = base + (1 if i < extra else 0)
        shards.append(_by_path(items[start : start + size]))
        start += size
    return shards


def _min_size_for(ratios: Sequence[float], wanted: dict[str, bool]) -> int | None:
    """The smallest client size for which :func:`random_split` fills every wanted split."""
    r0, r1 = _check_ratios(ratios)
    for n in range(1, 10_001):
        a = int(r0 * n)
        b = max(a, min(n, int((r0 + r1) * n)))
        sizes = {"train": a, "val": b - a, "test": n - b}
        if all(sizes[k] > 0 for k, w in wanted.items() if w):
            return n
    return None


def partitioned_task(
    ds: DomainSet,
    unseen: list[str],
    *,
    scheme: str,
    num_clients: int,
    clients_per_domain: int,
    alpha: float,
    min_size: int,
    max_retries: int,
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> Task:
    """A federated task whose clients follow ``data.partition.scheme``.

    Unseen domains are held out whole, as in :func:`leave_one_domain_out`.
    The participating images become clients by ``scheme``:

    * ``"domain"``: one client per domain, exactly :func:`leave_one_domain_out`.
    * ``"dirichlet"``: all participating images pooled, :func:`dirichlet_split`
      into ``num_clients`` clients ``client00``, ``client01``, ...
    * ``"domain_dirichlet"``: each domain :func:`dirichlet_split` into
      ``clients_per_domain`` clients ``<domain>_0``, ``<domain>_1``, ...
      (seeded with ``stable_seed(seed, domain)``).
    * ``"iid"``: pooled, :func:`iid_split` into ``num_clients`` clients
      ``client00``, ...

    Each client's samples are then split with
    ``random_split(samples, ratios, seed, key=client_name)``.

    Raises:
        DataError: unknown scheme (``data.partition.scheme``); the unseen-domain
            errors of :func:`leave_one_domain_out`; a partition that cannot
            meet ``data.partition.min_size``; a client too small for every
            split with a positive ratio to get an image.
    """
    if scheme not in PARTITION_SCHEMES:
        raise DataError(
            f"data.partition.scheme={scheme!r}: unknown scheme. Fix: use one of {', '.join(PARTITION_SCHEMES)}."
        )
    if scheme == "domain":
        return leave_one_domain_out(ds, unseen, ratios=ratios, seed=seed)
    participating, held = _resolve_unseen(ds, unseen)
    r0, r1 = _check_ratios(ratios)
    num_classes = len(ds.classes)
    pool = [s for d in participating for s in ds.samples[d]]

    named: list[tuple[str, list[Sample]]] = []
    if scheme == "dirichlet":
        parts = dirichlet_split(
            pool, num_clients, alpha, num_classes=num_classes, seed=seed, min_size=min_size, max_retries=max_retries
        )
        width = max(2, len(str(num_clients - 1)))
        named = [(f"client{i:0{width}d}", part) for i, part in enumerate(parts)]
    elif scheme == "iid":
        parts = iid_split(pool, num_clients, seed=seed, min_size=min_size)
        width = max(2, len(str(num_clients - 1)))
        named = [(f"client{i:0{width}d}", part) for i, part in enumerate(parts)]
    else:  # domain_dirichlet
        for d in participating:
            try:
                parts = _dirichlet_split(
                    ds.samples[d],
                    clients_per_domain,
                    alpha,
                    num_classes=num_classes,
                    seed=stable_seed(seed, d),
                    min_size=min_size,
                    max_retries=max_retries,
                    key="data.partition",
                    clients_key="data.partition.clients_per_domain",
                )
            except DataError as exc:
                raise DataError([f"domain {d!r}: {p}" for p in exc.problems]) from None
            named.extend((f"{d}_{i}", part) for i, part in enumerate(parts))

    def describe(name, n, sizes, empty, wanted):
        return (f"client {name!r} (data.partition.scheme={scheme}) has only {n} images, so "
                f"data.split.ratios={list(ratios)!r} gives train/val/test sizes "
                f"{sizes['train']}/{sizes['val']}/{sizes['test']} (empty: {', '.join(empty)}). "
                f"Fix: raise data.partition.min_size (to at least {_min_size_for(ratios, wanted)}), "
                "use fewer clients, or change data.split.ratios.")

    clients = _split_clients(named, ratios, seed, describe)
    return Task(classes=list(ds.classes), clients=clients, unseen={u: list(ds.samples[u]) for u in held})


def sample_clients(num_clients: int, fraction: float, round: int, seed: int) -> list[int]:  # noqa: A002
    """The sorted indices of the clients that train in round ``round``.

    ``max(1, round(fraction * num_clients))`` clients are drawn without
    replacement with ``random.Random(stable_seed(seed, "sample", round))``;
    ``fraction=1.0`` gives every client. Evaluation still covers all clients.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]`` or ``num_clients < 1``.
    """
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 < fraction <= 1.0):
        raise ValueError(
            f"federation.client_fraction={fraction!r}: need a fraction in (0, 1]. "
            "Fix: set federation.client_fraction to e.g. 0.5, or 1.0 for every client."
        )
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: need at least one client")
    k = min(num_clients, max(1, int(_round(fraction * num_clients))))
    if k == num_clients:
        return list(range(num_clients))
    return sorted(random.Random(stable_seed(seed, "sample", round)).sample(range(num_clients), k))
