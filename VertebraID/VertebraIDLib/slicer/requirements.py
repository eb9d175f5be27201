"""What the Slicer modules need beyond 3D Slicer itself, checked as a whole.

One list per use (the network in VertebraID, training in VertebraIDTrain): each entry names
the import, the pip distribution and the lowest version known to work (loose lower bounds,
so that an install never replaces a newer package another extension brought). PyTorch is
installed through the PyTorch extension (the right CUDA or CPU build for the machine), never
by a bare `pip install torch`; the rest with `pip_install`. Nothing here imports Qt or the
Slicer application: the Widget asks the user once, then calls `install_commands`' plan.

3D Slicer 5.10 is the first release with Python >= 3.10 (5.8 ships 3.9, 5.10 ships 3.12);
MONAI 1.6 and this package need 3.10, so that is the minimum Slicer version everywhere
(CMakeLists.txt, the catalog entry, README, and a message in an older Slicer).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass

from ..errors import VertebraIDError

#: The first 3D Slicer release whose Python is new enough (VertebraID.py repeats it for older Slicers).
MINIMUM_SLICER_VERSION = "5.10"
#: The Python this package needs (pyproject.toml: requires-python).
MINIMUM_PYTHON = (3, 10)


@dataclass(frozen=True)
class Requirement:
    """One Python package: what to import, what pip calls it, the lowest version that works."""

    module: str  # import name
    distribution: str  # pip / metadata name
    minimum: str  # lowest version known to work (a loose lower bound)
    via_pytorch_extension: bool = False  # torch: installed by the PyTorch extension, with `minimum`

    @property
    def specifier(self) -> str:
        """The pip requirement: 'monai>=1.4'."""
        return f"{self.distribution}>={self.minimum}"


TORCH = Requirement("torch", "torch", "2.2", via_pytorch_extension=True)  # 2.2: the first with Python 3.12 wheels
#: What the network (Detect with a model) needs.
NETWORK_REQUIREMENTS = (
    TORCH,
    Requirement("monai", "monai", "1.4"),
    Requirement("safetensors", "safetensors", "0.4"),
)
#: What training (VertebraIDTrain) needs: the network's, the progress bars and the logs.
TRAINING_REQUIREMENTS = NETWORK_REQUIREMENTS + (
    Requirement("tqdm", "tqdm", "4.60"),
    Requirement("tensorboard", "tensorboard", "2.10"),
)
#: What reading VerSe centroid files as points needs (nibabel's orientation helpers).
POINTS_FILE_REQUIREMENTS = (Requirement("nibabel", "nibabel", "4.0"),)


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '1.4rc1' -> (1, 4). Only the leading numbers count."""
    numbers = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def installed_version(requirement: Requirement) -> str | None:
    """The installed version of the package, or None when it cannot be imported."""
    try:
        if importlib.util.find_spec(requirement.module) is None:
            return None
    except (ImportError, ValueError):  # a parent package missing, or a module hidden on purpose
        return None
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""  # importable without metadata (a source tree on sys.path): accepted as is


def is_satisfied(requirement: Requirement) -> bool:
    """Importable and, when its version is known, at least the minimum."""
    version = installed_version(requirement)
    if version is None:
        return False
    return not version or version_tuple(version) >= version_tuple(requirement.minimum)


def missing(requirements) -> list[Requirement]:
    """The requirements that are not installed or too old (the whole list is checked at once)."""
    importlib.invalidate_caches()  # packages pip installed into this running Python since the last check
    return [r for r in requirements if not is_satisfied(r)]


def _too_old(requirement: Requirement) -> str | None:
    """The installed version when it is below the minimum, else None."""
    version = installed_version(requirement)
    if version and version_tuple(version) < version_tuple(requirement.minimum):
        return version
    return None


def describe(packages) -> str:
    """What is missing, in words: 'torch and monai, which are not installed' or
    'monai 1.4 or later (1.2 is installed)' or both, joined by 'and'."""
    absent, old = [], []
    for p in packages:
        version = _too_old(p) if isinstance(p, Requirement) else None
        if version:
            old.append(f"{p.module} {p.minimum} or later ({version} is installed)")
        else:
            absent.append(p.module if isinstance(p, Requirement) else str(p))
    parts = []
    if absent:
        parts.append(f"{_join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed")
    if old:
        parts.append(_join(old))
    return " and ".join(parts)


class MissingDependencies(VertebraIDError):
    """Python packages that a feature needs are missing or too old; one sentence says which."""

    def __init__(self, packages, what: str = "The network", alternative: str = " or use points as evidence",
                 advice: str | None = None):
        packages = list(packages)
        self.requirements = [p for p in packages if isinstance(p, Requirement)]
        self.packages = [p.module if isinstance(p, Requirement) else str(p) for p in packages]
        them = "it" if len(self.packages) == 1 else "them"
        advice = advice or f"accept the installation that 3D Slicer offers (or pip install {them})"
        super().__init__(f"{what} needs {describe(packages)}; {advice}{alternative}.")


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check(requirements, what: str = "The network", alternative: str = " or use points as evidence",
          advice: str | None = None) -> None:
    """Raise MissingDependencies naming every missing or too old package (one sentence)."""
    absent = missing(requirements)
    if absent:
        raise MissingDependencies(absent, what, alternative, advice)


def install_advice(requirements) -> str:
    """How to install them by hand: 'pip install "monai>=1.4" "tqdm>=4.60"' (PyTorch: its extension)."""
    absent = missing(requirements)
    pip = " ".join(f'"{r.specifier}"' for r in absent if not r.via_pytorch_extension)
    parts = []
    if any(r.via_pytorch_extension for r in absent):
        parts.append(f"install PyTorch {TORCH.minimum} or later with the PyTorch extension")
    if pip:
        parts.append(f"run slicer.util.pip_install('{pip}') in the Python console (pip install {pip} elsewhere)")
    return " and ".join(parts) or "install them"


@dataclass
class InstallPlan:
    """How to install what is missing: torch through the PyTorch extension, the rest with pip."""

    torch_requirement: str | None  # e.g. ">=2.2" for PyTorchUtilsLogic.installTorch, None: torch is fine
    pip_specifiers: list[str]  # e.g. ["monai>=1.4", "safetensors>=0.4"]
    names: list[str]  # what the user is asked about, in words

    @property
    def empty(self) -> bool:
        return self.torch_requirement is None and not self.pip_specifiers


def install_plan(requirements) -> InstallPlan:
    """The installation of every missing requirement, as one plan the user confirms once."""
    absent = missing(requirements)
    torch = next((r for r in absent if r.via_pytorch_extension), None)
    return InstallPlan(
        torch_requirement=f">={torch.minimum}" if torch else None,
        pip_specifiers=[r.specifier for r in absent if not r.via_pytorch_extension],
        names=[r.specifier for r in absent],
    )


def python_supported(version_info=None) -> bool:
    """Whether this Python is new enough for the package."""
    return tuple((version_info or sys.version_info)[:2]) >= MINIMUM_PYTHON
