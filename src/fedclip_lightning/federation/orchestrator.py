"""The federated round loop.

config -> task (clients, unseen domains) -> frozen backbone + prompt features
(once per process) -> clients placed on ranks -> rounds of
(broadcast -> local fit -> reduce -> aggregate -> evaluate -> log) -> report.

Every process runs this same function. A rank trains only the clients placed on
it; client models are never wrapped in DDP (ranks train *different* clients).
Random streams come from the seed and the (round, client) pair alone, and the
aggregation sums clients in a fixed order, so the result is the same with 1 or
N processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..checkpoint import (COMPLETE, check_resumable, checkpoint_root, latest, load_clients, load_meta,
                          mark_complete, save_client_shard, save_meta)
from ..client import ClientModule, FullCLIPClient, make_working_copy
from ..config import Config, to_dict, uses_feature_cache, validate
from ..errors import ConfigError
from ..data.domains import DomainSet
from ..data.partition import Task, sample_clients, stable_seed
from ..data.domains import ImageDataset
from ..data.pipeline import build_task, class_prompt_names, feature_dataset, make_loader
from ..data.synthetic import default_cache_dir
from ..evaluate import SplitResult, evaluate, train_epochs
from ..loggers import build_loggers, finish_loggers, wandb_mode
from ..model.adapter import AttentionAdapter
from ..optim import AdamStateArena
from ..model.backbone import load_backbone, resolve_weights
from ..model.features import FeatureCache, model_identity
from ..report import atomic_save, atomic_write_text, keep_rows_up_to, MetricsCSV, RoundsCSV, ModelSelection, RoundMetrics, Summary, format_table
from .distributed import gather_rows, reduce_weighted
from .placement import assign
from .strategy import aggregation_weights, flatten, state_bytes, unflatten

log = logging.getLogger(__name__)


# Set once this process joined a multi-process run: errors are then this rank's own to report.
LAUNCHED_RANK: int | None = None


@dataclass
class Participant:
    """A participating client (trains and evaluates) or an unseen domain (evaluated only)."""

    index: int  # position in the fixed order: clients first, then unseen domains
    name: str
    kind: str  # "client" or "unseen"
    rank: int


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


def run(cfg: Config) -> dict:
    """Run one federated experiment; returns summary.json's content (on every rank)."""
    validate(cfg)
    started = time.perf_counter()
    # Data problems surface here, in every process, before anything launches.
    task, domains = build_task(cfg)
    resolve_weights(cfg.backbone)
    run_dir = resolve_run_dir(cfg)
    run_name = run_dir.name
    resume = _find_resume(cfg, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir={cfg.output_dir!r}: cannot create the run directory {run_dir} ({exc.strerror}). "
                          "Fix: set output_dir to a folder you can write to.") from None
    # Only rank 0 logs (and writes checkpoints), so its id is the run's.
    wandb_id = resume[1]["wandb_id"] if resume else secrets.token_hex(4)
    loggers = build_loggers(cfg, run_dir, run_name, run_id=wandb_id)
    fabric = build_fabric(cfg, loggers)
    preemption = Preemption()
    fabric.launch()
    global LAUNCHED_RANK
    LAUNCHED_RANK = fabric.global_rank if fabric.world_size > 1 else None
    if fabric.device.type == "cpu" and fabric.world_size > 1:
        # Processes sharing a node share its cores: no oversubscription.
        local = max(1, fabric.world_size // max(1, cfg.fabric.num_nodes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    rank0 = fabric.is_global_zero
    exit_code = 1
    try:
        summary = _federate(cfg, fabric, task, domains, run_dir, started, resume, wandb_id, preemption)
        exit_code = 0
        return summary
    except Preempted:
        exit_code = 0  # the W&B run is paused, not failed: the requeued job continues it
        raise
    finally:
        preemption.restore()
        if rank0:
            finish_loggers(loggers, exit_code)
        if os.environ.get("FEDCLIP_RUN_DIR_OWNER") == str(os.getpid()):
            # The next run in this process gets a directory of its own.
            os.environ.pop("FEDCLIP_RUN_DIR", None)
            os.environ.pop("FEDCLIP_RUN_DIR_OWNER", None)


class Preempted(Exception):
    """Stopped at a safe point on SIGUSR1/SIGTERM, after writing a checkpoint."""

    def __init__(self, rnd: int, requeued: bool):
        self.round, self.requeued = rnd, requeued
        super().__init__(f"preempted after round {rnd}: checkpoint written"
                         + ("; the job was requeued and will resume by itself" if requeued else
                            "; continue with resume=auto"))


class Preemption:
    """SIGUSR1 / SIGTERM (SLURM's warning before a time limit or a preemption) set a flag; the
    round loop checks it at its safe point, the end of a round."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _find_resume(cfg: Config, run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to continue from (and its meta), or None for a fresh start."""
    if cfg.resume == "never":
        return None
    ckpt = latest(run_dir) if cfg.resume == "auto" else Path(cfg.resume).expanduser()
    if ckpt is None:
        return None
    if not (ckpt / COMPLETE).exists():
        raise ConfigError(f"resume={cfg.resume!r}: {ckpt} is not a complete checkpoint. "
                          "Fix: point resume at a checkpoints/round-N folder holding COMPLETE, or use resume=auto.")
    meta = load_meta(ckpt)
    check_resumable(ckpt, meta, to_dict(cfg))
    return ckpt, meta


def _federate(cfg: Config, fabric: Fabric, task: Task, domains: DomainSet, run_dir: Path, started: float,
              resume: tuple[Path, dict] | None, wandb_id: str, preemption: "Preemption") -> dict:
    rank0 = fabric.is_global_zero
    device = fabric.device
    algo = cfg.algorithm
    zeroshot = algo.name == "zeroshot"
    local_only = algo.name == "local"  # no aggregation, no communication
    full_model = not zeroshot and algo.trainable in ("image", "all")

    # -- the frozen backbone and the prompt features: once per process ----------
    backbone = load_backbone(cfg.backbone, device=device, seed=cfg.seed)
    prompts = class_prompt_names(task.classes, cfg.data.class_names)
    prompt = algo.prompt or cfg.data.prompt
    random_init = backbone.weights_file is None and not backbone.name.startswith(("hf-hub:", "local-dir:"))

    # -- placement: clients and unseen domains over ranks, by sample count ------
    clients = task.clients
    names = [c.name for c in clients] + list(task.unseen)
    sizes = [len(c.train) + len(c.val) + len(c.test) for c in clients] + [len(v) for v in task.unseen.values()]
    ranks = assign(sizes, names, fabric.world_size)
    parts = [Participant(i, n, "client" if i < len(clients) else "unseen", r)
             for i, (n, r) in enumerate(zip(names, ranks))]
    mine = [p for p in parts if p.rank == fabric.global_rank]
    num_clients = len(clients)

    # -- what trains and travels, and its starting point (the same for every client)
    if full_model:
        # One trainable working copy of CLIP per process, shared by this rank's clients.
        work = make_working_copy(backbone, algo.trainable)
        tokens = backbone.tokenizer([prompt.format(c) for c in prompts]).to(device)

        def make_client(name: str):
            return FullCLIPClient(name, work, tokens, algo)

        template = {k: v.detach().cpu().clone() for k, v in work.named_parameters() if v.requires_grad}
    else:
        text = backbone.text_features(prompts, prompt)

        def make_client(name: str):
            return ClientModule(name, backbone, text, algo, use_adapter=not zeroshot)

        torch.manual_seed(stable_seed(cfg.seed, "adapter-init"))
        template = AttentionAdapter(backbone.embed_dim).state_dict()
    global_state = None if zeroshot else {k: v.clone() for k, v in template.items()}
    num_params = sum(t.numel() for t in template.values()) if not zeroshot else 0
    per_copy_bytes = state_bytes(template) if not zeroshot else 0
    modules = {p.index: make_client(p.name) for p in mine}
    index_of = {p.name: p.index for p in mine}
    keep_adam = algo.optimizer_state == "keep"
    # Adapter clients' Adam moments: one row per client when kept, one scratch row reused by all otherwise.
    arena = None
    if not zeroshot and not full_model:
        own = [p.index for p in mine if p.kind == "client"]
        arena = AdamStateArena(2 * num_params, len(own) if keep_adam else 0, device)
        arena_row = {i: j for j, i in enumerate(own)}
    if rank0 and algo.name == "fedprox" and algo.mu == 0:
        log.warning("algorithm.mu=0: FedProx without its proximal term is FedAvg")
        print("  WARNING: algorithm.mu=0: FedProx without its proximal term is FedAvg")
    pin = device.type == "cuda"
    d = cfg.data

    def train_client(m, start_state, rnd: int, tag: str, epochs: int) -> SplitResult:
        """One client's local fit from ``start_state``: the Lightning hooks, driven by our loop."""
        m.set_state(start_state)
        _move(m, device)
        m.prox_anchor = ({k: v.to(device) for k, v in global_state.items()}
                         if algo.name == "fedprox" and algo.mu > 0 else None)
        optimizer = m.configure_optimizers()
        keep = keep_adam and tag == "train"
        if keep and m.optimizer_state is not None:
            optimizer.load_state_dict(m.optimizer_state)
        i = index_of[m.client_name]
        train_loader = loader(datasets[(i, "train")], d.batch_size, shuffle_seed=(cfg.seed, tag, rnd, m.client_name))
        buffer = arena.buffer_for(arena_row[i] if keep else None) if arena is not None else None
        res = train_epochs(m, train_loader, optimizer, epochs, device, adam_buffer=buffer)
        if keep:
            state = optimizer.state_dict()
            m.optimizer_state = arena.stash(state, arena_row[i]) if arena is not None else _to_cpu(state)
        m.prox_anchor = None
        return res

    summary = Summary(
        algorithm=algo.name,
        backbone={"name": backbone.name, "pretrained": backbone.pretrained, "weights_file": backbone.weights_file,
                  "random_init": random_init, "embed_dim": backbone.embed_dim, "precision": backbone.precision},
        dataset=cfg.data.dataset,
        data_root=str(domains.root),
        clients=[c.name for c in clients],
        unseen=list(task.unseen),
        classes=list(task.classes),
        num_samples={**{c.name: {"train": len(c.train), "val": len(c.val), "test": len(c.test)} for c in clients},
                     **{u: {"test": len(v)} for u, v in task.unseen.items()}},
        trainable_params=num_params,
        communicated_params=0 if local_only else num_params,
        bytes_per_client_per_round=0 if local_only else per_copy_bytes,
        world_size=fabric.world_size,
        config=to_dict(cfg),
        skipped_images=list(domains.skipped),
    )
    # -- a fresh start replaces an earlier run in this directory; a resumed one continues it
    start_round = 0
    selection = ModelSelection()
    if resume is not None:
        ckpt, meta = resume
        start_round = int(meta["round"])
        if global_state is not None:
            global_state = {k: v.clone() for k, v in meta["global_state"].items()}
        if meta.get("selected"):
            selection.best = RoundMetrics.from_dict(meta["selected"])
        summary.selected = selection.best
        if meta.get("final"):
            summary.final = RoundMetrics.from_dict(meta["final"])
        summary.bytes_up_total, summary.bytes_down_total = int(meta["bytes_up_total"]), int(meta["bytes_down_total"])
        summary.rounds_run = start_round
        summary.round_seconds = list(meta.get("round_seconds", []))
        summary.resumed_from = start_round
        saved_clients = load_clients(ckpt)
        for p in mine:
            st = saved_clients.get(p.name, {})
            modules[p.index].own_state = st.get("own_state")
            opt_state = st.get("optimizer_state")
            if opt_state is not None and arena is not None and arena.rows is not None:
                opt_state = arena.stash(opt_state, arena_row[p.index])  # into the client's row, like a live one
            modules[p.index].optimizer_state = opt_state
    if rank0:
        for name in ("metrics.csv", "rounds.csv"):
            keep_rows_up_to(run_dir / name, start_round)
        if resume is None and checkpoint_root(run_dir).exists():
            shutil.rmtree(checkpoint_root(run_dir))
    metrics_csv = MetricsCSV(run_dir / "metrics.csv") if rank0 else None
    rounds_csv = RoundsCSV(run_dir / "rounds.csv") if rank0 else None
    last_bytes = (summary.bytes_up_total, summary.bytes_down_total)  # totals at the previous evaluation
    if rank0:
        _print_header(cfg, summary, run_dir, random_init, fabric)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(summary.config))
        for lg in fabric.loggers:
            try:
                lg.log_hyperparams(summary.config)
            except NotImplementedError:  # Fabric's CSVLogger; config.yaml above has it
                pass
        summary.write(run_dir / "summary.json")

    # -- data: cached frozen features (each image encoded once) or images ------
    datasets, summary.features = _build_datasets(cfg, fabric, backbone, clients, task, mine)
    if rank0:
        _print_features(summary.features)
    train_workers = 0 if uses_feature_cache(cfg) else d.num_workers

    def loader(ds, batch_size, shuffle_seed=None):
        return make_loader(ds, batch_size, num_workers=train_workers, shuffle_seed=shuffle_seed,
                           pin_memory=pin and not uses_feature_cache(cfg))

    eval_loaders = {key: loader(ds, d.eval_batch_size) for key, ds in datasets.items() if key[1] != "train"}

    rounds = 0 if zeroshot else cfg.federation.rounds
    weights_of: dict[tuple, list[float]] = {}  # aggregation weights by the set of clients that trained
    table = None  # every client's state after the last round, one row each (on every rank)
    state_file = "model" if full_model else "adapter"
    bar = tqdm(total=max(rounds, 1), desc="rounds", unit="round", dynamic_ncols=True,
               disable=not (rank0 and cfg.progress))
    evaluator = _RoundEvaluator(fabric, parts, modules, eval_loaders, summary, metrics_csv, algo, train_client)
    writer = CheckpointWriter()
    try:
        if zeroshot:
            metrics = evaluator.evaluate(0, None, None, None)
            selection.update(metrics)
            summary.selected, summary.final = metrics, metrics
            if rank0:
                rounds_csv.write(metrics, 0, 0, 0, 0, time.perf_counter() - started)
            bar.update(1)
        summary.setup_seconds = time.perf_counter() - started
        if rank0 and start_round:
            print(f"  resumed from {resume[0]} (round {start_round} of {rounds})", flush=True)
            bar.update(start_round)
        for rnd in range(start_round + 1, rounds + 1):
            round_started = time.perf_counter()
            # 1. broadcast + 2. local fit: each rank trains its clients of this round, one after another.
            active = sample_clients(num_clients, cfg.federation.client_fraction, rnd, cfg.seed)
            rows: dict[int, torch.Tensor] = {}
            train_rows: dict[int, torch.Tensor] = {}
            for p in mine:
                if p.kind != "client" or p.index not in active:
                    continue
                m = modules[p.index]
                start = m.own_state if local_only and m.own_state is not None else global_state
                train_rows[p.index] = train_client(m, start, rnd, "train", algo.local_epochs).as_row()
                if local_only:
                    m.own_state = {k: v.cpu() for k, v in m.get_state().items()}
                elif full_model:  # the shared working copy is about to serve the next client
                    rows[p.index] = flatten(m.get_state()).cpu()
                _move(m, "cpu")  # a client's state waits off the accelerator between turns
            if local_only:
                # `local` never communicates; every rank assembles all clients' own adapters (no bytes
                # counted) because an unseen domain is scored with each of them.
                for p in mine:
                    if p.kind == "client":
                        rows[p.index] = flatten(modules[p.index].own_state or global_state)
                table = gather_rows(fabric, rows, num_clients, num_params)
            else:
                # 3. reduce + 4. aggregate: the trained states travel a chunk of clients at a time and are
                #    summed in fixed client order (weights renormalised over the clients that trained);
                #    the result goes back to every client.
                key = tuple(active)
                if key not in weights_of:
                    weights_of[key] = aggregation_weights([len(clients[i].train) for i in active],
                                                          cfg.federation.aggregation)

                def row_of(i: int):  # this rank's clients: read from the client itself, no copy kept
                    if i in rows:
                        return rows[i]
                    return flatten(modules[i].trainable()) if i in modules else None

                global_state = unflatten(reduce_weighted(fabric, row_of, list(active), weights_of[key], num_params),
                                         template)
                summary.bytes_up_total += len(active) * per_copy_bytes
                summary.bytes_down_total += num_clients * per_copy_bytes
            summary.rounds_run = rnd
            # 5. evaluate (every eval_interval rounds, and always the last).
            if rnd % cfg.federation.eval_interval == 0 or rnd == rounds:
                metrics = evaluator.evaluate(rnd, global_state, train_rows, table if local_only else None)
                if selection.update(metrics) and rank0 and not local_only:
                    _save_state(run_dir / f"{state_file}_selected.pt", global_state, metrics.round)
                summary.selected, summary.final = selection.best, metrics
                bar.set_postfix(val=f"{metrics.mean_client_val_acc:.3f}", test=f"{metrics.mean_client_test_acc:.3f}",
                                unseen=f"{metrics.mean_unseen_acc:.3f}")
                if rank0:
                    summary.wall_time_s = time.perf_counter() - started
                    rounds_csv.write(metrics, summary.bytes_up_total - last_bytes[0],
                                     summary.bytes_down_total - last_bytes[1], summary.bytes_up_total,
                                     summary.bytes_down_total, summary.wall_time_s)
                    last_bytes = (summary.bytes_up_total, summary.bytes_down_total)
                    summary.write(run_dir / "summary.json", durable=False)  # the checkpoint is durable
            summary.round_seconds.append(time.perf_counter() - round_started)
            bar.update(1)
            # 6. checkpoint: on the interval, and whenever a preemption signal arrived (any rank).
            stop = _any_rank(fabric, preemption.requested)
            interval = cfg.federation.checkpoint_interval
            if stop or rnd == rounds or (interval and rnd % interval == 0):
                # The last one, and a preemption's, are on disk before the loop goes on.
                _checkpoint(fabric, run_dir, rnd, cfg, global_state, selection, summary, modules, mine, wandb_id,
                            writer, wait=stop or rnd == rounds)
            if stop:
                summary.status = "preempted"
                raise Preempted(rnd, _requeue() if rank0 else False)
        if rank0 and not zeroshot:
            if local_only:
                _save_state(run_dir / "adapters_final.pt",
                            {f"{c.name}/{k}": v for c, row in zip(clients, table)
                             for k, v in unflatten(row, template).items()}, summary.rounds_run)
            else:
                _save_state(run_dir / f"{state_file}_final.pt", global_state, summary.rounds_run)
        summary.status = "finished"
    except Preempted as exc:
        summary.error = str(exc)
        raise
    except BaseException as exc:
        summary.status = "failed"
        summary.error = f"{type(exc).__name__}: {exc}"
        writer.close()  # a checkpoint being written still lands: a resume starts from it
        raise
    finally:
        writer.close()
        bar.close()
        summary.wall_time_s = time.perf_counter() - started
        if rank0:
            summary.write(run_dir / "summary.json")
            if metrics_csv is not None:
                metrics_csv.close()
                rounds_csv.close()
    result = summary.as_dict()
    if rank0:
        _finish_outputs(fabric, summary, run_dir)
        print("\n" + format_table(summary))
        saved = "" if zeroshot else (", adapters_final.pt" if local_only else
                                     f", {state_file}_selected.pt, {state_file}_final.pt")
        print(f"\nrun directory: {run_dir}\n  summary.json, metrics.csv, rounds.csv, accuracy.png, config.yaml{saved}"
              + (f", W&B run under {run_dir / 'wandb'}" if cfg.logger.name == "wandb" and
                 wandb_mode(cfg) != "disabled" else ""))
    return result


class _RoundEvaluator:
    """One round's evaluation: each rank evaluates what it holds; one all_reduce assembles the table.

    Each participant has five result slots (accuracy, loss, n): train (the local
    fit of this round), val, test (with the model the client holds), and
    val_global / test_global (fedclip_ft: the global adapter before
    personalisation). Unseen domains use the test slot.
    """

    SLOTS = ("train", "val", "test", "val_global", "test_global")

    def __init__(self, fabric, parts, modules, eval_loaders, summary, metrics_csv, algorithm, train_client):
        self.fabric, self.parts, self.modules = fabric, parts, modules
        self.eval_loaders, self.summary, self.metrics_csv = eval_loaders, summary, metrics_csv
        self.algo, self.train_client = algorithm, train_client

    def _local_results(self, rnd, global_state, train_rows, local_table) -> dict[int, torch.Tensor]:
        device, n = self.fabric.device, len(self.parts)
        slot = {s: i * n for i, s in enumerate(self.SLOTS)}
        num_clients = sum(p.kind == "client" for p in self.parts)
        out: dict[int, torch.Tensor] = {}
        for p in self.parts:
            if p.rank != self.fabric.global_rank:
                continue
            m = self.modules[p.index]
            _move(m, device)
            if p.kind == "client":
                if train_rows is not None and p.index in train_rows:
                    out[slot["train"] + p.index] = train_rows[p.index]
                held = m.own_state if self.algo.name == "local" and m.own_state is not None else global_state
                if held is not None:
                    m.set_state(held)  # the model this client holds after the round
                if self.algo.name == "fedclip_ft":
                    val_loader, test_loader = self.eval_loaders[(p.index, "val")], self.eval_loaders[(p.index, "test")]
                    out[slot["val_global"] + p.index] = evaluate(m, val_loader, device).as_row()
                    out[slot["test_global"] + p.index] = evaluate(m, test_loader, device).as_row()
                    # The personal adapter: the global one fine-tuned on this client's own training data.
                    self.train_client(m, global_state, rnd, "personal", self.algo.personal_epochs)
                    m.own_state = {k: v.cpu() for k, v in m.get_state().items()}
                out[slot["val"] + p.index] = evaluate(m, self.eval_loaders[(p.index, "val")], device).as_row()
                out[slot["test"] + p.index] = evaluate(m, self.eval_loaders[(p.index, "test")], device).as_row()
            elif local_table is not None:
                # `local` has no global model: the mean over the clients' own adapters on this domain.
                template = m.get_state()
                results = []
                for c in range(num_clients):
                    m.set_state(unflatten(local_table[c], template))
                    results.append(evaluate(m, self.eval_loaders[(p.index, "unseen")], device))
                out[slot["test"] + p.index] = SplitResult(
                    accuracy=sum(r.accuracy for r in results) / len(results),
                    loss=sum(r.loss for r in results) / len(results), n=results[0].n).as_row()
            else:
                if global_state is not None:
                    m.set_state(global_state)
                out[slot["test"] + p.index] = evaluate(m, self.eval_loaders[(p.index, "unseen")], device).as_row()
            _move(m, "cpu")
        return out

    def evaluate(self, rnd: int, global_state, train_rows, local_table) -> RoundMetrics:
        fabric, n = self.fabric, len(self.parts)
        local = self._local_results(rnd, global_state, train_rows, local_table)
        # A fourth column marks rows that some rank filled (a train row is absent in round 0, say).
        present = torch.ones(1, dtype=torch.float64)
        table = gather_rows(fabric, {i: torch.cat([v, present]) for i, v in local.items()},
                            len(self.SLOTS) * n, 4, torch.float64)

        def row(s: str, i: int) -> SplitResult | None:
            j = self.SLOTS.index(s) * n + i
            return SplitResult.from_row(table[j]) if table[j, 3] > 0 else None

        acc: dict[str, dict[str, float]] = {s: {} for s in self.SLOTS}
        unseen: dict[str, float] = {}
        csv_rows = []
        logd: dict[str, float] = {"round": rnd}
        for p in self.parts:
            if p.kind == "client":
                for s in self.SLOTS:
                    res = row(s, p.index)
                    if res is None:
                        continue
                    acc[s][p.name] = res.accuracy
                    csv_rows.append((rnd, p.name, s, res.accuracy, res.loss))
                    logd[f"client/{p.name}/{s}_acc"] = res.accuracy
                    logd[f"client/{p.name}/{s}_loss"] = res.loss
            else:
                te = row("test", p.index)
                unseen[p.name] = te.accuracy
                csv_rows.append((rnd, p.name, "unseen", te.accuracy, te.loss))
                logd[f"unseen/{p.name}/acc"] = te.accuracy
                logd[f"unseen/{p.name}/loss"] = te.loss
        metrics = RoundMetrics(rnd, acc["val"], acc["test"], unseen, acc["val_global"], acc["test_global"])
        if fabric.is_global_zero:
            s = self.summary
            logd.update({
                "mean/client_val_acc": metrics.mean_client_val_acc,
                "mean/client_test_acc": metrics.mean_client_test_acc,
                "comm/bytes_up_total": s.bytes_up_total,
                "comm/bytes_down_total": s.bytes_down_total,
                "comm/bytes_total": s.bytes_up_total + s.bytes_down_total,
            })
            if unseen:
                logd["mean/unseen_acc"] = metrics.mean_unseen_acc
            if acc["test_global"]:
                logd["mean/client_test_acc_global"] = metrics.mean_client_test_acc_global
            fabric.log_dict({k: v for k, v in logd.items() if not (isinstance(v, float) and math.isnan(v))},
                            step=rnd)
            if self.metrics_csv is not None:
                self.metrics_csv.write(csv_rows)
        return metrics


def _build_datasets(cfg: Config, fabric: Fabric, backbone, clients, task: Task, mine: list[Participant]):
    """Per (participant index, split): a data set of cached features, or of images.

    With the cache, each rank encodes the images of its own participants once
    (or loads them from disk) before the first round.
    """
    datasets: dict[tuple[int, str], object] = {}
    use_cache = uses_feature_cache(cfg)
    cache = None
    if use_cache:
        fc = cfg.features
        root = None
        if fc.persist:
            root = Path(fc.dir).expanduser() if fc.dir else default_cache_dir() / "features"
        cache = FeatureCache(root, backbone, model_identity(backbone, backbone.precision, cfg.seed),
                             batch_size=fc.batch_size,
                             num_workers=fc.num_workers if fc.num_workers is not None else min(8, os.cpu_count() or 1),
                             progress=cfg.progress and fabric.is_global_zero)
    splits_of = {}
    for p in mine:
        if p.kind == "client":
            c = clients[p.index]
            splits_of[p.index] = {"train": c.train, "val": c.val, "test": c.test}
        else:
            splits_of[p.index] = {"unseen": task.unseen[p.name]}
    if cache is None:
        for i, splits in splits_of.items():
            for split, samples in splits.items():
                datasets[(i, split)] = ImageDataset(samples, backbone.preprocess)
    else:
        # Every image of this rank's participants in one encoder pass (or read from the cache).
        sets = [[s for samples in splits.values() for s in samples] for splits in splits_of.values()]
        for (i, splits), feats in zip(splits_of.items(), cache.get_many(sets, desc="encoding")):
            offset = 0
            for split, samples in splits.items():
                datasets[(i, split)] = feature_dataset(feats[offset : offset + len(samples)], samples)
                offset += len(samples)
    stats = {"cache": use_cache}
    if cache is not None:
        # Summed over ranks: how many images this run encoded, and how many came from disk.
        local = torch.tensor([[cache.stats.encoded_images, cache.stats.cached_images, cache.stats.rebuilt_files,
                               cache.stats.encode_seconds]], dtype=torch.float64)
        total = gather_rows(fabric, {fabric.global_rank: local[0]}, fabric.world_size, 4, torch.float64)
        stats.update({
            "dir": str(cache.root) if cache.root else None,
            "encoded_images": int(total[:, 0].sum()),
            "cached_images": int(total[:, 1].sum()),
            "rebuilt_files": int(total[:, 2].sum()),
            "encode_seconds_max_rank": round(float(total[:, 3].max()), 3),
        })
    return datasets, stats


def _any_rank(fabric: Fabric, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (signals may reach ranks at different times)."""
    if fabric.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=fabric.device)
    return bool(fabric.all_reduce(t, reduce_op="sum").item() > 0)


def _checkpoint(fabric: Fabric, run_dir: Path, rnd: int, cfg: Config, global_state, selection: ModelSelection,
                summary: Summary, modules: dict, mine: list[Participant], wandb_id: str,
                writer: "CheckpointWriter | None" = None, wait: bool = True) -> None:
    """Every rank writes its clients' persistent state; rank 0 the rest; then the folder is sealed.

    A single process hands the writing to ``writer`` (off the round loop) unless told to ``wait``, or
    its clients keep Adam state: that lives in place and changes in the next round, so it is written
    before the loop goes on. Several processes write in the loop: the seal comes after a barrier.
    """
    clients = {}
    for p in mine:
        m = modules[p.index]
        if p.kind == "client" and (m.own_state is not None or m.optimizer_state is not None):
            clients[p.name] = {"own_state": m.own_state, "optimizer_state": m.optimizer_state}
    meta = None
    if fabric.is_global_zero:
        # Plain data and tensors that are never written in place (each round makes a new global state).
        meta = {
            "config": json.dumps(summary.config, sort_keys=True),
            "global_state": None if global_state is None else {k: v.cpu() for k, v in global_state.items()},
            "selected": selection.best.as_dict() if selection.best else None,
            "final": summary.final.as_dict() if summary.final else None,
            "bytes_up_total": summary.bytes_up_total,
            "bytes_down_total": summary.bytes_down_total,
            "round_seconds": list(summary.round_seconds),
            "wandb_id": wandb_id,
        }
    keep = cfg.federation.keep_checkpoints
    if writer is not None:
        writer.wait()
        if fabric.world_size == 1 and not wait and not any(c["optimizer_state"] is not None for c in clients.values()):
            def write() -> None:
                save_client_shard(run_dir, rnd, 0, clients)
                save_meta(run_dir, rnd, meta)
                mark_complete(run_dir, rnd, keep)

            writer.submit(write)
            return
    save_client_shard(run_dir, rnd, fabric.global_rank, clients)
    if meta is not None:
        save_meta(run_dir, rnd, meta)
    fabric.barrier()
    if fabric.is_global_zero:
        mark_complete(run_dir, rnd, keep)


class CheckpointWriter:
    """Writes a checkpoint in a background thread while the next round trains.

    Serialising, fsyncing and renaming cost milliseconds a round, as much as a
    FedCLIP round's evaluation on cached features. One write is in flight at
    most: the next checkpoint waits for the previous one, and so do the end of
    the run and a preemption; an error in the writer is raised at that wait.
    """

    def __init__(self):
        self._pool = None
        self._pending = None

    def submit(self, fn) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._pool.submit(fn)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Let a write in flight finish (its error, if any, is logged: the run is ending anyway)."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001
            log.warning("writing the last checkpoint failed: %s", exc)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _requeue() -> bool:
    """Under SLURM: put this job back in the queue (it resumes by itself: launch.sh passes resume=auto)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    return True


def _finish_outputs(fabric: Fabric, summary: Summary, run_dir: Path) -> None:
    """The per-round accuracy plot, and the final accuracies as a table in W&B."""
    from ..plots import plot_run

    try:
        plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - a plot must never cost the run its results
        log.warning("could not draw %s: %s", run_dir / "accuracy.png", exc)
    fin, sel = summary.final, summary.selected
    if fin is None:
        return
    rows = []
    for c in summary.clients:
        rows.append([c, "client", sel.client_val_acc.get(c), sel.client_test_acc.get(c),
                     fin.client_val_acc.get(c), fin.client_test_acc.get(c)])
    for u in summary.unseen:
        rows.append([u, "unseen", None, sel.unseen_acc.get(u), None, fin.unseen_acc.get(u)])
    for lg in fabric.loggers:
        if hasattr(lg, "log_table"):
            lg.log_table("summary_table", columns=["domain", "role", "selected_val_acc", "selected_test_acc",
                                                   "final_val_acc", "final_test_acc"], data=rows)
        exp = getattr(lg, "_experiment", None)
        if exp is not None and hasattr(exp, "summary"):
            exp.summary.update({"selected_round": sel.round, "selected/mean_unseen_acc": sel.mean_unseen_acc,
                                "selected/mean_client_test_acc": sel.mean_client_test_acc,
                                "trainable_params": summary.trainable_params,
                                "bytes_up_total": summary.bytes_up_total})


def _move(module: ClientModule, device) -> None:
    """Move a client between the accelerator and the CPU (a no-op, skipped, on a CPU-only run)."""
    if torch.device(device) != module.device:
        module.to(device)


def _save_state(path: Path, state: dict[str, torch.Tensor], rnd: int) -> None:
    """Trained tensors as a plain state dict: ``torch.load(path, weights_only=True)["state"]``."""
    atomic_save({"round": rnd, "state": {k: v.detach().cpu() for k, v in state.items()}}, path, durable=False)


def _to_cpu(obj):
    """Tensors moved to the CPU (no copy when already there: the optimiser they came from is dropped)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _print_features(f: dict) -> None:
    if f.get("cache"):
        print(f"  features: {f['encoded_images']} images encoded ({f['encode_seconds_max_rank']:.1f} s), "
              f"{f['cached_images']} read from the cache {f['dir'] or '(in memory)'}", flush=True)


def _print_header(cfg: Config, s: Summary, run_dir: Path, random_init: bool, fabric: Fabric) -> None:
    w = 0 if s.algorithm == "zeroshot" else cfg.federation.rounds
    print(f"fedclip-lightning: {s.algorithm} on {s.dataset} ({s.data_root})")
    print(f"  backbone {s.backbone['name']} ({'random init' if random_init else s.backbone['weights_file'] or s.backbone['name']}),"
          f" {s.trainable_params:,} trainable parameters, {s.bytes_per_client_per_round:,} bytes per client per round")
    listed = ", ".join(f"{c} ({s.num_samples[c]['train']} train)" for c in s.clients)
    print(f"  clients: {listed}")
    print(f"  unseen:  {', '.join(s.unseen) or '-'}")
    print(f"  {w} rounds on {fabric.world_size} process(es), {fabric.device.type}; run directory {run_dir}")
    if s.skipped_images:
        print(f"  skipped {len(s.skipped_images)} unreadable image(s) (data.on_corrupt=skip); listed in summary.json")
    if random_init:
        print("  NOTE: the backbone is RANDOMLY initialised (backbone.pretrained=null): accuracies here check the "
              "pipeline and say nothing about CLIP.")
    if cfg.note:
        print(f"  {cfg.note}")
