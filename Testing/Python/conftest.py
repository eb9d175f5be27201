"""Shared fixtures: where the real data lives, and small synthetic inputs."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "VertebraID" / "Resources" / "Examples"
MARKUPS_SCHEMA = REPO.parent / "shared" / "docs" / "specs" / "markups-schema-v1.0.3.json"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED_DATA
