"""The module file's Widget, run for real against stubs of Qt, CTK and the Slicer application.

`widget_harness.py` (run in a child process, so its stubs stay there) loads VertebraID.py as
3D Slicer would, builds the Widget from the .ui file's widget names, and clicks through it on
a real slicer-core scene: Detect in the background (the timer polls it), the correction table
(jump, pick a label, lock), Re-label, both shifts, an added point, the level maps and plot,
Cancel, the package installation (declined, accepted, no PyTorch extension), closing the scene
during a run, cleanup(). Here every attribute, method and signal it used on a Qt, CTK or MRML
widget class is checked against the API of that class, listed below from the headers of
Slicer (Libs/MRML/Widgets/qMRMLNodeComboBox.h, qMRMLSortFilterProxyModel.h,
Base/QTCore/qSlicerCoreApplication.h, Base/QTGUI/qSlicerApplication.h,
qSlicerAbstractModuleWidget.h, Base/Python/slicer/parameterNodeWrapper/wrapper.py), CTK
(ctkPathLineEdit.h, ctkCollapsibleButton.h) and Qt 5 (properties and slots, which PythonQt
exposes); slicer.util calls are checked against slicer-core's own slicer/util.py signatures,
and module logic methods against the real vtkSlicerMarkupsLogic / vtkSlicerPlotsLogic classes.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

from conftest import MODULE_FILE, REPO  # noqa: E402

HARNESS = Path(__file__).with_name("widget_harness.py")

_QOBJECT = {"connect", "disconnect", "objectName", "setObjectName", "deleteLater", "parent", "blockSignals"}
_QWIDGET = _QOBJECT | {"enabled", "setEnabled", "visible", "setVisible", "show", "hide", "toolTip", "setToolTip",
                       "layout", "setLayout", "minimumSize", "setMinimumSize", "sizePolicy", "setSizePolicy", "update"}
_QBUTTON = _QWIDGET | {"text", "setText", "checked", "setChecked", "checkable", "setCheckable", "click", "toggle",
                       "icon", "setIcon"}
#: What each class offers to Python (Qt/CTK/MRML properties, slots and Q_INVOKABLE methods).
API = {
    "QWidget": _QWIDGET,
    "QPushButton": _QBUTTON,
    "QCheckBox": _QBUTTON | {"checkState", "setCheckState", "tristate"},
    "QLabel": _QWIDGET | {"text", "setText", "wordWrap", "setWordWrap"},
    "QProgressBar": _QWIDGET | {"value", "setValue", "minimum", "maximum", "setRange", "reset"},
    "QComboBox": _QWIDGET | {"currentText", "setCurrentText", "currentIndex", "setCurrentIndex", "count", "addItem",
                             "addItems", "clear", "findText", "insertItem"},
    "QTableWidget": _QWIDGET | {"setColumnCount", "columnCount", "setRowCount", "rowCount", "setHorizontalHeaderLabels",
                                "setItem", "item", "setCellWidget", "cellWidget", "clearContents", "horizontalHeader",
                                "verticalHeader", "selectRow", "clearSelection", "currentRow", "editTriggers",
                                "selectionBehavior", "selectionMode"},
    "QHeaderView": _QWIDGET | {"setSectionResizeMode", "setStretchLastSection", "stretchLastSection"},
    "QTableWidgetItem": {"setForeground", "setBackground", "setText", "text", "setToolTip", "setFlags", "flags"},
    "QTimer": _QOBJECT | {"setInterval", "interval", "setSingleShot", "singleShot", "start", "stop", "isActive",
                          "active"},
    "QVBoxLayout": {"addWidget", "addStretch", "addLayout", "addSpacing"},
    "ctkCollapsibleButton": _QBUTTON | {"collapsed", "setCollapsed"},
    "ctkPathLineEdit": _QWIDGET | {"currentPath", "setCurrentPath", "nameFilters", "filters"},
    "qMRMLWidget": _QWIDGET | {"setMRMLScene", "mrmlScene"},
    "qMRMLNodeComboBox": _QWIDGET | {
        "currentNodeID", "nodeTypes", "showHidden", "showChildNodeTypes", "hideChildNodeTypes", "baseName",
        "noneEnabled", "addEnabled", "removeEnabled", "editEnabled", "renameEnabled", "interactionNodeSingletonTag",
        "selectNodeUponCreation", "noneDisplay", "sizeAdjustPolicy", "mrmlScene", "addAttribute", "removeAttribute",
        "setNodeTypeLabel", "nodeTypeLabel", "nodeCount", "nodeFromIndex", "currentNode", "currentNodeId",
        "sortFilterProxyModel", "addMenuAction", "setMRMLScene", "setCurrentNode", "setCurrentNodeID",
        "setCurrentNodeIndex", "removeCurrentNode", "editCurrentNode", "renameCurrentNode"},
    "qMRMLSortFilterProxyModel": _QOBJECT | {
        "nodeTypes", "showHidden", "showHiddenForTypes", "showChildNodeTypes", "hideChildNodeTypes", "filterType",
        "showAll", "hideAll", "hiddenNodeIDs", "visibleNodeIDs", "hideNodesUnaffiliatedWithNodeID", "addAttribute",
        "removeAttribute"},
    "qSlicerApplication": _QOBJECT | {"processEvents", "applicationLogic", "startupEnvironment", "mrmlScene",
                                      "moduleManager", "layoutManager", "setOverrideCursor", "restoreOverrideCursor",
                                      "moduleLogic", "testingEnabled"},
    "qSlicerScriptedLoadableModule": {"title", "categories", "contributors", "helpText", "acknowledgementText",
                                      "dependencies", "hidden", "icon", "path"},
    "qSlicerScriptedLoadableModuleWidget": _QWIDGET | {"isEntered", "mrmlScene"},
    # the qt module's classes the code constructs
    "qt": {"QTimer", "QComboBox", "QCheckBox", "QTableWidgetItem", "QBrush", "QColor", "QLabel", "QIcon",
           "QHeaderView", "QMessageBox", "QWidget"},
}
_BUTTON_SIGNALS = {"clicked()", "clicked(bool)", "toggled(bool)", "pressed()", "released()"}
SIGNALS = {
    "QPushButton": _BUTTON_SIGNALS,
    "QCheckBox": _BUTTON_SIGNALS | {"stateChanged(int)"},
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)"},
    "QTableWidget": {"cellClicked(int,int)", "cellDoubleClicked(int,int)", "currentCellChanged(int,int,int,int)",
                     "itemChanged(QTableWidgetItem*)"},
    "QTimer": {"timeout()"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeIDChanged(QString)",
                          "nodeActivated(vtkMRMLNode*)", "currentNodeChanged(bool)", "nodeAdded(vtkMRMLNode*)",
                          "nodeAddedByUser(vtkMRMLNode*)", "nodeAboutToBeRemoved(vtkMRMLNode*)",
                          "currentNodeRenamed(QString)"},
    "qSlicerApplication": {"startupCompleted()"},
}


@pytest.fixture(scope="module")
def harness() -> dict:
    done = subprocess.run([sys.executable, str(HARNESS), str(REPO)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("HARNESS ")]
    return json.loads(line[len("HARNESS "):])


def test_the_widget_uses_only_api_that_exists(harness):
    assert harness["have_app"], "the harness's stubs did not take the application path"
    assert harness["problems"] == []
    for cls, names in harness["used"].items():
        assert cls in API, f"{cls} is used but has no API list"
        assert set(names) <= API[cls], f"{cls}: {sorted(set(names) - API[cls])} are not part of its API"
    for cls, signals in harness["signals"].items():
        assert set(signals) <= SIGNALS.get(cls, set()), f"{cls}: no signal {sorted(set(signals) - SIGNALS.get(cls, set()))}"
    util = vars(slicer.util)
    assert all(name in util for name in harness["util_calls"])
    # Every slicer.util, slicer.app and slicer.modules name the file mentions exists.
    source = MODULE_FILE.read_text()
    for name in set(re.findall(r"slicer\.util\.(\w+)", source)):
        assert name in util, f"slicer.util.{name} does not exist"
    for name in set(re.findall(r"slicer\.app\.(\w+)", source)):
        assert name in API["qSlicerApplication"], f"slicer.app.{name}"
    assert {"markups", "plots"} >= set(re.findall(r"slicer\.modules\.(\w+)", source))


def test_detect_runs_in_the_background_and_fills_the_correction_table(harness):
    assert harness["title"] == "VertebraID" and harness["help_has_link"] and harness["startup_slots"] == 1
    assert harness["input_selected"]
    assert harness["busy_while_running"] == {"detect_enabled": False, "cancel_visible": True}
    assert harness["detect_status"].startswith("Found 14 vertebrae")
    assert harness["result_points"] == "CT: Vertebrae"
    assert harness["table_rows"] == harness["points"] == 14
    # its own outputs are hidden from the input selector, the CT is not
    assert harness["hidden_outputs"] == {"count": 4, "ct_hidden": False, "all_outputs": True}
    assert harness["result_selector_filter"] == [["vtkMRMLMarkupsFiducialNode", "VertebraID.Role", "vertebrae"]]


def test_the_correction_panel_corrects(harness):
    # clicking the first row centres the views on that row's point (list id, point, centred)
    assert harness["jumped"] == [["JumpSlicesToNthPointInMarkup", [harness["first_row_point"], True]]]
    label, wanted = harness["label_from_table"]
    assert label == wanted and harness["locked_from_table"]
    labels, truth = harness["labels_after_relabel"]
    assert labels == truth and harness["relabel_status"].startswith("Re-labelled 14 vertebrae")
    assert harness["shift_status"].startswith("Moved every label up by 1 level;")
    assert harness["labels_after_shifts"] == truth  # up, then down again
    assert harness["table_timer_started"] is True  # an edit in the views refreshes the table
    assert harness["rows_after_add"] == 15  # the added point shows at once, as one to name
    assert harness["relabel_added_status"].endswith("the point(s) you added named T2.")
    assert harness["plots"] == ["ShowChartInLayout"]


def test_cancel_and_closing_the_scene_stop_the_background_run(harness):
    assert harness["cancel"] == {"status": "Cancelled; nothing was added to the scene.", "job_cleared": True,
                                 "process_ended": True, "nodes_added": 0, "folders_left": 0}
    assert harness["close_cancels"] and harness["cache_after_cleanup"] == 0
    assert harness["connectGui"] == harness["disconnectGui"]


def test_dependencies_are_asked_once_before_any_wait_cursor(harness):
    """Issue 17, item 8."""
    confirms = [d for d in harness["dialogs"] if d[0] == "confirmOkCancelDisplay"]
    assert len(confirms) == 2  # one per Detect click (declined, then accepted)
    assert all(depth == 0 for _, _, depth in harness["dialogs"]), "a dialog opened under the wait cursor"
    assert harness["declined_installs"] == {"torch": 0, "pip": []}
    assert harness["declined_status"].startswith("The network cannot run without torch>=2.2, monai>=1.4, safetensors>=0.4;")
    install = harness["install"]
    # torch through the PyTorch extension, with its minimum version; the rest by pip with lower bounds, in one call
    assert install["torch"] == [{"askConfirmation": False, "torchVersionRequirement": ">=2.2", "cursor": 1}]
    assert install["pip"] == [[["monai>=1.4", "safetensors>=0.4"]]]
    assert install["status"] == "The model file '/no/such/model.safetensors' does not exist."
    assert harness["no_pytorch_extension"]["status"].startswith("PyTorch is installed by the PyTorch extension")
    assert harness["no_pytorch_extension"]["dialogs"] == ["errorDisplay"]  # no confirmation, no pip
    assert not any(d[1].startswith("Traceback") for d in harness["dialogs"])


def test_sample_data_is_registered_when_shipped(harness):
    assert harness["sample_shipped"]  # Resources/SampleData holds the real sample CT
    assert harness["sample_without_file"] is False and harness["sample_with_file"] is True
    [entry] = harness["sample_registered"]
    assert entry["category"] == "VertebraID" and entry["uris"].startswith("file://")
    assert entry["fileNames"] == "VertebraIDSampleSpineCT.nii.gz" and entry["checksums"].startswith("SHA256:")
    assert entry["nodeNames"] == "VertebraID sample spine CT"


def test_user_facing_text_is_translatable():
    """Strings shown to the user go through _() (Slicer's i18n), and messages are sentences, not tracebacks."""
    source = MODULE_FILE.read_text()
    for attribute in ("title", "helpText", "acknowledgementText"):
        assert re.search(rf"self\.parent\.{attribute} = _\(", source), attribute
    shown = re.findall(r"statusLabel\.text = (.+)", source)
    plain = [s for s in shown if not s.startswith(("_(", "job.", "str(", "report.", "run.", "self.ui.statusLabel"))]
    assert plain == [], plain
    assert "tryWithErrorDisplay" not in source  # expected problems are one sentence, never Slicer's traceback box
