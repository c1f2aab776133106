"""Setting up a run: config -> task -> run directory, loggers, Fabric, resume lookup -> the frozen
backbone, the algorithm and its clients placed on ranks -> the data -> ``Server.fit()`` -> outputs.

Every process runs ``run``. A rank trains only the clients placed on it; client
models are never wrapped in DDP (ranks train *different* clients).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
from lightning.fabric import Fabric

from ..algorithms import Participant, RunContext, registry
from ..checkpoint import (COMPLETE, MANIFEST, check_data, check_resumable, checkpoint_root, complete_checkpoints,
                          config_mismatch, data_manifest, latest, load_clients, load_meta, manifest_digest, verify)
from ..algorithms.registry import uses_feature_cache
from ..config import Config, to_dict
from ..configure import check
from ..data.pipeline import build_task, class_prompt_names, make_loader
from ..errors import ConfigError
from .. import numerics
from ..loggers import build_loggers, finish_loggers
from ..model.backbone import load_backbone, resolve_weights
from ..files import atomic_write_text
from ..report import Summary
from .datasets import build_datasets
from .outputs import RunOutputs
from .placement import assign
from .preemption import Preempted, Preemption, requeue
from . import base_novel
from .transport import Clients, FabricTransport
from .server import Server
from ..runlock import RunLock

# Set once this process joined a multi-process run: errors are then this rank's own to report.
LAUNCHED_RANK: int | None = None

__all__ = ["run", "Preempted", "LAUNCHED_RANK", "resolve_run_dir", "build_fabric"]


def resolve_run_dir(cfg: Config) -> Path:
    """One run directory shared by all ranks of a run.

    Precedence: ``run_name``; ``FEDCLIP_RUN_DIR`` (exported by the first
    process, so processes launched by Fabric inherit it); the SLURM job id;
    otherwise a new timestamped name, exported for the processes launched later.
    """
    out = Path(cfg.output_dir).expanduser()
    if cfg.run_name:
        return out / cfg.run_name
    if os.environ.get("FEDCLIP_RUN_DIR"):
        return Path(os.environ["FEDCLIP_RUN_DIR"])
    tag = f"{cfg.algorithm.name}-{cfg.data.dataset}"
    if os.environ.get("SLURM_JOB_ID"):
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"]
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return out / (f"{tag}-slurm{job}" + (f"_{task}" if task else ""))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{stamp}-{tag}-{os.getpid()}"
    os.environ["FEDCLIP_RUN_DIR"] = str(path)
    os.environ["FEDCLIP_RUN_DIR_OWNER"] = str(os.getpid())  # see run(): withdrawn when this run ends
    return path


def build_fabric(cfg: Config, loggers: list) -> Fabric:
    """Fabric for this run; a setting Fabric refuses (no GPU for fabric=gpu, say) becomes a ConfigError."""
    from datetime import timedelta

    from lightning.fabric.strategies import DDPStrategy

    f = cfg.fabric
    devices = list(f.devices) if isinstance(f.devices, (list, tuple)) else f.devices
    several = f.num_nodes > 1 or (isinstance(devices, list) and len(devices) > 1) or \
        (isinstance(devices, int) and devices > 1) or (devices == "auto" and f.accelerator != "cpu")
    strategy = f.strategy
    if several:
        # A process group only (gloo on the CPU, NCCL on GPUs): client models are never wrapped in DDP.
        strategy = DDPStrategy(timeout=timedelta(minutes=f.timeout_minutes))
    try:
        return Fabric(accelerator=f.accelerator, devices=devices, num_nodes=f.num_nodes, strategy=strategy,
                      precision="32-true", loggers=loggers)
    except (ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"fabric.accelerator={f.accelerator!r}, fabric.devices={f.devices!r}, "
                          f"fabric.num_nodes={f.num_nodes}: {first}. Fix: fabric=cpu for the CPU, fabric=gpu only "
                          "where GPUs are visible, and at most as many devices as there are.") from None


def find_resume(cfg: Config, run_dir: Path, manifest: dict) -> tuple[Path, dict] | None:
    """The checkpoint to continue from (and its meta), or None for a fresh start."""
    if cfg.resume == "never":
        return None
    ckpt = latest(run_dir) if cfg.resume == "auto" else Path(cfg.resume).expanduser()
    if ckpt is None:
        sealed = complete_checkpoints(run_dir) if cfg.resume == "auto" else []
        if sealed:  # every checkpoint kept is damaged: starting at round 0 unasked would lose the run
            raise ConfigError(f"resume=auto: all {len(sealed)} checkpoint(s) of {run_dir} are damaged (above), so "
                              "there is nothing to resume from. Fix: restore the checkpoints folder, or start the run "
                              "over with resume=never (it replaces this run).")
        return None
    if not (ckpt / COMPLETE).exists():
        raise ConfigError(f"resume={cfg.resume!r}: {ckpt} is not a complete checkpoint. "
                          "Fix: point resume at a checkpoints/round-N folder holding COMPLETE, or use resume=auto.")
    problems = verify(ckpt)
    if problems:
        raise ConfigError(f"resume={cfg.resume!r}: {ckpt} is damaged ({'; '.join(problems[:4])}). Fix: resume from "
                          "an older checkpoint folder, use resume=auto (it passes over damaged ones), or resume=never.")
    meta = load_meta(ckpt)
    check_resumable(ckpt, meta, to_dict(cfg))
    check_data(ckpt, meta, run_dir, manifest)
    return ckpt, meta


WANDB_ID_FILE = "wandb_id.json"


def restarted_wandb_id(cfg: Config, run_dir: Path) -> str | None:
    """The W&B id of an unfinished run in ``run_dir`` with this same config that restarts from round 0
    (stopped before its first checkpoint, even during W&B's own start-up): the restart continues that W&B
    run, not a second one. The id is on disk before W&B starts (``wandb_id.json``), then in summary.json."""
    if cfg.resume != "auto":
        return None
    for name in ("summary.json", WANDB_ID_FILE):
        try:
            old = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if old.get("status") == "finished" or not old.get("wandb_id") or \
                config_mismatch(old.get("config") or {}, to_dict(cfg)):
            return None
        return str(old["wandb_id"])
    return None


def set_aside_replaced_wandb_runs(run_dir: Path, keep_id: str) -> list[Path]:
    """A fresh run replaces the run in its directory: the old run's offline W&B sessions move to
    ``replaced/<time>/`` so that ``wandb sync <run dir>/wandb/offline-run-*`` uploads this run alone."""
    from ..wandb_files import find_offline_runs

    old = [d for d in find_offline_runs(run_dir / "wandb") if not d.name.endswith(f"-{keep_id}")]
    if not old:
        return []
    dest = run_dir / "replaced" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / "wandb"
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for d in old:
        shutil.move(str(d), str(dest / d.name))
        moved.append(dest / d.name)
    return moved


def run(cfg: Config, remote=None) -> dict:
    """Run one federated experiment; returns summary.json's content (on every rank).

    ``remote``: the clients live elsewhere and answer messages (``fedclip_lightning.flower.FlowerClients``):
    it says who they are (``describe``) and reaches them (``transport``); this process holds no image.
    """
    check(cfg)
    started = time.perf_counter()
    # Before the slow start-up (scanning and checking images, loading weights): a SIGUSR1/SIGTERM that
    # arrives then is kept, and the run checkpoints and stops (requeued under SLURM) after its first round.
    preemption = Preemption()
    try:
        return _run(cfg, started, preemption, remote)
    except Preempted as exc:
        if exc.requeue:  # last: SLURM ends the job's processes as soon as it requeues it
            exc.requeued = requeue()
        raise
    finally:
        preemption.restore()


def _run(cfg: Config, started: float, preemption: Preemption, remote) -> dict:
    # Data problems surface here, in every process, before anything launches.
    resolve_weights(cfg.backbone)
    if remote is None:
        task, domains = build_task(cfg)
        manifest = data_manifest(task)
    else:  # the clients say what they hold (names, sizes, digests of their data and weights)
        task, domains, manifest = remote.describe(cfg)
    run_dir = resolve_run_dir(cfg)
    resume = find_resume(cfg, run_dir, manifest)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as exc:
        raise ConfigError(f"output_dir={cfg.output_dir!r}: cannot write to the run directory {run_dir} "
                          f"({exc.strerror}). Fix: set output_dir to a folder you can write to.") from None
    try:
        return _launch(cfg, started, preemption, task, domains, run_dir, resume, manifest, remote)
    finally:
        lock.release()


def _launch(cfg: Config, started: float, preemption: Preemption, task, domains, run_dir: Path,
            resume: tuple[Path, dict] | None, manifest: dict, remote=None) -> dict:
    global LAUNCHED_RANK
    # Only rank 0 logs (and writes checkpoints), so its id is the run's.
    wandb_id = resume[1]["wandb_id"] if resume else (restarted_wandb_id(cfg, run_dir) or secrets.token_hex(4))
    if cfg.logger.name == "wandb" and os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) == "0":
        # On disk before W&B starts: a kill during its start-up restarts as the same W&B run.
        atomic_write_text(run_dir / WANDB_ID_FILE, json.dumps({"wandb_id": wandb_id, "config": to_dict(cfg)}))
        if resume is None:
            for d in set_aside_replaced_wandb_runs(run_dir, wandb_id):
                print(f"  W&B: the replaced run's offline session {d.name} moved to {d.parent}", flush=True)
    loggers = build_loggers(cfg, run_dir, run_dir.name, run_id=wandb_id)
    fabric = build_fabric(cfg, loggers)
    fabric.launch()
    LAUNCHED_RANK = fabric.global_rank if fabric.world_size > 1 else None
    if fabric.device.type == "cpu" and fabric.world_size > 1 and not os.environ.get("OMP_NUM_THREADS"):
        # Processes sharing a node share its cores: no oversubscription (an OMP_NUM_THREADS the user set wins).
        local = max(1, fabric.world_size // max(1, cfg.fabric.num_nodes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    exit_code = 1
    try:
        summary = _run_rounds(cfg, fabric, task, domains, run_dir, started, resume, wandb_id, preemption, manifest,
                              remote)
        exit_code = 0
        return summary
    except Preempted:
        exit_code = 0  # the W&B run is paused, not failed: the requeued job continues it
        raise
    finally:
        if fabric.is_global_zero:
            finish_loggers(loggers, exit_code)
        if os.environ.get("FEDCLIP_RUN_DIR_OWNER") == str(os.getpid()):
            # The next run in this process gets a directory of its own.
            os.environ.pop("FEDCLIP_RUN_DIR", None)
            os.environ.pop("FEDCLIP_RUN_DIR_OWNER", None)


def place_participants(task, world_size: int) -> list[Participant]:
    """Clients, then unseen domains, over ranks by sample count (deterministic)."""
    clients = task.clients
    names = [c.name for c in clients] + list(task.unseen)
    sizes = [len(c.train) + len(c.val) + len(c.test) for c in clients] + [len(v) for v in task.unseen.values()]
    ranks = assign(sizes, names, world_size)
    return [Participant(i, n, "client" if i < len(clients) else "unseen", r)
            for i, (n, r) in enumerate(zip(names, ranks))]


def make_summary(cfg: Config, fabric, backbone, task, domains, algorithm, random_init: bool) -> Summary:
    clients = task.clients
    return Summary(
        algorithm=algorithm.name,
        backbone={"name": backbone.name, "pretrained": backbone.pretrained, "weights_file": backbone.weights_file,
                  "random_init": random_init, "embed_dim": backbone.embed_dim, "precision": backbone.precision},
        dataset=cfg.data.dataset,
        data_root=str(domains.root),
        clients=[c.name for c in clients],
        unseen=list(task.unseen),
        classes=list(task.classes),
        num_samples={**{c.name: {"train": len(c.train), "val": len(c.val), "test": len(c.test)} for c in clients},
                     **{u: {"test": len(v)} for u, v in task.unseen.items()}},
        trainable_params=algorithm.num_params,
        communicated_params=algorithm.num_params if algorithm.communicates else 0,
        bytes_per_client_per_round=algorithm.bytes_per_copy if algorithm.communicates else 0,
        world_size=fabric.world_size,
        config=to_dict(cfg),
        skipped_images=list(domains.skipped),
        slurm=slurm_job(),
        numerics=numerics.describe() if fabric.device.type == "cpu" else {},
        client_training=algorithm.client_training(),
    )


def slurm_job() -> dict[str, str]:
    """The SLURM job this process runs in, as its environment says (what the job really got)."""
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
            "restart_count": "SLURM_RESTART_COUNT", "nodelist": "SLURM_JOB_NODELIST", "ntasks": "SLURM_NTASKS",
            "cpus_per_task": "SLURM_CPUS_PER_TASK", "cpus_on_node": "SLURM_CPUS_ON_NODE",
            "gpus_on_node": "SLURM_GPUS_ON_NODE", "partition": "SLURM_JOB_PARTITION"}
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    return {k: os.environ[v] for k, v in keys.items() if os.environ.get(v)}


def _loader_factory(cfg: Config, fabric: Fabric):
    cached = uses_feature_cache(cfg)
    pin = fabric.device.type == "cuda" and not cached

    def loader(ds, batch_size, shuffle_seed=None):
        return make_loader(ds, batch_size, num_workers=0 if cached else cfg.data.num_workers,
                           shuffle_seed=shuffle_seed, pin_memory=pin)

    return loader


def _run_rounds(cfg: Config, fabric: Fabric, task, domains, run_dir: Path, started: float,
                resume: tuple[Path, dict] | None, wandb_id: str, preemption: Preemption, manifest: dict,
                remote=None) -> dict:
    backbone = load_backbone(cfg.backbone, device=fabric.device, seed=cfg.seed)
    random_init = backbone.weights_file is None and not backbone.name.startswith(("hf-hub:", "local-dir:"))
    # Clients elsewhere are no rank's (rank -1): this process holds none of them.
    parts = place_participants(task, fabric.world_size) if remote is None else \
        [Participant(i, p.name, p.kind, -1) for i, p in enumerate(place_participants(task, 1))]
    ctx = RunContext(cfg, fabric, backbone, task, class_prompt_names(task.classes, cfg.data.class_names),
                     parts, data_digest=manifest_digest(manifest), remote_clients=remote is not None)
    algorithm = registry.get(cfg.algorithm.name)(cfg)
    algorithm.setup(ctx)
    if cfg.data.classes.split == "base_novel":
        base_novel.check(cfg, algorithm)
    summary = make_summary(cfg, fabric, backbone, task, domains, algorithm, random_init)
    summary.wandb_id = wandb_id
    outputs = RunOutputs(cfg, fabric, run_dir, summary, started)
    if remote is None:
        transport = FabricTransport(ctx, algorithm, Clients(algorithm.make_client, ctx.mine))
    else:
        transport = remote.transport(ctx, algorithm, wandb_id, outputs)
    server = Server(ctx, algorithm, transport, summary, outputs, run_dir, preemption, wandb_id)
    for message in algorithm.warnings():
        outputs.warn(message)
    # A fresh start replaces an earlier run in this directory; a resumed one continues it.
    if resume is not None:
        server.restore(resume[1], load_clients(resume[0]))
    elif fabric.is_global_zero:
        if checkpoint_root(run_dir).exists():
            shutil.rmtree(checkpoint_root(run_dir))
        # What the checkpoints' data_digest stands for, so a refused resume can say what changed.
        atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, sort_keys=True))
    outputs.start(server.start_round, random_init)
    saved: list[str] = []
    try:  # from here on, whatever stops the run is in summary.json: status failed (or preempted) and why
        if remote is None:
            ctx.datasets, summary.features = build_datasets(cfg, fabric, backbone, task, ctx.mine)
            outputs.features_ready(summary.features)
            ctx.loader = _loader_factory(cfg, fabric)
            ctx.prepare_eval_loaders()
        else:
            summary.features = {"cache": "on each node"}
        outputs.rounds_start(server.rounds, server.start_round, resume[0] if resume else None)
        summary.setup_seconds = time.perf_counter() - started
        server.fit()
        saved = server.save_final()
        if cfg.federation.zero_shot_baseline and algorithm.trains:
            summary.zero_shot = server.evaluate_zero_shot()
        if cfg.data.classes.split == "base_novel" and summary.final is not None:
            summary.base_novel = base_novel.evaluate(cfg, ctx, algorithm, summary.final, summary.zero_shot)
        summary.status = "finished"
    except Preempted as exc:
        summary.error = str(exc)
        raise
    except BaseException as exc:
        summary.status = "failed"
        summary.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        server.close()
        summary.wall_time_s = time.perf_counter() - started
        outputs.close()
    outputs.finish(saved)
    return summary.as_dict()
