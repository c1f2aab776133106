"""One command, every held-out domain x algorithm: tables, plots, one W&B group.

The sweep runs in this interpreter, and so do its runs (``runs_in_process``), but for one test whose runs go
through real child processes, as a user's sweep runs them."""

from __future__ import annotations

import csv

from conftest import REPO
from fedclip_lightning import sweep as sweep_cli
from fedclip_lightning.slurm import minutes
from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run
from helpers import PACS_MINI_ARGS, read_summary, run_main, runs_in_process


def _sweep(args, tmp_path):
    """``fedclip-lightning-sweep <args>`` in this interpreter (its output captured)."""
    return run_main(args, tmp_path, main=sweep_cli.main)


def test_sweep_writes_tables_plots_and_a_wandb_group(tmp_path, monkeypatch):
    runs_in_process(monkeypatch)
    cmd = ["--algorithms", "fedclip,fedavg", "--heldout", "sketch,photo", "--name", "s", *PACS_MINI_ARGS,
           "logger=wandb", "plots=true", "federation.rounds=1"]
    proc = _sweep(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "s"
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["fedavg-photo", "fedavg-sketch", "fedclip-photo", "fedclip-sketch", "wandb"]  # + the sweep's
    # the paper-style table: rows = held-out domain + average, columns = algorithms
    with open(sweep / "table_selected.csv") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert "fedclip" in header and "fedavg" in header
    unseen_rows = {r[1]: r for r in rows[1:] if r[0] == "unseen"}
    assert set(unseen_rows) == {"sketch", "photo", "average"}
    col = header.index("fedclip")
    s = read_summary(sweep / "fedclip-sketch")
    assert float(unseen_rows["sketch"][col]) == round(100 * s["selected"]["mean_unseen_acc"], 2)
    assert "| **average** |" in (sweep / "table_final.md").read_text()
    assert "held-out domain" in proc.stdout  # the table is printed too
    for png in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "fedclip-sketch/accuracy.png"):
        data = (sweep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # one W&B group for the sweep, the algorithm as job type, names that say algorithm and held-out domain
    seen, arts = {}, {}
    for run_dir in find_offline_runs(sweep):
        w = read_offline_run(run_dir)
        assert w["group"] == "s" and w["exit_code"] == 0
        seen[w["name"]] = w["job_type"]
        arts[w["name"]] = {a["type"]: a for a in w["artifacts"]}
        if w["job_type"] != "sweep":
            assert any("mean/unseen_acc" in row for row in w["history"])  # the same keys for every algorithm
            models = {alias: a for a in w["artifacts"] if a["type"] == "model" for alias in a["aliases"]}
            assert models["selected"]["metadata"]["round"] == models["final"]["metadata"]["round"] == 1
            assert models["final"]["metadata"]["algorithm"] == w["job_type"]
    assert seen == {"fedclip-sketch": "fedclip", "fedclip-photo": "fedclip", "fedavg-sketch": "fedavg",
                    "fedavg-photo": "fedavg", "s-tables": "sweep"}
    # the sweep's tables and plots: an artifact of a run in the sweep's group
    results = arts["s-tables"]["sweep-results"]
    assert {"table_selected.csv", "table_final.md", "accuracy_vs_bytes.png"} <= set(results["files"])
    # a rerun skips what finished
    again = _sweep(cmd, tmp_path)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4
    # the table job reads the logger from sweep.json (no composition, no torch); an older sweep.json without it
    # has the config composed again
    import json

    from fedclip_lightning.sweep_results import PLAN, report

    plan = json.loads((sweep / PLAN).read_text())
    assert plan["logger"]["name"] == "wandb" and plan["logger"]["wandb"]["project"] == "fedclip-lightning"
    del plan["logger"]
    (sweep / PLAN).write_text(json.dumps(plan))
    assert "W&B: run s-tables in group s (offline)" in report(sweep)


def test_sweep_rejects_unknown_algorithm_and_domain(tmp_path):
    from fedclip_lightning.sweep import main

    assert main(["--algorithms", "fedfoo", *PACS_MINI_ARGS]) == 2
    assert main(["--heldout", "mars", *PACS_MINI_ARGS]) == 2
    assert main(["--algorithms", "fedclip", "--dry-run", *PACS_MINI_ARGS]) == 0


def test_sweep_axes_become_columns_and_lines(tmp_path, monkeypatch):
    """--set axes multiply; each combination is a labelled column of the table and a line of the plots."""
    runs_in_process(monkeypatch)
    cmd = ["--algorithms", "fedclip", "--heldout", "sketch", "--name", "axes", "--set",
           "federation.aggregator.name=mean,median", "--set", "federation.attack.name=none,scaled", *PACS_MINI_ARGS,
           "logger=none", "federation.rounds=1", "federation.attack.fraction=0.34"]
    proc = _sweep(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "axes"
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["fedclip_aggregator_mean_attack_none-sketch", "fedclip_aggregator_mean_attack_scaled-sketch",
                    "fedclip_aggregator_median_attack_none-sketch", "fedclip_aggregator_median_attack_scaled-sketch"]
    s = read_summary(sweep / "fedclip_aggregator_median_attack_scaled-sketch")
    assert s["config"]["federation"]["aggregator"]["name"] == "median"
    assert s["config"]["federation"]["attack"]["name"] == "scaled"
    with open(sweep / "table_final.csv") as f:
        header = next(csv.reader(f))
    assert [h for h in header if h.startswith("fedclip")] == [
        "fedclip aggregator=mean attack=none", "fedclip aggregator=mean attack=scaled",
        "fedclip aggregator=median attack=none", "fedclip aggregator=median attack=scaled"]
    assert (sweep / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_refuses_an_axis_that_clashes_before_running(tmp_path, capsys):
    from fedclip_lightning.sweep import main

    code = main(["--algorithms", "fedclip,local", "--heldout", "sketch", "--set", "federation.aggregator.name=mean,median",
                 *PACS_MINI_ARGS, f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 of the sweep's 4 runs have an invalid config" in err and "local_aggregator_median" in err
    assert not (tmp_path / "sweep").exists() and not any(tmp_path.iterdir())


def test_sweep_rerun_with_other_settings_runs_again_and_odd_names_work(tmp_path, monkeypatch):
    """Its first run is a real child process, as a user's local sweep runs them (the odd name goes through its
    command line); the rerun's run is in this interpreter."""
    name = "odd (name), v=1"
    base = ["--algorithms", "fedclip", "--heldout", "sketch", "--name", name, *PACS_MINI_ARGS, "logger=none",
            "federation.rounds=1"]
    first = _sweep(base, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "outputs" / name / "fedclip-sketch"
    assert read_summary(run_dir)["config"]["logger"]["wandb"]["group"] == name
    same = _sweep(base, tmp_path)
    assert "finished earlier, skipped" in same.stdout
    runs_in_process(monkeypatch)
    other = _sweep([*base, "algorithm.lr=1e-3"], tmp_path)
    assert other.returncode == 0 and "finished earlier with other settings (algorithm.lr" in other.stdout
    assert read_summary(run_dir)["config"]["algorithm"]["lr"] == 1e-3  # the table is over the new settings


def test_sweep_dry_run_prints_the_job_scripts_with_launch_sh_resources(tmp_path):
    cmd = ["--slurm", "--dry-run", "--algorithms", "fedclip,zeroshot", "--heldout", "sketch", "--name", "d",
           "--partition", "gpu", "--max-parallel", "1", *PACS_MINI_ARGS]
    proc = _sweep(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = [line for line in (REPO / "launch.sh").read_text().splitlines() if line.startswith("#SBATCH")]
    array = proc.stdout.split("# the table job")[0]
    for line in header:  # launch.sh's resources (the time in minutes), but --output (submitit's log files)
        if line.startswith("#SBATCH --time="):
            line = f"#SBATCH --time={minutes(line.split('=', 1)[1])}"
        if "--output" not in line:
            assert line in array, line
    assert "#SBATCH --partition=gpu" in array and "#SBATCH --array=0-1%1" in array
    assert "#SBATCH --dependency=afterany:ARRAY_JOB_ID" in proc.stdout
    assert not (tmp_path / "outputs" / "d").exists()  # nothing submitted, nothing written


def test_slurm_options_are_checked_before_anything_is_submitted(tmp_path, capsys):
    from fedclip_lightning.sweep import main

    base = ["--algorithms", "fedclip", "--heldout", "sketch", "--name", "x", *PACS_MINI_ARGS]
    assert main(["--slurm", "--dry-run", "--time", "soon", *base]) == 2
    assert "--time='soon'" in capsys.readouterr().err
    assert main(["--slurm", "--dry-run", "--cpus-per-task", "two", *base]) == 2
    assert main(["--slurm", "--dry-run", "--max-parallel", "0", *base]) == 2
    assert main(["--partition", "gpu", *base]) == 2  # a SLURM option without --slurm
    assert "without --slurm" in capsys.readouterr().err
    assert [minutes(v) for v in ("24:00:00", "15:00", "90", "1-12:00:00", "2-0", "0:30")] == [1440, 15, 90, 2160,
                                                                                                2880, 1]


def test_sweep_of_parameter_efficient_methods_writes_the_pareto_table_and_plot(tmp_path, monkeypatch):
    """An algorithm.<key> axis sizes only the methods that have the key; one point per method."""
    runs_in_process(monkeypatch)
    cmd = ["--algorithms", "fedclip,promptfl,linear_probe,zeroshot", "--heldout", "sketch", "--name", "p", "--set",
           "algorithm.adapter_hidden=8,4", *PACS_MINI_ARGS, "logger=none", "federation.rounds=1"]
    proc = _sweep(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "p"
    with open(sweep / "pareto.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["zeroshot", "fedclip adapter_hidden=4", "fedclip adapter_hidden=8", "promptfl",
                          "linear_probe"]
    d = 64  # the tiny backbone's feature width
    assert int(rows["fedclip adapter_hidden=8"]["trainable params"]) == 2 * d * 8 + 8 + d
    assert int(rows["linear_probe"]["bytes / client / round"]) == 4 * 7 * d  # 7 classes x d, fp32
    assert rows["zeroshot"]["bytes / client / round"] == "0" and rows["zeroshot"]["on the front"] == "yes"
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
