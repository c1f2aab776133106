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

import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..client import ClientModule
from ..config import Config, to_dict, uses_feature_cache, validate
from ..data.domains import DomainSet
from ..data.partition import Task, stable_seed
from ..data.domains import ImageDataset
from ..data.pipeline import build_task, class_prompt_names, feature_dataset, make_loader
from ..data.synthetic import default_cache_dir
from ..evaluate import SplitResult, evaluate, train_epochs
from ..loggers import build_loggers, finish_loggers, wandb_mode
from ..model.adapter import AttentionAdapter
from ..model.backbone import load_backbone, resolve_weights
from ..model.features import FeatureCache, model_identity
from ..report import atomic_write_text, MetricsCSV, RoundsCSV, ModelSelection, RoundMetrics, Summary, format_table
from .distributed import gather_rows
from .placement import assign
from .strategy import aggregation_weights, flatten, state_bytes, unflatten, weighted_sum_rows

log = logging.getLogger(__name__)


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
    return path


def build_fabric(cfg: Config, loggers: list) -> Fabric:
    f = cfg.fabric
    devices = list(f.devices) if isinstance(f.devices, (list, tuple)) else f.devices
    strategy = f.strategy
    if strategy == "auto" and f.accelerator == "cpu" and (devices not in (1, "auto") or f.num_nodes > 1):
        strategy = "ddp"  # gloo on the CPU; Fabric's own choice here would be an interactive fork
    return Fabric(accelerator=f.accelerator, devices=devices, num_nodes=f.num_nodes, strategy=strategy,
                  precision="32-true", loggers=loggers)


def run(cfg: Config) -> dict:
    """Run one federated experiment; returns summary.json's content (on every rank)."""
    validate(cfg)
    started = time.perf_counter()
    # Data problems surface here, in every process, before anything launches.
    task, domains = build_task(cfg)
    resolve_weights(cfg.backbone)
    run_dir = resolve_run_dir(cfg)
    run_name = run_dir.name
    loggers = build_loggers(cfg, run_dir, run_name)
    fabric = build_fabric(cfg, loggers)
    fabric.launch()
    if fabric.device.type == "cpu" and fabric.world_size > 1:
        # Processes sharing a node share its cores: no oversubscription.
        local = max(1, fabric.world_size // max(1, cfg.fabric.num_nodes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    rank0 = fabric.is_global_zero
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    exit_code = 1
    try:
        summary = _federate(cfg, fabric, task, domains, run_dir, started)
        exit_code = 0
        return summary
    finally:
        if rank0:
            finish_loggers(loggers, exit_code)


def _federate(cfg: Config, fabric: Fabric, task: Task, domains: DomainSet, run_dir: Path, started: float) -> dict:
    rank0 = fabric.is_global_zero
    device = fabric.device
    algo = cfg.algorithm
    zeroshot = algo.name == "zeroshot"

    # -- the frozen backbone and the prompt features: once per process ----------
    backbone = load_backbone(cfg.backbone, device=device, seed=cfg.seed)
    prompts = class_prompt_names(task.classes, cfg.data.class_names)
    text = backbone.text_features(prompts, cfg.data.prompt)
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

    # -- the server adapter: the same initialisation for every client ----------
    torch.manual_seed(stable_seed(cfg.seed, "adapter-init"))
    template = AttentionAdapter(backbone.embed_dim).state_dict()
    global_state = {k: v.clone() for k, v in template.items()}
    adapter_params = sum(t.numel() for t in template.values())
    per_copy_bytes = state_bytes(template)
    weights = aggregation_weights([len(c.train) for c in clients], cfg.federation.aggregation)

    modules: dict[int, ClientModule] = {
        p.index: ClientModule(p.name, backbone, text, algo, use_adapter=not zeroshot) for p in mine
    }
    pin = device.type == "cuda"
    d = cfg.data

    # -- data: cached frozen features (each image encoded once) or images ------
    datasets, feature_stats = _build_datasets(cfg, fabric, backbone, clients, task, mine)
    train_workers = 0 if uses_feature_cache(cfg) else d.num_workers

    def loader(ds, batch_size, shuffle_seed=None):
        return make_loader(ds, batch_size, num_workers=train_workers, shuffle_seed=shuffle_seed,
                           pin_memory=pin and not uses_feature_cache(cfg))

    eval_loaders = {key: loader(ds, d.eval_batch_size) for key, ds in datasets.items() if key[1] != "train"}

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
        trainable_params=0 if zeroshot else adapter_params,
        bytes_per_client_per_round=0 if zeroshot else per_copy_bytes,
        world_size=fabric.world_size,
        config=to_dict(cfg),
        skipped_images=list(domains.skipped),
        features=feature_stats,
    )
    metrics_csv = MetricsCSV(run_dir / "metrics.csv") if rank0 else None
    rounds_csv = RoundsCSV(run_dir / "rounds.csv") if rank0 else None
    last_bytes = (0, 0)  # totals at the previous evaluation, for bytes per evaluated interval
    if rank0:
        _print_header(cfg, summary, run_dir, random_init, fabric)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(summary.config))
        for lg in fabric.loggers:
            try:
                lg.log_hyperparams(summary.config)
            except NotImplementedError:  # Fabric's CSVLogger; config.yaml above has it
                pass
        summary.write(run_dir / "summary.json")

    selection = ModelSelection()
    rounds = 0 if zeroshot else cfg.federation.rounds
    bar = tqdm(total=max(rounds, 1), desc="rounds", unit="round", dynamic_ncols=True,
               disable=not (rank0 and cfg.progress))
    try:
        if zeroshot:
            metrics = _evaluate_round(fabric, 0, parts, modules, eval_loaders, None, None, summary, metrics_csv)
            selection.update(metrics)
            summary.selected, summary.final = metrics, metrics
            if rank0:
                rounds_csv.write(metrics, 0, 0, 0, 0, time.perf_counter() - started)
            bar.update(1)
        for rnd in range(1, rounds + 1):
            # 1. broadcast + 2. local fit: each rank trains its own clients, one after another.
            rows: dict[int, torch.Tensor] = {}
            train_rows: dict[int, torch.Tensor] = {}
            for p in mine:
                if p.kind != "client":
                    continue
                m = modules[p.index]
                m.set_adapter_state(global_state)
                _move(m, device)
                optimizer = m.configure_optimizers()
                if algo.optimizer_state == "keep" and m.optimizer_state is not None:
                    optimizer.load_state_dict(m.optimizer_state)
                train_loader = loader(datasets[(p.index, "train")], d.batch_size,
                                      shuffle_seed=(cfg.seed, "train", rnd, p.name))
                res = train_epochs(m, train_loader, optimizer, algo.local_epochs, device)
                if algo.optimizer_state == "keep":
                    m.optimizer_state = _to_cpu(optimizer.state_dict())
                rows[p.index] = flatten(m.get_adapter_state())
                train_rows[p.index] = res.as_row()
                _move(m, "cpu")  # a client's state waits off the accelerator between turns
            # 3. reduce: one all_reduce assembles every client's adapter on every rank.
            table = gather_rows(fabric, rows, num_clients, adapter_params)
            # 4. aggregate in fixed client order, and send the result back to every client.
            global_state = unflatten(weighted_sum_rows(table, weights), template)
            summary.bytes_up_total += num_clients * per_copy_bytes
            summary.bytes_down_total += num_clients * per_copy_bytes
            summary.rounds_run = rnd
            # 5. evaluate (every eval_interval rounds, and always the last).
            if rnd % cfg.federation.eval_interval == 0 or rnd == rounds:
                metrics = _evaluate_round(fabric, rnd, parts, modules, eval_loaders, global_state, train_rows,
                                          summary, metrics_csv)
                if selection.update(metrics) and rank0:
                    _save_adapter(run_dir / "adapter_selected.pt", global_state, metrics.round)
                summary.selected, summary.final = selection.best, metrics
                bar.set_postfix(val=f"{metrics.mean_client_val_acc:.3f}", test=f"{metrics.mean_client_test_acc:.3f}",
                                unseen=f"{metrics.mean_unseen_acc:.3f}")
                if rank0:
                    summary.wall_time_s = time.perf_counter() - started
                    rounds_csv.write(metrics, summary.bytes_up_total - last_bytes[0],
                                     summary.bytes_down_total - last_bytes[1], summary.bytes_up_total,
                                     summary.bytes_down_total, summary.wall_time_s)
                    last_bytes = (summary.bytes_up_total, summary.bytes_down_total)
                    summary.write(run_dir / "summary.json")
            bar.update(1)
        if rank0 and not zeroshot:
            _save_adapter(run_dir / "adapter_final.pt", global_state, summary.rounds_run)
        summary.status = "finished"
    except BaseException as exc:
        summary.status = "failed"
        summary.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        summary.wall_time_s = time.perf_counter() - started
        if rank0:
            summary.write(run_dir / "summary.json")
            if metrics_csv is not None:
                metrics_csv.close()
                rounds_csv.close()
    result = summary.as_dict()
    if rank0:
        print("\n" + format_table(summary))
        print(f"\nrun directory: {run_dir}\n  summary.json, metrics.csv, rounds.csv, config.yaml"
              + (", adapter_selected.pt, adapter_final.pt" if not zeroshot else "")
              + (f", W&B run under {run_dir / 'wandb'}" if cfg.logger.name == "wandb" and
                 wandb_mode(cfg) != "disabled" else ""))
    return result


def _evaluate_round(fabric: Fabric, rnd: int, parts: list[Participant], modules: dict[int, ClientModule],
                    eval_loaders: dict, global_state: dict | None, train_rows: dict[int, torch.Tensor] | None,
                    summary: Summary, metrics_csv: MetricsCSV | None) -> RoundMetrics:
    """Each rank evaluates what it holds; one all_reduce assembles the table; rank 0 logs it."""
    device = fabric.device
    n = len(parts)
    # Rows: [train | val | test] of each participant, 3 numbers each (accuracy, loss, n).
    local: dict[int, torch.Tensor] = {}
    for p in parts:
        if p.rank != fabric.global_rank:
            continue
        m = modules[p.index]
        if global_state is not None:
            m.set_adapter_state(global_state)  # the model each client holds after aggregation
        _move(m, device)
        if p.kind == "client":
            if train_rows is not None and p.index in train_rows:
                local[p.index] = train_rows[p.index]
            local[n + p.index] = evaluate(m, eval_loaders[(p.index, "val")], device).as_row()
            local[2 * n + p.index] = evaluate(m, eval_loaders[(p.index, "test")], device).as_row()
        else:
            local[2 * n + p.index] = evaluate(m, eval_loaders[(p.index, "unseen")], device).as_row()
        _move(m, "cpu")
    # A fourth column marks rows that some rank filled (a train row is absent in round 0, say).
    present_col = torch.ones(1, dtype=torch.float64)
    table = gather_rows(fabric, {i: torch.cat([v, present_col]) for i, v in local.items()}, 3 * n, 4,
                        torch.float64)

    def row(i: int) -> SplitResult | None:
        return SplitResult.from_row(table[i]) if table[i, 3] > 0 else None

    val, test, unseen = {}, {}, {}
    csv_rows = []
    logd: dict[str, float] = {"round": rnd}
    for p in parts:
        if p.kind == "client":
            tr, va, te = row(p.index), row(n + p.index), row(2 * n + p.index)
            val[p.name], test[p.name] = va.accuracy, te.accuracy
            for split, res in (("train", tr), ("val", va), ("test", te)):
                if res is not None:
                    csv_rows.append((rnd, p.name, split, res.accuracy, res.loss))
                    logd[f"client/{p.name}/{split}_acc"] = res.accuracy
                    logd[f"client/{p.name}/{split}_loss"] = res.loss
        else:
            te = row(2 * n + p.index)
            unseen[p.name] = te.accuracy
            csv_rows.append((rnd, p.name, "unseen", te.accuracy, te.loss))
            logd[f"unseen/{p.name}/acc"] = te.accuracy
            logd[f"unseen/{p.name}/loss"] = te.loss
    metrics = RoundMetrics(rnd, val, test, unseen)
    if fabric.is_global_zero:
        logd.update({
            "mean/client_val_acc": metrics.mean_client_val_acc,
            "mean/client_test_acc": metrics.mean_client_test_acc,
            "comm/bytes_up_total": summary.bytes_up_total,
            "comm/bytes_down_total": summary.bytes_down_total,
        })
        if unseen:
            logd["mean/unseen_acc"] = metrics.mean_unseen_acc
        fabric.log_dict({k: v for k, v in logd.items() if not (isinstance(v, float) and math.isnan(v))}, step=rnd)
        if metrics_csv is not None:
            metrics_csv.write(csv_rows)
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
    for p in mine:
        if p.kind == "client":
            c = clients[p.index]
            splits = {"train": c.train, "val": c.val, "test": c.test}
        else:
            splits = {"unseen": task.unseen[p.name]}
        if cache is None:
            for split, samples in splits.items():
                datasets[(p.index, split)] = ImageDataset(samples, backbone.preprocess)
            continue
        everything = [s for samples in splits.values() for s in samples]
        feats = cache.get(everything, desc=f"encoding {p.name}")
        offset = 0
        for split, samples in splits.items():
            datasets[(p.index, split)] = feature_dataset(feats[offset : offset + len(samples)], samples)
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


def _move(module: ClientModule, device) -> None:
    """Move a client between the accelerator and the CPU (a no-op, skipped, on a CPU-only run)."""
    if torch.device(device) != module.device:
        module.to(device)


def _save_adapter(path: Path, state: dict[str, torch.Tensor], rnd: int) -> None:
    """The global adapter as a plain state dict (load with torch.load(..., weights_only=True))."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"round": rnd, "adapter": {k: v.detach().cpu() for k, v in state.items()}}, tmp)
    os.replace(tmp, path)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _print_header(cfg: Config, s: Summary, run_dir: Path, random_init: bool, fabric: Fabric) -> None:
    w = 0 if s.algorithm == "zeroshot" else cfg.federation.rounds
    print(f"fedclip-lightning: {s.algorithm} on {s.dataset} ({s.data_root})")
    print(f"  backbone {s.backbone['name']} ({'random init' if random_init else s.backbone['weights_file'] or s.backbone['name']}),"
          f" {s.trainable_params:,} trainable parameters, {s.bytes_per_client_per_round:,} bytes per client per round")
    listed = ", ".join(f"{c} ({s.num_samples[c]['train']} train)" for c in s.clients)
    print(f"  clients: {listed}")
    print(f"  unseen:  {', '.join(s.unseen) or '-'}")
    print(f"  {w} rounds on {fabric.world_size} process(es), {fabric.device.type}; run directory {run_dir}")
    f = s.features
    if f.get("cache"):
        print(f"  features: {f['encoded_images']} images encoded ({f['encode_seconds_max_rank']:.1f} s), "
              f"{f['cached_images']} read from the cache {f['dir'] or '(in memory)'}")
    if s.skipped_images:
        print(f"  skipped {len(s.skipped_images)} unreadable image(s) (data.on_corrupt=skip); listed in summary.json")
    if random_init:
        print("  NOTE: the backbone is RANDOMLY initialised (backbone.pretrained=null): accuracies here check the "
              "pipeline and say nothing about CLIP.")
    if cfg.note:
        print(f"  {cfg.note}")
