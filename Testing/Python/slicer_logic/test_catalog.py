"""The extension as the Extensions Manager and the ExtensionsIndex see it.

The catalog entry (`VertebraID.json`, the ExtensionsIndex's current format), the metadata in
CMakeLists.txt and the older `.s4ext` agree; the licence is at the root; the icon and the
screenshot the URLs name exist in the repository; the minimum 3D Slicer version (5.10: the first
with Python >= 3.10) is declared wherever a user or the catalog looks.
"""
from __future__ import annotations

import json
import re

from conftest import REPO

#: Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json: required and allowed keys.
SCHEMA_V102 = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
REQUIRED = {"$schema", "category", "scm_url"}
ALLOWED = REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "dicom_support_rule", "build_subdirectory",
                      "enabled", "tier"}


def cmake_metadata() -> dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text()
    return {key: value.strip('"') for key, value in re.findall(r'set\((EXTENSION_\w+)\s+("[^"]*"|[^)\s]+)', text)}


def s4ext() -> dict[str, str]:
    lines = (REPO / "VertebraID.s4ext").read_text().splitlines()
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in lines if line.strip() and not line.startswith("#"))


def test_the_catalog_entry_follows_the_index_schema():
    entry = json.loads((REPO / "VertebraID.json").read_text())
    assert entry["$schema"] == SCHEMA_V102
    assert REQUIRED <= set(entry) <= ALLOWED
    assert entry["category"] == cmake_metadata()["EXTENSION_CATEGORY"] == s4ext()["category"]
    assert entry["build_dependencies"] == ["PyTorch"] == cmake_metadata()["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].endswith("/SlicerVertebraID.git") and entry["scm_type"] == "git"
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["scm_url"].removesuffix(".git") == s4ext()["scmurl"].removesuffix(".git")


def test_urls_point_at_files_of_this_repository():
    meta = cmake_metadata()
    for key, s4 in (("EXTENSION_ICONURL", "iconurl"), ("EXTENSION_SCREENSHOTURLS", "screenshoturls")):
        urls = meta[key].split()
        assert urls and urls == s4ext()[s4].split(), key
        for url in urls:
            path = url.split("/main/", 1)[1]
            assert (REPO / path).is_file(), url
    assert meta["EXTENSION_HOMEPAGE"] == s4ext()["homepage"]
    # Until published, the owner is a marked placeholder, never a made-up address.
    for text in (meta["EXTENSION_HOMEPAGE"], meta["EXTENSION_ICONURL"], json.loads((REPO / "VertebraID.json").read_text())["scm_url"]):
        assert "/REPLACE-WITH-OWNER/SlicerVertebraID" in text
    assert "FILL IN AT PUBLICATION" in (REPO / "CMakeLists.txt").read_text()


def test_the_screenshot_is_a_small_png():
    from PIL import Image

    path = REPO / "VertebraID" / "Resources" / "Screenshots" / "VertebraID-result.png"
    assert path.stat().st_size < 300_000
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size[0] >= 600
    assert "VertebraID/Resources/Screenshots/VertebraID-result.png" in (REPO / "README.md").read_text()


def test_the_licence_is_apache_2_at_the_root():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
    assert "set(EXTENSION_LICENSE_FILE ${CMAKE_CURRENT_SOURCE_DIR}/LICENSE)" in (REPO / "CMakeLists.txt").read_text()


def test_the_minimum_slicer_version_is_declared_everywhere():
    from VertebraIDLib.slicer import requirements

    version = requirements.MINIMUM_SLICER_VERSION
    assert version == "5.10" and requirements.MINIMUM_PYTHON == (3, 10)
    module = (REPO / "VertebraID" / "VertebraID.py").read_text()
    train = (REPO / "VertebraIDTrain" / "VertebraIDTrain.py").read_text()
    assert f'MINIMUM_SLICER_VERSION = "{version}"' in module and f'MINIMUM_SLICER_VERSION = "{version}"' in train
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f'set(VertebraID_MINIMUM_SLICER_VERSION "{version}")' in cmake
    assert "if(Slicer_VERSION VERSION_LESS VertebraID_MINIMUM_SLICER_VERSION)" in cmake
    assert f"Needs 3D Slicer {version} or later" in cmake_metadata()["EXTENSION_DESCRIPTION"]
    assert f"Needs 3D Slicer {version} or later" in s4ext()["description"]
    assert f"Needs 3D Slicer {version} or later" in (REPO / "README.md").read_text()
    assert 'requires-python = ">=3.10"' in (REPO / "pyproject.toml").read_text()


def test_module_resources_are_installed():
    cmake = (REPO / "VertebraID" / "CMakeLists.txt").read_text()
    for pattern in ("Resources/SampleData/*", "Resources/Icons/*.png", "VertebraIDLib/*.py"):
        assert pattern in cmake
    module = (REPO / "VertebraID" / "VertebraID.py").read_text()
    assert 'SAMPLE_DATA_FILE = "VertebraIDSampleSpineCT.nii.gz"' in module
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in module


def test_module_help_links_the_documentation():
    text = (REPO / "VertebraID" / "VertebraID.py").read_text()
    assert 'DOCUMENTATION_URL = "https://github.com/REPLACE-WITH-OWNER/SlicerVertebraID#readme"' in text
    assert '<a href="{url}">documentation</a>' in text and ".format(url=DOCUMENTATION_URL)" in text
