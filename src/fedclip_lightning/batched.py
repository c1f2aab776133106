"""Clients side by side: many FedCLIP adapter clients trained and evaluated together in batched products.

On cached features a client's local fit is a few small products per batch, so cut into one client at a
time, a round of thousands of clients costs its Python and kernel launches, not its arithmetic. Here the
clients of a round train together: their adapters are the adapter's four tensors stacked over the clients
(a client's flat row, ``[P]``, is what travels), each step's forward and written-out backward are ``bmm``
over the clients that take a step of the same batch size, and torch's Adam updates their rows at once.
Each client still sees exactly its own batches, in its own order, for its own number of steps (a client
with fewer batches simply takes no part in the later steps); nothing is padded into a result.

The arithmetic is the one-at-a-time fit's (``AdapterFunction``, ``ContrastiveLoss``/``PrototypeLoss``,
``torch.optim.Adam`` with coupled L2 weight decay), in batched kernels: equal to float rounding, not
bitwise (``docs/many_clients.md`` states the tolerance and ``tests/test_batched.py`` holds it). A row's
result does not depend on which other clients share its products (``bmm`` below), so 1 or 2 processes,
or a Flower node holding one client, compute the same bits.

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


def bmm(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (plus ``add``) per row, ``[G, n, k] @ [G, k, m]``, by the batched kernel for every ``G``: a
    batch of one is computed as the first of two (torch's CPU ``bmm`` gives a batch of one to another kernel,
    whose last bits differ for some sizes), so a row's result does not depend on how many rows share the
    product."""
    one = a.shape[0] == 1
    if one:
        a, b = a.expand(2, -1, -1), b.expand(2, -1, -1)
        add = None if add is None else add.expand(2, -1, -1)
    out = torch.bmm(a, b) if add is None else torch.baddbmm(add, a, b)
    return out[:1] if one else out


def class_logits(f: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``f [G,n,d] @ text^T`` as one product per row (``matmul`` would fold the rows into one matrix whose
    blocking follows ``G``)."""
    return bmm(f, text.T.expand(f.shape[0], -1, -1))


def adapter_features(parts, x: torch.Tensor):
    """``normalize(softmax(W2 tanh(W1 x + b1) + b2) * x)`` of each row's adapter ``parts = (W1 [G,h,d], b1 [G,h],
    W2 [G,d,h], b2 [G,d])`` on its own ``x [G,b,d]`` (``x`` may be expanded over the rows: one set of images,
    every adapter). Returns the features and what the backward needs."""
    w1, b1, w2, b2 = parts
    h = torch.tanh(bmm(x, w1.transpose(1, 2), b1.unsqueeze(1)))
    a = torch.softmax(bmm(h, w2.transpose(1, 2), b2.unsqueeze(1)), dim=-1)
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
    dz1 = bmm(dz2, w2).mul_(1 - h * h)
    return [bmm(dz1.transpose(1, 2), x), dz1.sum(1), bmm(dz2.transpose(1, 2), h), dz2.sum(1)]


def loss_and_grad(kind: str, scale: float, f: torch.Tensor, text: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's CLIP loss (``[G]``) of its features ``f [G,b,d]`` against the prompts ``text [C,d]``,
    labels ``y [G,b]``, and its gradient with respect to ``f``: ``ContrastiveLoss`` / ``PrototypeLoss``
    per row."""
    b = y.shape[1]
    if kind == "contrastive":
        t = text[y]
        logits = scale * bmm(f, t.transpose(1, 2))
        rows, cols = logits.log_softmax(dim=2), logits.log_softmax(dim=1)
        loss = -(rows.diagonal(dim1=1, dim2=2).mean(1) + cols.diagonal(dim1=1, dim2=2).mean(1)) / 2
        g = rows.exp_().add_(cols.exp_())
        g.diagonal(dim1=1, dim2=2).sub_(2.0)
        return loss, bmm(g, t).mul_(scale / (2 * b))
    if kind == "prototype":
        logits = scale * class_logits(f, text)
        logp = logits.log_softmax(dim=-1)
        loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
        g = logp.exp_()
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(y, -1, dtype=g.dtype).unsqueeze(-1))
        return loss, bmm(g, text.expand(g.shape[0], -1, -1)).mul_(scale / b)
    raise ValueError(f"unknown loss {kind!r}")


class RowAdam:
    """``torch.optim.Adam``'s update (coupled L2 weight decay, no amsgrad) on tensors whose first dimension is
    the clients side by side: torch's own Adam (``torch.optim.adam.adam``, fused where the device has the
    fused kernel, as ``optim.make_adam`` chooses) over the rows that share a step count and learning rate
    (every row, when the state is reset each round). Elementwise, so a row's bits do not depend on the
    others."""

    def __init__(self, betas: Sequence[float], eps: float, weight_decay: float):
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], ms: list[torch.Tensor],
             vs: list[torch.Tensor], count: torch.Tensor, lr: torch.Tensor) -> None:
        """One update, in place, of ``params`` (gradients ``grads``; moments ``ms``, ``vs``); ``count``
        ``[G]`` float64: each row's step counter *before* this step; ``lr`` ``[G]`` float64. Rows that share
        their counter and learning rate take one call of torch's Adam; each other set of rows, its own."""
        keys = torch.stack([count, lr], dim=1)
        if bool((keys == keys[0]).all()):
            self._adam(params, grads, ms, vs, float(count[0]), float(lr[0]))
            return
        uniq, which = torch.unique(keys, dim=0, return_inverse=True)
        for u in range(len(uniq)):
            idx = (which == u).nonzero().flatten()
            sub = [[t.index_select(0, idx) for t in ts] for ts in (params, grads, ms, vs)]
            self._adam(*sub, float(uniq[u, 0]), float(uniq[u, 1]))
            for dst, src in zip((params, ms, vs), (sub[0], sub[2], sub[3])):
                for t, part in zip(dst, src):
                    t.index_copy_(0, idx, part)

    def _adam(self, params, grads, ms, vs, count: float, lr: float) -> None:
        from torch.optim.adam import adam

        from .optim import _fused_supported

        fused = _fused_supported(params[0].device, params[0].dtype)
        steps = [torch.tensor(count, dtype=torch.float32, device=p.device if fused else "cpu") for p in params]
        adam(params, grads, ms, vs, [], steps, foreach=False, fused=fused, capturable=False, differentiable=False,
             grad_scale=None, found_inf=None, has_complex=False, amsgrad=False, beta1=self.beta1,
             beta2=self.beta2, lr=lr, weight_decay=self.weight_decay, eps=self.eps, maximize=False)


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
    m: torch.Tensor | None
    v: torch.Tensor | None
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
                     adam: RowAdam, device: torch.device, moments: bool = True) -> FitOutcome:
    """Train every client of ``fits`` on its own batches, side by side: at each step, the clients that take a
    step of the same batch size go through one batched forward, backward and Adam update. The adapters, their
    gradients and moments live as the adapter's four tensors stacked over the clients, the clients ordered by
    their batch sizes so that a step's group is a run of neighbours, trained in place on views (no gathering).
    ``moments=False``: the outcome leaves Adam's moments out (``m``, ``v`` None: a state reset each round is
    not kept)."""
    k = len(fits)
    sizes = [[int(y.numel()) for _, y in f.steps] for f in fits]
    order = sorted(range(k), key=lambda j: sizes[j])
    fs, sz = [fits[j] for j in order], [sizes[j] for j in order]
    w = _stack([f.start for f in fs], layout, device)
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    count = torch.zeros(k, dtype=torch.float64, device=device)
    for j, f in enumerate(fs):
        if f.moments is not None:
            for stacked, row in ((m, f.moments[0]), (v, f.moments[1])):
                for t, part in zip(stacked, layout.views(row.unsqueeze(0).to(device=device, dtype=torch.float32))):
                    t[j].copy_(part[0])
            count[j] = f.moments[2]
    lr = torch.tensor([f.lr for f in fs], dtype=torch.float64, device=device)
    anchors = mus = None
    if any(f.anchor is not None and f.mu > 0 for f in fs):
        anchors = _stack([f.anchor if f.anchor is not None else f.start for f in fs], layout, device)
        mus = torch.tensor([f.mu if f.anchor is not None else 0.0 for f in fs], dtype=torch.float32, device=device)
    text = text.to(device=device, dtype=torch.float32)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.long, device=device)
    for s in range(max((len(z) for z in sz), default=0)):
        j = 0
        while j < k:
            if s >= len(sz[j]):
                j += 1
                continue
            a, b = j, sz[j][s]
            while j < k and s < len(sz[j]) and sz[j][s] == b:
                j += 1
            _step(fs[a:j], s, [t[a:j] for t in w], [t[a:j] for t in m], [t[a:j] for t in v],
                  None if anchors is None else ([t[a:j] for t in anchors], mus[a:j]), count[a:j], lr[a:j],
                  loss_sum[a:j], correct[a:j], loss, scale, text, adam, device)
    back = torch.tensor(order, device=device)

    def unsort(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t).index_copy_(0, back, t)

    return FitOutcome(rows=unsort(_join(w)), m=unsort(_join(m)) if moments else None,
                      v=unsort(_join(v)) if moments else None, steps=unsort(count),
                      batches=[len(z) for z in sizes], seen=[sum(z) for z in sizes],
                      correct=unsort(correct).tolist(), loss_sum=unsort(loss_sum).tolist())


def _stack(rows: list[torch.Tensor], layout: AdapterLayout, device) -> list[torch.Tensor]:
    """Flat rows as the adapter's four tensors stacked over the clients (one row shared by all: expanded)."""
    if all(r is rows[0] for r in rows):
        one = layout.views(rows[0].unsqueeze(0).to(device=device, dtype=torch.float32))
        return [t.expand(len(rows), *t.shape[1:]).contiguous() for t in one]
    return _split(torch.stack(rows).to(device=device, dtype=torch.float32), layout)


def _step(fits, s: int, p, m, v, prox, count, lr, loss_sum, correct, loss: str, scale: float, text, adam, device):
    """Step ``s`` of a run of clients whose step ``s`` has the same batch size, in place on their rows' views."""
    x = torch.stack([f.steps[s][0] for f in fits]).to(device=device, dtype=torch.float32)
    y = torch.stack([f.steps[s][1] for f in fits]).to(device)
    feats, saved = adapter_features(p, x)
    batch_loss, grad_f = loss_and_grad(loss, scale, feats, text, y)
    grads = adapter_backward(p, x, feats, saved, grad_f)
    if prox is not None:
        anchors, mu = prox
        prox_sum = torch.zeros_like(batch_loss)
        for t, a, g in zip(p, anchors, grads):
            diff = t - a
            prox_sum += (diff * diff).reshape(len(fits), -1).sum(1)
            g.add_(diff.mul_(mu.view((-1,) + (1,) * (t.dim() - 1))))
        batch_loss = batch_loss + (mu / 2) * prox_sum
    hits = (class_logits(feats, text).argmax(dim=-1) == y).sum(1)
    adam.step(p, grads, m, v, count, lr)
    count += 1
    loss_sum += batch_loss.to(torch.float64)
    correct += hits


# -- evaluation --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_side_by_side(rows: torch.Tensor | None, layout: AdapterLayout | None,
                          sets: list[tuple[int | None, torch.Tensor, torch.Tensor]], scale: float, text: torch.Tensor,
                          device: torch.device, budget: int = 1 << 24) -> list[tuple[int, float, int, torch.Tensor]]:
    """``(correct, summed cross-entropy, n, confusion [C, C])`` of each evaluation set ``(row, features [n,d], labels [n])``,
    scored by the adapter in row ``row`` of ``rows`` (``row`` None: the frozen model, the features as they
    are) with the loss and prediction of ``CLIPClient.validation_step``. The sets of one length go through
    one batched product (as many as ``budget`` values hold), each set on its own adapter: nothing padded,
    and a set's result does not depend on the others."""
    text = text.to(device=device, dtype=torch.float32)
    c = text.shape[0]
    out: list[tuple[int, float, int, torch.Tensor]] = [(0, 0.0, 0, torch.zeros(c, c, dtype=torch.long))] * len(sets)
    groups: dict[tuple[bool, int], list[int]] = {}
    for j, (r, _, y) in enumerate(sets):
        if y.numel():
            groups.setdefault((r is None, int(y.numel())), []).append(j)
    width = 0 if rows is None else rows.shape[1]
    for (frozen, n), ids in groups.items():
        d = sets[ids[0]][1].shape[-1]
        per = max(1, budget // (n * (2 * d + (0 if layout is None else layout.h) + text.shape[0]) + width))
        for i in range(0, len(ids), per):
            part = ids[i : i + per]
            x = torch.stack([sets[j][1] for j in part]).to(device=device, dtype=torch.float32)
            y = torch.stack([sets[j][2] for j in part]).to(device)
            if frozen:
                f = F.normalize(x, dim=-1)
            else:
                idx = torch.tensor([sets[j][0] for j in part], device=rows.device)
                f = adapter_features(layout.views(rows.index_select(0, idx).to(device)), x)[0]
            logits = scale * class_logits(f, text)
            loss = -logits.log_softmax(dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            pred = logits.argmax(dim=-1)
            hits = (pred == y).sum(1).tolist()
            sums = loss.double().sum(1).tolist()
            flat = (y * c + pred).cpu()
            for k, (j, h, lo) in enumerate(zip(part, hits, sums)):
                out[j] = (h, lo, n, torch.bincount(flat[k], minlength=c * c).reshape(c, c))
    return out
