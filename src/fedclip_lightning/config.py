"""Typed configuration.

Hydra composes YAML from ``conf/``; :func:`to_config` turns the result into
these dataclasses (OmegaConf checks the types) and :func:`validate` checks the
values, collecting every problem into one :class:`ConfigError` that names each
bad value, the key that set it and the fix. Library code only ever sees these
frozen-in-spirit dataclasses, never a mutable DictConfig.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from .errors import ConfigError


def _shipped_weights(name: str) -> str:
    from .weights import path

    return path(name)


# ${fedclip_weights:<name>}: the path of weights shipped in the package (the demo's small CLIP).
OmegaConf.register_new_resolver("fedclip_weights", _shipped_weights, replace=True)

FEATURE_CACHE_MODES = ("auto", "on", "off")
LOSSES = ("contrastive", "prototype")
AGGREGATIONS = ("uniform", "samples")
OPTIMIZER_STATES = ("reset", "keep")
SPLIT_MODES = ("random", "official")
ON_CORRUPT = ("error", "skip")
CLASS_NAME_STYLES = ("verbatim", "spaces")
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16", "pure_fp16")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


@dataclass
class BackboneConfig:
    # Any open_clip model name (``open_clip.list_models()``), e.g. ViT-B-32.
    name: str = "fedclip-tiny-vit"
    # An open_clip pretrained tag (e.g. ``openai``), a local checkpoint file,
    # or null for random initialisation (tests and the demo only).
    pretrained: str | None = None
    # Where open_clip / Hugging Face look for (and would download) weights.
    cache_dir: str | None = None
    # Precision of the frozen encoders; the adapter always runs in fp32.
    # auto: fp16 on a GPU, fp32 on the CPU. fp16 is clip.load's mixed precision (the reference's numerics:
    # weights in fp16, LayerNorm computed in fp32); pure_fp16 runs everything in fp16; bf16 is pure bf16
    # (and a ViT's last block runs its MLP on the class token alone: 5% fewer FLOPs, the same bits on a CPU).
    # fast: the fastest the device runs natively (bf16 on CPUs with AVX512-BF16/AMX and GPUs with bf16,
    # fp16 on other GPUs, fp32 on other CPUs). The feature cache keys on the precision a run resolves to.
    precision: str = "auto"
    # QuickGELU activations (OpenAI weights need them); null: as the tag says.
    quick_gelu: bool | None = None
    # Try to download a tag that is not in the local caches.
    download: bool = True


@dataclass
class SplitConfig:
    mode: str = "random"  # random: seeded 60/20/20; official: PACS lists
    ratios: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    official_dir: str | None = None


@dataclass
class PartitionConfig:
    # domain: one client per participating domain (the paper's setting);
    # dirichlet: label skew over the pooled participating images, num_clients clients;
    # domain_dirichlet: clients_per_domain clients per domain, label skew inside each domain;
    # iid: num_clients uniform random shards of the pooled images.
    scheme: str = "domain"
    num_clients: int = 4
    clients_per_domain: int = 2
    alpha: float = 0.5  # Dirichlet concentration: small = strong label skew
    min_size: int = 10  # every client gets at least this many images
    max_retries: int = 100  # Dirichlet draws before giving up with a clear message


@dataclass
class DataConfig:
    # Preset name (pacs, vlcs, office_home, domainnet, pacs_mini, synthetic,
    # custom); informational except ``synthetic``, which generates the demo set.
    dataset: str = "synthetic"
    root: str | None = None
    domains: list[str] | None = None  # null: every sub-folder of root
    unseen: list[str] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    # Use at most this many images per domain (a seeded subset); null: all.
    max_per_domain: int | None = None
    on_corrupt: str = "error"
    check_images: bool = True
    single_domain_classes: bool = False  # accept a class folder that only one of 3+ domains has
    prompt: str = "a picture of a {}"
    class_names: str = "verbatim"  # verbatim (reference) or spaces (_ -> ' ')
    # Synthetic demo set only.
    synthetic_per_class: int = 24
    synthetic_image_size: int = 64


@dataclass
class AlgorithmConfig:
    """The keys every training algorithm shares; an algorithm adds its own in a subclass that lives in its
    module (``fedclip_lightning.algorithms``), e.g. ``mu`` for FedProx. Hydra composes ``algorithm`` as
    a plain mapping and :func:`to_config` checks it against the chosen algorithm's class."""

    name: str = "fedclip"
    loss: str = "contrastive"  # contrastive (reference) or prototype
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.2
    local_epochs: int = 1
    optimizer_state: str = "reset"  # reset each round (reference) or keep


@dataclass
class FeaturesConfig:
    # auto: encode each image once and train on cached frozen features wherever
    # that is exact (frozen encoders, no augmentation: fedclip, zeroshot);
    # on: the same, refused where not exact; off: run the encoder on every batch
    # of every round, as the reference release does.
    cache: str = "auto"
    # Where feature files live; null: <FEDCLIP_CACHE_DIR or ~/.cache/fedclip-lightning>/features.
    dir: str | None = None
    # false: keep features in memory for this run only.
    persist: bool = True
    batch_size: int = 256
    # Image-decoding workers for the encoder pass; null: min(8, CPU cores).
    num_workers: int | None = None
    # Images per encoder call within a batch of features.batch_size; null: auto (the whole batch on a GPU;
    # on a CPU about 800 tokens' worth, 16 images for ViT-B/32, where one call's activations stay in the
    # caches: 1.2-1.4x faster than 256 at once). bf16 features are the same bits whatever the value; fp32
    # features the same to rounding (the CPU's fp32 kernels block by the call's size).
    encoder_batch_size: int | None = None


@dataclass
class FederationConfig:
    rounds: int = 10
    aggregation: str = "uniform"  # uniform (reference) or samples
    eval_interval: int = 1
    # Fraction of clients that train in a round (seeded draw per round); evaluation covers every client.
    client_fraction: float = 1.0
    # Checkpoint every this many rounds (0: only when preempted); keep the newest keep_checkpoints.
    checkpoint_interval: int = 1
    # ...but at most once per this many seconds (the last round and a preemption always checkpoint): a
    # crash loses at most this much work, and fast rounds do not spend their time writing checkpoints.
    checkpoint_min_seconds: float = 10.0
    # After training, evaluate zero-shot CLIP (the frozen model and the class prompts) on the same splits:
    # the end-of-run table's baseline column and summary.json's zero_shot block (one evaluation pass).
    zero_shot_baseline: bool = True
    # -- the server side (federation/server_update.py); the defaults are the reference's plain averaging.
    # none (average), momentum (FedAvgM), adam, yogi, adagrad (Reddi et al. 2021).
    server_optimizer: str = "none"
    server_lr: float | None = None  # null: 1.0 for none/momentum, 1e-2 for adam/yogi/adagrad
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # mean (weighted, streamed), median, trimmed_mean, krum, multi_krum.
    aggregator: str = "mean"
    trim_beta: float = 0.1  # trimmed_mean: fraction trimmed at each end
    krum_f: int = 0  # krum / multi_krum: attackers assumed
    multi_krum_m: int | None = None  # multi_krum: rows averaged (null: K - f)
    # Byzantine-client simulator: none, sign_flip, gaussian, scaled, on a seeded fraction of the clients.
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 100.0
    # Client-level DP (DP-FedAvg): none, server (noise on the sum), client (local DP).
    dp: str = "none"
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_target_epsilon: float | None = None  # picks dp_noise_multiplier for the planned rounds
    dp_delta: float = 1e-5
    # The noise from the operating system's entropy (a deployment), not from a stream seeded by the config
    # (simulation: reproducible, bitwise on resume, and so known to anyone who has the config).
    dp_secure: bool = False
    # Unreliable clients: a client drops (sends nothing) with this probability each round; a straggler
    # fraction completes only straggler_work of its local steps; local epochs drawn per (round, client)
    # uniformly from local_epochs_range=[lo, hi] (null: algorithm.local_epochs for everyone).
    dropout: float = 0.0
    straggler_fraction: float = 0.0
    straggler_work: float = 0.5
    local_epochs_range: list[int] | None = None
    keep_checkpoints: int = 2


@dataclass
class FabricConfig:
    accelerator: str = "cpu"
    devices: Any = 1  # int, "auto" or a list of device indices
    num_nodes: int = 1
    strategy: str = "auto"  # auto or ddp (clients are never wrapped in DDP; it is only the process group)
    # How long a collective waits for the slowest process (one rank may hold a much larger client).
    timeout_minutes: int = 120


@dataclass
class WandbConfig:
    project: str = "fedclip-lightning"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto: offline when no API key is configured


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb, csv or none (metrics.csv is always written)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "outputs"
    run_name: str | None = None
    progress: bool = True
    # never: start afresh (a previous run in the same run directory is replaced); auto: continue from
    # the newest checkpoint in the run directory if there is one; or a checkpoint folder to continue from.
    resume: str = "never"
    # Printed at start: why this run's accuracy means what it means.
    note: str | None = None
    # This run's name in a sweep's tables and plots (the sweep sets it: algorithm and axis values).
    label: str | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # One algorithm's config (a subclass of AlgorithmConfig, chosen by ``name`` from the registry).
    algorithm: Any = field(default_factory=lambda: {"name": "fedclip"})
    federation: FederationConfig = field(default_factory=FederationConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def to_config(cfg: DictConfig | dict) -> Config:
    """Merge composed YAML into the typed schema; type mistakes become ConfigError.

    ``algorithm`` is checked against the class its ``name`` picks from the
    algorithm registry: a key that algorithm does not have is a mistake too.
    """
    schema = OmegaConf.structured(Config)
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    unknown = _unknown_keys(OmegaConf.to_container(raw, resolve=False), Config)
    if unknown:
        raise ConfigError([f"{k}: unknown key{hint}. Fix: correct or drop it (`fedclip-lightning --print-config` "
                           "lists every key)." for k, hint in unknown])
    try:
        merged = OmegaConf.merge(schema, raw)
        algo_node = merged.algorithm
        merged.algorithm = {}
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {msg}. Fix the value of '{key}' (see conf/ for the expected type).") from None
    assert isinstance(obj, Config)
    obj.algorithm = algorithm_config(algo_node)
    return obj


def _unknown_keys(data: Any, cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """Keys of ``data`` that the dataclass ``cls`` (recursively) does not have, with a spelling hint.
    (``+section.key=...`` on the command line would otherwise be dropped without a word.)"""
    import difflib

    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            out.append((f"{prefix}{key}", f" (did you mean {prefix}{close[0]}?)" if close else ""))
        elif key != "algorithm":  # the algorithm's own class checks its keys (algorithm_config)
            sub_cls = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
            if isinstance(sub_cls, type):
                out += _unknown_keys(value, sub_cls, f"{prefix}{key}.")
    return out


def algorithm_config(node: Any) -> AlgorithmConfig:
    """The ``algorithm`` mapping as the config class of the algorithm its ``name`` picks."""
    from .algorithms import registry

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    name = data.get("name", "fedclip")
    cls = registry.get(str(name)).config_class
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls), data)
        out = OmegaConf.to_object(typed)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "key", None) or getattr(exc, "full_key", None) or "?"
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"algorithm.{key}: {msg} (algorithm={name} has the keys {known}). Fix: drop or correct "
                          f"algorithm.{key}; `fedclip-lightning algorithm={name} --print-config` lists them.") from None
    return out


def encoder_frozen(cfg: Config) -> bool:
    """Does the image encoder stay frozen (so its features never change)?"""
    from .algorithms import registry

    return registry.get(cfg.algorithm.name).encoder_frozen(cfg.algorithm)


def uses_feature_cache(cfg: Config) -> bool:
    """Train on cached frozen features? (Only where that is exact.)"""
    return cfg.features.cache != "off" and encoder_frozen(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config (for logging and summary.json)."""
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> Config:
    """Check every value; raise one ConfigError listing all problems."""
    problems: list[str] = []

    def bad(key: str, value: Any, why: str, fix: str) -> None:
        problems.append(f"{key}={value!r}: {why}. Fix: {fix}.")

    def choice(key: str, value: Any, options: tuple[str, ...]) -> None:
        if value not in options:
            bad(key, value, "unknown value", f"use one of {', '.join(options)}")

    def positive_int(key: str, value: int, minimum: int = 1) -> None:
        if value < minimum:
            bad(key, value, f"must be >= {minimum}", f"set {key}={minimum} or more")

    from .algorithms import registry

    a = cfg.algorithm
    choice("algorithm.loss", a.loss, LOSSES)
    choice("algorithm.optimizer_state", a.optimizer_state, OPTIMIZER_STATES)
    if not (a.lr > 0 and math.isfinite(a.lr)):
        bad("algorithm.lr", a.lr, "the learning rate must be a positive number", "e.g. algorithm.lr=5e-5")
    if len(a.betas) != 2 or not all(0 <= b < 1 for b in a.betas):
        bad("algorithm.betas", a.betas, "Adam needs two betas in [0, 1)", "e.g. algorithm.betas=[0.9,0.98]")
    if not a.eps > 0:
        bad("algorithm.eps", a.eps, "must be > 0", "e.g. algorithm.eps=1e-6")
    if a.weight_decay < 0:
        bad("algorithm.weight_decay", a.weight_decay, "must be >= 0", "e.g. algorithm.weight_decay=0.2")
    positive_int("algorithm.local_epochs", a.local_epochs)
    registry.get(a.name).check(a, bad)

    f = cfg.federation
    positive_int("federation.rounds", f.rounds)
    choice("federation.aggregation", f.aggregation, AGGREGATIONS)
    positive_int("federation.eval_interval", f.eval_interval)
    positive_int("federation.checkpoint_interval", f.checkpoint_interval, 0)
    positive_int("federation.keep_checkpoints", f.keep_checkpoints, 1)
    _validate_server_side(f, cfg, bad, choice)
    if not f.checkpoint_min_seconds >= 0:
        bad("federation.checkpoint_min_seconds", f.checkpoint_min_seconds, "must be >= 0",
            "e.g. federation.checkpoint_min_seconds=10 (0: every checkpoint_interval rounds, however fast)")
    if cfg.resume not in ("never", "auto") and not Path(cfg.resume).expanduser().is_dir():
        bad("resume", cfg.resume, "neither never, auto nor an existing checkpoint folder",
            "use resume=auto (the newest checkpoint of the run directory) or a path to outputs/<run>/checkpoints/round-N")

    d = cfg.data
    if d.dataset != "synthetic" and not d.root:
        bad("data.root", d.root, "no data folder given", "pass data.root=/path/to/dataset (folders domain/class/image)")
    choice("data.split.mode", d.split.mode, SPLIT_MODES)
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
    choice("data.on_corrupt", d.on_corrupt, ON_CORRUPT)
    choice("data.class_names", d.class_names, CLASS_NAME_STYLES)
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

    fc = cfg.features
    choice("features.cache", fc.cache, FEATURE_CACHE_MODES)
    if fc.cache == "on" and not encoder_frozen(cfg):
        bad("features.cache", fc.cache, f"cached features are not exact for algorithm={cfg.algorithm.name} "
            f"as configured ({registry.get(cfg.algorithm.name).what_trains(cfg.algorithm)}: it trains the "
            "image encoder)", "set features.cache=off (or auto)")
    f0 = cfg.federation
    if not 0 < f0.client_fraction <= 1:
        bad("federation.client_fraction", f0.client_fraction, "must be in (0, 1]", "e.g. federation.client_fraction=0.5")
    positive_int("features.batch_size", fc.batch_size)
    if fc.num_workers is not None:
        positive_int("features.num_workers", fc.num_workers, 0)
    if fc.encoder_batch_size is not None:
        positive_int("features.encoder_batch_size", fc.encoder_batch_size)

    choice("backbone.precision", cfg.backbone.precision, PRECISIONS)
    if not cfg.backbone.name:
        bad("backbone.name", cfg.backbone.name, "empty model name", "e.g. backbone.name=ViT-B-32")
    else:
        from .model.backbone import model_name_problem

        problem = model_name_problem(cfg.backbone.name)
        if problem:
            problems.append(problem)

    fb = cfg.fabric
    choice("fabric.accelerator", fb.accelerator, ACCELERATORS)
    choice("fabric.strategy", fb.strategy, ("auto", "ddp"))
    positive_int("fabric.timeout_minutes", fb.timeout_minutes)
    if fb.accelerator == "cpu" and isinstance(fb.devices, (list, tuple)):
        bad("fabric.devices", list(fb.devices), "CPU processes are counted, not indexed",
            "give a count, e.g. fabric.devices=2")
    positive_int("fabric.num_nodes", fb.num_nodes)
    dev = fb.devices
    if not (dev == "auto" or (isinstance(dev, int) and dev >= 1) or
            (isinstance(dev, (list, tuple)) and len(dev) > 0 and all(isinstance(i, int) for i in dev))):
        bad("fabric.devices", dev, "must be a positive count, 'auto' or a list of device indices",
            "e.g. fabric.devices=2")

    choice("logger.name", cfg.logger.name, LOGGERS)
    choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)

    if problems:
        raise ConfigError(problems)
    return cfg


# Settings that act only where another setting turns them on: key -> (that setting, whether a value of it turns
# the key on, the fix). Set to anything but its default elsewhere, the key is refused; a sweep whose axis turns the
# feature off leaves the key out of those runs (sweep.plan).
ONLY_WITH: dict[str, tuple[str, Any, str]] = {
    "federation.dp_target_epsilon": ("federation.dp", lambda v: v != "none",
                                     "add federation.dp=server (or client), or drop dp_target_epsilon"),
    "federation.dp_secure": ("federation.dp", lambda v: v != "none",
                             "add federation.dp=server (or client), or drop dp_secure"),
    "federation.attack_fraction": ("federation.attack", lambda v: v != "none",
                                   "add federation.attack=sign_flip (or scaled, gaussian), or drop attack_fraction"),
    "federation.trim_beta": ("federation.aggregator", lambda v: v == "trimmed_mean",
                             "add federation.aggregator=trimmed_mean, or drop trim_beta"),
    "federation.krum_f": ("federation.aggregator", lambda v: v in ("krum", "multi_krum"),
                          "add federation.aggregator=krum (or multi_krum), or drop krum_f"),
    "federation.multi_krum_m": ("federation.aggregator", lambda v: v == "multi_krum",
                                "add federation.aggregator=multi_krum, or drop multi_krum_m"),
}


def _validate_server_side(f: FederationConfig, cfg: Config, bad, choice) -> None:
    from .algorithms import registry
    from .federation.attacks import ATTACKS
    from .federation.privacy import DP_MODES
    from .federation.robust import AGGREGATORS
    from .federation.server_opt import SERVER_OPTIMIZERS

    choice("federation.server_optimizer", f.server_optimizer, SERVER_OPTIMIZERS)
    choice("federation.aggregator", f.aggregator, AGGREGATORS)
    choice("federation.attack", f.attack, ATTACKS)
    choice("federation.dp", f.dp, DP_MODES)
    for key in ("server_beta1", "server_beta2"):
        if not 0 <= getattr(f, key) < 1:
            bad(f"federation.{key}", getattr(f, key), "must be in [0, 1)", f"e.g. federation.{key}=0.9")
    if f.server_lr is not None and not f.server_lr > 0:
        bad("federation.server_lr", f.server_lr, "must be > 0", "e.g. federation.server_lr=1e-2, or null for the default")
    if not f.server_tau > 0:
        bad("federation.server_tau", f.server_tau, "must be > 0", "e.g. federation.server_tau=1e-3")
    if not 0 <= f.trim_beta < 0.5:
        bad("federation.trim_beta", f.trim_beta, "must be in [0, 0.5)", "e.g. federation.trim_beta=0.1")
    if f.krum_f < 0:
        bad("federation.krum_f", f.krum_f, "must be >= 0", "e.g. federation.krum_f=1")
    if f.multi_krum_m is not None and f.multi_krum_m < 1:
        bad("federation.multi_krum_m", f.multi_krum_m, "must be >= 1 (or null: K - f)", "e.g. federation.multi_krum_m=2")
    for key in ("attack_fraction", "dropout", "straggler_fraction"):
        if not 0 <= getattr(f, key) < 1:
            bad(f"federation.{key}", getattr(f, key), "must be in [0, 1)", f"e.g. federation.{key}=0.2")
    if f.attack != "none" and f.attack_fraction == 0:
        bad("federation.attack_fraction", 0.0, f"federation.attack={f.attack} needs attackers",
            "e.g. federation.attack_fraction=0.34")
    if not 0 < f.straggler_work <= 1:
        bad("federation.straggler_work", f.straggler_work, "must be in (0, 1]", "e.g. federation.straggler_work=0.5")
    if not (f.dp_clip > 0 and f.dp_noise_multiplier >= 0 and 0 < f.dp_delta < 1):
        bad("federation.dp_clip/dp_noise_multiplier/dp_delta", (f.dp_clip, f.dp_noise_multiplier, f.dp_delta),
            "need a clip > 0, a noise multiplier >= 0 and a delta in (0, 1)", "e.g. dp_clip=1 dp_noise_multiplier=1 dp_delta=1e-5")
    if f.dp_target_epsilon is not None and not f.dp_target_epsilon > 0:
        bad("federation.dp_target_epsilon", f.dp_target_epsilon, "must be > 0", "e.g. federation.dp_target_epsilon=8")
    if not math.isfinite(f.attack_scale):
        bad("federation.attack_scale", f.attack_scale, "must be a finite number", "e.g. federation.attack_scale=100")
    # A setting that does nothing where it stands is refused, not ignored (the run would look as if it had used it).
    for key, (enabler, enables, fix) in ONLY_WITH.items():
        name, on = key.split(".", 1)[1], enabler.split(".", 1)[1]
        if getattr(f, name) != getattr(FederationConfig, name) and not enables(getattr(f, on)):
            bad(key, getattr(f, name), f"has no effect with {enabler}={getattr(f, on)}", fix)
    if f.dp != "none" and f.aggregator != "mean":
        bad("federation.aggregator", f.aggregator, "DP-FedAvg noises a sum: it needs the mean",
            "use federation.aggregator=mean with federation.dp")
    r = f.local_epochs_range
    if r is not None and not (len(r) == 2 and 1 <= r[0] <= r[1]):
        bad("federation.local_epochs_range", list(r), "need [lo, hi] with 1 <= lo <= hi", "e.g. federation.local_epochs_range=[1,3]")
    changed = [k for k, d in (("server_optimizer", "none"), ("aggregator", "mean"), ("attack", "none"), ("dp", "none"))
               if getattr(f, k) != d]
    if changed and not registry.get(cfg.algorithm.name).communicates:
        bad(f"federation.{changed[0]}", getattr(f, changed[0]), f"algorithm={cfg.algorithm.name} sends nothing to a "
            "server", "drop the federation.* server options, or choose an algorithm that aggregates")


def conf_dir() -> Path:
    """The Hydra config folder: $FEDCLIP_CONF_DIR, else the repository's conf/."""

    env = os.environ.get("FEDCLIP_CONF_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "conf")
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise ConfigError(
        f"no config folder found (looked in {', '.join(map(str, candidates))}). "
        "Fix: install from the repository with `pip install -e .`, or set FEDCLIP_CONF_DIR=/path/to/conf."
    )


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, type-check and validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.config_store import ConfigStore

    # The typed schema underlies conf/config.yaml, so every key exists (with its
    # default) whatever a preset spells out, and types are checked as Hydra composes.
    ConfigStore.instance().store(name="fedclip_schema", node=Config)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_hydra_message(exc, overrides)) from None
    try:
        missing = sorted(OmegaConf.missing_keys(composed))
    except InterpolationResolutionError as exc:  # a resolver's own message (say, shipped weights not found)
        # OmegaConf keeps the resolver's message only in its own text: "<Error> raised while resolving ...: msg".
        first = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(exc).splitlines()[0])
        raise ConfigError(f"{getattr(exc, 'full_key', None) or '?'}: {first}") from None
    if missing:
        raise ConfigError([f"{k} is required and has no value. Fix: pass {k}=..." for k in missing])
    return validate(to_config(composed))


def _algorithm_key_message(msg: str, overrides) -> str | None:
    """``algorithm.<key>=...`` for an algorithm without that key: which algorithms have it."""
    m = re.search(r"Could not override 'algorithm\.(\w+)'", msg)
    if not m or "not in struct" not in msg:
        return None
    key = m.group(1)
    from .algorithms import registry

    chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith("algorithm=")), "fedclip")
    try:
        keys = [f.name for f in dataclasses.fields(registry.get(chosen).config_class)]
    except ConfigError:
        return None
    having = [n for n in registry.names()
              if key in {f.name for f in dataclasses.fields(registry.get(n).config_class)}]
    where = (f"it belongs to algorithm={'|'.join(having)}" if having else "no algorithm has it")
    return (f"algorithm.{key}: algorithm={chosen} has no key {key!r} ({where}; algorithm={chosen} has "
            f"{', '.join(keys)}). Fix: drop algorithm.{key}, or choose an algorithm that has it.")


def _hydra_message(exc: Exception, overrides) -> str:
    msg = str(exc).strip()
    special = _algorithm_key_message(f"{msg} {exc.__cause__ or exc.__context__ or ''}", overrides)
    if special:
        return special
    # Hydra chains the interesting cause; keep the first lines, never a traceback.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in msg:
        msg = f"{msg} ({str(cause).strip().splitlines()[0]})"
    msg = msg.split("Config search path")[0]
    first = " ".join(line.strip() for line in msg.splitlines()[:12] if line.strip()).rstrip(".")
    hint = "Fix: check the spelling of the key (`fedclip-lightning --print-config` shows every key) or the value."
    if "Could not find" in msg or "not found in the defaults list" in msg or "Could not load" in msg:
        hint = "Fix: pick one of the presets listed by `fedclip-lightning --help`."
    return f"{first}. {hint}"
