"""Shared test fixtures: paths to the real images beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PACS = SHARED_DATA / "PACS"
PACS_MINI = SHARED_DATA / "PACS_mini"
PACS_SPLITS = SHARED_DATA / "PACS_splits"


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
