"""Local training only: each client trains its own adapter and never communicates (the personalisation
floor). An unseen domain gets the mean accuracy of the clients' own adapters."""

from __future__ import annotations

from typing import Any

import torch

from ..aggregation.rows import gather_rows
from ..aggregation.mean import flatten, unflatten
from .base import CLIPAlgorithm, AdapterConfig, ClientResult, Participant, State, check_adapter_hidden
from .registry import register


@register
class Local(CLIPAlgorithm):
    name = "local"
    config_class = AdapterConfig
    communicates = False
    side_by_side = True  # its own adapters are the rows fit_many returns

    @classmethod
    def check(cls, config: AdapterConfig, bad) -> None:
        check_adapter_hidden(config, bad)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.own: dict[str, State] = {}  # this rank's clients' own adapters, on the CPU
        self.table: torch.Tensor | None = None  # every client's adapter (one row each), on every rank

    def start_state(self, p: Participant) -> State:
        return self.own.get(p.name, self.global_state)

    def fit_many(self, clients, parts: list[Participant], server_round: int) -> dict[int, ClientResult]:
        results = super().fit_many(clients, parts, server_round)
        for p in parts:
            r = results[p.index]
            own = self.own[p.name] = unflatten(r.update().cpu(), self.template)
            # Not an update (nothing is averaged, no bytes are counted): the adapter an unseen domain is scored with.
            results[p.index] = ClientResult(r.train, lambda own=own: flatten(own), r.num_examples)
        return results

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

    def evaluation_plan(self, p: Participant):
        """An unseen domain: the mean accuracy and loss of every client's own adapter on it."""
        if p.kind == "client":
            return super().evaluation_plan(p)
        if getattr(self, "_rows", (None,))[0] is not self.table:  # the same row objects for every unseen domain
            self._rows = (self.table, list(self.table))
        return {"test": [(row, "unseen") for row in self._rows[1]]}

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
