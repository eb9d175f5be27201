"""VertebraID: find and name every vertebra in a CT scan (Wang et al., CVPR 2021).

The 3D Slicer scripted module: Module, parameter node, Widget and Test classes. The Logic
(Detect, Re-label, save; GUI-free, also run on PyPI's `slicer-core` by pytest and
`vertebraid slicer-batch`) lives in `VertebraIDLib.slicer.logic`. Qt, CTK and Slicer's
scripted-module base classes exist only in the application: they are imported under a guard,
and plain stand-ins take their place elsewhere.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import unittest
from typing import Annotated

import numpy as np
import slicer
import vtk

try:
    import VertebraIDLib  # noqa: F401
except ImportError:  # a source checkout used without installing the package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from VertebraIDLib.engine.anatomy import LEVELS_26
from VertebraIDLib.engine.progress import Cancelled
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.engine.vertebrae import CHECK_BELOW_CONFIDENCE
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.slicer import mrml
from VertebraIDLib.slicer.logic import (
    POINT_LABEL_MODES,
    MissingDependencies,
    NetworkHeatmapSource,
    PointsHeatmapSource,
    VertebraIDLogic,
    shifted_points_source,
    synthetic_spine_case,
)

try:  # the 3D Slicer application
    import ctk  # noqa: F401  (present only in the application)
    import qt  # noqa: F401
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_SLICER_APP = True
except ImportError:  # slicer-core or plain Python: minimal stand-ins, enough for the Logic
    HAVE_SLICER_APP = False

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            logging.info(message)

    class VTKObservationMixin:
        def __init__(self):
            pass

    class Choice:
        def __init__(self, choices):
            self.choices = tuple(choices)

    def parameterNodeWrapper(cls):
        return cls


#: Evidence sources the module offers.
SOURCE_NETWORK = "Network model"
SOURCE_POINTS = "Points"


# =========================================================================== Module


class VertebraID(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VertebraID"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VertebraID contributors"]
        self.parent.helpText = """
Finds and names every vertebra (C1..S2) in a CT scan, after Wang et al., CVPR 2021: 26 activation
maps, the spine centreline, the straightened spine, 1-D signals and an anatomically constrained
optimiser. <b>Detect vertebrae</b> puts each run's results in its own folder: the labelled points
("Vertebrae"), the centreline, the combined activation map as an overlay, the straightened CT and
maps, and the 1-D signals as a table and a plot. When the model has a level labeller (the bundled
one does), it reads the straightened CT along the whole spine and adds its evidence of which
level is where to those signals.<br>
<b>Correct and re-label</b>: move, rename, add, delete or lock points in "Vertebrae", then click
<b>Re-label</b>. Locked points, and points you moved, renamed or added, are kept exactly as they
are and fix their level; every other label is solved again around them (and edited points are
locked). A deleted point means "no vertebra here": Re-label will not put one back there.
"""
        self.parent.acknowledgementText = """
Method: R. Wang, J. H. C. Leung, et al., "Automatic vertebra localization and identification
in CT by spine rectification and anatomically-constrained optimization", CVPR 2021.
"""


# =========================================================================== parameter node


@parameterNodeWrapper
class VertebraIDParameterNode:
    """The module's GUI state, saved with the scene.

    inputVolume - the CT to process.
    evidenceSource - where the activation maps come from (the network or points).
    modelPath, device - the network's model file and where it runs.
    inputPoints, pointLabels - the point list used as evidence and how its labels count.
    method - the optimiser: the exact solver (global minimum; needed for Re-label) or the paper's Algorithm 1.
    transitional - allow T13 and L6.
    weighted - the paper's anchor weights (C1, C2, S1, S2 count double).
    resultPoints - the "Vertebrae" list of the run to correct and re-label.
    levelMap - the level whose own activation map is shown ("Combined" shows Ĝ).
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    evidenceSource: Annotated[str, Choice([SOURCE_NETWORK, SOURCE_POINTS])] = SOURCE_NETWORK
    modelPath: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    inputPoints: slicer.vtkMRMLMarkupsFiducialNode
    pointLabels: Annotated[str, Choice(list(POINT_LABEL_MODES))] = "level"
    method: Annotated[str, Choice(["exact", "paper"])] = "exact"
    transitional: bool = False
    weighted: bool = True
    resultPoints: slicer.vtkMRMLMarkupsFiducialNode
    levelMap: Annotated[str, Choice(["Combined", *LEVELS_26])] = "Combined"


# =========================================================================== Widget


class VertebraIDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: bound to the parameter node; every action is one Logic call."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._busy = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VertebraID.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VertebraIDLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.relabelButton.connect("clicked(bool)", self.onRelabel)
        self.ui.showStraightenedButton.connect("clicked(bool)", self.onShowStraightened)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.levelMapComboBox.connect("currentIndexChanged(int)", self.onLevelMapChanged)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(VertebraIDParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        network = p.evidenceSource == SOURCE_NETWORK
        self.ui.modelPathLineEdit.enabled = network
        self.ui.deviceComboBox.enabled = network
        self.ui.inputPointsSelector.enabled = not network
        self.ui.pointLabelsComboBox.enabled = not network
        self.ui.detectButton.enabled = bool(p.inputVolume) and not self._busy
        has_run = bool(p.resultPoints) and bool(self.logic.run_of(p.resultPoints))
        self.ui.relabelButton.enabled = has_run and not self._busy
        self.ui.showStraightenedButton.enabled = has_run
        self.ui.showPlotButton.enabled = has_run
        self.ui.levelMapComboBox.enabled = has_run

    # ----------------------------------------------------------------- actions

    def _progress(self, fraction: float, message: str) -> bool:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # lets the Cancel button through
        return self._cancelRequested

    def _setBusy(self, busy: bool) -> None:
        self._busy = busy
        self._cancelRequested = False
        self.ui.progressBar.setVisible(busy)
        self.ui.cancelButton.setVisible(busy)
        self.ui.progressBar.value = 0
        self._updateButtons()

    def onCancel(self) -> None:
        self._cancelRequested = True

    def _source(self):
        p = self._parameterNode
        if p.evidenceSource == SOURCE_POINTS:
            return PointsHeatmapSource.from_markups_node(p.inputPoints, p.pointLabels)
        source = NetworkHeatmapSource(p.modelPath if str(p.modelPath) not in ("", ".") else None, p.device)
        missing = source.missing_packages()
        if missing and not self._installNetworkDependencies(missing):
            raise MissingDependencies(missing)
        return source

    def _installNetworkDependencies(self, missing: list[str]) -> bool:
        """Install torch (through the PyTorch extension when present) and MONAI, after asking."""
        if not slicer.util.confirmOkCancelDisplay(
            f"The network needs {', '.join(missing)}. Install now? This downloads large packages "
            "and may take several minutes.",
            "VertebraID: install Python packages",
        ):
            return False
        with slicer.util.WaitCursor():
            if "torch" in missing:
                try:
                    import PyTorchUtils

                    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                        return False
                except ModuleNotFoundError:
                    slicer.util.pip_install("torch")
            if "monai" in missing:
                slicer.util.pip_install("monai==1.6.1")
        return not NetworkHeatmapSource.missing_packages()

    def onDetect(self) -> None:
        p = self._parameterNode
        settings = EngineSettings(method=p.method, transitional=p.transitional, weighted=p.weighted)
        self._setBusy(True)
        try:
            with slicer.util.tryWithErrorDisplay("Detect vertebrae failed.", waitCursor=True):
                try:
                    run = self.logic.detect(p.inputVolume, self._source(), settings, progress=self._progress)
                except Cancelled:
                    self.ui.statusLabel.text = "Cancelled; nothing was added to the scene."
                    return
                p.resultPoints = run.nodes[mrml.ROLE_POINTS]
                found = run.result.vertebrae
                span = f" ({found[0].label}-{found[-1].label})" if found else ""
                to_check = [v.label for v in found if v.needs_check]
                check = (f" Check {', '.join(to_check)} (red: confidence below {CHECK_BELOW_CONFIDENCE:g})."
                         if to_check else "")
                self.ui.statusLabel.text = (
                    f"Found {len(found)} vertebrae{span} in {sum(run.timings_s.values()):.1f} s from the {run.evidence}."
                    + check
                )
                slicer.util.setSliceViewerLayers(
                    background=p.inputVolume, foreground=run.nodes[mrml.ROLE_COMBINED], foregroundOpacity=0.4
                )
        finally:
            self._setBusy(False)

    def onRelabel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Re-label failed.", waitCursor=True):
            report = self.logic.relabel(self._parameterNode.resultPoints)
            self.ui.statusLabel.text = report.summary()

    def onLevelMapChanged(self, index=None) -> None:
        """Overlay Ĝ ("Combined") or the chosen level's own activation map."""
        run = self.logic.run_of(self._parameterNode.resultPoints) if self._parameterNode else 0
        if not run:
            return
        level = self.ui.levelMapComboBox.currentText
        node = None
        if level == "Combined":
            node = self.logic.run_nodes(run).get(mrml.ROLE_COMBINED)
        else:
            with slicer.util.tryWithErrorDisplay("Cannot show the map.", waitCursor=True):
                node = self.logic.show_level_map(run, level)
        if node is not None:
            slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.4)

    def onShowStraightened(self) -> None:
        nodes = self.logic.run_nodes(self.logic.run_of(self._parameterNode.resultPoints))
        slicer.util.setSliceViewerLayers(
            background=nodes.get(mrml.ROLE_STRAIGHT_CT, "keep-current"),
            foreground=nodes.get(mrml.ROLE_STRAIGHT_COMBINED, "keep-current"),
            foregroundOpacity=0.4,
            fit=True,
        )

    def onShowPlot(self) -> None:
        nodes = self.logic.run_nodes(self.logic.run_of(self._parameterNode.resultPoints))
        chart = nodes.get(mrml.ROLE_PLOT)
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)


# =========================================================================== Test


class VertebraIDTest(ScriptedLoadableModuleTest):
    """Self-test in 3D Slicer: Detect on a synthetic spine, correct one label, Re-label."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_detect_correct_relabel()
        self.setUp()
        self.test_bad_input()

    def test_detect_correct_relabel(self):
        self.delayDisplay("Detect, correct one label, Re-label")
        ct, truth = synthetic_spine_case()
        volume_node = slicer.util.addVolumeFromArray(
            np.transpose(ct.array, (2, 1, 0)), ijkToRAS=mrml._vtk_matrix(ct.affine), name="Synthetic CT"
        )
        logic = VertebraIDLogic()
        run = logic.detect(volume_node, shifted_points_source(truth))
        detected = [v.label for v in run.result.vertebrae]
        self.assertEqual(detected[0], LEVELS_26[LEVELS_26.index(truth[0].label) + 1])
        points = run.nodes[mrml.ROLE_POINTS]
        middle = truth[len(truth) // 2]
        index = int(np.argmin([np.linalg.norm(np.array(points.GetNthControlPointPositionWorld(i)) - middle.position)
                               for i in range(points.GetNumberOfControlPoints())]))
        points.SetNthControlPointLabel(index, middle.label)
        points.SetNthControlPointLocked(index, True)
        logic.relabel(points)
        self.assertEqual([v.label for v in mrml.vertebrae_from_points(points)], [v.label for v in truth])
        self.delayDisplay("Test passed")

    def test_bad_input(self):
        self.delayDisplay("Bad input leaves the scene as it was")
        logic = VertebraIDLogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(VertebraIDError):
            logic.detect(None, PointsHeatmapSource(np.zeros((0, 3))))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")
