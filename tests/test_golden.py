"""Every algorithm's numbers, bit for bit, against tests/golden/pacs_mini.json (see tests/golden.py).

One process runs in this interpreter, two through the real command line. The
two sets are recorded separately: with two processes each gets one of the two
cores, and a BLAS sum over another thread count rounds its last bit elsewhere
(the encoder's features, hence everything after them); each is deterministic.
"""

from __future__ import annotations

import pytest

from golden import CASES, TWO_PROCESS, load_golden, run_one_process, run_two_processes


def _compare(got: dict, want: dict, name: str) -> None:
    for key in want:
        if key == "metrics" and got[key] != want[key]:
            diff = [f"  now  {a}\n  was  {b}" for a, b in zip(got[key], want[key]) if a != b]
            raise AssertionError(f"{name}: metrics.csv drifted in {len(diff)} rows:\n" + "\n".join(diff[:6]))
        if key == "states" and got[key] != want[key]:
            drift = {f: sorted(k for k in want[key][f] if got[key].get(f, {}).get(k) != want[key][f][k])[:4]
                     for f in want[key]}
            raise AssertionError(f"{name}: saved tensors drifted: {drift} (files now {sorted(got[key])})")
        assert got[key] == want[key], f"{name}: {key} drifted"


@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_matches_golden(golden, name, tmp_path):
    _compare(run_one_process(name, tmp_path), golden["one_process"][name], name)


@pytest.mark.parametrize("name", TWO_PROCESS)
def test_two_processes_match_golden(golden, name, tmp_path):
    _compare(run_two_processes(name, tmp_path), golden["two_processes"][name], name)


@pytest.mark.parametrize("name", TWO_PROCESS)
def test_two_processes_equal_one_up_to_rounding(golden, name):
    """The recorded 1- and 2-process numbers: the same accuracies, bytes and selected round; losses equal to
    float rounding (they differ only in the last bits, from BLAS thread counts)."""
    one, two = golden["one_process"][name], golden["two_processes"][name]
    assert one["bytes"] == two["bytes"] and one["params"] == two["params"]
    assert one["selected_round"] == two["selected_round"]
    for block in ("selected", "final"):
        for key, v in one[block].items():
            if isinstance(v, dict):
                assert two[block][key] == pytest.approx(v, abs=1e-9), (block, key)
    for a, b in zip(one["metrics"][1:], two["metrics"][1:], strict=True):
        ra, rb = a.split(","), b.split(",")
        assert ra[:4] == rb[:4], (a, b)  # round, client, split, accuracy
        assert float(ra[4]) == pytest.approx(float(rb[4]), abs=2e-5), (a, b)
