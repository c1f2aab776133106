"""Loading a config: compose conf/ with Hydra, type it against the schema (``config.py``), check it.

Each component checks its own keys (``algorithms``, ``data``, ``model``, ``aggregation``); this module
adds the run's own keys (rounds, checkpoints, fabric, logger) and the few that depend on two components,
and reports every problem at once in one :class:`ConfigError` that names each bad value, the key that
set it and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from .aggregation.checks import check_config as check_server_side, server_options_set
from .algorithms import registry
from .algorithms.base import check_config as check_algorithm
from .config import (ACCELERATORS, CLIENT_BATCHING, LOGGERS, RENAMED_CHOOSERS, RENAMED_KEYS, WANDB_MODES, AlgorithmConfig, Config,
                     conf_dir)
from .data.pipeline import check_config as check_data
from .errors import ConfigError, Problems
from .model.backbone import check_config as check_backbone
from .model.features import check_config as check_features


def _shipped_weights(name: str) -> str:
    from .weights import path

    return path(name)


# ${fedclip_weights:<name>}: the path of weights shipped in the package (the demo's small CLIP).
OmegaConf.register_new_resolver("fedclip_weights", _shipped_weights, replace=True)


_SCHEMAS: dict[type, DictConfig] = {}


def _schema(cls: type) -> DictConfig:
    """``OmegaConf.structured(cls)``, made once a process (20 ms for Config): ``OmegaConf.merge`` copies its
    first argument, so the one schema is never changed."""
    if cls not in _SCHEMAS:
        _SCHEMAS[cls] = OmegaConf.structured(cls)
    return _SCHEMAS[cls]


def to_config(cfg: DictConfig | dict) -> Config:
    """Merge composed YAML into the typed schema; type mistakes become ConfigError.

    ``algorithm`` is checked against the class its ``name`` picks from the
    algorithm registry: a key that algorithm does not have is a mistake too.
    """
    schema = _schema(Config)
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    unknown = _unknown_keys(OmegaConf.to_container(raw, resolve=False), Config)
    if unknown:
        raise ConfigError([f"{k}: {what}" for k, what in unknown])
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
        full = f"{prefix}{key}"
        if full in RENAMED_KEYS:
            out.append((full, _renamed(RENAMED_KEYS[full], f"write {RENAMED_KEYS[full]} instead")))
        elif key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            out.append((full, f"unknown key{f' (did you mean {prefix}{close[0]}?)' if close else ''}. Fix: correct "
                              "or drop it (`fedclip-lightning --print-config` lists every key)."))
        elif full in RENAMED_CHOOSERS and not isinstance(value, dict):
            out.append((full, _renamed(RENAMED_CHOOSERS[full], f"write {RENAMED_CHOOSERS[full]}: {value} instead")))
        elif key != "algorithm":  # the algorithm's own class checks its keys (algorithm_config)
            sub_cls = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
            if isinstance(sub_cls, type):
                out += _unknown_keys(value, sub_cls, f"{prefix}{key}.")
    return out


def algorithm_config(node: Any) -> AlgorithmConfig:
    """The ``algorithm`` mapping as the config class of the algorithm its ``name`` picks."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    name = data.get("name", "fedclip")
    cls = registry.get(str(name)).config_class
    try:
        typed = OmegaConf.merge(_schema(cls), data)
        out = OmegaConf.to_object(typed)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "key", None) or getattr(exc, "full_key", None) or "?"
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"algorithm.{key}: {msg} (algorithm={name} has the keys {known}). Fix: drop or correct "
                          f"algorithm.{key}; `fedclip-lightning algorithm={name} --print-config` lists them.") from None
    return out


def check(cfg: Config) -> Config:
    """Every component checks its keys; one ConfigError lists all the problems."""
    p = Problems()
    check_algorithm(cfg.algorithm, p)
    _check_run(cfg, p)
    check_server_side(cfg.federation, p)
    check_data(cfg.data, p)
    check_features(cfg.features, p)
    check_backbone(cfg.backbone, p)
    _check_across(cfg, p)
    p.raise_any()
    return cfg


def _check_run(cfg: Config, p: Problems) -> None:
    """The run's own keys: rounds, evaluation, checkpoints, resume, processes, logging."""
    f, bad = cfg.federation, p.bad
    p.positive_int("federation.rounds", f.rounds)
    p.positive_int("federation.eval_interval", f.eval_interval)
    p.positive_int("federation.checkpoint_interval", f.checkpoint_interval, 0)
    p.positive_int("federation.keep_checkpoints", f.keep_checkpoints, 1)
    if not f.checkpoint_min_seconds >= 0:
        bad("federation.checkpoint_min_seconds", f.checkpoint_min_seconds, "must be >= 0",
            "e.g. federation.checkpoint_min_seconds=10 (0: every checkpoint_interval rounds, however fast)")
    p.choice("federation.client_batching", f.client_batching, CLIENT_BATCHING)
    if not 0 < f.client_fraction <= 1:
        bad("federation.client_fraction", f.client_fraction, "must be in (0, 1]", "e.g. federation.client_fraction=0.5")
    if cfg.resume not in ("never", "auto") and not Path(cfg.resume).expanduser().is_dir():
        bad("resume", cfg.resume, "neither never, auto nor an existing checkpoint folder",
            "use resume=auto (the newest checkpoint of the run directory) or a path to outputs/<run>/checkpoints/round-N")

    fb = cfg.fabric
    p.choice("fabric.accelerator", fb.accelerator, ACCELERATORS)
    p.choice("fabric.strategy", fb.strategy, ("auto", "ddp"))
    p.positive_int("fabric.timeout_minutes", fb.timeout_minutes)
    if fb.accelerator == "cpu" and isinstance(fb.devices, (list, tuple)):
        bad("fabric.devices", list(fb.devices), "CPU processes are counted, not indexed",
            "give a count, e.g. fabric.devices=2")
    p.positive_int("fabric.num_nodes", fb.num_nodes)
    dev = fb.devices
    if not (dev == "auto" or (isinstance(dev, int) and dev >= 1) or
            (isinstance(dev, (list, tuple)) and len(dev) > 0 and all(isinstance(i, int) for i in dev))):
        bad("fabric.devices", dev, "must be a positive count, 'auto' or a list of device indices",
            "e.g. fabric.devices=2")

    p.choice("logger.name", cfg.logger.name, LOGGERS)
    p.choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)


def _check_across(cfg: Config, p: Problems) -> None:
    """Settings that are fine alone and wrong together (two components' keys)."""
    algo = registry.get(cfg.algorithm.name)
    if cfg.features.cache == "on" and not registry.encoder_frozen(cfg):
        p.bad("features.cache", cfg.features.cache, f"cached features are not exact for algorithm={cfg.algorithm.name} "
              f"as configured ({algo.what_trains(cfg.algorithm)}: it trains the image encoder)",
              "set features.cache=off (or auto)")
    changed = server_options_set(cfg.federation)
    if changed and not algo.communicates:
        p.bad(changed[0][0], changed[0][1], f"algorithm={cfg.algorithm.name} "
              "sends nothing to a server", "drop the federation.* server options, or choose an algorithm that aggregates")


_STORED: dict[tuple[str | None, str], type] = {}  # what this process put in Hydra's ConfigStore: (group, name) -> class


def _store_schemas(store) -> None:
    """The typed schema under conf/config.yaml, so every key exists (with its default) whatever a preset spells
    out, and types are checked as Hydra composes; and each algorithm's config class as
    ``algorithm/<name>_schema``, so its YAML states only what differs from it. Stored once per process (and
    again for an algorithm registered since, or a class that changed): a structured config costs about 10 ms
    to store, and a run composes its config more than once."""
    want = {(None, "fedclip_schema"): (Config, Config),
            **{("algorithm", f"{n}_schema"): (registry.get(n).config_class, None) for n in registry.names()}}
    for (group, name), (cls, node) in want.items():
        there = store.repo if group is None else store.repo.get(group, {})
        if _STORED.get((group, name)) is cls and f"{name}.yaml" in there:
            continue
        store.store(group=group, name=name, node=node if node is not None else cls(name=name[:-len("_schema")]))
        _STORED[(group, name)] = cls


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, type it and check it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.config_store import ConfigStore

    _store_schemas(ConfigStore.instance())
    renamed = renamed_overrides(overrides)
    if renamed:
        raise ConfigError(renamed)
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
    return check(to_config(composed))


def renamed_overrides(overrides) -> list[str]:
    """Overrides that use a flat federation key of earlier releases, each with the grouped key that replaced it
    (``federation.dp=server`` is ``federation.privacy.mode=server``)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.lstrip("+~")
        new = RENAMED_KEYS.get(key)
        if new is None and key in RENAMED_CHOOSERS and not value.lstrip().startswith("{"):  # {..}: the whole group
            new = RENAMED_CHOOSERS[key]
        if new is not None:
            out.append(f"{key}: " + _renamed(new, f"{new}{eq}{value}" + ("" if eq else " (the new name)")))
    return out


def _renamed(new: str, fix: str) -> str:
    return f"the federation keys are grouped now, this one is {new}. Fix: {fix}"


def _algorithm_key_message(msg: str, overrides) -> str | None:
    """``algorithm.<key>=...`` for an algorithm without that key: which algorithms have it."""
    m = re.search(r"Could not override 'algorithm\.(\w+)'", msg)
    # An untyped node says "not in struct"; an algorithm's schema (its config class) "Key 'x' not in 'Class'".
    if not m or ("not in struct" not in msg and not re.search(r"Key '\w+' not in '\w+'", msg)):
        return None
    key = m.group(1)
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
