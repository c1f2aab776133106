"""What a run shows and leaves behind, on rank 0: the console header and table, the progress bar,
metrics.csv / rounds.csv / summary.json every evaluated round, the loggers (W&B, CSV), the saved
models, and the end-of-run plot and W&B summary table. Other ranks get the same calls and do nothing
but keep the progress bar's count."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .. import numerics
from ..config import Config
from ..errors import named
from ..loggers import wandb_mode
from .tracking import WandbTracking, wandb_logger
from ..files import atomic_save, atomic_write_text
from ..report import MetricsCSV, RoundMetrics, RoundsCSV, Summary, format_table, keep_rows_up_to, quantile

log = logging.getLogger(__name__)

# summary.json is rewritten after an evaluated round at most this often (and always at the end).
SUMMARY_EVERY_S = 2.0


class RunOutputs:
    def __init__(self, cfg: Config, fabric, run_dir: Path, summary: Summary, started: float):
        self.cfg, self.fabric, self.run_dir, self.summary, self.started = cfg, fabric, run_dir, summary, started
        self.rank0 = fabric.is_global_zero
        self.metrics_csv = self.rounds_csv = None
        self.bar = None
        self.lines, self.rounds = False, 0
        self.wandb: WandbTracking | None = None
        self.last_bytes = (0, 0)  # totals at the previous evaluation
        self._summary_written = float("-inf")

    # -- start ----------------------------------------------------------------------
    def start(self, start_round: int, random_init: bool) -> None:
        """Trim the CSVs to the resumed round, print the header, write config.yaml and summary.json."""
        s = self.summary
        self.last_bytes = (s.bytes_up_total, s.bytes_down_total)
        if not self.rank0:
            return
        for name in ("metrics.csv", "rounds.csv"):
            keep_rows_up_to(self.run_dir / name, start_round)
        self.metrics_csv = MetricsCSV(self.run_dir / "metrics.csv")
        self.rounds_csv = RoundsCSV(self.run_dir / "rounds.csv")
        print_header(self.cfg, s, self.run_dir, random_init, self.fabric)
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(s.config))
        self.wandb = WandbTracking(self.fabric, self.run_dir, start_round)
        self.other_loggers = [lg for lg in self.fabric.loggers if lg is not wandb_logger(self.fabric)]  # CSV
        for lg in self.fabric.loggers:
            try:
                lg.log_hyperparams(s.config)
            except NotImplementedError:  # Fabric's CSVLogger; config.yaml above has it
                pass
        s.write(self.run_dir / "summary.json")

    def warn(self, message: str) -> None:
        if self.rank0:
            log.debug("warning: %s", message)  # said once, on the console below (a root handler would repeat it)
            print(f"  WARNING: {message}")

    def features_ready(self, f: dict) -> None:
        if self.rank0 and f.get("cache"):
            print(f"  features: {f['encoded_images']} images encoded ({f['encode_seconds_max_rank']:.1f} s), "
                  f"{f['cached_images']} read from the cache {f['dir'] or '(in memory)'}", flush=True)

    def rounds_start(self, rounds: int, start_round: int, resumed_from: Path | None) -> None:
        # A bar on a terminal; in a file (a SLURM job's output) a line per evaluated round instead of
        # carriage-return noise.
        tty = sys.stdout.isatty()
        self.lines = self.rank0 and self.cfg.progress and not tty
        self.rounds = rounds
        self.bar = tqdm(total=max(rounds, 1), desc="rounds", unit="round", dynamic_ncols=True,
                        disable=not (self.rank0 and self.cfg.progress and tty))
        if self.rank0 and start_round:
            print(f"  resumed from {resumed_from} (round {start_round} of {rounds})", flush=True)
            self.bar.update(start_round)

    # -- each evaluated round ------------------------------------------------------------
    def evaluated(self, metrics: RoundMetrics, csv_rows: list[tuple], logd: dict) -> None:
        unseen = {"unseen": f"{metrics.mean_unseen_acc:.3f}"} if metrics.unseen_acc else {}
        self.bar.set_postfix(val=f"{metrics.mean_client_val_acc:.3f}", test=f"{metrics.mean_client_test_acc:.3f}",
                             **unseen)
        if not self.rank0:
            return
        if self.lines:
            print(f"  round {metrics.round}/{self.rounds}: val {metrics.mean_client_val_acc:.3f}, test "
                  f"{metrics.mean_client_test_acc:.3f}" + "".join(f", {k} {v}" for k, v in unseen.items()) +
                  f" ({time.perf_counter() - self.started:.1f} s since the start)", flush=True)
        s = self.summary
        s.wall_time_s = time.perf_counter() - self.started
        self.rounds_csv.write(metrics, s.bytes_up_total - self.last_bytes[0], s.bytes_down_total - self.last_bytes[1],
                              s.bytes_up_total, s.bytes_down_total, s.wall_time_s)
        self.last_bytes = (s.bytes_up_total, s.bytes_down_total)
        self.metrics_csv.write(csv_rows)
        self._log(metrics, logd)
        now = time.perf_counter()
        if now - self._summary_written >= SUMMARY_EVERY_S:
            # For a person or a script watching the run; metrics.csv has every round already, the
            # checkpoint is what a resume reads, and the end of the run (or its failure) writes it again.
            s.write(self.run_dir / "summary.json", durable=False)
            self._summary_written = now

    def per_class(self, model: str, metrics: RoundMetrics) -> None:
        """per_class.csv: each class's images, correct predictions, accuracy and confusion row for every
        participant's split, of the selected round (``model="selected"``: rewritten when the selection
        changes) and of zero-shot CLIP (at the end, where the run evaluates it); the other model's rows kept."""
        if not (self.rank0 and metrics.confusions):
            return
        path = self.run_dir / PER_CLASS_FILE
        kept = []
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines[1:] if not line.startswith(f"{model},")]
        text = per_class_csv(self.summary.classes, model, metrics)
        head, _, body = text.partition("\n")
        atomic_write_text(path, head + "\n" + "".join(kept) + body)

    def _log(self, metrics: RoundMetrics, logd: dict) -> None:
        s = self.summary
        logd = {"round": metrics.round, **logd,
                "mean/client_val_acc": metrics.mean_client_val_acc,
                "mean/client_test_acc": metrics.mean_client_test_acc,
                "comm/bytes_up_total": s.bytes_up_total,
                "comm/bytes_down_total": s.bytes_down_total,
                "comm/bytes_total": s.bytes_up_total + s.bytes_down_total}
        if metrics.unseen_acc:
            logd["mean/unseen_acc"] = metrics.mean_unseen_acc
        if metrics.client_test_acc_global:
            logd["mean/client_test_acc_global"] = metrics.mean_client_test_acc_global
        if metrics.client_test_balanced:
            logd["mean/client_test_balanced_acc"] = metrics.mean_client_test_balanced
            logd["mean/client_val_balanced_acc"] = metrics.mean_client_val_balanced
        if metrics.unseen_balanced:
            logd["mean/unseen_balanced_acc"] = metrics.mean_unseen_balanced
        logd = {k: v for k, v in spread_of_many(logd, metrics).items() if not (isinstance(v, float) and math.isnan(v))}
        self.wandb.log_round(metrics.round, logd)
        for lg in self.other_loggers:
            lg.log_metrics(logd, step=metrics.round)

    def round_done(self) -> None:
        self.bar.update(1)

    def save_state(self, name: str, state: dict, server_round: int) -> None:
        """Trained tensors as a plain state dict: ``torch.load(path, weights_only=True)["state"]``."""
        if self.rank0:
            atomic_save({"round": server_round, "state": {k: v.detach().cpu() for k, v in state.items()}},
                        self.run_dir / name, durable=False)

    # -- end -----------------------------------------------------------------------------
    def _finish_plot_and_wandb(self, saved: list[str]) -> None:
        """The per-round accuracy plot; in W&B the final accuracies as a table and the models."""
        from ..plots import plot_confusion, plot_run

        if self.cfg.plots:
            try:
                plot_run(self.run_dir)
            except Exception as exc:  # noqa: BLE001 - a plot must never cost the run its results
                log.warning("could not draw %s: %s", self.run_dir / "accuracy.png", exc)
        confusion = None
        if self.cfg.plots and (self.run_dir / PER_CLASS_FILE).is_file():
            try:
                confusion = plot_confusion(self.run_dir)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not draw %s: %s", self.run_dir / "confusion.png", exc)
        s = self.summary
        fin, sel = s.final, s.selected
        if fin is None:
            return
        rows = [[c, "client", sel.client_val_acc.get(c), sel.client_test_acc.get(c), fin.client_val_acc.get(c),
                 fin.client_test_acc.get(c)] for c in s.clients]
        rows += [[u, "unseen", None, sel.unseen_acc.get(u), None, fin.unseen_acc.get(u)] for u in s.unseen]
        columns = ["domain", "role", "selected_val_acc", "selected_test_acc", "final_val_acc", "final_test_acc"]
        try:
            self.wandb.finish(s, saved, (columns, rows), per_class=self.run_dir / PER_CLASS_FILE, figure=confusion)
        except Exception as exc:  # noqa: BLE001 - the run's own files are written; W&B is a copy
            log.warning("could not log the end of the run to W&B: %s", exc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.rank0:
            return
        # Each step runs whatever the one before met (a full disk, say); the first error is the one raised.
        steps = [lambda: self.summary.write(self.run_dir / "summary.json")]
        steps += [self.wandb.close] if self.wandb is not None else []
        steps += [f.close for f in (self.metrics_csv, self.rounds_csv) if f is not None]
        first: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - raised below, after the other files are closed
                first = first or exc
        if first is not None:
            raise first

    def finish(self, saved: list[str]) -> None:
        """The plot, the W&B summary table, and the end-of-run table and file list on the console."""
        if not self.rank0:
            return
        self._finish_plot_and_wandb(saved)
        print("\n" + format_table(self.summary))
        more = "".join(f", {name}" for name in saved)
        cfg = self.cfg
        per_class = ", per_class.csv, confusion.png" if (self.run_dir / PER_CLASS_FILE).is_file() else ""
        print(f"\nrun directory: {self.run_dir}\n  summary.json, metrics.csv, rounds.csv, accuracy.png{per_class}, "
              f"config.yaml, data_manifest.json{more}"
              + (f", W&B run under {self.run_dir / 'wandb'}" if cfg.logger.name == "wandb" and
                 wandb_mode(cfg) != "disabled" else ""))
        if cfg.logger.name == "wandb" and wandb_mode(cfg) == "offline":
            why = ("WANDB_MODE=offline" if os.environ.get("WANDB_MODE") in ("offline", "dryrun") else
                   "logger.wandb.mode=offline" if cfg.logger.wandb.mode == "offline" else "no W&B API key")
            print(f"W&B ran offline ({why}): nothing was uploaded. To upload this run (all its sessions, as one run):\n"
                  f"  wandb sync {self.run_dir / 'wandb'}/offline-run-*-{self.summary.wandb_id}")


PER_CLASS_FILE = "per_class.csv"


def per_class_csv(classes: list[str], model: str, m: RoundMetrics) -> str:
    """per_class.csv's text: a row per (model, participant, split, class with images there): its images, correct
    predictions, accuracy, and how many were predicted as each class (``as <class>`` columns: the confusion
    row)."""
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["model", "round", "participant", "split", "class", "images", "correct", "accuracy",
                *(f"as {c}" for c in classes)])
    for (participant, split), conf in m.confusions.items():
        for k, c in enumerate(classes):
            counts = [int(v) for v in conf[k].tolist()]
            images = sum(counts)
            if images:  # a class the split has no image of has no accuracy
                w.writerow([model, m.round, participant, split, c, images, counts[k], f"{counts[k] / images:.6f}",
                            *counts])
    return out.getvalue()


# Past this many clients the logger (W&B, CSV) gets their spread each evaluated round, not six series per client
# (60,000 for 10,000 clients); metrics.csv in the run directory keeps every client's numbers.
LOGGED_CLIENTS = 100


def spread_of_many(logd: dict, metrics: RoundMetrics) -> dict:
    """``logd`` as the logger gets it: with more than ``LOGGED_CLIENTS`` clients, their ``client/...`` series
    replaced by ``clients/{val,test}_acc_{min,median,max}``."""
    if len(metrics.client_test_acc) <= LOGGED_CLIENTS:
        return logd
    out = {k: v for k, v in logd.items() if not k.startswith("client/")}
    for split, accs in (("val", metrics.client_val_acc), ("test", metrics.client_test_acc)):
        for label, q in (("min", 0.0), ("median", 0.5), ("max", 1.0)):
            v = quantile(accs.values(), q)
            if v is not None:
                out[f"clients/{split}_acc_{label}"] = v
    return out


def print_header(cfg: Config, s: Summary, run_dir: Path, random_init: bool, fabric) -> None:
    w = cfg.federation.rounds if s.trainable_params else 0  # nothing trains: evaluated once
    print(f"fedclip-lightning: {s.algorithm} on {s.dataset} ({s.data_root})")
    print(f"  backbone {s.backbone['name']} ({'random init' if random_init else s.backbone['weights_file'] or s.backbone['name']}),"
          f" {s.trainable_params:,} trainable parameters, {s.bytes_per_client_per_round:,} bytes per client per round")
    if len(s.clients) <= 12:
        listed = ", ".join(f"{c} ({s.num_samples[c]['train']} train)" for c in s.clients)
    else:
        train = sorted(s.num_samples[c]["train"] for c in s.clients)
        each = f"{train[0]}" if train[0] == train[-1] else f"{train[0]} to {train[-1]}"
        listed = f"{len(s.clients):,} ({named(s.clients, 3)}), {sum(train):,} training images, {each} a client"
    print(f"  clients: {listed}")
    if cfg.data.shots is not None:
        print(f"  few-shot: at most {cfg.data.shots} training image(s) of each class per client (data.shots); "
              "validation and test images untouched")
    print(f"  unseen:  {', '.join(s.unseen) or '-'}")
    shown = ", ".join(s.classes[:12]) + (f", ... ({len(s.classes) - 12} more: summary.json)" if len(s.classes) > 12 else "")
    print(f"  classes: {len(s.classes)} ({shown})")
    print(f"  {w} rounds on {fabric.world_size} process(es), {fabric.device.type}; run directory {run_dir}")
    if s.numerics:
        print(f"  {numerics.header_line(s.numerics)}")
    if s.slurm:  # summary.json's slurm block: the job as this process's environment says
        j = s.slurm
        job = j["job_id"] + (f" (array {j.get('array_job_id')}_{j['array_task_id']})" if "array_task_id" in j else "")
        print(f"  SLURM job {job} on {j.get('nodelist', '?')}: {j.get('ntasks', '?')} task(s), "
              f"{j.get('cpus_per_task', j.get('cpus_on_node', '?'))} CPUs per task, GPUs "
              f"{j.get('gpus_on_node', os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))}; fabric: "
              f"{cfg.fabric.num_nodes} node(s) x {cfg.fabric.devices} device(s), accelerator {fabric.device.type}")
    if s.skipped_images:
        print(f"  skipped {len(s.skipped_images)} unreadable image(s) (data.on_corrupt=skip); listed in summary.json")
    if random_init:
        print("  NOTE: the backbone is RANDOMLY initialised (backbone.pretrained=null): accuracies here check the "
              "pipeline and say nothing about CLIP.")
    if cfg.note:
        print(f"  {cfg.note}")
