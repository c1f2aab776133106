"""End to end on real images: the command line, as a user runs it."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from helpers import PACS_MINI_ARGS, read_summary, run_cli, run_main
from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run

CLIENTS = ["art_painting", "cartoon", "photo"]


def _check_summary(s: dict, rounds: int) -> None:
    assert s["status"] == "finished"
    assert s["algorithm"] == "fedclip"
    assert s["backbone"]["name"] == "fedclip-tiny-vit" and s["backbone"]["pretrained"] is None
    assert s["dataset"] == "pacs_mini"
    assert s["clients"] == CLIENTS and s["unseen"] == ["sketch"]
    assert s["rounds_run"] == rounds
    assert 1 <= s["selected_round"] <= rounds
    for block in ("selected", "final"):
        b = s[block]
        assert set(b["client_test_acc"]) == set(CLIENTS) == set(b["client_val_acc"])
        assert set(b["unseen_acc"]) == {"sketch"}
        for v in [*b["client_test_acc"].values(), *b["client_val_acc"].values(), *b["unseen_acc"].values()]:
            assert 0.0 <= v <= 1.0
        assert b["mean_client_test_acc"] == pytest.approx(sum(b["client_test_acc"].values()) / 3)
        assert b["mean_unseen_acc"] == b["unseen_acc"]["sketch"]
    assert s["final"]["round"] == rounds
    # The adapter of a tiny model with embed dim 64: 2 (64^2 + 64) fp32 values, sent up and down by 3 clients.
    assert s["trainable_params"] == 2 * (64 * 64 + 64)
    assert s["bytes_up_total"] == s["bytes_down_total"] == rounds * 3 * 4 * s["trainable_params"]
    assert s["wall_time_s"] > 0


def _read_metrics(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    proc = run_main([*PACS_MINI_ARGS, "run_name=r", "logger=wandb"], tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, proc


def test_run_writes_summary_metrics_and_table(one_process):
    tmp, proc = one_process
    run_dir = tmp / "outputs" / "r"
    s = read_summary(run_dir)
    _check_summary(s, rounds=3)
    rows = _read_metrics(run_dir / "metrics.csv")
    assert list(rows[0]) == ["round", "client", "split", "accuracy", "loss", "balanced_accuracy"]
    # per round: 3 clients x (train, val, test) + 1 unseen domain
    assert len(rows) == 3 * (3 * 3 + 1)
    final = {(r["client"], r["split"]): r for r in rows if r["round"] == "3"}
    for c in CLIENTS:
        assert float(final[(c, "test")]["accuracy"]) == pytest.approx(s["final"]["client_test_acc"][c], abs=1e-6)
        assert float(final[(c, "val")]["accuracy"]) == pytest.approx(s["final"]["client_val_acc"][c], abs=1e-6)
        assert math.isfinite(float(final[(c, "train")]["loss"]))
    assert float(final[("sketch", "unseen")]["accuracy"]) == pytest.approx(s["final"]["unseen_acc"]["sketch"], abs=1e-6)
    # the table for people, and where the files are
    assert "sketch (unseen)" in proc.stdout and "mean (clients)" in proc.stdout
    assert "RANDOMLY initialised" in proc.stdout
    assert str(run_dir.relative_to(tmp)) in proc.stdout
    # which kernels made these numbers: the suite's own (its environment reaches the command)
    from fedclip_lightning.numerics import header_line, is_portable

    assert s["numerics"]["profile"] == ("portable" if is_portable() else "native")
    assert s["numerics"]["threads"] == torch.get_num_threads()
    assert header_line(s["numerics"]) in proc.stdout
    adapter = torch.load(run_dir / "adapter_final.pt", weights_only=True)
    assert adapter["round"] == 3 and set(adapter["state"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_wandb_offline_run_holds_per_client_metrics(one_process):
    tmp, _ = one_process
    run_dir = tmp / "outputs" / "r"
    runs = find_offline_runs(run_dir)
    assert len(runs) == 1
    w = read_offline_run(runs[0])
    assert w["exit_code"] == 0
    assert w["job_type"] == "fedclip" and w["name"] == "r"
    assert w["config"]["algorithm"]["name"] == "fedclip"
    s = read_summary(run_dir)
    rows = {r["round"]: r for r in w["history"] if "round" in r}
    # the final accuracies as a W&B table, and the selection in the run summary
    assert w["summary"]["summary_table/nrows"] == 4 and w["summary"]["selected_round"] == read_summary(run_dir)["selected_round"]
    assert sorted(rows) == [1, 2, 3]
    for c in CLIENTS:
        assert rows[3][f"client/{c}/test_acc"] == pytest.approx(s["final"]["client_test_acc"][c])
        assert f"client/{c}/train_loss" in rows[1]
    assert rows[3]["unseen/sketch/acc"] == pytest.approx(s["final"]["unseen_acc"]["sketch"])
    assert rows[3]["comm/bytes_up_total"] == s["bytes_up_total"]


def test_two_processes_equal_one(one_process, tmp_path):
    tmp, _ = one_process
    proc = run_cli([*PACS_MINI_ARGS, "run_name=r", "logger=none", "fabric.devices=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    one, two = read_summary(tmp / "outputs" / "r"), read_summary(tmp_path / "outputs" / "r")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for block in ("selected", "final"):
        for key in ("client_test_acc", "client_val_acc", "unseen_acc"):
            for name, v in one[block][key].items():
                assert two[block][key][name] == pytest.approx(v, abs=1e-6)
    assert two["selected_round"] == one["selected_round"]
    assert two["bytes_up_total"] == one["bytes_up_total"]
    a1 = torch.load(tmp / "outputs" / "r" / "adapter_final.pt", weights_only=True)["state"]
    a2 = torch.load(tmp_path / "outputs" / "r" / "adapter_final.pt", weights_only=True)["state"]
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], atol=1e-6, rtol=0)


def test_zeroshot_trains_nothing(tmp_path):
    proc = run_main([*PACS_MINI_ARGS, "algorithm=zeroshot", "run_name=z", "logger=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "outputs" / "z")
    assert s["algorithm"] == "zeroshot" and s["rounds_run"] == 0 and s["selected_round"] == 0
    assert s["trainable_params"] == 0 and s["bytes_up_total"] == 0
    assert set(s["final"]["unseen_acc"]) == {"sketch"}
    assert not (tmp_path / "outputs" / "z" / "adapter_final.pt").exists()


def test_options_sample_weighting_kept_optimizer_prototype_loss(tmp_path):
    args = [*PACS_MINI_ARGS, "run_name=o", "logger=csv", "federation.aggregation=samples",
            "algorithm.optimizer_state=keep", "algorithm.loss=prototype", "federation.rounds=2",
            "federation.eval_interval=2"]
    proc = run_main(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path / "outputs" / "o")
    assert s["config"]["federation"]["aggregation"] == "samples"
    rows = _read_metrics(tmp_path / "outputs" / "o" / "metrics.csv")
    assert {r["round"] for r in rows} == {"2"}  # evaluated every 2 rounds only
    assert (tmp_path / "outputs" / "o" / "csv_logs").is_dir()


def test_zero_shot_baseline_column(tmp_path):
    """After training, zero-shot CLIP on the same splits: summary.json's zero_shot block (the numbers of an
    algorithm=zeroshot run) and the table's first column group; federation.zero_shot_baseline=false skips it."""
    runs = {name: run_main([*PACS_MINI_ARGS, f"run_name={name}", "logger=none", *more], tmp_path)
            for name, more in {"with": [], "without": ["federation.zero_shot_baseline=false"],
                               "zs": ["algorithm=zeroshot"]}.items()}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr
    s = {name: read_summary(tmp_path / "outputs" / name) for name in runs}
    for key in ("client_val_acc", "client_test_acc", "unseen_acc"):
        assert s["with"]["zero_shot"][key] == s["zs"]["final"][key]
    assert s["without"]["zero_shot"] is None and s["zs"]["zero_shot"] is None
    # The baseline changes nothing the rounds computed.
    assert s["with"]["final"] == s["without"]["final"] and s["with"]["selected"] == s["without"]["selected"]
    assert "zero-shot" in runs["with"].stdout and "zero-shot" not in runs["without"].stdout


def test_embedded_demo_runs_with_no_arguments(demo_command):
    """The newcomer's command, as the README gives it: the pretrained small CLIP, FedCLIP for 200 rounds,
    and a table that ends with zero-shot beside FedCLIP."""
    proc, s, _ = demo_command
    assert "synthetic" in proc.stdout and "fedclip-mini" in proc.stdout
    assert "RANDOMLY initialised" not in proc.stdout
    assert s["clients"] == ["sketch", "chalk", "neon"] and s["unseen"] == ["photo"]
    assert s["status"] == "finished" and s["rounds_run"] == 200
    header = next(line for line in proc.stdout.splitlines() if "zero-shot" in line and "final round 200" in line)
    assert header.index("zero-shot") < header.index("selected round") < header.index("final round")
    mean = next(line for line in proc.stdout.splitlines() if line.startswith("mean (clients)")).split()
    zs_test, final_test = float(mean[3]), float(mean[-1])
    assert zs_test == round(100 * s["zero_shot"]["mean_client_test_acc"], 2)
    assert final_test > zs_test
