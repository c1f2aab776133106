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

from ..errors import DataError
from .domains import DomainSet, Sample

T = TypeVar("T")


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
    r0, r1 = _check_ratios(ratios)
    wanted = {"train": r0 > 0, "val": r1 > 0, "test": 1.0 - r0 - r1 > 1e-9}
    clients: list[ClientSplit] = []
    problems: list[str] = []
    for d in participating:
        train, val, test = random_split(ds.samples[d], ratios, seed, key=d)
        sizes = {"train": len(train), "val": len(val), "test": len(test)}
        empty = [k for k, v in sizes.items() if v == 0 and wanted[k]]
        if empty:
            problems.append(
                f"domain {d!r} has only {len(ds.samples[d])} images, so data.split.ratios={list(ratios)!r} gives "
                f"train/val/test sizes {sizes['train']}/{sizes['val']}/{sizes['test']} (empty: {', '.join(empty)}). "
                f"Fix: add images to {d!r}, move it to data.unseen, or leave it out of data.domains."
            )
        clients.append(ClientSplit(name=d, train=train, val=val, test=test))
    if problems:
        raise DataError(problems)
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
