"""The local loops: one client's training epochs, and accuracy on a split.

These play the part of Lightning's Trainer for a client (Fabric gives us the
device and the process group; we drive the LightningModule's hooks). Metrics are
torchmetrics, computed on the rank that owns the data and never synced by
torchmetrics itself: the orchestrator assembles them across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from .client import ClientModule


@dataclass
class SplitResult:
    accuracy: float
    loss: float
    n: int

    def as_row(self) -> torch.Tensor:
        return torch.tensor([self.accuracy, self.loss, float(self.n)], dtype=torch.float64)

    @classmethod
    def from_row(cls, row: torch.Tensor) -> "SplitResult":
        return cls(accuracy=float(row[0]), loss=float(row[1]), n=int(row[2]))


_METRICS: dict[tuple[int, str], tuple[MulticlassAccuracy, SumMetric]] = {}


def _metrics(client: ClientModule, device: torch.device) -> tuple[MulticlassAccuracy, SumMetric]:
    """Metric objects shared by every client of this process (reset per use; creating them per call is
    costly, and one set per client would cost memory per client)."""
    key = (client.num_classes, str(device))
    if key not in _METRICS:
        _METRICS[key] = (
            MulticlassAccuracy(num_classes=client.num_classes, average="micro", sync_on_compute=False).to(device),
            SumMetric(sync_on_compute=False).to(device),
        )
    acc, loss = _METRICS[key]
    acc.reset()
    loss.reset()
    return acc, loss


def train_epochs(client: ClientModule, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int,
                 device: torch.device) -> SplitResult:
    """Run ``epochs`` passes of ``training_step`` + the optimiser; return mean loss and running accuracy.

    Kept lean (no per-batch metric objects, no host syncs): with cached
    features this loop is the whole cost of a FedCLIP round.
    """
    client.train()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = n_batches = 0
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = client.training_step((x, y), i)
            if out is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            correct += (out["preds"] == out["target"]).sum()
            loss_sum += out["loss"].detach()
            seen += y.numel()
            n_batches += 1
    optimizer.zero_grad(set_to_none=True)  # gradients are not state: free them between turns
    if n_batches == 0:
        return SplitResult(accuracy=float("nan"), loss=float("nan"), n=0)
    return SplitResult(accuracy=int(correct) / seen, loss=float(loss_sum) / n_batches, n=seen)


@torch.no_grad()
def evaluate(client: ClientModule, loader: DataLoader, device: torch.device) -> SplitResult:
    """Accuracy and mean class-prototype cross-entropy of ``client`` on a split."""
    client.eval()
    acc, loss_sum = _metrics(client, device)
    n = 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = client.validation_step((x, y), i)
        acc.update(out["preds"], out["target"])
        loss_sum.update(out["loss_sum"])
        n += y.numel()
    if n == 0:
        return SplitResult(accuracy=float("nan"), loss=float("nan"), n=0)
    return SplitResult(accuracy=float(acc.compute()), loss=float(loss_sum.compute()) / n, n=n)
