"""Runs the VertebraID module's Widget on slicer-core with Qt, CTK and the application stubbed.

Used by test_module_widget.py in a child process (`python widget_harness.py REPO`), so that
the stubs never leak into other tests. It prints one JSON document: every attribute, method
and signal the module used on each stubbed class, the slicer.util calls (checked against the
real functions' signatures), whether a dialog ever opened under the wait cursor, and what
each scenario left in the status line and the scene.

The stubs record and do little: the MRML scene, the Logic, the background process, the
markups and the parameter node's values are real (slicer-core). What runs is the module's
own code: setup(), the button handlers, the timer that polls the background Detect, the
correction table, the dependency installation, Cancel, closing the scene, cleanup().
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import tempfile
import time
import types
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[3])
sys.path.insert(0, str(REPO / "VertebraID"))

import numpy as np  # noqa: E402
import slicer  # noqa: E402  (slicer-core: real MRML, real slicer.util)
import slicer.util as real_util  # noqa: E402
import vtk  # noqa: E402

USED = defaultdict(set)  # class -> names used (get, set or call)
SIGNALS = defaultdict(set)  # class -> signal signatures connected
UTIL_CALLS = []  # (name, args summary)
PROBLEMS = []  # API misuse found while running
DIALOGS = []  # (kind, text, wait cursor depth when it opened)
CURSOR = {"depth": 0}
RESULT = {}

# --------------------------------------------------------------------------- recording fakes


class Fake:
    """A Qt object: records every attribute read, write and call; remembers properties and slots."""

    FACTORIES = {"horizontalHeader": "QHeaderView", "verticalHeader": "QHeaderView",
                 "sortFilterProxyModel": "qMRMLSortFilterProxyModel"}

    def __init__(self, cls: str, name: str = "", **props):
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_props", dict(props))
        object.__setattr__(self, "_slots", defaultdict(list))
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_cells", {})
        object.__setattr__(self, "_calls", [])

    def __repr__(self):
        return f"<Fake {self._cls} {self._name}>"

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        USED[self._cls].add(attr)
        if attr in self._props:
            return self._props[attr]
        if attr == "connect":
            def connect(signal, slot):
                SIGNALS[self._cls].add(signal)
                self._slots[signal].append(slot)
                return True
            return connect
        if attr in self.FACTORIES:
            child = self._children.setdefault(attr, Fake(self.FACTORIES[attr], attr))
            return lambda: child
        if attr in ("setCellWidget", "setItem"):
            return lambda row, column, value: self._cells.__setitem__((row, column), value)
        if attr == "setRowCount":
            return lambda n: self._props.__setitem__("rowCount", n) or self._cells.clear()
        if attr in ("start", "stop"):
            return lambda *args: self._props.__setitem__("active", attr == "start")
        if attr.startswith("set") and len(attr) > 3:  # setVisible(x) -> the 'visible' property
            key = attr[3].lower() + attr[4:]
            return lambda *args: self._props.__setitem__(key, args[0] if len(args) == 1 else args)
        return lambda *args, **kwargs: self._calls.append([attr, [str(a) for a in args]])

    def __setattr__(self, attr, value):
        USED[self._cls].add(attr)
        self._props[attr] = value

    def emit(self, signal, *args):
        """Call the connected slots as PythonQt does: with as many of the signal's arguments as each takes."""
        for slot in list(self._slots[signal]):
            parameters = inspect.signature(slot).parameters.values()
            if any(p.kind == p.VAR_POSITIONAL for p in parameters):
                slot(*args)
            else:
                slot(*args[: sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)])


def fake_class(cls):
    """A constructor: qt.QTimer() and the like make recording fakes."""
    def make(*args, **kwargs):
        USED["qt"].add(cls)
        fake = Fake(cls)
        if cls == "QLabel" and args:
            fake._props["text"] = args[0]
        if cls == "QTableWidgetItem" and args:
            fake._props["text"] = args[0]
        return fake
    return make


def install_qt():
    qt = types.ModuleType("qt")
    for cls in ("QTimer", "QComboBox", "QCheckBox", "QTableWidgetItem", "QBrush", "QColor", "QLabel", "QIcon",
                "QMessageBox", "QWidget"):
        setattr(qt, cls, fake_class(cls))
    qt.QHeaderView = types.SimpleNamespace(ResizeToContents="ResizeToContents", Stretch="Stretch")
    qt.Qt = types.SimpleNamespace(WaitCursor="WaitCursor")

    class QApplication:
        @staticmethod
        def setOverrideCursor(cursor):
            CURSOR["depth"] += 1

        @staticmethod
        def restoreOverrideCursor():
            CURSOR["depth"] -= 1

    qt.QApplication = QApplication
    sys.modules["qt"] = qt
    sys.modules["ctk"] = types.ModuleType("ctk")
    return qt


# --------------------------------------------------------------------------- slicer application stubs


class Environment:
    """QProcessEnvironment, as slicer.util.startupEnvironment reads it."""

    def keys(self):
        return list(os.environ)

    def value(self, key):
        return os.environ[key]


def install_application(context):
    app = Fake("qSlicerApplication", "app")
    app._props.update({
        "applicationLogic": lambda: context.app_logic,
        "startupEnvironment": lambda: Environment(),
        "testingEnabled": lambda: False,
        "processEvents": lambda *args: None,
        "setOverrideCursor": lambda cursor: CURSOR.__setitem__("depth", CURSOR["depth"] + 1),
        "restoreOverrideCursor": lambda: CURSOR.__setitem__("depth", CURSOR["depth"] - 1),
    })
    slicer.app = app
    slicer.mrmlScene = context.scene

    class LogicProxy:
        def __init__(self, cls):
            self.cls = cls
            self.calls = []

        def __getattr__(self, name):
            if not hasattr(self.cls, name):
                PROBLEMS.append(f"{self.cls.__name__} has no method {name}")
            return lambda *args: self.calls.append((name, args))

    markups, plots = LogicProxy(slicer.vtkSlicerMarkupsLogic), LogicProxy(slicer.vtkSlicerPlotsLogic)
    slicer.modules = types.SimpleNamespace(markups=types.SimpleNamespace(logic=lambda: markups),
                                           plots=types.SimpleNamespace(logic=lambda: plots))
    return markups, plots


def checked_util(name, behaviour=None):
    """slicer.util.<name> with the real signature enforced (and a dialog's cursor state recorded)."""
    real = getattr(real_util, name)
    signature = inspect.signature(real)

    def stub(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            PROBLEMS.append(f"slicer.util.{name}{signature} called wrongly: {exc}")
        UTIL_CALLS.append([name, [a if isinstance(a, (str, int, float, bool, list)) else type(a).__name__ for a in args],
                           sorted(kwargs)])
        if name in ("confirmOkCancelDisplay", "errorDisplay", "infoDisplay", "warningDisplay"):
            DIALOGS.append([name, str(args[0]) if args else "", CURSOR["depth"]])
        return behaviour(*args, **kwargs) if behaviour else None
    return stub


def install_util(ui_classes):
    def load_ui(path):
        if not Path(path).is_file():
            PROBLEMS.append(f"loadUI: no file {path}")
        return Fake("qMRMLWidget", "VertebraID")

    def child_widget_variables(widget):
        return types.SimpleNamespace(**{name: Fake(cls, name) for name, cls in ui_classes.items()})

    answers = {"confirm": True}
    slicer.util.loadUI = checked_util("loadUI", load_ui)
    slicer.util.childWidgetVariables = checked_util("childWidgetVariables", child_widget_variables)
    slicer.util.confirmOkCancelDisplay = checked_util("confirmOkCancelDisplay", lambda *a, **k: answers["confirm"])
    slicer.util.errorDisplay = checked_util("errorDisplay")
    slicer.util.pip_install = checked_util("pip_install")
    slicer.util.setSliceViewerLayers = checked_util("setSliceViewerLayers")
    return answers


def install_scripted_module():
    """Minimal stand-ins for slicer.ScriptedLoadableModule, parameterNodeWrapper and i18n (as in Slicer 5.10)."""
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Widget")]
            self.parent = parent or Fake("qSlicerScriptedLoadableModuleWidget", "panel", isEntered=True)
            self.layout = Fake("QVBoxLayout", "layout")

        def resourcePath(self, filename):
            return str(REPO / "VertebraID" / "Resources" / filename)

        def setup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest:
        pass

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    def parameterNodeWrapper(cls):
        import typing

        hints = typing.get_type_hints(cls, include_extras=True)  # as Slicer's wrapper resolves them
        defaults = {name: getattr(cls, name, None) for name in hints}

        class Wrapped:
            def __init__(self, node):
                object.__setattr__(self, "_node", node)
                object.__setattr__(self, "_values", dict(defaults))

            # what Slicer's wrapper adds besides the parameters (parameterNodeWrapper/wrapper.py)
            @property
            def parameterNode(self):
                return self._node

            def AddObserver(self, event, callback, priority=0.0):
                return self._node.AddObserver(event, callback, priority)

            def RemoveObserver(self, tag):
                self._node.RemoveObserver(tag)

            def Modified(self):
                self._node.Modified()

            def __getattr__(self, name):
                if name not in hints:
                    raise AttributeError(f"{cls.__name__} has no parameter {name}")
                return self._values[name]

            def __setattr__(self, name, value):
                if name not in hints:
                    PROBLEMS.append(f"{cls.__name__} has no parameter {name}")
                self._values[name] = value
                self._node.Modified()
                # Slicer's GUI connector shows the new value in the bound widget, which emits its signal.
                widget = getattr(self.__dict__.get("_ui"), BOUND.get(name, ""), None)
                if isinstance(widget, Fake) and widget._cls == "qMRMLNodeComboBox":
                    widget.emit("currentNodeChanged(vtkMRMLNode*)", value)

            def connectGui(self, ui):
                RESULT.setdefault("connectGui", 0)
                RESULT["connectGui"] += 1
                object.__setattr__(self, "_ui", ui)
                return object()

            def disconnectGui(self, tag):
                RESULT.setdefault("disconnectGui", 0)
                RESULT["disconnectGui"] += 1

        Wrapped.__name__ = cls.__name__
        Wrapped.hints = hints
        return Wrapped

    pnw.Choice = Choice
    pnw.parameterNodeWrapper = parameterNodeWrapper
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    sys.modules["slicer.i18n"] = i18n


def install_pytorch_utils(installed):
    module = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        # SlicerPyTorch's signature (PyTorchUtils.py): installTorch(self, askConfirmation=False,
        # forceComputationBackend=None, torchVersionRequirement=None, torchvisionVersionRequirement=None)
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            installed.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement,
                              "cursor": CURSOR["depth"]})
            return object()

    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    sys.modules["PyTorchUtils"] = module


def install_sample_data(registered):
    module = types.ModuleType("SampleData")

    class SampleDataLogic:
        # Slicer's signature (Modules/Scripted/SampleData/SampleData.py)
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileTypes=None, loadFiles=None, loadFileProperties={},
                                           checksums=None, loadFileType=None):
            registered.append({"category": category, "sampleName": sampleName, "uris": uris, "fileNames": fileNames,
                               "nodeNames": nodeNames, "checksums": checksums, "thumbnail": thumbnailFileName})

    module.SampleDataLogic = SampleDataLogic
    sys.modules["SampleData"] = module


# --------------------------------------------------------------------------- the scenarios


def ui_classes() -> dict:
    tree = ET.parse(REPO / "VertebraID" / "Resources" / "UI" / "VertebraID.ui")
    for w in tree.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                BOUND[prop.find("string").text] = w.get("name")
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


BOUND = {}  # parameter -> the widget bound to it in the .ui


def wait_for_job(widget, timeout_s=120.0):
    start = time.perf_counter()
    while widget._job is not None and time.perf_counter() - start < timeout_s:
        widget._pollTimer.emit("timeout()")
        time.sleep(0.05)


def main() -> None:
    tempfile.tempdir = tempfile.mkdtemp()  # jobs' folders here: tests running beside this one make their own
    install_qt()
    install_scripted_module()
    from VertebraIDLib.slicer import logic as VID
    from VertebraIDLib.slicer import mrml, requirements

    context = mrml.SceneContext.create()
    markups, plots = install_application(context)
    answers = install_util(ui_classes())
    torch_installs, registered = [], []
    install_pytorch_utils(torch_installs)
    install_sample_data(registered)

    spec = importlib.util.spec_from_file_location("VertebraID", REPO / "VertebraID" / "VertebraID.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["VertebraID"] = module
    spec.loader.exec_module(module)
    RESULT["have_app"] = module.HAVE_SLICER_APP
    RESULT["parameters"] = sorted(module.VertebraIDParameterNode.hints)

    # The module: title, help with the documentation link, sample data once the application has started.
    parent = Fake("qSlicerScriptedLoadableModule", "module")
    module.VertebraID(parent)
    RESULT["title"] = parent._props["title"]
    RESULT["help_has_link"] = module.DOCUMENTATION_URL in parent._props["helpText"]
    RESULT["startup_slots"] = len(slicer.app._slots["startupCompleted()"])
    shipped = module.sampleDataPath
    RESULT["sample_shipped"] = shipped() is not None
    module.sampleDataPath = lambda: None  # an extension built without it
    RESULT["sample_without_file"] = module.registerSampleData()
    module.sampleDataPath = shipped
    RESULT["sample_with_file"] = module.registerSampleData()
    RESULT["sample_registered"] = registered

    # A CT and a point list to use as evidence, before the module opens.
    ct, truth = VID.synthetic_spine_case()
    ct_node = mrml.add_scalar_volume(context.scene, ct, "CT", window_level=(400.0, 40.0))
    evidence = context.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "detector points")
    for v in truth:
        evidence.AddControlPoint(vtk.vtkVector3d(*v.position), "")

    widget = module.VertebraIDWidget()
    widget.setup()
    widget.enter()
    ui = widget.ui
    p = widget._parameterNode
    RESULT["input_selected"] = p.inputVolume is ct_node
    RESULT["result_selector_filter"] = [c[1] for c in ui.resultPointsSelector._calls if c[0] == "addAttribute"]

    # Detect with points, in the background; the timer polls it.
    p.evidenceSource = module.SOURCE_POINTS
    p.inputPoints = evidence
    p.pointLabels = "none"
    nodes_before = context.scene.GetNumberOfNodes()
    ui.detectButton.emit("clicked(bool)", False)
    RESULT["busy_while_running"] = {"detect_enabled": ui.detectButton._props.get("enabled"),
                                    "cancel_visible": ui.cancelButton._props.get("visible")}
    wait_for_job(widget)
    RESULT["detect_status"] = ui.statusLabel._props.get("text", "")
    run_points = p.resultPoints
    RESULT["result_points"] = run_points.GetName() if run_points else None
    RESULT["table_rows"] = ui.vertebraTable._props.get("rowCount")
    RESULT["points"] = run_points.GetNumberOfControlPoints() if run_points else 0
    hidden = ui.inputVolumeSelector._children["sortFilterProxyModel"]._props.get("hiddenNodeIDs", [])
    RESULT["hidden_outputs"] = {"count": len(hidden), "ct_hidden": ct_node.GetID() in hidden,
                                "all_outputs": sorted(hidden) == sorted(widget.logic.output_node_ids())}

    # The table: jump to a row; name the middle vertebra right (the evidence had no labels) and lock it.
    ui.vertebraTable.emit("cellClicked(int,int)", 0, 1)
    RESULT["jumped"] = [[name, list(args[1:])] for name, args in markups.calls]
    RESULT["first_row_point"] = widget._rows[0].index  # the table lists labels to check first
    middle = truth[len(truth) // 2]
    distances = [np.linalg.norm(row.position - middle.position) for row in widget._rows]
    row = int(np.argmin(distances))
    point_id = widget._rows[row].point_id
    ui.vertebraTable._cells[(row, module.COLUMN_LABEL)].emit("currentTextChanged(QString)", middle.label)
    RESULT["label_from_table"] = [run_points.GetNthControlPointLabel(run_points.GetNthControlPointIndexByID(point_id)),
                                  middle.label]
    row = [r.point_id for r in widget._rows].index(point_id)  # the table was refreshed by the edit
    ui.vertebraTable._cells[(row, module.COLUMN_LOCK)].emit("toggled(bool)", True)
    RESULT["locked_from_table"] = bool(run_points.GetNthControlPointLocked(run_points.GetNthControlPointIndexByID(point_id)))
    ui.relabelButton.emit("clicked(bool)", False)
    RESULT["relabel_status"] = ui.statusLabel._props.get("text", "")
    RESULT["labels_after_relabel"] = [[run_points.GetNthControlPointLabel(i) for i in range(run_points.GetNumberOfControlPoints())],
                                      [v.label for v in truth]]
    ui.labelsUpButton.emit("clicked(bool)", False)
    RESULT["shift_status"] = ui.statusLabel._props.get("text", "")
    ui.labelsDownButton.emit("clicked(bool)", False)
    RESULT["labels_after_shifts"] = [run_points.GetNthControlPointLabel(i) for i in range(run_points.GetNumberOfControlPoints())]

    # An added point refreshes the table (through its single-shot timer); Re-label names it.
    above = truth[0].position + (truth[0].position - truth[1].position)  # a vertebra the detector missed
    run_points.AddControlPoint(vtk.vtkVector3d(*above))
    RESULT["table_timer_started"] = widget._tableTimer._props.get("active")
    widget._tableTimer.emit("timeout()")
    RESULT["rows_after_add"] = ui.vertebraTable._props.get("rowCount")
    ui.relabelButton.emit("clicked(bool)", False)
    RESULT["relabel_added_status"] = ui.statusLabel._props.get("text", "")
    ui.levelMapComboBox._props["currentText"] = "T8"
    ui.levelMapComboBox.emit("currentIndexChanged(int)", 5)
    ui.showStraightenedButton.emit("clicked(bool)", False)
    ui.showPlotButton.emit("clicked(bool)", False)
    RESULT["plots"] = [name for name, _ in plots.calls]

    # Cancel a running Detect: nothing added, no process left.
    nodes_before = context.scene.GetNumberOfNodes()
    folders_before = set(Path(tempfile.gettempdir()).glob("VertebraID-*"))
    ui.detectButton.emit("clicked(bool)", False)
    job = widget._job
    ui.cancelButton.emit("clicked(bool)", False)
    RESULT["cancel"] = {"status": ui.statusLabel._props.get("text", ""), "job_cleared": widget._job is None,
                        "process_ended": job.process.poll() is not None,
                        "nodes_added": context.scene.GetNumberOfNodes() - nodes_before,
                        "folders_left": len(set(Path(tempfile.gettempdir()).glob("VertebraID-*")) - folders_before)}

    # The network: packages missing -> one confirmation, before any wait cursor; declining is one sentence.
    p.evidenceSource = module.SOURCE_NETWORK
    p.modelPath = Path("/no/such/model.safetensors")
    real_plan = requirements.install_plan
    requirements.install_plan = lambda reqs: requirements.InstallPlan(">=2.2", ["monai>=1.4", "safetensors>=0.4"],
                                                                      ["torch>=2.2", "monai>=1.4", "safetensors>=0.4"])
    answers["confirm"] = False
    ui.detectButton.emit("clicked(bool)", False)
    RESULT["declined_status"] = ui.statusLabel._props.get("text", "")
    RESULT["declined_installs"] = {"torch": len(torch_installs),
                                   "pip": [c for c in UTIL_CALLS if c[0] == "pip_install"]}
    answers["confirm"] = True
    ui.detectButton.emit("clicked(bool)", False)  # installs, then the missing model file is one sentence
    RESULT["install"] = {"torch": torch_installs, "pip": [c[1] for c in UTIL_CALLS if c[0] == "pip_install"],
                         "status": ui.statusLabel._props.get("text", "")}
    saved = sys.modules.pop("PyTorchUtils")
    sys.modules["PyTorchUtils"] = None  # the PyTorch extension is not installed
    dialogs = len(DIALOGS)
    ui.detectButton.emit("clicked(bool)", False)
    RESULT["no_pytorch_extension"] = {"status": ui.statusLabel._props.get("text", ""),
                                      "dialogs": [d[0] for d in DIALOGS[dialogs:]]}
    sys.modules["PyTorchUtils"] = saved
    requirements.install_plan = real_plan

    # Closing the scene while Detect runs cancels it.
    p.evidenceSource = module.SOURCE_POINTS
    ui.detectButton.emit("clicked(bool)", False)
    job = widget._job
    context.scene.Clear(0)
    RESULT["close_cancels"] = job is not None and job.state == "cancelled" and widget._job is None
    widget.onSceneEndClose(None, None)
    widget.exit()
    widget.cleanup()
    RESULT["cache_after_cleanup"] = len(widget.logic._prepared)

    RESULT["used"] = {cls: sorted(names) for cls, names in USED.items()}
    RESULT["signals"] = {cls: sorted(names) for cls, names in SIGNALS.items()}
    RESULT["util_calls"] = sorted({c[0] for c in UTIL_CALLS})
    RESULT["dialogs"] = DIALOGS
    RESULT["problems"] = PROBLEMS
    print("HARNESS " + json.dumps(RESULT, default=str))


if __name__ == "__main__":
    main()
