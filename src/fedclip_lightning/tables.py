"""Tables of a sweep: one run directory per (algorithm, held-out domain).

A sweep directory holds run directories named ``<algorithm>-<heldout>``
(``fedclip-sketch``, ``fedavg-art_painting``...), each with the
``summary.json`` that :mod:`fedclip_lightning.report` writes. The tables take
the layout of the FedCLIP paper: one row per held-out domain plus an
``average`` row, one column per algorithm, accuracies in percent.

    from fedclip_lightning.tables import write_sweep_tables
    write_sweep_tables("outputs/pacs_sweep")   # table_selected.md/.csv, table_final.md/.csv
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

BLOCKS = ("selected", "final", "personal")
METRICS = {
    # metric name -> (key in a summary block, what it measures)
    "unseen": ("mean_unseen_acc", "generalisation: accuracy (%) on the held-out domain"),
    "clients": ("mean_client_test_acc", "personalisation: mean test accuracy (%) of the participating clients"),
    "unseen_balanced": ("mean_unseen_balanced_acc", "generalisation, balanced: the mean of the per-class accuracies "
                        "(%) on the held-out domain"),
    "clients_balanced": ("mean_client_test_balanced_acc", "personalisation, balanced: mean over the participating "
                         "clients of their mean per-class test accuracy (%)"),
}


def _metrics_of(records: list[dict[str, Any]], block: str) -> tuple[str, ...]:
    """The tables' metrics: micro accuracy, and balanced accuracy where a run has it (runs score per class)."""
    balanced = any(_block_value(r["summary"], block, "mean_client_test_balanced_acc") is not None for r in records)
    return ("unseen", "clients", "unseen_balanced", "clients_balanced") if balanced else ("unseen", "clients")
AVERAGE = "average"
MISSING = "-"
HELDOUT_HEADER = "held-out domain"


# --------------------------------------------------------------------------- reading


def planned_runs(sweep_dir: Path) -> set[str] | None:
    """The run folders of the sweep's current plan (``sweep.json``), or None for a folder without one."""
    try:
        return set(json.loads((Path(sweep_dir) / "sweep.json").read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def left_out_runs(sweep_dir: str | Path) -> list[str]:
    """Runs in ``sweep_dir`` that its current plan does not list: the tables leave them out."""
    planned = planned_runs(Path(sweep_dir))
    if planned is None:
        return []
    return sorted(p.parent.name for p in Path(sweep_dir).glob("*/summary.json") if p.parent.name not in planned)


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``*/summary.json`` under ``sweep_dir`` that the sweep's plan (``sweep.json``) lists, sorted by
    directory name (a folder without a plan: every one).

    Each record: ``algorithm`` (summary's, else the directory name before the
    first ``-``), ``heldout`` (the run's ``unseen[0]``, else the directory name
    after the algorithm), ``summary`` (the parsed JSON) and ``run_dir``.
    A summary that cannot be read or parsed is skipped with a warning.
    """
    sweep_dir = Path(sweep_dir)
    records: list[dict[str, Any]] = []
    planned = planned_runs(sweep_dir)
    for path in sorted(sweep_dir.glob("*/summary.json")):
        run_dir = path.parent
        if planned is not None and run_dir.name not in planned:
            continue  # a run of an earlier plan in the same folder: not part of this comparison (left_out_runs)
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary, dict):
                raise ValueError(f"expected a JSON object, got {type(summary).__name__}")
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"skipping {path}: cannot parse it ({e})", stacklevel=2)
            continue
        name = run_dir.name
        prefix, _, suffix = name.partition("-")
        algorithm = (summary.get("config") or {}).get("label") or summary.get("algorithm") or prefix
        # Repeats over seeds are one method: its cells hold their mean (and a table their spread).
        algorithm = " ".join(t for t in str(algorithm).split() if not t.startswith("seed=")) or prefix
        unseen = summary.get("unseen") or []
        if unseen:
            heldout = str(unseen[0])
        elif name.startswith(f"{algorithm}-"):
            heldout = name[len(algorithm) + 1:]
        else:
            heldout = suffix or name
        records.append({"algorithm": str(algorithm), "heldout": heldout, "summary": summary, "run_dir": run_dir,
                        "seed": (summary.get("config") or {}).get("seed")})
    return records


def order_algorithms(names: Iterable[str]) -> list[str]:
    """Distinct names in the registry's order (floors, baselines, FedCLIP), unknown ones after, alphabetically."""
    from .algorithms import registry

    order = registry.names()
    rank = {a: i for i, a in enumerate(order)}
    # A sweep's variants ("fedclip aggregator=median") sit with their algorithm, in name order.
    return sorted(set(names), key=lambda n: (rank.get(n.split(" ")[0], len(order)), n != n.split(" ")[0], n))


def _number(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, not a number)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _block_value(summary: dict[str, Any], block: str, key: str) -> float | None:
    b = summary.get(block)
    return _number(b.get(key)) if isinstance(b, dict) else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------- tables


def _std(values: list[float]) -> float:
    """The sample standard deviation (n - 1)."""
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def repeats(records: list[dict[str, Any]]) -> int:
    """The most runs any (held-out domain, method) cell has: above 1, the sweep ran repeats (seeds)."""
    counts: dict[tuple, int] = {}
    for r in records:
        counts[(r["heldout"], r["algorithm"])] = counts.get((r["heldout"], r["algorithm"]), 0) + 1
    return max(counts.values(), default=0)


def spread_table(records: list[dict[str, Any]], block: str = "selected",
                 metric: str = "unseen") -> tuple[list[str], list[list]]:
    """``paper_table``'s layout with the standard deviation (points of %) over each cell's runs (seeds) instead of
    their mean; None for a cell of one run. The average row: the standard deviation over the seeds of each seed's
    average over the held-out domains (seeds with a result for every domain)."""
    key = METRICS[metric][0]
    header, _ = paper_table(records, block, metric)
    domains, algorithms = [], header[1:]
    for r in records:
        if r["heldout"] not in domains:
            domains.append(r["heldout"])
    cells: dict[tuple[str, str], dict[Any, float]] = {}
    for r in records:
        v = _block_value(r["summary"], block, key)
        if v is not None:
            cells.setdefault((r["heldout"], r["algorithm"]), {})[r.get("seed")] = v
    rows: list[list] = []
    for d in domains:
        rows.append([d, *(round(100 * _std(list(cells[(d, a)].values())), 2)
                          if len(cells.get((d, a), {})) > 1 else None for a in algorithms)])
    avg: list = [AVERAGE]
    for a in algorithms:
        seeds = set.intersection(*(set(cells.get((d, a), {})) for d in domains)) if domains else set()
        per_seed = [_mean([cells[(d, a)][sd] for d in domains]) for sd in seeds]
        avg.append(round(100 * _std(per_seed), 2) if len(per_seed) > 1 else None)
    rows.append(avg)
    return header, rows


def paper_table(records: list[dict[str, Any]], block: str = "selected",
                metric: str = "unseen") -> tuple[list[str], list[list]]:
    """The paper's layout: ``(header, rows)``.

    ``header`` = ``["held-out domain", <algorithms>...]``; one row per held-out
    domain (order of first appearance in ``records``) then ``"average"``.
    A cell is the accuracy in % rounded to 2 decimals, from
    ``summary[block]["mean_unseen_acc"]`` (``metric="unseen"``) or
    ``["mean_client_test_acc"]`` (``metric="clients"``); None where missing.
    Several runs of one cell (seeds) are averaged. The average of an
    algorithm is None unless every held-out domain has a value for it.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    key = METRICS[metric][0]
    domains: list[str] = []
    for r in records:
        if r["heldout"] not in domains:
            domains.append(r["heldout"])
    algorithms = order_algorithms(r["algorithm"] for r in records)

    cells: dict[tuple[str, str], list[float]] = {}
    for r in records:
        v = _block_value(r["summary"], block, key)
        if v is not None:
            cells.setdefault((r["heldout"], r["algorithm"]), []).append(v)

    rows: list[list] = []
    for d in domains:
        row: list = [d]
        for a in algorithms:
            vals = cells.get((d, a))
            row.append(round(100.0 * _mean(vals), 2) if vals else None)
        rows.append(row)
    avg: list = [AVERAGE]
    for a in algorithms:
        vals = [_mean(cells[(d, a)]) for d in domains if (d, a) in cells]
        avg.append(round(100.0 * _mean(vals), 2) if vals and len(vals) == len(domains) else None)
    rows.append(avg)
    return [HELDOUT_HEADER, *algorithms], rows


def comm_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list]]:
    """Per algorithm: runs, trainable parameters, bytes per client per round and
    total bytes up/down (each the mean over the algorithm's runs; None where unknown)."""
    header = ["algorithm", "runs", "trainable params", "bytes / client / round",
              "bytes up total (mean)", "bytes down total (mean)"]
    keys = ["trainable_params", "bytes_per_client_per_round", "bytes_up_total", "bytes_down_total"]
    rows: list[list] = []
    for a in order_algorithms(r["algorithm"] for r in records):
        runs = [r["summary"] for r in records if r["algorithm"] == a]
        row: list = [a, len(runs)]
        for k in keys:
            vals = [v for v in (_number(s.get(k)) for s in runs) if v is not None]
            if not vals:
                row.append(None)
                continue
            m = _mean(vals)
            row.append(int(m) if m.is_integer() else round(m, 1))
        rows.append(row)
    return header, rows


def _missing_average_note(header: list[str], rows: list[list]) -> str | None:
    """Footnote for averages left out because a held-out domain is missing."""
    if not rows or rows[-1][0] != AVERAGE:
        return None
    gaps = []
    for j, name in enumerate(header[1:], start=1):
        if rows[-1][j] is None:
            missing = [r[0] for r in rows[:-1] if r[j] is None]
            if missing and len(missing) < len(rows) - 1:
                gaps.append(f"{name} (no result for {', '.join(map(str, missing))})")
            elif missing:
                gaps.append(f"{name} (no results)")
    if not gaps:
        return None
    return ('"-" = no result. The average is left out for algorithms missing at least one '
            "held-out domain: " + "; ".join(gaps) + ".")


def _fmt(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def to_markdown(header: list[str], rows: list[list], title: str | None = None,
                footnotes: Iterable[str] = ()) -> str:
    """A GitHub-flavoured Markdown table under ``### title``; None renders as
    ``-``, floats with 2 decimals, numbers right-aligned. A paper table whose
    average row has gaps gets a footnote saying why; ``footnotes`` are added
    as further ``*note*`` lines."""
    def is_num(j: int) -> bool:
        return any(isinstance(r[j], (int, float)) and not isinstance(r[j], bool) for r in rows)

    lines: list[str] = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(map(str, header)) + " |")
    lines.append("|" + "|".join("---:" if j and is_num(j) else ":---" for j in range(len(header))) + "|")
    for r in rows:
        text = [_fmt(v) for v in r]
        if r and r[0] == AVERAGE:
            text = [f"**{t}**" if t != MISSING else t for t in text]
        lines.append("| " + " | ".join(text) + " |")
    notes = [n for n in [_missing_average_note(header, rows), *footnotes] if n]
    if notes:
        lines.append("")
        lines += [f"*{n}*" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list]) -> str:
    """CSV text: None as an empty field, floats with 2 decimals."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.2f}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


# --------------------------------------------------------------------------- sweep


def _status_note(records: list[dict[str, Any]]) -> str | None:
    odd = [f"{r['run_dir'].name} ({r['summary'].get('status', 'no status')})"
           for r in records if r["summary"].get("status") != "finished"]
    return "Runs not finished (their numbers may be partial or missing): " + ", ".join(odd) + "." if odd else None


def sweep_markdown(records: list[dict[str, Any]], block: str, name: str = "sweep") -> str:
    """The Markdown report of one block: generalisation, personalisation,
    personalised models (when any run has them) and communication."""
    status = _status_note(records)
    parts = [f"# {name}: {block} model\n",
             f"Each cell: accuracy (%) of the {block} model "
             f"({'best mean client validation accuracy' if block == 'selected' else 'last round' if block == 'final' else 'personalised models'}); "
             "rows = the held-out domain of the run, columns = algorithms.\n"]
    if status:
        parts.append(f"*{status}*\n")
    n = repeats(records)
    for metric in _metrics_of(records, block):
        title = f"{METRICS[metric][1][0].upper()}{METRICS[metric][1][1:]}"
        h, rows = paper_table(records, block, metric)
        parts.append(to_markdown(h, rows, title + (f": mean over {n} seeds" if n > 1 else "")))
        if n > 1:
            h, rows = spread_table(records, block, metric)
            parts.append(to_markdown(h, rows, title + ": standard deviation over the seeds (points of %)",
                                     footnotes=["sample standard deviation (n - 1) over each cell's runs; the average "
                                                "row: over the seeds' own averages across the held-out domains."]))
    personal = [r for r in records if isinstance(r["summary"].get("personal"), dict)]
    if personal:
        h, rows = paper_table(personal, "personal", "clients")
        parts.append(to_markdown(h, rows, "Personalised models (summary['personal']): mean client test accuracy (%)"))
    h, rows = comm_table(records)
    parts.append(to_markdown(h, rows, "Communication (bytes; mean over the runs of each algorithm)",
                             footnotes=["bytes / client / round: bytes of the trainable tensors one client sends up "
                                        "(and receives down) per round; totals over all clients and rounds."]))
    return "\n".join(parts)


def sweep_csv(records: list[dict[str, Any]], block: str) -> str:
    """The paper tables of one block in one CSV: a leading ``metric`` column (``unseen``, ``clients``, and
    ``unseen_balanced``/``clients_balanced`` where the runs scored per class), then the paper table's columns."""
    metrics = _metrics_of(records, block)
    tables = [(m, paper_table(records, block, m)) for m in metrics]
    if repeats(records) > 1:  # repeats: the spread over the seeds too, as rows of metric unseen_std / clients_std
        tables += [(f"{m}_std", spread_table(records, block, m)) for m in metrics]
    header = ["metric", *tables[0][1][0]]
    rows = [[m, *r] for m, (_, rs) in tables for r in rs]
    return to_csv(header, rows)


PARETO_HEADER = ["method", "runs", "trainable params", "bytes / client / round", "unseen acc (%)",
                 "client test acc (%)", "on the front"]


def pareto_table(records: list[dict[str, Any]], block: str = "selected") -> tuple[list[str], list[list]]:
    """One point per method: bytes one client sends per round against the mean accuracies (%) of the
    ``block`` model over the method's runs. ``on the front``: no other method is at least as accurate on
    the unseen domains for at most the same bytes, and better on one of the two."""
    rows: list[list] = []
    for a in order_algorithms(r["algorithm"] for r in records):
        runs = [r["summary"] for r in records if r["algorithm"] == a]
        unseen = [v for v in (_block_value(s, block, "mean_unseen_acc") for s in runs) if v is not None]
        clients = [v for v in (_block_value(s, block, "mean_client_test_acc") for s in runs) if v is not None]
        nbytes = [v for v in (_number(s.get("bytes_per_client_per_round")) for s in runs) if v is not None]
        params = [v for v in (_number(s.get("trainable_params")) for s in runs) if v is not None]
        rows.append([a, len(runs), int(_mean(params)) if params else None, int(_mean(nbytes)) if nbytes else None,
                     100 * _mean(unseen) if unseen else None, 100 * _mean(clients) if clients else None, ""])
    for row in rows:
        b, acc = row[3], row[4]
        if b is None or acc is None:
            continue
        dominated = any(o is not row and o[3] is not None and o[4] is not None and o[3] <= b and o[4] >= acc
                        and (o[3] < b or o[4] > acc) for o in rows)
        row[6] = "" if dominated else "yes"
    return PARETO_HEADER, rows


SHOTS_HEADER_TAIL = ("clients", "unseen")


def _shots(summary: dict[str, Any]) -> int | None:
    shots = ((summary.get("config") or {}).get("data") or {}).get("shots")
    return shots if isinstance(shots, int) and not isinstance(shots, bool) else None


def shots_table(records: list[dict[str, Any]], block: str = "selected") -> tuple[list[str], list[list]] | None:
    """Accuracy against shots (CoOp's table): one row per method and split (the clients' mean test accuracy,
    the unseen domains' mean), one column per ``data.shots`` value (``all``: every training image), each cell
    the mean (%) over the method's runs with those shots (held-out domains, seeds). None when the sweep has
    fewer than two shot settings."""
    values = sorted({_shots(r["summary"]) for r in records}, key=lambda v: (v is None, v or 0))
    if len(values) < 2:
        return None

    def method(r) -> str:
        return " ".join(t for t in r["algorithm"].split() if not t.startswith("shots=")) or r["algorithm"]

    header = ["method", "split", *(f"{v}-shot" if v is not None else "all" for v in values)]
    rows: list[list] = []
    for m in order_algorithms(method(r) for r in records):
        for split, key in zip(SHOTS_HEADER_TAIL, ("mean_client_test_acc", "mean_unseen_acc")):
            cells = []
            for v in values:
                got = [x for x in (_block_value(r["summary"], block, key) for r in records
                                   if method(r) == m and _shots(r["summary"]) == v) if x is not None]
                cells.append(100 * _mean(got) if got else None)
            if any(c is not None for c in cells):
                rows.append([m, split, *cells])
    return header, rows


BASE_NOVEL_HEADER = ["method", "split", "base", "novel", "HM", "all"]


def base_novel_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list]] | None:
    """Base-to-novel (runs with ``data.classes.split=base_novel``): per method and split (clients' test, unseen
    domains), the final model's accuracy (%) on the base and the novel classes, their harmonic mean and all
    classes, each the mean over the method's runs; zero-shot CLIP first. None when no run scored it."""
    runs = [r for r in records if isinstance(r["summary"].get("base_novel"), dict)]
    if not runs:
        return None
    rows: list[list] = []
    groups = [("zero-shot", "zero_shot", runs)] + [(a, "final", [r for r in runs if r["algorithm"] == a])
                                                   for a in order_algorithms(r["algorithm"] for r in runs)]
    for label, model, group in groups:
        for split in ("clients", "unseen"):
            cells = []
            for key in ("base", "novel", "hm", "all"):
                got = [x for x in (_number(((r["summary"]["base_novel"].get(model) or {}).get(split) or {}).get(key))
                                   for r in group) if x is not None]
                cells.append(100 * _mean(got) if got else None)
            if any(c is not None for c in cells):
                rows.append([label, split, *cells])
    return BASE_NOVEL_HEADER, rows


def write_sweep_tables(sweep_dir: str | Path) -> list[Path]:
    """Write ``table_selected.md/.csv``, ``table_final.md/.csv`` and ``pareto.md/.csv`` (accuracy
    against bytes per round, one point per method) into ``sweep_dir``; return the written paths.
    Prints nothing."""
    sweep_dir = Path(sweep_dir)
    records = collect_runs(sweep_dir)
    written: list[Path] = []
    for block in ("selected", "final"):
        md = sweep_dir / f"table_{block}.md"
        md.write_text(sweep_markdown(records, block, name=sweep_dir.name))
        out = sweep_dir / f"table_{block}.csv"
        out.write_text(sweep_csv(records, block))
        written += [md, out]
    h, rows = pareto_table(records)
    (sweep_dir / "pareto.md").write_text(to_markdown(h, rows, f"{sweep_dir.name}: accuracy against communication "
                                                     "(selected model, mean over each method's runs)", footnotes=[
        "bytes / client / round: what one client sends up per round (the same comes down). on the front: no "
        "method is at least as accurate on the unseen domains for at most the same bytes."]))
    (sweep_dir / "pareto.csv").write_text(to_csv(h, rows))
    written += [sweep_dir / "pareto.md", sweep_dir / "pareto.csv"]
    b2n = base_novel_table(records)
    if b2n is not None:
        (sweep_dir / "base_novel.md").write_text(to_markdown(*b2n, f"{sweep_dir.name}: base-to-novel, test accuracy "
                                                             "(%) of the final model, mean over each method's runs",
                                                             footnotes=["HM: the harmonic mean of base and novel."]))
        (sweep_dir / "base_novel.csv").write_text(to_csv(*b2n))
        written += [sweep_dir / "base_novel.md", sweep_dir / "base_novel.csv"]
    shots = shots_table(records)
    if shots is not None:
        (sweep_dir / "shots.md").write_text(to_markdown(*shots, f"{sweep_dir.name}: test accuracy (%) against "
                                                        "training images per class (data.shots), selected model, "
                                                        "mean over each method's runs"))
        (sweep_dir / "shots.csv").write_text(to_csv(*shots))
        written += [sweep_dir / "shots.md", sweep_dir / "shots.csv"]
    return written
