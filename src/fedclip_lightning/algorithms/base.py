"""The interface every federated algorithm implements, and the adapter algorithms' common part.

An algorithm says, in one class:

* **its config** (``config_class``: ``AlgorithmConfig`` plus its own keys) and
  what it checks of it (``check``), and whether the image encoder stays frozen
  (``encoder_frozen``: then features are cached);
* **how its clients are made** (``setup``, once per process, then
  ``make_client`` per participant);
* **what each client starts a round from** (``start_state``) and its local fit
  (``fit_client``; the adapter algorithms say what the fit is run with in a
  ``FitPlan``, ``fit_plan``), whose ``ClientResult`` carries **what travels**
  (a flat row; ``communicates = False`` sends nothing);
* **how the server turns the clients' results into its new state**
  (``aggregate``) and the state it keeps (``state_dict``/``load_state_dict``,
  written into checkpoints), and the per-client state that persists between
  rounds (``client_states``/``load_client_states``);
* **what runs before evaluation** (``personalize``) and which model a client or
  an unseen domain is evaluated with (``evaluate_client``/``evaluate_unseen``).

The server (``federation.server.Server``) calls these in the same order for
every algorithm and never asks an algorithm's name.

Where the clients live in other processes than the server (Flower SuperNodes,
``fedclip_lightning.flower``), one algorithm class serves both sides, each
using its own half. The **server** calls ``setup`` (its initial state and
server update), ``aggregate``, ``state_dict``/``load_state_dict``,
``metrics``, ``final_states``/``selected_state`` and ``broadcast`` (what each
message carries to a client: the global model; ``local`` adds every client's
own adapter for unseen domains). A **client** calls ``setup`` (text features),
``make_client``, ``receive`` (the message's state), ``fit_client``,
``personalize``, ``evaluate_mine`` and ``client_states``/``load_client_states``
(kept on the node's disk between messages).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..client import AdapterClient, CLIPClient
from ..config import LOSSES, OPTIMIZER_STATES, AlgorithmConfig, Config
from ..data.partition import stable_seed
from ..data.pipeline import FeatureBatches, FeatureDataset
from ..errors import Problems
from ..fit_plan import FitPlan
from ..training import SplitResult, evaluate, local_fit, park
from ..aggregation.update import ServerUpdate
from ..aggregation.mean import aggregation_weights, flatten, state_bytes, unflatten
from ..aggregation.rows import gather_rows
from ..model.adapter import AttentionAdapter
from ..optim import AdamStateArena, build_optimizer

State = dict[str, torch.Tensor]


@dataclass
class Participant:
    """A participating client (trains and evaluates) or an unseen domain (evaluated only)."""

    index: int  # position in the fixed order: clients first, then unseen domains
    name: str
    kind: str  # "client" or "unseen"
    rank: int


@dataclass
class RunContext:
    """What one process knows of the run: config, Fabric, the frozen backbone, the task and its data."""

    cfg: Config
    fabric: Any
    backbone: Any
    task: Any
    prompts: list[str]  # class names as they go into prompts
    parts: list[Participant]
    datasets: dict[tuple[int, str], Any] = field(default_factory=dict)  # (participant index, split) -> data set
    loader: Callable[..., Any] | None = None  # loader(dataset, batch_size, shuffle_seed=None)
    eval_loaders: dict[tuple[int, str], Any] = field(default_factory=dict)
    data_digest: str = ""  # the images and split this run trains on (checkpoint.data_manifest)
    # The clients live in other processes than this one's server (Flower SuperNodes): every reply arrives
    # through the transport, and this process holds no client (``mine`` is empty).
    remote_clients: bool = False

    @property
    def mine(self) -> list[Participant]:
        return [p for p in self.parts if p.rank == self.fabric.global_rank]

    @property
    def my_clients(self) -> list[Participant]:
        return [p for p in self.mine if p.kind == "client"]

    @property
    def num_clients(self) -> int:
        return len(self.task.clients)

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def local_plan(self, p: Participant, server_round: int, epochs: int) -> tuple[int, float]:
        """``(local epochs, share of the local steps done)`` of client ``p`` in round ``server_round``: heterogeneous
        epochs (``federation.unreliable.local_epochs_range``) and stragglers, seeded by (round, client) alone."""
        fed = self.cfg.federation
        if fed.unreliable.local_epochs_range is None and fed.unreliable.straggler_fraction == 0:
            return epochs, 1.0
        rng = random.Random(stable_seed(self.cfg.seed, "local-plan", server_round, p.name))
        if fed.unreliable.local_epochs_range is not None:
            epochs = rng.randint(*fed.unreliable.local_epochs_range)
        return epochs, (fed.unreliable.straggler_work if rng.random() < fed.unreliable.straggler_fraction else 1.0)

    def train_loader(self, p: Participant, tag: str, server_round: int):
        """Client ``p``'s training split, shuffled by (seed, tag, round, client) alone."""
        return self.loader(self.datasets[(p.index, "train")], self.cfg.data.batch_size,
                           shuffle_seed=(self.cfg.seed, tag, server_round, p.name))

    def train_batches(self, p: Participant, tag: str, server_round: int) -> FeatureBatches:
        """``train_loader``'s batches of a cached-feature split, without a DataLoader (side by side)."""
        return FeatureBatches(self.datasets[(p.index, "train")], self.cfg.data.batch_size,
                              (self.cfg.seed, tag, server_round, p.name))

    def evaluate(self, client: CLIPClient, p: Participant, split: str) -> SplitResult:
        stage = "validation" if split == "val" else "test"
        return evaluate(self.fabric, client, self.eval_loaders[(p.index, split)], stage)

    def prepare_eval_loaders(self) -> None:
        d = self.cfg.data
        self.eval_loaders = {k: self.loader(ds, d.eval_batch_size) for k, ds in self.datasets.items() if k[1] != "train"}


@dataclass
class ClientResult:
    """One client's reply to a round: its training accuracy/loss, what it sends (``update()``: a flat row) and
    how many training examples it holds (its weight under ``federation.aggregation=samples``: the server
    reads it from the reply, not from a copy of the task of its own)."""

    train: SplitResult
    update: Callable[[], torch.Tensor] | None = None
    num_examples: int = 0


def client_sizes(fabric, num_clients: int, active: list[int], results: dict[int, ClientResult]) -> tuple[int, ...]:
    """The training examples of each active client, from the replies (``results``: this process's share); the
    same tuple on every process."""
    n = gather_rows(fabric, {i: torch.tensor([float(r.num_examples)]) for i, r in results.items()}, num_clients, 1,
                    torch.float64)
    return tuple(int(n[i, 0]) for i in active)


class Algorithm:
    """Base of every algorithm; see the module docstring. Subclasses set ``name`` and register."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = AlgorithmConfig
    # Rounds run at all (zero-shot: evaluated once, at round 0).
    trains: ClassVar[bool] = True
    # Something travels to the server each round (local training: nothing).
    communicates: ClassVar[bool] = True
    # Saved models are <state_file>_selected.pt / <state_file>_final.pt.
    state_file: ClassVar[str] = "adapter"

    def __init__(self, cfg: Config):
        self.cfg, self.config = cfg, cfg.algorithm
        self.ctx: RunContext | None = None
        self.template: State = {}
        self.global_state: State | None = None

    # -- config ---------------------------------------------------------------
    @classmethod
    def encoder_frozen(cls, config: AlgorithmConfig) -> bool:
        return True

    @classmethod
    def what_trains(cls, config: AlgorithmConfig) -> str:
        return "the attention adapter"

    @classmethod
    def check(cls, config: AlgorithmConfig, bad: Callable[[str, Any, str, str], None]) -> None:
        """Problems with this algorithm's own keys: ``bad(key, value, why, fix)``."""

    # -- set up -----------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def make_client(self, p: Participant) -> CLIPClient:
        raise NotImplementedError

    def warnings(self) -> list[str]:
        """Said once at the start of the run (rank 0)."""
        return []

    def client_training(self) -> str:
        """How this process trains its clients (summary.json): one at a time (``fit_client`` each), or side by
        side."""
        return "one at a time"

    def metrics(self, rounds_run: int) -> dict[str, float]:
        """Server-side figures logged with each evaluated round and kept in summary.json (privacy spent...)."""
        return {}

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.template.values())

    @property
    def bytes_per_copy(self) -> int:
        return state_bytes(self.template)

    # -- a round --------------------------------------------------------------------
    def start_state(self, p: Participant) -> State | None:
        """What client ``p`` starts its local fit from."""
        return self.global_state

    def fit_client(self, client: CLIPClient, p: Participant, server_round: int) -> ClientResult:
        raise NotImplementedError

    def fit_many(self, clients: dict[int, CLIPClient], parts: list[Participant],
                 server_round: int) -> dict[int, ClientResult]:
        """The local fits of ``parts`` (this process's active clients of the round): ``fit_client`` of each,
        one after another, each client's state off the accelerator after its turn. An algorithm may train
        them side by side instead (``CLIPAlgorithm``: batched products)."""
        replies = {}
        for p in parts:
            replies[p.index] = self.fit_client(clients[p.index], p, server_round)
            park(clients[p.index])
        return replies

    def aggregate(self, server_round: int, active: list[int], results: dict[int, ClientResult]) -> None:
        """Turn the clients' results into the server's new state (every rank computes the same)."""

    def personalize(self, server_round: int, clients: dict[int, CLIPClient]) -> None:
        """Runs on evaluated rounds, after aggregation and before evaluation."""

    def evaluate_client(self, client: CLIPClient, p: Participant) -> dict[str, SplitResult]:
        """Result slots (``val``, ``test``, and any extra such as ``val_global``) of client ``p``."""
        raise NotImplementedError

    def evaluate_unseen(self, client: CLIPClient, p: Participant) -> SplitResult:
        raise NotImplementedError

    def evaluate_mine(self, clients: dict[int, CLIPClient], parts: list[Participant]) -> dict[int, dict[str, SplitResult]]:
        """Every result slot of this rank's participants: ``evaluate_client`` / ``evaluate_unseen`` each."""
        return {p.index: (dict(self.evaluate_client(clients[p.index], p)) if p.kind == "client"
                          else {"test": self.evaluate_unseen(clients[p.index], p)}) for p in parts}

    def final_states(self) -> dict[str, State]:
        """The models saved at the end: file name -> state dict."""
        return {} if self.global_state is None else {f"{self.state_file}_final.pt": self.global_state}

    def selected_state(self) -> State | None:
        """The model saved as ``<state_file>_selected.pt`` when a round becomes the selected one."""
        return self.global_state

    # -- persistent state (checkpoints) ----------------------------------------------------
    # The server's side (``state_dict``: the global model, the server optimiser's and DP's state) and the
    # clients' side (``client_states``: what each client keeps between rounds, by client name, held wherever
    # the clients live) are separate: a checkpoint is the server's state plus every client's.
    def state_dict(self) -> dict[str, Any]:
        return {"global_state": None if self.global_state is None else
                {k: v.cpu() for k, v in self.global_state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g = state.get("global_state")
        self.global_state = None if g is None else {k: v.clone() for k, v in g.items()}

    def client_states(self) -> dict[str, dict[str, Any]]:
        """This rank's clients' state that persists between rounds, by client name."""
        return {}

    # -- what the server sends its clients ------------------------------------------------
    # Where clients live in other processes than the server (a Flower SuperNode), each message carries what
    # a client needs of the server's state for its fit or its evaluation: by default the global model.
    def broadcast(self) -> State:
        return {} if self.global_state is None else {f"global/{k}": v for k, v in self.global_state.items()}

    def receive(self, state: State) -> None:
        """A client's side of ``broadcast``: the server's state as its message carried it."""
        g = {k[len("global/"):]: v for k, v in state.items() if k.startswith("global/")}
        if g:
            self.global_state = g

    def load_client_states(self, states: dict[str, dict[str, Any]]) -> None:
        pass


@dataclass
class AdapterConfig(AlgorithmConfig):
    """The keys of the algorithms that train FedCLIP's attention adapter (fedclip, fedclip_ft, local)."""

    name: str = "fedclip"
    # The adapter's hidden width (null: the feature width d, the paper's adapter, 525,312 parameters for
    # ViT-B-32); smaller values make fc1 a bottleneck: 2 d h + h + d parameters (the size ablation).
    adapter_hidden: int | None = None


def check_adapter_hidden(config: AdapterConfig, bad) -> None:
    h = config.adapter_hidden
    if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h < 1):
        bad("algorithm.adapter_hidden", h, "must be a whole number >= 1 (or null: the feature width)",
            "e.g. algorithm.adapter_hidden=128")


class CLIPAlgorithm(Algorithm):
    """The base of every built-in algorithm: a trainable part on one shared CLIP backbone (FedCLIP's attention
    adapter by default; a prompt, a probe, the whole model, or nothing for zero-shot, as ``make_head`` and the
    subclass say), a fresh copy of it per client, prompt features computed once, Adam moments in one block per
    process, and the server's update as ``federation.*`` configures it (by default the clients' weighted mean,
    streamed)."""

    def prompt(self) -> str:
        return self.cfg.data.prompt

    def make_head(self) -> torch.nn.Module | None:
        """The module that trains on the frozen features (None: nothing trains, zero-shot CLIP).
        FedCLIP's attention adapter, of width ``algorithm.adapter_hidden`` where the algorithm has it."""
        return AttentionAdapter(self.ctx.backbone.embed_dim, getattr(self.config, "adapter_hidden", None))

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        backbone = ctx.backbone
        self.text = backbone.text_features(ctx.prompts, self.prompt())
        torch.manual_seed(stable_seed(self.cfg.seed, "adapter-init"))
        head = self.make_head()
        if head is not None:
            self.template = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
            self.global_state = {k: v.clone() for k, v in self.template.items()}
        self.trains_head = head is not None
        self._setup_adam(ctx)
        self._setup_server(ctx)
        self._setup_side_by_side(head)

    # -- another class vocabulary (base-to-novel) ---------------------------------------------------
    # Whether the trained part scores any class by its prompt (an adapter, a shared context); False where it
    # holds a weight per training class (a linear probe): it cannot score classes it did not train on.
    scores_any_class: ClassVar[bool] = True

    @contextmanager
    def classes_of(self, ctx: RunContext):
        """Evaluate on ``ctx`` (another task: other classes, their prompts, their data sets) with the models as
        trained: inside, the class features and the clients made are those of ``ctx``'s classes."""
        saved = self.ctx, self.text
        self.ctx = ctx
        self.text = ctx.backbone.text_features(ctx.prompts, self.prompt())
        try:
            yield
        finally:
            self.ctx, self.text = saved

    # -- clients side by side ----------------------------------------------------------------------
    def _setup_side_by_side(self, head) -> None:
        """Whether this process trains and evaluates its clients side by side (``federation.client_batching``):
        ``self.batched``, the adapter's row layout where the clients train side by side (else None, and
        ``self.one_at_a_time`` says why), and ``self.side_by_side_eval`` (evaluation, with ``self.layout``)."""
        from ..algorithms.registry import uses_feature_cache
        from ..batched import ADAPTER_KEYS, AdapterLayout, RowAdam

        mode = self.cfg.federation.client_batching
        eval_why = why = None
        if mode == "off":
            eval_why = "federation.client_batching=off"
        elif head is not None and (type(head) is not AttentionAdapter or tuple(self.template) != ADAPTER_KEYS):
            eval_why = (f"algorithm={self.name} trains {self.what_trains(self.config)}, not the attention adapter's "
                        "four tensors")
        elif not uses_feature_cache(self.cfg):
            eval_why = "the encoder runs in every step (no cached features)"
        if eval_why is None and head is not None:
            if getattr(self.config, "optimizer", "adam") != "adam":
                why = f"algorithm.optimizer={self.config.optimizer} (side by side is Adam's)"
            elif not type(self).side_by_side and any(
                    getattr(type(self), m) is not getattr(CLIPAlgorithm, m)
                    for m in ("fit_client", "make_client", "upload", "start_state", "fit_many")):
                why = f"algorithm={self.name} fits its clients its own way"
        why = eval_why or why
        self.side_by_side_eval = eval_why is None
        self.layout = AdapterLayout.of(self.template) if head is not None and eval_why is None else None
        self.one_at_a_time = why if head is not None else None
        self.batched = self.layout if why is None else None
        if self.batched is not None:
            a = self.config
            self.row_adam = RowAdam(a.betas, a.eps, a.weight_decay)
        if mode == "on" and why is not None:
            from ..errors import ConfigError

            raise ConfigError(f"federation.client_batching=on: this run's clients cannot train side by side: {why}. "
                              "Fix: federation.client_batching=auto (side by side where it applies) or off.")

    # An algorithm whose ``fit_client``/``make_client``/``upload``/``start_state`` differ from these says
    # here that side by side still computes what they do (its differences are in ``fit_many`` overrides).
    side_by_side: ClassVar[bool] = False

    def warnings(self) -> list[str]:
        out = self.server_update.warnings() if self.communicates else []
        if self.cfg.federation.client_batching == "auto" and self.one_at_a_time and self.trains and \
                len(self.ctx.my_clients) > 1:
            out.append(f"clients train one at a time, not side by side: {self.one_at_a_time}")
        return out

    def client_training(self) -> str:
        if self.batched is not None:
            return "side by side"
        return f"one at a time ({self.one_at_a_time})" if self.one_at_a_time else "one at a time"

    def fit_many(self, clients: dict[int, CLIPClient], parts: list[Participant],
                 server_round: int) -> dict[int, ClientResult]:
        """The round's local fits: side by side where ``federation.client_batching`` allows it (the adapter
        rows of a chunk of clients in batched products, ``batched.fit_side_by_side``), else one at a time."""
        if not self.fits_side_by_side(parts):
            return super().fit_many(clients, parts, server_round)
        replies = {}
        for chunk in self._chunks(parts):
            jobs = []
            for p in chunk:
                loader = self.ctx.train_batches(p, "train", server_round)
                plan = self.fit_plan(p, server_round, loader)
                jobs.append((p, loader, plan, self._start_row(self.start_state(p))))
            outcome = self._fit_rows([(j[1], j[2], j[3], self.adam_states.get(j[0].name) if self.keep_adam else None)
                                      for j in jobs])
            rows = outcome.rows.cpu()  # the trained rows wait for the server off the accelerator, as parked clients do
            for j, (p, loader, plan, _) in enumerate(jobs):
                if self.keep_adam:
                    self.adam_states[p.name] = self.arena.stash(self._adam_state_dict(outcome, j),
                                                                self.arena_row[p.index])
                replies[p.index] = ClientResult(_train_result(outcome, j), _row_getter(rows, j),
                                                len(loader.dataset))
        return replies

    def fits_side_by_side(self, parts: list[Participant]) -> bool:
        """Whether these clients' local fits run side by side: the algorithm allows it and their training
        data are cached features."""
        return self.batched is not None and all(isinstance(self.ctx.datasets[(p.index, "train")], FeatureDataset)
                                                for p in parts)

    def _chunks(self, parts: list[Participant]) -> list[list[Participant]]:
        """The clients in chunks whose rows (adapter, gradient, two moments, the proximal anchor) fit in about
        64 MiB: memory bounded by bytes, whatever the number of clients."""
        per = max(1, (64 << 20) // (5 * 4 * max(1, self.num_params)))
        return [parts[i : i + per] for i in range(0, len(parts), per)]

    def _start_row(self, state: State) -> torch.Tensor:
        """A start state as a flat row; the global model's (the state, or a dict of its very tensors, such as
        FedProx's anchor) is flattened once per round, not per client, and is the same row object for all."""
        g = self.global_state
        if state is not g and not (g is not None and state.keys() == g.keys() and
                                   all(state[k] is v for k, v in g.items())):
            return flatten(state)
        state = g
        cached = getattr(self, "_global_row", None)
        if cached is None or cached[0] is not state:
            self._global_row = cached = (state, flatten(state))
        return cached[1]

    def _fit_rows(self, jobs):
        """``fit_side_by_side`` of ``(loader, plan, start row, kept Adam state or None)`` per client."""
        from ..batched import ClientFit, fit_side_by_side

        fits = []
        for loader, plan, start, kept in jobs:
            anchor = None
            if plan.anchor is not None and plan.mu > 0:
                anchor = self._start_row(plan.anchor)
            moments = None
            if kept is not None:
                st = kept["state"]
                moments = (torch.cat([st[i]["exp_avg"].reshape(-1) for i in sorted(st)]),
                           torch.cat([st[i]["exp_avg_sq"].reshape(-1) for i in sorted(st)]),
                           float(st[min(st)]["step"]))
            fits.append(ClientFit(_steps(loader, plan), start, self.config.lr * plan.lr_factor, anchor,
                                  plan.mu, moments))
        return fit_side_by_side(fits, self.batched, self.config.loss, float(self.ctx.backbone.logit_scale),
                                self.text, self.row_adam, self.ctx.device, moments=self.keep_adam)

    def _adam_state_dict(self, outcome, j: int) -> dict[str, Any]:
        """Client ``j``'s Adam state after a side-by-side fit, as ``torch.optim.Adam.state_dict()`` lays it
        out (a kept state continues one at a time too)."""
        if not hasattr(self, "_adam_groups"):
            probe = [torch.zeros(t.shape, device=self.ctx.device, requires_grad=True) for t in self.template.values()]
            self._adam_groups = build_optimizer(probe, self.config, FitPlan(epochs=1)).state_dict()["param_groups"]
            self._adam_step_dtype = torch.float32
            self._adam_step_device = self.ctx.device if self._adam_groups[0].get("fused") else torch.device("cpu")
        state, offset = {}, 0
        step = torch.tensor(float(outcome.steps[j]), dtype=self._adam_step_dtype, device=self._adam_step_device)
        for i, t in enumerate(self.template.values()):
            n = t.numel()
            state[i] = {"step": step.clone(), "exp_avg": outcome.m[j, offset : offset + n].view(t.shape),
                        "exp_avg_sq": outcome.v[j, offset : offset + n].view(t.shape)}
            offset += n
        return {"state": state, "param_groups": [dict(g) for g in self._adam_groups]}

    def _setup_server(self, ctx: RunContext) -> None:
        self._weights: dict[tuple, list[float]] = {}  # aggregation weights by the clients that sent (and sizes)
        if self.communicates:
            self.server_update = ServerUpdate(self.cfg.federation, self.cfg.seed, ctx.num_clients,
                                              self.cfg.federation.rounds, clients_noise=ctx.remote_clients)

    def _setup_adam(self, ctx: RunContext) -> None:
        """Adam's moments: one row per client when kept between rounds, one scratch row shared otherwise."""
        self.keep_adam = self.config.optimizer_state == "keep"
        self.adam_states: dict[str, dict[str, Any]] = {}
        own = [p.index for p in ctx.my_clients]
        self.arena = AdamStateArena(2 * self.num_params, len(own) if self.keep_adam else 0, ctx.device)
        self.arena_row = {i: j for j, i in enumerate(own)}

    def make_client(self, p: Participant) -> CLIPClient:
        return AdapterClient(p.name, self.ctx.backbone, self.text, self.config, head=self.make_head())

    def adam_buffer(self, p: Participant) -> torch.Tensor | None:
        """The block client ``p``'s new Adam state is laid out in: its row of the arena when the state is
        kept, else the shared scratch row (None: nothing trains)."""
        if not self.trains_head:
            return None
        return self.arena.buffer_for(self.arena_row.get(p.index) if self.keep_adam else None)

    # -- a round --------------------------------------------------------------------
    def fit_plan(self, p: Participant, server_round: int, loader) -> FitPlan:
        """What client ``p``'s local fit in round ``server_round`` runs with: its epochs and a straggler's step
        budget (``RunContext.local_plan``), Adam's block and kept state. An algorithm adds its own
        settings (``dataclasses.replace``: FedProx's anchor, PromptFL's lr schedule)."""
        epochs, work = self.ctx.local_plan(p, server_round, self.config.local_epochs)
        max_steps = None if work >= 1 else max(1, math.floor(work * epochs * len(loader)))
        return FitPlan(epochs=epochs, max_steps=max_steps, adam_buffer=self.adam_buffer(p),
                       optimizer_state=self.adam_states.get(p.name) if self.keep_adam else None)

    def fit_client(self, client: CLIPClient, p: Participant, server_round: int) -> ClientResult:
        client.set_state(self.start_state(p))
        loader = self.ctx.train_loader(p, "train", server_round)
        res, optimizer = local_fit(self.ctx.fabric, client, loader, self.fit_plan(p, server_round, loader))
        if self.keep_adam:
            self.adam_states[p.name] = self.arena.stash(optimizer.state_dict(), self.arena_row[p.index])
        return ClientResult(res, self.upload(client), len(loader.dataset))

    def upload(self, client: CLIPClient) -> Callable[[], torch.Tensor]:
        """What travels: read from the client when the server asks (no copy kept in between)."""
        return lambda: flatten(client.trainable())

    def aggregate(self, server_round: int, active: list[int], results: dict[int, ClientResult]) -> None:
        """The server's update (``federation.*``: by default the clients' weighted mean, streamed)."""
        if not active:  # every client dropped: the model stays
            return
        mode = self.cfg.federation.aggregation
        # Sample weights from the clients' replies; uniform weights need no sizes (and no collective).
        sizes = client_sizes(self.ctx.fabric, self.ctx.num_clients, active, results) if mode == "samples" \
            else (1,) * len(active)
        key = (tuple(active), sizes)
        if key not in self._weights:
            self._weights[key] = aggregation_weights(list(sizes), mode)

        def row_of(i: int) -> torch.Tensor | None:
            return results[i].update() if i in results else None

        row = self.server_update(self.ctx.fabric, server_round, list(active), row_of, self._weights[key],
                                 lambda: flatten(self.global_state), self.num_params)
        self.global_state = unflatten(row, self.template)

    def metrics(self, rounds_run: int) -> dict[str, float]:
        return self.server_update.metrics(rounds_run) if self.communicates else {}

    def held_state(self, p: Participant) -> State | None:
        """The model client ``p`` holds after the round."""
        return self.global_state

    def evaluate_client(self, client: CLIPClient, p: Participant) -> dict[str, SplitResult]:
        held = self.held_state(p)
        if held is not None:
            client.set_state(held)
        return {"val": self.ctx.evaluate(client, p, "val"), "test": self.ctx.evaluate(client, p, "test")}

    def evaluate_unseen(self, client: CLIPClient, p: Participant) -> SplitResult:
        if self.global_state is not None:
            client.set_state(self.global_state)
        return self.ctx.evaluate(client, p, "unseen")

    def evaluation_plan(self, p: Participant) -> dict[str, list[tuple[State | torch.Tensor | None, str]]]:
        """What participant ``p`` is evaluated on: per result slot, the ``(model, split)`` pairs whose mean
        accuracy and loss fill it (a model: a state dict, a flat row, or None for the frozen model as it
        is). A client: ``val``/``test`` with the model it holds; an unseen domain: ``test`` with the global
        model on its ``unseen`` split."""
        if p.kind == "client":
            held = self.held_state(p)
            return {"val": [(held, "val")], "test": [(held, "test")]}
        return {"test": [(self.global_state, "unseen")]}

    def evaluate_mine(self, clients: dict[int, CLIPClient], parts: list[Participant]) -> dict[int, dict[str, SplitResult]]:
        """Every participant's slots as ``evaluation_plan`` says: side by side in batched products where the
        clients train side by side (``batched.evaluate_side_by_side``), else one model at a time, the
        participants that hold the same model together (one ``set_state`` and one placement for all their
        splits, each split in the batches ``evaluate`` would use: the same numbers, bitwise). What an algorithm
        evaluates its own way (an overridden ``evaluate_client``/``evaluate_unseen``) goes through that."""
        own_client = type(self).evaluate_client is CLIPAlgorithm.evaluate_client
        own_unseen = type(self).evaluate_unseen is CLIPAlgorithm.evaluate_unseen
        planned = [p for p in parts if (own_client if p.kind == "client" else own_unseen)]
        out = super().evaluate_mine(clients, [p for p in parts if not (own_client if p.kind == "client" else own_unseen)])
        plans = {p.index: self.evaluation_plan(p) for p in planned}
        models: dict[int, State | torch.Tensor | None] = {}
        jobs: dict[tuple[int, int, str], Participant] = {}
        for p in planned:
            for pairs in plans[p.index].values():
                for model, split in pairs:
                    models.setdefault(id(model), model)
                    jobs[(id(model), p.index, split)] = p
        if self.side_by_side_eval and all(isinstance(self.ctx.eval_loaders[(i, split)].dataset, FeatureDataset)
                                          for _, i, split in jobs):
            results = self._evaluate_side_by_side(models, list(jobs))
        else:
            results = {}
            by_model: dict[int, list[tuple[Participant, str]]] = {}
            for (m, _, split), p in jobs.items():
                by_model.setdefault(m, []).append((p, split))
            for m, group in by_model.items():
                client = clients[group[0][0].index]
                if models[m] is not None:
                    model = models[m]
                    client.set_state(unflatten(model, self.template) if isinstance(model, torch.Tensor) else model)
                for (p, split), res in zip(group, self._evaluate_together(client, group)):
                    results[(m, p.index, split)] = res
        for p in planned:
            slots = out.setdefault(p.index, {})
            for slot, pairs in plans[p.index].items():
                got = [results[(id(model), p.index, split)] for model, split in pairs]
                # Several models on one split (each image counted once a model): the mean accuracy and loss,
                # and the summed confusion, whose balanced accuracy is the models' mean balanced accuracy.
                slots[slot] = got[0] if len(got) == 1 else SplitResult(
                    accuracy=sum(r.accuracy for r in got) / len(got), loss=sum(r.loss for r in got) / len(got),
                    n=got[0].n, confusion=None if any(r.confusion is None for r in got)
                    else torch.stack([r.confusion for r in got]).sum(0))
        return out

    def _evaluate_side_by_side(self, models: dict[int, Any], jobs: list[tuple[int, int, str]]) -> dict:
        """Every ``(model, participant, split)`` job in batched products: ``{job: SplitResult}``."""
        from ..batched import evaluate_side_by_side

        # A model with no tensors (None, or an empty state: nothing trains) is the frozen model as it is.
        trained = [k for k, m in models.items() if m is not None and len(m) > 0]
        row_of = {k: i for i, k in enumerate(trained)}
        rows = torch.stack([(m if isinstance(m, torch.Tensor) else flatten(m)).cpu()
                            for m in (models[k] for k in trained)]) if trained else None
        sets = []
        for m, i, split in jobs:
            ds = self.ctx.eval_loaders[(i, split)].dataset
            sets.append((row_of.get(m), ds.features, ds.labels))
        scored = evaluate_side_by_side(rows, self.layout, sets, float(self.ctx.backbone.logit_scale), self.text,
                                       self.ctx.device)
        # The accuracy as torchmetrics computes it (float32 correct / total), for every job in one division.
        acc = (torch.tensor([c for c, _, _, _ in scored], dtype=torch.float32) /
               torch.tensor([n for _, _, n, _ in scored], dtype=torch.float32)).tolist()
        return {job: (SplitResult(accuracy=a, loss=loss / n, n=n, confusion=conf) if n else
                      SplitResult(accuracy=float("nan"), loss=float("nan"), n=0))
                for job, a, (c, loss, n, conf) in zip(jobs, acc, scored)}

    def _evaluate_together(self, client: CLIPClient, jobs: list[tuple[Participant, str]]) -> list[SplitResult]:
        """Each split through the client's ``validation_step``/``test_step`` in the batches ``evaluate``
        uses (the same products, bitwise), without its per-split set-up."""
        from ..training import batches, evaluate_batches, place

        client = place(self.ctx.fabric, client)
        client.eval()
        return [evaluate_batches(self.ctx.fabric, client, batches(self.ctx.eval_loaders[(p.index, split)]),
                                 "validation" if split == "val" else "test") for p, split in jobs]

    # -- persistent state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.communicates:
            out["server_update"] = self.server_update.state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.communicates:
            self.server_update.load(state.get("server_update"))

    def client_states(self) -> dict[str, dict[str, Any]]:
        return {name: {"optimizer_state": st} for name, st in self.adam_states.items()}

    def load_client_states(self, states: dict[str, dict[str, Any]]) -> None:
        for p in self.ctx.my_clients:
            st = (states.get(p.name) or {}).get("optimizer_state")
            if st is not None and self.keep_adam:
                # Into the client's row, like a live one.
                self.adam_states[p.name] = self.arena.stash(st, self.arena_row[p.index]) \
                    if self.arena.rows is not None else st


def _steps(loader, plan: FitPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches ``local_fit`` takes its optimiser steps on, in its order: ``plan.epochs`` passes over the
    loader, batches of one skipped, stopped after ``plan.max_steps`` steps."""
    from ..training import batches

    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _ in range(plan.epochs):
        for x, y in (loader if isinstance(loader, FeatureBatches) else batches(loader)):
            if plan.max_steps is not None and len(out) >= plan.max_steps:
                return out
            if y.numel() >= 2:
                out.append((x, y))
    return out


def _train_result(outcome, j: int) -> SplitResult:
    if outcome.batches[j] == 0:
        return SplitResult(accuracy=float("nan"), loss=float("nan"), n=0)
    return SplitResult(accuracy=outcome.correct[j] / outcome.seen[j], loss=outcome.loss_sum[j] / outcome.batches[j],
                       n=outcome.seen[j])


def _row_getter(rows: torch.Tensor, j: int) -> Callable[[], torch.Tensor]:
    return lambda: rows[j]


def check_config(a: AlgorithmConfig, p: Problems) -> None:
    """``algorithm.*``: the keys every algorithm shares, then the chosen algorithm's own (its ``check``)."""
    from . import registry

    bad = p.bad
    p.choice("algorithm.loss", a.loss, LOSSES)
    p.choice("algorithm.optimizer_state", a.optimizer_state, OPTIMIZER_STATES)
    if not (a.lr > 0 and math.isfinite(a.lr)):
        bad("algorithm.lr", a.lr, "the learning rate must be a positive number", "e.g. algorithm.lr=5e-5")
    if len(a.betas) != 2 or not all(0 <= b < 1 for b in a.betas):
        bad("algorithm.betas", a.betas, "Adam needs two betas in [0, 1)", "e.g. algorithm.betas=[0.9,0.98]")
    if not a.eps > 0:
        bad("algorithm.eps", a.eps, "must be > 0", "e.g. algorithm.eps=1e-6")
    if a.weight_decay < 0:
        bad("algorithm.weight_decay", a.weight_decay, "must be >= 0", "e.g. algorithm.weight_decay=0.2")
    p.positive_int("algorithm.local_epochs", a.local_epochs)
    registry.get(a.name).check(a, bad)
