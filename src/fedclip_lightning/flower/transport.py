"""The server's transport to clients on Flower SuperNodes (``federation/transport.py`` has the interface).

``FlowerClients`` is what ``federation.orchestrator.run(cfg, remote=...)`` asks who the clients are: it greets
every SuperNode (``query.hello``), and from their replies makes the run's task (names, kinds, class
vocabulary, split sizes) and its data manifest (each node's data and weights digests), so the run's own
code does the rest: sampling, server optimisers, robust rules, selection, checkpoints, outputs, W&B.
``FlowerTransport`` then sends each round's train and evaluate messages through the Grid.

A client whose reply does not arrive within ``round_timeout`` (a SuperNode that died, or is too slow)
counts as dropped out of that round. A node whose data or weights differ from what it reported when the run
started, or that refuses a message, stops the run with one message that names it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch  # noqa: F401  (ArrayRecord's torch conversions look torch up in sys.modules)
from flwr.app import Message, MessageType
from flwr.common.constant import ErrorCode

from ..algorithms.base import ClientResult
from ..config import Config
from ..errors import ConfigError
from ..federation.evaluation import assemble_rows, table_rows, table_width
from ..training import SplitResult
from . import messages
from .node import Request, _key, check_overrides

# Keys the server keeps for itself (its output folder, its logger, its device): never sent to a node.
SERVER_ONLY = ("output_dir", "run_name", "resume", "logger", "progress", "note", "label", "fabric")


def node_overrides_of(overrides: list[str]) -> list[str]:
    """The run's overrides a node receives: its hyperparameters, not the server's own settings."""
    return [o for o in overrides if _key(o).split(".")[0] not in SERVER_ONLY]


def check_deployment(cfg: Config) -> None:
    """What a run across SuperNodes cannot do, said before anything starts."""
    fed, problems = cfg.federation, []
    if fed.attack.name != "none":
        problems.append(f"federation.attack.name={fed.attack.name!r}: simulated attacks are for simulation runs; in "
                        "a deployment the clients are real. Fix: federation.attack.name=none")
    if fed.unreliable.dropout > 0 or fed.unreliable.straggler_fraction > 0:
        problems.append("federation.unreliable.dropout / straggler_fraction simulate unreliable clients; in a "
                        "deployment a node that does not answer in time is counted as dropped out by itself. Fix: "
                        "federation.unreliable.dropout=0 federation.unreliable.straggler_fraction=0")
    if fed.privacy.mode != "none" and not fed.privacy.secure:
        problems.append("federation.privacy.secure=false: noise drawn from a stream seeded by the config is for "
                        "simulation only (anyone with the config can subtract it). Fix: federation.privacy.secure=true "
                        "(the noise from the operating system's entropy)")
    if cfg.data.partition.scheme != "domain":
        problems.append(f"data.partition.scheme={cfg.data.partition.scheme!r}: in a deployment each node is one "
                        "client holding its own data. Fix: data.partition.scheme=domain")
    if cfg.data.classes.count is not None:
        problems.append(f"data.classes.count={cfg.data.classes.count}: each node would draw its classes from its own "
                        "class folders, and the sites could disagree. Fix: name the classes with "
                        "data.classes.keep=[...]")
    if cfg.data.classes.split != "all":
        problems.append(f"data.classes.split={cfg.data.classes.split!r}: base-to-novel is scored in simulation runs "
                        "(each node would need the novel classes' images split as the server's run does). Fix: "
                        "data.classes.split=all")
    if cfg.fabric.devices not in (1, "1") or cfg.fabric.num_nodes != 1:
        problems.append("fabric.devices / fabric.num_nodes: the server of a deployment is one process (the clients "
                        "train on their nodes). Fix: fabric.devices=1 fabric.num_nodes=1")
    if problems:
        raise ConfigError(problems)


@dataclass
class NodeInfo:
    node_id: int
    client: str
    kind: str
    classes: list[str]
    sizes: list[int]
    data_digest: str
    weights: str


@dataclass
class FlowerClients:
    """The clients of a run on Flower SuperNodes, reached through ``grid`` (a live ``Grid`` in the
    ServerApp, or ``InProcessGrid`` in one process). ``overrides``: the run's overrides as given (the nodes
    get its hyperparameters); ``min_nodes``: wait for this many nodes (at most ``node_wait`` s);
    ``round_timeout``: seconds a round waits for replies."""

    grid: object
    overrides: list[str]
    min_nodes: int = 1
    round_timeout: float = 600.0
    node_wait: float = 300.0
    poll: float = 1.0
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    run_uid: str = ""

    def _request(self, kind: str, server_round: int = 0, classes=(), keep_from: int = 0,
                 state_round: int = 0) -> Request:
        return Request(node_overrides_of(self.overrides), self.run_uid or "hello", server_round, kind, list(classes),
                       keep_from, state_round)

    def send(self, msgs: list[Message], timeout: float) -> dict[str, Message]:
        """Replies by the message id they answer (a reply that does not arrive in ``timeout`` s is absent)."""
        if not msgs:
            return {}
        ids = list(self.grid.push_messages(msgs))
        want, got = set(ids), {}
        deadline = time.monotonic() + timeout
        while True:
            for r in self.grid.pull_messages(list(want - set(got))):
                got[r.metadata.reply_to_message_id] = r
            if set(got) >= want or time.monotonic() >= deadline:
                return {i: got[i] for i in ids if i in got}
            time.sleep(self.poll)

    def greet(self, node_ids: list[int], cfg: Config, timeout: float | None = None) -> dict[int, NodeInfo]:
        """The hellos of ``node_ids`` that answer within ``timeout`` (default: a round's)."""
        msgs = [Message(messages.content(self._request("client")), nid, messages.HELLO) for nid in node_ids]
        replies = self.send(msgs, self.round_timeout if timeout is None else timeout)
        out = {}
        for nid, m in zip(node_ids, msgs):
            r = replies.get(m.metadata.message_id)
            if r is None:
                continue  # it left before it answered: not part of the run
            if r.has_error():
                raise ConfigError(f"SuperNode {nid} refused the run: {_reason(r)}")
            h = r.content.config_records["hello"]
            name = str(h["client"])
            out[nid] = NodeInfo(nid, name, "unseen" if name in cfg.data.unseen else "client",
                                [str(c) for c in h["classes"]], [int(x) for x in h["sizes"]], str(h["data-digest"]),
                                str(h["weights"]))
        return out

    # -- what the run asks of its clients' source ---------------------------------------
    def describe(self, cfg: Config):
        """``(task, domains, manifest)`` of the run, from the nodes' replies."""
        check_overrides(node_overrides_of(self.overrides), "the run")
        check_deployment(cfg)
        # Every node that connects is greeted (its hello is made for a client; an unseen node's size is all its
        # images), until min-nodes have answered and every domain data.domains names has its node.
        wanted = set(cfg.data.domains or ()) | set(cfg.data.unseen)
        deadline = time.monotonic() + self.node_wait
        infos: dict[int, NodeInfo] = {}
        while True:
            new = sorted(set(self.grid.get_node_ids()) - set(infos))
            if new:
                infos.update(self.greet(new, cfg, max(1.0, min(self.round_timeout, deadline - time.monotonic()))))
            held = {i.client for i in infos.values()}
            if len(infos) >= self.min_nodes and wanted <= held:
                break
            if time.monotonic() > deadline:
                missing = sorted(wanted - held)
                raise ConfigError(f"{len(infos)} SuperNode(s) answered in {self.node_wait:g} s ({sorted(held) or 'none'})"
                                  + (f"; none holds {missing}, which data.domains/data.unseen name" if missing else
                                     f"; the run waits for min-nodes={self.min_nodes}")
                                  + ". Fix: start the SuperNodes (flower-supernode ... --superlink <address> "
                                  "--node-config 'client=...'), or lower min-nodes / name fewer domains.")
            time.sleep(self.poll)
        by_name: dict[str, list[NodeInfo]] = {}
        for info in infos.values():
            by_name.setdefault(info.client, []).append(info)
        twice = {n: [i.node_id for i in v] for n, v in by_name.items() if len(v) > 1}
        if twice:
            raise ConfigError(f"two SuperNodes say they hold the same client: {twice}. Fix: give each node its own "
                              "client name (--node-config client=...).")
        names = sorted(by_name)
        if cfg.data.domains is not None:  # the run takes these nodes, in this order; others serve other runs
            stray = [n for n in names if n not in cfg.data.domains]
            if stray:
                print(f"  SuperNode(s) holding {stray} are not among data.domains={cfg.data.domains}: not part of "
                      "this run.", flush=True)
            names = list(cfg.data.domains)
        self.nodes = {n: by_name[n][0] for n in names}
        if not any(i.kind == "client" for i in self.nodes.values()):
            raise ConfigError(f"every node ({names}) is in data.unseen: no client is left to train. Fix: leave at "
                              "least one out of data.unseen.")
        classes = sorted({c for i in self.nodes.values() for c in i.classes})
        clients = [SimpleNamespace(name=i.client, train=range(i.sizes[0]), val=range(i.sizes[1]), test=range(i.sizes[2]))
                   for i in self.nodes.values() if i.kind == "client"]
        unseen = {i.client: range(i.sizes[3]) for i in self.nodes.values() if i.kind == "unseen"}
        task = SimpleNamespace(classes=classes, clients=clients, unseen=unseen)
        manifest = {f"node {i.client}": [i.data_digest, i.weights, 0, i.kind] for i in self.nodes.values()}
        return task, SimpleNamespace(root="on the SuperNodes", skipped=[]), manifest

    def transport(self, ctx, algorithm, run_uid: str, outputs) -> "FlowerTransport":
        from ..model.features import weights_fingerprint

        self.run_uid = run_uid
        mine = weights_fingerprint(ctx.backbone.clip)
        other = [n for n, i in self.nodes.items() if i.weights != mine]
        if other:
            raise ConfigError(f"SuperNode(s) {other} hold other backbone weights than the server "
                              f"({ctx.cfg.backbone.name}, pretrained={ctx.cfg.backbone.pretrained}): their "
                              "features would not be this run's. Fix: give every node the same weights (--node-config "
                              "weights=...) as the server.")
        return FlowerTransport(self, ctx, algorithm, outputs)


def _reason(reply: Message) -> str:
    """A node's error reply as one line: the message of the exception it raised, else Flower's reason."""
    reason = reply.error.reason or ""
    if ":<'" in reason:
        reason = reason.split(":<'", 1)[1].rsplit("'>", 1)[0]
    return f"{reason} (error code {reply.error.code})"


class FlowerTransport:
    """Clients on SuperNodes: one message per participant and request, replies within ``round_timeout``."""

    def __init__(self, clients: FlowerClients, ctx, algorithm, outputs):
        self.clients, self.ctx, self.algorithm, self.outputs = clients, ctx, algorithm, outputs
        self.classes = list(ctx.task.classes)
        self.greeted = {i.node_id for i in clients.nodes.values()}  # a node that is not the run's: greeted once
        self.last_fit: dict[str, int] = {}  # each client's last round whose fit the server took: its state's round

    def _node_ids(self) -> dict[str, int]:
        """Each client's node id now: a SuperNode that restarted comes back with a new id, and is greeted."""
        c = self.clients
        new = sorted(set(c.grid.get_node_ids()) - self.greeted)
        self.greeted.update(new)
        if new:
            for info in c.greet(new, self.ctx.cfg).values():
                old = c.nodes.get(info.client)
                if old is None:
                    continue  # not part of this run
                self._check_identity(info.client, info.data_digest, info.weights)
                old.node_id = info.node_id
        return {n: i.node_id for n, i in c.nodes.items()}

    def _check_identity(self, name: str, data_digest: str, weights: str) -> None:
        info = self.clients.nodes[name]
        if data_digest != info.data_digest:
            raise ConfigError(f"SuperNode {name!r}: its data changed since the run started (data digest "
                              f"{info.data_digest[:12]} -> {data_digest[:12]}): its results would not be this run's. "
                              "Fix: restore the node's images, or start a new run (resume=never).")
        if weights != info.weights:
            raise ConfigError(f"SuperNode {name!r}: its backbone weights changed since the run started: its "
                              "results would not be this run's. Fix: give it the run's weights again.")

    def _keep_from(self) -> int:
        from ..checkpoint import complete_checkpoints

        rounds = [int(p.name.split("-")[1]) for p in complete_checkpoints(self.outputs.run_dir)]
        return min(rounds, default=0)

    def _exchange(self, server_round: int, parts, message_type: str, state: dict,
                  evaluate_with: str = "") -> dict[int, Message]:
        """Send one message per participant in ``parts``; their replies by participant index (an error reply
        from a node stops the run naming it; a missing one is absent)."""
        ids = self._node_ids()
        keep_from = self._keep_from()
        msgs = []
        for p in parts:
            req = self.clients._request(p.kind, server_round, self.classes, keep_from, self.last_fit.get(p.name, 0))
            m = Message(messages.content(req, state, evaluate_with), ids[p.name], message_type,
                        group_id=str(server_round), ttl=self.clients.round_timeout + 60)
            msgs.append(m)
        replies = self.clients.send(msgs, self.clients.round_timeout)
        out = {}
        for p, m in zip(parts, msgs):
            r = replies.get(m.metadata.message_id)
            if r is None:
                continue
            if r.has_error():
                if r.error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE):  # the node is gone
                    continue
                raise ConfigError(f"round {server_round}: SuperNode {p.name!r} failed: {_reason(r)}")
            node = r.content.config_records["node"]
            self._check_identity(p.name, str(node["data-digest"]), str(node["weights"]))
            out[p.index] = r
        return out

    # -- the transport interface ---------------------------------------------------------
    def fit(self, server_round: int, active: list[int]) -> dict[int, ClientResult]:
        parts = [self.ctx.parts[i] for i in active]
        results = {}
        for i, r in self._exchange(server_round, parts, MessageType.TRAIN, self.algorithm.broadcast()).items():
            t = r.content.metric_records["train"]
            arrays = r.content.array_records
            row = arrays["update"].to_torch_state_dict()["row"] if "update" in arrays else None
            results[i] = ClientResult(SplitResult(float(t["accuracy"]), float(t["loss"]), int(t["n"])),
                                      None if row is None else (lambda row=row: row), int(t["num-examples"]))
            self.last_fit[self.ctx.parts[i].name] = server_round
        return results

    def arrived(self, active: list[int], results: dict[int, ClientResult]) -> list[int]:
        return [i for i in active if i in results]

    def _evaluate(self, server_round: int, algorithm, train: dict, evaluate_with: str = ""):
        parts = self.ctx.parts
        replies = self._exchange(server_round, parts, MessageType.EVALUATE, algorithm.broadcast(), evaluate_with)
        results = {}
        for i, r in replies.items():
            slots = r.content.array_records["slots"].to_torch_state_dict()
            results[i] = {k: SplitResult.from_row(v) for k, v in slots.items()}
        lost = [p.name for p in parts if p.index not in results]
        if lost:
            self.outputs.warn(f"round {server_round}: no evaluation from {', '.join(lost)} (no reply in "
                              f"{self.clients.round_timeout:g} s): left out of this round's means.")
        return assemble_rows(self.ctx.fabric, server_round, parts, table_rows(parts, results, train, algorithm),
                             table_width(parts, algorithm))

    def evaluate(self, server_round: int, train: dict[int, SplitResult]):
        """Personalisation and evaluation run on the nodes (the evaluate message); the table is assembled here."""
        return self._evaluate(server_round, self.algorithm, train)

    def evaluate_with(self, algorithm):
        return self._evaluate(0, algorithm, {}, evaluate_with=algorithm.name)

    def client_states(self) -> dict[str, dict]:
        """The clients' states stay on their nodes, one file per round (``node.NodeStore``); the checkpoint keeps
        which round's each client continues from."""
        return {name: {"flower_state_round": r} for name, r in self.last_fit.items()}

    def load_client_states(self, states: dict[str, dict]) -> None:
        self.last_fit = {name: int(st["flower_state_round"]) for name, st in states.items()
                         if "flower_state_round" in st}
