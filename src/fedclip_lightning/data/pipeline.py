"""From config to a federated task: resolve the data set, scan it, split it.

Runs identically in every process (before Fabric launches, so a bad input
stops every rank with the same message and nothing half-starts).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..config import CLASS_NAME_STYLES, CLASS_SPLITS, ON_CORRUPT, SPLIT_MODES, Config, DataConfig
from ..errors import DataError, Problems
from .domains import DomainSet, Sample, scan_domains, verify_images
from .partition import ClientSplit, Task, official_split, partitioned_task, stable_seed
from .synthetic import default_cache_dir, ensure_synthetic_dataset


def resolve_root(cfg: Config) -> Path:
    d = cfg.data
    if d.dataset == "synthetic" and not d.root:
        return ensure_synthetic_dataset(
            default_cache_dir(), per_class=d.synthetic_per_class, image_size=d.synthetic_image_size,
            seed=cfg.seed if d.synthetic_seed is None else d.synthetic_seed, domains=d.domains,
        )
    if not d.root:
        raise DataError("data.root is not set. Fix: pass data.root=/path/to/dataset (folders domain/class/image).")
    return Path(d.root).expanduser()


def scan(cfg: Config) -> DomainSet:
    """The images ``cfg.data`` names: scanned, subsampled (``data.max_per_domain``) and checked."""
    d = cfg.data
    ds = scan_domains(resolve_root(cfg), d.domains, on_corrupt=d.on_corrupt, check_images=False,
                      single_domain_classes=d.single_domain_classes)
    if d.classes.keep is not None or d.classes.count is not None:
        ds = select_classes(ds, d.classes.keep, d.classes.count, d.classes.seed)
    if d.max_per_domain is not None:
        ds = subsample(ds, d.max_per_domain, cfg.seed)
    if d.check_images:  # only the images this run uses
        ds = verify_images(ds, d.on_corrupt)
    return ds


def build_task(cfg: Config) -> tuple[Task, DomainSet]:
    """Scan the image folders named by ``cfg.data`` and split them into clients and unseen domains (with
    ``data.classes.split=base_novel``: the base classes' images, what the run trains on)."""
    ds = scan(cfg)
    if cfg.data.classes.split == "base_novel":
        base, _ = base_novel_classes(ds.classes)
        ds = select_classes(ds, base, None, 0)
    return split_task(cfg, ds)


def base_novel_classes(classes: list[str]) -> tuple[list[str], list[str]]:
    """CoCoOp's base-to-novel split: the first half of the classes in sorted order (rounded up) are the
    base, the rest the novel ones."""
    m = math.ceil(len(classes) / 2)
    return list(classes[:m]), list(classes[m:])


def base_novel_tasks(cfg: Config) -> tuple[Task, Task, Task]:
    """The base, novel and all-classes tasks of ``data.classes.split=base_novel``, each with its own class
    vocabulary (labels index it): the base and the novel classes' images are split each on their own, so each
    task is the one a run with ``data.classes.keep`` set to those classes splits; ``all`` joins the two."""
    ds = scan(cfg)
    base, novel = base_novel_classes(ds.classes)
    tasks = []
    for chosen in (base, novel):
        index = {ds.classes.index(c): i for i, c in enumerate(chosen)}
        part = DomainSet(root=ds.root, classes=chosen, skipped=ds.skipped,
                         samples={d: [Sample(s.path, index[s.label], s.domain) for s in items if s.label in index]
                                  for d, items in ds.samples.items()})
        tasks.append(split_task(cfg, part)[0])
    b, n = tasks
    shift = len(base)

    def joined(x: list[Sample], y: list[Sample]) -> list[Sample]:
        return x + [Sample(s.path, s.label + shift, s.domain) for s in y]

    whole = Task(classes=base + novel, clients=[ClientSplit(cb.name, joined(cb.train, cn.train), joined(cb.val, cn.val),
                                                            joined(cb.test, cn.test)) for cb, cn in zip(b.clients, n.clients)],
                 unseen={d: joined(b.unseen[d], n.unseen[d]) for d in b.unseen})
    return b, n, whole


def split_task(cfg: Config, ds: DomainSet) -> tuple[Task, DomainSet]:
    """The scanned images ``ds`` as clients and unseen domains (``data.split``, ``data.partition``), each
    client's training images cut to ``data.shots`` per class where that is set."""
    task, ds = _split_task(cfg, ds)
    if cfg.data.shots is not None:
        task = few_shot(task, cfg.data.shots, cfg.seed)
    return task, ds


def _split_task(cfg: Config, ds: DomainSet) -> tuple[Task, DomainSet]:
    d = cfg.data
    part = d.partition
    if d.split.mode == "official":
        if part.scheme != "domain":
            raise DataError(f"data.partition.scheme={part.scheme!r}: the official PACS lists split whole domains. "
                            "Fix: use data.partition.scheme=domain with data.split.mode=official, "
                            "or data.split.mode=random.")
        return official_split(ds, list(d.unseen), Path(d.split.official_dir).expanduser()), ds
    return partitioned_task(ds, list(d.unseen), scheme=part.scheme, num_clients=part.num_clients,
                            clients_per_domain=part.clients_per_domain, alpha=part.alpha, min_size=part.min_size,
                            max_retries=part.max_retries, ratios=tuple(d.split.ratios), seed=cfg.seed), ds


def subsample(ds: DomainSet, max_per_domain: int, seed: int) -> DomainSet:
    """At most ``max_per_domain`` images of each domain: a seeded random subset, kept in path order."""
    samples = {}
    for domain, items in ds.samples.items():
        if len(items) > max_per_domain:
            keep = sorted(random.Random(stable_seed(seed, "subset", domain)).sample(range(len(items)), max_per_domain))
            items = [items[i] for i in keep]
        samples[domain] = items
    return DomainSet(root=ds.root, classes=ds.classes, samples=samples, skipped=ds.skipped)


def select_classes(ds: DomainSet, keep: list[str] | None, count: int | None, seed: int) -> DomainSet:
    """``ds`` with only the classes ``keep`` names (``data.classes.keep``; None: all), or a seeded choice of
    ``count`` of them (``data.classes.count``, seeded by ``data.classes.seed``): the other classes' images
    left out, the labels those of the kept classes in the scan's (sorted) order."""
    classes = list(ds.classes)
    chosen = classes
    if keep is not None:
        unknown = [c for c in keep if c not in classes]
        if unknown:
            raise DataError(f"data.classes.keep: {unknown} not among the data set's classes under {ds.root} "
                            f"({_names(classes)}). Fix: name class folders from that list.")
        wanted = set(keep)
        chosen = [c for c in classes if c in wanted]
    if count is not None:
        if count > len(chosen):
            of = "data.classes.keep's" if keep is not None else "the data set's"
            raise DataError(f"data.classes.count={count}: {of} {len(chosen)} classes are fewer. Fix: "
                            f"data.classes.count={len(chosen)} or less.")
        picked = set(random.Random(stable_seed(seed, "classes")).sample(chosen, count))
        chosen = [c for c in chosen if c in picked]
    if chosen == classes:
        return ds
    index = {classes.index(c): i for i, c in enumerate(chosen)}
    samples = {d: [Sample(s.path, index[s.label], s.domain) for s in items if s.label in index]
               for d, items in ds.samples.items()}
    empty = [d for d, items in samples.items() if not items]
    if empty:
        raise DataError(f"data.classes: domain(s) {empty} hold no image of the kept classes {_names(chosen)}. Fix: "
                        "keep classes those domains have, or leave them out of data.domains.")
    return DomainSet(root=ds.root, classes=chosen, samples=samples, skipped=ds.skipped)


def _names(classes: list[str], limit: int = 12) -> str:
    return ", ".join(classes) if len(classes) <= limit else ", ".join(classes[:limit]) + f", ... ({len(classes)})"


def few_shot(task: Task, shots: int, seed: int) -> Task:
    """Each client's training images cut to at most ``shots`` of each class (``data.shots``, CoOp's k-shot
    protocol), its validation and test images and the unseen domains untouched. A class's images are
    shuffled with a seed of (run seed, client, class name) and the first ``shots`` kept, in the split's order:
    the same images in every process and whatever other classes a run keeps, and the 1-shot images among
    the 2-shot ones, and so on."""
    clients = []
    for c in task.clients:
        by_class: dict[int, list[int]] = {}
        for i, s in enumerate(c.train):
            by_class.setdefault(s.label, []).append(i)
        kept: set[int] = set()
        for label, idx in by_class.items():
            random.Random(stable_seed(seed, "shots", c.name, task.classes[label])).shuffle(idx)
            kept.update(idx[:shots])
        clients.append(ClientSplit(c.name, [s for i, s in enumerate(c.train) if i in kept], c.val, c.test))
    return Task(classes=task.classes, clients=clients, unseen=task.unseen)


def with_classes(ds: DomainSet, classes: list[str]) -> DomainSet:
    """``ds`` labelled against the vocabulary ``classes`` (a superset of its own, sorted like a scan of every
    domain): a site that holds some domains of a data set labels its images as a scan of all of them would."""
    missing = [c for c in ds.classes if c not in classes]
    if missing:
        raise DataError(f"class folders {missing} under {ds.root} are not among the run's classes {classes}. "
                        "Fix: name the class folders as the other sites do.")
    index = [classes.index(c) for c in ds.classes]
    samples = {d: [Sample(s.path, index[s.label], s.domain) for s in items] for d, items in ds.samples.items()}
    return DomainSet(root=ds.root, classes=list(classes), samples=samples, skipped=ds.skipped)


def class_prompt_names(classes: list[str], style: str) -> list[str]:
    """Class names as they go into the prompt: verbatim (reference) or with ``_`` as spaces."""
    return [c.replace("_", " ") for c in classes] if style == "spaces" else list(classes)


def make_loader(dataset: Dataset, batch_size: int, *, num_workers: int, shuffle_seed: tuple | None,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled by a generator seeded from ``shuffle_seed`` when given.

    The shuffle order depends only on the seed parts (run seed, round, client),
    never on the process that runs the client, nor on whether the data set
    holds images or their cached features.
    """
    sampler = generator = None
    if shuffle_seed is not None:
        order = torch.Generator()
        order.manual_seed(stable_seed(*shuffle_seed))
        sampler = RandomSampler(dataset, generator=order)
        # Each iteration the DataLoader draws a seed for its workers from its own generator: that one is
        # separate, so the order comes from `sampler` alone, iterated through the loader or directly
        # (evaluate.batches gathers cached features by the batch sampler).
        generator = torch.Generator()
        generator.manual_seed(stable_seed(*shuffle_seed, "loader"))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        collate_fn=_batched if isinstance(dataset, FeatureDataset) else None,
    )


class FeatureDataset(Dataset):
    """Cached frozen features with their labels: items ``(feature [d], label)``.

    Batches are gathered with one indexing operation (``__getitems__``) rather
    than one item at a time; the sampler, and so the order, is the DataLoader's
    own, exactly as for images.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.features[idx], self.labels[idx]


class FeatureBatches:
    """A cached-feature data set's shuffled batches exactly as ``make_loader(dataset, batch_size,
    shuffle_seed=...)`` gives them (through ``training.batches``), without building a DataLoader: the sampler's
    generator seeded the same, the same permutation each epoch, cut into the same batches. ``len()`` is the
    loader's; each iteration is one epoch, as for the loader. For many small clients the DataLoader's set-up
    would cost more than their steps (``tests/test_batched.py`` checks the batches are the loader's)."""

    def __init__(self, dataset: FeatureDataset, batch_size: int, shuffle_seed: tuple):
        self.dataset, self.batch_size = dataset, batch_size
        self.order = torch.Generator()
        self.order.manual_seed(stable_seed(*shuffle_seed))
        self.epochs = 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        if self.epochs:  # RandomSampler draws once more as an epoch's iteration ends (and discards it)
            torch.randperm(n, generator=self.order)
        self.epochs += 1
        for idx in torch.randperm(n, generator=self.order).split(self.batch_size):
            yield self.dataset.features[idx], self.dataset.labels[idx]


def _batched(batch):
    return batch


def feature_dataset(features: torch.Tensor, samples: list[Sample]) -> FeatureDataset:
    return FeatureDataset(features, torch.tensor([s.label for s in samples], dtype=torch.long))


def check_config(d: DataConfig, p: Problems) -> None:
    """The ``data.*`` keys' own problems (whether the folder holds what they say is checked when it is scanned)."""
    bad, positive_int = p.bad, p.positive_int
    if d.dataset != "synthetic" and not d.root:
        bad("data.root", d.root, "no data folder given", "pass data.root=/path/to/dataset (folders domain/class/image)")
    p.choice("data.split.mode", d.split.mode, SPLIT_MODES)
    r = d.split.ratios
    if len(r) != 3 or any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
        bad(
            "data.split.ratios", list(r),
            f"need three non-negative train/val/test fractions summing to 1 (they sum to {sum(r):g})",
            "e.g. data.split.ratios=[0.6,0.2,0.2]",
        )
    elif r[0] == 0 or r[1] == 0:
        bad("data.split.ratios", list(r), "the train and validation fractions must be positive (model selection "
            "needs validation accuracy)", "e.g. data.split.ratios=[0.6,0.2,0.2]")
    if d.split.mode == "official" and not d.split.official_dir:
        bad("data.split.official_dir", None, "split.mode=official needs the folder of the official lists",
            "pass data.split.official_dir=/path/to/PACS_splits")
    positive_int("data.batch_size", d.batch_size, 2)
    positive_int("data.eval_batch_size", d.eval_batch_size)
    positive_int("data.num_workers", d.num_workers, 0)
    if d.max_per_domain is not None:
        positive_int("data.max_per_domain", d.max_per_domain, 5)
    if d.shots is not None:
        positive_int("data.shots", d.shots)
    c = d.classes
    if c.keep is not None:
        if len(c.keep) < 2:
            bad("data.classes.keep", list(c.keep), "a classifier needs at least two classes",
                "name two or more class folders, e.g. data.classes.keep=[dog,horse]")
        elif len(set(c.keep)) != len(c.keep):
            bad("data.classes.keep", list(c.keep), "a class is listed twice", "list each class once")
    if c.count is not None:
        positive_int("data.classes.count", c.count, 2)
        if c.keep is not None and isinstance(c.count, int) and c.count > len(c.keep) >= 2:
            bad("data.classes.count", c.count, f"more than the {len(c.keep)} classes of data.classes.keep",
                f"data.classes.count={len(c.keep)} or less (or leave data.classes.keep out)")
    p.choice("data.classes.split", c.split, CLASS_SPLITS)
    if c.split == "base_novel" and d.partition.scheme != "domain":
        bad("data.classes.split", c.split, f"base-to-novel compares each client on its base and novel classes, and "
            f"data.partition.scheme={d.partition.scheme!r} draws other clients from each", "use "
            "data.partition.scheme=domain with data.classes.split=base_novel")
    if not isinstance(c.seed, int) or isinstance(c.seed, bool):
        bad("data.classes.seed", c.seed, "must be a whole number", "e.g. data.classes.seed=0")
    p.choice("data.on_corrupt", d.on_corrupt, ON_CORRUPT)
    p.choice("data.class_names", d.class_names, CLASS_NAME_STYLES)
    if "{}" not in d.prompt:
        bad("data.prompt", d.prompt, "the prompt has no '{}' for the class name", "e.g. data.prompt='a picture of a {}'")
    if d.domains is not None and len(set(d.domains)) != len(d.domains):
        bad("data.domains", d.domains, "a domain is listed twice", "list each domain once")
    if len(set(d.unseen)) != len(d.unseen):
        bad("data.unseen", d.unseen, "a domain is listed twice", "list each unseen domain once")
    if d.domains is not None:
        missing = [u for u in d.unseen if u not in d.domains]
        if missing:
            bad("data.unseen", d.unseen, f"{missing} not among data.domains={d.domains}",
                "name unseen domains from data.domains")
    positive_int("data.synthetic_per_class", d.synthetic_per_class, 5)
    positive_int("data.synthetic_image_size", d.synthetic_image_size, 16)
