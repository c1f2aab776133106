"""How the server's round loop reaches its clients.

The loop (``Server.fit``: configure, fit, aggregate, evaluate, checkpoint) is one piece of code; what it
calls to train and evaluate the round's clients is a transport. A transport answers these requests:

* ``fit(server_round, active)``: the active clients it holds fit locally; it returns their replies
  (``ClientResult``: train accuracy and loss, the update, the number of training examples) by client index;
  ``arrived(active, results)`` says whose reply arrived (the others count as dropped out);
* ``evaluate(server_round, train)``: personalisation (the algorithm's step of evaluated rounds) and every
  participant's val/test/unseen evaluation, assembled into the round's metrics, the same on every process;
* ``evaluate_with(algorithm)``: every participant evaluated once with another algorithm (the zero-shot
  baseline);
* ``client_states()`` / ``load_client_states(states)``: what the clients keep between rounds, for checkpoints.

:class:`FabricTransport` is the one this package runs: the clients live in this job, each Fabric rank holding
the clients placed on it, and the rows of a round move between ranks by collectives. The Flower transport
(``fedclip_lightning.flower.transport``) reaches clients on SuperNodes by messages.
"""

from __future__ import annotations

from ..algorithms.base import ClientResult
from ..report import RoundMetrics
from ..training import SplitResult, park
from .evaluation import RoundEvaluator


class FabricTransport:
    """Clients in this job: each rank trains and evaluates the clients placed on it (``ctx.mine``)."""

    def __init__(self, ctx, algorithm, clients: dict):
        self.ctx, self.algorithm, self.clients = ctx, algorithm, clients
        self.evaluator = RoundEvaluator(ctx.fabric, ctx.parts, clients, algorithm)

    def fit(self, server_round: int, active: list[int]) -> dict[int, ClientResult]:
        """This rank's active clients fit locally (``algorithm.fit_many``: one after another, or side by
        side); their replies."""
        chosen = set(active)
        return self.algorithm.fit_many(self.clients, [p for p in self.ctx.my_clients if p.index in chosen],
                                       server_round)

    def arrived(self, active: list[int], results: dict[int, ClientResult]) -> list[int]:
        """The active clients whose reply arrived: in this job, every one (each rank holds only its own)."""
        return list(active)

    def evaluate(self, server_round: int, train: dict[int, SplitResult]) -> tuple[RoundMetrics, list[tuple], dict]:
        """Personalise (the algorithm's step before evaluation), then evaluate every participant: ``(metrics,
        metrics.csv rows, values to log)``, the same on every rank."""
        self.algorithm.personalize(server_round, self.clients)
        out = self.evaluator.evaluate(server_round, train)
        for client in self.clients.values():
            park(client)
        return out

    def evaluate_with(self, algorithm) -> tuple[RoundMetrics, list[tuple], dict]:
        """Every participant evaluated once (round 0) with another algorithm, set up on this run's context
        (the zero-shot baseline): its own clients, built here."""
        return evaluate_once(self.ctx, algorithm)

    def client_states(self) -> dict[str, dict]:
        """What this rank's clients keep between rounds (kept Adam state, own adapters), by client name."""
        return self.algorithm.client_states()

    def load_client_states(self, states: dict[str, dict]) -> None:
        self.algorithm.load_client_states(states)


def evaluate_once(ctx, algorithm) -> tuple[RoundMetrics, list[tuple], dict]:
    """Every participant of ``ctx`` evaluated once (round 0) by ``algorithm``, with clients of its own made
    here: ``(metrics, metrics.csv rows, values to log)``, the same on every rank."""
    return FabricTransport(ctx, algorithm, Clients(algorithm.make_client, ctx.mine)).evaluate(0, {})


class Clients(dict):
    """This rank's clients by participant index, each made (``make(p)``) when first asked for: clients trained
    and evaluated side by side are never asked for, so ten thousand of them cost no LightningModules."""

    def __init__(self, make, parts):
        super().__init__()
        self._make, self._parts = make, {p.index: p for p in parts}

    def __missing__(self, index: int):
        client = self[index] = self._make(self._parts[index])
        return client
