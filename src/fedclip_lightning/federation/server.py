"""The server: the round loop, reading top to bottom like Lightning's build-your-own-trainer ``fit``.

For each round: configure it (which clients train), have the clients fit
(through the transport, ``transport.py``: with Fabric, this rank's clients),
aggregate their replies (the algorithm's rule, every rank computing the same),
personalise and evaluate on evaluated rounds, checkpoint, and tell the outputs.
Everything an algorithm decides is asked of the algorithm object; the server
never asks its name. Every rank runs this loop over its own clients; random
streams come from the seed and the (round, client) pair alone, and sums run in
fixed client order, so results do not depend on the number of processes beyond
BLAS rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from ..algorithms import registry
from ..checkpoint import CheckpointWriter, write_checkpoint
from ..configure import algorithm_config
from ..errors import DivergedError, named
from ..data.partition import sample_clients, stable_seed
from ..training import SplitResult
from ..report import ModelSelection, RoundMetrics, Summary
from .outputs import RunOutputs
from .preemption import Preempted, Preemption, any_rank


class Server:
    def __init__(self, ctx, algorithm, transport, summary: Summary, outputs: RunOutputs, run_dir: Path,
                 preemption: Preemption, wandb_id: str):
        self.ctx, self.algorithm, self.transport = ctx, algorithm, transport
        self.summary, self.outputs, self.run_dir = summary, outputs, run_dir
        self.preemption, self.wandb_id = preemption, wandb_id
        self.fabric, self.cfg = ctx.fabric, ctx.cfg
        self.selection = ModelSelection()
        self.writer = CheckpointWriter()
        self.rounds = self.cfg.federation.rounds if algorithm.trains else 0
        self.start_round = 0
        self._last_checkpoint = time.perf_counter()
        self.phase_seconds = {"fit": 0.0, "aggregate": 0.0, "evaluate": 0.0, "checkpoint": 0.0, "logging": 0.0}
        self.unreliable = {"dropped_total": 0, "straggled_total": 0}

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> None:
        if not self.algorithm.trains:  # evaluated once, as it is
            self.evaluate_round(0, {})
            self.outputs.round_done()
        for server_round in range(self.start_round + 1, self.rounds + 1):
            started = time.perf_counter()
            active = self.configure_round(server_round)
            train, active = self.fit_clients(server_round, active)
            self.aggregate(server_round, active, train)
            if server_round % self.cfg.federation.eval_interval == 0 or server_round == self.rounds:
                self.evaluate_round(server_round, {i: r.train for i, r in train.items()})
            stop = self.end_round(server_round)
            self.summary.round_seconds.append(time.perf_counter() - started)
            self.outputs.round_done()
            if stop:
                self.summary.status = "preempted"
                again = any_rank(self.fabric, self.preemption.requeue)
                raise Preempted(server_round, requeue=again and self.fabric.is_global_zero, terminated=not again)

    def configure_round(self, server_round: int) -> list[int]:
        """The clients that train and report this round: a seeded draw of ``federation.client_fraction``,
        less those that drop out (``federation.unreliable.dropout``, seeded by (round, client): they send nothing).
        Stragglers (``federation.unreliable.straggler_fraction``) are counted here and slowed in their local fit."""
        fed, seed = self.cfg.federation, self.cfg.seed
        active = sample_clients(self.ctx.num_clients, fed.client_fraction, server_round, seed)
        dropout = fed.unreliable.dropout
        if dropout > 0:
            arrived = [i for i in active
                       if random.Random(stable_seed(seed, "dropout", server_round, i)).random() >= dropout]
            self.unreliable["dropped_total"] += len(active) - len(arrived)
            active = arrived
        if fed.unreliable.straggler_fraction > 0:
            parts = self.ctx.parts
            self.unreliable["straggled_total"] += sum(
                self.ctx.local_plan(parts[i], server_round, 1)[1] < 1 for i in active)
        return active

    def fit_clients(self, server_round: int, active: list[int]) -> tuple[dict, list[int]]:
        """The active clients fit locally (through the transport): their replies, and the clients whose reply
        arrived (a client that did not answer in time, a SuperNode that died, is counted as a dropout)."""
        t = time.perf_counter()
        results = self.transport.fit(server_round, active)
        arrived = self.transport.arrived(active, results)
        if len(arrived) < len(active):
            self.unreliable["dropped_total"] += len(active) - len(arrived)
            lost = [self.ctx.parts[i].name for i in active if i not in arrived]
            self.outputs.warn(f"round {server_round}: no reply from client(s) {named(lost)}: counted as "
                              "dropped out; the round aggregates the others.")
        # A client that took no step (its images fewer than two: batches of one are skipped) has no loss, not a
        # diverged one.
        self._stop_if_diverged(server_round, [i for i, r in results.items()
                                              if r.train.n > 0 and not math.isfinite(r.train.loss)], "loss")
        self.phase_seconds["fit"] += time.perf_counter() - t
        return results, arrived

    def _stop_if_diverged(self, server_round: int, mine: list[int], what: str) -> None:
        """Every rank stops, naming the clients (of any rank) whose local fit ended in a non-finite ``what``."""
        flags = torch.zeros(len(self.ctx.parts), dtype=torch.float64)
        flags[mine] = 1.0
        if self.fabric.world_size > 1:
            flags = self.fabric.all_reduce(flags.to(self.fabric.device), reduce_op="sum").cpu()
        if flags.any():
            names = [self.ctx.parts[i].name for i in flags.nonzero().flatten().tolist()]
            raise DivergedError(
                f"round {server_round}: the local training {what} of client(s) {named(names)} is not finite "
                f"(NaN or inf): "
                f"training diverged, and its accuracies would not be results. The run stopped (summary.json: "
                f"failed). Fix: lower algorithm.lr (now {self.cfg.algorithm.lr:g}).")

    def aggregate(self, server_round: int, active: list[int], results: dict) -> None:
        t = time.perf_counter()
        self.algorithm.aggregate(server_round, active, results)
        state = getattr(self.algorithm, "global_state", None)
        if state is not None and not all(bool(torch.isfinite(v).all()) for v in state.values()):
            # The same on every rank (each computed the same server update), so all take this branch together:
            # first the clients whose uploads were not finite, else the server's own step is named.
            bad = [i for i, r in results.items() if not bool(torch.isfinite(r.update()).all())]
            self._stop_if_diverged(server_round, bad, "model")
            raise DivergedError(f"round {server_round}: the aggregated model is not finite (NaN or inf), from "
                                "finite client models. The run stopped (summary.json: failed). Fix: lower "
                                "federation.server_optimizer.lr, "
                                "or check the server-side settings (federation.server_optimizer, privacy, attack).")
        if self.algorithm.communicates:
            per_copy = self.algorithm.bytes_per_copy
            self.summary.bytes_up_total += len(active) * per_copy
            self.summary.bytes_down_total += self.ctx.num_clients * per_copy
        self.summary.rounds_run = server_round
        self.phase_seconds["aggregate"] += time.perf_counter() - t

    def evaluate_round(self, server_round: int, train: dict[int, SplitResult]) -> RoundMetrics:
        t = time.perf_counter()
        metrics, csv_rows, logd = self.transport.evaluate(server_round, train)
        t2 = time.perf_counter()
        self.phase_seconds["evaluate"] += t2 - t
        if self.selection.update(metrics):
            self.outputs.per_class("selected", metrics)
            state = self.algorithm.selected_state()
            if state is not None and self.algorithm.trains:
                self.outputs.save_state(f"{self.algorithm.state_file}_selected.pt", state, metrics.round)
        self.summary.selected, self.summary.final = self.selection.best, metrics
        server = self.algorithm.metrics(self.summary.rounds_run)
        if self.cfg.federation.unreliable.dropout > 0 or self.cfg.federation.unreliable.straggler_fraction > 0 or \
                any(self.unreliable.values()):
            server.update({f"clients/{k}": v for k, v in self.unreliable.items()})
        self.summary.server = server
        self.outputs.evaluated(metrics, csv_rows, {**logd, **server})
        self.phase_seconds["logging"] += time.perf_counter() - t2
        return metrics

    def evaluate_zero_shot(self) -> RoundMetrics:
        """Zero-shot CLIP (the frozen backbone and the class prompts, nothing trained) on every participant's
        val, test and unseen splits, through the same evaluation as the rounds: the baseline beside the trained
        model in the end-of-run table. Run after training, on its own random stream, so it changes nothing
        the rounds compute."""
        zero_shot = zero_shot_algorithm(self.cfg)
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            zero_shot.setup(self.ctx)
            metrics, _, _ = self.transport.evaluate_with(zero_shot)
        self.phase_seconds["evaluate"] += time.perf_counter() - t
        self.outputs.per_class("zero-shot", metrics)
        return metrics

    def end_round(self, server_round: int) -> bool:
        """Checkpoint on the interval, at the end, and whenever a preemption signal arrived (any rank);
        True when the run is to stop here."""
        t = time.perf_counter()
        stop = any_rank(self.fabric, self.preemption.requested)
        fed = self.cfg.federation
        due = bool(fed.checkpoint_interval) and server_round % fed.checkpoint_interval == 0 and \
            t - self._last_checkpoint >= fed.checkpoint_min_seconds
        if stop or server_round == self.rounds or any_rank(self.fabric, due):
            # The last one, and a preemption's, are on disk before the loop goes on.
            self.checkpoint(server_round, wait=stop or server_round == self.rounds)
            self._last_checkpoint = time.perf_counter()
        self.phase_seconds["checkpoint"] += time.perf_counter() - t
        return stop

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The server's side of a checkpoint: the algorithm's server state, model selection, counters; plain
        data and tensors that are never written in place (each round makes a new server state)."""
        s = self.summary
        return {
            "config": json.dumps(s.config, sort_keys=True),
            "server": self.algorithm.state_dict(),
            "selected": self.selection.best.as_dict() if self.selection.best else None,
            "final": s.final.as_dict() if s.final else None,
            "bytes_up_total": s.bytes_up_total,
            "bytes_down_total": s.bytes_down_total,
            "round_seconds": list(s.round_seconds),
            "unreliable": dict(self.unreliable),
            "data_digest": self.ctx.data_digest,
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, meta: dict) -> None:
        """Continue from a checkpoint's server side (``meta["round"]``: the round it was written after)."""
        s = self.summary
        self.start_round = int(meta["round"])
        self.algorithm.load_state_dict(meta["server"])
        if meta.get("selected"):
            self.selection.best = RoundMetrics.from_dict(meta["selected"])
        s.selected = self.selection.best
        if meta.get("final"):
            s.final = RoundMetrics.from_dict(meta["final"])
        s.bytes_up_total, s.bytes_down_total = int(meta["bytes_up_total"]), int(meta["bytes_down_total"])
        s.rounds_run = self.start_round
        s.round_seconds = list(meta.get("round_seconds", []))
        self.unreliable.update(meta.get("unreliable") or {})
        s.resumed_from = self.start_round

    def checkpoint(self, server_round: int, wait: bool) -> None:
        """The server's state (rank 0) and the clients' (through the transport, wherever they live)."""
        write_checkpoint(self.fabric, self.run_dir, server_round, self.cfg.federation.keep_checkpoints,
                         self.state_dict() if self.fabric.is_global_zero else None,
                         self.transport.client_states(), self.writer, wait=wait)

    def restore(self, meta: dict, clients_state: dict) -> None:
        """Continue from a checkpoint: the server's state and the clients'."""
        self.load_state_dict(meta)
        self.transport.load_client_states(clients_state)

    def save_final(self) -> list[str]:
        """The algorithm's final models, on rank 0; returns their file names."""
        if not self.algorithm.trains:
            return []
        saved = []
        for name, state in self.algorithm.final_states().items():
            self.outputs.save_state(name, state, self.summary.rounds_run)
            saved.append(name)
        if self.algorithm.selected_state() is not None:
            saved.insert(0, f"{self.algorithm.state_file}_selected.pt")
        return saved

    def close(self) -> None:
        self.writer.close()  # a checkpoint being written still lands: a resume starts from it
        self.summary.phase_seconds = {k: round(v, 3) for k, v in self.phase_seconds.items()}


def zero_shot_algorithm(cfg):
    """Zero-shot CLIP as an algorithm of this run's config (set it up on a context to evaluate it)."""
    return registry.get("zeroshot")(dataclasses.replace(cfg, algorithm=algorithm_config({"name": "zeroshot"})))
