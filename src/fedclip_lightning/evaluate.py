"""The local loops: one client's training epochs, and accuracy on a split.

These play the part of Lightning's Trainer for a client (Fabric gives us the
device and the process group; we drive the LightningModule's hooks). Metrics are
torchmetrics, computed on the rank that owns the data and never synced by
torchmetrics itself: the orchestrator assembles them across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, SequentialSampler
from torchmetrics.functional.classification import multiclass_accuracy

from .client import ClientModule
from .optim import adam_step
from .data.pipeline import FeatureDataset


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


def _batches(loader: DataLoader):
    """The loader's batches. For cached features, gathered straight from the feature table by the
    loader's own batch sampler (the same batches in the same order, shuffled or not, without the
    DataLoader's per-batch machinery: with cached features that machinery costs as much as the step)."""
    ds = loader.dataset
    if isinstance(ds, FeatureDataset) and loader.batch_sampler is not None and loader.num_workers == 0:
        if isinstance(loader.sampler, SequentialSampler) and not loader.drop_last:
            bs = loader.batch_size
            for i in range(0, len(ds), bs):
                yield ds.features[i : i + bs], ds.labels[i : i + bs]
        else:
            for idx in loader.batch_sampler:
                yield ds.__getitems__(idx)
    else:
        yield from loader


def train_epochs(client: ClientModule, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int,
                 device: torch.device, adam_buffer: torch.Tensor | None = None) -> SplitResult:
    """Run ``epochs`` passes of the client's training step + the optimiser; return mean loss and running
    accuracy. A new Adam state goes into ``adam_buffer`` (see ``optim.adam_step``).

    Kept lean (no per-batch metric objects, no host syncs): with cached
    features this loop is the whole cost of a FedCLIP round.
    """
    client.train()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = n_batches = 0
    for _ in range(epochs):
        for x, y in _batches(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = client.fit_batch(x, y)
            if out is None:
                continue
            adam_step(optimizer, adam_buffer)
            correct += out[1]
            loss_sum += out[0]
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
    preds, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(_batches(loader)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = client.validation_step((x, y), i)
        preds.append(out["preds"])
        targets.append(out["target"])
        loss_sum += out["loss_sum"]
    n = sum(len(t) for t in targets)
    if n == 0:
        return SplitResult(accuracy=float("nan"), loss=float("nan"), n=0)
    # The inputs are ours (class indices from argmax and the data set): no argument checks.
    acc = multiclass_accuracy(torch.cat(preds), torch.cat(targets), num_classes=client.num_classes,
                              average="micro", validate_args=False)
    return SplitResult(accuracy=float(acc), loss=float(loss_sum) / n, n=n)
