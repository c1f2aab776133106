"""The field's evaluation protocols: few-shot clients (``data.shots``), class subsets (``data.classes``), and
balanced and per-class accuracy (metrics.csv, per_class.csv, confusion.png, W&B)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedclip_lightning.data.domains import DomainSet, Sample
from fedclip_lightning.data.partition import ClientSplit, Task
from fedclip_lightning.configure import load_config
from fedclip_lightning.data.pipeline import build_task, few_shot, select_classes
from fedclip_lightning.errors import DataError
from fedclip_lightning.training import balanced_accuracy, confusion_matrix
from helpers import PACS_MINI_ARGS, read_summary, run_main


def _domains(per_class: int = 9, classes=("cat", "dog", "fish", "owl", "yak")) -> DomainSet:
    samples = {d: [Sample(f"/x/{d}/{c}/{i}.png", label, d) for label, c in enumerate(classes) for i in range(per_class)]
               for d in ("a", "b", "c")}
    return DomainSet(root=Path("/x"), classes=list(classes), samples=samples, skipped=[])


def _task(ds: DomainSet) -> Task:
    def split(items):
        return ClientSplit(items[0].domain, items[0::3] + items[1::3], items[2::6], items[5::6])
    return Task(classes=ds.classes, clients=[split(ds.samples[d]) for d in ("a", "b")], unseen={"c": ds.samples["c"]})


def test_few_shot_keeps_k_images_of_each_class_per_client_and_nothing_else_changes():
    task = _task(_domains())
    four = few_shot(task, 4, seed=0)
    for before, after in zip(task.clients, four.clients):
        counts = Counter(s.label for s in after.train)
        assert counts == {label: 4 for label in range(5)}
        assert all(s in before.train for s in after.train)  # a subset, in the split's order
        assert [s for s in before.train if s in after.train] == after.train
        assert after.val == before.val and after.test == before.test
    assert four.unseen == task.unseen and four.classes == task.classes
    # seeded: the same images in every call (every process), others with another run seed
    assert few_shot(task, 4, seed=0) == four
    assert few_shot(task, 4, seed=1).clients[0].train != four.clients[0].train
    # nested: the 1-shot images are among the 2-shot ones, and those among the 4-shot ones
    one, two = few_shot(task, 1, seed=0), few_shot(task, 2, seed=0)
    for c1, c2, c4 in zip(one.clients, two.clients, four.clients):
        assert set(c1.train) <= set(c2.train) <= set(c4.train)
    # fewer images than shots: a class keeps what it has
    assert few_shot(task, 100, seed=0) == task
    # a class's shots are its own, whatever other classes the run keeps
    relabel = {1: 0, 3: 1}  # dog, owl
    subset = Task(classes=["dog", "owl"], unseen={}, clients=[
        ClientSplit(c.name, [Sample(x.path, relabel[x.label], x.domain) for x in c.train if x.label in relabel], [], [])
        for c in task.clients])
    for whole, part in zip(four.clients, few_shot(subset, 4, seed=0).clients):
        assert [x.path for x in part.train] == [x.path for x in whole.train if x.label in relabel]


def test_class_subset_by_name_or_seeded_count():
    ds = _domains()
    kept = select_classes(ds, ["owl", "cat"], None, seed=0)
    assert kept.classes == ["cat", "owl"]  # the scan's order
    for d, items in kept.samples.items():
        assert Counter(kept.classes[s.label] for s in items) == {"cat": 9, "owl": 9}
        assert {s.path.split("/")[3] for s in items} == {"cat", "owl"}  # the labels follow the images
        assert all(kept.classes[s.label] == s.path.split("/")[3] for s in items)
    three = select_classes(ds, None, 3, seed=0)
    assert len(three.classes) == 3 and three == select_classes(ds, None, 3, seed=0)
    assert {tuple(select_classes(ds, None, 3, seed=s).classes) for s in range(6)} != {tuple(three.classes)}
    assert select_classes(ds, ["cat", "dog", "owl"], 2, seed=0).classes[0] in ("cat", "dog", "owl")
    with pytest.raises(DataError, match=r"data.classes.keep: \['wolf'\] not among"):
        select_classes(ds, ["cat", "wolf"], None, seed=0)
    with pytest.raises(DataError, match="data.classes.count=6"):
        select_classes(ds, None, 6, seed=0)


def test_few_shot_class_subset_run_from_the_cli(tmp_path):
    """PACS_mini with three of its classes and one training image of each per client: the run's classes, its
    clients' training images (each of a kept class, at most one per class) and its untouched test images."""
    keep = ["dog", "elephant", "horse"]
    full = run_main([*PACS_MINI_ARGS, "logger=wandb", "run_name=full", f"data.classes.keep=[{','.join(keep)}]"],
                    tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = run_main([*PACS_MINI_ARGS, "logger=none", "run_name=shots", "data.shots=1",
                     f"data.classes.keep=[{','.join(keep)}]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "few-shot: at most 1 training image(s) of each class per client" in proc.stdout
    a, b = read_summary(tmp_path / "outputs" / "full"), read_summary(tmp_path / "outputs" / "shots")
    assert a["classes"] == b["classes"] == keep
    full_task, _ = build_task(load_config([*PACS_MINI_ARGS, f"data.classes.keep=[{','.join(keep)}]"]))
    for c in full_task.clients:
        assert {full_task.classes[s.label] for s in c.train + c.val + c.test} <= set(keep)
        assert a["num_samples"][c.name]["train"] == len(c.train)
        assert b["num_samples"][c.name]["train"] == len({s.label for s in c.train})  # one of each class it has
        assert b["num_samples"][c.name]["val"] == len(c.val) and b["num_samples"][c.name]["test"] == len(c.test)
    assert sum(a["num_samples"][c]["train"] for c in a["clients"]) > sum(b["num_samples"][c]["train"]
                                                                         for c in b["clients"])
    mini = Path(PACS_MINI_ARGS[1].split("=", 1)[1])
    for d in b["unseen"]:
        assert b["num_samples"][d]["test"] == sum(len(list((mini / d / c).glob("*"))) for c in keep
                                                  if (mini / d / c).is_dir())


@pytest.mark.parametrize("override, message", [
    ("data.shots=0", "data.shots"),
    ("data.classes.keep=[dog]", "a classifier needs at least two classes"),
    ("data.classes.keep=[dog,dog]", "a class is listed twice"),
    ("data.classes.count=1", "data.classes.count"),
    ("data.classes.keep=[dog,wolf]", "['wolf'] not among the data set's classes"),
])
def test_bad_protocol_settings_are_one_message(tmp_path, override, message):
    proc = run_main([*PACS_MINI_ARGS, "logger=none", override], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_over_shots_gives_the_accuracy_against_shots_table_and_plot(tmp_path, monkeypatch):
    import csv

    from fedclip_lightning import sweep as sweep_cli
    from helpers import runs_in_process

    runs_in_process(monkeypatch)
    cmd = ["--algorithms", "fedclip", "--heldout", "sketch", "--name", "shots", "--set", "data.shots=1,2",
           *PACS_MINI_ARGS, "logger=none", "federation.rounds=1"]
    proc = run_main(cmd, tmp_path, main=sweep_cli.main)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "shots"
    with open(sweep / "shots.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "split", "1-shot", "2-shot"]
    assert [r[:2] for r in rows[1:]] == [["fedclip", "clients"], ["fedclip", "unseen"]]
    one = read_summary(sweep / "fedclip_shots_1-sketch")
    two = read_summary(sweep / "fedclip_shots_2-sketch")
    assert sum(one["num_samples"][c]["train"] for c in one["clients"]) < \
        sum(two["num_samples"][c]["train"] for c in two["clients"])
    cell = float(next(r for r in rows if r[:2] == ["fedclip", "clients"])[2])
    assert cell == pytest.approx(100 * one["selected"]["mean_client_test_acc"], abs=0.01)
    assert (sweep / "accuracy_vs_shots.png").read_bytes()[:4] == b"\x89PNG"


def test_balanced_accuracy_is_the_mean_of_the_per_class_accuracies():
    import torch

    preds, targets = torch.tensor([0, 0, 1, 1, 0, 2]), torch.tensor([0, 0, 0, 1, 3, 3])
    conf = confusion_matrix(preds, targets, 4)
    assert conf.tolist() == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]
    # class 0: 2 of 3, class 1: 1 of 1, class 2: no image (left out), class 3: 0 of 2
    assert balanced_accuracy(conf) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert balanced_accuracy(None) != balanced_accuracy(None)  # NaN


def test_per_class_outputs_agree_with_the_metrics(tmp_path):
    """per_class.csv (selected round and zero-shot), metrics.csv's balanced accuracy, summary.json's means and
    W&B's series all say the same, and the counts are the images of the splits."""
    import csv

    from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run

    proc = run_main([*PACS_MINI_ARGS, "logger=wandb", "plots=true", "run_name=r"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "r"
    s = read_summary(run)
    sel = s["selected_round"]
    with open(run / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    with open(run / "metrics.csv") as f:
        metrics = [r for r in csv.DictReader(f) if int(r["round"]) == sel and r["split"] != "train"]
    assert {r["model"] for r in per_class} == {"selected", "zero-shot"}
    for m in metrics:
        rows = [r for r in per_class if r["model"] == "selected" and r["participant"] == m["client"]
                and r["split"] == m["split"]]
        images = sum(int(r["images"]) for r in rows)
        n = s["num_samples"][m["client"]]["test" if m["split"] == "unseen" else m["split"]]
        assert images == n and all(int(r["images"]) == sum(int(r[f"as {c}"]) for c in s["classes"]) for r in rows)
        assert sum(int(r["correct"]) for r in rows) / images == pytest.approx(float(m["accuracy"]), abs=1e-6)
        assert sum(float(r["accuracy"]) for r in rows) / len(rows) == pytest.approx(float(m["balanced_accuracy"]),
                                                                                    abs=1e-6)
    balanced = {m["client"]: float(m["balanced_accuracy"]) for m in metrics if m["split"] == "test"}
    assert s["selected"]["client_test_balanced_acc"] == pytest.approx(balanced, abs=1e-6)
    assert s["selected"]["mean_client_test_balanced_acc"] == pytest.approx(sum(balanced.values()) / len(balanced))
    assert (run / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "balanced (clients)" in proc.stdout and "balanced (unseen)" in proc.stdout
    (wb,) = find_offline_runs(run / "wandb")
    got = read_offline_run(wb)
    rounds = [r for r in got["history"] if r.get("round") == sel]
    assert rounds and rounds[0]["mean/client_test_balanced_acc"] == pytest.approx(
        s["selected"]["mean_client_test_balanced_acc"])
    assert got["summary"]["selected/mean_unseen_balanced_acc"] == pytest.approx(s["selected"]["mean_unseen_balanced_acc"])


def test_domainnet10_is_one_preset():
    cfg = load_config(["data=domainnet10", "data.root=/data/DomainNet"])
    assert cfg.data.classes.keep == ["bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale",
                                     "windmill", "wine_glass", "zebra"]
    assert cfg.data.domains == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


# -- base-to-novel ----------------------------------------------------------------------------------------------

def test_base_and_novel_classes_are_cocoops_halves():
    from fedclip_lightning.data.pipeline import base_novel_classes
    from fedclip_lightning.federation.base_novel import harmonic_mean

    base, novel = base_novel_classes(["a", "b", "c", "d", "e", "f", "g"])
    assert (base, novel) == (["a", "b", "c", "d"], ["e", "f", "g"])
    assert not set(base) & set(novel)
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.0, 0.0) != harmonic_mean(0.0, 0.0)  # NaN


def test_base_to_novel_trains_on_the_base_classes_and_scores_novel_as_a_run_on_them_alone(tmp_path):
    """A base-to-novel run trains exactly as a run on the base classes alone (the same adapter, bit for bit),
    and its zero-shot novel accuracy is that of a zero-shot run on the novel classes alone."""
    import torch

    base, novel = ["dog", "elephant", "giraffe", "guitar"], ["horse", "house", "person"]
    common = [*PACS_MINI_ARGS, "logger=none", "federation.rounds=2"]
    runs = {"b2n": ["data.classes.split=base_novel"], "base": [f"data.classes.keep=[{','.join(base)}]"],
            "novel": ["algorithm=zeroshot", f"data.classes.keep=[{','.join(novel)}]"]}
    for name, extra in runs.items():
        proc = run_main([*common, f"run_name={name}", *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs"
    b2n, alone, zs_novel = (read_summary(out / n) for n in runs)
    assert b2n["classes"] == alone["classes"] == base
    assert b2n["final"] == alone["final"] and b2n["selected_round"] == alone["selected_round"]
    a, b = (torch.load(out / n / "adapter_final.pt", weights_only=True)["state"] for n in ("b2n", "base"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bn = b2n["base_novel"]
    assert (bn["base_classes"], bn["novel_classes"]) == (base, novel)
    assert bn["final"]["clients"]["base"] == b2n["final"]["mean_client_test_acc"]
    assert bn["zero_shot"]["clients"]["novel"] == pytest.approx(zs_novel["final"]["mean_client_test_acc"], nan_ok=True)
    assert bn["zero_shot"]["unseen"]["novel"] == pytest.approx(zs_novel["final"]["mean_unseen_acc"])
    for model in ("final", "zero_shot"):
        for where in ("clients", "unseen"):
            v = bn[model][where]
            if v["base"] + v["novel"] > 0:
                assert v["hm"] == pytest.approx(2 * v["base"] * v["novel"] / (v["base"] + v["novel"]))


@pytest.mark.parametrize("method", [["algorithm=promptfl", "algorithm.n_ctx=4"], ["algorithm=fedtpg", "algorithm.hidden=16"],
                                    ["algorithm=cocoop"]], ids=["promptfl", "fedtpg", "cocoop"])
def test_base_to_novel_scores_a_learned_prompt_on_classes_it_never_saw(tmp_path, method):
    proc = run_main([*PACS_MINI_ARGS, "logger=none", "federation.rounds=1", *method,
                     "data.classes.split=base_novel", "run_name=p"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base-to-novel, final round 1: 4 base classes" in proc.stdout
    bn = read_summary(tmp_path / "outputs" / "p")["base_novel"]
    assert 0.0 <= bn["final"]["unseen"]["novel"] <= 1.0


@pytest.mark.parametrize("override, message", [
    ("algorithm=linear_probe", "a part for each training class"),
    ("algorithm=promptfl algorithm.n_ctx=4 algorithm.csc=true", "a part for each training class"),
    ("algorithm=fedclip_ft", "personalises its models"),
    ("data.partition.scheme=dirichlet", "data.partition.scheme=domain with data.classes.split=base_novel"),
    ("data.classes.split=half", "data.classes.split"),
])
def test_base_to_novel_refuses_what_it_cannot_score(tmp_path, override, message):
    split = [] if override.startswith("data.classes.split") else ["data.classes.split=base_novel"]
    proc = run_main([*PACS_MINI_ARGS, "logger=none", *split, *override.split()], tmp_path)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


# One process against two for the protocols: the golden cases fedtpg_protocols and cocoop_protocols (few-shot
# clients, base-to-novel, its scores in the record) run on two ranks bit for bit as on one (tests/golden.py:
# TWO_PROCESS), in the one launch of two processes that runs every two-process case.
