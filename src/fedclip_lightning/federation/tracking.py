"""The run's W&B side (rank 0): one W&B run per training run, whatever happened to it.

- The W&B step is the round (``run.log(..., step=round)``), and every logged metric is declared
  with ``define_metric``: the round as its step, ``max`` summaries for accuracies and ``min`` for
  losses; ``vs_bytes/*`` repeat the mean accuracies with ``comm/bytes_total`` as their x axis. At the
  end, ``max/<key>`` and ``min/<key>`` over every round of the run (all its sessions) join the summary.
- A resumed run continues the same W&B id (kept in the checkpoint, or in summary.json when the run
  restarts from round 0 with the same config). What its earlier sessions logged is found out (online
  W&B knows it: the run summary's ``round``; offline each session is a directory of its own, read back
  here) and not logged again; what they lost (W&B buffers, and a SIGKILL loses the buffer) is logged
  again from ``wandb_history.jsonl``, the rows this run gave W&B, kept beside metrics.csv and cut
  back to the checkpoint's round like it. So after a preemption, a crash or a SIGKILL the run's
  sessions hold every round exactly once with a rising step, and ``wandb sync`` uploads them, oldest
  first, as one run.
- At the end: the selected and final models as a ``model`` artifact (aliases ``selected`` and
  ``final``; the algorithm, backbone, round and accuracies as metadata) and the selected round's
  numbers in the run summary (a column of the runs table).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..report import Summary

log = logging.getLogger(__name__)

# The mean accuracies that also get a panel against the bytes communicated.
VS_BYTES = ("mean/unseen_acc", "mean/client_test_acc")


def wandb_logger(fabric) -> Any | None:
    return next((lg for lg in fabric.loggers if type(lg).__name__ == "WandbLogger"), None)


def summary_kind(key: str) -> str | None:
    """How W&B summarises a metric over the rounds (None: its last value, W&B's default)."""
    if key.endswith("acc") or key.startswith("vs_bytes/"):
        return "max"
    if key.endswith("loss"):
        return "min"
    return None


JOURNAL = "wandb_history.jsonl"


class WandbTracking:
    """Logs a run's rounds to W&B once each, and its models at the end (a no-op without W&B)."""

    def __init__(self, fabric, run_dir: Path, start_round: int):
        lg = wandb_logger(fabric) if fabric.is_global_zero else None
        self.exp = lg.experiment if lg is not None else None
        self.run_dir = run_dir
        self.defined: set[str] = set()
        self.logged_upto = 0
        self.journal = None
        if self.exp is None:
            return
        self.exp.define_metric("round", summary="max")
        self.logged_upto = self._logged_before()
        earlier = _journal_rows(run_dir / JOURNAL, start_round)
        atomic_write_text(run_dir / JOURNAL, "".join(json.dumps(r) + "\n" for r in earlier))
        lost = [r for r in earlier if r["round"] > self.logged_upto]
        if self.logged_upto or lost:
            log.info("W&B run %s: rounds up to %d were logged by an earlier session (not logged again); "
                     "%d round(s) it lost logged again", self.exp.id, self.logged_upto, len(lost))
        for row in lost:
            self._log(row["round"], row["values"])
        self.journal = open(run_dir / JOURNAL, "a")

    def _logged_before(self) -> int:
        """The last round that earlier sessions of this W&B run logged (0 for a new run)."""
        if self.exp.offline:
            from ..wandb_files import logged_rounds

            session = Path(self.exp.dir).resolve().parent  # <dir>/wandb/offline-run-<time>-<id>/files
            return max(logged_rounds(session.parent, self.exp.id, but=session), default=0)
        last = self.exp.summary.get("round") if self.exp.resumed else None
        try:  # with define_metric(summary="max") the summary holds {"max": N}
            last = last["max"]
        except (TypeError, KeyError, IndexError):
            pass
        return int(last) if isinstance(last, (int, float)) and not math.isnan(last) else 0

    def log_round(self, server_round: int, values: dict[str, float]) -> None:
        if self.exp is None:
            return
        self.journal.write(json.dumps({"round": server_round, "values": values}) + "\n")
        self.journal.flush()
        if server_round > self.logged_upto:
            self._log(server_round, values)

    def _log(self, server_round: int, values: dict[str, float]) -> None:
        row = {"round": server_round, **values}
        for key in VS_BYTES:
            if key in values:
                row[f"vs_bytes/{key.split('/', 1)[1]}"] = values[key]
        for key in row:
            if key not in self.defined and key != "round":
                step = "comm/bytes_total" if key.startswith("vs_bytes/") else "round"
                kind = summary_kind(key)
                self.exp.define_metric(key, step_metric=step, **({"summary": kind} if kind else {}))
                self.defined.add(key)
        self.exp.log(row, step=server_round)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def finish(self, summary: Summary, saved: list[str], table: tuple[list[str], list[list]],
               per_class: Path | None = None, figure: Path | None = None) -> None:
        """The end-of-run table, the per-class accuracies and confusion figure of the selected round, the
        selected round in the run summary, the models as an artifact."""
        if self.exp is None:
            return
        import wandb

        self._whole_run_summaries()
        sel, fin = summary.selected, summary.final
        columns, rows = table
        logged = {"summary_table": wandb.Table(columns=columns, data=rows)}
        if per_class is not None and per_class.is_file():
            import csv

            with open(per_class, newline="") as f:
                lines = list(csv.reader(f))
            logged["per_class_table"] = wandb.Table(columns=lines[0][:8], data=[r[:8] for r in lines[1:]])
        if figure is not None and figure.is_file():
            logged["confusion"] = wandb.Image(str(figure))
        self.exp.log(logged, commit=True)
        self.exp.summary.update({
            "selected_round": sel.round, "selected/mean_unseen_acc": sel.mean_unseen_acc,
            "selected/mean_client_test_acc": sel.mean_client_test_acc,
            "selected/mean_client_val_acc": sel.mean_client_val_acc,
            "final/mean_unseen_acc": fin.mean_unseen_acc, "final/mean_client_test_acc": fin.mean_client_test_acc,
            "trainable_params": summary.trainable_params, "bytes_up_total": summary.bytes_up_total,
            "bytes_total": summary.bytes_up_total + summary.bytes_down_total})
        if summary.base_novel:
            self.exp.summary.update({f"base_novel/{model}/{where}_{k}": v
                                     for model in ("final", "zero_shot") if model in summary.base_novel
                                     for where, vals in summary.base_novel[model].items() for k, v in vals.items()})
        if sel.client_test_balanced:
            self.exp.summary.update({"selected/mean_client_test_balanced_acc": sel.mean_client_test_balanced,
                                     "selected/mean_unseen_balanced_acc": sel.mean_unseen_balanced})
        self._log_models(summary, saved)

    def _whole_run_summaries(self) -> None:
        """``max/<key>`` (accuracies) and ``min/<key>`` (losses) in the run summary, over every round of the
        training run. W&B's own ``define_metric`` summaries are per session (after a resume they covered the
        last session's rounds only), and an offline session's summary holds each key's last value; explicit
        keys are neither recomputed nor overwritten. The journal holds every round of the run once."""
        best: dict[str, float] = {}
        for row in _journal_rows(self.run_dir / JOURNAL, 1 << 62):
            values = dict(row["values"])
            values.update({f"vs_bytes/{k.split('/', 1)[1]}": values[k] for k in VS_BYTES if k in values})
            for key, v in values.items():
                kind = summary_kind(key)
                if kind is None or not isinstance(v, (int, float)) or math.isnan(v):
                    continue
                if key not in best or (v > best[key] if kind == "max" else v < best[key]):
                    best[key] = v
        self.exp.summary.update({f"{summary_kind(key)}/{key}": v for key, v in best.items()})

    def _log_models(self, summary: Summary, saved: list[str]) -> None:
        import wandb

        selected = [n for n in saved if n.endswith("_selected.pt")]
        final = [n for n in saved if n not in selected]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{summary.algorithm}-{self.exp.id}")
        for alias, names, metrics in (("selected", selected, summary.selected), ("final", final, summary.final)):
            if not names or metrics is None:
                continue
            art = wandb.Artifact(f"model-{stem}", type="model", metadata={
                "algorithm": summary.algorithm, "label": summary.config.get("label"),
                "backbone": summary.backbone["name"], "pretrained": summary.backbone["pretrained"],
                "dataset": summary.dataset, "clients": summary.clients, "unseen": summary.unseen,
                "round": metrics.round, "alias": alias, "trainable_params": summary.trainable_params,
                "mean_client_val_acc": metrics.mean_client_val_acc,
                "mean_client_test_acc": metrics.mean_client_test_acc, "mean_unseen_acc": _num(metrics.mean_unseen_acc),
                "client_test_acc": metrics.client_test_acc, "unseen_acc": metrics.unseen_acc})
            for name in names:  # adapter_selected.pt -> adapter.pt: the same weights are the same version
                art.add_file(str(self.run_dir / name), name=re.sub(r"_(selected|final)(?=\.pt$)", "", name))
            self.exp.log_artifact(art, aliases=[alias])


def _journal_rows(path: Path, upto: int) -> list[dict]:
    """The journal's rows of rounds up to ``upto`` (a torn last line, from a kill mid-write, is dropped)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["round"] <= upto:
            rows.append(row)
    return rows


def _num(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x
