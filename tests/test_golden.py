"""Every algorithm's numbers against tests/golden/pacs_mini.json (see tests/golden.py).

The golden numbers were recorded under the portable numerics profile
(``fedclip_lightning.numerics.PORTABLE``), which gives the same bits on any
x86-64 CPU with AVX2. So on any machine:

* under that profile, one process (a fresh interpreter) and two processes (the
  real command line) give the recorded numbers bit for bit: one thread a
  process makes two processes equal one;
* with the machine's own kernels (this interpreter, as the suite was started),
  every case agrees within ``golden.TOLERANCE``; bit for bit where the suite
  itself was started under the portable profile;
* the tolerance is tight enough to catch a 1% change of the learning rate and a
  1% error in the aggregation weights.
"""

from __future__ import annotations

import pytest

from golden import (CASES, TOLERANCE, TWO_PROCESS, compare_bitwise, compare_within, expected_two_processes,
                    load_golden, run_one_process, start_portable, start_two_processes)

from fedclip_lightning.numerics import is_portable


@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """The portable cases start in child processes as the module starts (one interpreter for the 25 cases,
    one launch of two ranks for the two-process ones) and run while this interpreter runs its own cases."""
    two = start_two_processes(list(TWO_PROCESS), tmp_path_factory.mktemp("two"))
    one = None if is_portable() else start_portable(list(CASES), tmp_path_factory.mktemp("portable"))
    yield {"one": one, "two": two}
    for handle in (one, two):
        for proc in (handle.procs if handle else []):
            proc.kill()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Each case run once in this interpreter, on demand, with the kernels the suite started with."""
    out, done = tmp_path_factory.mktemp("native"), {}

    def get(name: str) -> dict:
        if name not in done:
            done[name] = run_one_process(name, out)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_own_kernels_match_golden(golden, native, name):
    """This machine's own kernels: bit for bit under the portable profile, else within the tolerance."""
    if is_portable():
        compare_bitwise(native(name), golden["one_process"][name], name)
    else:
        compare_within(native(name), golden["one_process"][name], name)


@pytest.mark.parametrize("name", list(CASES))
def test_portable_one_process_matches_golden_bitwise(golden, background, native, name):
    """Under the portable profile: in a fresh interpreter, or in this one where the suite itself runs under it."""
    got = native(name) if background["one"] is None else background["one"].result()[name]
    compare_bitwise(got, golden["one_process"][name], name)


@pytest.mark.parametrize("name", TWO_PROCESS)
def test_portable_two_processes_match_golden_bitwise(golden, background, name):
    compare_bitwise(background["two"].result()[name], expected_two_processes(golden, name), name)


def test_golden_file_says_how_it_was_recorded(golden):
    from fedclip_lightning.numerics import PORTABLE

    assert golden["profile"] == PORTABLE
    assert golden["recorded_with"]["profile"] == "portable" and golden["recorded_with"]["threads"] == 1
    assert set(golden["one_process"]) == set(CASES)


# The tolerance is no blind spot: a real change of the numbers fails it (each in this interpreter, with the
# machine's own kernels, as test_own_kernels_match_golden runs). dp_client_target is the case whose numbers
# move least with the learning rate (its losses by 7e-6 for a 1% change).

@pytest.mark.parametrize("name,lr", [("fedclip", "1.01e-3"), ("dp_client_target", "1.01e-3"),
                                     ("fedavg", "1.01e-5")])
def test_tolerance_fails_on_a_one_percent_learning_rate_change(golden, tmp_path, name, lr):
    changed = run_one_process(name, tmp_path, (f"algorithm.lr={lr}",))
    with pytest.raises(AssertionError, match="beyond the tolerance"):
        compare_within(changed, golden["one_process"][name], name)


def test_tolerance_fails_on_aggregation_weights_one_percent_off(golden, tmp_path, monkeypatch):
    from fedclip_lightning.algorithms import base

    weights = base.aggregation_weights
    monkeypatch.setattr(base, "aggregation_weights", lambda n, mode: [0.99 * w for w in weights(n, mode)])
    planted = run_one_process("fedclip", tmp_path)
    with pytest.raises(AssertionError, match="beyond the tolerance"):
        compare_within(planted, golden["one_process"]["fedclip"], "fedclip")


def test_tolerance_is_what_the_docs_state():
    from conftest import REPO

    readme = (REPO / "docs" / "reproducibility.md").read_text()
    assert f"{TOLERANCE['loss_abs']:g}" in readme and f"{TOLERANCE['value_rel']:g}" in readme
