"""Figures of a run and of a sweep, as PNG files (matplotlib, Agg backend).

    from fedclip_lightning.plots import plot_run, plot_sweep
    plot_run("outputs/fedclip-sketch")     # -> outputs/fedclip-sketch/accuracy.png
    plot_sweep("outputs")                  # -> accuracy_vs_round.png, accuracy_vs_bytes.png

Nothing is shown on screen; every figure is closed once written.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator  # noqa: E402

from .tables import _number, collect_runs, order_algorithms  # noqa: E402

DPI = 120
CLIENT_MARKERS = ["o", "^", "D", "v", "s", "P", "X", "<", ">", "h"]


# --------------------------------------------------------------------------- reading


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def _int_round(x: Any) -> int | None:
    v = _number(x)
    return int(v) if v is not None else None


# --------------------------------------------------------------------------- helpers


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _integer_x(ax, rounds: list[int]) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds and min(rounds) == max(rounds):
        r = rounds[0]
        ax.set_xticks([r])
        ax.set_xlim(r - 0.5, r + 0.5)


def _human_bytes(x: float, _pos=None) -> str:
    if x <= 0:
        return "0"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            v = x / scale
            return f"{v:.0f} {unit}" if v >= 10 or v.is_integer() else f"{v:.1f} {unit}"
    return f"{x:.0f} B"


def _colors(algorithms: list[str]) -> dict[str, Any]:
    """One distinct colour per line: tab10 up to 10 lines, tab20 up to 20 (a sweep's axes multiply)."""
    cmap, n = (plt.get_cmap("tab10"), 10) if len(algorithms) <= 10 else (plt.get_cmap("tab20"), 20)
    return {a: cmap(i % n) for i, a in enumerate(algorithms)}


# --------------------------------------------------------------------------- one run


MAX_CLIENT_LINES = 12  # beyond this, plot_run draws the clients' mean and range


def plot_run(run_dir: str | Path) -> Path:
    """Write ``accuracy.png`` into ``run_dir``: test accuracy (%) per round of
    each client (split=test of metrics.csv, solid) and of the held-out
    domain(s) (split=unseen, dashed, thicker), the selected round marked.
    Returns the path."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    rows = _read_csv(run_dir / "metrics.csv")
    if not rows and not (run_dir / "metrics.csv").is_file():
        raise FileNotFoundError(f"{run_dir / 'metrics.csv'} does not exist")

    series: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        split = row.get("split")
        if split not in ("test", "unseen"):
            continue
        r, acc = _int_round(row.get("round")), _number(row.get("accuracy"))
        if r is None or acc is None:
            continue
        series.setdefault((split, row.get("client", "?")), {})[r] = 100.0 * acc

    clients = [k for k in series if k[0] == "test"]
    unseen = [k for k in series if k[0] == "unseen"]
    all_rounds = sorted({r for s in series.values() for r in s})

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("tab10")
    if len(clients) > MAX_CLIENT_LINES:
        # Many clients: their mean and range, not a line each (which nobody could read).
        rounds = sorted({r for k in clients for r in series[k]})
        per_round = [[series[k][r] for k in clients if r in series[k]] for r in rounds]
        ax.fill_between(rounds, [min(v) for v in per_round], [max(v) for v in per_round], color=cmap(0),
                        alpha=0.2, label=f"{len(clients)} clients: range (test)")
        ax.plot(rounds, [sum(v) / len(v) for v in per_round], color=cmap(0), linewidth=1.8, marker="o",
                markersize=4, label=f"{len(clients)} clients: mean (test)")
        clients = []
    for i, key in enumerate(clients):
        # hollow markers of different shapes, shrinking: clients with equal accuracies stay visible
        pts = sorted(series[key].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=CLIENT_MARKERS[i % len(CLIENT_MARKERS)],
                markersize=max(4.0, 10.0 - 1.5 * i), fillstyle="none", markeredgewidth=1.5, linewidth=1.4,
                color=cmap(i % 10), label=f"{key[1]} (client test)")
    for j, key in enumerate(unseen):
        pts = sorted(series[key].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", markersize=6, linewidth=2.8,
                linestyle="--", color="black" if len(unseen) == 1 else cmap((len(clients) + j) % 10),
                label=f"{key[1]} (held out)")
    sel = _int_round(summary.get("selected_round"))
    if sel is not None and all_rounds and len(all_rounds) > 1:
        ax.axvline(sel, color="grey", linestyle=":", linewidth=1.2, label=f"selected round ({sel})")
    if not series:
        ax.text(0.5, 0.5, "no test accuracy recorded", ha="center", va="center", transform=ax.transAxes)

    algorithm = summary.get("algorithm", "?")
    dataset = summary.get("dataset", "?")
    held = ", ".join(summary.get("unseen") or [k[1] for k in unseen]) or "none"
    ax.set_title(f"{algorithm} on {dataset}: test accuracy per round (held out: {held})")
    ax.set_xlabel("communication round")
    ax.set_ylabel("test accuracy (%)")
    _integer_x(ax, all_rounds)
    lo = min((v for s in series.values() for v in s.values()), default=0.0)
    hi = max((v for s in series.values() for v in s.values()), default=100.0)
    pad = max(2.0, 0.08 * (hi - lo))
    ax.set_ylim(max(-2.0, lo - pad), min(102.0, hi + pad))
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9)
    return _save(fig, run_dir / "accuracy.png")


# --------------------------------------------------------------------------- a sweep

PANELS = [
    ("mean_unseen_acc", "held-out domain (generalisation)"),
    ("mean_client_test_acc", "participating clients (personalisation)"),
]


def _sweep_curves(sweep_dir: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Per algorithm: the mean over its held-out tasks, per round, of each
    panel's accuracy (%) and of the cumulative bytes (up + down)."""
    records = collect_runs(sweep_dir)
    per_alg: dict[str, list[dict[int, dict[str, float | None]]]] = {}
    for rec in records:
        rows = _read_csv(rec["run_dir"] / "rounds.csv")
        if not rows:
            warnings.warn(f"{rec['run_dir']}: no rounds.csv rows; left out of the sweep plots", stacklevel=3)
            continue
        task: dict[int, dict[str, float | None]] = {}
        for row in rows:
            r = _int_round(row.get("round"))
            if r is None:
                continue
            up, down = _number(row.get("bytes_up_total")), _number(row.get("bytes_down_total"))
            task[r] = {
                "mean_unseen_acc": _number(row.get("mean_unseen_acc")),
                "mean_client_test_acc": _number(row.get("mean_client_test_acc")),
                "bytes": None if up is None and down is None else (up or 0.0) + (down or 0.0),
            }
        if task:
            per_alg.setdefault(rec["algorithm"], []).append(task)

    curves: dict[str, dict[str, Any]] = {}
    for alg, tasks in per_alg.items():
        common = set(tasks[0])
        for t in tasks[1:]:
            common &= set(t)
        rounds = sorted(common) or sorted({r for t in tasks for r in t})  # rounds every task has, else any
        curve: dict[str, Any] = {"tasks": len(tasks), "round": rounds}
        for key in ("mean_unseen_acc", "mean_client_test_acc", "bytes"):
            vals = []
            for r in rounds:
                xs = [t[r][key] for t in tasks if r in t and t[r][key] is not None]
                v = sum(xs) / len(xs) if xs else None
                vals.append(None if v is None else (100.0 * v if key != "bytes" else v))
            curve[key] = vals
        curves[alg] = curve
    return order_algorithms(curves), curves


def _last(values: list[float | None]) -> float | None:
    for v in reversed(values):
        if v is not None:
            return v
    return None


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """Write ``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` into
    ``sweep_dir``: per algorithm, the mean over its held-out tasks of the
    held-out accuracy (left panel) and the mean client test accuracy (right)
    against the round and against the cumulative bytes communicated (up +
    down, log scale; algorithms that communicate nothing are drawn as a
    horizontal dotted line at their last-round accuracy). Returns the paths."""
    sweep_dir = Path(sweep_dir)
    algorithms, curves = _sweep_curves(sweep_dir)
    colors = _colors(algorithms)
    name = sweep_dir.name
    written: list[Path] = []

    # ---- accuracy vs round
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    all_rounds = sorted({r for c in curves.values() for r in c["round"]})
    for ax, (key, label) in zip(axes, PANELS):
        for alg in algorithms:
            c = curves[alg]
            pts = [(r, v) for r, v in zip(c["round"], c[key]) if v is not None]
            if not pts:
                continue
            lbl = f"{alg} (mean of {c['tasks']} task{'s' if c['tasks'] != 1 else ''})"
            if len(pts) == 1 and len(all_rounds) > 1:
                lbl += f", round {pts[0][0]} only (dotted: its level)"
                # one evaluation only (zero-shot): a marker plus a reference line across the rounds
                ax.axhline(pts[0][1], color=colors[alg], linestyle=":", linewidth=1.3)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=5, linewidth=1.8,
                    color=colors[alg], label=lbl)
        ax.set_title(label)
        ax.set_xlabel("communication round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        _integer_x(ax, all_rounds)
    if not curves:
        for ax in axes:
            ax.text(0.5, 0.5, "no rounds.csv found", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{name}: test accuracy per round, mean over held-out tasks")
    _legend_below(fig, axes)
    written.append(_save(fig, sweep_dir / "accuracy_vs_round.png"))

    # ---- accuracy vs bytes
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    positive = [b for c in curves.values() for b in c["bytes"] if b is not None and b > 0]
    any_bytes = bool(positive)
    span = max(positive) / min(positive) if positive else 1.0
    for ax, (key, label) in zip(axes, PANELS):
        for alg in algorithms:
            c = curves[alg]
            pts = [(b, v) for b, v in zip(c["bytes"], c[key]) if v is not None and b is not None and b > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=5, linewidth=1.8,
                        color=colors[alg], label=alg)
                continue
            comm = [b for b in c["bytes"] if b is not None]
            last = _last(c[key])
            if last is not None and (not comm or max(comm) <= 0):
                # sends nothing: no place on a log axis; its accuracy as a horizontal line
                ax.axhline(last, color=colors[alg], linestyle=":", linewidth=2.0,
                           label=f"{alg} (no communication)")
        ax.set_title(label)
        ax.set_xlabel("cumulative bytes communicated, up + down, all clients"
                      + (" (log scale)" if any_bytes else ""))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(y=0.12)
        if any_bytes:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(_human_bytes))
            if span < 100:  # under two decades: few major ticks, so label 2x and 5x too
                ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
                ax.xaxis.set_minor_formatter(FuncFormatter(_human_bytes))
            else:
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
        else:
            ax.set_xticks([])
            ax.text(0.5, 0.5, "no algorithm communicated", ha="center", va="center",
                    transform=ax.transAxes, alpha=0.7)
    fig.suptitle(f"{name}: test accuracy vs. communication, mean over held-out tasks")
    _legend_below(fig, axes)
    written.append(_save(fig, sweep_dir / "accuracy_vs_bytes.png"))
    written.append(plot_pareto(sweep_dir))
    shots = plot_shots(sweep_dir)
    return written + ([shots] if shots else [])


def plot_shots(sweep_dir: Path) -> Path | None:
    """``accuracy_vs_shots.png`` (a sweep over ``data.shots``): each method's mean test accuracy against the
    training images per class (log scale), clients (left) and unseen domains (right); ``all`` (every image)
    drawn as a dashed level. None when the sweep has fewer than two shot settings."""
    from .tables import shots_table

    got = shots_table(collect_runs(sweep_dir))
    if got is None:
        return None
    header, rows = got
    shots = [int(h.split("-")[0]) if h != "all" else None for h in header[2:]]
    colors = _colors(sorted({r[0] for r in rows}))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, split, title in zip(axes, ("clients", "unseen"), ("clients (personalisation)", "unseen domains")):
        for r in (r for r in rows if r[1] == split):
            pts = [(k, v) for k, v in zip(shots, r[2:]) if k is not None and v is not None]
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", color=colors[r[0]], label=r[0])
            every = [v for k, v in zip(shots, r[2:]) if k is None and v is not None]
            if every:
                ax.axhline(every[0], color=colors[r[0]], linestyle="--", alpha=0.6, label=f"{r[0]} (all images)")
        ax.set_xscale("log", base=2)
        ticks = [k for k in shots if k is not None]
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_title(title)
        ax.set_xlabel("training images per class per client (data.shots)")
        ax.set_ylabel("mean test accuracy (%), selected model")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{sweep_dir.name}: accuracy against shots")
    _legend_below(fig, axes)
    return _save(fig, sweep_dir / "accuracy_vs_shots.png")


def plot_pareto(sweep_dir: Path) -> Path:
    """``pareto.png``: one point per method, bytes one client sends per round (log) against the
    selected model's mean accuracy, unseen domains (left) and clients (right); the front (no method at
    least as accurate for at most the same bytes) joined by a line, its points outlined. Methods that
    send nothing sit at the left edge (said in the legend)."""
    from .tables import pareto_table

    _, rows = pareto_table(collect_runs(sweep_dir))
    rows = [r for r in rows if r[3] is not None]
    colors = _colors([r[0] for r in rows])
    positive = [r[3] for r in rows if r[3] > 0]
    floor = min(positive) / 4 if positive else 1.0  # where "0 bytes" is drawn on the log axis
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    for ax, col, title in zip(axes, (4, 5), ("unseen domains (generalisation)", "clients (personalisation)")):
        pts = [(r[3] if r[3] > 0 else floor, r[col], r) for r in rows if r[col] is not None]
        for x, y, r in pts:
            ax.scatter([x], [y], s=60, color=colors[r[0]], edgecolor="black" if r[6] else "none", zorder=3,
                       label=r[0] + (" (sends nothing: at the left edge)" if r[3] == 0 else ""))
        front = sorted((x, y) for x, y, r in pts if _on_front(x, y, pts))
        if len(front) > 1:
            ax.plot([f[0] for f in front], [f[1] for f in front], color="black", linewidth=1, alpha=0.5,
                    linestyle="--", label="front")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_human_bytes))
        ax.set_title(title)
        ax.set_xlabel("bytes one client sends per round (log scale)")
        ax.set_ylabel("mean test accuracy (%), selected model")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(y=0.15)
    fig.suptitle(f"{sweep_dir.name}: accuracy against communication, one point per method")
    _legend_below(fig, axes)
    return _save(fig, sweep_dir / "pareto.png")


def _on_front(x: float, y: float, pts) -> bool:
    return not any((px <= x and py >= y) and (px < x or py > y) for px, py, _ in pts)


def _legend_below(fig, axes) -> None:
    """One legend for the figure, under the panels (never over the data)."""
    handles, labels = [], []
    for ax in axes:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            if lbl not in labels:
                handles.append(h)
                labels.append(lbl)
    fig.tight_layout()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(labels), 3), frameon=False)


def plot_confusion(run_dir: str | Path) -> Path:
    """``confusion.png`` from per_class.csv: the selected round's confusion matrices, the participating clients'
    test images together (left) and the unseen domains' (right), each row (a true class) as the share of its
    images predicted as each class, the counts written in the cells where there are at most 20 classes."""
    import numpy as np

    run_dir = Path(run_dir)
    rows = [r for r in _read_csv(run_dir / "per_class.csv") if r["model"] == "selected"]
    if not rows:
        raise ValueError(f"{run_dir / 'per_class.csv'} has no rows of the selected round")
    classes = [k[3:] for k in rows[0] if k.startswith("as ")]
    index = {c: i for i, c in enumerate(classes)}
    panels = []
    for split, title in (("test", "participating clients (test)"), ("unseen", "unseen domains")):
        m = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for r in rows:
            if r["split"] == split:
                m[index[r["class"]]] += [int(r[f"as {c}"]) for c in classes]
        if m.any():
            panels.append((title, m))
    size = max(4.0, 0.45 * len(classes) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        support = m.sum(axis=1, keepdims=True)
        share = np.divide(m, support, out=np.zeros(m.shape, dtype=float), where=support > 0)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        if len(classes) <= 20:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    if m[i, j]:
                        ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.6 else "black")
            ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
            ax.set_yticks(range(len(classes)), classes)
        total = int(m.sum())
        ax.set_title(f"{title}: {100 * np.trace(m) / total:.1f}% of {total} images, "
                     f"balanced {100 * np.mean(np.diag(share)[support[:, 0] > 0]):.1f}% (pooled)", fontsize=9)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    fig.suptitle(f"{run_dir.name}: confusion at the selected round {rows[0]['round']}")
    fig.tight_layout()
    return _save(fig, run_dir / "confusion.png")
