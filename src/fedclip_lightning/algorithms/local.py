"""Local training only: each client trains its own adapter and never communicates (the personalisation
floor). An unseen domain gets the mean accuracy of the clients' own adapters."""

from __future__ import annotations

from typing import Any

import torch

from ..training import SplitResult
from ..aggregation.rows import gather_rows
from ..aggregation.mean import flatten, unflatten
from .base import CLIPAlgorithm, AdapterConfig, ClientResult, Participant, State, check_adapter_hidden
from .registry import register


@register
class Local(CLIPAlgorithm):
    name = "local"
    config_class = AdapterConfig
    communicates = False

    @classmethod
    def check(cls, config: AdapterConfig, bad) -> None:
        check_adapter_hidden(config, bad)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.own: dict[str, State] = {}  # this rank's clients' own adapters, on the CPU
        self.table: torch.Tensor | None = None  # every client's adapter (one row each), on every rank

    def start_state(self, p: Participant) -> State:
        return self.own.get(p.name, self.global_state)

    def fit_client(self, client, p: Participant, server_round: int) -> ClientResult:
        result = super().fit_client(client, p, server_round)
        own = self.own[p.name] = {k: v.cpu() for k, v in client.get_state().items()}
        # Not an update (nothing is averaged, no bytes are counted): the adapter an unseen domain is scored with.
        return ClientResult(result.train, lambda: flatten(own), result.num_examples)

    def aggregate(self, server_round: int, active: list[int], results: dict[int, ClientResult]) -> None:
        # Nothing is averaged; every rank assembles all clients' own adapters (no bytes counted) because an
        # unseen domain is scored with each of them: this round's from the replies, a client held here that did
        # not fit its kept one. Where the clients live elsewhere (a Flower deployment), a client that did not
        # answer keeps its row of the last table.
        rows = {p.index: flatten(self.own.get(p.name, self.global_state)) for p in self.ctx.my_clients}
        rows.update({i: r.update() for i, r in results.items()})
        table = gather_rows(self.ctx.fabric, rows, self.ctx.num_clients, self.num_params)
        if self.ctx.remote_clients:
            for i in set(range(self.ctx.num_clients)) - set(results):
                table[i] = self.table[i] if self.table is not None else flatten(self.global_state)
        self.table = table

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.table is not None and self.ctx.remote_clients:  # the server of a deployment keeps the table
            out["table"] = self.table.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("table") is not None:
            self.table = state["table"].clone()

    def broadcast(self) -> State:
        out = super().broadcast()
        if self.table is not None:
            out["table"] = self.table
        return out

    def receive(self, state: State) -> None:
        super().receive(state)
        if "table" in state:
            self.table = state["table"]

    def held_state(self, p: Participant) -> State:
        return self.own.get(p.name, self.global_state)

    def evaluate_unseen(self, client, p: Participant) -> SplitResult:
        results = []
        for row in self.table:
            client.set_state(unflatten(row, self.template))
            results.append(self.ctx.evaluate(client, p, "unseen"))
        return SplitResult(accuracy=sum(r.accuracy for r in results) / len(results),
                           loss=sum(r.loss for r in results) / len(results), n=results[0].n)

    def final_states(self) -> dict[str, State]:
        names = [c.name for c in self.ctx.task.clients]
        return {"adapters_final.pt": {f"{c}/{k}": v for c, row in zip(names, self.table)
                                      for k, v in unflatten(row, self.template).items()}}

    def selected_state(self) -> None:
        return None  # no global model to select

    def client_states(self) -> dict[str, dict[str, Any]]:
        out = super().client_states()
        for name, st in self.own.items():
            out.setdefault(name, {})["own_state"] = st
        return out

    def load_client_states(self, states: dict[str, dict[str, Any]]) -> None:
        super().load_client_states(states)
        for p in self.ctx.my_clients:
            st = (states.get(p.name) or {}).get("own_state")
            if st is not None:
                self.own[p.name] = st
