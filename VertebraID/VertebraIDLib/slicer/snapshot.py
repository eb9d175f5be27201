"""Pictures of a run as Slicer's slice views draw them, rendered off screen (no application needed).

Slicer's own slice-view machinery from slicer-core does the drawing: a `vtkMRMLSliceLogic`
reslices and blends the CT (background) with Ĝ (foreground, its colour table and threshold),
and the displayable managers draw the markups (the labelled points, red where a label is to
be checked, and the centreline) exactly as the slice views of 3D Slicer do. The views are
rendered into an off-screen VTK window (EGL or OSMesa) and written as one PNG, views side by
side: `vertebraid slicer-batch --screenshots` and the README's picture use it.

Only for headless use (slicer-core, `Slicer --no-main-window`): in the application the
layout's own views are the picture (Screen Capture module).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import VertebraIDError
from ..io.files import PathLike, atomic_path
from . import mrml

#: Slice views of the picture, left to right.
ORIENTATIONS = ("Sagittal", "Coronal")
VIEW_SIZE = (380, 620)  # pixels of one view (width, height)


def _register_displayable_managers(app_logic):
    import slicer

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for name in ("vtkMRMLModelSliceDisplayableManager", "vtkMRMLMarkupsDisplayableManager"):
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    return factory


def render_slice_view(context: "mrml.SceneContext", background, foreground=None, opacity: float = 0.45,
                      orientation: str = "Sagittal", centre=None, size=VIEW_SIZE, fov_mm: float | None = None):
    """One slice view through `centre` (RAS mm): background volume, foreground overlay and every
    visible markups node of the scene, as a vtkImageData (RGB)."""
    import slicer
    import vtk

    if context.app_logic is None:
        raise VertebraIDError("Rendering needs the scene's application logic (SceneContext.create()).")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no X server: straight to EGL
    scene = context.scene
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.SetMultiSamples(0)
    renderer = vtk.vtkRenderer()
    renderer.GetActiveCamera().ParallelProjectionOn()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # the displayable managers expect one
    interactor.SetRenderWindow(window)

    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.SetRenderer(renderer)
    group.Initialize(_register_displayable_managers(context.app_logic), renderer)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(context.app_logic)
    context.app_logic.GetSliceLogics().AddItem(logic)
    slice_node = None
    tracker = mrml.NodeTracker(scene)  # the slice node, its composite node, slice models...: removed afterwards
    tracker.__enter__()
    try:
        logic.SetMRMLScene(scene)
        slice_node = logic.AddSliceNode(scene.GenerateUniqueName("VertebraIDSnapshot"))
        group.SetMRMLDisplayableNode(slice_node)
        slice_node.SetOrientation(orientation)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity)
        logic.ResizeSliceNode(*size)
        logic.FitSliceToBackground()
        if centre is not None:
            slice_node.JumpSliceByCentering(*map(float, centre))
        if fov_mm:
            fov = slice_node.GetFieldOfView()
            slice_node.SetFieldOfView(fov_mm * size[0] / size[1], fov_mm, fov[2])
        slice_node.UpdateMatrices()
        for layer in (logic.GetBackgroundLayer(), logic.GetForegroundLayer()):
            layer.UpdateTransforms()
        logic.UpdatePipeline()
        logic.UpdateImageData()

        mapper = vtk.vtkImageMapper()  # the blended slice (RGBA 0..255), as Slicer's slice view shows it
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        mapper.SetInputConnection(logic.GetImageDataConnection())
        actor = vtk.vtkActor2D()
        actor.SetMapper(mapper)
        actor.GetProperty().SetDisplayLocationToBackground()
        renderer.AddViewProp(actor)
        window.Render()
        window.Render()  # the displayable managers update on the first render
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = vtk.vtkImageData()
        image.DeepCopy(grab.GetOutput())
        return image
    finally:
        group.SetMRMLDisplayableNode(None)
        context.app_logic.GetSliceLogics().RemoveItem(logic)
        logic.SetMRMLScene(None)
        tracker.__exit__(None, None, None)
        tracker.remove_all()
        window.Finalize()


def side_by_side(images) -> "object":
    """vtkImageData views next to each other (same height)."""
    import vtk

    append = vtk.vtkImageAppend()
    append.SetAppendAxis(0)
    for image in images:
        append.AddInputData(image)
    append.Update()
    out = vtk.vtkImageData()
    out.DeepCopy(append.GetOutput())
    return out


def write_png(image, path: PathLike) -> Path:
    """Write a vtkImageData as PNG, atomically."""
    import vtk

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(image)
        writer.Write()
    return path


def run_picture(logic, run: int, path: PathLike, orientations=ORIENTATIONS, size=VIEW_SIZE,
                margin_mm: float = 60.0) -> Path:
    """The picture of a run: the input CT with Ĝ over it and the labelled points, one view per orientation,
    through the middle of the labelled spine. Every point shows (projected onto the views, as Slicer's
    "slice projection" does), its label beside it; red: a label to check."""
    nodes = logic.run_nodes(run)
    info = logic.run_info(run)
    background = logic.scene.GetNodeByID(info.get("input", ""))
    points = nodes.get(mrml.ROLE_POINTS)
    if background is None or points is None:
        raise VertebraIDError("This run's input volume or point list is gone; nothing to picture.")
    positions, _ = mrml.markups_positions(points)
    centre = positions.mean(axis=0) if len(positions) else None
    fov = float(np.ptp(positions[:, 2]) + 2 * margin_mm) if len(positions) > 1 else None
    scene = logic.scene
    hidden = []  # nodes whose display the picture changes, and how they were
    temporary = []
    try:
        # The run's points as two lists for the picture, so that every point is drawn (projected onto the
        # views) in its own colour: Slicer projects a list's points in one colour.
        for selected in (True, False):
            copy = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName("VertebraIDPicture"))
            temporary.append(copy)
            copy.CreateDefaultDisplayNodes()
            source_display, display = points.GetDisplayNode(), copy.GetDisplayNode()
            colour = source_display.GetSelectedColor() if selected else source_display.GetColor()
            display.SetColor(*colour)
            display.SetSelectedColor(*colour)
            display.SetTextScale(source_display.GetTextScale())
            display.SetGlyphScale(source_display.GetGlyphScale())
            display.SetSliceProjection(True)
            display.SetSliceProjectionUseFiducialColor(True)
            display.SetSliceProjectionOpacity(1.0)
            display.SetPropertiesLabelVisibility(False)
            for i in range(points.GetNumberOfControlPoints()):
                if bool(points.GetNthControlPointSelected(i)) == selected:
                    index = copy.AddControlPointWorld(points.GetNthControlPointPositionWorldVector(i)
                                                      if hasattr(points, "GetNthControlPointPositionWorldVector")
                                                      else _vector(points.GetNthControlPointPositionWorld(i)),
                                                      points.GetNthControlPointLabel(i))
                    copy.SetNthControlPointSelected(index, True)
        for node in (points, nodes.get(mrml.ROLE_CENTERLINE)):
            if node is not None and node.GetDisplayNode() is not None:
                display = node.GetDisplayNode()
                hidden.append((display, display.GetVisibility(), display.GetPropertiesLabelVisibility()))
                display.SetPropertiesLabelVisibility(False)
        points.GetDisplayNode().SetVisibility(False)
        views = [render_slice_view(logic.context, background, nodes.get(mrml.ROLE_COMBINED), 0.45, orientation,
                                   centre, size, fov) for orientation in orientations]
    finally:
        for display, visible, label in hidden:
            display.SetVisibility(visible)
            display.SetPropertiesLabelVisibility(label)
        for node in temporary:
            mrml.remove_node_with_dependents(scene, node)
    return write_png(side_by_side(views), path)


def _vector(position):
    import vtk

    return vtk.vtkVector3d(*map(float, position))
