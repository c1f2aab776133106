"""FedCLIP, then personalisation: on each evaluated round every client fine-tunes its own copy of the
global adapter for ``personal_epochs`` on its training data and is evaluated with it; its accuracy with
the global adapter is reported too (``val_global`` / ``test_global``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..fit_plan import FitPlan
from ..training import local_fit
from .base import AdapterConfig, Participant, State, check_adapter_hidden
from .fedclip import FedCLIP
from .registry import register


@dataclass
class FedCLIPFTConfig(AdapterConfig):
    name: str = "fedclip_ft"
    personal_epochs: int = 1  # local fine-tuning epochs of each client's personal adapter


class Personalized:
    """On each evaluated round every client of this rank fine-tunes its own copy of the global state for
    ``algorithm.personal_epochs`` on its training data and is evaluated with it; its accuracy with the
    global state is reported too (``val_global`` / ``test_global``). Mixed into an algorithm that has
    ``personal_epochs`` in its config; ``personal_plan`` says what the fine-tuning runs with."""

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.personal: dict[str, State] = {}

    def personal_plan(self, p: Participant) -> FitPlan:
        """A fresh optimiser (the algorithm's, at its full lr) for ``personal_epochs``, Adam's moments in
        the shared scratch block: a kept training state (optimizer_state=keep) stays untouched."""
        return FitPlan(epochs=self.config.personal_epochs, adam_buffer=self.arena.scratch)

    def personalize(self, server_round: int, clients: dict) -> None:
        self.personal = {}
        mine = self.ctx.my_clients
        if self.fits_side_by_side(mine):  # side by side: every client's fine-tuning in batched products
            start = self._start_row(self.global_state)
            for chunk in self._chunks(mine):
                loaders = [self.ctx.train_batches(p, "personal", server_round) for p in chunk]
                outcome = self._fit_rows([(loader, self.personal_plan(p), start, None)
                                          for p, loader in zip(chunk, loaders)])
                rows = outcome.rows.cpu()  # off the accelerator, as one at a time keeps them
                for j, p in enumerate(chunk):
                    self.personal[p.name] = rows[j].clone()
            return
        for p in mine:
            client = clients[p.index]
            client.set_state(self.global_state)
            local_fit(self.ctx.fabric, client, self.ctx.train_loader(p, "personal", server_round),
                      self.personal_plan(p))
            self.personal[p.name] = {k: v.cpu() for k, v in client.get_state().items()}

    def evaluation_plan(self, p: Participant):
        """A client: its personal model (``val``/``test``) and the global one (``val_global``/``test_global``)."""
        plan = super().evaluation_plan(p)
        if p.kind != "client":
            return plan
        personal = self.personal[p.name]
        return {**{f"{slot}_global": pairs for slot, pairs in plan.items()},
                "val": [(personal, "val")], "test": [(personal, "test")]}


def check_personal_epochs(config, bad) -> None:
    if config.personal_epochs < 1:
        bad("algorithm.personal_epochs", config.personal_epochs, "must be >= 1",
            "set algorithm.personal_epochs=1 or more")


@register
class FedCLIPFT(Personalized, FedCLIP):
    name = "fedclip_ft"
    config_class = FedCLIPFTConfig

    @classmethod
    def check(cls, config: FedCLIPFTConfig, bad) -> None:
        check_adapter_hidden(config, bad)
        check_personal_epochs(config, bad)
