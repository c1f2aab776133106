"""The local loops, the Fabric way: one client's training epochs, and its accuracy on a split.

These play the part of Lightning's Trainer for a client, as in Fabric's own
examples of models that are deliberately not wrapped in DDP (ranks train
*different* clients): ``fabric.to_device`` places the client and each batch,
the client's ``training_step`` computes the loss, ``fabric.backward`` runs
autograd, and the optimiser is the client's ``configure_optimizers``. Metrics
are computed on the rank that owns the data and never synced by torchmetrics
itself: the server assembles them across ranks.

Everything one local fit needs besides the client and its data comes in one
``FitPlan``, made by the client's algorithm for that fit: a client keeps no
per-round settings of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, SequentialSampler
from torchmetrics.functional.classification import multiclass_accuracy

from .client import CLIPClient
from .fit_plan import FitPlan
from .data.pipeline import FeatureDataset


@dataclass
class SplitResult:
    accuracy: float
    loss: float
    n: int
    # Images of each (true class, predicted class) pair, ``[C, C]``: per-class and balanced accuracy. None
    # where a split was not scored per class (a local fit's training batches).
    confusion: torch.Tensor | None = None

    @property
    def balanced(self) -> float:
        """The mean over the classes present of their accuracy (balanced accuracy); NaN without a confusion."""
        return balanced_accuracy(self.confusion)

    def as_row(self) -> torch.Tensor:
        """``[accuracy, loss, n, confusion...]`` (float64; the confusion row-major, absent where it is None)."""
        return torch.tensor(self.as_values(), dtype=torch.float64)

    def as_values(self) -> list[float]:
        """``as_row`` as a list of Python floats (every value exact in float64)."""
        head = [float(self.accuracy), float(self.loss), float(self.n)]
        return head if self.confusion is None else head + [float(x) for x in self.confusion.flatten().tolist()]

    @classmethod
    def from_row(cls, row: torch.Tensor | list[float]) -> "SplitResult":
        """The inverse of ``as_row``, from the tensor or its ``tolist()`` (a table of many rows is read as lists:
        one conversion, not a dozen small tensor operations a row)."""
        values = row.tolist() if isinstance(row, torch.Tensor) else row
        c = math.isqrt(len(values) - 3)
        counts = values[3:]
        confusion = (torch.tensor([round(x) for x in counts], dtype=torch.long).reshape(c, c)
                     if c and any(counts) else None)
        return cls(accuracy=float(values[0]), loss=float(values[1]), n=int(values[2]), confusion=confusion)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts of (true class, predicted class), on the CPU."""
    flat = targets.reshape(-1).long().cpu() * num_classes + preds.reshape(-1).long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def balanced_accuracy(confusion: torch.Tensor | None) -> float:
    """The mean, over the classes with images, of each class's accuracy (correct / its images)."""
    if confusion is None:
        return float("nan")
    # Each class's share correct, correctly rounded (integer counts); their exact mean (math.fsum), so the value
    # does not depend on a reduction's order.
    shares = [row[i] / total for i, row in enumerate(confusion.tolist()) if (total := sum(row)) > 0]
    return math.fsum(shares) / len(shares) if shares else float("nan")


def batches(loader: DataLoader):
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


def place(fabric: Fabric, client: CLIPClient) -> CLIPClient:
    """The client on this rank's device (skipped when it is already there: a CPU run moves nothing)."""
    if client.device != fabric.device:
        client = fabric.to_device(client)
    return client


def park(client) -> None:
    """A client's state waits off the accelerator between turns (a no-op on a CPU run)."""
    if client.device.type != "cpu":
        client.to("cpu")


def local_fit(fabric: Fabric, client: CLIPClient, loader: DataLoader,
              plan: FitPlan) -> tuple[SplitResult, torch.optim.Optimizer]:
    """``plan.epochs`` passes of ``training_step`` + ``fabric.backward`` + ``optimizer.step()``.

    The optimiser is the client's ``configure_optimizers(plan)``: a kept Adam state
    (``plan.optimizer_state``) continued if there is one, else a new one in ``plan.adam_buffer``, at
    ``plan.lr_factor`` times the algorithm's lr. Returns the mean loss and running accuracy of the
    fit, and the optimiser (its state is the caller's to keep). ``plan.max_steps``: stop after that
    many optimiser steps (a straggler).
    Kept lean (no per-batch metric objects, no host syncs): with cached
    features this loop is most of a FedCLIP round.
    """
    client = place(fabric, client)
    optimizer = client.configure_optimizers(plan)
    epochs, max_steps = plan.epochs, plan.max_steps
    client.train()
    params = list(client.trainable().values())
    device = fabric.device
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = n_batches = 0
    for _ in range(epochs):
        if max_steps is not None and n_batches >= max_steps:
            break
        for i, (x, y) in enumerate(batches(loader)):
            if max_steps is not None and n_batches >= max_steps:
                break
            if x.device != device:
                x, y = fabric.to_device((x, y))
            out = client.training_step((x, y), i, plan)
            if out is None:
                continue
            for p in params:
                p.grad = None
            fabric.backward(out["loss"])
            optimizer.step()
            correct += out["correct"]
            loss_sum += out["loss"].detach()
            seen += y.numel()
            n_batches += 1
    for p in params:  # gradients are not state: free them between turns
        p.grad = None
    if n_batches == 0:
        return SplitResult(accuracy=float("nan"), loss=float("nan"), n=0), optimizer
    return SplitResult(accuracy=int(correct) / seen, loss=float(loss_sum) / n_batches, n=seen), optimizer


@torch.no_grad()
def evaluate(fabric: Fabric, client: CLIPClient, loader: DataLoader, stage: str = "validation") -> SplitResult:
    """Accuracy and mean class-prototype cross-entropy of ``client`` on a split, through its
    ``validation_step`` (``stage="validation"``) or ``test_step`` (``stage="test"``)."""
    client = place(fabric, client)
    client.eval()
    return evaluate_batches(fabric, client, batches(loader), stage)


@torch.no_grad()
def evaluate_batches(fabric: Fabric, client: CLIPClient, batch_iter, stage: str) -> SplitResult:
    """``evaluate`` on batches given directly (the client already placed and in eval mode)."""
    step = client.test_step if stage == "test" else client.validation_step
    device = fabric.device
    preds, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(batch_iter):
        if x.device != device:
            x, y = fabric.to_device((x, y))
        out = step((x, y), i)
        preds.append(out["preds"])
        targets.append(out["target"])
        loss_sum += out["loss_sum"]
    n = sum(len(t) for t in targets)
    if n == 0:
        return SplitResult(accuracy=float("nan"), loss=float("nan"), n=0)
    # The inputs are ours (class indices from argmax and the data set): no argument checks.
    preds, targets = torch.cat(preds), torch.cat(targets)
    acc = multiclass_accuracy(preds, targets, num_classes=client.num_classes, average="micro", validate_args=False)
    return SplitResult(accuracy=float(acc), loss=float(loss_sum) / n, n=n,
                       confusion=confusion_matrix(preds, targets, client.num_classes))
