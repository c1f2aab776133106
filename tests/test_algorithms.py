"""Every algorithm through the same orchestrator, evaluation and outputs."""

from __future__ import annotations

import pytest
import torch

from conftest import PACS, PACS_MINI
from fedclip_lightning.configure import load_config
from fedclip_lightning.errors import ConfigError
from fedclip_lightning.federation.orchestrator import run
from fedclip_lightning.model.backbone import load_backbone

TINY_PARAMS = 1_716_097  # every parameter of fedclip-tiny-vit, logit_scale included
ADAPTER_PARAMS = 2 * (64 * 64 + 64)


def _run(tmp_path, name, *more, rounds=2):
    cfg = load_config(["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "plots=false", "logger=none",
                       f"output_dir={tmp_path / 'outputs'}", f"run_name={name}", f"federation.rounds={rounds}",
                       f"features.dir={tmp_path / 'features'}", *more])
    return run(cfg), tmp_path / "outputs" / name


def _state(path):
    return torch.load(path, weights_only=True)["state"]


def test_fedprox_with_mu_zero_is_fedavg(tmp_path, capsys):
    # One round is enough: the proximal term pulls from a client's second local step on.
    avg, avg_dir = _run(tmp_path, "avg", "algorithm=fedavg", rounds=1)
    prox, prox_dir = _run(tmp_path, "prox", "algorithm=fedprox", "algorithm.mu=0", rounds=1)
    assert "FedProx without its proximal term is FedAvg" in capsys.readouterr().out
    a, b = _state(avg_dir / "model_final.pt"), _state(prox_dir / "model_final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert avg["final"]["client_test_acc"] == prox["final"]["client_test_acc"]
    # and a positive mu changes the result
    _, mu_dir = _run(tmp_path, "prox_mu", "algorithm=fedprox", "algorithm.mu=10", rounds=1)
    c = _state(mu_dir / "model_final.pt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_fedavg_trains_the_backbone_and_counts_every_tensor(tmp_path):
    s, run_dir = _run(tmp_path, "avg", "algorithm=fedavg")
    assert s["trainable_params"] == s["communicated_params"] == TINY_PARAMS
    assert s["bytes_per_client_per_round"] == 4 * TINY_PARAMS
    assert s["bytes_up_total"] == s["bytes_down_total"] == 2 * 3 * 4 * TINY_PARAMS
    assert s["features"] == {"cache": False}  # the encoder trains: no cached features
    state = _state(run_dir / "model_final.pt")
    frozen = load_backbone(load_config(["backbone=tiny_vit"]).backbone).clip.model  # the same seeded random init
    assert sum(v.numel() for v in state.values()) == TINY_PARAMS
    assert "logit_scale" in state and any(k.startswith("visual.") for k in state)
    assert any(k.startswith("transformer.") for k in state)  # the text tower too
    changed = [k for k, v in frozen.state_dict().items() if k in state and not torch.equal(v, state[k])]
    assert changed, "fine-tuning changed no backbone tensor"
    # the shared frozen backbone itself is untouched
    assert all(not p.requires_grad for p in frozen.parameters())


def test_fedavg_image_tower_only(tmp_path):
    s, run_dir = _run(tmp_path, "img", "algorithm=fedavg", "algorithm.trainable=image", rounds=1)
    visual = sum(p.numel() for p in load_backbone(load_config(["backbone=tiny_vit"]).backbone).clip.model.visual.parameters())
    assert s["trainable_params"] == visual
    assert all(k.startswith("visual.") for k in _state(run_dir / "model_final.pt"))


def test_fedavg_over_the_adapter_equals_fedclip_machinery(tmp_path):
    """`what is trained` and `how it is aggregated` are separate knobs."""
    clip, _ = _run(tmp_path, "clip", "algorithm=fedclip")
    avg, _ = _run(tmp_path, "avg_adapter", "algorithm=fedavg", "algorithm.trainable=adapter",
                  "algorithm.prompt=null")
    assert avg["trainable_params"] == ADAPTER_PARAMS
    assert avg["final"]["client_test_acc"] == clip["final"]["client_test_acc"]
    assert avg["features"]["cache"] is True


def test_local_sends_nothing(tmp_path):
    s, run_dir = _run(tmp_path, "local", "algorithm=local")
    assert s["bytes_up_total"] == s["bytes_down_total"] == 0 and s["communicated_params"] == 0
    assert s["trainable_params"] == ADAPTER_PARAMS
    states = _state(run_dir / "adapters_final.pt")
    per_client = {c: {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith(c + "/")}
                  for c in s["clients"]}
    a, b = per_client["art_painting"], per_client["cartoon"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # each trained its own
    assert set(s["final"]["unseen_acc"]) == {"sketch"}


def test_personalised_variant_reports_global_and_personal(tmp_path):
    s, run_dir = _run(tmp_path, "ft", "algorithm=fedclip_ft", "algorithm.lr=1e-2", "algorithm.personal_epochs=3")
    fin = s["final"]
    assert set(fin["client_test_acc_global"]) == set(fin["client_test_acc"]) == set(s["clients"])
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert any(",test_global," in r for r in rows) and any(",val_global," in r for r in rows)
    plain, _ = _run(tmp_path, "plain", "algorithm=fedclip", "algorithm.lr=1e-2")
    # the global adapter of fedclip_ft is FedCLIP's: its global accuracies are FedCLIP's
    assert fin["client_test_acc_global"] == plain["final"]["client_test_acc"]


def test_client_sampling_counts_only_participants(tmp_path):
    s, _ = _run(tmp_path, "half", "federation.client_fraction=0.34", rounds=3)
    per = ADAPTER_PARAMS * 4
    assert s["bytes_up_total"] == 3 * 1 * per  # one of three clients trains each round
    assert s["bytes_down_total"] == 3 * 3 * per  # every client receives the new global adapter
    assert set(s["final"]["client_test_acc"]) == set(s["clients"])  # evaluation covers everyone


def test_dirichlet_partition_runs_end_to_end(tmp_path):
    s, _ = _run(tmp_path, "dir", f"data.root={PACS}", "data.max_per_domain=40", "data.partition.scheme=dirichlet",
                "data.partition.num_clients=3", "data.partition.min_size=8", "data.check_images=false", rounds=1)
    assert s["clients"] == ["client00", "client01", "client02"]
    assert sum(v["train"] + v["val"] + v["test"] for k, v in s["num_samples"].items() if k in s["clients"]) == 120


@pytest.mark.parametrize("override,needle", [
    ("algorithm.trainable=all", "it belongs to algorithm=fedavg|fedprox"),
    ("algorithm.mu=0.1", "algorithm=fedclip has no key 'mu'"),
    ("algorithm=fedprox algorithm.mu=-1", "algorithm.mu=-1"),
    ("federation.client_fraction=0", "federation.client_fraction=0"),
])
def test_algorithm_option_errors(override, needle):
    with pytest.raises(ConfigError, match="Fix:") as err:
        load_config(override.split())
    assert needle in str(err.value)


def test_feature_cache_refused_for_fine_tuning():
    with pytest.raises(ConfigError, match="features.cache"):
        load_config(["algorithm=fedavg", "features.cache=on"])
