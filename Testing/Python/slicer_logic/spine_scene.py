"""Fixtures and helpers shared by the slicer-core tests: a synthetic spine CT in a new scene, and scene counts.

A test module imports it after its own slicer-core skip check and binds the fixtures to module
names, where pytest finds them. (Not a conftest.py: the tests' `from conftest import REPO` would get it.)
"""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from VertebraIDLib.slicer import logic as VID
from VertebraIDLib.slicer import mrml


@pytest.fixture(scope="module")
def spine():
    """A synthetic CT (T3..L4) and its true vertebrae."""
    return VID.synthetic_spine_case(seed=3, levels=("T3", "L4"))


@pytest.fixture()
def scene_with_ct(spine):
    """(a new scene context, its volume node "CT" holding the spine, the true vertebrae)."""
    ct, truth = spine
    context = mrml.SceneContext.create()
    node = mrml.add_scalar_volume(context.scene, ct, "CT", window_level=(400.0, 40.0))
    return context, node, truth


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def sh_item_count(scene) -> int:
    """How many subject hierarchy items the scene holds, at any depth."""
    shn = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    shn.GetItemChildren(shn.GetSceneItemID(), ids, True)
    return ids.GetNumberOfIds()


def nearest_index(points_node, position) -> int:
    """The index of the control point nearest to `position` (world coordinates)."""
    d = [
        np.linalg.norm(np.array(points_node.GetNthControlPointPositionWorld(i)) - position)
        for i in range(points_node.GetNumberOfControlPoints())
    ]
    return int(np.argmin(d))
