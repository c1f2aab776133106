"""What a run leaves behind: metrics.csv (appended every round, so a crash
loses nothing already evaluated), summary.json (rewritten atomically after each
evaluation, ``status`` telling running/finished/failed) and a table for people.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_text

METRIC_COLUMNS = ["round", "client", "split", "accuracy", "loss", "balanced_accuracy"]


def _clean(x: Any) -> Any:
    """JSON-safe: NaN becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class RoundMetrics:
    """Accuracies of one evaluated round."""

    round: int
    client_val_acc: dict[str, float]
    client_test_acc: dict[str, float]
    unseen_acc: dict[str, float]
    # fedclip_ft: each client's accuracy with the global adapter, before personalisation.
    client_val_acc_global: dict[str, float] = field(default_factory=dict)
    client_test_acc_global: dict[str, float] = field(default_factory=dict)
    # Balanced accuracy (the mean of the per-class accuracies) of the same splits, where they were scored per class.
    client_val_balanced: dict[str, float] = field(default_factory=dict)
    client_test_balanced: dict[str, float] = field(default_factory=dict)
    unseen_balanced: dict[str, float] = field(default_factory=dict)
    # (participant, split) -> [C, C] counts of (true, predicted) class: this round's per-class results, for
    # per_class.csv and the confusion figure of the selected round (not in summary.json).
    confusions: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundMetrics":
        nan = float("nan")

        def acc(key: str) -> dict[str, float]:
            return {k: (nan if v is None else float(v)) for k, v in (d.get(key) or {}).items()}

        return cls(int(d["round"]), acc("client_val_acc"), acc("client_test_acc"), acc("unseen_acc"),
                   acc("client_val_acc_global"), acc("client_test_acc_global"), acc("client_val_balanced_acc"),
                   acc("client_test_balanced_acc"), acc("unseen_balanced_acc"))

    @property
    def mean_client_val_acc(self) -> float:
        return _mean(list(self.client_val_acc.values()))

    @property
    def mean_client_test_acc(self) -> float:
        return _mean(list(self.client_test_acc.values()))

    @property
    def mean_unseen_acc(self) -> float:
        return _mean(list(self.unseen_acc.values()))

    @property
    def mean_client_val_balanced(self) -> float:
        return _mean(list(self.client_val_balanced.values()))

    @property
    def mean_client_test_balanced(self) -> float:
        return _mean(list(self.client_test_balanced.values()))

    @property
    def mean_unseen_balanced(self) -> float:
        return _mean(list(self.unseen_balanced.values()))

    @property
    def mean_client_test_acc_global(self) -> float:
        return _mean(list(self.client_test_acc_global.values()))

    def as_dict(self) -> dict[str, Any]:
        out = {
            "round": self.round,
            "client_test_acc": dict(self.client_test_acc),
            "client_val_acc": dict(self.client_val_acc),
            "unseen_acc": dict(self.unseen_acc),
            "mean_client_test_acc": self.mean_client_test_acc,
            "mean_client_val_acc": self.mean_client_val_acc,
            "mean_unseen_acc": self.mean_unseen_acc,
        }
        if self.client_test_balanced or self.unseen_balanced:
            out.update({
                "client_val_balanced_acc": dict(self.client_val_balanced),
                "client_test_balanced_acc": dict(self.client_test_balanced),
                "unseen_balanced_acc": dict(self.unseen_balanced),
                "mean_client_test_balanced_acc": self.mean_client_test_balanced,
                "mean_unseen_balanced_acc": self.mean_unseen_balanced,
            })
        if self.client_test_acc_global:
            out.update({
                "client_val_acc_global": dict(self.client_val_acc_global),
                "client_test_acc_global": dict(self.client_test_acc_global),
                "mean_client_test_acc_global": self.mean_client_test_acc_global,
            })
        return out


@dataclass
class ModelSelection:
    """Keeps the round of best mean validation accuracy (earliest on ties)."""

    best: RoundMetrics | None = None

    def update(self, m: RoundMetrics) -> bool:
        score = m.mean_client_val_acc
        if self.best is None or (math.isfinite(score) and
                                 (not math.isfinite(self.best.mean_client_val_acc) or
                                  score > self.best.mean_client_val_acc)):
            self.best = m
            return True
        return False


class MetricsCSV:
    """metrics.csv: one row per round, client and split; flushed every round (fsynced on close)."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self._f = open(path, "a", newline="")
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(METRIC_COLUMNS)
            self._f.flush()

    def write(self, rows: list[tuple[int, str, str, float, float, float]]) -> None:
        with naming(self.path):
            for r, client, split, acc, loss, balanced in rows:
                self._w.writerow([r, client, split, _fmt(acc), _fmt(loss), _fmt(balanced)])
            self._f.flush()  # on disk as far as a crash of this process goes

    def close(self) -> None:
        try:
            with naming(self.path):
                self._f.flush()
                os.fsync(self._f.fileno())
        finally:  # closed even when the disk is full (a run called from Python must not leak the file)
            self._f.close()


@contextmanager
def naming(path: Path):
    """An OSError raised inside (a full disk, say) names ``path``: a buffered file's flush names none."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def keep_rows_up_to(path: Path, last_round: int) -> None:
    """Drop the rows of rounds after ``last_round`` (a resumed run redoes them); 0 keeps the header only."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_round]
    buf = io.StringIO()
    csv.writer(buf).writerows(kept)
    atomic_write_text(path, buf.getvalue())


ROUND_COLUMNS = ["round", "mean_client_val_acc", "mean_client_test_acc", "mean_unseen_acc", "bytes_up",
                 "bytes_down", "bytes_up_total", "bytes_down_total", "wall_time_s"]


class RoundsCSV:
    """rounds.csv: one row per evaluated round: mean accuracies, bytes sent, elapsed time."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self._f = open(path, "a", newline="")
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(ROUND_COLUMNS)
            self._f.flush()

    def write(self, m: "RoundMetrics", bytes_up: int, bytes_down: int, bytes_up_total: int, bytes_down_total: int,
              wall_time_s: float) -> None:
        with naming(self.path):
            self._w.writerow([m.round, _fmt(m.mean_client_val_acc), _fmt(m.mean_client_test_acc),
                              _fmt(m.mean_unseen_acc), bytes_up, bytes_down, bytes_up_total, bytes_down_total,
                              f"{wall_time_s:.3f}"])
            self._f.flush()

    def close(self) -> None:
        try:
            with naming(self.path):
                self._f.flush()
                os.fsync(self._f.fileno())
        finally:  # closed even when the disk is full (a run called from Python must not leak the file)
            self._f.close()


def _fmt(x: float) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.6f}"


@dataclass
class Summary:
    algorithm: str
    backbone: dict[str, Any]
    dataset: str
    data_root: str
    clients: list[str]
    unseen: list[str]
    classes: list[str]
    num_samples: dict[str, dict[str, int]]
    trainable_params: int
    communicated_params: int
    bytes_per_client_per_round: int
    world_size: int
    config: dict[str, Any]
    skipped_images: list[str] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    rounds_run: int = 0
    selected: RoundMetrics | None = None
    final: RoundMetrics | None = None
    # Zero-shot CLIP on the same splits (federation.zero_shot_baseline), for comparison.
    zero_shot: RoundMetrics | None = None
    # data.classes.split=base_novel: the final model (and zero-shot) on the base, novel and all classes.
    base_novel: dict | None = None
    bytes_up_total: int = 0
    bytes_down_total: int = 0
    wall_time_s: float = 0.0
    resumed_from: int | None = None  # the checkpoint round this run continued from
    setup_seconds: float = 0.0  # from the start until the first round (data, model, feature encoding)
    round_seconds: list[float] = field(default_factory=list)  # each round: local fits, aggregation, evaluation
    # Seconds spent in each phase of the rounds (fit, aggregate, evaluate, checkpoint, logging), this process.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # Server-side figures of the last evaluated round (privacy spent, clients dropped...).
    server: dict[str, float] = field(default_factory=dict)
    wandb_id: str | None = None  # the W&B run of this training run (kept across resumes)
    slurm: dict[str, str] = field(default_factory=dict)  # the SLURM job as rank 0 saw it (empty outside SLURM)
    numerics: dict[str, Any] = field(default_factory=dict)  # a CPU run's kernels and threads (numerics.describe)
    # How each process trained its clients: "side by side" (batched products) or "one at a time" (and why).
    client_training: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return _clean({
            "status": self.status,
            "algorithm": self.algorithm,
            "backbone": self.backbone,
            "dataset": self.dataset,
            "data_root": self.data_root,
            "clients": self.clients,
            "unseen": self.unseen,
            "classes": self.classes,
            "num_samples": self.num_samples,
            "rounds_run": self.rounds_run,
            "selected_round": self.selected.round if self.selected else None,
            "selected": self.selected.as_dict() if self.selected else None,
            "final": self.final.as_dict() if self.final else None,
            "zero_shot": self.zero_shot.as_dict() if self.zero_shot else None,
            "base_novel": self.base_novel,
            "trainable_params": self.trainable_params,
            "communicated_params": self.communicated_params,
            "bytes_per_client_per_round": self.bytes_per_client_per_round,
            "bytes_up_total": self.bytes_up_total,
            "bytes_down_total": self.bytes_down_total,
            "wall_time_s": round(self.wall_time_s, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "resumed_from": self.resumed_from,
            "round_seconds_mean": round(sum(self.round_seconds) / len(self.round_seconds), 6)
            if self.round_seconds else None,
            "round_seconds_total": round(sum(self.round_seconds), 3),
            "phase_seconds": self.phase_seconds,
            "server": self.server,
            "world_size": self.world_size,
            "wandb_id": self.wandb_id,
            "slurm": self.slurm,
            "numerics": self.numerics,
            "client_training": self.client_training,
            "skipped_images": self.skipped_images,
            "features": self.features,
            "error": self.error,
            "config": self.config,
        })

    def write(self, path: Path, durable: bool = True) -> None:
        text = json.dumps(self.as_dict(), indent=2) + "\n"
        try:
            atomic_write_text(path, text, durable)
        except OSError as exc:
            import errno

            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
                raise
            # No room for a second copy: overwrite in place (truncating frees the old blocks), so the file
            # still says how the run ended; then report the full disk all the same.
            with open(path, "w") as f:
                f.write(text)
            raise


def _pct(x: float | None) -> str:
    return "   -  " if x is None or not math.isfinite(x) else f"{100 * x:6.2f}"


# Above this many clients the end-of-run table gives their spread (min, median, max), not a row each.
MAX_CLIENT_ROWS = 12


def quantile(values, q: float) -> float | None:
    """The ``q`` quantile of the finite values (the lower middle one for the median of an even count)."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    return xs[int(q * (len(xs) - 1))] if xs else None


def format_table(s: Summary) -> str:
    """The end-of-run table: per-client and unseen-domain accuracy (%), selected and final round, and
    zero-shot CLIP on the same splits where the run evaluated it (the left column group)."""
    sel, fin, zs = s.selected, s.final, s.zero_shot
    if fin is None:
        return "no round was evaluated"
    shown = s.clients if len(s.clients) <= MAX_CLIENT_ROWS else [f"median ({len(s.clients)} clients)"]
    groups = ([("zero-shot", zs)] if zs is not None else []) + \
        [(f"selected round {sel.round}" if sel else "", sel), (f"final round {fin.round}", fin)]
    per_class = any(m is not None and m.client_test_balanced for _, m in groups)
    name_w = max([len(n) for n in shown + s.unseen] + [len("balanced (clients)" if per_class else "mean (unseen)")]) + 2
    gap = " " * 8

    def row(name: str, cells) -> str:
        return f"{name:{name_w}}  " + gap.join(f"{v:>8} {t:>8}" for v, t in cells)

    head = f"{'':{name_w}}  " + gap.join(f"{title:>17}" for title, _ in groups)
    sub = row("domain", [("val", "test")] * len(groups))
    lines = [head, sub, "-" * len(sub)]
    if len(s.clients) <= MAX_CLIENT_ROWS:
        for c in s.clients:
            lines.append(row(c, [(_pct(m.client_val_acc.get(c) if m else None),
                                  _pct(m.client_test_acc.get(c) if m else None)) for _, m in groups]))
    else:  # thousands of clients: their spread, each column on its own (metrics.csv has every client)
        for label, q in (("min", 0.0), ("median", 0.5), ("max", 1.0)):
            lines.append(row(f"{label} ({len(s.clients)} clients)",
                             [(_pct(quantile(m.client_val_acc.values(), q) if m else None),
                               _pct(quantile(m.client_test_acc.values(), q) if m else None)) for _, m in groups]))
    lines.append(row("mean (clients)", [(_pct(m.mean_client_val_acc if m else None),
                                         _pct(m.mean_client_test_acc if m else None)) for _, m in groups]))
    if per_class:  # the mean of the per-class accuracies, each client's, then their mean
        lines.append(row("balanced (clients)", [(_pct(m.mean_client_val_balanced if m else None),
                                                 _pct(m.mean_client_test_balanced if m else None))
                                                for _, m in groups]))
    if s.unseen:
        lines.append("-" * len(sub))
        for u in s.unseen:
            lines.append(row(f"{u} (unseen)", [("", _pct(m.unseen_acc.get(u) if m else None)) for _, m in groups]))
        if len(s.unseen) > 1:
            lines.append(row("mean (unseen)", [("", _pct(m.mean_unseen_acc if m else None)) for _, m in groups]))
        if per_class:
            lines.append(row("balanced (unseen)", [("", _pct(m.mean_unseen_balanced if m else None))
                                                   for _, m in groups]))
    if s.base_novel:
        lines += ["", base_novel_table(s.base_novel)]
    return "\n".join(lines)


def base_novel_table(b: dict) -> str:
    """The base-to-novel block under the end-of-run table: test accuracy (%) of the final model (and zero-shot
    CLIP) on the base classes, the novel ones (each with its own prompts), their harmonic mean, and all."""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")

    title = (f"base-to-novel, final round {b['round']}: {len(b['base_classes'])} base classes "
             f"({listed(b['base_classes'])}), {len(b['novel_classes'])} novel ({listed(b['novel_classes'])})")
    head = f"{'':26}{'base':>8} {'novel':>8} {'HM':>8} {'all':>8}"
    lines = [title, head, "-" * len(head)]
    for model, label in (("zero_shot", "zero-shot"), ("final", "final")):
        if model not in b:
            continue
        for where in ("clients", "unseen"):
            v = b[model][where]
            if not any(x is not None and math.isfinite(x) for x in v.values()):
                continue
            name = f"{label} ({'clients, test' if where == 'clients' else 'unseen'})"
            lines.append(f"{name:26}" + " ".join(_pct(v[k]).rjust(8) for k in ("base", "novel", "hm", "all")))
    return "\n".join(lines)
