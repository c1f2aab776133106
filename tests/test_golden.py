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
