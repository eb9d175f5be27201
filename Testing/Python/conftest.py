"""Shared paths, markers and fixtures of the test suite (Testing/Python mirrors VertebraIDLib's tree;
the tests of `VertebraIDLib.slicer` live in `slicer_logic/`: slicer-core adds every folder named
`slicer` on sys.path to its own package).

Tests import the paths from here (`from conftest import REALCT`). Markers, so that a run can
pick what it needs (`pytest -m "not slow"` takes under a minute):
- slow: a test that takes more than a few seconds (training, whole-network runs);
- realdata: reads ../shared/data (skipped where it is absent);
- torch: needs PyTorch and MONAI;
- slicer: needs slicer-core (or 3D Slicer).
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "VertebraID" / "VertebraIDLib"
MODULE_FILE = REPO / "VertebraID" / "VertebraID.py"
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
REALCT = SHARED_DATA / "realct"
VID_DATA = SHARED_DATA / "vid"
LABELMAPS = SHARED_DATA / "labelmaps"
EXAMPLES = REPO / "VertebraID" / "Resources" / "Examples"
MODELS = REPO / "VertebraID" / "Resources" / "Models"
MARKUPS_SCHEMA = SHARED / "docs" / "specs" / "markups-schema-v1.0.3.json"
SPECS = SHARED / "docs" / "specs"


def pytest_configure(config):
    for line in ("slow: takes more than a few seconds (deselect with -m 'not slow')",
                 "realdata: reads ../shared/data", "torch: needs PyTorch and MONAI",
                 "slicer: needs slicer-core or 3D Slicer"):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    """Folder-level markers: every test under slicer_logic/ needs slicer-core; under networks/ and training/, torch."""
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder == "slicer_logic":
            item.add_marker(pytest.mark.slicer)
        if folder in ("networks", "training"):
            item.add_marker(pytest.mark.torch)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED_DATA
