"""VertebraID: find and name every vertebra in a CT scan (Wang et al., CVPR 2021).

The 3D Slicer scripted module: Module, Widget, Logic and Test classes.

The Logic is GUI-free. It does its I/O through MRML nodes, storage nodes and module logics
(`VertebraIDLib.mrml`), so the same code runs inside 3D Slicer and on PyPI's `slicer-core`,
where pytest exercises it (Testing/Python/test_slicer_logic.py) and `vertebraid slicer-batch`
uses it. Qt, CTK and Slicer's scripted-module base classes exist only in the application: they
are imported under a guard, and plain stand-ins take their place elsewhere.

Evidence (the 26 activation maps) comes from a "heatmap source": the network when a model file
is given (`NetworkHeatmapSource`), or any detector's points rendered into maps
(`PointsHeatmapSource`: a markups point list, a Slicer markups file, a VerSe centroid file...).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import sys
import time
import unittest
from dataclasses import dataclass, field
from typing import Annotated, Callable

import numpy as np
import vtk

import slicer

try:
    import VertebraIDLib  # noqa: F401
except ImportError:  # a source checkout used without installing the package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from VertebraIDLib import mrml
from VertebraIDLib.anatomy import LEVELS_26, LabelSet, is_known_label, region
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.pipeline import Cancelled, Constraint, LocateOptions
from VertebraIDLib.vertebrae import CHECK_BELOW_CONFIDENCE, Vertebra, sort_by_level
from VertebraIDLib.volume import Volume

try:  # the 3D Slicer application
    import ctk  # noqa: F401  (present only in the application)
    import qt  # noqa: F401

    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
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

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
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
#: How a point's label is used as evidence: as its level, only its region, or not at all.
POINT_LABEL_MODES = ("level", "region", "none")
#: A solved vertebra this close (mm) to a point the user deleted is left out on Re-label.
DELETED_POINT_RADIUS_MM = 10.0
ATTR_REJECTED = "VertebraID.Rejected"  # on the point list: positions the user deleted

ProgressCallback = Callable[[float, str], "bool | None"]


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


# =========================================================================== heatmap sources


class MissingDependencies(VertebraIDError):
    """Python packages the network needs (torch, monai) are not installed."""

    def __init__(self, packages: list[str]):
        self.packages = list(packages)
        super().__init__(
            f"The network needs {' and '.join(self.packages)}, which {'is' if len(self.packages) == 1 else 'are'} "
            "not installed; install them (in Slicer: with the PyTorch extension) or use points as evidence."
        )


@dataclass
class Evidence:
    """The 26 activation maps for one scan, and where they came from."""

    heatmaps: Volume  # (I, J, K, 26)
    combined: Volume | None  # Ĝ when the source defines it (rendered points); None: sum of maps
    description: str
    sigma_mm: float | None = None  # the blobs' width when the source knows it
    level_specific: bool = True  # False: evidence names regions only, so the anchor weights are off
    locate_settings: dict = field(default_factory=dict)  # LocateOptions fields the source sets (a model's α, floor...)
    level_evidence: object = None  # the model's level labeller (pipeline.LevelEvidence), if it has one


class NetworkHeatmapSource:
    """Activation maps from the trained network (the network issue supplies `inference`)."""

    def __init__(self, model_path: str | os.PathLike | None, device: str = "auto"):
        self.model_path = pathlib.Path(model_path) if model_path else self._bundled_model()
        self.device = device

    @staticmethod
    def _bundled_model() -> pathlib.Path | None:
        """The model shipped in Resources/Models, when there is one."""
        try:
            from VertebraIDLib.network import bundled_model_path
        except ImportError:  # torch / MONAI not installed yet: check() says so
            return None
        return bundled_model_path()

    @staticmethod
    def missing_packages() -> list[str]:
        return [name for name in ("torch", "monai") if importlib.util.find_spec(name) is None]

    def check(self) -> None:
        """Raise a one-sentence error when the network cannot run (packages, model file)."""
        missing = self.missing_packages()
        if missing:
            raise MissingDependencies(missing)
        if self.model_path is None or not str(self.model_path).strip():
            raise VertebraIDError("Select a model file (.safetensors) for the network, or use points as evidence.")
        if not self.model_path.is_file():
            raise VertebraIDError(f"The model file '{self.model_path}' does not exist.")
        if importlib.util.find_spec("VertebraIDLib.inference") is None:
            raise VertebraIDError("This version of VertebraID has no network inference; use points as evidence.")

    def compute(self, ct: Volume, progress: ProgressCallback | None = None) -> Evidence:
        self.check()
        from VertebraIDLib import inference

        model = inference.load_model(self.model_path, self.device)
        heatmaps, level_evidence = inference.predict_evidence(ct, model, self.device, progress)
        description = f"network model {self.model_path.name}"
        if model.labeller is not None:
            description += " with its level labeller"
        if model.metadata.get("status"):  # e.g. a research preview: the user sees it beside the labels
            description += f" ({model.metadata['status']})"
        return Evidence(heatmaps, None, description, model.sigma_mm, locate_settings=model.locate_settings,
                        level_evidence=level_evidence)


class PointsHeatmapSource:
    """Any detector's points as evidence: each point becomes a Gaussian blob in the maps.

    A point's probabilities ({"L": 0.9} per region, {"L4": 1.0} per level) choose the channels
    it fires; without any, it fires all 26 and only the chain's order and spacing name it.
    Ĝ is one unit blob per point, whatever its channels (as `points.label_points` does).
    """

    def __init__(
        self,
        positions_ras,
        probabilities: list[dict | None] | None = None,
        description: str = "points",
        sigma_mm: float = 4.0,
        spacing_mm: float = 2.0,
    ):
        self.positions = np.asarray(positions_ras, float).reshape(-1, 3)
        self.probabilities = probabilities or [None] * len(self.positions)
        self.description = description
        self.sigma_mm = sigma_mm
        self.spacing_mm = spacing_mm

    @staticmethod
    def probabilities_from_labels(labels: list[str], mode: str = "level") -> list[dict | None]:
        if mode not in POINT_LABEL_MODES:
            raise VertebraIDError(f"Unknown point label mode '{mode}'; choose one of {', '.join(POINT_LABEL_MODES)}.")
        out: list[dict | None] = []
        for text in labels:
            label = mrml.normalize_label(text or "")
            if mode == "none" or not is_known_label(label):
                out.append(None)
            elif mode == "region":
                out.append({region(label): 1.0})
            else:
                out.append({label: 1.0})
        return out

    @classmethod
    def from_markups_node(cls, node, label_mode: str = "level", **kwargs) -> "PointsHeatmapSource":
        if node is None:
            raise VertebraIDError("Select a point list to use as evidence.")
        positions, labels = mrml.markups_positions(node)
        return cls(positions, cls.probabilities_from_labels(labels, label_mode), f"points '{node.GetName()}'", **kwargs)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        context: "mrml.SceneContext",
        reference: Volume | None = None,
        label_mode: str = "level",
        **kwargs,
    ) -> "PointsHeatmapSource":
        """Points from a Slicer markups file (read by the Markups logic), a points JSON
        (`label-points` input), or any labelled vertebrae file (VerSe centroids need `reference`)."""
        from VertebraIDLib import formats

        path = pathlib.Path(path)
        if not path.is_file():
            raise VertebraIDError(f"Cannot read '{path}': no such file.")
        description = f"points from {path.name}"
        if path.name.lower().endswith(".mrk.json"):
            node = mrml.read_markups(context, path)
            try:
                positions, labels = mrml.markups_positions(node)
            finally:
                mrml.remove_node_with_dependents(context.scene, node)
            return cls(positions, cls.probabilities_from_labels(labels, label_mode), description, **kwargs)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and "points" in data:
            positions, probabilities, _ = formats.read_points_json(path)
            return cls(positions, probabilities, description, **kwargs)
        vertebrae = formats.read_vertebrae_any(path, reference)
        positions = np.array([v.position for v in vertebrae], float).reshape(-1, 3)
        labels = [v.label for v in vertebrae]
        return cls(positions, cls.probabilities_from_labels(labels, label_mode), description, **kwargs)

    def check(self) -> None:
        if len(self.positions) == 0:
            raise VertebraIDError(f"The {self.description} hold no point.")

    def compute(self, ct: Volume, progress: ProgressCallback | None = None) -> Evidence:
        from VertebraIDLib.points import has_level_evidence, render_point_evidence

        self.check()
        heatmaps, combined = render_point_evidence(self.positions, self.probabilities, self.sigma_mm, self.spacing_mm)
        return Evidence(heatmaps, combined, self.description, self.sigma_mm, has_level_evidence(self.probabilities))


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
        self.setParameterNode(self.logic.getParameterNode())
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
        options = LocateOptions(method=p.method, transitional=p.transitional, weighted=p.weighted)
        self._setBusy(True)
        try:
            with slicer.util.tryWithErrorDisplay("Detect vertebrae failed.", waitCursor=True):
                try:
                    run = self.logic.detect(p.inputVolume, self._source(), options, progress=self._progress)
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


# =========================================================================== Logic


@dataclass
class DetectRun:
    """One Detect: its subject-hierarchy folder, the nodes in it by role, and the core result."""

    folder: int
    nodes: dict
    result: object  # pipeline.Result
    evidence: str
    timings_s: dict = field(default_factory=dict)


@dataclass
class RelabelReport:
    """What Re-label did."""

    result: object  # pipeline.Result of the constrained solve
    constraints: list[Constraint]  # the user's points that fixed their level
    ignored: list[str]  # labels of points left as they are (not a vertebra level)
    left_out: list[str]  # solved levels not placed because the user deleted a point there
    changed: int  # points whose label changed
    vertebrae: list[Vertebra]  # the final list, as now in the point list

    def summary(self) -> str:
        parts = [f"Re-labelled {len(self.vertebrae)} vertebrae: {self.changed} label(s) changed"]
        parts.append(f"{len(self.constraints)} fixed point(s) kept")
        if self.ignored:
            parts.append(f"point(s) {', '.join(self.ignored)} left as they are (not a vertebra label)")
        if self.left_out:
            parts.append(f"{', '.join(self.left_out)} not placed where you deleted points")
        to_check = [v.label for v in self.vertebrae if v.needs_check]
        if to_check:
            parts.append(f"check {', '.join(to_check)} (red: confidence below {CHECK_BELOW_CONFIDENCE:g})")
        return "; ".join(parts) + "."


def _scaled(progress: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    """A progress callback for a sub-step covering [start, end] of the whole."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * float(fraction), message)


def _report(progress: ProgressCallback | None, fraction: float, message: str) -> None:
    if progress is not None and progress(fraction, message):
        raise Cancelled(message)


def _options_to_dict(options: LocateOptions) -> dict:
    """Every setting of the run (the model's σ and optimiser settings included), so re-labelling repeats it."""
    return dataclasses.asdict(options)


class VertebraIDLogic(ScriptedLoadableModuleLogic):
    """Detect, re-label and save, on a MRML scene; no GUI.

    `context`: a `VertebraIDLib.mrml.SceneContext`; by default the running Slicer
    application's scene. Outside Slicer pass `mrml.SceneContext.create()`.
    """

    def __init__(self, context: "mrml.SceneContext | None" = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._context = context
        self._prepared: dict[int, tuple] = {}  # run folder -> (Prepared, LocateOptions)

    @property
    def context(self) -> "mrml.SceneContext":
        if self._context is None:
            self._context = mrml.SceneContext.current()
        return self._context

    @property
    def scene(self):
        return self.context.scene

    def getParameterNode(self):
        return VertebraIDParameterNode(super().getParameterNode())

    # ----------------------------------------------------------------- Detect

    def detect(
        self,
        volume_node,
        source,
        options: LocateOptions = LocateOptions(),
        progress: ProgressCallback | None = None,
        name: str | None = None,
    ) -> DetectRun:
        """Input volume -> activation maps -> the pipeline -> a new results folder.

        Raises VertebraIDError (one sentence) for bad input or when no spine is found, and
        `pipeline.Cancelled` when `progress` returns True. Nodes are created only once
        everything is computed, and removed again if creating them fails: an error or a
        cancel leaves the scene as it was.
        """
        from VertebraIDLib import pipeline

        timings: dict[str, float] = {}
        mrml.check_input_volume_node(volume_node)
        check = getattr(source, "check", None)
        if check is not None:
            check()
        _report(progress, 0.0, "Reading the volume")
        t0 = time.perf_counter()
        ct = mrml.volume_from_node(volume_node)
        timings["read_volume"] = time.perf_counter() - t0

        _report(progress, 0.02, f"Computing activation maps ({getattr(source, 'description', 'network')})")
        t0 = time.perf_counter()
        evidence = source.compute(ct, _scaled(progress, 0.02, 0.5))
        timings["activation_maps"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        settings = {"sigma_mm": evidence.sigma_mm} if evidence.sigma_mm is not None else {}
        settings.update(evidence.locate_settings)  # a model's own settings (σ included) win
        options = dataclasses.replace(options, weighted=options.weighted and evidence.level_specific, **settings)
        result = pipeline.locate(evidence.heatmaps, options, combined=evidence.combined,
                                 progress=_scaled(progress, 0.5, 0.9), level_evidence=evidence.level_evidence)
        timings["pipeline"] = time.perf_counter() - t0
        if result.prepared.centerline is None or not result.vertebrae:
            raise VertebraIDError(
                f"No spine was found in '{volume_node.GetName()}' ({evidence.description}); "
                "check that the scan shows the spine."
            )

        _report(progress, 0.9, "Straightening the CT along the centreline")
        t0 = time.perf_counter()
        straight_ct = result.rectified.straighten(ct)
        timings["straighten_ct"] = time.perf_counter() - t0

        _report(progress, 0.95, "Creating the results")
        t0 = time.perf_counter()
        with mrml.NodeTracker(self.scene):
            folder, nodes = self._create_run_nodes(volume_node, evidence, result, straight_ct, options, name)
        timings["create_nodes"] = time.perf_counter() - t0
        self._prepared[folder] = (result.prepared, options)
        if progress is not None:
            progress(1.0, "Done")
        return DetectRun(folder, nodes, result, evidence.description, timings)

    def _create_run_nodes(self, volume_node, evidence: Evidence, result, straight_ct: Volume, options, name):
        scene = self.scene
        rect = result.rectified
        input_name = volume_node.GetName()
        base = name or f"VertebraID {input_name}"
        taken = {scene.GetSubjectHierarchyNode().GetItemName(f) for f in mrml.run_folders(scene)}
        folder_name, n = base, 1
        while folder_name in taken:
            n += 1
            folder_name = f"{base} ({n})"
        run_info = {
            "input": volume_node.GetID(),
            "input_name": input_name,
            "evidence": evidence.description,
            "options": _options_to_dict(options),
            "energy": float(result.energy),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if rect.level_signals is not None:  # Re-label needs them and has no CT or labeller at hand
            run_info["level_signals"] = np.round(rect.level_signals, 4).tolist()
        folder = mrml.create_folder(scene, folder_name, {mrml.ATTR_RUN: json.dumps(run_info)})
        nodes: dict = {}

        def keep(role, node):
            mrml.place_in_folder(scene, node, folder, role)
            nodes[role] = node
            return node

        keep(mrml.ROLE_POINTS, mrml.add_vertebrae_points(scene, result.vertebrae, "Vertebrae"))
        keep(mrml.ROLE_REGIONS, mrml.add_region_model(scene, result.vertebrae, "Vertebra regions"))
        keep(mrml.ROLE_CENTERLINE, mrml.add_centerline_curve(scene, result.centerline.points, "Centreline"))

        color_id = mrml.activation_color_node(scene).GetID()
        combined = result.prepared.combined
        peak = float(combined.array.max()) or 1.0
        keep(
            mrml.ROLE_COMBINED,
            mrml.add_scalar_volume(
                scene, combined, "Combined activation", color_id, (peak, peak / 2), threshold=0.05 * peak
            ),
        )
        heatmaps = keep(mrml.ROLE_HEATMAPS, mrml.add_multichannel_volume(scene, result.prepared.heatmaps, "Activation maps"))
        heatmaps.GetDisplayNode().SetVisibility(False)

        window_level = None
        display = volume_node.GetDisplayNode()
        if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode"):
            window_level = (display.GetWindow(), display.GetLevel())
        keep(mrml.ROLE_STRAIGHT_CT, mrml.add_scalar_volume(scene, straight_ct, "Straightened CT", window_level=window_level))
        straight_combined = Volume(np.asarray(rect.combined, np.float32), rect.affine)
        speak = float(straight_combined.array.max()) or 1.0
        keep(
            mrml.ROLE_STRAIGHT_COMBINED,
            mrml.add_scalar_volume(
                scene, straight_combined, "Straightened activation", color_id, (speak, speak / 2), threshold=0.05 * speak
            ),
        )
        table = keep(mrml.ROLE_SIGNALS, mrml.add_signals_table(scene, rect, "Signals"))
        chart, series = mrml.add_signals_plot(scene, table, "Signals plot")
        keep(mrml.ROLE_PLOT, chart)
        for s in series:
            mrml.place_in_folder(scene, s, folder, mrml.ROLE_SERIES)
        return folder, nodes

    # ----------------------------------------------------------------- runs

    def run_of(self, node) -> int:
        """The run folder holding `node` (0 if none)."""
        if node is None:
            return 0
        folder = mrml.folder_of_node(self.scene, node)
        shn = self.scene.GetSubjectHierarchyNode()
        return folder if folder and shn.GetItemAttribute(folder, mrml.ATTR_RUN) else 0

    def run_nodes(self, run: int) -> dict:
        """The nodes of a run folder by role."""
        if not run:
            return {}
        return {n.GetAttribute(mrml.ATTR_ROLE): n for n in mrml.folder_nodes(self.scene, run) if n.GetAttribute(mrml.ATTR_ROLE)}

    def run_info(self, run: int) -> dict:
        return json.loads(self.scene.GetSubjectHierarchyNode().GetItemAttribute(run, mrml.ATTR_RUN) or "{}")

    def _options_of(self, run: int) -> LocateOptions:
        stored = self.run_info(run).get("options", {})
        return LocateOptions(**{k: v for k, v in stored.items() if k in LocateOptions.__dataclass_fields__})

    def _prepared_of(self, run: int):
        """The run's Ĝ, centreline and signals: kept from Detect, or rebuilt from the saved maps."""
        from VertebraIDLib import pipeline

        if run in self._prepared:
            return self._prepared[run]
        nodes = self.run_nodes(run)
        heatmaps_node = nodes.get(mrml.ROLE_HEATMAPS)
        if heatmaps_node is None:
            raise VertebraIDError("This run's activation maps were deleted, so it cannot be re-labelled; run Detect again.")
        heatmaps = mrml.multichannel_volume_from_node(heatmaps_node)
        combined_node = nodes.get(mrml.ROLE_COMBINED)
        combined = mrml.volume_from_node(combined_node) if combined_node is not None else None
        options = self._options_of(run)
        stored = self.run_info(run).get("level_signals")
        level_evidence = None if stored is None else (lambda line: stored)
        try:
            prepared = pipeline.prepare(heatmaps, options, combined=combined, level_evidence=level_evidence)
        except VertebraIDError:
            if stored is None:
                raise
            raise VertebraIDError("This run's stored level evidence no longer fits its activation maps; "
                                  "run Detect again.") from None
        if prepared.rectified is None:
            raise VertebraIDError("No spine is found in this run's stored activation maps; run Detect again.")
        self._prepared[run] = (prepared, options)
        return self._prepared[run]

    # ----------------------------------------------------------------- Re-label

    def relabel(self, run_or_node, progress: ProgressCallback | None = None) -> RelabelReport:
        """Re-solve the labels around the user's edits and update the run's "Vertebrae" list.

        The rule: a point the user locked, moved (> 0.5 mm), renamed or added is a hard
        constraint -- its label at its position -- provided its label is a vertebra level;
        such points are kept exactly as they are and locked (so they stay constraints).
        Points with other labels are left untouched and unused. Every other point is replaced
        by the solver's result. A point the user deleted means "no vertebra here": solved
        vertebrae within 10 mm of it are left out (now and in later Re-labels), unless the
        user puts a point there again. Re-label always uses the exact solver (the paper's
        Algorithm 1 cannot take fixed points). Detect is never affected: it makes a new folder.
        """
        from VertebraIDLib import pipeline

        run = run_or_node if isinstance(run_or_node, int) else self.run_of(run_or_node)
        if not run:
            raise VertebraIDError("Select the 'Vertebrae' point list of a VertebraID run to re-label.")
        points_node = self.run_nodes(run).get(mrml.ROLE_POINTS)
        if points_node is None:
            raise VertebraIDError("This run has no 'Vertebrae' point list; run Detect again.")

        edits = mrml.read_point_edits(points_node)
        constraints: list[Constraint] = []
        kept_as_is: list[mrml.PointState] = []
        ignored: list[str] = []
        for state in edits.points:
            if not state.is_vertebra_label:
                kept_as_is.append(state)
                if state.edited or state.locked:
                    ignored.append(state.text.strip() or "(no label)")
            elif state.locked or state.edited:
                constraints.append(Constraint(state.label, state.position))
        labels_seen: dict[str, int] = {}
        for c in constraints:
            labels_seen[c.label] = labels_seen.get(c.label, 0) + 1
        doubled = sorted(label for label, count in labels_seen.items() if count > 1)
        if doubled:
            raise VertebraIDError(
                f"Several fixed points are labelled {', '.join(doubled)}; rename or unlock all but one."
            )
        rejected = json.loads(points_node.GetAttribute(ATTR_REJECTED) or "[]")
        rejected += [list(map(float, position)) for _, position in edits.deleted]

        prepared, options = self._prepared_of(run)
        solve_options = LocateOptions(**{**_options_to_dict(options), "method": "exact"})
        _report(progress, 0.0, "Re-labelling")
        result = pipeline.solve(prepared, solve_options, constraints, progress=_scaled(progress, 0.1, 0.9))

        fixed = {c.label for c in constraints}
        final = [Vertebra(c.label, c.position, 1.0, locked=True) for c in constraints]
        left_out = []
        rejected_array = np.asarray(rejected, float).reshape(-1, 3)
        for v in result.vertebrae:
            if v.label in fixed:
                continue
            if len(rejected_array) and np.min(np.linalg.norm(rejected_array - v.position, axis=1)) < DELETED_POINT_RADIUS_MM:
                left_out.append(v.label)
                continue
            final.append(Vertebra(v.label, v.position, v.confidence))
        if len(rejected_array) and constraints:  # a point put back where one was deleted wins
            fixed_positions = np.array([c.position for c in constraints])
            keep = np.min(np.linalg.norm(rejected_array[:, None] - fixed_positions[None], axis=2), axis=1) >= DELETED_POINT_RADIUS_MM
            rejected_array = rejected_array[keep]

        changed = 0
        previous = [(s.position, s.label) for s in edits.points if s.is_vertebra_label]
        for v in final:
            if not previous:
                break
            d = [float(np.linalg.norm(p - v.position)) for p, _ in previous]
            i = int(np.argmin(d))
            if d[i] < 2.0 and previous[i][1] != v.label:
                changed += 1

        final = sort_by_level(final)
        self._write_points(points_node, final, kept_as_is)
        points_node.SetAttribute(ATTR_REJECTED, json.dumps(rejected_array.tolist()))
        regions = self.run_nodes(run).get(mrml.ROLE_REGIONS)
        if regions is not None:
            mrml.update_region_model(regions, final)
        info = self.run_info(run)
        info["relabelled"] = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "constraints": [c.label for c in constraints],
            "energy": float(result.energy),
        }
        self.scene.GetSubjectHierarchyNode().SetItemAttribute(run, mrml.ATTR_RUN, json.dumps(info))
        if progress is not None:
            progress(1.0, "Done")
        return RelabelReport(result, constraints, ignored, left_out, changed, final)

    @staticmethod
    def _write_points(node, vertebrae: list[Vertebra], untouched: list) -> None:
        """Rewrite the list: the vertebrae in level order, then the untouched non-vertebra points."""
        mrml.set_vertebrae_points(node, vertebrae)
        for state in untouched:
            index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), state.text)
            node.SetNthControlPointPositionWorld(index, *map(float, state.position))
            node.SetNthControlPointDescription(index, state.description)
            node.SetNthControlPointLocked(index, state.locked)
        mrml.remember_solved(node)

    # ----------------------------------------------------------------- views

    def show_level_map(self, run: int, label: str):
        """Show one level's own activation map: a 'Level map' volume in the run (created once, then updated)."""
        labels = LabelSet.standard(transitional=True)
        label = mrml.normalize_label(label)
        if label not in labels.levels:
            raise VertebraIDError(f"'{label}' is not a vertebra label (C1..C7, T1..T12, L1..L5, S1, S2).")
        channel = labels.channel(label)
        if channel is None:
            raise VertebraIDError(f"{label} is a transitional level and has no activation map of its own.")
        nodes = self.run_nodes(run)
        heatmaps_node = nodes.get(mrml.ROLE_HEATMAPS)
        if heatmaps_node is None:
            raise VertebraIDError("This run's activation maps were deleted; run Detect again.")
        maps = mrml.multichannel_volume_from_node(heatmaps_node)
        one = maps.channel(channel)
        one = Volume(np.ascontiguousarray(one.array), one.affine)
        peak = float(one.array.max()) or 1.0
        node = nodes.get(mrml.ROLE_LEVEL_MAP)
        name = f"Activation map {label}"
        if node is None:
            with mrml.NodeTracker(self.scene):
                node = mrml.add_scalar_volume(
                    self.scene, one, name, mrml.activation_color_node(self.scene).GetID(), (peak, peak / 2), 0.05 * peak
                )
                mrml.place_in_folder(self.scene, node, run, mrml.ROLE_LEVEL_MAP)
        else:
            mrml.update_scalar_volume(node, one)
            node.SetName(name)
            display = node.GetDisplayNode()
            display.SetWindowLevel(peak, peak / 2)
            display.SetThreshold(0.05 * peak, peak + 1.0)
        return node

    # ----------------------------------------------------------------- saving

    def save_results(self, run: int, output_dir: str | os.PathLike, case_name: str) -> dict[str, pathlib.Path]:
        """Write <case>.vertebrae.mrk.json and <case>.centerline.mrk.json (markups storage nodes)."""
        nodes = self.run_nodes(run)
        output_dir = pathlib.Path(output_dir)
        paths = {
            "vertebrae": output_dir / f"{case_name}.vertebrae.mrk.json",
            "centerline": output_dir / f"{case_name}.centerline.mrk.json",
        }
        mrml.write_markups(nodes[mrml.ROLE_POINTS], paths["vertebrae"])
        mrml.write_markups(nodes[mrml.ROLE_CENTERLINE], paths["centerline"])
        return paths

    def save_scene(self, path: str | os.PathLike) -> pathlib.Path:
        """The whole scene as a Slicer scene bundle (.mrb)."""
        mrml.write_scene_bundle(self.scene, path)
        return pathlib.Path(path)


# =========================================================================== synthetic test case


def synthetic_spine_case(seed: int = 3, levels: tuple[str, str] = ("T3", "L4"), spacing_mm: float = 3.0):
    """A small CT-like volume with a simulated spine, and its true vertebrae (cranial first).

    The spine (centres from `simulate.simulate_case`) is drawn as bright vertebral bodies in
    soft tissue, on an axis-aligned LPS-ordered grid (as scanners store axial CT).
    Returns (ct: Volume, truth: list[Vertebra]).
    """
    from VertebraIDLib.points import render_gaussians
    from VertebraIDLib.simulate import simulate_case

    truth = simulate_case(seed, difficulty="clean", levels=levels, oblique=False).truth
    centres = np.array([v.position for v in truth])
    lo = centres.min(axis=0) - 45.0
    hi = centres.max(axis=0) + 45.0
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    affine = np.diag([-spacing_mm, -spacing_mm, spacing_mm, 1.0])  # i -> left... LPS-like voxel order
    affine[:3, 3] = [hi[0], hi[1], lo[2]]
    grid = Volume(np.zeros(shape, np.float32), affine)
    bone = render_gaussians(centres, np.ones((len(centres), 1)), grid, 7.0)[..., 0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    ras = grid.voxel_to_world(ijk.reshape(-1, 3)).reshape(shape + (3,))
    axis_centre = centres.mean(axis=0)
    body = np.hypot(ras[..., 0] - axis_centre[0], ras[..., 1] - axis_centre[1]) < 0.45 * float(np.ptp(ras[..., 0]))
    ct = np.where(body, 40.0, -1000.0) + 900.0 * bone
    rng = np.random.default_rng(seed)
    ct = (ct + rng.normal(0.0, 10.0, shape)).astype(np.float32)
    return Volume(ct, affine), truth


def shifted_points_source(truth: list[Vertebra], bias: float = 0.05) -> PointsHeatmapSource:
    """Points at the true centres whose evidence mildly prefers the next level down.

    Each point fires every channel of its true region at 1 - bias and the next level's channel
    at 1, as a network unsure of the exact level might: Detect then names every vertebra one
    level too low ("a shifted-by-one result, made on purpose").
    """
    probabilities = []
    for v in truth:
        k = LEVELS_26.index(v.label)
        p = {region(v.label): 1.0 - bias}
        if k + 1 < len(LEVELS_26):
            p[LEVELS_26[k + 1]] = 1.0
        probabilities.append(p)
    return PointsHeatmapSource([v.position for v in truth], probabilities, "shifted test points")


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
