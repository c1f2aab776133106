"""The configuration's schema: dataclasses, their defaults and the allowed values, and where the presets
that state what differs from them live (``conf_dir``).

Nothing here loads or checks a config: ``configure.py`` composes the YAML with Hydra, types it against
these classes and asks each component to check its own keys. Library code only ever sees these
frozen-in-spirit dataclasses, never a mutable DictConfig.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

FEATURE_CACHE_MODES = ("auto", "on", "off")
LOSSES = ("contrastive", "prototype")
AGGREGATIONS = ("uniform", "samples")
OPTIMIZER_STATES = ("reset", "keep")
CLIENT_BATCHING = ("auto", "on", "off")
SPLIT_MODES = ("random", "official")
ON_CORRUPT = ("error", "skip")
CLASS_NAME_STYLES = ("verbatim", "spaces")
CLASS_SPLITS = ("all", "base_novel")
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
class ClassesConfig:
    # The classes a run uses (the rest of the images are left out everywhere): by folder name
    # (keep=[dog,horse]), or a seeded random choice of `count` of them (of `keep` where both are given).
    # null/null: every class. Labels follow the kept classes in sorted order.
    keep: list[str] | None = None
    count: int | None = None
    # The seed of the `count` choice: its own, so that repeats over the run's seed use the same classes.
    seed: int = 0
    # all: train and evaluate on every kept class. base_novel (CoCoOp's base-to-novel): train and validate
    # on the first half of the classes in sorted order (the base, rounded up), then score the final model
    # on the base, the novel (the other half, with their own class prompts) and all classes.
    split: str = "all"


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
    # Few-shot clients: each client trains on at most this many images of each class (seeded, CoOp's k-shot
    # protocol: 1, 2, 4, 8, 16); its validation and test images are untouched. null: every training image.
    shots: int | None = None
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    on_corrupt: str = "error"
    check_images: bool = True
    single_domain_classes: bool = False  # accept a class folder that only one of 3+ domains has
    prompt: str = "a picture of a {}"
    class_names: str = "verbatim"  # verbatim (reference) or spaces (_ -> ' ')
    # Synthetic demo set only.
    synthetic_per_class: int = 24
    synthetic_image_size: int = 64
    # The images' own seed (null: the run's seed): other runs (seeds of training and split) on the same images.
    synthetic_seed: int | None = None


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
class ServerOptimizerConfig:
    """How the server applies the round's mean update (aggregation/server_opt.py; Reddi et al. 2021)."""
    name: str = "none"  # none (plain averaging, the reference), momentum (FedAvgM), adam, yogi, adagrad, or a plugin
    lr: float | None = None  # null: 1.0 for none/momentum, 1e-2 for adam/yogi/adagrad
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass
class AggregatorConfig:
    """The rule that combines the round's client rows (aggregation/robust.py)."""
    name: str = "mean"  # mean (weighted, streamed), median, trimmed_mean, krum, multi_krum
    trim_beta: float = 0.1  # trimmed_mean: fraction trimmed at each end
    krum_f: int = 0  # krum / multi_krum: attackers assumed
    multi_krum_m: int | None = None  # multi_krum: rows averaged (null: K - f)


@dataclass
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg (aggregation/privacy.py)."""
    mode: str = "none"  # none, server (noise on the sum), client (local DP)
    clip: float = 1.0
    noise_multiplier: float = 1.0
    target_epsilon: float | None = None  # picks noise_multiplier for the planned rounds
    delta: float = 1e-5
    # The noise from the operating system's entropy (a deployment), not from a stream seeded by the config
    # (simulation: reproducible, bitwise on resume, and so known to anyone who has the config).
    secure: bool = False


@dataclass
class AttackConfig:
    """The byzantine-client simulator, for testing robust rules (aggregation/attacks.py)."""
    name: str = "none"  # none, sign_flip, gaussian, scaled
    fraction: float = 0.0  # of the clients, a seeded draw
    scale: float = 100.0


@dataclass
class UnreliableConfig:
    """Simulated unreliable clients. A client drops (sends nothing) with probability ``dropout`` each round; a
    straggler fraction completes only ``straggler_work`` of its local steps; local epochs are drawn per (round,
    client) uniformly from ``local_epochs_range=[lo, hi]`` (null: algorithm.local_epochs for everyone)."""
    dropout: float = 0.0
    straggler_fraction: float = 0.0
    straggler_work: float = 0.5
    local_epochs_range: list[int] | None = None


@dataclass
class FederationConfig:
    rounds: int = 10
    aggregation: str = "uniform"  # how clients are weighted: uniform (reference) or samples (n_k / n)
    eval_interval: int = 1
    # Fraction of clients that train in a round (seeded draw per round); evaluation covers every client.
    client_fraction: float = 1.0
    # Checkpoint every this many rounds (0: only when preempted); keep the newest keep_checkpoints.
    checkpoint_interval: int = 1
    # ...but at most once per this many seconds (the last round and a preemption always checkpoint): a
    # crash loses at most this much work, and fast rounds do not spend their time writing checkpoints.
    checkpoint_min_seconds: float = 10.0
    keep_checkpoints: int = 2
    # After training, evaluate zero-shot CLIP (the frozen model and the class prompts) on the same splits:
    # the end-of-run table's baseline column and summary.json's zero_shot block (one evaluation pass).
    zero_shot_baseline: bool = True
    # How a process trains and evaluates its clients on cached features: auto (side by side, in batched
    # products, wherever the algorithm trains the attention adapter with Adam; one at a time elsewhere, and
    # the run says so once), on (side by side or refuse), off (one after another: bit for bit the numbers the
    # golden cases record). Side by side equals one at a time to float rounding
    # (docs/many_clients.md).
    client_batching: str = "auto"
    # -- the server side, in groups; the defaults are the reference's plain averaging.
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    unreliable: UnreliableConfig = field(default_factory=UnreliableConfig)


# The flat federation keys of earlier releases and their place in the groups: refused with this hint.
RENAMED_KEYS: dict[str, str] = {
    "federation.server_lr": "federation.server_optimizer.lr",
    "federation.server_beta1": "federation.server_optimizer.beta1",
    "federation.server_beta2": "federation.server_optimizer.beta2",
    "federation.server_tau": "federation.server_optimizer.tau",
    "federation.trim_beta": "federation.aggregator.trim_beta",
    "federation.krum_f": "federation.aggregator.krum_f",
    "federation.multi_krum_m": "federation.aggregator.multi_krum_m",
    "federation.dp": "federation.privacy.mode",
    "federation.dp_clip": "federation.privacy.clip",
    "federation.dp_noise_multiplier": "federation.privacy.noise_multiplier",
    "federation.dp_target_epsilon": "federation.privacy.target_epsilon",
    "federation.dp_delta": "federation.privacy.delta",
    "federation.dp_secure": "federation.privacy.secure",
    "federation.attack_fraction": "federation.attack.fraction",
    "federation.attack_scale": "federation.attack.scale",
    "federation.dropout": "federation.unreliable.dropout",
    "federation.straggler_fraction": "federation.unreliable.straggler_fraction",
    "federation.straggler_work": "federation.unreliable.straggler_work",
    "federation.local_epochs_range": "federation.unreliable.local_epochs_range",
}
# Groups whose chooser was itself a flat key: federation.server_optimizer=adam is now ...server_optimizer.name=adam.
RENAMED_CHOOSERS: dict[str, str] = {
    "federation.server_optimizer": "federation.server_optimizer.name",
    "federation.aggregator": "federation.aggregator.name",
    "federation.attack": "federation.attack.name",
}


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
    # Draw accuracy.png and confusion.png at the end (false: not drawn, e.g. the runs of a large sweep, whose own
    # plots compare them; every CSV and the summary are written either way).
    plots: bool = True
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


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config (for logging and summary.json)."""
    return dataclasses.asdict(cfg)


def conf_dir() -> Path:
    """The Hydra config folder: $FEDCLIP_CONF_DIR, else the one that ships in the package (the repository's
    top-level conf/ is a link to it), so an installed wheel runs without the source tree."""

    env = os.environ.get("FEDCLIP_CONF_DIR")
    if env:  # the user's own folder, or nothing: never the package's in its place, without a word
        if (Path(env).expanduser() / "config.yaml").is_file():
            return Path(env).expanduser()
        raise ConfigError(f"FEDCLIP_CONF_DIR={env!r} has no config.yaml. Fix: point it at a config folder (a copy "
                          "of the package's conf/, with config.yaml at its top), or unset it for the shipped one.")
    shipped = Path(__file__).resolve().parent / "conf"
    if (shipped / "config.yaml").is_file():
        return shipped
    raise ConfigError(
        f"no config folder found (looked in {shipped}). "
        "Fix: reinstall the package (`pip install -e .` from the repository), or set FEDCLIP_CONF_DIR=/path/to/conf."
    )
