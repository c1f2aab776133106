"""The training step's pieces: ``AdapterFunction``, the loss Functions and ``make_adam``.

The project's gradients used to be written out by hand outside autograd
(``AttentionAdapter.forward_train`` / ``backward``, ``client.clip_loss_and_grad``)
and Adam stepped through a private torch kernel (``optim.adam_step``). Those
functions are kept verbatim in ``old_hand_path.py`` (``old_*``) as the reference: the autograd Functions
and ``torch.optim.Adam.step()`` that replace them must give bitwise the same
features, losses, gradients and updates, and gradients equal to plain autograd's
to float rounding.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedclip_lightning.model.adapter import AdapterFunction, AttentionAdapter
from fedclip_lightning.model.losses import LOSSES, ContrastiveLoss, PrototypeLoss, clip_loss, proximal_term
from fedclip_lightning.optim import AdamStateArena, adam_buffer_size, init_adam_state, make_adam
from old_hand_path import old_backward, old_clip_loss, old_clip_loss_and_grad, old_forward, old_forward_train

KINDS = ["contrastive", "prototype"]


class Algo:
    """The fields of an AlgorithmConfig that make_adam reads."""

    def __init__(self, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2):
        self.lr, self.betas, self.eps, self.weight_decay = lr, list(betas), eps, weight_decay


# -- helpers -------------------------------------------------------------------------------------

def trained_adapter(dim: int, seed: int = 0) -> AttentionAdapter:
    """An adapter with a trained-looking (not near-uniform) attention."""
    torch.manual_seed(seed)
    adapter = AttentionAdapter(dim)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return adapter


def problem(dim: int, batch: int, classes: int = 7, seed: int = 1):
    """Raw features, normalised prompt features with repeated labels, and CLIP's scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g) * 3
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, text, y, 100.0


def plain_linear_adapter(adapter: AttentionAdapter):
    """The adapter as nn.Linear layers with F.softmax / F.normalize, on copies of its weights."""
    fc1, fc2 = copy.deepcopy(adapter.fc1), copy.deepcopy(adapter.fc2)

    def forward(x):
        x = x.float()
        return F.normalize(F.softmax(fc2(torch.tanh(fc1(x))), dim=-1) * x, dim=-1)

    return forward, [fc1.weight, fc1.bias, fc2.weight, fc2.bias]


def grads(adapter: AttentionAdapter) -> list[torch.Tensor]:
    return [p.grad for p in adapter.parameters()]


# -- AdapterFunction: forward --------------------------------------------------------------------

@pytest.mark.parametrize("dim", [64, 512])
def test_forward_is_bitwise_the_previous_forward(dim):
    adapter = trained_adapter(dim)
    fresh = AttentionAdapter(dim)  # and the near-uniform initial attention
    for batch in range(1, 34):
        x = torch.randn(batch, dim) * 3
        for ad in (adapter, fresh):
            want = old_forward(ad, x).detach()
            with torch.no_grad():
                assert torch.equal(ad(x), want), batch
                assert torch.equal(ad.forward_autograd(x), want), batch
            out = ad(x)
            assert out.requires_grad and torch.equal(out.detach(), want), batch
            assert torch.equal(ad.forward_autograd(x).detach(), want), batch
            assert torch.equal(old_forward_train(ad, x)[0], want), batch


def test_forward_half_input_and_other_shapes():
    adapter = trained_adapter(32)
    x = torch.randn(5, 32)
    for inp in (x.half(), x.bfloat16()):
        assert torch.equal(adapter(inp), old_forward(adapter, inp))
    x3 = torch.randn(2, 3, 32)
    assert torch.equal(adapter(x3), old_forward(adapter, x3))
    assert torch.equal(adapter(x3[0, 0]), old_forward(adapter, x3[0, 0]))


# -- AdapterFunction: backward -------------------------------------------------------------------

@pytest.mark.parametrize("dim", [64, 512])
def test_backward_is_bitwise_the_previous_hand_written_backward(dim):
    adapter, ref = trained_adapter(dim), trained_adapter(dim)
    for batch in (1, 2, 5, 32, 33):
        x = torch.randn(batch, dim) * 3
        g = torch.randn(batch, dim)
        f, saved = old_forward_train(ref, x)
        old_backward(ref, saved, g)
        for p in adapter.parameters():
            p.grad = None
        out = adapter(x)
        out.backward(g)
        assert torch.equal(out.detach(), f)
        for name, new, old in zip(["w1", "b1", "w2", "b2"], grads(adapter), grads(ref)):
            assert torch.equal(new, old), (batch, name)


def test_gradcheck_float64_including_the_input():
    torch.manual_seed(0)
    d = 6
    w1, w2 = (torch.randn(d, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.randn(d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for shape in [(4, d), (2, 3, d), (d,)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(AdapterFunction.apply, (x, w1, b1, w2, b2))
    # Only some inputs requiring grad: the others get None.
    x = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(AdapterFunction.apply, (x, w1.detach(), b1.detach(), w2.detach(), b2))
    x0 = x.detach()
    assert torch.autograd.gradcheck(AdapterFunction.apply, (x0, w1, b1.detach(), w2.detach(), b2.detach()))


def test_input_gradient_matches_autograd_float32():
    adapter = trained_adapter(64)
    x = (torch.randn(9, 64) * 3).requires_grad_()
    g = torch.randn(9, 64)
    (dx,) = torch.autograd.grad(adapter(x), x, g)
    forward, _ = plain_linear_adapter(adapter)
    (want,) = torch.autograd.grad(forward(x), x, g)
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-6)


def test_no_double_backward():
    adapter = trained_adapter(8)
    out = adapter(torch.randn(3, 8))
    (gw,) = torch.autograd.grad(out.sum(), adapter.fc1.weight, create_graph=True)
    with pytest.raises(RuntimeError):
        gw.sum().backward()


# -- losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_loss_value_and_gradient_are_bitwise_the_previous(kind):
    for dim, batch in [(64, 2), (64, 3), (64, 17), (512, 32), (512, 33)]:
        x, text, y, scale = problem(dim, batch, seed=batch)
        feats = F.normalize(x, dim=-1)
        old_loss, old_grad = old_clip_loss_and_grad(kind, scale, feats, text, y)
        leaf = feats.clone().requires_grad_()
        loss = clip_loss(kind, scale, leaf, text, y)
        assert loss.grad_fn is not None and type(loss.grad_fn).__name__.startswith(LOSSES[kind].__name__)
        assert torch.equal(loss.detach(), old_loss), (dim, batch)
        loss.backward()
        assert torch.equal(leaf.grad, old_grad), (dim, batch)
        # The same value as the plain-op formula, with or without grad.
        assert torch.equal(old_loss, old_clip_loss(kind, scale, feats, text, y))
        with torch.no_grad():
            assert torch.equal(clip_loss(kind, scale, feats, text, y), old_loss)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_gradient_scales_with_the_upstream_gradient(kind):
    x, text, y, scale = problem(32, 6)
    feats = F.normalize(x, dim=-1).requires_grad_()
    (got,) = torch.autograd.grad(0.25 * clip_loss(kind, scale, feats, text, y) + 1.0, feats)
    (want,) = torch.autograd.grad(0.25 * old_clip_loss(kind, scale, feats, text, y) + 1.0, feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_text_or_tensor_scale_take_the_plain_ops(kind):
    """Fine-tuned CLIP: the prompts or logit_scale train, or the scale is a tensor: the previous
    clip_loss's operations, so loss and every autograd gradient are bitwise the previous ones."""
    x, text, y, _ = problem(32, 6)
    feats = F.normalize(x, dim=-1)
    logit_scale = torch.tensor(4.6052)
    for text_grad, scale_grad in [(True, False), (False, True), (True, True), (False, False)]:
        results = []
        for fn in (clip_loss, old_clip_loss):
            f = feats.clone().requires_grad_()
            t = text.clone().requires_grad_(text_grad)
            ls = logit_scale.clone().requires_grad_(scale_grad)
            loss = fn(kind, ls.exp(), f, t, y)
            inputs = [f] + [t] * text_grad + [ls] * scale_grad
            results.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
        assert all(torch.equal(a, b) for a, b in zip(*results)), (text_grad, scale_grad)
    # plain=True forces the plain operations with a float scale and frozen prompts as well.
    f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    loss = clip_loss(kind, 100.0, f1, text, y, plain=True)
    assert "Backward" in type(loss.grad_fn).__name__ and loss.grad_fn.name() != LOSSES[kind].__name__
    (g1,) = torch.autograd.grad(loss, f1)
    (g2,) = torch.autograd.grad(old_clip_loss(kind, 100.0, f2, text, y), f2)
    assert torch.equal(g1, g2)


def test_unknown_loss_kind():
    x, text, y, scale = problem(8, 3)
    with pytest.raises(ValueError) as info:
        clip_loss("triplet", scale, x, text, y)
    msg = str(info.value)
    assert "'triplet'" in msg and "contrastive" in msg and "prototype" in msg
    assert set(LOSSES) == {"contrastive", "prototype"}
    assert LOSSES["contrastive"] is ContrastiveLoss and LOSSES["prototype"] is PrototypeLoss


def test_proximal_term():
    a = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    anchor = {"w": torch.tensor([0.0, 4.0])}
    assert proximal_term(0.0, a, anchor) == 0.0 and proximal_term(0.5, a, None) == 0.0
    term = proximal_term(0.5, a, anchor)
    assert torch.equal(term, torch.tensor(0.25 * 5.0))
    term.backward()
    assert torch.equal(a["w"].grad, torch.tensor([0.5, -1.0]))


# -- adapter + loss: one training step's gradients ------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [64, 512])
def test_step_gradients_bitwise_old_hand_path_and_close_to_autograd(kind, dim):
    adapter, ref = trained_adapter(dim), trained_adapter(dim)
    for batch in (2, 5, 32):
        x, text, y, scale = problem(dim, batch, seed=batch)
        # The previous hand-written step.
        feats_old, saved = old_forward_train(ref, x)
        loss_old, grad_old = old_clip_loss_and_grad(kind, scale, feats_old, text, y)
        old_backward(ref, saved, grad_old)
        # The autograd Functions.
        for p in adapter.parameters():
            p.grad = None
        feats = adapter(x)
        loss = clip_loss(kind, scale, feats, text, y)
        loss.backward()
        assert torch.equal(feats.detach(), feats_old) and torch.equal(loss.detach(), loss_old)
        for name, new, old in zip(["w1", "b1", "w2", "b2"], grads(adapter), grads(ref)):
            assert torch.equal(new, old), (batch, name)
        # Plain nn.Linear / F.softmax autograd, to float rounding.
        forward, params = plain_linear_adapter(adapter)
        want_loss = old_clip_loss(kind, scale, forward(x), text, y)
        want = torch.autograd.grad(want_loss, params)
        torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-6, atol=1e-6)
        for name, new, w in zip(["w1", "b1", "w2", "b2"], grads(adapter), want):
            assert w.abs().max() > 0, name
            torch.testing.assert_close(new, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()), msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_autograd_and_plain_loss_are_bitwise_the_previous_autograd_step(kind):
    """The previous FedProx step with an adapter: the plain forward, the plain loss and the proximal
    term, differentiated by autograd. forward_autograd + clip_loss(plain=True) reproduce it bitwise."""
    adapter = trained_adapter(64)
    anchor = {k: v.detach() + 0.01 for k, v in adapter.named_parameters()}
    x, text, y, scale = problem(64, 8)
    results = []
    for new in (True, False):
        ad = copy.deepcopy(adapter)
        feats = ad.forward_autograd(x) if new else old_forward(ad, x)
        loss = (clip_loss(kind, scale, feats, text, y, plain=True) if new else old_clip_loss(kind, scale, feats, text, y))
        loss = loss + proximal_term(0.5, dict(ad.named_parameters()), anchor)
        loss.backward()
        results.append([loss.detach(), *grads(ad)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_bitwise_the_previous_path(kind):
    """Several full steps (forward, loss, backward, Adam) of the new path against the previous one
    (hand-written gradients, then the same fused Adam update): bitwise the same weights throughout."""
    dim = 64
    adapter, ref = AttentionAdapter(dim), None
    ref = copy.deepcopy(adapter)
    algo = Algo(lr=1e-3)
    arena = AdamStateArena(adam_buffer_size(list(adapter.parameters())), rows=1, device=torch.device("cpu"))
    opt = make_adam(adapter.parameters(), algo, buffer=arena.buffer_for(None))
    opt_ref = torch.optim.Adam(ref.parameters(), lr=algo.lr, betas=tuple(algo.betas), eps=algo.eps,
                               weight_decay=algo.weight_decay, fused=True)
    for step in range(6):
        x, text, y, scale = problem(dim, 12, seed=step)
        opt.zero_grad(set_to_none=True)
        loss = clip_loss(kind, scale, adapter(x), text, y)
        loss.backward()
        opt.step()
        f, saved = old_forward_train(ref, x)
        loss_ref, g = old_clip_loss_and_grad(kind, scale, f, text, y)
        old_backward(ref, saved, g)
        opt_ref.step()
        assert torch.equal(loss.detach(), loss_ref), step
        assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), ref.parameters())), step


# -- make_adam -----------------------------------------------------------------------------------

def _set_grads(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        g = torch.randn_like(pa)
        pa.grad, pb.grad = g.clone(), g.clone()


def _within(t: torch.Tensor, block: torch.Tensor) -> bool:
    lo = block.data_ptr()
    return lo <= t.data_ptr() < lo + block.numel() * block.element_size()


def test_make_adam_is_fused_torch_adam_with_the_reference_hyperparameters():
    model = AttentionAdapter(8)
    algo = Algo(lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    opt = make_adam(model.parameters(), algo)
    assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["fused"] is True and not g["foreach"]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (5e-5, (0.9, 0.98), 1e-6, 0.2)
    assert not g["amsgrad"] and not g["maximize"] and not g["decoupled_weight_decay"]
    assert not opt.state  # no buffer: Adam creates its state itself


def test_make_adam_in_a_buffer_is_bitwise_torch_adam():
    torch.manual_seed(0)
    algo = Algo(lr=1e-2)
    ours = AttentionAdapter(16)
    ref = copy.deepcopy(ours)
    size = adam_buffer_size(list(ours.parameters()))
    block = torch.full((size + 7,), float("nan"))  # zeroed by make_adam
    opt = make_adam(ours.parameters(), algo, buffer=block)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=algo.lr, betas=tuple(algo.betas), eps=algo.eps,
                               weight_decay=algo.weight_decay, fused=True)
    # The state exists before the first step, as Adam would create it, moments in the block.
    assert torch.equal(block[:size], torch.zeros(size)) and block[size:].isnan().all()
    for p in ours.parameters():
        st = opt.state[p]
        assert list(st) == ["step", "exp_avg", "exp_avg_sq"]
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and st["step"].device == p.device
        assert _within(st["exp_avg"], block) and _within(st["exp_avg_sq"], block)
    assert opt.state[ours.fc1.weight]["exp_avg"].data_ptr() == block.data_ptr()

    def steps(n, opt, opt_ref):
        for _ in range(n):
            _set_grads(ours, ref)
            opt.step()
            opt_ref.step()
            assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))

    steps(5, opt, opt_ref)
    for p, q in zip(ours.parameters(), ref.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt_ref.state[q][key]), key
        assert _within(opt.state[p]["exp_avg"], block) and _within(opt.state[p]["exp_avg_sq"], block)
    assert torch.equal(block[:size], torch.cat([t.reshape(-1) for p in ours.parameters()
                                                for t in (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]))

    # A new optimiser from the kept state (load_state_dict, or make_adam(state=)): no copy, same updates.
    opt2 = make_adam(ours.parameters(), algo)
    opt2.load_state_dict(opt.state_dict())
    assert all(_within(opt2.state[p]["exp_avg_sq"], block) for p in ours.parameters())
    opt_ref2 = torch.optim.Adam(ref.parameters(), fused=True)
    opt_ref2.load_state_dict(opt_ref.state_dict())
    steps(2, opt2, opt_ref2)
    opt3 = make_adam(ours.parameters(), algo, buffer=block, state=opt2.state_dict())  # the block is not wiped
    assert all(_within(opt3.state[p]["exp_avg"], block) for p in ours.parameters())
    steps(2, opt3, opt_ref2)


def test_state_dict_round_trip_through_the_arena():
    torch.manual_seed(1)
    algo = Algo(lr=1e-2)
    ours = AttentionAdapter(16)
    ref = copy.deepcopy(ours)
    arena = AdamStateArena(adam_buffer_size(list(ours.parameters())), rows=2, device=torch.device("cpu"))
    assert arena.buffer_for(1).data_ptr() == arena.rows[1].data_ptr()
    assert arena.buffer_for(None).data_ptr() == arena.scratch.data_ptr()
    opt_ref = torch.optim.Adam(ref.parameters(), lr=algo.lr, betas=tuple(algo.betas), eps=algo.eps,
                               weight_decay=algo.weight_decay, fused=True)

    # Round 1: a new state in the client's row.
    opt = make_adam(ours.parameters(), algo, buffer=arena.buffer_for(1))
    for _ in range(3):
        _set_grads(ours, ref)
        opt.step()
        opt_ref.step()
    kept = arena.stash(opt.state_dict(), 1)  # already in the row: nothing copied
    moments = [t for st in kept["state"].values() for t in (st["exp_avg"], st["exp_avg_sq"])]
    assert moments[0].data_ptr() == arena.rows[1].data_ptr()
    assert torch.equal(torch.cat([t.reshape(-1) for t in moments]), arena.rows[1])

    # Round 2: a new optimiser from the kept state; the moments stay in the row.
    del opt
    opt = make_adam(ours.parameters(), algo, buffer=arena.buffer_for(1), state=kept)
    assert all(_within(opt.state[p][k], arena.rows[1]) for p in ours.parameters() for k in ("exp_avg", "exp_avg_sq"))
    for _ in range(3):
        _set_grads(ours, ref)
        opt.step()
        opt_ref.step()
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    kept = arena.stash(opt.state_dict(), 1)
    assert all(torch.equal(kept["state"][i][k], opt_ref.state[p][k])
               for i, p in enumerate(ref.parameters()) for k in ("step", "exp_avg", "exp_avg_sq"))

    # A state from elsewhere (Adam's own tensors, e.g. a checkpoint) is copied into the row.
    other = arena.stash(copy.deepcopy(opt_ref.state_dict()), 0)
    moments = [t for st in other["state"].values() for t in (st["exp_avg"], st["exp_avg_sq"])]
    assert moments[0].data_ptr() == arena.rows[0].data_ptr()
    assert all(torch.equal(m, opt_ref.state[p][k]) for m, (p, k) in
               zip(moments, [(p, k) for p in ref.parameters() for k in ("exp_avg", "exp_avg_sq")]))
    assert arena.stash(other, 0)["state"][0]["exp_avg"].data_ptr() == arena.rows[0].data_ptr()
    opt4 = make_adam(ours.parameters(), algo, state=other)
    assert all(_within(opt4.state[p]["exp_avg"], arena.rows[0]) for p in ours.parameters())


def test_make_adam_without_a_usable_buffer_and_empty_kept_state():
    algo = Algo()
    model = AttentionAdapter(4)
    size = adam_buffer_size(list(model.parameters()))
    for bad in (torch.zeros(size - 1), torch.zeros(size, dtype=torch.float64), torch.zeros(2, size).T):
        opt = make_adam(model.parameters(), algo, buffer=bad)
        for p in model.parameters():  # Adam's own zero tensors instead
            assert not _within(opt.state[p]["exp_avg"], bad) and torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p))
    # A kept state of a client that never stepped is empty: the new state goes into the buffer.
    empty = torch.optim.Adam(model.parameters(), fused=True).state_dict()
    block = torch.empty(size)
    opt = make_adam(model.parameters(), algo, buffer=block, state=empty)
    assert opt.state[model.fc1.weight]["exp_avg"].data_ptr() == block.data_ptr()
    with pytest.raises(ValueError):
        init_adam_state(opt, block)


def test_make_adam_float64_and_non_fused_state_layout():
    """Adam's own state layout for a non-fused optimiser: a CPU step counter of the default scalar dtype."""
    model = AttentionAdapter(4).double()
    ref = copy.deepcopy(model)
    size = adam_buffer_size(list(model.parameters()))
    block = torch.empty(size, dtype=torch.float64)
    opt = make_adam(model.parameters(), Algo(), buffer=block)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                               fused=opt.param_groups[0]["fused"], foreach=opt.param_groups[0]["foreach"])
    for _ in range(3):
        _set_grads(model, ref)
        opt.step()
        opt_ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert all(_within(opt.state[p]["exp_avg"], block) for p in model.parameters())
    foreach = torch.optim.Adam(model.parameters(), foreach=True)
    init_adam_state(foreach, torch.empty(size, dtype=torch.float64))
    st = foreach.state[model.fc1.weight]
    assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32


# -- no private torch API ------------------------------------------------------------------------

def test_no_private_torch_api_in_the_step():
    src = Path(__file__).resolve().parents[1] / "src" / "fedclip_lightning"
    for rel in ("model/adapter.py", "model/losses.py", "optim.py"):
        text = (src / rel).read_text()
        assert not re.search(r"torch\._|_fused_adam|\._C\b", text), rel
