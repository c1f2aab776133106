"""A real deployment on loopback: a SuperLink, SuperNodes (each its own process, its own FLWR_HOME and
data folder) and ``flwr run`` of the package's app, as the README's "Across institutions" steps run it.
Slow by Flower's design (nodes poll every 3 s, each message runs in a new process): each run is as short
as its assertion allows, and the nodes run their tasks through the package's warm worker
(``flower/worker.py``: forked from a process that imported torch once, about 5 s an exchange here instead of
12). Flower's own process per message, what the README's steps use, runs the same ClientApp code; those
steps were run by hand (docs/flower.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.version_info < (3, 11):
    pytest.skip("Flower 1.42 needs Python >= 3.11 (the [flower] extra)", allow_module_level=True)

from fedclip_lightning.flower import APP_DIR  # noqa: E402

# One worker under pytest-xdist: the two runs share the module's SuperLink and sites.
pytestmark = pytest.mark.xdist_group("flower_loopback")

BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Processes of one loopback deployment under ``root``; all stopped by ``close``."""

    def __init__(self, root: Path):
        self.root, self.procs, self.env = root, {}, dict(os.environ)
        self.env.update({"PATH": f"{BIN}:{self.env['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
                         "FLWR_DISABLE_UPDATE_CHECK": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
        for var in ("FEDCLIP_RUN_DIR", "SLURM_JOB_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            self.env.pop(var, None)
        self.port = free_port()

    def start(self, name: str, args: list[str], **env) -> subprocess.Popen:
        if name in self.procs:  # a second `flwr run`: the first one's log is kept aside
            (self.root / f"{name}.log").rename(self.root / f"{name}-{len(self.procs)}.log")
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen(args, cwd=self.root, env={**self.env, "FLWR_HOME": str(home), **env}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {text!r} in its log:\n{self.log(name)[-3000:]}")
            time.sleep(0.3)

    def superlink(self, *extra: str) -> None:
        self.start("superlink", ["flower-superlink", "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(self.port), *extra])
        self.wait_for("superlink", "Uvicorn running")

    def supernode(self, name: str, client: str, data_root: Path, *extra: str, warm: bool = False) -> subprocess.Popen:
        """A SuperNode; ``warm``: in process isolation, its ClientApp tasks run by the package's warm worker."""
        cfg = f'client="{client}" data-root="{data_root}" cache-dir="{self.root / "cache" / name}"'
        port = free_port()
        isolation = ["--isolation", "process"] if warm else []
        node = self.start(name, ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(port),
                                 "--node-config", cfg, *isolation, *extra])
        if warm:
            self.start(f"{name}-worker", [sys.executable, "-m", "fedclip_lightning.flower", "worker", "--insecure",
                                          "--runtime-api-address", f"127.0.0.1:{port}"])
        return node

    def kill(self, name: str) -> None:
        """SIGKILL a node and its worker: the site is gone."""
        for n in (name, f"{name}-worker"):
            if n in self.procs:
                os.killpg(self.procs[n].pid, signal.SIGKILL)

    def connection(self, body: str) -> Path:
        cli = self.root / "cli"
        cli.mkdir(exist_ok=True)
        (cli / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                         f'address = "127.0.0.1:{self.port}"\n{body}\n')
        return cli

    def flwr_run(self, overrides: str, **config) -> subprocess.Popen:
        """``flwr run`` of the package's app (its log is ``run.log``, a new one per run)."""
        cli = self.connection("insecure = true")
        run_config = " ".join([f'overrides="{overrides}"', *(f"{k}={v}" for k, v in config.items())])
        return self.start("run", ["flwr", "run", str(APP_DIR), "here", "--stream", "--run-config", run_config],
                          FLWR_HOME=str(cli))

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def same(x, y) -> bool:
    import torch

    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    return torch.equal(x, y) if torch.is_tensor(x) else x == y


def finish(cluster: Cluster, timeout: float = 240) -> str:
    p = cluster.procs["run"]
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"flwr run did not finish in {timeout} s:\n{cluster.log('run')[-4000:]}") from None
    return cluster.log("run")


RUN = ("experiment=pacs_mini_debug data.unseen=[] logger=csv progress=false federation.zero_shot_baseline=false")


@pytest.fixture(scope="module")
def sites(tmp_path_factory, pacs_mini):
    """One SuperLink and three sites (each its own SuperNode, FLWR_HOME, cache and warm worker), shared by the
    two runs below: the first takes two of them (the third is left out, as a node that serves other runs), the
    second all three, and kills one mid-run."""
    c = Cluster(tmp_path_factory.mktemp("sites"))
    c.superlink("--insecure")
    for name, client in (("node1", "art_painting"), ("node2", "cartoon"), ("node3", "photo")):
        c.supernode(name, client, pacs_mini, "--insecure", warm=True)
    yield c
    c.close()


def test_fedclip_over_a_superlink_and_supernodes_equals_the_fabric_run(sites, pacs_mini, tmp_path, monkeypatch):
    """Two rounds over HTTP on loopback give the Fabric run's metrics.csv and final adapter, bitwise."""
    import torch

    from fedclip_lightning.configure import load_config
    from fedclip_lightning.federation.orchestrator import run

    out = tmp_path / "out"
    overrides = f"{RUN} data.domains=[art_painting,cartoon] federation.rounds=2 federation.eval_interval=2"
    sites.flwr_run(f"{overrides} output_dir={out} run_name=flower", **{"min-nodes": 3, "round-timeout": 120})
    monkeypatch.setenv("FEDCLIP_CACHE_DIR", str(tmp_path / "cache"))
    run(load_config([*overrides.split(), f"data.root={pacs_mini}", f"output_dir={out}", "run_name=fabric"]))
    log = finish(sites)
    summary = json.loads((out / "flower" / "summary.json").read_text())
    assert summary["status"] == "finished", log[-3000:]
    assert (out / "flower" / "metrics.csv").read_text() == (out / "fabric" / "metrics.csv").read_text()
    a, b = (torch.load(out / d / "adapter_final.pt") for d in ("fabric", "flower"))
    assert same(a, b)
    assert "mean (clients)" in log  # the end-of-run table, in the ServerApp's log
    assert "SuperNode(s) holding ['photo'] are not among data.domains" in log


def test_a_supernode_killed_mid_run_is_a_dropout_and_the_run_finishes(sites, tmp_path):
    out = tmp_path / "out"
    sites.flwr_run(f"{RUN} data.domains=[art_painting,cartoon,photo] federation.rounds=1 output_dir={out} "
                   "run_name=flower", **{"min-nodes": 3, "round-timeout": 15})
    sites.wait_for("run", "clients: art_painting", timeout=120)  # every node answered its hello
    sites.kill("node3")
    log = finish(sites)
    summary = json.loads((out / "flower" / "summary.json").read_text())
    assert summary["status"] == "finished", log[-3000:]
    assert summary["server"]["clients/dropped_total"] == 1
    assert "no reply from client(s) photo: counted as dropped out" in log
    rows = (out / "flower" / "metrics.csv").read_text()
    assert "1,art_painting,train" in rows and "1,cartoon,train" in rows and "photo" not in rows


def test_an_unregistered_supernode_is_refused_when_authentication_is_on(cluster, tmp_path):
    from fedclip_lightning.flower.keys import node_key, tls_certificates

    certs = tls_certificates(tmp_path / "certs", hosts=["127.0.0.1"])
    cluster.superlink("--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert), "--ssl-keyfile",
                      str(certs.key), "--enable-supernode-auth")
    cli = cluster.connection(f'root-certificates = "{certs.ca}"')
    good, rogue = node_key(tmp_path / "keys" / "good"), node_key(tmp_path / "keys" / "rogue")
    reg = subprocess.run(["flwr", "supernode", "register", f"{good}.pub", "here"], cwd=tmp_path,
                         env={**cluster.env, "FLWR_HOME": str(cli)}, capture_output=True, text=True, timeout=60)
    assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
    tls = ["--root-certificates", str(certs.ca), "--max-retries", "1"]
    cluster.supernode("good", "art_painting", tmp_path, *tls, "--auth-supernode-private-key", str(good))
    cluster.wait_for("good", "SuperNode ID")  # a registered node connects
    p = cluster.supernode("rogue", "cartoon", tmp_path, *tls, "--auth-supernode-private-key", str(rogue))
    assert p.wait(60) != 0
    assert "Failed to activate SuperNode" in cluster.log("rogue")
    assert "No SuperNode found with the given public key" in cluster.log("superlink")
