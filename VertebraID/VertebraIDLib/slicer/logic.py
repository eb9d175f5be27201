"""The VertebraID module's Logic: Detect, Re-label and save on a MRML scene, without any GUI.

The Logic does its I/O through MRML nodes, storage nodes and module logics (`mrml.py`), so the
same code runs inside 3D Slicer and on PyPI's `slicer-core`, where pytest exercises it and
`vertebraid slicer-batch` uses it. `VertebraID.py` (the scripted module: Module, Widget,
parameter node, Test) imports it from here.

Evidence comes from a source: the network (`NetworkHeatmapSource`, through the one
`networks.predict.detect` path) or any detector's points rendered into maps
(`PointsHeatmapSource`: a markups point list, a Slicer markups file, a VerSe centroid file...).
A source's `detect(ct, settings, progress)` returns the engine's `Result`.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import time
from dataclasses import dataclass, field

import numpy as np

from ..engine import pipeline
from ..engine.anatomy import LEVELS_26, LabelSet, is_known_label, region
from ..engine.centerline import centerline_of_samples
from ..engine.corrections import Constraint
from ..engine.evidence import Evidence
from ..engine.landmarks import Landmarks
from ..engine.points import point_evidence, render_gaussians
from ..engine.progress import ProgressCallback, report, scaled
from ..engine.settings import EngineSettings
from ..engine.vertebrae import CHECK_BELOW_CONFIDENCE, Vertebra, sort_by_level
from ..engine.volume import Volume
from ..errors import VertebraIDError
from ..io import formats
from ..io.files import PathLike
from ..synthetic.simulate import simulate_case
from . import mrml

try:  # the 3D Slicer application: its base class gives the Logic getParameterNode()
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core or plain Python

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

#: How a point's label is used as evidence: as its level, only its region, or not at all.
POINT_LABEL_MODES = ("level", "region", "none")


#: A solved vertebra this close (mm) to a point the user deleted is left out on Re-label.
DELETED_POINT_RADIUS_MM = 10.0
ATTR_REJECTED = "VertebraID.Rejected"  # on the point list: positions the user deleted


class MissingDependencies(VertebraIDError):
    """Python packages the network needs (torch, monai) are not installed."""

    def __init__(self, packages: list[str]):
        self.packages = list(packages)
        super().__init__(
            f"The network needs {' and '.join(self.packages)}, which {'is' if len(self.packages) == 1 else 'are'} "
            "not installed; install them (in Slicer: with the PyTorch extension) or use points as evidence."
        )


class NetworkHeatmapSource:
    """Evidence from a trained model (the bundled one unless a model file is given)."""

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
        """The Python packages the network needs that are not installed."""
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

    def detect(self, ct: Volume, settings: EngineSettings, progress: ProgressCallback | None = None) -> pipeline.Result:
        """The model's `detect` (its own engine settings applied over `settings`)."""
        self.check()
        from ..networks.bundle import load_model
        from ..networks.predict import detect

        model = load_model(self.model_path, self.device)
        result = detect(ct, model, settings, progress=progress)
        if model.metadata.get("status"):  # e.g. a research preview: the user sees it beside the labels
            result.prepared.description += f" ({model.metadata['status']})"
        return result


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
        """Each point's label as evidence: its level, its region, or nothing (`mode`)."""
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
        """The points of a markups node, their labels read as `label_mode` says."""
        if node is None:
            raise VertebraIDError("Select a point list to use as evidence.")
        positions, labels = mrml.markups_positions(node)
        return cls(positions, cls.probabilities_from_labels(labels, label_mode), f"points '{node.GetName()}'", **kwargs)

    @classmethod
    def from_file(
        cls,
        path: PathLike,
        context: "mrml.SceneContext",
        reference: Volume | None = None,
        label_mode: str = "level",
        **kwargs,
    ) -> "PointsHeatmapSource":
        """Points from a Slicer markups file (read by the Markups logic), a points JSON
        (`label-points` input), or any labelled vertebrae file (VerSe centroids need `reference`)."""
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
        """One sentence when there is no point."""
        if len(self.positions) == 0:
            raise VertebraIDError(f"The {self.description} hold no point.")

    def detect(self, ct: Volume, settings: EngineSettings, progress: ProgressCallback | None = None) -> pipeline.Result:
        """The points rendered into maps (on their own grid), then the engine."""
        self.check()
        evidence = point_evidence(self.positions, self.probabilities, self.sigma_mm, self.spacing_mm, self.description)
        return pipeline.locate(evidence, settings, progress=progress)


@dataclass
class DetectRun:
    """One Detect: its subject-hierarchy folder, the nodes in it by role, and the core result."""

    folder: int
    nodes: dict
    result: pipeline.Result
    evidence: str
    timings_s: dict = field(default_factory=dict)


@dataclass
class RelabelReport:
    """What Re-label did."""

    result: pipeline.Result  # of the constrained solve
    constraints: list[Constraint]  # the user's points that fixed their level
    ignored: list[str]  # labels of points left as they are (not a vertebra level)
    left_out: list[str]  # solved levels not placed because the user deleted a point there
    changed: int  # points whose label changed
    vertebrae: list[Vertebra]  # the final list, as now in the point list

    def summary(self) -> str:
        """One line for the status bar: what changed, what was kept, what to check."""
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


class VertebraIDLogic(ScriptedLoadableModuleLogic):
    """Detect, re-label and save, on a MRML scene; no GUI.

    `context`: a `VertebraIDLib.mrml.SceneContext`; by default the running Slicer
    application's scene. Outside Slicer pass `mrml.SceneContext.create()`.
    """

    def __init__(self, context: "mrml.SceneContext | None" = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._context = context
        self._prepared: dict[int, pipeline.Prepared] = {}  # run folder -> its Ĝ, centreline and signals

    @property
    def context(self) -> "mrml.SceneContext":
        if self._context is None:
            self._context = mrml.SceneContext.current()
        return self._context

    @property
    def scene(self):
        return self.context.scene

    # ----------------------------------------------------------------- Detect

    def detect(
        self,
        volume_node,
        source,
        settings: EngineSettings = EngineSettings(),
        progress: ProgressCallback | None = None,
        name: str | None = None,
    ) -> DetectRun:
        """Input volume -> the source's evidence -> the engine -> a new results folder.

        Raises VertebraIDError (one sentence) for bad input or when no spine is found, and
        `Cancelled` when `progress` returns True. Nodes are created only once everything is
        computed, and removed again if creating them fails: an error or a cancel leaves the
        scene as it was.
        """
        timings: dict[str, float] = {}
        mrml.check_input_volume_node(volume_node)
        check = getattr(source, "check", None)
        if check is not None:
            check()
        report(progress, 0.0, "Reading the volume")
        t0 = time.perf_counter()
        ct = mrml.volume_from_node(volume_node)
        timings["read_volume"] = time.perf_counter() - t0

        report(progress, 0.02, f"Finding the vertebrae ({source.description})")
        t0 = time.perf_counter()
        result = source.detect(ct, settings, scaled(progress, 0.02, 0.9))
        timings["detect"] = time.perf_counter() - t0
        description = result.prepared.description
        if result.prepared.centerline is None or not result.vertebrae:
            raise VertebraIDError(
                f"No spine was found in '{volume_node.GetName()}' ({description}); "
                "check that the scan shows the spine."
            )

        report(progress, 0.9, "Straightening the CT along the centreline")
        t0 = time.perf_counter()
        straight_ct = result.rectified.straighten(ct)
        timings["straighten_ct"] = time.perf_counter() - t0

        report(progress, 0.95, "Creating the results")
        t0 = time.perf_counter()
        with mrml.NodeTracker(self.scene):
            folder, nodes = self._create_run_nodes(volume_node, result, straight_ct, name)
        timings["create_nodes"] = time.perf_counter() - t0
        self._prepared[folder] = result.prepared
        if progress is not None:
            progress(1.0, "Done")
        return DetectRun(folder, nodes, result, description, timings)

    def _create_run_nodes(self, volume_node, result: pipeline.Result, straight_ct: Volume, name):
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
            "evidence": result.prepared.description,
            "settings": result.prepared.settings.to_dict(),
            "energy": float(result.energy),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if rect.level_signals is not None:  # Re-label needs them and has no CT or labeller at hand
            run_info["level_signals"] = np.round(rect.level_signals, 4).tolist()
        if rect.landmarks is not None:  # likewise the ribs and sacrum read from the CT
            run_info["landmarks"] = rect.landmarks.to_dict()
        line = result.centerline  # and the centreline they were read along (which followed the canal)
        run_info["centerline"] = {"points": np.round(line.points, 3).tolist(), "supported": line.supported.tolist(),
                                  "step_mm": line.step_mm}
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
        """The run's stored settings and results (its folder's JSON attribute)."""
        return json.loads(self.scene.GetSubjectHierarchyNode().GetItemAttribute(run, mrml.ATTR_RUN) or "{}")

    def _settings_of(self, run: int) -> EngineSettings:
        """The settings a run was made with (scenes saved by earlier versions stored them as "options")."""
        info = self.run_info(run)
        return EngineSettings.from_dict(info.get("settings", info.get("options", {})))

    def _prepared_of(self, run: int) -> pipeline.Prepared:
        """The run's Ĝ, centreline and signals: kept from Detect, or rebuilt from the saved maps."""
        if run in self._prepared:
            return self._prepared[run]
        nodes = self.run_nodes(run)
        heatmaps_node = nodes.get(mrml.ROLE_HEATMAPS)
        if heatmaps_node is None:
            raise VertebraIDError("This run's activation maps were deleted, so it cannot be re-labelled; run Detect again.")
        heatmaps = mrml.multichannel_volume_from_node(heatmaps_node)
        combined_node = nodes.get(mrml.ROLE_COMBINED)
        combined = mrml.volume_from_node(combined_node) if combined_node is not None else None
        info = self.run_info(run)
        stored = info.get("level_signals")
        marks = Landmarks.from_dict(info["landmarks"]) if info.get("landmarks") else None
        centerline = None
        if info.get("centerline"):
            saved = info["centerline"]
            centerline = centerline_of_samples(saved["points"], saved["step_mm"], saved["supported"])
        evidence = Evidence(heatmaps, combined, info.get("evidence", ""),
                            level_evidence=None if stored is None else (lambda line: stored),
                            anatomy=None if marks is None else (lambda line: marks), centerline=centerline)
        try:
            prepared = pipeline.prepare(evidence, self._settings_of(run))
        except VertebraIDError:
            if stored is None and marks is None:
                raise
            raise VertebraIDError("This run's stored level evidence no longer fits its activation maps; "
                                  "run Detect again.") from None
        if prepared.rectified is None:
            raise VertebraIDError("No spine is found in this run's stored activation maps; run Detect again.")
        self._prepared[run] = prepared
        return prepared

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

        prepared = self._prepared_of(run)
        report(progress, 0.0, "Re-labelling")
        result = pipeline.solve(prepared, prepared.settings.updated(method="exact"), constraints,
                                progress=scaled(progress, 0.1, 0.9))

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
        import vtk

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

    def save_results(self, run: int, output_dir: PathLike, case_name: str) -> dict[str, pathlib.Path]:
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

    def save_scene(self, path: PathLike) -> pathlib.Path:
        """The whole scene as a Slicer scene bundle (.mrb)."""
        mrml.write_scene_bundle(self.scene, path)
        return pathlib.Path(path)


def synthetic_spine_case(seed: int = 3, levels: tuple[str, str] = ("T3", "L4"), spacing_mm: float = 3.0):
    """A small CT-like volume with a simulated spine, and its true vertebrae (cranial first).

    The spine (centres from `simulate.simulate_case`) is drawn as bright vertebral bodies in
    soft tissue, on an axis-aligned LPS-ordered grid (as scanners store axial CT).
    Returns (ct: Volume, truth: list[Vertebra]).
    """
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
