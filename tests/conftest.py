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
