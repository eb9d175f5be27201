"""Where a Detect's evidence comes from: the network, or any detector's points.

A source's `detect(ct, settings, progress)` returns the engine's `Result`; `check()` says in
one sentence why it cannot run (missing packages, model file, no points) before any work
starts. `to_spec()` / `source_from_spec()` carry a source to the background process
(`background.py`), which runs the same `detect` away from the GUI thread.

Nothing here imports `slicer` at module level: the background process imports this module
in a plain Python (PythonSlicer) without the application.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from ..engine import pipeline
from ..engine.anatomy import is_known_label, region
from ..engine.points import point_evidence
from ..engine.progress import ProgressCallback
from ..engine.settings import EngineSettings
from ..engine.volume import Volume
from ..errors import VertebraIDError
from ..io.files import PathLike
from . import requirements
from .requirements import NETWORK_REQUIREMENTS, MissingDependencies

#: How a point's label is used as evidence: as its level, only its region, or not at all.
POINT_LABEL_MODES = ("level", "region", "none")


def _normalize_label(text: str) -> str:
    return text.strip().upper()


class NetworkHeatmapSource:
    """Evidence from a trained model (the bundled one unless a model file is given)."""

    kind = "network"
    combined_is_sum = True  # Ĝ is the sum of the network's maps

    def __init__(self, model_path: PathLike | None, device: str = "auto"):
        self.model_path = pathlib.Path(model_path) if model_path else self._bundled_model()
        self.device = device
        self.description = f"network model {self.model_path.name if self.model_path else '(none)'}"

    @staticmethod
    def _bundled_model() -> pathlib.Path | None:
        """The model shipped in Resources/Models, when there is one."""
        try:
            from ..networks.bundle import bundled_model_path
        except ImportError:  # torch / MONAI not installed yet: check() says so
            return None
        return bundled_model_path()

    @staticmethod
    def missing_packages() -> list[str]:
        """The Python packages the network needs that are missing or too old (torch, monai, safetensors)."""
        return [r.module for r in requirements.missing(NETWORK_REQUIREMENTS)]

    def check(self) -> None:
        """Raise a one-sentence error when the network cannot run (packages, model file)."""
        absent = self.missing_packages()
        if absent:
            known = {r.module: r for r in NETWORK_REQUIREMENTS}
            raise MissingDependencies([known.get(name, name) for name in absent])
        if self.model_path is None or not str(self.model_path).strip():
            raise VertebraIDError("Select a model file (.safetensors) for the network, or use points as evidence.")
        if not self.model_path.is_file():
            raise VertebraIDError(f"The model file '{self.model_path}' does not exist.")

    def detect(self, ct: Volume, settings: EngineSettings, progress: ProgressCallback | None = None) -> pipeline.Result:
        """The model's `detect` (its own engine settings applied over `settings`)."""
        self.check()
        try:
            from ..networks.bundle import load_model
            from ..networks.predict import detect

            model = load_model(self.model_path, self.device)
        except ModuleNotFoundError as exc:  # a package the checks could not see (a broken install)
            raise MissingDependencies([exc.name or "a Python package"]) from None
        result = detect(ct, model, settings, progress=progress)
        if model.metadata.get("status"):  # e.g. a research preview: the user sees it beside the labels
            result.prepared.description += f" ({model.metadata['status']})"
        return result

    def to_spec(self) -> dict:
        """What the background process needs to make the same source."""
        return {"kind": self.kind, "model_path": str(self.model_path) if self.model_path else None,
                "device": self.device}


class PointsHeatmapSource:
    """Any detector's points as evidence: each point becomes a Gaussian blob in the maps.

    A point's probabilities ({"L": 0.9} per region, {"L4": 1.0} per level) choose the channels
    it fires; without any, it fires all 26 and only the chain's order and spacing name it.
    Ĝ is one unit blob per point, whatever its channels (as `points.label_points` does).
    """

    kind = "points"
    combined_is_sum = False  # Ĝ is one blob per point, rendered on its own

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
        """Each point's label as evidence: its level, its region, or nothing (`mode`)."""
        if mode not in POINT_LABEL_MODES:
            raise VertebraIDError(f"Unknown point label mode '{mode}'; choose one of {', '.join(POINT_LABEL_MODES)}.")
        out: list[dict | None] = []
        for text in labels:
            label = _normalize_label(text or "")
            if mode == "none" or not is_known_label(label):
                out.append(None)
            elif mode == "region":
                out.append({region(label): 1.0})
            else:
                out.append({label: 1.0})
        return out

    @classmethod
    def from_markups_node(cls, node, label_mode: str = "level", **kwargs) -> "PointsHeatmapSource":
        """The points of a markups node, their labels read as `label_mode` says."""
        from . import mrml

        if node is None:
            raise VertebraIDError("Select a point list to use as evidence.")
        positions, labels = mrml.markups_positions(node)
        return cls(positions, cls.probabilities_from_labels(labels, label_mode), f"points '{node.GetName()}'", **kwargs)

    @classmethod
    def from_file(
        cls,
        path: PathLike,
        context,
        reference: Volume | None = None,
        label_mode: str = "level",
        **kwargs,
    ) -> "PointsHeatmapSource":
        """Points from a Slicer markups file (read by the Markups logic), a points JSON
        (`label-points` input), or any labelled vertebrae file (VerSe centroids need `reference`).

        `context`: a `mrml.SceneContext` (markups files are read by the Markups logic)."""
        from ..io import formats
        from . import mrml

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
        try:
            vertebrae = formats.read_vertebrae_any(path, reference)
        except ModuleNotFoundError as exc:  # VerSe files need nibabel, which 3D Slicer does not bundle
            raise MissingDependencies([exc.name or "nibabel"], f"Reading {path.name}", "") from None
        positions = np.array([v.position for v in vertebrae], float).reshape(-1, 3)
        labels = [v.label for v in vertebrae]
        return cls(positions, cls.probabilities_from_labels(labels, label_mode), description, **kwargs)

    def check(self) -> None:
        """One sentence when there is no point."""
        if len(self.positions) == 0:
            raise VertebraIDError(f"The {self.description} hold no point.")

    def detect(self, ct: Volume, settings: EngineSettings, progress: ProgressCallback | None = None) -> pipeline.Result:
        """The points rendered into maps (on their own grid), then the engine."""
        self.check()
        evidence = point_evidence(self.positions, self.probabilities, self.sigma_mm, self.spacing_mm, self.description)
        return pipeline.locate(evidence, settings, progress=progress)

    def to_spec(self) -> dict:
        """What the background process needs to make the same source."""
        return {"kind": self.kind, "positions": self.positions.tolist(), "probabilities": list(self.probabilities),
                "description": self.description, "sigma_mm": self.sigma_mm, "spacing_mm": self.spacing_mm}


def source_from_spec(spec: dict):
    """The source a `to_spec()` describes (in the background process)."""
    kind = spec.get("kind")
    if kind == NetworkHeatmapSource.kind:
        return NetworkHeatmapSource(spec.get("model_path"), spec.get("device", "auto"))
    if kind == PointsHeatmapSource.kind:
        return PointsHeatmapSource(spec["positions"], spec.get("probabilities"), spec.get("description", "points"),
                                   spec.get("sigma_mm", 4.0), spec.get("spacing_mm", 2.0))
    raise VertebraIDError(f"Unknown evidence source '{kind}'.")
