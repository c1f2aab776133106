"""One local FedCLIP training step, two ways, side by side: plain autograd and the package's autograd.Functions.

A step is what a client does per batch on cached frozen features: adapter
forward, loss, backward, Adam update. FedCLIP adapter at d = 512 (ViT-B-32's
width, 525,312 parameters), batch 32, the reference contrastive loss, the
reference Adam hyperparameters, fp32 on the CPU:

* (a) plain autograd: the adapter as ``nn.Linear`` layers with ``F.softmax`` /
  ``F.normalize``, the loss in plain ``F`` operations, ``loss.backward()``,
  ``torch.optim.Adam(fused=True).step()``;
* (b) the package: ``AttentionAdapter`` (``AdapterFunction``) +
  ``losses.clip_loss`` (``ContrastiveLoss``) + ``loss.backward()`` +
  ``make_adam(..., buffer=row).step()``; also split into forward+backward and
  the optimiser step;
The two run interleaved (a block of steps of each in turn, many times), on
the same batches, from the same initial adapter, after a warm-up; the table
gives the median time per step. At the end (a) and (b) must hold the same
weights to float rounding (the package's gradients are bitwise the hand-written reference's:
``tests/test_step_functions.py``).

    python benchmarks/step.py [--dim 512] [--batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fedclip_lightning.model.adapter import AttentionAdapter
from fedclip_lightning.model.losses import clip_loss
from fedclip_lightning.optim import AdamStateArena, adam_buffer_size, make_adam


class Algo:
    lr, betas, eps, weight_decay = 5e-5, [0.9, 0.98], 1e-6, 0.2


# -- the three steps ------------------------------------------------------------------------------

def plain_step(fc1: nn.Linear, fc2: nn.Linear, params, opt, scale, x, text, y) -> tuple[float, float]:
    t0 = time.perf_counter()
    for p in params:  # as the client loop does (cheaper than opt.zero_grad's profiler-wrapped loop)
        p.grad = None
    feats = F.normalize(F.softmax(fc2(torch.tanh(fc1(x))), dim=-1) * x, dim=-1)
    logits = scale * feats @ text[y].T
    targets = torch.arange(y.numel())
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    return t1 - t0, time.perf_counter() - t1


def function_step(ad: AttentionAdapter, params, opt, scale, x, text, y) -> tuple[float, float]:
    t0 = time.perf_counter()
    for p in params:
        p.grad = None
    loss = clip_loss("contrastive", scale, ad(x), text, y)
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=40, help="interleaved blocks per method")
    ap.add_argument("--block", type=int, default=50, help="steps per block")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    d, b = args.dim, args.batch
    n_batches = 64
    xs = [torch.randn(b, d) for _ in range(n_batches)]
    ys = [torch.randint(0, args.classes, (b,)) for _ in range(n_batches)]
    text = F.normalize(torch.randn(args.classes, d), dim=-1)
    scale = 100.0
    kw = dict(lr=Algo.lr, betas=tuple(Algo.betas), eps=Algo.eps, weight_decay=Algo.weight_decay)

    base = AttentionAdapter(d)
    # (a)
    a_ad = copy.deepcopy(base)
    a_params = list(a_ad.parameters())
    a_opt = torch.optim.Adam(a_params, fused=True, **kw)
    # (b)
    b_ad = copy.deepcopy(base)
    size = adam_buffer_size(list(b_ad.parameters()))
    arena = AdamStateArena(size, rows=1, device=torch.device("cpu"))
    b_params = list(b_ad.parameters())
    b_opt = make_adam(b_params, Algo, buffer=arena.buffer_for(0))

    runners = {
        "a": lambda i: plain_step(a_ad.fc1, a_ad.fc2, a_params, a_opt, scale, xs[i], text, ys[i]),
        "b": lambda i: function_step(b_ad, b_params, b_opt, scale, xs[i], text, ys[i]),
    }
    counter = {k: 0 for k in runners}

    def run(key: str, n: int, times: list | None) -> None:
        for _ in range(n):
            fb, opt = runners[key](counter[key] % n_batches)
            counter[key] += 1
            if times is not None:
                times.append((fb, opt))

    for key in runners:  # warm-up: allocator, kernels, lazily created state
        run(key, args.warmup, None)
    times = {k: [] for k in runners}
    start = time.perf_counter()
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))  # no method always runs first
        for key in order:
            run(key, args.block, times[key])
    elapsed = time.perf_counter() - start

    # The same number of steps on the same batches: (a) and (b) the same to float rounding.
    close_ab = all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a_ad.parameters(), b_ad.parameters()))
    bitwise_ab = all(torch.equal(p, q) for p, q in zip(a_ad.parameters(), b_ad.parameters()))

    med = {k: statistics.median(fb + o for fb, o in v) * 1e3 for k, v in times.items()}
    med_fb = {k: statistics.median(fb for fb, _ in v) * 1e3 for k, v in times.items()}
    med_opt = {k: statistics.median(o for _, o in v) * 1e3 for k, v in times.items()}
    labels = {
        "a": "(a) plain autograd: nn.Linear + F ops + Adam(fused).step()",
        "b": "(b) AdapterFunction + ContrastiveLoss + make_adam().step()",
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; d={d}, batch={b}, contrastive loss, "
          f"{sum(p.numel() for p in base.parameters()):,} adapter parameters")
    print(f"{args.rounds} interleaved blocks x {args.block} steps per method after {args.warmup} warm-up steps "
          f"({len(times['a'])} timed steps each, {elapsed:.1f} s)")
    print()
    w = max(len(s) for s in labels.values())
    print(f"{'step':<{w}}  {'ms/step':>8}  {'vs (a)':>7}  {'fwd+bwd':>8}  {'optim':>7}")
    for k in runners:
        print(f"{labels[k]:<{w}}  {med[k]:8.3f}  {med[k] / med['a']:6.2f}x  {med_fb[k]:8.3f}  {med_opt[k]:7.3f}")
    print()
    print(f"(b) split: forward+backward {med_fb['b']:.3f} ms + optimiser step {med_opt['b']:.3f} ms "
          f"(medians of each part; their sum need not equal the median step)")
    print(f"weights after {counter['b']} steps: (a) ~ (b) to rounding: {close_ab} (bitwise: {bitwise_ab})")


if __name__ == "__main__":
    main()
