"""MRML glue for the VertebraID Slicer Logic: core objects <-> MRML nodes.

Everything here imports `slicer` and `vtk` inside functions, so `VertebraIDLib` stays
importable in plain Python. It runs in 3D Slicer and in PyPI's `slicer-core` alike: it only
uses MRML nodes, storage nodes and module logics (never `slicer.app`, widgets or
`slicer.util.loadVolume/saveNode`).

Coordinates are world RAS millimetres throughout (a parent transform of the input volume is
applied when reading it; every node created here sits in world coordinates).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.anatomy import CHECK_COLOR, LABEL_IDS, LEVELS_26, REGION_COLORS, region
from ..engine.vertebrae import Vertebra, sort_by_level
from ..engine.volume import Volume
from ..errors import VertebraIDError
from ..io.files import PathLike, atomic_path
from ..io.images import read_dicom_series

REGION_ORDER = ("C", "T", "L", "S")

#: Node / subject-hierarchy attribute names (namespaced, so they survive scene save/load).
ATTR_ROLE = "VertebraID.Role"  # what a node is within a run (see ROLE_*)
ATTR_RUN = "VertebraID.Run"  # on the run folder item: JSON with the run's settings
ATTR_SOLVED = "VertebraID.Solved"  # on the point list: {point id: [label, x, y, z]} as last solved
ATTR_SCALE = "VertebraID.Scale"  # on the quantised heatmap volume: value of one grey level
ATTR_ADDED = "VertebraID.Added"  # on the point list: positions where the user added a vertebra without a label

ROLE_POINTS = "vertebrae"
ROLE_CENTERLINE = "centerline"
ROLE_REGIONS = "regions"
ROLE_COMBINED = "combined"
ROLE_HEATMAPS = "heatmaps"
ROLE_LEVEL_MAP = "level-map"
ROLE_STRAIGHT_CT = "straightened-ct"
ROLE_STRAIGHT_COMBINED = "straightened-combined"
ROLE_SIGNALS = "signals"
ROLE_PLOT = "signals-plot"
ROLE_SERIES = "signals-series"
ROLE_DETAILS = "details"  # the sub-folder holding a run's intermediates (collapsed in the Data module)

#: A moved point: displacement (mm) above which a point counts as moved by the user.
MOVED_TOLERANCE_MM = 0.5


# --------------------------------------------------------------------------- scene


@dataclass
class SceneContext:
    """A MRML scene with the module logics the VertebraID Logic needs.

    Inside Slicer use `SceneContext.current()` (the application's scene); elsewhere
    `SceneContext.create()` sets one up the way Slicer's core application does
    (crosshair, application logic with default colour nodes, module logics registered).
    """

    scene: object
    app_logic: object | None = None
    logics: dict = field(default_factory=dict)  # keeps module logics alive with the scene

    @classmethod
    def create(cls) -> "SceneContext":
        """A new MRML scene set up like the application's (colour logic, module logics), for slicer-core."""
        import slicer
        from vtkmodules.vtkCommonCore import vtkCollection

        scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        scene.AddNode(crosshair)

        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        app_logic.GetColorLogic().SetMRMLScene(scene)
        app_logic.GetColorLogic().AddDefaultColorNodes()
        app_logic.SetSliceLogics(vtkCollection())
        app_logic.SetViewLogics(vtkCollection())

        logics = {}
        for name, logic_class in (
            ("Markups", slicer.vtkSlicerMarkupsLogic),
            ("Volumes", slicer.vtkSlicerVolumesLogic),
            ("Tables", slicer.vtkSlicerTablesLogic),
            ("Plots", slicer.vtkSlicerPlotsLogic),
            ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ):
            logic = logic_class()
            logic.SetMRMLApplicationLogic(app_logic)
            logic.SetMRMLScene(scene)
            app_logic.SetModuleLogic(name, logic)
            logics[name] = logic
        return cls(scene, app_logic, logics)

    @classmethod
    def current(cls) -> "SceneContext":
        """The running Slicer application's scene (only inside 3D Slicer)."""
        import slicer

        app = getattr(slicer, "app", None)
        if app is None:
            raise VertebraIDError("No running 3D Slicer application; use SceneContext.create().")
        return cls(slicer.mrmlScene, app.applicationLogic())

    def module_logic(self, name: str):
        """A module logic by name ('Volumes', 'Markups'...), registered or created on demand."""
        if name in self.logics:
            return self.logics[name]
        if self.app_logic is not None:
            logic = self.app_logic.GetModuleLogic(name)
            if logic is not None:
                return logic
        import slicer

        classes = {"Volumes": slicer.vtkSlicerVolumesLogic, "Markups": slicer.vtkSlicerMarkupsLogic}
        logic = classes[name]()
        if self.app_logic is not None:
            logic.SetMRMLApplicationLogic(self.app_logic)
        logic.SetMRMLScene(self.scene)
        self.logics[name] = logic
        return logic


def running_in_slicer_app() -> bool:
    """Whether this runs inside the 3D Slicer application (not slicer-core)."""
    import slicer

    return getattr(slicer, "app", None) is not None


@contextlib.contextmanager
def captured_vtk_messages():
    """Collect VTK's console output (info chatter, reader errors) instead of printing it.

    Yields a list that receives the captured text when the block ends. Inside the Slicer
    application nothing is redirected: its error log is where users look.
    """
    messages: list[str] = []
    if running_in_slicer_app():
        yield messages
        return
    from vtkmodules.vtkCommonCore import (
        vtkLogger,
        vtkOutputWindow,
        vtkStringOutputWindow,
    )

    previous = vtkOutputWindow.GetInstance()
    previous.Register(None)  # keep it alive while replaced
    capture = vtkStringOutputWindow()
    vtkOutputWindow.SetInstance(capture)
    # slicer-core also logs every error to stderr through vtkLogger.
    previous_verbosity = vtkLogger.GetCurrentVerbosityCutoff()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    try:
        yield messages
    finally:
        vtkLogger.SetStderrVerbosity(previous_verbosity)
        vtkOutputWindow.SetInstance(previous)
        previous.UnRegister(None)
        text = capture.GetOutput().strip()
        if text:
            messages.append(text)


def _all_sh_items(scene) -> set[int]:
    import vtk

    shn = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    shn.GetItemChildren(shn.GetSceneItemID(), ids, True)
    return {ids.GetId(i) for i in range(ids.GetNumberOfIds())}


class NodeTracker:
    """Records every node (and subject-hierarchy folder) added to a scene inside a `with`
    block; removes them all if the block fails.

    The Logic builds a run's nodes inside one; a failure or a cancel leaves the scene as it was.
    """

    def __init__(self, scene):
        self.scene = scene
        self.node_ids: list[str] = []
        self._tag = None
        self._items_before: set[int] = set()

    def __enter__(self):
        import vtk

        def on_node_added(caller, event, node):
            self.node_ids.append(node.GetID())

        on_node_added.CallDataType = vtk.VTK_OBJECT
        self._callback = on_node_added  # VTK keeps no Python reference to it
        self._items_before = _all_sh_items(self.scene)
        self._tag = self.scene.AddObserver(self.scene.NodeAddedEvent, on_node_added)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.scene.RemoveObserver(self._tag)
        if exc_type is not None:
            self.remove_all()
        return False

    def remove_all(self):
        """Remove every node added since the tracker started, with its dependents."""
        shn = self.scene.GetSubjectHierarchyNode()
        for node_id in reversed(self.node_ids):
            node = self.scene.GetNodeByID(node_id)
            if node is None:
                continue
            if shn is not None:
                item = shn.GetItemByDataNode(node)
                if item:
                    shn.RemoveItem(item, False, False)
            self.scene.RemoveNode(node)
        self.node_ids.clear()
        if shn is not None:  # folders (items without a data node) made in the block
            for item in sorted(_all_sh_items(self.scene) - self._items_before, reverse=True):
                if shn.GetItemDataNode(item) is None:
                    shn.RemoveItem(item, False, True)


def remove_node_with_dependents(scene, node) -> None:
    """Remove a data node with its display and storage nodes (slicer-core does not cascade)."""
    if node is None:
        return
    dependents = []
    for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"), ("GetNthStorageNode", "GetNumberOfStorageNodes")):
        if hasattr(node, count):
            dependents += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and scene.IsNodePresent(dependent):
            scene.RemoveNode(dependent)


# --------------------------------------------------------------------------- subject hierarchy


def create_folder(scene, name: str, attributes: dict | None = None, parent: int | None = None,
                  expanded: bool = True) -> int:
    """A subject-hierarchy folder (at the top level, or inside `parent`); returns its item id."""
    shn = scene.GetSubjectHierarchyNode()
    folder = shn.CreateFolderItem(parent or shn.GetSceneItemID(), name)
    for key, value in (attributes or {}).items():
        shn.SetItemAttribute(folder, key, value)
    if not expanded:
        shn.SetItemExpanded(folder, False)
    return folder


def place_in_folder(scene, node, folder: int, role: str | None = None) -> None:
    """Put a node in a run's subject-hierarchy folder, with its role attribute."""
    shn = scene.GetSubjectHierarchyNode()
    item = shn.GetItemByDataNode(node)
    if item:
        shn.SetItemParent(item, folder)
    else:
        shn.CreateItem(folder, node)
    if role is not None:
        node.SetAttribute(ATTR_ROLE, role)


def folder_nodes(scene, folder: int, recursive: bool = False) -> list:
    """The data nodes inside a subject-hierarchy folder (and its sub-folders with `recursive`)."""
    shn = scene.GetSubjectHierarchyNode()
    import vtk

    children = vtk.vtkIdList()
    shn.GetItemChildren(folder, children, recursive)
    nodes = []
    for i in range(children.GetNumberOfIds()):
        node = shn.GetItemDataNode(children.GetId(i))
        if node is not None:
            nodes.append(node)
    return nodes


def folder_node_by_role(scene, folder: int, role: str):
    """The node of a run folder (or its details sub-folder) with this role (None if absent)."""
    for node in folder_nodes(scene, folder, recursive=True):
        if node.GetAttribute(ATTR_ROLE) == role:
            return node
    return None


def folder_of_node(scene, node) -> int:
    """The subject-hierarchy folder holding `node` (0 if none)."""
    shn = scene.GetSubjectHierarchyNode()
    item = shn.GetItemByDataNode(node)
    return shn.GetItemParent(item) if item else 0


def run_folder_of_node(scene, node) -> int:
    """The VertebraID run folder holding `node`, directly or in a sub-folder (0 if none)."""
    if node is None:
        return 0
    shn = scene.GetSubjectHierarchyNode()
    item = shn.GetItemByDataNode(node)
    top = shn.GetSceneItemID()
    while item and item != top:
        item = shn.GetItemParent(item)
        if item and item != top and shn.GetItemAttribute(item, ATTR_RUN):
            return item
    return 0


def remove_folder(scene, folder: int) -> None:
    """Remove a subject-hierarchy folder with every node in it, as the Data module's "Delete" does.

    The nodes go first (with their display and storage nodes), then the items. In 3D Slicer
    an item disappears with its node; slicer-core lacks the Qt plugin logic that does this, and
    its recursive RemoveItem loops for ever on a sub-folder whose node was removed, so the
    items are removed explicitly, children first.
    """
    shn = scene.GetSubjectHierarchyNode()
    for node in reversed(folder_nodes(scene, folder, recursive=True)):
        if scene.IsNodePresent(node):
            remove_node_with_dependents(scene, node)
    shn.RemoveItemChildren(folder, False, True)
    shn.RemoveItem(folder, False, False)


def run_folders(scene) -> list[int]:
    """Every VertebraID run folder in the scene, oldest first."""
    import vtk

    shn = scene.GetSubjectHierarchyNode()
    children = vtk.vtkIdList()
    shn.GetItemChildren(shn.GetSceneItemID(), children, True)
    return [
        children.GetId(i)
        for i in range(children.GetNumberOfIds())
        if shn.GetItemAttribute(children.GetId(i), ATTR_RUN)
    ]


# --------------------------------------------------------------------------- volumes


def _vtk_matrix(array4x4: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array4x4[r, c]))
    return matrix


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def check_input_volume_node(node) -> None:
    """Raise a one-sentence VertebraIDError unless `node` is a 3-D scalar (grey-level) volume."""
    if node is None:
        raise VertebraIDError("Select an input volume (a CT scan).")
    name = node.GetName()
    if not node.IsA("vtkMRMLVolumeNode"):
        raise VertebraIDError(f"'{name}' is not a volume; select a CT volume.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise VertebraIDError(f"'{name}' is a label map; select a CT volume.")
    image = node.GetImageData()
    if image is None:
        raise VertebraIDError(f"'{name}' has no image data; load a CT volume.")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLVectorVolumeNode") or (
        image.GetNumberOfScalarComponents() != 1
    ):
        raise VertebraIDError(
            f"'{name}' is not a scalar volume ({image.GetNumberOfScalarComponents()} components per voxel); "
            "select a grey-level CT volume."
        )
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise VertebraIDError(
            f"'{name}' is a 2-D image ({dims[0]}x{dims[1]}x{dims[2]} voxels); select a 3-D CT volume."
        )
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise VertebraIDError(f"'{name}' is under a non-linear transform; harden or remove it first.")


def voxel_dtype(node):
    """The numpy type of a volume node's voxels (a CT is usually int16)."""
    import slicer

    return np.asarray(slicer.util.arrayFromVolume(node)).dtype


def volume_from_node(node, dtype=np.float32) -> Volume:
    """A checked scalar volume node -> Volume (array (I, J, K), affine voxel -> world RAS)."""
    import slicer
    import vtk

    check_input_volume_node(node)
    array = np.asarray(slicer.util.arrayFromVolume(node))  # (K, J, I), VTK-owned
    array = np.ascontiguousarray(np.transpose(array, (2, 1, 0)).astype(dtype, copy=True))
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    affine = _numpy_matrix(ijk_to_ras)
    transform = node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        affine = _numpy_matrix(to_world) @ affine
    return Volume(array, affine)


def _set_volume_array(node, volume: Volume) -> None:
    if volume.array.ndim == 3:
        vtk_order = np.transpose(volume.array, (2, 1, 0))
    else:
        vtk_order = np.transpose(volume.array, (2, 1, 0, 3))
    _set_vtk_ordered_array(node, np.ascontiguousarray(vtk_order), volume.affine)


def _set_vtk_ordered_array(node, vtk_order: np.ndarray, affine: np.ndarray) -> None:
    """Voxels in VTK's (K, J, I[, C]) order, and the voxel -> RAS affine of (I, J, K)."""
    import slicer

    slicer.util.updateVolumeFromArray(node, vtk_order)
    node.SetIJKToRASMatrix(_vtk_matrix(affine))


def add_scalar_volume(
    scene,
    volume: Volume,
    name: str,
    color_node_id: str | None = None,
    window_level: tuple[float, float] | None = None,
    threshold: float | None = None,
):
    """A new scalar volume node from a 3-D Volume, with a display node.

    `threshold` hides voxels below it (for overlays, so that zero shows the CT beneath).
    """
    if volume.array.ndim != 3:
        raise VertebraIDError(f"'{name}' must be a 3-D image.")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    _set_volume_array(node, volume)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if color_node_id:
        display.SetAndObserveColorNodeID(color_node_id)
    if window_level is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(float(window_level[0]), float(window_level[1]))
    if threshold is not None:
        display.SetApplyThreshold(1)
        display.SetThreshold(float(threshold), float(np.max(volume.array)) + 1.0)
    return node


def add_multichannel_volume(scene, volume: Volume, name: str, quantize: bool = True):
    """A vector volume node holding a multi-channel Volume (the 26 activation maps).

    With `quantize`, values are stored as uint8 (one grey level = ATTR_SCALE) to keep scenes
    small; the maps are kept for display and for re-solving, where 1/255 of the peak is ample.
    """
    import slicer

    data = volume.array
    n_i, n_j, n_k, n_c = data.shape
    scale = 1.0
    if quantize:
        peak = float(data.max()) if data.size else 0.0
        scale = (peak if peak > 0 else 1.0) / 255.0
        vtk_order = np.empty((n_k, n_j, n_i, n_c), np.uint8)
        for c in range(n_c):  # one channel at a time: no full-size float temporaries
            vtk_order[..., c] = np.rint(np.clip(data[..., c], 0, None) / scale).T
    else:
        vtk_order = np.ascontiguousarray(np.transpose(np.clip(data, 0, None), (2, 1, 0, 3)), dtype=np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    _set_vtk_ordered_array(node, vtk_order, volume.affine)
    node.SetAttribute(ATTR_SCALE, repr(scale))
    node.CreateDefaultDisplayNodes()
    # The default (ITK) writer takes 1 or 3 components only; NRRD keeps all channels.
    storage = slicer.vtkMRMLNRRDStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def multichannel_volume_from_node(node) -> Volume:
    """Inverse of `add_multichannel_volume`: a (I, J, K, C) float32 Volume in world RAS."""
    import slicer
    import vtk

    array = np.asarray(slicer.util.arrayFromVolume(node))
    if array.ndim == 3:
        array = array[..., None]
    array = np.transpose(array, (2, 1, 0, 3)).astype(np.float32)
    scale = float(node.GetAttribute(ATTR_SCALE) or 1.0)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    return Volume(np.ascontiguousarray(array * scale), _numpy_matrix(ijk_to_ras))


def update_scalar_volume(node, volume: Volume) -> None:
    """Replace a scalar volume node's voxels and geometry."""
    _set_volume_array(node, volume)


def read_volume(context: SceneContext, path: PathLike, name: str | None = None):
    """Load a volume file (NIfTI, NRRD, MetaImage...) with the Volumes logic, or a DICOM series folder.

    A DICOM folder is read with `volume.read_dicom_series` (GDCM series reader, slices outside
    the majority plane dropped) and added from its array: the Volumes logic's archetype reader
    guesses the series from one file and, on slicer-core, mis-reads series with a stray slice
    (ts_dicom: 0.32 mm slice spacing instead of 2 mm) or reformatted ones (one slice of 39).
    Inside Slicer the DICOM module is the way to load DICOM interactively.
    """
    path = Path(path)
    if not path.exists():
        raise VertebraIDError(f"Cannot read '{path}': no such file.")
    name = name or node_name_from_file(path)
    if path.is_dir():
        node = add_scalar_volume(context.scene, read_dicom_series(path), name)
        node.GetDisplayNode().AutoWindowLevelOn()
        return node
    volumes_logic = context.module_logic("Volumes")
    before = {context.scene.GetNthNode(i).GetID() for i in range(context.scene.GetNumberOfNodes())}
    with captured_vtk_messages():
        node = volumes_logic.AddArchetypeVolume(str(path), name)
    if node is None:
        # The logic tries several readers and may leave half-made nodes behind.
        for i in reversed(range(context.scene.GetNumberOfNodes())):
            leftover = context.scene.GetNthNode(i)
            if leftover.GetID() not in before:
                context.scene.RemoveNode(leftover)
        raise VertebraIDError(f"'{path}' is not a readable volume.")
    display = node.GetDisplayNode()
    grey = context.scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
    if display is not None and not display.GetColorNodeID() and grey is not None:
        display.SetAndObserveColorNodeID(grey.GetID())  # what Slicer's Volumes module gives a loaded CT
    return node


def write_volume(node, path: PathLike) -> None:
    """Write a volume node (.nrrd, .nii.gz...) atomically through a volume storage node."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    _write_with_storage_node(storage, node, path)


def node_name_from_file(path: PathLike) -> str:
    """A node's name from its file, as Slicer names loaded data: 'ct.nii.gz' -> 'ct', a DICOM folder -> its name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mrk.json", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- colours


def _find_or_add_color_table(scene, name: str):
    node = scene.GetFirstNodeByName(name)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node, False
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetAttribute(ATTR_ROLE, "colors")
    return node, True


def activation_color_node(scene):
    """A 'hot' colour table for activation maps (shared by every run in the scene)."""
    node, created = _find_or_add_color_table(scene, "VertebraID activation")
    if created:
        n = 256
        node.SetNumberOfColors(n)
        for i in range(n):
            t = i / (n - 1)
            rgb = (min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2)))
            node.SetColor(i, f"{i}", *rgb, 0.0 if i == 0 else 1.0)
    return node


def region_color_node(scene):
    """A 4-entry colour table: C, T, L, S (indices 0..3)."""
    node, created = _find_or_add_color_table(scene, "VertebraID regions")
    if created:
        node.SetNumberOfColors(len(REGION_ORDER))
        for i, reg in enumerate(REGION_ORDER):
            node.SetColor(i, reg, *REGION_COLORS[reg], 1.0)
    return node


# --------------------------------------------------------------------------- markups: vertebrae


def _format_description(vertebra: Vertebra) -> str:
    if vertebra.locked:
        return "fixed by user"
    if vertebra.extra.get("added"):
        return "added point, " + vertebra.confidence_text
    return vertebra.confidence_text


def parse_confidence(description: str) -> float:
    """The confidence a point's description states ('confidence 0.42 (check)' -> 0.42); 1.0 if none."""
    match = re.search(r"confidence ([0-9]*\.?[0-9]+)", description or "")
    return float(match.group(1)) if match else 1.0


_parse_confidence = parse_confidence


def add_vertebrae_points(scene, vertebrae: list[Vertebra], name: str = "Vertebrae"):
    """A markups point list, one labelled point per vertebra (confidence in the description)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(1.0, 1.0, 0.3)
    display.SetColor(*CHECK_COLOR)  # unselected points: labels more likely wrong than right
    display.SetTextScale(3.0)
    display.SetGlyphScale(2.0)
    set_vertebrae_points(node, vertebrae)
    return node


def set_vertebrae_points(node, vertebrae: list[Vertebra]) -> None:
    """Replace the node's points by `vertebrae` (level order) and remember them as 'solved'."""
    import vtk

    was_modifying = node.StartModify()
    node.RemoveAllControlPoints()
    for vertebra in sort_by_level(list(vertebrae)):
        index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), vertebra.label)
        node.SetNthControlPointPositionWorld(index, *map(float, vertebra.position))  # world, even under a transform
        node.SetNthControlPointDescription(index, _format_description(vertebra))
        node.SetNthControlPointLocked(index, bool(vertebra.locked))
        node.SetNthControlPointSelected(index, not vertebra.needs_check)
    node.EndModify(was_modifying)
    remember_solved(node)


def remember_solved(node) -> None:
    """Store the points' current labels and positions as the last solver output."""
    snapshot = {}
    for i in range(node.GetNumberOfControlPoints()):
        position = node.GetNthControlPointPositionWorld(i)
        snapshot[node.GetNthControlPointID(i)] = [node.GetNthControlPointLabel(i), *map(float, position)]
    node.SetAttribute(ATTR_SOLVED, json.dumps(snapshot))


@dataclass
class PointState:
    """One control point as the user left it, compared with the last solver output."""

    point_id: str
    label: str  # normalised: stripped, upper case ("l1 " -> "L1")
    position: np.ndarray  # world RAS mm
    locked: bool
    description: str
    added: bool  # not in the last solver output
    moved: bool
    renamed: bool
    text: str = ""  # the label exactly as the user left it
    unnamed: bool = False  # no label of its own: empty, or the one Markups makes up ("Vertebrae-7")

    @property
    def edited(self) -> bool:
        return self.added or self.moved or self.renamed

    @property
    def is_vertebra_label(self) -> bool:
        return self.label in LABEL_IDS


@dataclass
class PointEdits:
    """A point list as the user left it: its points' states and the points they deleted."""

    points: list[PointState]
    deleted: list[tuple[str, np.ndarray]]  # (label, position) of solved points the user removed


def normalize_label(text: str) -> str:
    """'l1 ' -> 'L1'; labels are compared in this form."""
    return text.strip().upper()


def is_unnamed_label(text: str, node) -> bool:
    """Whether a point's label is no label: empty, or what Markups names a new point ('<list>-7').

    Markups labels a point placed with the toolbar by the list's label format ('%N-%d': the
    list's name and a number); such a point says "a vertebra here" without saying which.
    """
    text = (text or "").strip()
    if not text:
        return True
    fmt = node.GetControlPointLabelFormat() if hasattr(node, "GetControlPointLabelFormat") else "%N-%d"
    pattern = ""
    for token in re.split(r"(%N|%d)", fmt or "%N-%d"):
        if token == "%N":
            pattern += re.escape(node.GetName() or "")
        elif token == "%d":
            pattern += r"\d+"
        else:
            pattern += re.escape(token)
    return re.fullmatch(pattern, text) is not None


def read_point_edits(node) -> PointEdits:
    """The user's current points and what they changed since the last Detect / Re-label."""
    snapshot = json.loads(node.GetAttribute(ATTR_SOLVED) or "{}")
    points = []
    seen = set()
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue  # a point being placed, or with its position cleared
        point_id = node.GetNthControlPointID(i)
        text = node.GetNthControlPointLabel(i)
        label = normalize_label(text)
        position = np.array(node.GetNthControlPointPositionWorld(i), float)
        before = snapshot.get(point_id)
        seen.add(point_id)
        added = before is None
        moved = (not added) and float(np.linalg.norm(position - np.asarray(before[1:4]))) > MOVED_TOLERANCE_MM
        renamed = (not added) and label != normalize_label(before[0])
        points.append(
            PointState(
                point_id,
                label,
                position,
                bool(node.GetNthControlPointLocked(i)),
                node.GetNthControlPointDescription(i),
                added,
                moved,
                renamed,
                text,
                is_unnamed_label(text, node),
            )
        )
    deleted = [(v[0], np.asarray(v[1:4], float)) for k, v in snapshot.items() if k not in seen]
    return PointEdits(points, deleted)


def vertebrae_from_points(node) -> list[Vertebra]:
    """The point list as Vertebra objects (points whose label is not a vertebra level are skipped)."""
    out = []
    for state in read_point_edits(node).points:
        if state.is_vertebra_label:
            out.append(
                Vertebra(state.label, state.position, _parse_confidence(state.description), locked=state.locked)
            )
    return out


def region_spheres_polydata(vertebrae: list[Vertebra], radius_mm: float = 6.0):
    """Spheres at the vertebrae with a 'region' point scalar (0..3 = C, T, L, S)."""
    import vtk

    points = vtk.vtkPoints()
    regions = vtk.vtkFloatArray()
    regions.SetName("region")
    for vertebra in vertebrae:
        points.InsertNextPoint(*map(float, vertebra.position))
        regions.InsertNextValue(REGION_ORDER.index(region(vertebra.label)))
    centres = vtk.vtkPolyData()
    centres.SetPoints(points)
    centres.GetPointData().SetScalars(regions)
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(radius_mm)
    sphere.SetThetaResolution(16)
    sphere.SetPhiResolution(12)
    glyphs = vtk.vtkGlyph3D()
    glyphs.SetInputData(centres)
    glyphs.SetSourceConnection(sphere.GetOutputPort())
    glyphs.SetScaleModeToDataScalingOff()
    glyphs.SetColorModeToColorByScalar()
    glyphs.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(glyphs.GetOutput())
    out.GetPointData().SetActiveScalars("region")
    return out


def add_region_model(scene, vertebrae: list[Vertebra], name: str = "Vertebra regions"):
    """A model of spheres coloured by spine region (markups give one colour per list).

    Display only: it mirrors the point list and is refreshed by `update_region_model`.
    """
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(region_spheres_polydata(vertebrae))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetActiveScalarName("region")
    display.SetAndObserveColorNodeID(region_color_node(scene).GetID())
    display.SetScalarRangeFlag(display.UseColorNodeScalarRange)
    display.SetScalarVisibility(True)
    display.SetOpacity(0.6)
    display.SetVisibility2D(True)
    return node


def update_region_model(model_node, vertebrae: list[Vertebra]) -> None:
    """Redraw the region spheres for these vertebrae."""
    model_node.SetAndObservePolyData(region_spheres_polydata(vertebrae))


# --------------------------------------------------------------------------- markups: centreline


def add_centerline_curve(scene, points_ras: np.ndarray, name: str = "Centreline", spacing_mm: float = 10.0):
    """A locked markups curve through the centreline, one control point about every `spacing_mm`.

    The centreline is sampled finely (~1 mm); a curve with hundreds of control points is
    slow to interact with, and its spline through every ~10 mm follows the spine closely.
    """
    import vtk

    points_ras = np.asarray(points_ras, float).reshape(-1, 3)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", name)
    node.CreateDefaultDisplayNodes()
    if len(points_ras):
        steps = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(points_ras, axis=0), axis=1))]
        keep = [0]
        for i in range(1, len(points_ras)):
            if steps[i] - steps[keep[-1]] >= spacing_mm:
                keep.append(i)
        if keep[-1] != len(points_ras) - 1:
            keep.append(len(points_ras) - 1)
        vtk_points = vtk.vtkPoints()
        for i in keep:
            vtk_points.InsertNextPoint(*points_ras[i])
        node.SetControlPointPositionsWorld(vtk_points)
        for i in range(node.GetNumberOfControlPoints()):
            node.SetNthControlPointLabel(i, "")
    node.SetLocked(True)
    display = node.GetDisplayNode()
    display.SetSelectedColor(0.2, 0.9, 0.9)
    display.SetPointLabelsVisibility(False)
    display.SetGlyphScale(1.0)
    return node


def curve_points(node) -> np.ndarray:
    """Control points of a markups curve, world RAS (N, 3)."""
    return np.array([node.GetNthControlPointPositionWorld(i) for i in range(node.GetNumberOfControlPoints())], float)


# --------------------------------------------------------------------------- markups: files


def _write_with_storage_node(storage, node, path) -> None:
    path = Path(path)
    suffix = "".join(s for s in path.suffixes[-2:]) or None
    with atomic_path(path, suffix=suffix) as tmp:
        storage.SetFileName(str(tmp))
        with captured_vtk_messages() as messages:
            ok = storage.WriteData(node)
        if not ok:
            detail = f" ({messages[0].splitlines()[-1].strip()})" if messages else ""
            raise VertebraIDError(f"Cannot write '{path}'{detail}.")


def write_markups(node, path: PathLike) -> None:
    """Write a markups node as Slicer markups JSON (.mrk.json), atomically, LPS as Slicer does."""
    import slicer

    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    _write_with_storage_node(storage, node, path)


def read_markups(context: SceneContext, path: PathLike, name: str | None = None):
    """Load a Slicer markups JSON file into the scene with the Markups logic; returns the node."""
    path = Path(path)
    if not path.is_file():
        raise VertebraIDError(f"Cannot read '{path}': no such file.")
    markups_logic = context.module_logic("Markups")
    with captured_vtk_messages():
        node_id = markups_logic.LoadMarkups(str(path), name or node_name_from_file(path))
    node = context.scene.GetNodeByID(node_id) if node_id else None
    if node is None:
        raise VertebraIDError(f"'{path}' is not a readable Slicer markups file.")
    return node


def markups_positions(node) -> tuple[np.ndarray, list[str]]:
    """World RAS positions (N, 3) and labels of a markups node's defined control points."""
    positions, labels = [], []
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        positions.append(node.GetNthControlPointPositionWorld(i))
        labels.append(node.GetNthControlPointLabel(i))
    return np.array(positions, float).reshape(-1, 3), labels


# --------------------------------------------------------------------------- tables and plots


def add_signals_table(scene, rectified, name: str = "Signals"):
    """A table: distance along the centreline (mm), Q_v for every level, and Q̂ (column 'combined')."""
    import vtk

    signals = np.asarray(rectified.evidence, float)  # what the optimiser weighed (labeller included)
    combined = np.asarray(rectified.combined_signal, float)
    step = float(getattr(rectified, "step_mm", None) or _step_from_affine(rectified.affine))
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    columns = [("distance_mm", np.arange(len(combined)) * step)]
    columns += [(label, signals[:, i]) for i, label in enumerate(LEVELS_26)]
    columns += [("combined", combined)]
    for column_name, values in columns:
        array = vtk.vtkDoubleArray()
        array.SetName(column_name)
        array.SetNumberOfValues(len(values))
        for i, value in enumerate(values):
            array.SetValue(i, float(value))
        table.AddColumn(array)
    node.Modified()
    return node


def _step_from_affine(affine) -> float:
    return float(np.linalg.norm(np.asarray(affine)[:3, 2]))


def add_signals_plot(scene, table_node, name: str = "Signals plot") -> tuple:
    """A plot chart with one line per level (coloured by region) and Q̂; returns (chart, series)."""
    import slicer

    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("1-D signals along the centreline")
    chart.SetXAxisTitle("distance along the centreline (mm)")
    chart.SetYAxisTitle("activation")
    series_nodes = []
    for column_name in [*LEVELS_26, "combined"]:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {column_name}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("distance_mm")
        series.SetYColumnName(column_name)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        if column_name == "combined":
            series.SetColor(0.1, 0.1, 0.1)
            series.SetLineWidth(3)
        else:
            series.SetColor(*REGION_COLORS[region(column_name)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series_nodes.append(series)
    return chart, series_nodes


def table_columns(table_node) -> dict[str, np.ndarray]:
    """A table node's columns as numpy arrays (numeric columns only)."""
    table = table_node.GetTable()
    out = {}
    for c in range(table.GetNumberOfColumns()):
        column = table.GetColumn(c)
        out[column.GetName()] = np.array([column.GetValue(i) for i in range(column.GetNumberOfValues())], float)
    return out


# --------------------------------------------------------------------------- scene bundles


def write_scene_bundle(scene, path: PathLike) -> None:
    """Save the whole scene as a Slicer scene bundle (.mrb: zipped .mrml + data), atomically.

    Afterwards the scene's root directory and URL point where it was saved, as after Slicer's
    own "Save" (a failed save leaves them as they were); never at the temporary staging folder.
    """
    import shutil

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = (scene.GetRootDirectory(), scene.GetURL())
    saved = False
    try:
        with atomic_path(path, suffix=".mrb") as tmp:
            # WriteToMRB names the bundle's inner folder after the file; give it the case's name.
            staging = tmp.parent / f".{path.stem}.staging"
            staging.mkdir(exist_ok=True)
            bundle = staging / path.name
            try:
                scene.SetRootDirectory(str(staging))
                with captured_vtk_messages() as messages:
                    ok = scene.WriteToMRB(str(bundle))
                if not ok or not bundle.is_file():
                    detail = f" ({messages[0].splitlines()[-1].strip()})" if messages else ""
                    raise VertebraIDError(f"Cannot write the scene bundle '{path}'{detail}.")
                os.replace(bundle, tmp)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        saved = True
    finally:
        if saved:
            scene.SetRootDirectory(str(path.parent))
            scene.SetURL(str(path))
        else:
            scene.SetRootDirectory(previous[0] or "")
            scene.SetURL(previous[1] or "")


def read_scene_bundle(scene, path: PathLike) -> None:
    """Load a .mrb into `scene` (unzips it and imports the .mrml; no remote-IO manager needed)."""
    import tempfile
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise VertebraIDError(f"Cannot read '{path}': no such file.")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise VertebraIDError(f"'{path}' is not a Slicer scene bundle (.mrb).") from exc
        mrml = sorted(Path(tmp).rglob("*.mrml"))
        if not mrml:
            raise VertebraIDError(f"'{path}' holds no .mrml scene.")
        scene.SetURL(str(mrml[0]))
        with captured_vtk_messages():
            ok = scene.Import()
        if not ok:
            raise VertebraIDError(f"Cannot load the scene in '{path}'.")
