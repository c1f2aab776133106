"""Clients side by side: many FedCLIP adapter clients trained and evaluated together in batched products.

On cached features a client's local fit is a few small products per batch, so cut into one client at a
time, a round of thousands of clients costs its Python and kernel launches, not its arithmetic. Here the
clients of a round that train the same adapter shape train together: their adapters are the rows of one
``[K, P]`` tensor, each step's forward and written-out backward are ``bmm`` over the clients that take a
step of the same batch size, and Adam's update runs over their rows at once. Each client still sees
exactly its own batches, in its own order, for its own number of steps (a client with fewer batches simply
takes no part in the later steps); nothing is padded into a result.

The arithmetic is the one-at-a-time fit's (``AdapterFunction``, ``ContrastiveLoss``/``PrototypeLoss``,
``torch.optim.Adam`` with coupled L2 weight decay), in batched kernels: equal to float rounding, not
bitwise (``docs/many_clients.md`` states the tolerance and ``tests/test_batched.py`` holds it). A row's
result does not depend on which other clients share its products: the same on 1 or 2 processes.

Evaluation likewise: every client's val and test on its own adapter (or one shared one) in batched
products, summed per client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model.adapter import _NORMALIZE_EPS

# The adapter's tensors, in the order of its state dict (and so of a flat row).
ADAPTER_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@dataclass(frozen=True)
class AdapterLayout:
    """Where the attention adapter's four tensors sit in a flat row (``aggregation.mean.flatten`` order)."""

    d: int  # feature width
    h: int  # hidden width
    width: int  # values in a row

    @classmethod
    def of(cls, template: dict[str, torch.Tensor]) -> "AdapterLayout":
        if tuple(template) != ADAPTER_KEYS:
            raise ValueError(f"not an attention adapter's state: {list(template)}")
        h, d = template["fc1.weight"].shape
        return cls(d=d, h=h, width=2 * d * h + h + d)

    def views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W1 [G,h,d], b1 [G,h], W2 [G,d,h], b2 [G,d])``: views of the rows ``[G, width]``."""
        g, d, h = rows.shape[0], self.d, self.h
        o1, o2, o3 = h * d, h * d + h, 2 * h * d + h
        return (rows[:, :o1].view(g, h, d), rows[:, o1:o2], rows[:, o2:o3].view(g, d, h), rows[:, o3:])


def adapter_features(parts, x: torch.Tensor):
    """``normalize(softmax(W2 tanh(W1 x + b1) + b2) * x)`` of each row's adapter ``parts = (W1 [G,h,d], b1 [G,h],
    W2 [G,d,h], b2 [G,d])`` on its own ``x [G,b,d]`` (``x`` may be expanded over the rows: one set of images,
    every adapter). Returns the features and what the backward needs."""
    w1, b1, w2, b2 = parts
    h = torch.tanh(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    a = torch.softmax(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)), dim=-1)
    u = a * x
    n = u.norm(dim=-1, keepdim=True).clamp_min_(_NORMALIZE_EPS)
    return u / n, (h, a, n)


def adapter_backward(parts, x: torch.Tensor, f: torch.Tensor, saved, grad_f: torch.Tensor) -> list[torch.Tensor]:
    """``AdapterFunction.backward`` per row: the gradients of each row's loss with respect to its adapter's
    four tensors (``grad_f`` is overwritten)."""
    h, a, n = saved
    w2 = parts[2]
    du = (grad_f - f * (f * grad_f).sum(-1, keepdim=True)).div_(n)
    da = du.mul_(x)
    dz2 = a * (da - (a * da).sum(-1, keepdim=True))
    dz1 = torch.bmm(dz2, w2).mul_(1 - h * h)
    return [torch.bmm(dz1.transpose(1, 2), x), dz1.sum(1), torch.bmm(dz2.transpose(1, 2), h), dz2.sum(1)]


def loss_and_grad(kind: str, scale: float, f: torch.Tensor, text: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's CLIP loss (``[G]``) of its features ``f [G,b,d]`` against the prompts ``text [C,d]``,
    labels ``y [G,b]``, and its gradient with respect to ``f``: ``ContrastiveLoss`` / ``PrototypeLoss``
    per row."""
    b = y.shape[1]
    if kind == "contrastive":
        t = text[y]
        logits = scale * torch.bmm(f, t.transpose(1, 2))
        rows, cols = logits.log_softmax(dim=2), logits.log_softmax(dim=1)
        loss = -(rows.diagonal(dim1=1, dim2=2).mean(1) + cols.diagonal(dim1=1, dim2=2).mean(1)) / 2
        g = rows.exp_().add_(cols.exp_())
        g.diagonal(dim1=1, dim2=2).sub_(2.0)
        return loss, torch.bmm(g, t).mul_(scale / (2 * b))
    if kind == "prototype":
        logits = scale * torch.matmul(f, text.T)
        logp = logits.log_softmax(dim=-1)
        loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
        g = logp.exp_()
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(y, -1, dtype=g.dtype).unsqueeze(-1))
        return loss, torch.matmul(g, text).mul_(scale / b)
    raise ValueError(f"unknown loss {kind!r}")


class RowAdam:
    """``torch.optim.Adam``'s update (coupled L2 weight decay, no amsgrad) on tensors whose first dimension is
    the clients side by side. Rows that share their step count and learning rate (every row, when the state
    is reset each round) take one call of torch's own Adam (``torch.optim.adam.adam``: fused where the device
    has the fused kernel, as ``optim.make_adam`` chooses), elementwise, so a row's bits do not depend on the
    others; rows with their own counts (kept states of clients that trained in different rounds) take the
    same formula written out, each row with its own bias corrections."""

    def __init__(self, betas: Sequence[float], eps: float, weight_decay: float):
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], ms: list[torch.Tensor],
             vs: list[torch.Tensor], count: torch.Tensor, lr: torch.Tensor) -> None:
        """One update, in place, of ``params`` (gradients ``grads``, overwritten; moments ``ms``, ``vs``);
        ``count`` ``[G]`` float64: each row's step counter *before* this step; ``lr`` ``[G]`` float64."""
        c0, l0 = float(count[0]), float(lr[0])
        if bool((count == c0).all()) and bool((lr == l0).all()):
            from torch.optim.adam import adam

            from .optim import _fused_supported

            fused = _fused_supported(params[0].device, params[0].dtype)
            steps = [torch.tensor(c0, dtype=torch.float32, device=p.device if fused else "cpu") for p in params]
            adam(params, grads, ms, vs, [], steps, foreach=False, fused=fused, capturable=False,
                 differentiable=False, grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
                 beta1=self.beta1, beta2=self.beta2, lr=l0, weight_decay=self.weight_decay, eps=self.eps,
                 maximize=False)
            return
        step = count + 1
        bias1 = 1 - self.beta1 ** step
        bias2_sqrt = (1 - self.beta2 ** step).sqrt()
        for p, g, m, v in zip(params, grads, ms, vs):
            shape = (-1,) + (1,) * (p.dim() - 1)
            if self.weight_decay != 0:
                g.add_(p, alpha=self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = v.sqrt().div_(bias2_sqrt.to(p.dtype).view(shape)).add_(self.eps)
            p.sub_(m.div(denom).mul_((lr / bias1).to(p.dtype).view(shape)))


@dataclass
class ClientFit:
    """One client's local fit as the side-by-side trainer takes it."""

    steps: list[tuple[torch.Tensor, torch.Tensor]]  # its batches (features [b,d], labels [b]) in order, b >= 2
    start: torch.Tensor  # [width]: the adapter it starts from
    lr: float
    anchor: torch.Tensor | None = None  # FedProx: [width], the proximal term's centre
    mu: float = 0.0
    moments: tuple[torch.Tensor, torch.Tensor, float] | None = None  # kept Adam state: m, v rows and its step


@dataclass
class FitOutcome:
    """The chunk's trained adapters and Adam moments (flat rows in the clients' order), and per client its
    number of steps, images seen, correct predictions and summed batch loss."""

    rows: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    steps: torch.Tensor  # float64: Adam's step counters after the fit
    batches: list[int]
    seen: list[int]
    correct: list[int]
    loss_sum: list[float]


def _split(rows: torch.Tensor, layout: AdapterLayout) -> list[torch.Tensor]:
    """Flat rows ``[K, width]`` as the adapter's four stacked tensors, each contiguous (a copy)."""
    return [t.contiguous() for t in layout.views(rows)]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1)


def fit_side_by_side(fits: list[ClientFit], layout: AdapterLayout, loss: str, scale: float, text: torch.Tensor,
                     adam: RowAdam, device: torch.device) -> FitOutcome:
    """Train every client of ``fits`` on its own batches, side by side: at each step, the clients that take a
    step of the same batch size go through one batched forward, backward and Adam update. The adapters, their
    gradients and moments live as the adapter's four tensors stacked over the clients."""
    k = len(fits)
    start = torch.stack([f.start for f in fits]).to(device=device, dtype=torch.float32)
    w = _split(start, layout)
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    count = torch.zeros(k, dtype=torch.float64, device=device)
    kept = [j for j, f in enumerate(fits) if f.moments is not None]
    if kept:
        idx = torch.tensor(kept, device=device)
        for stacked, rows in ((m, [fits[j].moments[0] for j in kept]), (v, [fits[j].moments[1] for j in kept])):
            for t, part in zip(stacked, layout.views(torch.stack(rows).to(device=device, dtype=torch.float32))):
                t.index_copy_(0, idx, part.contiguous())
        count[idx] = torch.tensor([fits[j].moments[2] for j in kept], dtype=torch.float64, device=device)
    lr = torch.tensor([f.lr for f in fits], dtype=torch.float64, device=device)
    prox = [j for j, f in enumerate(fits) if f.anchor is not None and f.mu > 0]
    anchors = mus = None
    if prox:
        anchor_rows = torch.stack([f.anchor if f.anchor is not None else f.start for f in fits])
        anchors = _split(anchor_rows.to(device=device, dtype=torch.float32), layout)
        mus = torch.tensor([f.mu if j in prox else 0.0 for j, f in enumerate(fits)], dtype=torch.float32,
                           device=device)
    text = text.to(device=device, dtype=torch.float32)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.long, device=device)
    n_steps = max((len(f.steps) for f in fits), default=0)
    everyone = torch.arange(k, device=device)
    for s in range(n_steps):
        groups: dict[int, list[int]] = {}
        for j, f in enumerate(fits):
            if s < len(f.steps):
                groups.setdefault(int(f.steps[s][1].numel()), []).append(j)
        for ids in groups.values():
            whole = len(ids) == k
            idx = everyone if whole else torch.tensor(ids, device=device)

            def rows(ts):
                return ts if whole else [t.index_select(0, idx) for t in ts]

            x = torch.stack([fits[j].steps[s][0] for j in ids]).to(device=device, dtype=torch.float32)
            y = torch.stack([fits[j].steps[s][1] for j in ids]).to(device)
            p = rows(w)
            feats, saved = adapter_features(p, x)
            batch_loss, grad_f = loss_and_grad(loss, scale, feats, text, y)
            grads = adapter_backward(p, x, feats, saved, grad_f)
            if anchors is not None:
                mu = mus if whole else mus.index_select(0, idx)
                prox_sum = torch.zeros_like(batch_loss)
                for t, a, g in zip(p, rows(anchors), grads):
                    diff = t - a
                    prox_sum += (diff * diff).reshape(len(ids), -1).sum(1)
                    g.add_(diff.mul_(mu.view((-1,) + (1,) * (t.dim() - 1))))
                batch_loss = batch_loss + (mu / 2) * prox_sum
            hits = (torch.matmul(feats, text.T).argmax(dim=-1) == y).sum(1)
            mm, vv = rows(m), rows(v)
            adam.step(p, grads, mm, vv, count.index_select(0, idx), lr.index_select(0, idx))
            count.index_add_(0, idx, torch.ones(len(ids), dtype=torch.float64, device=device))
            if not whole:
                for dst, src in ((w, p), (m, mm), (v, vv)):
                    for t, part in zip(dst, src):
                        t.index_copy_(0, idx, part)
            loss_sum.index_add_(0, idx, batch_loss.to(torch.float64))
            correct.index_add_(0, idx, hits)
    return FitOutcome(rows=_join(w), m=_join(m), v=_join(v), steps=count, batches=[len(f.steps) for f in fits],
                      seen=[sum(int(yb.numel()) for _, yb in f.steps) for f in fits],
                      correct=correct.tolist(), loss_sum=loss_sum.tolist())


# -- evaluation --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_side_by_side(rows: torch.Tensor | None, layout: AdapterLayout | None, sets: list[tuple[int, torch.Tensor, torch.Tensor]],
                          scale: float, text: torch.Tensor, device: torch.device,
                          budget: int = 1 << 24) -> list[tuple[int, float, int]]:
    """``(correct, summed cross-entropy, n)`` of each evaluation set ``(row, features [n,d], labels [n])``:
    scored by the adapter in row ``row`` of ``rows`` (``rows`` None: zero-shot, the features as they are),
    with the loss and prediction of ``CLIPClient.validation_step``. Sets scored by the same row go through
    one product; sets of different rows, through batched products of sets of about the same size (padded
    to the longest of their group, the padding masked out). ``budget``: values per product."""
    text = text.to(device=device, dtype=torch.float32)
    out: list[tuple[int, float, int] | None] = [None] * len(sets)
    if rows is None or rows.shape[0] == 1:
        # One model for every set: the sets concatenated, scored in pieces of the budget.
        sizes = [int(y.numel()) for _, _, y in sets]
        x = torch.cat([xs for _, xs, _ in sets]) if sets else torch.empty(0)
        y = torch.cat([ys for _, _, ys in sets]) if sets else torch.empty(0, dtype=torch.long)
        per = max(1, budget // (int(x.shape[-1]) + (layout.h if layout else 0) + int(text.shape[0])))
        losses, hits = [], []
        for i in range(0, len(y), per):
            xb = x[i : i + per].to(device=device, dtype=torch.float32)
            yb = y[i : i + per].to(device)
            lo, hi = _score(None if rows is None else rows[:1].to(device), layout, xb.unsqueeze(0), yb.unsqueeze(0),
                            scale, text)
            losses.append(lo[0].double())
            hits.append(hi[0])
        loss = torch.cat(losses) if losses else torch.empty(0, dtype=torch.float64)
        hit = torch.cat(hits) if hits else torch.empty(0, dtype=torch.bool)
        start = 0
        for j, n in enumerate(sizes):
            out[j] = (int(hit[start : start + n].sum()), float(loss[start : start + n].sum()), n)
            start += n
        return out  # type: ignore[return-value]
    order = sorted(range(len(sets)), key=lambda j: int(sets[j][2].numel()))
    j = 0
    while j < len(order):
        longest = max(1, int(sets[order[j]][2].numel()))
        # As many sets as the budget holds at the length of the longest (the last of the sorted group).
        group = [order[j]]
        while j + len(group) < len(order):
            nxt = order[j + len(group)]
            longest = max(1, int(sets[nxt][2].numel()))
            if (len(group) + 1) * longest * (layout.h + layout.d + text.shape[0]) > budget:
                break
            group.append(nxt)
        longest = max(1, max(int(sets[i][2].numel()) for i in group))
        x = torch.zeros(len(group), longest, layout.d, device=device)
        y = torch.zeros(len(group), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(group), longest, dtype=torch.bool, device=device)
        for g, i in enumerate(group):
            n = int(sets[i][2].numel())
            x[g, :n] = sets[i][1].to(device=device, dtype=torch.float32)
            y[g, :n] = sets[i][2].to(device)
            mask[g, :n] = True
        idx = torch.tensor([sets[i][0] for i in group], device=rows.device)
        lo, hi = _score(rows.index_select(0, idx).to(device), layout, x, y, scale, text)
        lo = lo.double().masked_fill_(~mask, 0).sum(1)
        hi = (hi & mask).sum(1)
        for g, i in enumerate(group):
            out[i] = (int(hi[g]), float(lo[g]), int(sets[i][2].numel()))
        j += len(group)
    return out  # type: ignore[return-value]


def _score(rows, layout, x, y, scale, text):
    """Per image: cross-entropy of ``scale * f @ text^T`` against its label, and whether its argmax is it."""
    if rows is None:
        f = F.normalize(x, dim=-1)
    else:
        f = adapter_features(layout.views(rows), x)[0]
    logits = scale * torch.matmul(f, text.T)
    loss = -logits.log_softmax(dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return loss, logits.argmax(dim=-1) == y
