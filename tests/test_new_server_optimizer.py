"""Adding a server optimiser is one plugin module: this test writes it, outside the package.

The plugin (``PLUGIN`` below, also in docs/server-side.md, "Adding a server
optimiser") is server SGD with Nesterov momentum: FedAvgM (Hsu et al. 2019)
with the look-ahead of Sutskever et al. 2013, as ``torch.optim.SGD(nesterov=True)``
does it on the pseudo-gradient ``Delta``:

    b <- beta1 b + Delta   (b starts at Delta)
    w <- w + eta (Delta + beta1 b)

It is written to a folder of the test's own, named in ``FEDCLIP_PLUGINS``, and
selected with ``federation.server_optimizer.name=nesterov``: the config check, the
server update, checkpoints and resume find it with no change to the package.
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from lightning.fabric import Fabric

from conftest import PACS_MINI
from helpers import federation_config
from fedclip_lightning.aggregation import server_opt
from fedclip_lightning.aggregation.update import ServerUpdate
from fedclip_lightning.configure import load_config
from fedclip_lightning.errors import ConfigError
from fedclip_lightning.federation.orchestrator import run

PLUGIN = '''\
"""Server SGD with Nesterov momentum: federation.server_optimizer.name=nesterov."""
from fedclip_lightning.aggregation.server_opt import ServerOptimizer, register_server_optimizer


@register_server_optimizer("nesterov")
class Nesterov(ServerOptimizer):
    default_lr = 1.0                        # eta where federation.server_optimizer.lr is null

    def __init__(self, lr, beta1, beta2, tau):  # federation.server_optimizer.{lr,beta1,beta2,tau}
        super().__init__(lr, beta1, beta2, tau)
        self.buf = None                     # the momentum buffer: server state

    def step(self, w, delta):               # flat tensors: the global weights, the clients' aggregated change
        self.buf = delta.clone() if self.buf is None else self.beta1 * self.buf + delta
        return w + self.lr * (delta + self.beta1 * self.buf)

    def state(self):                        # into every checkpoint
        return {"buf": self.buf}

    def load(self, state):                  # and back on resume
        self.buf = (state or {}).get("buf")
'''

BUILT_INS = "none, momentum, adam, yogi, adagrad"
_count = itertools.count()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin module on ``sys.path`` and in ``FEDCLIP_PLUGINS``, not yet imported; afterwards the registry
    is as it was (the next test starts without it)."""
    name = f"my_server_opt_{next(_count)}"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("FEDCLIP_PLUGINS", name)
    monkeypatch.setattr(server_opt, "SERVER_OPTIMIZERS", dict(server_opt.SERVER_OPTIMIZERS))
    yield name
    sys.modules.pop(name, None)


def _nesterov_by_hand(w, deltas, lr, b1):
    """The weights after each step, computed here."""
    out, buf = [], None
    for d in deltas:
        buf = d if buf is None else b1 * buf + d
        w = w + lr * (d + b1 * buf)
        out.append(w)
    return out


def test_the_plugin_is_loaded_by_name_and_an_unknown_name_lists_the_registered_ones(plugin, monkeypatch):
    monkeypatch.delenv("FEDCLIP_PLUGINS")  # without the plugin the name is unknown
    with pytest.raises(ConfigError, match=rf"federation.server_optimizer.name='nesterov': unknown value\. "
                                          rf"Fix: use one of {BUILT_INS}\b"):
        load_config(["federation.server_optimizer.name=nesterov"])
    assert plugin not in sys.modules
    monkeypatch.setenv("FEDCLIP_PLUGINS", plugin)
    cfg = load_config(["federation.server_optimizer.name=nesterov"])  # the check imports the plugin first
    assert cfg.federation.server_optimizer.name == "nesterov" and plugin in sys.modules
    assert server_opt.server_optimizer_names() == [*BUILT_INS.split(", "), "nesterov"]
    with pytest.raises(ConfigError, match=rf"federation.server_optimizer.name='nesterof': unknown value\. "
                                          rf"Fix: use one of {BUILT_INS}, nesterov\b"):
        load_config(["federation.server_optimizer.name=nesterof"])
    with pytest.raises(ConfigError, match=rf"unknown server optimiser\. Fix: use one of {BUILT_INS}, nesterov "):
        server_opt.get_server_optimizer("nesterof")
    monkeypatch.setenv("FEDCLIP_PLUGINS", "no_such_plugin_module")
    with pytest.raises(ConfigError, match="FEDCLIP_PLUGINS='no_such_plugin_module': cannot import"):
        load_config(["federation.server_optimizer.name=nesterov_typo"])


def test_the_plugins_first_rounds_by_hand(plugin):
    """As tests/test_server_side.py checks the built-ins: the pseudo-gradient of each round from the rows,
    the step by hand; composed with a robust rule (the median) as any built-in is."""
    fabric = Fabric(accelerator="cpu", devices=1)
    w0 = torch.tensor([1.0, -2.0, 0.5])
    clients = [torch.tensor([[1.2, -2.0, 0.1], [0.6, -1.0, 0.5], [0.8, -1.7, 0.9]]),
               torch.tensor([[0.9, -1.5, 0.4], [1.1, -2.5, 0.2], [1.0, -2.0, 0.3]])]
    lr, b1 = 0.5, 0.8
    for aggregator, agg in (("mean", lambda r: r.mean(0)), ("median", lambda r: r.median(0).values)):
        su = ServerUpdate(federation_config("server_optimizer.name=nesterov", f"server_optimizer.lr={lr}",
                                            f"server_optimizer.beta1={b1}", f"aggregator.name={aggregator}"), 0, 3, 2)
        assert type(su.optimizer).__module__ == plugin and not su.plain
        w, buf = w0.clone(), None
        for server_round, rows in enumerate(clients, start=1):
            got = su(fabric, server_round, [0, 1, 2], lambda i: rows[i], [1 / 3] * 3, lambda: w, 3)
            delta = agg(rows) - w
            buf = delta if buf is None else b1 * buf + delta
            want = w + lr * (delta + b1 * buf)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{aggregator} round {server_round}")
            w = got
        torch.testing.assert_close(su.state()["optimizer"]["buf"], buf, rtol=1e-6, atol=1e-7)
        # The state round-trips: a server that loads it takes the same next step, bitwise.
        again = ServerUpdate(federation_config("server_optimizer.name=nesterov", f"server_optimizer.lr={lr}",
                                               f"server_optimizer.beta1={b1}", f"aggregator.name={aggregator}"), 0, 3, 2)
        again.load(su.state())
        rows = clients[0]
        assert torch.equal(su(fabric, 3, [0, 1, 2], lambda i: rows[i], [1 / 3] * 3, lambda: w, 3),
                           again(fabric, 3, [0, 1, 2], lambda i: rows[i], [1 / 3] * 3, lambda: w, 3))
    assert ServerUpdate(federation_config("server_optimizer.name=nesterov"), 0, 3, 2).optimizer.lr == 1.0  # default_lr


def _config(tmp_path, name, *more):
    return load_config(["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "plots=false", "logger=none",
                        f"output_dir={tmp_path / 'out'}", f"run_name={name}", f"features.dir={tmp_path / 'f'}",
                        "algorithm.lr=1e-3", "federation.server_optimizer.name=nesterov", "federation.server_optimizer.lr=0.5",
                        "federation.server_optimizer.beta1=0.8", *more])


def _flat(run_dir) -> torch.Tensor:
    st = torch.load(run_dir / "adapter_final.pt", weights_only=True)["state"]
    return torch.cat([v.reshape(-1) for v in st.values()])


def test_the_plugin_runs_end_to_end_by_hand_and_resumes_bitwise(plugin, tmp_path, monkeypatch):
    whole_cfg = _config(tmp_path, "whole", "federation.rounds=4")  # loads the plugin through FEDCLIP_PLUGINS
    cls = server_opt.get_server_optimizer("nesterov")
    assert cls.__module__ == plugin
    calls = []  # (w, delta, new w) of every step the server takes
    step = cls.step

    def recording(self, w, delta):
        out = step(self, w, delta)
        calls.append((w.clone(), delta.clone(), out.clone()))
        return out

    monkeypatch.setattr(cls, "step", recording)
    s = run(whole_cfg)
    assert s["status"] == "finished" and s["rounds_run"] == 4
    assert s["config"]["federation"]["server_optimizer"]["name"] == "nesterov"
    # Each round's step by hand from the round's pseudo-gradient; each round starts from the last one's model.
    assert len(calls) == 4
    want = _nesterov_by_hand(calls[0][0], [d for _, d, _ in calls], lr=0.5, b1=0.8)
    for server_round, ((w, delta, got), expect) in enumerate(zip(calls, want), start=1):
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7, msg=f"round {server_round}")
        if server_round > 1:
            assert torch.equal(w, calls[server_round - 2][2])
        assert float(delta.abs().max()) > 0
    assert torch.equal(_flat(tmp_path / "out" / "whole"), calls[-1][2])  # the saved model is the last step's

    # Two rounds, then two more on resume: the plugin's state travels in the checkpoint, the numbers are bitwise.
    run(_config(tmp_path, "split", "federation.rounds=2"))
    meta = torch.load(tmp_path / "out" / "split" / "checkpoints" / "round-000002" / "meta.pt", weights_only=True)
    assert torch.equal(meta["server"]["server_update"]["optimizer"]["buf"],
                       0.8 * calls[0][1] + calls[1][1])  # b after two rounds, by hand (b1 * Delta_1 + Delta_2)
    resumed = run(_config(tmp_path, "split", "federation.rounds=4", "resume=auto"))
    assert resumed["resumed_from"] == 2
    assert torch.equal(_flat(tmp_path / "out" / "whole"), _flat(tmp_path / "out" / "split"))
    assert resumed["final"] == s["final"]
