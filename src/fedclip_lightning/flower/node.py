"""A site's side of a deployment: the client a SuperNode holds, built from the run's hyperparameters (sent
by the server) and the node's own settings (``--node-config``: its client name, its data, its weights, its
folders), answering the server's messages through the same algorithm code as a run in one job.

Nothing here imports Flower: ``client_app.py`` turns messages into these calls, so the node's logic is
tested without a network. Flower starts a fresh process per message, so a node keeps what must outlive one
(the clients' kept state: Adam's moments, a ``local`` client's own adapter) on its disk, per round
(``NodeStore``), and the encoded images in the feature cache: a message costs the imports, the backbone's
load and the fit, never a second encoder pass.

**What the server may set.** A node trusts the server with hyperparameters, not with its machine. Settings
that name files or code on the node come from the node's configuration; a message that sets one is refused
(``NODE_KEYS``, ``check_overrides``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

# Keys that name a file, a folder or code on the node: its own configuration sets them.
NODE_KEYS = ("data.root", "data.split.official_dir", "backbone.cache_dir", "features.dir", "output_dir", "run_name",
             "resume")
# Keys whose value names a file on the node when it is a path (a pretrained *tag* such as "openai" is fine).
NODE_PATH_KEYS = ("backbone.pretrained", "backbone.name")
# Groups a dict-valued override could set those keys through (`data={root: /etc}`).
NODE_GROUPS = ("data", "data.split", "backbone", "features")
# The node's own settings (flower-supernode --node-config 'client="art_painting" data-root="/data/PACS"').
NODE_CONFIG = {
    "client": "its client's name: the domain folder under data-root whose images it holds",
    "data-root": "the data set folder (<domain>/<class>/<image>) on this machine",
    "official-dir": "the folder of the official split lists (data.split.mode=official)",
    "weights": "the CLIP weights on this machine: an open_clip pretrained tag or a checkpoint file",
    "cache-dir": "where features and downloaded weights are kept (default: FEDCLIP_CACHE_DIR or "
                 "~/.cache/fedclip-lightning)",
    "state-dir": "where the clients' kept state is written between rounds (default: <cache-dir>/flower-state)",
    "accelerator": "cpu (default), gpu or auto",
}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").strip()


def _path_like(value: str) -> bool:
    v = value.strip().strip("'\"")
    if v.startswith("hf-hub:"):  # a model on the Hugging Face hub: a name, fetched into the node's own cache
        return False
    return "/" in v or "\\" in v or v.startswith(("~", ".", "local-dir:")) or \
        v.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def check_overrides(overrides: list[str], who: str) -> None:
    """Refuse overrides that name files or code on a node (``who`` says where they came from)."""
    bad = []
    for o in overrides:
        key, value = _key(o), o.split("=", 1)[1] if "=" in o else ""
        if key in NODE_KEYS or (key in NODE_PATH_KEYS and _path_like(value)) or \
                (key in NODE_GROUPS and value.lstrip().startswith("{")):
            bad.append(o)
    if bad:
        raise ConfigError(
            f"{who} sets {', '.join(repr(b) for b in bad)}: a setting that names a file or folder on the nodes. "
            "A node takes hyperparameters from the server, never paths: each node sets its own in "
            "flower-supernode --node-config (client, data-root, official-dir, weights, cache-dir, state-dir). "
            "Fix: drop these overrides from the run.")


def node_settings(node_config: dict[str, Any]) -> dict[str, str]:
    """The node's own settings, checked: a ConfigError names an unknown key or a missing client name."""
    unknown = [k for k in node_config if k not in NODE_CONFIG]
    if unknown:
        raise ConfigError(f"--node-config has unknown key(s) {unknown}. Fix: use "
                          + "; ".join(f"{k}: {v}" for k, v in NODE_CONFIG.items()))
    if not node_config.get("client"):
        raise ConfigError("--node-config has no client: the node must say which client it is. "
                          "Fix: flower-supernode ... --node-config 'client=\"art_painting\" data-root=\"/data/PACS\"'")
    return {k: str(v) for k, v in node_config.items()}


def _cache_dir(settings: dict[str, str]) -> Path:
    from ..data.synthetic import default_cache_dir

    return Path(settings["cache-dir"]).expanduser() if settings.get("cache-dir") else default_cache_dir()


def _q(value: str) -> str:
    """A value as one quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def node_overrides(settings: dict[str, str]) -> list[str]:
    """The overrides a node adds after the server's: its client's data, its folders, its device; no logger."""
    name, cache = settings["client"], _cache_dir(settings)
    out = [f"data.domains=[{_q(name)}]", "data.unseen=[]", f"features.dir={_q(cache / 'features')}",
           f"backbone.cache_dir={_q(cache / 'weights')}", "logger=none", "progress=false",
           f"fabric.accelerator={settings.get('accelerator', 'cpu')}", "fabric.devices=1", "fabric.num_nodes=1",
           "federation.zero_shot_baseline=false"]
    if settings.get("data-root"):
        out.append(f"data.root={_q(Path(settings['data-root']).expanduser())}")
    if settings.get("official-dir"):
        out.append(f"data.split.official_dir={_q(Path(settings['official-dir']).expanduser())}")
    if settings.get("weights"):
        w = settings["weights"]
        out.append(f"backbone.pretrained={_q(Path(w).expanduser() if _path_like(w) else w)}")
    return out


@dataclass
class Request:
    """What one message asks of a node (its ``ConfigRecord``)."""

    overrides: list[str]  # the run's hyperparameters, as Hydra overrides
    run_uid: str  # the run's own id (the same across resumes): the node's state folder
    server_round: int
    kind: str = "client"  # client (trains) or unseen (evaluated only)
    classes: list[str] = dataclasses.field(default_factory=list)  # the run's class vocabulary ([]: hello)
    keep_from: int = 0  # the round of the server's oldest kept checkpoint: older node states may go
    state_round: int = 0  # the last round whose fit of this client the server took (0: none): its kept state


class NodeStore:
    """A client's kept state on the node's disk, one file per round whose fit wrote it. A message names the
    round whose state to read (``Request.state_round``: the client's last fit the server took, restored with
    the server's checkpoint), so a resumed server, or a reply that was lost, never reads a state from a
    round that did not happen."""

    def __init__(self, root: Path, run_uid: str, client: str):
        self.dir = root / run_uid / client

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(f.stem.split("-")[1]) for f in self.dir.glob("round-*.pt"))

    def load(self, server_round: int, client: str) -> dict:
        if server_round == 0:
            return {}
        f = self.dir / f"round-{server_round}.pt"
        if not f.is_file():
            raise ConfigError(f"node {client!r}: its kept state of round {server_round} is not in {self.dir} (was "
                              "the state-dir removed, or the node's state-dir changed?): the client cannot continue "
                              "as the run left it. Fix: restore that folder, or start the run over (resume=never).")
        return torch.load(f, map_location="cpu", weights_only=False)

    def save(self, server_round: int, state: dict, keep_from: int) -> None:
        from ..files import atomic_save

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.dir / f"round-{server_round}.pt")
        rounds = self._rounds()
        # Keep the newest state at or before the server's oldest checkpoint, and everything after it.
        base = max([r for r in rounds if r <= keep_from], default=None)
        for r in rounds:
            if base is not None and r < base:
                (self.dir / f"round-{r}.pt").unlink(missing_ok=True)


class Node:
    """One SuperNode's client, rebuilt for a message from the run's overrides and the node's settings.
    Everything that does not change within a run (config, data, backbone, features) is kept in this
    process between messages (``_built``); the algorithm and the client are made afresh for each."""

    _built: dict[str, Any] = {}

    def __init__(self, node_config: dict[str, Any]):
        self.settings = node_settings(node_config)
        self.name = self.settings["client"]
        self.state_root = Path(self.settings["state-dir"]).expanduser() if self.settings.get("state-dir") else \
            _cache_dir(self.settings) / "flower-state"

    # -- building ---------------------------------------------------------------------
    _configs: dict[str, Any] = {}

    def config(self, overrides: list[str]):
        """The run's config on this node: the server's overrides, then the node's own (composed once per process
        and run: Hydra takes half a second)."""
        from ..configure import load_config
        from ..data.synthetic import ensure_synthetic_dataset

        check_overrides(overrides, "the server's message")
        key = json.dumps([overrides, self.settings], sort_keys=True)
        if key not in self._configs:
            while len(self._configs) >= 8:
                self._configs.pop(next(iter(self._configs)))
            self._configs[key] = load_config([*overrides, *node_overrides(self.settings)])
        cfg = self._configs[key]
        d = cfg.data
        if d.dataset == "synthetic" and not self.settings.get("data-root"):
            # The demo: the node draws its own domain of the synthetic set into its own folder.
            root = ensure_synthetic_dataset(_cache_dir(self.settings), per_class=d.synthetic_per_class,
                                            image_size=d.synthetic_image_size,
                                            seed=cfg.seed if d.synthetic_seed is None else d.synthetic_seed,
                                            domains=[self.name])
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, root=str(root)))
        return cfg

    def _scan(self, cfg):
        from ..data.pipeline import scan

        if cfg.data.dataset != "synthetic" and not self.settings.get("data-root"):
            raise ConfigError(f"node {self.name!r} has no data-root, and the run's data set {cfg.data.dataset!r} "
                              "is not the synthetic demo set. Fix: --node-config 'data-root=\"/path/to/data\"'")
        return scan(cfg)

    def build(self, req: Request) -> dict[str, Any]:
        """The run's pieces on this node, for ``req`` (kept in this process per run, overrides and classes)."""
        key = json.dumps([req.overrides, self.settings, req.classes, req.kind, req.run_uid], sort_keys=True)
        if key in self._built:
            return self._built[key]
        from lightning.fabric import Fabric

        from ..algorithms import Participant, RunContext
        from ..data.partition import Task
        from ..data.pipeline import class_prompt_names, split_task, with_classes
        from ..federation.datasets import build_datasets
        from ..federation.orchestrator import _loader_factory
        from ..model.backbone import load_backbone

        cfg = self.config(req.overrides)
        ds = self._scan(cfg)
        if req.classes:  # the run's vocabulary (a hello has none yet: the node's own class folders)
            ds = with_classes(ds, req.classes)
        if req.kind == "client":
            task, _ = split_task(cfg, ds)
        else:
            task = Task(classes=list(ds.classes), clients=[], unseen={self.name: list(ds.samples[self.name])})
        fabric = Fabric(accelerator=cfg.fabric.accelerator, devices=1, precision="32-true")
        backbone = load_backbone(cfg.backbone, device=fabric.device, seed=cfg.seed)
        p = Participant(0, self.name, req.kind, 0)
        ctx = RunContext(cfg, fabric, backbone, task, class_prompt_names(task.classes, cfg.data.class_names), [p])
        ctx.datasets, _ = build_datasets(cfg, fabric, backbone, task, [p])
        ctx.loader = _loader_factory(cfg, fabric)
        ctx.prepare_eval_loaders()
        built = {"cfg": cfg, "ctx": ctx, "p": p, "images": len(ds.samples[self.name]),
                 "weights": self.fingerprint(backbone, cfg)}
        while len(self._built) >= 8:  # a process serves one run's few clients (in-process tests: several)
            self._built.pop(next(iter(self._built)))
        self._built[key] = built
        return built

    def fingerprint(self, backbone, cfg) -> str:
        """The backbone's weights, as a SHA-256 of its tensors (kept on disk per weights file: a second each
        for ViT-B/32)."""
        from ..model.features import model_identity, weights_fingerprint

        ident = json.dumps(model_identity(backbone, "fp32", cfg.seed), sort_keys=True, default=str)
        f = self.state_root / "fingerprints" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".txt")
        if f.is_file():
            return f.read_text().strip()
        digest = weights_fingerprint(backbone.clip)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(digest)
        return digest

    def _algorithm(self, built: dict, other: str = ""):
        from ..algorithms import registry
        from ..configure import algorithm_config

        # Another algorithm than the run's (the zero-shot baseline) with its own defaults, on the run's config,
        # as the server sets it up (``Server.evaluate_zero_shot``).
        cfg = dataclasses.replace(built["cfg"], algorithm=algorithm_config({"name": other})) if other else built["cfg"]
        algorithm = registry.get(cfg.algorithm.name)(cfg)
        ctx = dataclasses.replace(built["ctx"], cfg=cfg)
        algorithm.setup(ctx)
        return algorithm, {0: algorithm.make_client(built["p"])}

    def identity(self, built: dict) -> dict[str, str]:
        """Who answers: the client, its data as it is now (read again for every message) and its weights."""
        return {"client": self.name, "data-digest": data_digest(built["ctx"].task), "weights": built["weights"]}

    # -- messages ------------------------------------------------------------------------
    def hello(self, req: Request) -> dict[str, Any]:
        """Who this node is: its client, its class folders, its split sizes, the digests of its data and
        weights (for the run's overrides)."""
        built = self.build(dataclasses.replace(req, classes=[]))
        task = built["ctx"].task
        c = task.clients[0]
        # train/val/test as a client, and every image (what it is evaluated on as an unseen domain)
        sizes = [len(c.train), len(c.val), len(c.test), built["images"]]
        return {**self.identity(built), "classes": list(task.classes), "sizes": sizes}

    def fit(self, req: Request, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor], int, dict]:
        """The client's local fit of ``req.server_round`` from the server's ``state``: ``(train result as
        accuracy/loss/n, what travels {"row": ...} or {}, its number of training examples, identity)``."""
        built = self.build(req)
        store = NodeStore(self.state_root, req.run_uid, self.name)
        algorithm, clients = self._algorithm(built)
        algorithm.load_client_states({self.name: store.load(req.state_round, self.name)})
        algorithm.receive(state)
        p = built["p"]
        result = algorithm.fit_many({p.index: clients[0]}, [p], req.server_round)[p.index]
        store.save(req.server_round, algorithm.client_states().get(self.name) or {}, req.keep_from)
        update = {} if result.update is None else {"row": result.update().detach().cpu().clone()}
        fed = built["cfg"].federation
        if update and fed.privacy.mode == "client" and algorithm.communicates:
            # Local DP: clipped and noised here, from this machine's entropy; the server never sees the update.
            from ..aggregation.mean import flatten
            from ..aggregation.update import noise_update

            update["row"] = noise_update(fed, fed.rounds, update["row"], flatten(algorithm.start_state(built["p"])))
        train = {"accuracy": result.train.accuracy, "loss": result.train.loss, "n": result.train.n}
        return train, update, result.num_examples, self.identity(built)

    def evaluate(self, req: Request, state: dict[str, torch.Tensor],
                 evaluate_with: str = "") -> tuple[dict[str, list[float]], dict]:
        """Personalisation (the algorithm's step before evaluation) and the client's evaluation with the
        server's ``state``: ``({slot: [accuracy, loss, n]}, identity)``. ``evaluate_with``: another algorithm's
        name (the zero-shot baseline)."""
        built = self.build(req)
        algorithm, clients = self._algorithm(built, evaluate_with)
        if not evaluate_with:
            store = NodeStore(self.state_root, req.run_uid, self.name)
            algorithm.load_client_states({self.name: store.load(req.state_round, self.name)})
        algorithm.receive(state)
        algorithm.personalize(req.server_round, clients)
        slots = algorithm.evaluate_mine(clients, [built["p"]])[0]
        return {k: v.as_row().tolist() for k, v in slots.items()}, self.identity(built)


def data_digest(task) -> str:
    """The node's images with their class folders (not indices: the same whatever the other sites hold, and
    whether the node trains or is an unseen domain); the split follows from them and the run's config."""
    from ..checkpoint import data_manifest, manifest_digest

    return manifest_digest({path: [size, mtime, task.classes[label]]
                            for path, (size, mtime, label, _) in data_manifest(task).items()})

