"""VertebraID: find and name every vertebra in a CT scan (Wang et al., CVPR 2021).

The 3D Slicer scripted module: Module, parameter node, Widget and Test classes. The Logic
(Detect, Re-label, the correction panel's actions, save; GUI-free, also run on PyPI's
`slicer-core` by pytest and `vertebraid slicer-batch`) lives in `VertebraIDLib.slicer`.
Qt, CTK and Slicer's scripted-module base classes exist only in the application: they are
imported under a guard, and plain stand-ins take their place elsewhere.

3D Slicer 5.10 or later is needed (Python 3.10+; 5.8 ships Python 3.9). In an older Slicer
this file still loads and says so in one sentence, in the module panel and the log.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import unittest
from typing import Annotated

import slicer
import vtk

#: The first 3D Slicer release whose Python (3.12) is new enough; keep in step with
#: VertebraIDLib/slicer/requirements.py, CMakeLists.txt and README.md.
MINIMUM_SLICER_VERSION = "5.10"
MINIMUM_PYTHON = (3, 10)
PYTHON_SUPPORTED = tuple(sys.version_info[:2]) >= MINIMUM_PYTHON
UNSUPPORTED_MESSAGE = (
    f"VertebraID needs 3D Slicer {MINIMUM_SLICER_VERSION} or later (Python 3.10 or later), but this 3D Slicer "
    f"runs Python {sys.version_info[0]}.{sys.version_info[1]}: please install a newer 3D Slicer."
)
#: Where users read how to use the module (the repository's README until the extension has its own page).
DOCUMENTATION_URL = "https://github.com/REPLACE-WITH-OWNER/SlicerVertebraID#readme"  # fill in at publication
#: The sample CT registered with the Sample Data module, when the extension ships one (Resources/SampleData/).
SAMPLE_DATA_FILE = "VertebraIDSampleSpineCT.nii.gz"
SAMPLE_DATA_NODE_NAME = "VertebraID sample spine CT"

if PYTHON_SUPPORTED:
    try:
        import VertebraIDLib  # noqa: F401
    except ImportError:  # a source checkout used without installing the package
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import numpy as np

    from VertebraIDLib.engine.anatomy import LEVELS_26
    from VertebraIDLib.engine.settings import EngineSettings
    from VertebraIDLib.errors import VertebraIDError
    from VertebraIDLib.slicer import mrml, requirements
    from VertebraIDLib.slicer.logic import (
        POINT_LABEL_MODES,
        MissingDependencies,
        NetworkHeatmapSource,
        PointsHeatmapSource,
        VertebraIDLogic,
        shifted_points_source,
        synthetic_spine_case,
    )
    from VertebraIDLib.slicer.review import all_levels
else:  # 3D Slicer 5.8 or older: say so, once, in the log (the panel shows it too)
    logging.error(UNSUPPORTED_MESSAGE)
    LEVELS_26 = ()
    POINT_LABEL_MODES = ("level",)

try:  # the 3D Slicer application
    import ctk  # noqa: F401  (present only in the application)
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
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

    def _(text):
        return text

    def translate(context, text):
        return text

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
#: How often the Widget reads the background process's progress (ms).
POLL_INTERVAL_MS = 200
#: Columns of the correction table.
COLUMN_LABEL, COLUMN_CONFIDENCE, COLUMN_CHECK, COLUMN_LOCK = range(4)


# =========================================================================== Module


class VertebraID(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VertebraID")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VertebraID contributors"]
        if not PYTHON_SUPPORTED:
            self.parent.helpText = UNSUPPORTED_MESSAGE
            self.parent.acknowledgementText = ""
            return
        self.parent.helpText = _("""
Finds and names every vertebra (C1..S2) in a CT scan, after Wang et al., CVPR 2021: 26 activation
maps, the spine centreline, the straightened spine, 1-D signals and an anatomically constrained
optimiser. <b>Detect vertebrae</b> runs in the background (the application stays responsive,
Cancel stops it) and puts each run's results in its own folder, named after the input: the
labelled points ("ct: Vertebrae"), the centreline, the region spheres and the combined activation
map as an overlay; the activation maps, straightened volumes and 1-D signals sit in its collapsed
"details" sub-folder.<br>
<b>Correct and re-label</b>: the table lists the labels to check first, with the reason (lowest
rib? sacrum? first rib?); click a row to jump there, pick a label or lock a point. Move, rename,
add, delete or lock points in "Vertebrae", then click <b>Re-label</b>: locked, moved, renamed and
added points are kept where they are and fix their level (a point added with the Markups toolbar
gets the level that fits it best); every other label is solved again around them. A deleted
point means "no vertebra here". <b>All labels one level up/down</b> fixes a spine named one level off.
<br>The bundled model is a research preview trained on synthetic CT: check every label.
See the <a href="{url}">documentation</a>.
""").format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("""
Method: R. Wang, J. H. C. Leung, et al., "Automatic vertebra localization and identification
in CT by spine rectification and anatomically-constrained optimization", CVPR 2021.
""")
        if HAVE_SLICER_APP:  # once the application has started, offer the sample CT in Sample Data
            slicer.app.connect("startupCompleted()", registerSampleData)


def sampleDataPath() -> str | None:
    """The bundled sample CT (Resources/SampleData/SAMPLE_DATA_FILE), or None when none is shipped."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "SampleData", SAMPLE_DATA_FILE)
    return path if os.path.isfile(path) else None


def registerSampleData() -> bool:
    """Offer the bundled spine CT in the Sample Data module (nothing to do when none is shipped)."""
    path = sampleDataPath()
    if path is None:
        return False
    import hashlib

    import SampleData

    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    iconsPath = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons")
    thumbnail = os.path.join(iconsPath, "VertebraIDSampleSpineCT.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="VertebraID",
        sampleName=SAMPLE_DATA_NODE_NAME,
        thumbnailFileName=thumbnail if os.path.isfile(thumbnail) else os.path.join(iconsPath, "VertebraID.png"),
        uris=pathlib.Path(path).as_uri(),  # shipped with the extension: copied into the cache, checked
        fileNames=SAMPLE_DATA_FILE,
        checksums=f"SHA256:{digest}",
        nodeNames=SAMPLE_DATA_NODE_NAME,
    )
    return True


# =========================================================================== parameter node

if PYTHON_SUPPORTED:

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
    """Thin GUI: bound to the parameter node; every action is one Logic call.

    Detect runs in a child process (`logic.start_detect`); a timer reads its progress, Cancel
    ends it, and the nodes are made when it has finished (`logic.finish_detect`).
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running Detect (background.DetectJob)
        self._observedPoints = None
        self._updatingTable = False
        self._rows = []

    # ----------------------------------------------------------------- errors

    def _call(self, title: str, action, waitCursor: bool = True):
        """Run one Logic call; a problem the user can fix is one sentence (status line and a message
        box, shown after the wait cursor is gone), anything else Slicer's error display with details."""
        try:
            with slicer.util.WaitCursor(show=waitCursor):
                return action()
        except VertebraIDError as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc), windowTitle=title)
        except Exception:  # a bug: the details go to the log and the message box's details
            import traceback

            details = traceback.format_exc()
            logging.error(details)
            self.ui.statusLabel.text = _("An unexpected error stopped this action; the Python console shows the details.")
            slicer.util.errorDisplay(self.ui.statusLabel.text, windowTitle=title, detailedText=details)
        return None

    # ----------------------------------------------------------------- set-up

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if not PYTHON_SUPPORTED:
            label = qt.QLabel(UNSUPPORTED_MESSAGE)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VertebraID.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VertebraIDLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        # Only the point lists of VertebraID runs can be corrected; its own volumes are no input.
        self.ui.resultPointsSelector.addAttribute("vtkMRMLMarkupsFiducialNode", mrml.ATTR_ROLE, mrml.ROLE_POINTS)
        self._hideOwnOutputs()

        table = self.ui.vertebraTable
        table.setColumnCount(4)
        table.setHorizontalHeaderLabels([_("Label"), _("Confidence"), _("Check"), _("Lock")])
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)
        table.horizontalHeader().setStretchLastSection(True)
        table.connect("cellClicked(int,int)", self.onTableCellClicked)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollJob)
        self._tableTimer = qt.QTimer()  # coalesces the many point events of a drag into one refresh
        self._tableTimer.setSingleShot(True)
        self._tableTimer.setInterval(100)
        self._tableTimer.connect("timeout()", self.updateTable)

        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.relabelButton.connect("clicked(bool)", self.onRelabel)
        self.ui.labelsUpButton.connect("clicked(bool)", self.onLabelsUp)
        self.ui.labelsDownButton.connect("clicked(bool)", self.onLabelsDown)
        self.ui.showStraightenedButton.connect("clicked(bool)", self.onShowStraightened)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.levelMapComboBox.connect("currentIndexChanged(int)", self.onLevelMapChanged)
        self.ui.resultPointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultPointsChanged)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._job = None
        if getattr(self, "_pollTimer", None) is not None:
            self._pollTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self) -> None:
        if PYTHON_SUPPORTED:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its results would land in the next scene
            self.onCancel()
        self._observePoints(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onNodeAdded(self, caller, event) -> None:
        self._hideOwnOutputs()

    def _hideOwnOutputs(self) -> None:
        """Keep VertebraID's own volumes (maps, straightened CT...) out of the input selector."""
        self.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs = self.logic.output_node_ids()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(VertebraIDParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            hidden = set(self.logic.output_node_ids())
            for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
                node = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
                if node.GetID() not in hidden and not node.IsA("vtkMRMLLabelMapVolumeNode"):
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()
            self.onResultPointsChanged()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self._job is not None
        network = p.evidenceSource == SOURCE_NETWORK
        self.ui.modelPathLineEdit.enabled = network
        self.ui.deviceComboBox.enabled = network
        self.ui.inputPointsSelector.enabled = not network
        self.ui.pointLabelsComboBox.enabled = not network
        self.ui.detectButton.enabled = bool(p.inputVolume) and not busy
        self.ui.detectButton.toolTip = (_("Find and name the vertebrae; the results go into a new folder in the Data module.")
                                        if p.inputVolume else _("Select an input volume (a CT scan) first."))
        has_run = bool(p.resultPoints) and bool(self.logic.run_of(p.resultPoints))
        for widget in (self.ui.relabelButton, self.ui.labelsUpButton, self.ui.labelsDownButton):
            widget.enabled = has_run and not busy
        self.ui.vertebraTable.enabled = has_run and not busy
        self.ui.showStraightenedButton.enabled = has_run
        self.ui.showPlotButton.enabled = has_run
        self.ui.levelMapComboBox.enabled = has_run

    # ----------------------------------------------------------------- dependencies

    def _ensureNetworkRequirements(self) -> bool:
        """Install what the network needs, after one confirmation and before any wait cursor: PyTorch
        through the PyTorch extension (with its minimum version), the rest with pip (loose lower
        bounds, so that no newer package another extension brought is replaced). Returns False,
        with one sentence in the status line, when it is not done."""
        plan = requirements.install_plan(requirements.NETWORK_REQUIREMENTS)
        if plan.empty:
            return True
        torchLogic = None
        if plan.torch_requirement:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                self.ui.statusLabel.text = _(
                    "PyTorch is installed by the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                    "restart 3D Slicer and click Detect again (or choose Points as evidence).")
                slicer.util.errorDisplay(self.ui.statusLabel.text, windowTitle=_("VertebraID: PyTorch is missing"))
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not slicer.util.confirmOkCancelDisplay(
            _("The network needs Python packages that are not installed yet. Install them now? "
              "This needs a network connection and may take several minutes."),
            _("VertebraID: install Python packages"),
            detailedText=_("Packages to install: {packages}").format(packages=", ".join(plan.names)),
        ):
            self.ui.statusLabel.text = _(
                "The network cannot run without {packages}; click Detect again to install them, "
                "or choose Points as evidence.").format(packages=", ".join(plan.names))
            return False
        self.ui.statusLabel.text = _("Installing {packages}... (this may take several minutes)").format(
            packages=", ".join(plan.names))
        slicer.app.processEvents()
        try:
            with slicer.util.WaitCursor():  # only once the user has agreed
                if torchLogic is not None:
                    torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=plan.torch_requirement)
                    if torch is None:
                        self.ui.statusLabel.text = _("PyTorch was not installed, so the network cannot run.")
                        return False
                if plan.pip_specifiers:
                    slicer.util.pip_install(plan.pip_specifiers)
        except Exception as exc:  # no network, a package index refusing...: one sentence, details in the log
            logging.exception("VertebraID: installing Python packages failed")
            self.ui.statusLabel.text = _(
                "Installing the Python packages failed ({error}); check the network connection and click "
                "Detect again.").format(error=type(exc).__name__)
            slicer.util.errorDisplay(self.ui.statusLabel.text, windowTitle=_("VertebraID: install Python packages"))
            return False
        still = requirements.missing(requirements.NETWORK_REQUIREMENTS)
        if still:
            self.ui.statusLabel.text = str(MissingDependencies(still))
            slicer.util.errorDisplay(self.ui.statusLabel.text, windowTitle=_("VertebraID: install Python packages"))
            return False
        return True

    # ----------------------------------------------------------------- Detect

    def _source(self):
        p = self._parameterNode
        if p.evidenceSource == SOURCE_POINTS:
            return PointsHeatmapSource.from_markups_node(p.inputPoints, p.pointLabels)
        return NetworkHeatmapSource(p.modelPath if str(p.modelPath) not in ("", ".") else None, p.device)

    def _setBusy(self, busy: bool) -> None:
        self.ui.progressBar.setVisible(busy)
        self.ui.cancelButton.setVisible(busy)
        self.ui.progressBar.value = 0
        self._updateButtons()

    def onDetect(self) -> None:
        if self._job is not None:
            return
        p = self._parameterNode
        if p.evidenceSource == SOURCE_NETWORK and not self._ensureNetworkRequirements():
            return
        settings = EngineSettings(method=p.method, transitional=p.transitional, weighted=p.weighted)
        self._job = self._call(_("Detect vertebrae failed."),
                               lambda: self.logic.start_detect(p.inputVolume, self._source(), settings))
        if self._job is not None:
            self.ui.statusLabel.text = _("Finding the vertebrae in the background...")
            self._setBusy(True)
            self._pollTimer.start()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        running = job.poll()
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = job.message
        if running:
            return
        self._pollTimer.stop()
        self._job = None
        for line in job.log:
            logging.info(f"VertebraID background process: {line}")
        try:
            if job.state == "cancelled":
                self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            elif job.state == "failed":
                self.ui.statusLabel.text = job.error
                slicer.util.errorDisplay(job.error, windowTitle=_("Detect vertebrae failed."))
            else:
                run = self._call(_("Detect vertebrae failed."), lambda: self.logic.finish_detect(job))
                if run is not None:
                    self._showRun(run)
        finally:
            self._setBusy(False)

    def _showRun(self, run) -> None:
        p = self._parameterNode
        p.resultPoints = run.nodes[mrml.ROLE_POINTS]
        self.ui.statusLabel.text = run.summary()
        inputNode = slicer.mrmlScene.GetNodeByID(self.logic.run_info(run.folder).get("input", ""))
        slicer.util.setSliceViewerLayers(
            background=inputNode or "keep-current", foreground=run.nodes[mrml.ROLE_COMBINED], foregroundOpacity=0.4)
        self._hideOwnOutputs()
        self.updateTable()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._pollJob()

    # ----------------------------------------------------------------- corrections

    def onRelabel(self) -> None:
        report = self._call(_("Re-label failed."), lambda: self.logic.relabel(self._parameterNode.resultPoints))
        if report is not None:
            self.ui.statusLabel.text = report.summary()
        self.updateTable()

    def onLabelsUp(self) -> None:
        self._shift(-1)

    def onLabelsDown(self) -> None:
        self._shift(1)

    def _shift(self, steps: int) -> None:
        report = self._call(_("Moving the labels failed."),
                            lambda: self.logic.shift_labels(self._parameterNode.resultPoints, steps))
        if report is not None:
            self.ui.statusLabel.text = report.summary()
        self.updateTable()

    def onResultPointsChanged(self, node=None) -> None:
        self._observePoints(self._parameterNode.resultPoints if self._parameterNode else None)
        self.updateTable()

    def _observePoints(self, node) -> None:
        """Refresh the table when the user edits the run's points (in the views or the Markups module)."""
        if self._observedPoints is not None:
            for event in (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointAddedEvent,
                          slicer.vtkMRMLMarkupsNode.PointRemovedEvent):
                self.removeObserver(self._observedPoints, event, self._onPointsChanged)
        self._observedPoints = node
        if node is not None:
            for event in (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointAddedEvent,
                          slicer.vtkMRMLMarkupsNode.PointRemovedEvent):
                self.addObserver(node, event, self._onPointsChanged)

    def _onPointsChanged(self, caller=None, event=None) -> None:
        if not self._updatingTable:
            self._tableTimer.start()

    def updateTable(self) -> None:
        """Fill the correction table: labels to check first (red, with the reason), then the others."""
        table = self.ui.vertebraTable
        points = self._parameterNode.resultPoints if self._parameterNode else None
        self._updatingTable = True
        try:
            self._rows = self.logic.vertebra_rows(points) if points is not None and self.logic.run_of(points) else []
            table.setRowCount(len(self._rows))
            levels = list(all_levels())
            for r, row in enumerate(self._rows):
                combo = qt.QComboBox()
                combo.addItems(levels if row.label else ["?", *levels])
                combo.currentText = row.label or "?"
                combo.toolTip = _("Pick this point's label: it then fixes its level at Re-label.")
                combo.connect("currentTextChanged(QString)",
                              lambda text, pid=row.point_id: self.onRowLabelChanged(pid, text))
                table.setCellWidget(r, COLUMN_LABEL, combo)
                confidence = qt.QTableWidgetItem(row.confidence_text)
                table.setItem(r, COLUMN_CONFIDENCE, confidence)
                check = qt.QTableWidgetItem(row.reason + (_(" (added point)") if row.added else ""))
                table.setItem(r, COLUMN_CHECK, check)
                if row.needs_check:
                    for item in (confidence, check):
                        item.setForeground(qt.QBrush(qt.QColor("red")))
                lock = qt.QCheckBox()
                lock.checked = row.locked
                lock.toolTip = _("Locked: you vouch for this label and position; Re-label keeps it.")
                lock.connect("toggled(bool)", lambda checked, pid=row.point_id: self.onRowLockToggled(pid, checked))
                table.setCellWidget(r, COLUMN_LOCK, lock)
        finally:
            self._updatingTable = False
        self._updateButtons()

    def onTableCellClicked(self, row: int, column: int) -> None:
        """Centre the slice views on the clicked vertebra."""
        if not 0 <= row < len(self._rows):
            return
        points = self._parameterNode.resultPoints
        index = points.GetNthControlPointIndexByID(self._rows[row].point_id)
        if index >= 0:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(points.GetID(), index, True)

    def onRowLabelChanged(self, point_id: str, label: str) -> None:
        if self._updatingTable or label == "?":
            return
        self._updatingTable = True
        try:
            done = self._call(_("Cannot set the label."), lambda: self.logic.set_point_label(
                self._parameterNode.resultPoints, point_id, label) or True, waitCursor=False)
        finally:
            self._updatingTable = False
        if done:
            self.ui.statusLabel.text = _("{label} is now fixed there; click Re-label to solve the others around it.").format(
                label=label)

    def onRowLockToggled(self, point_id: str, locked: bool) -> None:
        if self._updatingTable:
            return
        self._updatingTable = True
        try:
            self._call(_("Cannot lock the point."), lambda: self.logic.set_point_locked(
                self._parameterNode.resultPoints, point_id, locked), waitCursor=False)
        finally:
            self._updatingTable = False
        self.updateTable()

    # ----------------------------------------------------------------- views

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
            node = self._call(_("Cannot show the map."), lambda: self.logic.show_level_map(run, level))
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
    """Self-test in 3D Slicer: Detect on a synthetic spine (in the background), correct one label, Re-label."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not PYTHON_SUPPORTED:
            self.delayDisplay(UNSUPPORTED_MESSAGE)
            return
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
        run = logic.detect_in_background(volume_node, shifted_points_source(truth))
        detected = [v.label for v in run.result.vertebrae]
        self.assertEqual(detected[0], LEVELS_26[LEVELS_26.index(truth[0].label) + 1])
        points = run.nodes[mrml.ROLE_POINTS]
        self.assertEqual(points.GetName(), "Synthetic CT: Vertebrae")
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
