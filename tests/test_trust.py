"""Numbers a researcher can trust (issue 23): a setting that would run silently wrong is refused with a message,
and a diverged model stops the run instead of being reported as a result."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PACS_MINI
from fedclip_lightning.aggregation.checks import ONLY_WITH
from fedclip_lightning.configure import load_config
from fedclip_lightning.errors import ConfigError, DivergedError
from fedclip_lightning.federation.orchestrator import run

PM = ["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "plots=false", "logger=none"]


def _run(tmp_path, *more, name="r"):
    return run(load_config([*PM, f"output_dir={tmp_path}", f"run_name={name}", f"features.dir={tmp_path / 'f'}",
                            *more]))


@pytest.mark.parametrize("lr", ["1e30"])
def test_a_diverged_run_stops_naming_round_and_clients(tmp_path, lr):
    with pytest.raises(DivergedError, match=r"round 1: the local training (loss|model) of client\(s\) art_painting, "
                                            r"cartoon, photo is not finite .* Fix: lower algorithm\.lr \(now 1e\+30\)"):
        _run(tmp_path, f"algorithm.lr={lr}", "federation.rounds=3")
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "failed" and "run diverged: round 1" in s["error"]
    assert s["selected"] is None and s["final"] is None  # no accuracy of a NaN model is reported


def test_a_non_finite_aggregate_stops_the_run(tmp_path, monkeypatch):
    """A server update that makes the global model NaN (a broken server step, an absurd attack scale) is
    caught in the round it happens, before evaluation."""
    from fedclip_lightning.aggregation import server_opt

    step = server_opt.Momentum.step
    monkeypatch.setattr(server_opt.Momentum, "step", lambda self, w, d: step(self, w, d) * float("nan"))
    with pytest.raises(DivergedError, match="round 1: the aggregated model is not finite .*, from finite client"):
        _run(tmp_path, "federation.server_optimizer.name=momentum", "federation.rounds=2")


def test_evaluation_names_a_split_whose_loss_is_not_finite(tmp_path, monkeypatch):
    """The last local step can leave a model that no training loss saw: its evaluation says so."""
    from fedclip_lightning.federation import evaluation

    rows_of = evaluation.table_rows

    def nan_val(parts, results, train, algorithm):
        out = rows_of(parts, results, train, algorithm)
        n = len(parts)
        for i, row in out.items():
            if i // n == 1:  # the val slot: (accuracy, loss, n, confusion..., filled)
                out[i] = row.clone()
                out[i][1] = float("nan")
        return out

    monkeypatch.setattr(evaluation, "table_rows", nan_val)
    with pytest.raises(DivergedError, match="round 1: the loss is not finite .* for art_painting val"):
        _run(tmp_path, "federation.rounds=1")


def test_nan_attack_scale_is_refused():
    with pytest.raises(ConfigError, match=r"federation.attack.scale=nan: must be a finite number"):
        load_config([*PM, "federation.attack.name=scaled", "federation.attack.fraction=0.34", "federation.attack.scale=nan"])


@pytest.mark.parametrize("key,value", [
    ("federation.privacy.target_epsilon", "8.5"), ("federation.attack.fraction", "0.34"),
    ("federation.aggregator.trim_beta", "0.2"), ("federation.aggregator.krum_f", "1"), ("federation.aggregator.multi_krum_m", "2")])
def test_a_setting_that_does_nothing_where_it_stands_is_refused(key, value):
    enabler = ONLY_WITH[key][0]
    with pytest.raises(ConfigError, match=rf"{key}={value}: has no effect with {enabler}=.* Fix: add {enabler}="):
        load_config([*PM, f"{key}={value}"])


def test_an_attack_fraction_that_rounds_to_no_attacker_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"attack\.fraction=0\.1: of 3 clients that rounds to 0 attackers.*"
                                          r"Fix: set federation\.attack\.fraction=0\.33 or more"):
        _run(tmp_path, "federation.attack.name=sign_flip", "federation.attack.fraction=0.1", "federation.rounds=1")


def test_multi_krum_with_more_rows_than_clients_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"federation.aggregator.multi_krum_m=5: more rows than the 3 clients"):
        _run(tmp_path, "federation.aggregator.name=multi_krum", "federation.aggregator.multi_krum_m=5", "federation.rounds=1")


def test_a_sweep_leaves_a_setting_out_of_the_runs_whose_axis_turns_it_off(tmp_path, capsys):
    import argparse

    from fedclip_lightning.sweep import plan

    args = argparse.Namespace(algorithms="fedclip", heldout="sketch", name="s",
                              set=["federation.attack.name=none,sign_flip"])
    _, runs = plan(args, [*PM, f"output_dir={tmp_path}", "federation.attack.fraction=0.34"])
    by_attack = {next(o for o in ov if o.startswith("federation.attack.name=")): ov for _, _, ov in runs}
    assert "federation.attack.fraction=0.34" not in by_attack["federation.attack.name=none"]
    assert "federation.attack.fraction=0.34" in by_attack["federation.attack.name=sign_flip"]
    assert "federation.attack.fraction=0.34 has no effect where federation.attack.name=none" in capsys.readouterr().out


def test_promptfl_refuses_a_context_that_pushes_the_class_name_out(tmp_path):
    """The tiny backbone's text context holds 77 tokens: 74 context tokens leave no room for 'art_painting.'"""
    with pytest.raises(ConfigError, match=r"algorithm.n_ctx=74: the prompt of class .* needs \d+ tokens, but the "
                                          r"text tower's context holds 77.* Fix: use at most \d+ context tokens"):
        _run(tmp_path, "algorithm=promptfl", "algorithm.n_ctx=74", "federation.rounds=1")
    with pytest.raises(ConfigError, match=r"algorithm.ctx_init='(x ){73}x' \(74 tokens\): .* Fix: use at most"):
        _run(tmp_path, "algorithm=promptfl", f"algorithm.ctx_init='{' '.join(['x'] * 74)}'", "federation.rounds=1")
    # a phrase longer than the context itself: counted whole, not as the part that fits
    with pytest.raises(ConfigError, match=r"algorithm.ctx_init='(x ){79}x' \(80 tokens\): .* needs 8\d tokens"):
        _run(tmp_path, "algorithm=promptfl", f"algorithm.ctx_init='{' '.join(['x'] * 80)}'", "federation.rounds=1")


def test_resume_refuses_to_change_rounds_that_a_schedule_was_planned_for(tmp_path):
    """promptfl's cosine schedule and a DP target both spread over federation.rounds: a resume that changes it
    would match neither run (5 then 10 rounds differed from a straight 10 in 90 metrics rows)."""
    for name, opts in (("cos", ["algorithm=promptfl", "algorithm.n_ctx=4"]),
                       ("dp", ["federation.privacy.mode=server", "federation.privacy.target_epsilon=20"])):
        _run(tmp_path, *opts, "federation.rounds=2", name=name)
        with pytest.raises(ConfigError, match=r"resume: federation.rounds=4, but the checkpoint .* belongs to a run "
                                              r"of 2 rounds and .* Fix: resume with federation.rounds=2"):
            _run(tmp_path, *opts, "federation.rounds=4", "resume=auto", name=name)


def test_resume_refuses_a_checkpoint_past_the_last_round(tmp_path):
    _run(tmp_path, "federation.rounds=3")
    with pytest.raises(ConfigError, match=r"is at round 3, past federation.rounds=2\. Fix: resume with "
                                          r"federation.rounds=3"):
        _run(tmp_path, "federation.rounds=2", "resume=auto")


def test_extending_a_run_without_a_schedule_still_resumes(tmp_path):
    _run(tmp_path, "federation.privacy.mode=server", "federation.privacy.noise_multiplier=0.5", "federation.rounds=2")
    s = _run(tmp_path, "federation.privacy.mode=server", "federation.privacy.noise_multiplier=0.5", "federation.rounds=4",
             "resume=auto")
    straight = _run(tmp_path, "federation.privacy.mode=server", "federation.privacy.noise_multiplier=0.5", "federation.rounds=4",
                    name="straight")
    assert s["resumed_from"] == 2 and s["server"] == straight["server"]  # epsilon of 4 rounds at one sigma


def test_an_unreachable_privacy_target_is_a_message_not_a_traceback(tmp_path):
    with pytest.raises(ConfigError, match=r"federation.privacy.target_epsilon=1e-06: no noise multiplier reaches it .* "
                                          r"Fix: a larger federation.privacy.target_epsilon"):
        _run(tmp_path, "federation.privacy.mode=server", "federation.privacy.target_epsilon=1e-6", "federation.rounds=2")


def test_secure_dp_noise_comes_from_the_os_not_the_config(tmp_path, capsys):
    from fedclip_lightning.aggregation.privacy import secure_normal

    z = secure_normal(200_001)
    assert z.shape == (200_001,) and abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert not torch.equal(secure_normal(8), secure_normal(8))
    opts = ["federation.privacy.mode=server", "federation.privacy.clip=0.05", "federation.rounds=2"]
    a = _run(tmp_path, *opts, "federation.privacy.secure=true", name="a")
    b = _run(tmp_path, *opts, "federation.privacy.secure=true", name="b")
    sa = torch.load(tmp_path / "a" / "adapter_final.pt", weights_only=True)["state"]
    sb = torch.load(tmp_path / "b" / "adapter_final.pt", weights_only=True)["state"]
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)  # same config, other noise
    assert a["server"]["privacy/epsilon"] == b["server"]["privacy/epsilon"]
    assert "noise from the operating system's entropy" in capsys.readouterr().out


def test_a_sweep_reruns_a_finished_run_whose_results_would_differ_and_resumes_a_stopped_one(tmp_path):
    from fedclip_lightning.sweep import _rerun_plan

    ov = [*PM, f"output_dir={tmp_path}", "run_name=r", f"features.dir={tmp_path / 'f'}", "federation.rounds=2"]
    run(load_config(ov))
    assert _rerun_plan(tmp_path / "r", ov) == ("skip", "")
    for change, key in (("federation.rounds=3", "federation.rounds"), ("features.encoder_batch_size=1",
                                                                         "features.encoder_batch_size"),
                        ("fabric.devices=2", "fabric.devices"), ("logger=csv", "logger.name")):
        action, why = _rerun_plan(tmp_path / "r", [*ov, change])
        assert action == "fresh" and f"finished earlier with other settings ({key}" in why, (change, why)
    assert _rerun_plan(tmp_path / "r", [*ov, "progress=true", "features.num_workers=1"]) == ("skip", "")
    # a run older than a key: the same where the key is wanted at its default (the behaviour from before it)
    summary = tmp_path / "r" / "summary.json"
    s = json.loads(summary.read_text())
    del s["config"]["data"]["classes"], s["config"]["data"]["shots"]
    summary.write_text(json.dumps(s))
    assert _rerun_plan(tmp_path / "r", ov) == ("skip", "")
    action, why = _rerun_plan(tmp_path / "r", [*ov, "data.shots=4"])
    assert action == "fresh" and "data.shots: then None, now 4" in why
    # killed after its checkpoint of round 2: the sweep resumes it instead of starting at round 0
    summary.write_text(summary.read_text().replace('"status": "finished"', '"status": "running"'))
    assert _rerun_plan(tmp_path / "r", ov) == ("resume", "stopped after round 2: resumed from its checkpoint")
    assert _rerun_plan(tmp_path / "r", [*ov, "algorithm.lr=1e-3"])[0] == "fresh"


def test_sweep_tables_compare_only_the_runs_of_the_current_plan(tmp_path):
    import shutil

    from fedclip_lightning.sweep_results import report
    from fedclip_lightning.tables import collect_runs

    _run(tmp_path, "federation.rounds=1", name="fedclip-sketch")
    shutil.copytree(tmp_path / "fedclip-sketch", tmp_path / "fedclip_lr_1e-3-sketch")
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "s", "overrides": PM, "runs": ["fedclip-sketch"]}))
    assert [r["run_dir"].name for r in collect_runs(tmp_path)] == ["fedclip-sketch"]
    assert ("left out of the tables: 1 run(s) of an earlier plan in this folder (fedclip_lr_1e-3-sketch)"
            in report(tmp_path))


def test_the_feature_cache_is_a_function_of_its_key(tmp_path):
    """Features encoded in calls of one image differ from the default calls' in the last bits (fp32): a cache
    they filled is not read by a run of other settings, whose adapters equal a cold run's bit for bit."""
    def adapter(d):
        return torch.load(d / "adapter_final.pt", weights_only=True)["state"]

    _run(tmp_path, "federation.rounds=2", "features.encoder_batch_size=1", name="one")
    warm = _run(tmp_path, "federation.rounds=2", name="warm")
    assert warm["features"]["encoded_images"] == 40 and warm["features"]["cached_images"] == 0
    again = _run(tmp_path, "federation.rounds=2", name="again")
    assert again["features"]["cached_images"] == 40
    cold = run(load_config([*PM, f"output_dir={tmp_path}", "run_name=cold", f"features.dir={tmp_path / 'g'}",
                            "federation.rounds=2"]))
    assert cold["features"]["encoded_images"] == 40
    a, b, c = adapter(tmp_path / "warm"), adapter(tmp_path / "again"), adapter(tmp_path / "cold")
    assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in a)


def test_a_set_encoded_beside_others_has_the_bits_it_has_alone(tmp_path):
    from fedclip_lightning.data.domains import scan_domains
    from fedclip_lightning.model.backbone import load_backbone
    from fedclip_lightning.model.features import FeatureCache, model_identity

    backbone = load_backbone(load_config(["backbone=tiny_vit"]).backbone)
    sets = [s for s in scan_domains(PACS_MINI, None).samples.values()]
    ident = model_identity(backbone, "fp32", 0)
    together = FeatureCache(None, backbone, ident, batch_size=16, progress=False).get_many(sets)
    for samples, f in zip(sets, together):
        assert torch.equal(FeatureCache(None, backbone, ident, batch_size=16, progress=False).get(samples), f)


def test_a_class_folder_of_one_domain_only_is_refused_with_the_fix(tmp_path):
    """VLCS-style folders where one domain says husky and the others dog: not 8 classes without a word."""
    import shutil

    from fedclip_lightning.data.domains import scan_domains
    from fedclip_lightning.errors import DataError

    root = tmp_path / "mini"
    shutil.copytree(PACS_MINI, root)
    (root / "cartoon" / "dog").rename(root / "cartoon" / "husky")
    with pytest.raises(DataError, match=r"class folder 'husky' is only in domain 'cartoon' of 4 domains \(which "
                                        r"lacks \['dog', 'guitar'\].* Fix: rename the folder"):
        scan_domains(root)
    assert len(scan_domains(root, single_domain_classes=True).classes) == 8
    assert len(scan_domains(root, ["cartoon", "photo"]).classes) == 8  # two domains: nothing to compare with


def test_the_header_lists_the_classes(tmp_path, capsys):
    _run(tmp_path, "federation.rounds=1")
    assert "  classes: 7 (dog, elephant, giraffe, guitar, horse, house, person)" in capsys.readouterr().out


def test_all_checkpoints_damaged_is_refused_not_a_silent_restart(tmp_path, capsys):
    _run(tmp_path, "federation.rounds=2", "federation.checkpoint_min_seconds=0")
    for meta in (tmp_path / "r" / "checkpoints").glob("round-*/meta.pt"):
        meta.write_bytes(b"damaged")
    with pytest.raises(ConfigError, match=r"resume=auto: all 2 checkpoint\(s\) of .* are damaged .* Fix: restore"):
        _run(tmp_path, "federation.rounds=3", "federation.checkpoint_min_seconds=0", "resume=auto")
    out = capsys.readouterr().out
    assert "trying the one before it" in out and "it was the oldest one kept" in out


def test_a_run_folder_moved_to_another_output_dir_resumes(tmp_path):
    import shutil

    _run(tmp_path / "a", "federation.rounds=2")
    shutil.move(tmp_path / "a" / "r", tmp_path / "b" / "r")
    s = _run(tmp_path / "b", "federation.rounds=3", "resume=auto")
    assert s["resumed_from"] == 2 and s["rounds_run"] == 3


def test_a_relabelled_image_reads_as_relabelled():
    from fedclip_lightning.checkpoint import data_changes

    assert data_changes({"x.jpg": [1, 2, 0, "a/test"]}, {"x.jpg": [1, 2, 3, "a/test"]}) == [
        "relabelled x.jpg (label 0 -> 3)"]
    assert data_changes({"x.jpg": [1, 2, 0, "a/test"]}, {"x.jpg": [1, 2, 0, "a/train"]}) == [
        "moved x.jpg (a/test -> a/train)"]


def test_an_image_without_an_extension_is_refused_not_dropped(tmp_path):
    import shutil

    from fedclip_lightning.data.domains import scan_domains
    from fedclip_lightning.errors import DataError

    root = tmp_path / "mini"
    shutil.copytree(PACS_MINI, root)
    img = next((root / "photo" / "dog").glob("*.jpg"))
    img.rename(img.with_suffix(""))
    (root / "photo" / "dog" / "NOTES").write_text("not an image")
    with pytest.raises(DataError, match=r"1 image file\(s\) without an extension .* would be left out without a "
                                        r"word: .*photo/dog/[^/.]+\. Fix: give them their extension"):
        scan_domains(root)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                 "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true",
                 "WANDB_CACHE_DIR": str(tmp_path / ".cache"), "WANDB_CONFIG_DIR": str(tmp_path / ".config"),
                 "WANDB_DATA_DIR": str(tmp_path / ".data")}.items():
        monkeypatch.setenv(k, v)
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()


def test_wandb_summaries_cover_the_whole_run_after_a_resume(offline_wandb, capsys):
    from fedclip_lightning.federation.tracking import summary_kind
    from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run

    tmp_path = offline_wandb
    _run(tmp_path, "logger=wandb", "federation.rounds=2", "federation.checkpoint_min_seconds=0")
    s = _run(tmp_path, "logger=wandb", "federation.rounds=4", "federation.checkpoint_min_seconds=0", "resume=auto")
    sessions = [read_offline_run(d) for d in find_offline_runs(tmp_path / "r" / "wandb")]
    assert len(sessions) == 2 and {x["id"] for x in sessions} == {s["wandb_id"]}
    history = [row for x in sessions for row in x["history"]]
    last = sessions[-1]["summary"]
    checked = 0
    keys = {k for row in history for k in row if summary_kind(k)}
    for key in keys:
        kind = summary_kind(key)
        seen = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        assert last[f"{kind}/{key}"] == (max if kind == "max" else min)(seen), key
        checked += 1
    assert checked >= 20
    out = capsys.readouterr().out
    assert "W&B ran offline (WANDB_MODE=offline): nothing was uploaded" in out
    assert f"wandb sync {tmp_path / 'r' / 'wandb'}/offline-run-*-{s['wandb_id']}" in out


def test_a_fresh_run_sets_the_replaced_runs_wandb_sessions_aside(offline_wandb):
    from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run

    tmp_path = offline_wandb
    first = _run(tmp_path, "logger=wandb", "federation.rounds=1")
    second = _run(tmp_path, "logger=wandb", "federation.rounds=1", "algorithm.lr=1e-3")
    assert first["wandb_id"] != second["wandb_id"]
    assert [read_offline_run(d)["id"] for d in find_offline_runs(tmp_path / "r" / "wandb")] == [second["wandb_id"]]
    (aside,) = (tmp_path / "r" / "replaced").glob("*/wandb/offline-run-*")
    assert read_offline_run(aside)["id"] == first["wandb_id"]


def test_a_kill_during_wandb_start_up_restarts_as_the_same_wandb_run(offline_wandb, monkeypatch):
    from fedclip_lightning.federation import orchestrator

    tmp_path = offline_wandb
    build = orchestrator.build_loggers

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while W&B starts

    monkeypatch.setattr(orchestrator, "build_loggers", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "logger=wandb", "federation.rounds=1")
    wanted = json.loads((tmp_path / "r" / "wandb_id.json").read_text())["wandb_id"]
    monkeypatch.setattr(orchestrator, "build_loggers", build)
    assert _run(tmp_path, "logger=wandb", "federation.rounds=1", "resume=auto")["wandb_id"] == wanted


def test_seeds_share_a_wandb_job_type():
    from fedclip_lightning.loggers import job_type

    assert job_type(load_config([*PM, "label='fedclip aggregator=median seed=2'"])) == "fedclip aggregator=median"
    assert job_type(load_config(PM)) == "fedclip"


def test_seeds_are_repeats_with_mean_and_standard_deviation(tmp_path):
    import statistics

    from fedclip_lightning.sweep import _parse, plan, report, save_plan

    args, overrides = _parse(["--algorithms", "fedclip", "--heldout", "sketch", "--name", "s", "--seeds", "0,1",
                              *PM, f"output_dir={tmp_path}", "federation.rounds=2", "algorithm.lr=1e-3"])
    sweep_dir, runs = plan(args, overrides)
    assert [tag for tag, _, _ in runs] == ["fedclip_seed_0", "fedclip_seed_1"]
    save_plan(sweep_dir, overrides, runs)
    accs = []
    for _, _, ov in runs:
        accs.append(run(load_config([*ov, f"features.dir={tmp_path / 'f'}"]))["selected"]["mean_unseen_acc"])
    md = report(sweep_dir)
    assert accs[0] != accs[1]  # the spread is not zero by construction
    assert "mean over 2 seeds" in md and "standard deviation over the seeds" in md
    mean_row = next(line for line in md.splitlines() if line.startswith("| sketch |"))
    assert f"{100 * statistics.mean(accs):.2f}" in mean_row
    std_rows = [line for line in md.splitlines() if line.startswith("| sketch |")]
    assert f"{100 * statistics.stdev(accs):.2f}" in std_rows[1]
    assert md.count("fedclip seed=") == 0  # the seeds are one column
    with pytest.raises(ConfigError, match="--seeds='0,x'"):
        _parse(["--seeds", "0,x"])


def test_a_kept_adam_state_follows_the_learning_rate_schedule():
    """PromptFL with Adam, a kept state and the cosine schedule: each round's optimiser trains at that round's
    rate, not at the rate of the round its state was saved in (load_state_dict brings the old lr back)."""
    from types import SimpleNamespace

    from fedclip_lightning.fit_plan import FitPlan
    from fedclip_lightning.optim import build_optimizer

    a = SimpleNamespace(optimizer="adam", lr=0.002, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    w = torch.nn.Parameter(torch.ones(3))
    first = build_optimizer([w], a, FitPlan(epochs=1, lr_factor=1.0))
    w.grad = torch.ones(3)
    first.step()
    later = build_optimizer([w], a, FitPlan(epochs=1, lr_factor=0.25, optimizer_state=first.state_dict()))
    assert later.param_groups[0]["lr"] == 0.002 * 0.25
    assert int(later.state[w]["step"]) == 1  # the moments and step went on
