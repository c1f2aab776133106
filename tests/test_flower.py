"""Clients on Flower SuperNodes, in one process: the real ClientApp answers every message through Flower's
own serialisation (``flower.grid.InProcessGrid``), each node building its client from the run's overrides and
its own ``--node-config``. The run must equal a one-process Fabric run bitwise; a node must refuse what a
server may not set; a silent node is a dropout; a changed node stops the run. The loopback tests (a real
SuperLink and SuperNodes) are in test_flower_loopback.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

if sys.version_info < (3, 11):
    pytest.skip("Flower 1.42 needs Python >= 3.11 (the [flower] extra)", allow_module_level=True)

from fedclip_lightning.configure import load_config  # noqa: E402
from fedclip_lightning.errors import ConfigError  # noqa: E402
from fedclip_lightning.federation.orchestrator import run  # noqa: E402
from fedclip_lightning.flower.client_app import app as client_app  # noqa: E402
from fedclip_lightning.flower.grid import InProcessGrid  # noqa: E402
from fedclip_lightning.flower.node import Node, Request  # noqa: E402
from fedclip_lightning.flower.transport import FlowerClients, check_deployment  # noqa: E402

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def base(alg: str, *extra: str) -> list[str]:
    return ["experiment=pacs_mini_debug", f"algorithm={alg}", "progress=false", "plots=false", "logger=none",
            "federation.rounds=2", *extra]


def nodes(root: Path, tmp: Path, domains=DOMAINS) -> dict[int, dict]:
    return {i + 1: {"client": d, "data-root": str(root), "cache-dir": str(tmp / "node-cache"),
                    "state-dir": str(tmp / f"state-{d}")} for i, d in enumerate(domains)}


def flower_run(overrides: list[str], grid, out: Path, **kw) -> dict:
    clients = FlowerClients(grid, overrides, min_nodes=len(list(grid.get_node_ids())), poll=0.0, **kw)
    return run(load_config([*overrides, f"output_dir={out}", "run_name=flower"]), remote=clients)


def fabric_run(overrides: list[str], root: Path, out: Path) -> dict:
    return run(load_config([*overrides, f"data.root={root}", f"output_dir={out}", "run_name=fabric"]))


def states(run_dir: Path) -> dict[str, dict]:
    return {f.name: torch.load(f, map_location="cpu") for f in sorted(run_dir.glob("*.pt"))}


def same(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    return torch.equal(x, y) if torch.is_tensor(x) else x == y


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCLIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("alg,extra", [
    ("fedclip", ()),
    ("fedclip", ("algorithm.optimizer_state=keep", "federation.client_fraction=0.5", "federation.rounds=3")),
    ("fedavg", ()),
    ("fedprox", ()),
    ("promptfl", ()),
    ("local", ("federation.client_fraction=0.5", "federation.rounds=3")),
    ("fedclip_ft", ()),
], ids=["fedclip", "fedclip-keep-half", "fedavg", "fedprox", "promptfl", "local-half", "fedclip_ft"])
def test_a_run_over_flower_equals_the_fabric_run_bitwise(alg, extra, pacs_mini, cache):
    """metrics.csv, every saved model and the zero-shot baseline: the same bits through the Grid as in one
    process (kept Adam state and a local client's own adapter live on the nodes' disks between rounds)."""
    overrides = base(alg, *extra)
    a = fabric_run(overrides, pacs_mini, cache / "out")
    grid = InProcessGrid(client_app, nodes(pacs_mini, cache))
    b = flower_run(overrides, grid, cache / "out")
    fa, fb = cache / "out" / "fabric", cache / "out" / "flower"
    assert (fa / "metrics.csv").read_text() == (fb / "metrics.csv").read_text()
    sa, sb = states(fa), states(fb)
    assert sa.keys() == sb.keys() and sa and all(same(sa[k], sb[k]) for k in sa)
    assert a["final"] == b["final"] and a["zero_shot"] == b["zero_shot"]
    assert b["clients"] == a["clients"] and b["unseen"] == a["unseen"] == ["sketch"]
    assert b["num_samples"] == a["num_samples"]
    # The server saw no image: the requests it sent carry hyperparameters and the server's state only.
    sent = [m.content.config_records["run"]["overrides"] for m in grid.sent]
    assert all(not any(o.startswith("data.root") for o in s) for s in sent)
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {"query.hello", "train", "evaluate"}


def test_a_node_refuses_settings_that_name_its_files(pacs_mini, cache):
    node = Node({"client": "photo", "data-root": str(pacs_mini), "state-dir": str(cache / "s")})
    for bad in ("data.root=/etc", "backbone.pretrained=/home/x/evil.pt", "features.dir=/tmp/x", "output_dir=/",
                "data={root: /etc}", "data.split.official_dir=/srv"):
        with pytest.raises(ConfigError) as e:
            node.fit(Request(base("fedclip", bad), "uid", 1, classes=["dog"]), {})
        assert bad in str(e.value) and "--node-config" in str(e.value)
    # A pretrained tag is a name, not a file: the node may take it (and fails only for want of the weights).
    node.config(base("fedclip"))
    # A node asked to continue from a state it no longer has (its state-dir wiped) says so, not starts afresh.
    with pytest.raises(ConfigError, match="its kept state of round 5 is not in"):
        node.fit(Request(base("fedclip"), "uid", 6, classes=["dog", "elephant", "giraffe", "guitar", "horse", "house",
                                                           "person"], state_round=5), {})
    # The run refuses such an override before it sends anything.
    grid = InProcessGrid(client_app, nodes(pacs_mini, cache))
    with pytest.raises(ConfigError, match="names a file or folder on the nodes"):
        flower_run(base("fedclip", f"data.root={pacs_mini}"), grid, cache / "out")
    assert grid.sent == []
    with pytest.raises(ConfigError, match="unknown key"):
        Node({"client": "photo", "data_root": "/x"})
    with pytest.raises(ConfigError, match="no client"):
        Node({"data-root": "/x"})


def test_a_deployment_refuses_what_only_a_simulation_can_do():
    for override, what in [("federation.attack.name=sign_flip", "simulated attacks"),
                           ("federation.unreliable.dropout=0.2", "unreliable clients"),
                           ("federation.privacy.mode=server", "seeded by the config is for simulation only"),
                           ("data.partition.scheme=iid", "each node is one client")]:
        extra = ["federation.attack.fraction=0.25"] if "attack" in override else []
        with pytest.raises(ConfigError, match=what):
            check_deployment(load_config([*base("fedclip", override, *extra), "data.root=/x"]))
    check_deployment(load_config(base("fedclip", "federation.privacy.mode=server", "federation.privacy.secure=true",
                                      "data.root=/x")))


class Silent:
    """A ClientApp whose node ``name`` stops answering from round ``after`` on (as a killed SuperNode)."""

    def __init__(self, grid_ref: list, node_id: int, after: int):
        self.grid_ref, self.node_id, self.after = grid_ref, node_id, after

    def __call__(self, msg, context):
        r = msg.content.config_records["run"]["round"]
        if msg.metadata.dst_node_id == self.node_id and r >= self.after:
            self.grid_ref[0].dead.add(self.node_id)
            return None
        return client_app(msg, context)


def test_a_node_that_stops_answering_is_a_dropout_and_the_run_goes_on(pacs_mini, cache, capsys, monkeypatch):
    """...counted in summary.json, the log and W&B (a deployment's run logs to W&B like any other)."""
    from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run

    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                 "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true",
                 "WANDB_DIR": str(cache / "wandb"), "WANDB_CONFIG_DIR": str(cache / "wandb-config")}.items():
        monkeypatch.setenv(k, v)
    ref: list = []
    grid = InProcessGrid(Silent(ref, node_id=2, after=2), nodes(pacs_mini, cache))
    ref.append(grid)
    summary = flower_run(base("fedclip", "federation.rounds=3", "logger=wandb"), grid, cache / "out",
                         round_timeout=0.0)
    (wandb_run,) = find_offline_runs(cache / "out" / "flower" / "wandb")
    logged = read_offline_run(wandb_run)
    assert [r["clients/dropped_total"] for r in logged["history"] if "clients/dropped_total" in r][-1] == 2
    assert [r.get("client/cartoon/val_acc") is not None for r in logged["history"]
            if "client/art_painting/val_acc" in r] == [True, False, False]
    assert summary["status"] == "finished" and summary["rounds_run"] == 3
    assert summary["server"]["clients/dropped_total"] == 2  # cartoon, rounds 2 and 3
    rows = (cache / "out" / "flower" / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("1,cartoon,train") for r in rows)
    assert not any(r.startswith(("2,cartoon", "3,cartoon")) for r in rows)
    out = capsys.readouterr().out
    assert "no reply from client(s) cartoon: counted as dropped out" in out
    assert "no evaluation from cartoon" in out


def test_a_node_whose_data_changed_stops_the_run_naming_it(pacs_mini, cache, tmp_path):
    import shutil

    root = tmp_path / "site"  # a site of its own: one domain, copied so that it can change
    shutil.copytree(pacs_mini / "photo", root / "photo")
    cfgs = nodes(pacs_mini, cache, ["art_painting", "cartoon"])
    cfgs[3] = {"client": "photo", "data-root": str(root), "cache-dir": str(cache / "node-cache")}

    def app(msg, context):
        if msg.metadata.message_type == "train" and msg.content.config_records["run"]["round"] == 2 and \
                context.node_config["client"] == "photo":
            victim = sorted((root / "photo").rglob("*.jpg"))[0]
            victim.write_bytes(victim.read_bytes() + b"\0")
        return client_app(msg, context)

    grid = InProcessGrid(app, cfgs)
    overrides = base("fedclip", "data.domains=[art_painting,cartoon,photo]", "data.unseen=[]", "data.check_images=false",
                     "federation.checkpoint_min_seconds=0")
    with pytest.raises(ConfigError, match="SuperNode 'photo': its data changed since the run started"):
        flower_run(overrides, grid, cache / "out")
    summary = json.loads((cache / "out" / "flower" / "summary.json").read_text())
    assert summary["status"] == "failed" and "photo" in summary["error"]
    # Resumed from its round-1 checkpoint, the run is refused too, naming the node.
    with pytest.raises(ConfigError, match="node photo: its images changed"):
        flower_run([*overrides, "resume=auto"], InProcessGrid(client_app, cfgs), cache / "out")


def test_the_server_resumes_from_its_checkpoint_with_the_nodes_states(pacs_mini, cache):
    """The ServerApp dies in round 3 of 4; run again with resume=auto, it continues from its checkpoint
    and the nodes from their states of that round: the same numbers as a run that never stopped."""
    # Half the clients a round: a client the resumed run does not draw must not read a state its node wrote
    # in a round that the crash undid.
    overrides = base("fedclip", "algorithm.optimizer_state=keep", "federation.rounds=4", "federation.client_fraction=0.5",
                     "federation.checkpoint_min_seconds=0", "federation.zero_shot_baseline=false")
    fabric_run(overrides, pacs_mini, cache / "whole")  # the same numbers as over the Grid (tested above)

    def dies(msg, context):
        r = msg.content.config_records["run"]["round"]
        if msg.metadata.message_type == "train" and r == 3 and ready.setdefault(r, []).append(1) is None and \
                len(ready[r]) == 2:
            raise KeyboardInterrupt  # the server dies mid-round: one node already trained round 3
        return client_app(msg, context)

    cfgs = nodes(pacs_mini, cache / "b")
    ready: dict = {}
    with pytest.raises(KeyboardInterrupt):
        flower_run(overrides, _Raising(dies, cfgs), cache / "cut")
    again = flower_run([*overrides, "resume=auto"], InProcessGrid(client_app, cfgs), cache / "cut")
    assert again["resumed_from"] == 2
    assert (cache / "whole" / "fabric" / "metrics.csv").read_text() == \
        (cache / "cut" / "flower" / "metrics.csv").read_text()
    assert same(states(cache / "whole" / "fabric"), states(cache / "cut" / "flower"))


class _Raising(InProcessGrid):
    """A grid whose ClientApp may raise past the grid (a crash of the process that runs it)."""

    def _execute(self, msg):
        return self._client_app(msg, self._contexts[msg.metadata.dst_node_id])


def test_local_dp_in_a_deployment_noises_each_update_on_its_node(pacs_mini, cache, capsys):
    """privacy.mode=client: each node clips its update and adds noise from its own entropy; what reaches the
    server is already private (far from the clipped update), and the run says where the noise comes from."""
    replies = []

    def app(msg, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train":
            w = msg.content.array_records["state"].to_torch_state_dict()
            replies.append((torch.cat([v.flatten() for v in w.values()]),
                            reply.content.array_records["update"].to_torch_state_dict()["row"]))
        return reply

    overrides = base("fedclip", "federation.rounds=1", "federation.privacy.mode=client", "federation.privacy.secure=true",
                     "federation.privacy.clip=0.01", "federation.privacy.noise_multiplier=1.0",
                     "federation.zero_shot_baseline=false")
    summary = flower_run(overrides, InProcessGrid(app, nodes(pacs_mini, cache)), cache / "out")
    assert summary["status"] == "finished" and summary["server"]["privacy/epsilon"] > 0
    assert len(replies) == 3
    for w, row in replies:
        # The clipped update has norm <= 0.01; the noise (std 0.01 in each of 8,320 coordinates) about 0.9.
        assert 0.5 < float((row - w).norm()) < 2.0
    assert "each node clips its update and adds noise from its operating system's entropy" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="federation.privacy.secure=true"):
        check_deployment(load_config([*overrides[:-4], "federation.privacy.secure=false", "data.root=/x"]))


def test_a_supernode_that_restarts_with_a_new_id_continues_from_its_disk(pacs_mini, cache):
    """A SuperNode without authentication comes back from a restart with a new node id: the server greets it,
    knows it by its client name, and its kept Adam state comes from its disk: the Fabric run's numbers."""
    overrides = base("fedclip", "algorithm.optimizer_state=keep", "federation.rounds=3",
                     "federation.zero_shot_baseline=false")
    fabric_run(overrides, pacs_mini, cache / "out")
    ref: list = []

    def app(msg, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type == "evaluate" and msg.metadata.dst_node_id == 2:
            grid = ref[0]
            grid._contexts[22] = grid._contexts.pop(2)  # the restart: the same node, a new id
        return reply

    grid = InProcessGrid(app, nodes(pacs_mini, cache))
    ref.append(grid)
    summary = flower_run(overrides, grid, cache / "out")
    assert summary["server"].get("clients/dropped_total", 0) == 0
    assert sum(m.metadata.message_type == "query.hello" and m.metadata.dst_node_id == 22 for m in grid.sent) == 1
    assert (cache / "out" / "fabric" / "metrics.csv").read_text() == (cache / "out" / "flower" / "metrics.csv").read_text()
    assert same(states(cache / "out" / "fabric"), states(cache / "out" / "flower"))
