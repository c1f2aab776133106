"""Shared test fixtures: paths to the real images beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PACS = SHARED_DATA / "PACS"
PACS_MINI = SHARED_DATA / "PACS_mini"
PACS_SPLITS = SHARED_DATA / "PACS_splits"


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``, the default in pyproject.toml) each worker computes on one thread, and so
    do the runs it starts: two workers with two threads each on 2 cores spend their time waiting for each
    other's threads (measured: 687 s for the suite, against 623 s without xdist)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # and every process a test starts
        torch.set_num_threads(1)


# Under pytest-xdist, modules whose module-scoped fixtures are costly run on one worker (else each worker that
# takes one of their tests computes them again): the golden cases' background runs, the demo's run and the
# learning checks on its features, the reference runs of resume and of the parameter-efficient heads.
GROUPED_MODULES = {"test_golden.py": "golden", "test_e2e.py": "demo", "test_learning.py": "demo",
                   "test_resume.py": "resume", "test_peft.py": "peft"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the groups and the order in which the two workers take the tests
    (``--no-loadscope-reorder``): the golden cases and the SLURM jobs first, the Flower deployment half-way,
    each on one worker while the other computes. The SLURM jobs and the Flower nodes spend much of their time
    waiting (for the scheduler, for nodes that poll every 3 s); together, at the start, they left the two
    cores 50-80% idle for two minutes."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        name = GROUPED_MODULES.get(item.path.name)
        if name and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(name))

    def group(item) -> str | None:
        marker = item.get_closest_marker("xdist_group")
        return marker.args[0] if marker else None

    first = [i for i in items if group(i) == "golden"] + [i for i in items if group(i) == "slurm"]
    flower = [i for i in items if group(i) == "flower_loopback"]
    rest = [i for i in items if group(i) not in ("golden", "slurm", "flower_loopback")]
    half = len(rest) // 2
    items[:] = first + rest[:half] + flower + rest[half:]


@pytest.fixture(scope="session")
def pacs_mini() -> Path:
    if not PACS_MINI.is_dir():
        pytest.fail(f"{PACS_MINI} is missing: the tests need ../shared/data beside the checkout")
    return PACS_MINI


@pytest.fixture(scope="session")
def demo_command(tmp_path_factory):
    """The newcomer's command as the README gives it (``fedclip-lightning``, no arguments), run once in this
    interpreter: ``(result, summary, cache dir)``. The learning tests reuse its synthetic images and their
    cached features (``FEDCLIP_CACHE_DIR``), so they are drawn and encoded once per session."""
    from helpers import read_summary, run_main

    tmp = tmp_path_factory.mktemp("demo")
    result = run_main([], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp / "outputs").iterdir()
    return result, read_summary(run_dir), tmp / "cache"
