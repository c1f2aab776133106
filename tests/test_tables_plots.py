"""Sweep tables (tables.py) and figures (plots.py) on synthetic run
directories with known numbers, and plot_run on a real run of the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from fedclip_lightning import plots, tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENTS = ["art_painting", "cartoon", "photo", "sketch"]
BYTES_PER_CLIENT_ROUND = 1000

# (algorithm, held-out) -> accuracies in [0, 1]; fedavg-sketch is missing on purpose.
# selected/final: (mean_unseen_acc, mean_client_test_acc)
RUNS = {
    ("zeroshot", "art_painting"): {"selected": (0.5, 0.8), "final": (0.5, 0.8)},
    ("zeroshot", "sketch"): {"selected": (0.25, 0.75), "final": (0.25, 0.75)},
    ("fedavg", "art_painting"): {"selected": (0.6, 0.9), "final": (0.55, 0.95)},
    ("fedclip", "art_painting"): {"selected": (0.71234, 0.95), "final": (0.65, 0.9)},
    ("fedclip", "sketch"): {"selected": (0.4, 0.85), "final": (0.35, 0.8)},
}
ROUNDS = 4


def _block(round_: int, unseen_acc: float, client_acc: float, heldout: str) -> dict:
    clients = [c for c in CLIENTS if c != heldout]
    return {
        "round": round_,
        "client_test_acc": {c: client_acc for c in clients},
        "client_val_acc": {c: client_acc for c in clients},
        "unseen_acc": {heldout: unseen_acc},
        "mean_client_test_acc": client_acc,
        "mean_client_val_acc": client_acc,
        "mean_unseen_acc": unseen_acc,
    }


def curve(alg: str, heldout: str, r: int) -> tuple[float, float]:
    """The (unseen, client test) accuracy of a synthetic run at round r."""
    base = 0.2 if heldout == "art_painting" else 0.1
    if alg == "zeroshot":
        return RUNS[(alg, heldout)]["final"]
    gain = 0.1 if alg == "fedclip" else 0.05
    return base + gain * r, 0.5 + gain * r


def write_run(sweep: Path, alg: str, heldout: str, spec: dict) -> Path:
    run = sweep / f"{alg}-{heldout}"
    run.mkdir(parents=True)
    clients = [c for c in CLIENTS if c != heldout]
    comm = alg not in ("zeroshot", "local")  # these two send nothing
    rounds = [0] if alg == "zeroshot" else list(range(1, ROUNDS + 1))
    per_round = BYTES_PER_CLIENT_ROUND * len(clients) if comm else 0
    summary = {
        "status": "finished",
        "algorithm": alg,
        "dataset": "pacs_synthetic",
        "clients": clients,
        "unseen": [heldout],
        "rounds_run": rounds[-1],
        "selected_round": 0 if alg == "zeroshot" else 2,
        "selected": _block(0 if alg == "zeroshot" else 2, *spec["selected"], heldout),
        "final": _block(rounds[-1], *spec["final"], heldout),
        "trainable_params": 250 if comm else 0,
        "bytes_per_client_per_round": BYTES_PER_CLIENT_ROUND if comm else 0,
        "bytes_up_total": per_round * len(rounds) if comm else 0,
        "bytes_down_total": per_round * len(rounds) if comm else 0,
        "wall_time_s": 1.0,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "client", "split", "accuracy", "loss"])
        for r in rounds:
            unseen, client = curve(alg, heldout, r)
            for i, c in enumerate(clients):
                w.writerow([r, c, "train", "", ""])  # unknown values are empty strings
                w.writerow([r, c, "val", f"{client:.6f}", "1.0"])
                w.writerow([r, c, "test", f"{min(1.0, client + 0.05 * i):.6f}", "1.0"])
            w.writerow([r, heldout, "unseen", f"{unseen:.6f}", "1.5"])
    with open(run / "rounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "mean_client_val_acc", "mean_client_test_acc", "mean_unseen_acc", "bytes_up",
                    "bytes_down", "bytes_up_total", "bytes_down_total", "wall_time_s"])
        for k, r in enumerate(rounds, start=1):
            unseen, client = curve(alg, heldout, r)
            w.writerow([r, "", f"{client:.6f}", f"{unseen:.6f}", per_round, per_round,
                        per_round * k, per_round * k, 0.1 * k])
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    for (alg, heldout), spec in RUNS.items():
        write_run(sweep, alg, heldout, spec)
    return sweep


def check_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert 300 <= w <= 4000 and 200 <= h <= 3000, (path, im.size)


# --------------------------------------------------------------------------- tables


def test_collect_runs_reads_every_run_and_skips_broken_ones(sweep: Path):
    broken = sweep / "fedprox-sketch"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    nosummary = sweep / "fedprox-photo"
    nosummary.mkdir()
    with pytest.warns(UserWarning, match="fedprox-sketch"):
        records = tables.collect_runs(sweep)
    assert {(r["algorithm"], r["heldout"]) for r in records} == set(RUNS)
    assert all(r["summary"]["dataset"] == "pacs_synthetic" for r in records)


def test_collect_runs_falls_back_to_the_directory_name(tmp_path: Path):
    run = tmp_path / "fedclip_ft-art_painting"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "failed", "unseen": [], "selected": None}))
    [rec] = tables.collect_runs(tmp_path)
    assert (rec["algorithm"], rec["heldout"]) == ("fedclip_ft", "art_painting")


def test_paper_table_generalisation_selected(sweep: Path):
    header, rows = tables.paper_table(tables.collect_runs(sweep), block="selected", metric="unseen")
    assert header == ["held-out domain", "zeroshot", "fedavg", "fedclip"]
    assert rows == [
        ["art_painting", 50.0, 60.0, 71.23],
        ["sketch", 25.0, None, 40.0],
        ["average", 37.5, None, 55.62],  # fedavg misses sketch: no average
    ]


def test_paper_table_personalisation_and_final(sweep: Path):
    records = tables.collect_runs(sweep)
    _, rows = tables.paper_table(records, block="selected", metric="clients")
    assert rows == [["art_painting", 80.0, 90.0, 95.0], ["sketch", 75.0, None, 85.0], ["average", 77.5, None, 90.0]]
    _, rows = tables.paper_table(records, block="final", metric="unseen")
    assert rows == [["art_painting", 50.0, 55.0, 65.0], ["sketch", 25.0, None, 35.0], ["average", 37.5, None, 50.0]]
    # a block nobody has (personal) gives an all-missing table, not an error
    _, rows = tables.paper_table(records, block="personal", metric="clients")
    assert all(v is None for r in rows for v in r[1:])
    with pytest.raises(ValueError):
        tables.paper_table(records, metric="bogus")


def test_paper_table_order_nulls_and_duplicates():
    def rec(alg, held, acc):
        return {"algorithm": alg, "heldout": held, "summary": {"selected": {"mean_unseen_acc": acc}}}

    records = [rec("zzz", "b", 0.1), rec("fedclip", "b", 0.5), rec("aaa", "a", 0.2), rec("local", "a", None),
               rec("fedclip", "a", 0.3), rec("fedclip", "a", 0.4), rec("local", "b", 0.6)]
    header, rows = tables.paper_table(records)
    assert header == ["held-out domain", "local", "fedclip", "aaa", "zzz"]  # preferred order, then alphabetical
    assert [r[0] for r in rows] == ["b", "a", "average"]  # order of first appearance
    assert rows[1] == ["a", None, 35.0, 20.0, None]  # null -> None; two seeds averaged
    assert rows[2] == ["average", None, 42.5, None, None]


def test_markdown_and_csv(sweep: Path):
    header, rows = tables.paper_table(tables.collect_runs(sweep))
    md = tables.to_markdown(header, rows, "Generalisation")
    lines = md.splitlines()
    assert lines[0] == "### Generalisation"
    assert "| held-out domain | zeroshot | fedavg | fedclip |" in lines
    assert "| sketch | 25.00 | - | 40.00 |" in lines
    assert "| **average** | **37.50** | - | **55.62** |" in lines
    assert any("average is left out" in ln and "fedavg (no result for sketch)" in ln for ln in lines)

    parsed = list(csv.reader(io.StringIO(tables.to_csv(header, rows))))
    assert parsed[0] == header
    assert parsed[2] == ["sketch", "25.00", "", "40.00"]
    assert parsed[3] == ["average", "37.50", "", "55.62"]


def test_markdown_without_gaps_has_no_footnote():
    md = tables.to_markdown(["held-out domain", "fedclip"], [["a", 1.0], ["average", 1.0]], "t")
    assert "left out" not in md


def test_write_sweep_tables(sweep: Path):
    paths = tables.write_sweep_tables(sweep)
    assert sorted(p.name for p in paths) == ["pareto.csv", "pareto.md", "table_final.csv", "table_final.md",
                                             "table_selected.csv", "table_selected.md"]
    assert all(p.parent == sweep and p.is_file() for p in paths)

    md = (sweep / "table_selected.md").read_text()
    assert "Generalisation: accuracy (%) on the held-out domain" in md
    assert "Personalisation: mean test accuracy (%) of the participating clients" in md
    assert "| **average** | **37.50** | - | **55.62** |" in md  # unseen
    assert "| **average** | **77.50** | - | **90.00** |" in md  # clients
    assert "fedavg (no result for sketch)" in md
    # communication: fedclip (2 runs): 3 clients x 1000 B x 4 rounds up = 12000 B per run
    assert "| algorithm | runs | trainable params | bytes / client / round |" in md
    assert "| fedclip | 2 | 250 | 1000 | 12000 | 12000 |" in md
    assert "| zeroshot | 2 | 0 | 0 | 0 | 0 |" in md
    assert "| **average** | **37.50** | - | **50.00** |" in (sweep / "table_final.md").read_text()

    with open(sweep / "table_selected.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["metric", "held-out domain", "zeroshot", "fedavg", "fedclip"]
    cell = {(r["metric"], r["held-out domain"]): r for r in rows}
    assert len(rows) == 6
    assert float(cell[("unseen", "art_painting")]["fedclip"]) == 71.23
    assert cell[("unseen", "sketch")]["fedavg"] == ""
    assert float(cell[("clients", "average")]["zeroshot"]) == 77.5
    with open(sweep / "table_final.csv", newline="") as f:
        final = {(r["metric"], r["held-out domain"]): r for r in csv.DictReader(f)}
    assert float(final[("unseen", "average")]["fedclip"]) == 50.0


def test_personal_block_gets_its_own_section(sweep: Path):
    path = sweep / "fedclip-sketch" / "summary.json"
    s = json.loads(path.read_text())
    s["personal"] = _block(4, 0.3, 0.99, "sketch")
    path.write_text(json.dumps(s))
    tables.write_sweep_tables(sweep)
    md = (sweep / "table_selected.md").read_text()
    assert "Personalised models" in md
    assert "| sketch | 99.00 |" in md


# --------------------------------------------------------------------------- plots


def test_sweep_curves_are_means_over_tasks(sweep: Path):
    algorithms, curves = plots._sweep_curves(sweep)
    assert algorithms == ["zeroshot", "fedavg", "fedclip"]
    fc = curves["fedclip"]
    assert fc["tasks"] == 2 and fc["round"] == [1, 2, 3, 4]
    # unseen at round 4: mean of 0.2 + 0.4 and 0.1 + 0.4
    assert fc["mean_unseen_acc"][-1] == pytest.approx(55.0)
    assert fc["mean_client_test_acc"][0] == pytest.approx(60.0)
    assert fc["bytes"] == [6000, 12000, 18000, 24000]
    assert curves["zeroshot"]["round"] == [0] and curves["zeroshot"]["bytes"] == [0]


def test_plot_sweep_writes_pngs(sweep: Path):
    paths = plots.plot_sweep(sweep)
    assert [p.name for p in paths] == ["accuracy_vs_round.png", "accuracy_vs_bytes.png", "pareto.png"]
    for p in paths:
        assert p.parent == sweep
        check_png(p)


def test_plot_sweep_without_communication(tmp_path: Path):
    # only algorithms that send nothing (zero-shot, local): no log axis, still two figures
    sweep = tmp_path / "nocomm"
    write_run(sweep, "zeroshot", "sketch", RUNS[("zeroshot", "sketch")])
    write_run(sweep, "local", "sketch", RUNS[("fedclip", "sketch")])
    _, curves = plots._sweep_curves(sweep)
    assert curves["local"]["bytes"] == [0, 0, 0, 0]
    for p in plots.plot_sweep(sweep):
        check_png(p)
    # mixed with a communicating algorithm: local is a horizontal 'no communication' line
    write_run(sweep, "fedclip", "sketch", RUNS[("fedclip", "sketch")])
    for p in plots.plot_sweep(sweep):
        check_png(p)


def test_plot_run_on_synthetic_runs(sweep: Path):
    for name in ("fedclip-sketch", "zeroshot-art_painting"):  # many rounds; a single round 0
        path = plots.plot_run(sweep / name)
        assert path == sweep / name / "accuracy.png"
        check_png(path)


def test_plot_run_on_a_real_run(tmp_path: Path, pacs_mini: Path):
    from helpers import run_main

    proc = run_main(["experiment=pacs_mini_debug", f"data.root={pacs_mini}", "logger=none", "progress=false",
                     f"output_dir={tmp_path / 'runs'}", "run_name=demo"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "runs" / "demo"
    check_png(run / "accuracy.png")  # drawn by the run
    check_png(run / "confusion.png")
    path = plots.plot_run(run)
    assert path == run / "accuracy.png"
    check_png(path)
    proc = run_main(["experiment=pacs_mini_debug", f"data.root={pacs_mini}", "logger=none", "progress=false",
                     f"output_dir={tmp_path / 'runs'}", "run_name=none", "plots=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    none = tmp_path / "runs" / "none"
    assert not list(none.glob("*.png")) and (none / "per_class.csv").is_file() and (none / "metrics.csv").is_file()
    assert (none / "metrics.csv").read_text() == (run / "metrics.csv").read_text()


def test_end_of_run_table_gives_the_spread_of_many_clients():
    """Up to report.MAX_CLIENT_ROWS clients, a row each; beyond, min / median / max of each column and the mean
    (10,000 rows would bury the table)."""
    from fedclip_lightning.report import MAX_CLIENT_ROWS, RoundMetrics, Summary, format_table

    def table(n: int) -> str:
        names = [f"c{i:05d}" for i in range(n)]
        m = RoundMetrics(5, {c: i / n for i, c in enumerate(names)}, {c: 1 - i / n for i, c in enumerate(names)},
                         {"photo": 0.9})
        s = Summary(algorithm="fedclip", backbone={}, dataset="synthetic", data_root="", clients=names,
                    unseen=["photo"], classes=[], num_samples={}, trainable_params=0, communicated_params=0,
                    bytes_per_client_per_round=0, world_size=1, config={})
        s.selected = s.final = m
        return format_table(s)

    few = table(MAX_CLIENT_ROWS)
    assert "c00000" in few and "c00011" in few and "median" not in few
    many = table(1001).splitlines()
    assert not any(line.startswith("c0") for line in many) and len(many) < 12
    rows = {line.split("(")[0].strip(): line.split(")")[-1].split() for line in many if "clients)" in line}
    # val rises 0 .. 1000/1001 with the client, test falls: each column's own min / median / max
    assert rows["min"][:2] == ["0.00", "0.10"] and rows["max"][:2] == ["99.90", "100.00"]
    assert rows["median"][:2] == ["49.95", "50.05"]
    assert rows["mean"][:2] == ["49.95", "50.05"]


def test_the_logger_gets_the_spread_of_many_clients_not_a_series_each():
    from fedclip_lightning.federation.outputs import LOGGED_CLIENTS, spread_of_many
    from fedclip_lightning.report import RoundMetrics

    def logged(n: int) -> dict:
        names = [f"c{i}" for i in range(n)]
        m = RoundMetrics(3, {c: i / n for i, c in enumerate(names)}, {c: 1 - i / n for i, c in enumerate(names)}, {})
        logd = {f"client/{c}/{s}_acc": 0.5 for c in names for s in ("val", "test")}
        return spread_of_many({**logd, "unseen/photo/acc": 0.9}, m)

    few = logged(LOGGED_CLIENTS)
    assert len([k for k in few if k.startswith("client/")]) == 2 * LOGGED_CLIENTS
    many = logged(1000)
    assert not any(k.startswith("client/") for k in many) and many["unseen/photo/acc"] == 0.9
    assert many["clients/val_acc_min"] == 0.0 and many["clients/val_acc_max"] == 0.999
    assert many["clients/test_acc_median"] == pytest.approx(0.5)  # the lower middle of 0.001 .. 1.0
