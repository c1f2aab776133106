"""The server side: server optimisers, robust rules, the attack simulator, client-level DP, unreliable clients."""

from __future__ import annotations

import random

import pytest
import torch
from lightning.fabric import Fabric

from conftest import PACS_MINI
from helpers import federation_config
from fedclip_lightning.config import FederationConfig
from fedclip_lightning.configure import load_config
from fedclip_lightning.data.partition import sample_clients, stable_seed
from fedclip_lightning.errors import ConfigError
from fedclip_lightning.federation.orchestrator import run
from fedclip_lightning.aggregation.privacy import clip
from fedclip_lightning.aggregation.robust import Krum, Median, TrimmedMean, krum_scores
from fedclip_lightning.aggregation.update import ServerUpdate


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


def fed(*dotlist: str) -> FederationConfig:
    return federation_config(*dotlist)


def step(fabric, su: ServerUpdate, rows: torch.Tensor, w: torch.Tensor, weights=None,
         server_round: int = 1) -> torch.Tensor:
    k = rows.shape[0]
    weights = weights or [1.0 / k] * k
    return su(fabric, server_round, list(range(k)), lambda i: rows[i], weights, lambda: w, w.numel())


# -- server optimisers: the first rounds by hand (Reddi et al. 2021, Algorithm 2) -----------------------

def test_server_optimizers_first_rounds_by_hand(fabric):
    w0 = torch.tensor([1.0, -2.0, 0.5])
    clients = [torch.tensor([[1.2, -2.0, 0.1], [0.6, -1.0, 0.5]]), torch.tensor([[0.9, -1.5, 0.4], [1.1, -2.5, 0.2]])]
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    for kind in ("none", "momentum", "adam", "yogi", "adagrad"):
        su = ServerUpdate(fed(f"server_optimizer.name={kind}", f"server_optimizer.lr={lr}"), 0, 2, 2)
        assert su.plain == (kind == "none")
        w, m, v = w0.clone(), torch.zeros(3), torch.full((3,), tau ** 2)
        mom = None
        for server_round, rows in enumerate(clients, start=1):
            got = step(fabric, su, rows, w, server_round=server_round)
            delta = rows.mean(0) - w  # the pseudo-gradient: the clients' mean change
            if kind == "none":
                want = rows.mean(0)
            elif kind == "momentum":
                mom = delta if mom is None else b1 * mom + delta
                want = w + lr * mom
            else:
                m = b1 * m + (1 - b1) * delta
                if kind == "adam":
                    v = b2 * v + (1 - b2) * delta ** 2
                elif kind == "yogi":
                    v = v - (1 - b2) * delta ** 2 * torch.sign(v - delta ** 2)
                else:
                    v = v + delta ** 2
                want = w + lr * m / (v.sqrt() + tau)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{kind} round {server_round}")
            w = got
        state = su.state()
        if kind in ("adam", "yogi", "adagrad"):
            torch.testing.assert_close(state["optimizer"]["v"], v)


def test_server_optimizer_state_round_trips(fabric):
    rows, w = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2)
    a = ServerUpdate(fed("server_optimizer.name=yogi"), 0, 2, 3)
    step(fabric, a, rows, w)
    b = ServerUpdate(fed("server_optimizer.name=yogi"), 0, 2, 3)
    b.load(a.state())
    assert torch.equal(step(fabric, a, rows, w, server_round=2), step(fabric, b, rows, w, server_round=2))


# -- robust rules: hand examples and breakdown points ------------------------------------------------

def test_median_and_trimmed_mean_by_hand():
    rows = torch.tensor([[1.0, 2.0], [3.0, 100.0], [2.0, -5.0]])
    assert torch.equal(Median()(rows, []), torch.tensor([2.0, 2.0]))
    assert torch.equal(Median()(rows[:2], []), torch.tensor([2.0, 51.0]))  # even K: the middle two's mean
    five = torch.tensor([[1.0], [2.0], [3.0], [4.0], [1000.0]])
    assert torch.equal(TrimmedMean(0.2)(five, []), torch.tensor([3.0]))  # drops 1 and 1000
    assert torch.equal(TrimmedMean(0.0)(five, []), five.mean(0))


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.4)])
def test_breakdown_point_of_the_median_and_trimmed_mean(rule):
    """Fewer than half the clients (at most floor(beta K) for the trimmed mean) cannot drag the result out
    of the honest range; a majority can."""
    g = torch.Generator().manual_seed(0)
    honest = torch.rand(4, 6, generator=g)
    lo, hi = honest.min(0).values, honest.max(0).values
    for bad in (1, 2):
        rows = torch.cat([honest[: 5 - bad], torch.full((bad, 6), 1e6)])
        out = rule(rows, [])
        assert bool(((out >= lo) & (out <= hi)).all()), bad
    rows = torch.cat([honest[:2], torch.full((3, 6), 1e6)])
    assert bool((rule(rows, []) > 1e5).all())


def test_krum_and_multi_krum_by_hand():
    rows = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [50.0, 50.0]])
    # f = 1: each row's summed squared distances to its K - f - 2 = 2 nearest others.
    scores = krum_scores(rows, 1)
    assert scores[4] > 1000 and float(scores[0]) == pytest.approx(0.02)
    assert torch.equal(Krum(1, 1)(rows, []), rows[0])  # the lowest score; ties go to the lower index
    torch.testing.assert_close(Krum(1, None)(rows, []), rows[:4].mean(0))  # multi-Krum, m = K - f
    with pytest.raises(ConfigError, match="more than 2f \\+ 2"):
        Krum(2, 1)(rows, [])


# -- DP: clipping, noise, and Opacus's accountant --------------------------------------------------------

def test_clipping_bounds_every_client_update(fabric):
    g = torch.Generator().manual_seed(1)
    w = torch.zeros(50)
    rows = torch.randn(4, 50, generator=g) * torch.tensor([[0.01], [1.0], [10.0], [100.0]])
    su = ServerUpdate(fed("privacy.mode=server", "privacy.clip=0.5", "privacy.noise_multiplier=0.0"), 0, 4, 1)
    for k in range(4):
        u = su._update(1, k, rows[k], w)
        assert float(u.norm()) <= 0.5 + 1e-6
        if float(rows[k].norm()) <= 0.5:
            assert torch.equal(u, rows[k])  # within the bound: untouched
    assert float(step(fabric, su, rows, w).norm()) <= 0.5 + 1e-6  # the average of clipped updates, no noise
    assert float(clip(torch.tensor([3.0, 4.0]), 1.0).norm()) == pytest.approx(1.0)


def test_dp_noise_is_seeded_and_scaled(fabric):
    w, rows = torch.zeros(20000), torch.zeros(4, 20000)
    su = ServerUpdate(fed("privacy.mode=server", "privacy.clip=2.0", "privacy.noise_multiplier=1.5"), 7, 4, 1)
    a, b = step(fabric, su, rows, w), step(fabric, su, rows, w)
    assert torch.equal(a, b)  # seeded by the round alone: every rank draws the same
    assert float(a.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)  # sigma C on the sum, averaged over 4
    local = ServerUpdate(fed("privacy.mode=client", "privacy.clip=2.0", "privacy.noise_multiplier=1.5"), 7, 4, 1)
    assert float(step(fabric, local, rows, w).std()) == pytest.approx(1.5 * 2.0 / 2, rel=0.03)  # 4 noises / 4


def test_epsilon_is_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    f = fed("privacy.mode=server", "privacy.noise_multiplier=1.1", "client_fraction=0.5", "privacy.delta=1e-5")
    su = ServerUpdate(f, 0, 4, 30)
    direct = RDPAccountant()
    for _ in range(30):
        direct.step(noise_multiplier=1.1, sample_rate=0.5)
    assert su.metrics(30)["privacy/epsilon"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert su.metrics(0)["privacy/epsilon"] == 0.0
    target = ServerUpdate(fed("privacy.mode=client", "privacy.target_epsilon=4.0", "client_fraction=0.5"), 0, 4, 30)
    sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.5, steps=30, accountant="rdp")
    assert target.privacy.sigma == pytest.approx(sigma)
    assert target.metrics(30)["privacy/epsilon"] <= 4.0 + 1e-6


# -- end to end on PACS_mini ---------------------------------------------------------------------------------

def _run(tmp_path, name, *more, rounds=2):
    cfg = load_config(["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "plots=false", "logger=none",
                       f"output_dir={tmp_path / 'outputs'}", f"run_name={name}", f"federation.rounds={rounds}",
                       f"features.dir={tmp_path / 'features'}", "algorithm.lr=1e-3", *more])
    return run(cfg), tmp_path / "outputs" / name


def _flat(run_dir) -> torch.Tensor:
    st = torch.load(run_dir / "adapter_final.pt", weights_only=True)["state"]
    return torch.cat([v.reshape(-1) for v in st.values()])


def test_a_scaled_attack_moves_the_mean_by_orders_of_magnitude_more_than_the_median(tmp_path):
    attack = ["federation.attack.name=scaled", "federation.attack.fraction=0.34"]
    moved = {}
    for rule in ("mean", "median"):
        _, clean = _run(tmp_path, f"{rule}-clean", f"federation.aggregator.name={rule}")
        s, attacked = _run(tmp_path, f"{rule}-attacked", f"federation.aggregator.name={rule}", *attack)
        assert s["status"] == "finished"
        moved[rule] = float((_flat(attacked) - _flat(clean)).norm())
    assert moved["median"] > 0  # the attacker did change something
    assert moved["mean"] > 10 * moved["median"], moved


def test_unreliable_clients_are_seeded_counted_and_honest_about_bytes(tmp_path):
    opts = ["federation.unreliable.dropout=0.4", "federation.unreliable.straggler_fraction=0.5", "federation.unreliable.local_epochs_range=[1,3]"]
    a, dir_a = _run(tmp_path, "a", *opts, rounds=4)
    b, dir_b = _run(tmp_path, "b", *opts, rounds=4)
    assert a["server"] == b["server"] and torch.equal(_flat(dir_a), _flat(dir_b))  # seeded
    # The same draws by hand: who drops, who straggles.
    dropped = arrived = straggled = 0
    for server_round in range(1, 5):
        for i in sample_clients(3, 1.0, server_round, 0):
            if random.Random(stable_seed(0, "dropout", server_round, i)).random() < 0.4:
                dropped += 1
                continue
            arrived += 1
            rng = random.Random(stable_seed(0, "local-plan", server_round, a["clients"][i]))
            rng.randint(1, 3)
            straggled += rng.random() < 0.5
    assert a["server"] == {"clients/dropped_total": dropped, "clients/straggled_total": straggled}
    assert 0 < dropped < 12
    per_copy = a["bytes_per_client_per_round"]
    assert a["bytes_up_total"] == arrived * per_copy  # a dropped client sends 0 bytes
    plain, dir_plain = _run(tmp_path, "plain", rounds=4)
    assert not torch.equal(_flat(dir_plain), _flat(dir_a))


@pytest.mark.parametrize("opts", [
    ["federation.server_optimizer.name=adam", "federation.unreliable.dropout=0.3", "federation.unreliable.straggler_fraction=0.5"],
    ["federation.privacy.mode=server", "federation.privacy.clip=0.05", "federation.attack.name=sign_flip", "federation.attack.fraction=0.34"],
    ["federation.aggregator.name=multi_krum", "federation.server_optimizer.name=momentum", "federation.unreliable.local_epochs_range=[1,2]"],
], ids=["adam+unreliable", "dp+attack", "multikrum+momentum"])
def test_server_options_resume_bitwise(tmp_path, opts):
    whole, whole_dir = _run(tmp_path, "whole", *opts, rounds=4)
    _run(tmp_path, "split", *opts, rounds=2)
    resumed, split_dir = _run(tmp_path, "split", *opts, "resume=auto", rounds=4)
    assert resumed["resumed_from"] == 2
    assert torch.equal(_flat(whole_dir), _flat(split_dir))
    assert whole["final"] == resumed["final"] and whole["server"] == resumed["server"]


def test_server_option_errors():
    with pytest.raises(ConfigError, match="sends nothing to a server"):
        load_config(["algorithm=local", "federation.aggregator.name=median"])
    with pytest.raises(ConfigError, match="federation.aggregator.trim_beta=0.6"):
        load_config(["federation.aggregator.name=trimmed_mean", "federation.aggregator.trim_beta=0.6"])
    with pytest.raises(ConfigError, match="federation.server_optimizer.name='sgd'"):
        load_config(["federation.server_optimizer.name=sgd"])
