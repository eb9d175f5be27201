"""What the modules need beyond 3D Slicer, checked as a whole; a fresh environment gets a sentence.

Issue 17, items 1 and 8: in a fresh 3D Slicer, Detect with the network must say which packages
are missing (torch, monai, safetensors), never end in a ModuleNotFoundError traceback;
VertebraIDTrain likewise for tqdm and safetensors. The "fresh environment" is a child Python
whose import system cannot see the hidden packages (a meta-path finder refuses them), running
the real Logic on slicer-core.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

from conftest import REPO  # noqa: E402
from VertebraIDLib.slicer import requirements  # noqa: E402
from VertebraIDLib.slicer.requirements import (  # noqa: E402
    NETWORK_REQUIREMENTS,
    TRAINING_REQUIREMENTS,
    MissingDependencies,
    Requirement,
)

HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None
sys.meta_path.insert(0, Hide())
for name in list(sys.modules):
    if name.split(".")[0] in HIDDEN:
        del sys.modules[name]
sys.path.insert(0, sys.argv[2] + "/VertebraID")
sys.path.insert(0, sys.argv[2] + "/VertebraIDTrain")
"""

FRESH_SLICER = HIDE + """
import json
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.slicer import mrml, logic as VID, requirements
ct, truth = VID.synthetic_spine_case()
context = mrml.SceneContext.create()
node = mrml.add_scalar_volume(context.scene, ct, "CT")
logic = VID.VertebraIDLogic(context)
before = context.scene.GetNumberOfNodes()
for attempt in (lambda: logic.detect(node, VID.NetworkHeatmapSource(None)),
                lambda: logic.start_detect(node, VID.NetworkHeatmapSource(None)),
                lambda: logic.detect_in_background(node, VID.NetworkHeatmapSource(None))):
    try:
        attempt()
        print("NO ERROR")
    except VertebraIDError as exc:
        print("MESSAGE " + str(exc))
print("NODES", context.scene.GetNumberOfNodes() - before)
plan = requirements.install_plan(requirements.NETWORK_REQUIREMENTS)
print("PLAN " + json.dumps({"torch": plan.torch_requirement, "pip": plan.pip_specifiers}))

import VertebraIDTrain
code = VertebraIDTrain.main(["no-such-config.toml"])
print("TRAIN EXIT", code)
try:
    VertebraIDTrain.VertebraIDTrainLogic().train_labeller("model.safetensors", "samples")
except VertebraIDError as exc:
    print("LABELLER " + str(exc))
"""


def run_fresh(hidden: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FRESH_SLICER, ",".join(hidden), str(REPO)],
                          capture_output=True, text=True, timeout=300)


def lines(out: str, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in out.splitlines() if line.startswith(prefix)]


def test_a_fresh_environment_without_safetensors_and_tqdm_gets_sentences_not_tracebacks():
    done = run_fresh(["safetensors", "tqdm"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    messages = lines(done.stdout, "MESSAGE ")
    assert len(messages) == 3 and len(set(messages)) == 1  # in-process, background start, background run
    assert messages[0] == ("The network needs safetensors, which is not installed; accept the installation that "
                           "3D Slicer offers (or pip install it) or use points as evidence.")
    assert lines(done.stdout, "NODES") == ["0"]  # the scene is as it was
    assert json.loads(lines(done.stdout, "PLAN ")[0]) == {"torch": None, "pip": ["safetensors>=0.4"]}
    # VertebraIDTrain: one sentence on stderr, exit status 2, naming both.
    assert lines(done.stdout, "TRAIN EXIT") == ["2"]
    train_error = [line for line in done.stderr.splitlines() if line.startswith("VertebraIDTrain: error:")]
    assert len(train_error) == 1
    assert "Training needs safetensors and tqdm, which are not installed;" in train_error[0]
    assert "pip install \"safetensors>=0.4\" \"tqdm>=4.60\"" in train_error[0]
    assert lines(done.stdout, "LABELLER ")[0].startswith("Training needs safetensors and tqdm, which are not installed")


def test_a_fresh_slicer_without_torch_asks_for_the_whole_list():
    done = run_fresh(["torch", "monai", "safetensors"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    message = lines(done.stdout, "MESSAGE ")[0]
    assert message.startswith("The network needs torch, monai and safetensors, which are not installed;")
    # torch through the PyTorch extension with its minimum version, the rest by pip with lower bounds
    assert json.loads(lines(done.stdout, "PLAN ")[0]) == {"torch": ">=2.2", "pip": ["monai>=1.4", "safetensors>=0.4"]}


def test_versions_are_compared_as_numbers_and_too_old_is_said(monkeypatch):
    assert requirements.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert requirements.version_tuple("1.4rc1") == (1, 4)
    assert requirements.version_tuple("1.10") > requirements.version_tuple("1.9")
    old = Requirement("monai", "monai", "99.0")
    assert not requirements.is_satisfied(old) and requirements.missing([old]) == [old]
    message = str(MissingDependencies([old]))
    assert message.startswith("The network needs monai 99.0 or later (") and "is installed)" in message
    plan = requirements.install_plan([old])
    assert plan.pip_specifiers == ["monai>=99.0"] and plan.torch_requirement is None
    # every requirement is a loose lower bound (never an exact pin that could replace another extension's)
    for r in TRAINING_REQUIREMENTS:
        assert r.specifier == f"{r.distribution}>={r.minimum}"
    assert [r.module for r in NETWORK_REQUIREMENTS] == ["torch", "monai", "safetensors"]
    assert {"tqdm", "safetensors", "tensorboard"} <= {r.module for r in TRAINING_REQUIREMENTS}
    assert requirements.TORCH.via_pytorch_extension and not any(r.via_pytorch_extension for r in TRAINING_REQUIREMENTS[1:])


def test_everything_the_network_and_training_import_is_listed():
    """The lists cover the third-party imports of networks/, io/weights.py and training/ (so that no
    ModuleNotFoundError can get past the check)."""
    import ast

    from conftest import PACKAGE

    found = set()
    for folder in ("networks", "training"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                found |= {n.split(".")[0] for n in names}
    third_party = found - set(sys.stdlib_module_names) - {"numpy", "scipy", "VertebraIDLib"}
    listed = {r.module for r in TRAINING_REQUIREMENTS}
    assert third_party <= listed, third_party - listed
    assert {"torch", "monai"} <= third_party
    weights = (PACKAGE / "io" / "weights.py").read_text()
    assert "safetensors" in weights and "safetensors" in {r.module for r in NETWORK_REQUIREMENTS}


def test_the_module_file_parses_on_python_3_9():
    """3D Slicer 5.8 runs Python 3.9: the module files must load there to say which Slicer they need."""
    import ast

    for path in (REPO / "VertebraID" / "VertebraID.py", REPO / "VertebraIDTrain" / "VertebraIDTrain.py"):
        ast.parse(path.read_text(), str(path), feature_version=(3, 9))
    code = textwrap.dedent("""
        import sys, types
        sys.version_info = (3, 9, 10, "final", 0)
        sys.path.insert(0, sys.argv[1] + "/VertebraID")
        import importlib.util
        spec = importlib.util.spec_from_file_location("VertebraID", sys.argv[1] + "/VertebraID/VertebraID.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parent = types.SimpleNamespace()
        module.VertebraID(parent)
        print("HELP " + parent.helpText)
        print("SUPPORTED", module.PYTHON_SUPPORTED, "VertebraIDLib" in sys.modules)
        spec = importlib.util.spec_from_file_location("VertebraIDTrain", sys.argv[1] + "/VertebraIDTrain/VertebraIDTrain.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        print("TRAIN", train.PYTHON_SUPPORTED)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    help_text = lines(done.stdout, "HELP ")[0]
    assert help_text == ("VertebraID needs 3D Slicer 5.10 or later (Python 3.10 or later), but this 3D Slicer runs "
                         "Python 3.9: please install a newer 3D Slicer.")
    assert "SUPPORTED False False" in done.stdout and "TRAIN False" in done.stdout
    assert "Traceback" not in done.stderr
