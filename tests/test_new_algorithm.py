"""Adding an algorithm is one file and one YAML: this test is that file.

An algorithm is what a client trains and what travels (how the server combines
what arrives is ``federation.*``: see tests/test_new_server_optimizer.py). The
one defined here changes both: FedCLIP with partially trainable adapters
(FedPT, Sidahmed et al. 2021, "Efficient and Private Federated Learning with
Partially Trainable Networks", arXiv 2110.03450). The adapter's first layer
``fc1`` is a fixed random projection, drawn from a seed that every client
shares, so it never trains and never travels; the clients train ``fc2`` only
and send it: half of FedCLIP's parameters and bytes. ``algorithm.frozen=none``
trains the whole adapter: FedCLIP, bitwise.

It registers without touching the package, writes its YAML into a folder of
its own, and runs end to end through the command line's own ``main`` (Hydra
composition with ``hydra.searchpath``, the typed config and its check, the
registry, the server loop, checkpoints, resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from conftest import PACS_MINI
from fedclip_lightning.algorithms import CLIPAlgorithm, register
from fedclip_lightning.algorithms.base import AdapterConfig, check_adapter_hidden
from fedclip_lightning.cli import main
from fedclip_lightning.config import Config
from fedclip_lightning.data.partition import stable_seed
from helpers import read_summary

FROZEN = ("fc1", "none")


@dataclass
class FedPTConfig(AdapterConfig):
    name: str = "test_fedpt"
    frozen: str = "fc1"  # the adapter layer that stays at its seeded random init: fc1, or none (FedCLIP)


@register
class FedPT(CLIPAlgorithm):
    name = "test_fedpt"
    config_class = FedPTConfig

    @classmethod
    def check(cls, config, bad) -> None:
        check_adapter_hidden(config, bad)
        if config.frozen not in FROZEN:
            bad("algorithm.frozen", config.frozen, "must be fc1 or none", "e.g. algorithm.frozen=fc1")

    @classmethod
    def what_trains(cls, config) -> str:
        return "the adapter's fc2" if config.frozen == "fc1" else "the attention adapter"

    def make_head(self) -> torch.nn.Module:
        """FedCLIP's adapter; with ``frozen=fc1`` its fc1 becomes a constant (a buffer outside the state dict),
        drawn as ``nn.Linear`` draws it from a generator seeded by the run's seed alone: the same in every
        client, every process and every resumed run. What trains is then what travels: fc2."""
        head = super().make_head()
        if self.config.frozen == "fc1":
            fc1 = head.fc1
            g = torch.Generator().manual_seed(stable_seed(self.cfg.seed, "fedpt-fc1"))
            bound = 1 / math.sqrt(fc1.in_features)
            weight = torch.empty_like(fc1.weight).uniform_(-bound, bound, generator=g)
            bias = torch.empty_like(fc1.bias).uniform_(-bound, bound, generator=g)
            del fc1.weight, fc1.bias
            fc1.register_buffer("weight", weight, persistent=False)
            fc1.register_buffer("bias", bias, persistent=False)
        return head


# Only what differs from FedPTConfig (every registered algorithm class is the schema algorithm/<name>_schema).
YAML = """\
defaults:
  - test_fedpt_schema  # FedPTConfig, stored by the package for every registered algorithm
  - _self_
lr: 1.0e-3
"""


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """One feature cache for the module's runs: the images are encoded once."""
    return tmp_path_factory.mktemp("features")


def _cli(tmp_path, features, name: str, *more: str) -> dict:
    conf = tmp_path / "my_conf" / "algorithm"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "fedpt.yaml").write_text(YAML)
    code = main(["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "logger=none",
                 f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", f"output_dir={tmp_path / 'out'}",
                 f"run_name={name}", f"features.dir={features}", *more])
    assert code == 0
    return read_summary(tmp_path / "out" / name)


def _adapter(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "out" / name / "adapter_final.pt", weights_only=True)["state"]


def test_a_new_algorithm_runs_from_one_file_and_one_yaml(tmp_path, features):
    s = _cli(tmp_path, features, "fedpt", "algorithm=fedpt", "federation.rounds=2")
    assert s["status"] == "finished" and s["algorithm"] == "test_fedpt" and s["rounds_run"] == 2
    assert s["config"]["algorithm"]["frozen"] == "fc1" and s["config"]["algorithm"]["lr"] == 1e-3
    # With nothing frozen it is FedCLIP, bitwise: the same machinery, the same numbers.
    plain = _cli(tmp_path, features, "plain", "algorithm=fedpt", "algorithm.frozen=none", "federation.rounds=2")
    fedclip = _cli(tmp_path, features, "fedclip", "algorithm=fedclip", "algorithm.lr=1e-3", "federation.rounds=2")
    fedpt_state, plain_state, fedclip_state = (_adapter(tmp_path, n) for n in ("fedpt", "plain", "fedclip"))
    assert plain_state.keys() == fedclip_state.keys()
    assert all(torch.equal(plain_state[k], fedclip_state[k]) for k in fedclip_state)
    assert plain["final"] == fedclip["final"]
    # Frozen fc1: fc2 alone trains and travels, half of FedCLIP's parameters and bytes (d^2 + d of 2 (d^2 + d)).
    assert list(fedpt_state) == ["fc2.weight", "fc2.bias"]
    d = fedpt_state["fc2.bias"].numel()
    assert s["trainable_params"] == d * d + d and 2 * s["trainable_params"] == fedclip["trainable_params"]
    assert 2 * s["bytes_per_client_per_round"] == fedclip["bytes_per_client_per_round"]
    assert s["bytes_up_total"] == 2 * 3 * s["bytes_per_client_per_round"]  # 2 rounds, 3 clients
    assert not torch.allclose(fedpt_state["fc2.weight"], fedclip_state["fc2.weight"], atol=1e-6)


def test_the_frozen_layer_is_the_same_constant_in_every_client():
    cfg = Config()
    algo = FedPT.__new__(FedPT)
    algo.cfg, algo.config = cfg, FedPTConfig()
    algo.ctx = SimpleNamespace(backbone=SimpleNamespace(embed_dim=8))
    a, b = algo.make_head(), algo.make_head()  # two clients' heads
    assert [n for n, _ in a.named_parameters()] == ["fc2.weight", "fc2.bias"]  # what trains
    assert list(a.state_dict()) == ["fc2.weight", "fc2.bias"]  # what travels and is saved
    assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc1.bias, b.fc1.bias)
    x = torch.randn(4, 8)
    (a(x) * torch.randn(4, 8)).sum().backward()
    assert a.fc2.weight.grad is not None and not a.fc1.weight.requires_grad


def test_a_new_algorithms_state_is_checkpointed_and_resumed(tmp_path, features):
    opts = ("algorithm=fedpt", "algorithm.optimizer_state=keep")  # the clients' Adam moments persist too
    _cli(tmp_path, features, "whole", *opts, "federation.rounds=4")
    _cli(tmp_path, features, "split", *opts, "federation.rounds=2")
    meta = torch.load(tmp_path / "out" / "split" / "checkpoints" / "round-000002" / "meta.pt", weights_only=True)
    assert list(meta["server"]["global_state"]) == ["fc2.weight", "fc2.bias"]  # the server keeps what travels
    s = _cli(tmp_path, features, "split", *opts, "federation.rounds=4", "resume=auto")
    assert s["resumed_from"] == 2
    whole, split = _adapter(tmp_path, "whole"), _adapter(tmp_path, "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    assert read_summary(tmp_path / "out" / "whole")["final"] == s["final"]


def test_a_new_algorithms_own_keys_are_checked(tmp_path, capsys):
    conf = tmp_path / "my_conf" / "algorithm"
    conf.mkdir(parents=True)
    (conf / "fedpt.yaml").write_text(YAML)
    code = main([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "algorithm=fedpt",
                 "algorithm.frozen=fc3", "--print-config"])
    assert code == 2
    assert "algorithm.frozen='fc3': must be fc1 or none" in capsys.readouterr().err
