"""Adding an algorithm is one file and one YAML: this test is that file.

It defines a server that averages with momentum (FedAvgM, Hsu et al. 2019:
the averaged client change is a pseudo-gradient, ``v = beta v + delta``,
``w = w - server_lr * v``) without touching the package, writes its YAML into
a folder of its own, and runs it end to end through the command line's own
``main`` (Hydra composition with ``hydra.searchpath``, the typed config, the
registry, the server loop, checkpoints, resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from conftest import PACS_MINI
from fedclip_lightning.algorithms import AdapterAlgorithm, register
from fedclip_lightning.cli import main
from fedclip_lightning.config import AlgorithmConfig
from helpers import read_summary


@dataclass
class ServerMomentumConfig(AlgorithmConfig):
    name: str = "test_server_momentum"
    server_lr: float = 1.0
    server_momentum: float = 0.9


@register
class ServerMomentum(AdapterAlgorithm):
    name = "test_server_momentum"
    config_class = ServerMomentumConfig

    @classmethod
    def check(cls, config, bad) -> None:
        if not 0 <= config.server_momentum < 1:
            bad("algorithm.server_momentum", config.server_momentum, "must be in [0, 1)",
                "e.g. algorithm.server_momentum=0.9")

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.velocity: dict[str, torch.Tensor] | None = None

    def aggregate(self, rnd, active, results) -> None:
        before = self.global_state
        super().aggregate(rnd, active, results)  # the clients' weighted mean
        delta = {k: before[k] - self.global_state[k] for k in before}
        v = delta if self.velocity is None else \
            {k: self.config.server_momentum * self.velocity[k] + delta[k] for k in delta}
        self.velocity = v
        self.global_state = {k: before[k] - self.config.server_lr * v[k] for k in before}

    def server_state(self) -> dict[str, Any]:
        return {**super().server_state(), "velocity": self.velocity}

    def load_server_state(self, state: dict[str, Any]) -> None:
        super().load_server_state(state)
        self.velocity = state.get("velocity")


YAML = """\
# FedAvgM: the server averages with momentum (defined in tests/test_new_algorithm.py).
name: test_server_momentum
loss: contrastive
lr: 1.0e-3
betas: [0.9, 0.98]
eps: 1.0e-6
weight_decay: 0.2
local_epochs: 1
optimizer_state: reset
server_lr: 1.0
server_momentum: 0.9
"""


def _cli(tmp_path, name: str, *more: str) -> dict:
    conf = tmp_path / "my_conf" / "algorithm"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "server_momentum.yaml").write_text(YAML)
    code = main(["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "logger=none",
                 f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", f"output_dir={tmp_path / 'out'}",
                 f"run_name={name}", f"features.dir={tmp_path / 'features'}", *more])
    assert code == 0
    return read_summary(tmp_path / "out" / name)


def _adapter(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "out" / name / "adapter_final.pt", weights_only=True)["state"]


def test_a_new_algorithm_runs_from_one_file_and_one_yaml(tmp_path):
    s = _cli(tmp_path, "mom", "algorithm=server_momentum")
    assert s["status"] == "finished" and s["algorithm"] == "test_server_momentum"
    assert s["config"]["algorithm"]["server_momentum"] == 0.9
    assert s["bytes_up_total"] > 0 and s["rounds_run"] == 3
    # Without momentum and with a server learning rate of 1 it is FedAvg over the adapter: FedCLIP.
    _cli(tmp_path, "plain", "algorithm=server_momentum", "algorithm.server_momentum=0")
    _cli(tmp_path, "fedclip", "algorithm=fedclip", "algorithm.lr=1e-3")
    plain, fedclip, mom = (_adapter(tmp_path, n) for n in ("plain", "fedclip", "mom"))
    for k in fedclip:
        torch.testing.assert_close(plain[k], fedclip[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(mom[k], fedclip[k], atol=1e-6) for k in fedclip)  # momentum changes it


def test_a_new_algorithms_server_state_is_checkpointed_and_resumed(tmp_path):
    _cli(tmp_path, "whole", "algorithm=server_momentum", "federation.rounds=4")
    _cli(tmp_path, "split", "algorithm=server_momentum", "federation.rounds=2")
    meta = torch.load(tmp_path / "out" / "split" / "checkpoints" / "round-000002" / "meta.pt", weights_only=True)
    assert meta["server"]["velocity"] is not None  # the algorithm's own server state travels in the checkpoint
    s = _cli(tmp_path, "split", "algorithm=server_momentum", "federation.rounds=4", "resume=auto")
    assert s["resumed_from"] == 2
    whole, split = _adapter(tmp_path, "whole"), _adapter(tmp_path, "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_a_new_algorithms_own_keys_are_checked(tmp_path, capsys):
    conf = tmp_path / "my_conf" / "algorithm"
    conf.mkdir(parents=True)
    (conf / "server_momentum.yaml").write_text(YAML)
    code = main([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "algorithm=server_momentum",
                 "algorithm.server_momentum=1.5", "--print-config"])
    assert code == 2
    assert "algorithm.server_momentum=1.5: must be in [0, 1)" in capsys.readouterr().err
