"""Clients side by side (``fedclip_lightning.batched``, ``federation.client_batching``).

* Step level: the batched forward, written-out backward, losses and Adam against one client at a time
  through the real ``AttentionAdapter``, ``clip_loss`` and ``torch.optim.Adam``; a row's result is the
  same bits whichever clients share its products (so 1 and 2 processes agree).
* Run level: every golden case the side-by-side path serves, run side by side, agrees with its golden
  record (one at a time) within ``golden.TOLERANCE``: the same bound as another CPU's kernels.
"""

from __future__ import annotations

import json

import pytest
import torch

from golden import CASES, compare_within, load_golden, run_one_process

from fedclip_lightning.aggregation.mean import flatten
from fedclip_lightning.batched import (AdapterLayout, ClientFit, RowAdam, evaluate_side_by_side,
                                       fit_side_by_side)
from fedclip_lightning.model.adapter import AttentionAdapter
from fedclip_lightning.model.losses import clip_loss, proximal_term
from fedclip_lightning.training import confusion_matrix

D, C, SCALE = 64, 5, 100.0  # the small CLIP's width
BETAS, EPS, WD = (0.9, 0.98), 1e-6, 0.2


def _one_at_a_time(start: torch.Tensor, fit: ClientFit, kind: str, text: torch.Tensor):
    """The reference: ``AttentionAdapter`` + ``clip_loss`` (+ FedProx's term) + ``torch.optim.Adam``."""
    adapter = AttentionAdapter(D)
    params = dict(adapter.named_parameters())
    with torch.no_grad():
        offset = 0
        for p in params.values():
            p.copy_(start[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    anchor = None
    if fit.anchor is not None:
        sizes = [p.numel() for p in params.values()]
        anchor = {k: t.view_as(params[k]) for k, t in zip(params, fit.anchor.split(sizes))}
    opt = torch.optim.Adam(params.values(), lr=fit.lr, betas=BETAS, eps=EPS, weight_decay=WD)
    losses = []
    for x, y in fit.steps:
        loss = clip_loss(kind, SCALE, adapter(x), text, y) + proximal_term(fit.mu, params, anchor)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return flatten(params), sum(losses)


def _fits(seed: int, start: torch.Tensor, batches: list[list[int]], prox: set[int] = frozenset()) -> list[ClientFit]:
    g = torch.Generator().manual_seed(seed)
    return [ClientFit(steps=[(torch.randn(b, D, generator=g), torch.randint(0, C, (b,), generator=g)) for b in sizes],
                      start=start.clone(), lr=1e-2, anchor=start.clone() if k in prox else None,
                      mu=0.5 if k in prox else 0.0)
            for k, sizes in enumerate(batches)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(C, D), dim=-1)
    start = flatten(dict(AttentionAdapter(D).named_parameters()))
    return text, start, AdapterLayout.of(AttentionAdapter(D).state_dict())


@pytest.mark.parametrize("kind", ["contrastive", "prototype"])
def test_side_by_side_equals_one_at_a_time(setup, kind):
    """Four clients with their own batch sizes and numbers of steps (one takes no part after its second step,
    one has FedProx's term): each client's adapter and summed loss as one client at a time computes them."""
    text, start, layout = setup
    fits = _fits(1, start, [[8, 8, 8, 3], [8, 5], [8, 8, 8, 8, 8], [2]], prox={1})
    out = fit_side_by_side(fits, layout, kind, SCALE, text, RowAdam(BETAS, EPS, WD), torch.device("cpu"))
    for k, fit in enumerate(fits):
        want, loss = _one_at_a_time(start, fit, kind, text)
        moved = float((want - start).abs().max())
        assert moved > 1e-3  # the fits really trained
        assert float((out.rows[k] - want).abs().max()) < 1e-5 * max(1.0, float(want.abs().max()))
        assert out.loss_sum[k] == pytest.approx(loss, rel=1e-5)
        assert out.batches[k] == len(fit.steps) and out.seen[k] == sum(int(y.numel()) for _, y in fit.steps)
        assert int(out.steps[k]) == len(fit.steps)


@pytest.mark.parametrize("kind", ["contrastive", "prototype"])
def test_a_rows_bits_do_not_depend_on_its_companions(setup, kind):
    """The same client alone, with others, and with others of other batch sizes (5, 7 and 9 among them, sizes
    where torch's CPU ``bmm`` of a batch of one takes another kernel): bit for bit the same adapter, and the same
    evaluation, so one process and two, or a Flower node holding one client, give the same numbers."""
    text, start, layout = setup
    fits = _fits(2, start, [[8, 8, 4], [8, 8, 4], [7, 3], [6, 8, 8, 5], [9, 9], [5]])
    adam = RowAdam(BETAS, EPS, WD)
    together = fit_side_by_side(fits, layout, kind, SCALE, text, adam, torch.device("cpu"))
    for k in range(len(fits)):
        alone = fit_side_by_side([fits[k]], layout, kind, SCALE, text, adam, torch.device("cpu"))
        assert torch.equal(alone.rows[0], together.rows[k]), k
        assert alone.loss_sum[0] == together.loss_sum[k]
    sets = [(k, x, y) for k, f in enumerate(fits) for x, y in f.steps]
    everyone = evaluate_side_by_side(together.rows, layout, sets, SCALE, text, torch.device("cpu"))
    for j, (k, x, y) in enumerate(sets):
        (alone,) = evaluate_side_by_side(together.rows[k : k + 1], layout, [(0, x, y)], SCALE, text,
                                         torch.device("cpu"))
        assert alone[:3] == everyone[j][:3] and torch.equal(alone[3], everyone[j][3])


def test_kept_moments_continue(setup):
    """A kept Adam state (moments and step count) continues: two fits of two steps equal one of four."""
    text, start, layout = setup
    (fit,) = _fits(3, start, [[8, 8, 8, 8]])
    adam = RowAdam(BETAS, EPS, WD)
    whole = fit_side_by_side([fit], layout, "contrastive", SCALE, text, adam, torch.device("cpu"))
    first = fit_side_by_side([ClientFit(fit.steps[:2], start, fit.lr)], layout, "contrastive", SCALE, text, adam,
                             torch.device("cpu"))
    second = fit_side_by_side([ClientFit(fit.steps[2:], first.rows[0], fit.lr,
                                         moments=(first.m[0], first.v[0], float(first.steps[0])))],
                              layout, "contrastive", SCALE, text, adam, torch.device("cpu"))
    assert torch.equal(second.rows[0], whole.rows[0]) and int(second.steps[0]) == 4


def test_evaluation_side_by_side_equals_the_clients_step(setup):
    """Sets of different sizes, each on its own adapter (padded products) or all on one (concatenated): the
    correct count and summed cross-entropy of ``CLIPClient.validation_step`` for each."""
    from fedclip_lightning.client import AdapterClient

    text, start, layout = setup
    g = torch.Generator().manual_seed(4)
    rows = start.unsqueeze(0) + 0.3 * torch.randn(3, start.numel(), generator=g)
    sets = [(k % 3, torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g))
            for k, n in enumerate([7, 1, 30, 12, 0, 5])]

    class _Backbone:
        logit_scale = SCALE
        embed_dim = D

    def want(row, x, y):
        client = AdapterClient("c", _Backbone(), text, None)
        client.set_state({k: t.view_as(v) for (k, v), t in
                          zip(client.adapter.state_dict().items(), row.split([D * D, D, D * D, D]))})
        with torch.no_grad():
            out = client.validation_step((x, y), 0)
        return (int((out["preds"] == y).sum()), float(out["loss_sum"]), len(y),
                confusion_matrix(out["preds"], y, C))

    for budget in (1 << 24, 600):  # one product per group, and groups cut small
        got = evaluate_side_by_side(rows, layout, sets, SCALE, text, torch.device("cpu"), budget=budget)
        for (r, x, y), (c, loss, n, conf) in zip(sets, got):
            wc, wl, wn, wconf = want(rows[r], x, y)
            assert (c, n) == (wc, wn) and loss == pytest.approx(wl, rel=1e-5, abs=1e-6)
            assert torch.equal(conf, wconf) and int(conf.trace()) == c
    shared = evaluate_side_by_side(rows[:1], layout, [(0, x, y) for _, x, y in sets], SCALE, text,
                                   torch.device("cpu"), budget=700)
    for (_, x, y), (c, loss, n, conf) in zip(sets, shared):
        wc, wl, wn, wconf = want(rows[0], x, y)
        assert (c, n) == (wc, wn) and loss == pytest.approx(wl, rel=1e-5, abs=1e-6) and torch.equal(conf, wconf)


# -- whole runs ------------------------------------------------------------------------------------------

# Every golden case the side-by-side path serves: both losses, kept Adam state, sample weights, half the clients,
# FedAvg and FedProx's term on the adapter, local training, personalisation, a bottleneck adapter, heterogeneous
# epochs with stragglers and dropouts, attacks with robust rules, DP on the server and on the clients.
SIDE_BY_SIDE = ("fedclip", "fedclip_prototype", "fedclip_keep", "fedclip_samples", "fedclip_half", "fedavg_adapter",
                "fedprox_adapter", "local", "local_keep", "fedclip_ft", "fedclip_hidden8", "server_adam_unreliable",
                "trimmed_mean_gaussian_attack", "krum_sign_flip", "dp_server_momentum", "dp_client_target")


@pytest.mark.parametrize("name", SIDE_BY_SIDE)
def test_runs_side_by_side_agree_with_the_golden_record(tmp_path, name):
    assert name in CASES
    got = run_one_process(name, tmp_path, ("federation.client_batching=on",))
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["client_training"] == "side by side"
    compare_within(got, load_golden()["one_process"][name], name)


def test_where_side_by_side_cannot_apply(tmp_path, capsys):
    """auto: the run says once that its clients train one at a time, and why; on: refused with the fix."""
    from fedclip_lightning.errors import ConfigError

    run_one_process("promptfl", tmp_path)  # golden's COMMON says off: no word of it
    got = run_one_process("promptfl", tmp_path / "auto", ("federation.client_batching=auto",))
    assert compare_within(got, load_golden()["one_process"]["promptfl"], "promptfl")
    summary = json.loads((tmp_path / "auto" / "promptfl" / "summary.json").read_text())
    assert summary["client_training"].startswith("one at a time (algorithm=promptfl trains")
    out = capsys.readouterr().out
    assert out.count("WARNING: clients train one at a time, not side by side: algorithm=promptfl trains") == 1
    with pytest.raises(ConfigError, match="client_batching=on: .*cannot train side by side.*Fix"):
        run_one_process("fedavg", tmp_path / "on", ("federation.client_batching=on",))


def test_many_small_clients_run_side_by_side_and_one_too_small_to_step_is_no_divergence(tmp_path, capsys):
    """All of PACS_mini split IID among 13 clients: most hold a single training image (a batch of one is skipped, as
    the reference skips it), so they take no step. The run finishes (no step is no divergence), side by side
    and one at a time alike, with the same accuracies; the header counts the clients instead of listing 13."""
    from golden import COMMON

    from fedclip_lightning.configure import load_config
    from fedclip_lightning.federation.orchestrator import run

    out = {}
    for mode in ("on", "off"):
        out[mode] = run(load_config([*COMMON, "algorithm=fedclip", "data.partition.scheme=iid",
                                     "data.partition.num_clients=13", "data.partition.min_size=3", "data.unseen=[]",
                                     f"federation.client_batching={mode}", f"output_dir={tmp_path}",
                                     f"run_name={mode}", f"features.dir={tmp_path / 'features'}"]))
    on, off = out["on"], out["off"]
    train = [v["train"] for v in on["num_samples"].values()]
    assert min(train) == 1 and max(train) >= 2
    assert on["status"] == off["status"] == "finished" and on["client_training"] == "side by side"
    assert on["final"]["client_test_acc"] == off["final"]["client_test_acc"]
    printed = capsys.readouterr().out
    assert "clients: 13 (client00, client01, client02 and 10 more)" in printed
    assert "min (13 clients)" in printed


@pytest.mark.parametrize("n,batch", [(1, 4), (7, 4), (8, 4), (37, 32), (3, 32)])
def test_feature_batches_are_the_loaders(n, batch):
    """Side by side reads a client's shuffled batches without a DataLoader: the same batches, epoch after epoch,
    as the loader ``make_loader`` builds (its RandomSampler draws once more as each epoch ends)."""
    from fedclip_lightning.data.pipeline import FeatureBatches, FeatureDataset, make_loader
    from fedclip_lightning.training import batches

    ds = FeatureDataset(torch.randn(n, 3), torch.arange(n))
    seed = (0, "train", 4, "client07")
    loader = make_loader(ds, batch, num_workers=0, shuffle_seed=seed)
    direct = FeatureBatches(ds, batch, seed)
    assert len(direct) == len(loader)
    for _ in range(3):
        want, got = list(batches(loader)), list(direct)
        assert len(want) == len(got)
        for (wx, wy), (gx, gy) in zip(want, got):
            assert torch.equal(wx, gx) and torch.equal(wy, gy)
