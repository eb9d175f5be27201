"""The VertebraID module's Logic: Detect, Re-label, correct and save on a MRML scene, without any GUI.

The Logic does its I/O through MRML nodes, storage nodes and module logics (`mrml.py`), so the
same code runs inside 3D Slicer and on PyPI's `slicer-core`, where pytest exercises it and
`vertebraid slicer-batch` uses it. `VertebraID.py` (the scripted module: Module, Widget,
parameter node, Test) imports it from here and stays thin.

Evidence comes from a source (`sources.py`): the network (`NetworkHeatmapSource`, through the
one `networks.predict.detect` path) or any detector's points rendered into maps
(`PointsHeatmapSource`). Detect runs in this process (`detect`: batch, tests) or in a child
process (`start_detect` / `finish_detect`, `detect_in_background`: the GUI), and in both the
scene is touched only once the result is complete.

A run is a subject-hierarchy folder named after the input ("VertebraID ct") whose nodes are
named after it too ("ct: Vertebrae", a second run "ct (2): Vertebrae"): the labelled points,
the centreline, the region spheres and Ĝ at the top; the intermediates (maps, straightened
volumes, signals) in a collapsed "details" sub-folder.
"""
from __future__ import annotations

import json
import pathlib
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..engine import pipeline
from ..engine.anatomy import LEVELS_26, LabelSet, region
from ..engine.centerline import centerline_of_samples
from ..engine.corrections import Constraint
from ..engine.evidence import Evidence
from ..engine.landmarks import Landmarks
from ..engine.points import render_gaussians
from ..engine.progress import ProgressCallback, report, scaled
from ..engine.settings import EngineSettings
from ..engine.vertebrae import CHECK_BELOW_CONFIDENCE, Vertebra, sort_by_level
from ..engine.volume import Volume
from ..errors import VertebraIDError
from ..io.files import PathLike
from ..synthetic.simulate import simulate_case
from . import mrml, review
from .background import DetectJob
from .requirements import MissingDependencies  # noqa: F401  (re-exported: the module file imports it from here)
from .sources import POINT_LABEL_MODES, NetworkHeatmapSource, PointsHeatmapSource  # noqa: F401  (re-exported)

try:  # the 3D Slicer application: its base class gives the Logic getParameterNode()
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core or plain Python

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent


#: A solved vertebra this close (mm) to a point the user deleted is left out on Re-label.
DELETED_POINT_RADIUS_MM = 10.0
#: A point this close (mm) to a remembered added position is that added point.
ADDED_POINT_RADIUS_MM = 2.0
ATTR_REJECTED = "VertebraID.Rejected"  # on the point list: positions the user deleted
#: Runs whose maps, centreline and signals stay in memory for Re-label (each can hold ~1 GB of maps);
#: older ones are rebuilt from their nodes when needed.
CACHED_RUNS = 2

#: A run's nodes: role -> (name after the "<input>: " prefix, in the details sub-folder?).
NODE_NAMES = {
    mrml.ROLE_POINTS: ("Vertebrae", False),
    mrml.ROLE_REGIONS: ("Vertebra regions", False),
    mrml.ROLE_CENTERLINE: ("Centreline", False),
    mrml.ROLE_COMBINED: ("Combined activation", False),
    mrml.ROLE_HEATMAPS: ("Activation maps", True),
    mrml.ROLE_STRAIGHT_CT: ("Straightened CT", True),
    mrml.ROLE_STRAIGHT_COMBINED: ("Straightened activation", True),
    mrml.ROLE_SIGNALS: ("Signals", True),
    mrml.ROLE_PLOT: ("Signals plot", True),
}


@dataclass
class DetectRun:
    """One Detect: its subject-hierarchy folder, the nodes in it by role, and the core result."""

    folder: int
    nodes: dict
    result: pipeline.Result
    evidence: str
    timings_s: dict = field(default_factory=dict)

    @property
    def to_check(self) -> list[tuple[str, str]]:
        """(label, reason) of every label more likely wrong than right."""
        return [(v.label, v.flag_reason or review.check_reason(v.label))
                for v in self.result.vertebrae if v.needs_check]

    def summary(self) -> str:
        """One line for the status bar: what was found, from what, and what to check."""
        found = self.result.vertebrae
        span = "" if not found else f" ({found[0].label})" if len(found) == 1 else f" ({found[0].label}-{found[-1].label})"
        noun = "vertebra" if len(found) == 1 else "vertebrae"
        text = f"Found {len(found)} {noun}{span} in {sum(self.timings_s.values()):.1f} s from the {self.evidence}"
        if self.to_check:
            by_reason: dict[str, list[str]] = {}
            for label, reason in self.to_check:
                by_reason.setdefault(reason, []).append(label)
            listed = ", ".join(f"{' '.join(labels)} ({reason})" for reason, labels in by_reason.items())
            text += f"; check {listed}: confidence below {CHECK_BELOW_CONFIDENCE:g}, shown red and first in the table"
        return text + "."


@dataclass
class RelabelReport:
    """What Re-label did."""

    result: pipeline.Result  # of the constrained solve
    constraints: list[Constraint]  # the user's points that fixed their level
    ignored: list[str]  # labels of points left as they are (not a vertebra level)
    left_out: list[str]  # solved levels not placed because the user deleted a point there
    changed: int  # points whose label changed
    vertebrae: list[Vertebra]  # the final list, as now in the point list
    added: list[str] = field(default_factory=list)  # levels solved for points the user added without a label
    shifted: int = 0  # levels every label was moved by (shift_labels), 0 for a plain Re-label

    def summary(self) -> str:
        """One line for the status bar: what changed, what was kept, what to check."""
        parts = []
        if self.shifted:
            steps = abs(self.shifted)
            parts.append(f"Moved every label {'down' if self.shifted > 0 else 'up'} by {steps} level{'s' if steps > 1 else ''}")
        parts.append(f"Re-labelled {len(self.vertebrae)} vertebrae: {self.changed} label(s) changed")
        parts.append(f"{len(self.constraints)} fixed point(s) kept")
        if self.added:
            parts.append(f"the point(s) you added named {', '.join(self.added)}")
        if self.ignored:
            parts.append(f"point(s) {', '.join(self.ignored)} left as they are (not a vertebra label)")
        if self.left_out:
            parts.append(f"{', '.join(self.left_out)} not placed where you deleted points")
        to_check = [f"{v.label} ({review.check_reason(v.label)})" for v in self.vertebrae if v.needs_check]
        if to_check:
            parts.append(f"check {', '.join(to_check)} (red: confidence below {CHECK_BELOW_CONFIDENCE:g})")
        return "; ".join(parts) + "."


def _count_changed(previous: list[tuple[np.ndarray, str]], final: list[Vertebra]) -> int:
    """How many of `final` sit where a point was (< 2 mm) with another label."""
    changed = 0
    for v in final:
        if not previous:
            break
        d = [float(np.linalg.norm(p - v.position)) for p, _ in previous]
        i = int(np.argmin(d))
        if d[i] < 2.0 and previous[i][1] != v.label:
            changed += 1
    return changed


class VertebraIDLogic(ScriptedLoadableModuleLogic):
    """Detect, re-label, correct and save, on a MRML scene; no GUI.

    `context`: a `VertebraIDLib.mrml.SceneContext`; by default the running Slicer
    application's scene. Outside Slicer pass `mrml.SceneContext.create()`.
    """

    def __init__(self, context: "mrml.SceneContext | None" = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._context = None
        self._observations: list = []
        # run folder -> its Ĝ, centreline and signals (the newest CACHED_RUNS runs; emptied when the scene closes)
        self._prepared: OrderedDict[int, pipeline.Prepared] = OrderedDict()
        if context is not None:
            self._attach(context)

    @property
    def context(self) -> "mrml.SceneContext":
        if self._context is None:
            self._attach(mrml.SceneContext.current())
        return self._context

    @property
    def scene(self):
        return self.context.scene

    # ----------------------------------------------------------------- the cache and the scene

    def _attach(self, context: "mrml.SceneContext") -> None:
        """Use this scene, and forget a run's cached maps when the scene closes or the run's folder goes.

        The observers hold the Logic weakly and are removed when it goes (`cleanup`, `__del__`):
        a scene being deleted clears itself and fires its events, which must find no Python
        callback of a Logic already half gone.
        """
        self._context = context
        scene = context.scene
        logic = weakref.ref(self)

        def on_close(caller, event):
            alive = logic()
            if alive is not None:
                alive._prepared.clear()

        def on_node_removed(caller, event):
            alive = logic()
            if alive is not None and alive._prepared and not alive._closing():
                alive.prune_cache()

        for event, callback in ((scene.StartCloseEvent, on_close), (scene.EndCloseEvent, on_close),
                                (scene.NodeRemovedEvent, on_node_removed)):
            self._observations.append((scene, scene.AddObserver(event, callback)))

    def _closing(self) -> bool:
        return bool(self._context is not None and self._context.scene.IsClosing())

    def prune_cache(self) -> None:
        """Forget the cached maps of runs that are gone: their folder or their point list was deleted."""
        scene = self.scene
        alive = set(mrml.run_folders(scene))
        for run in list(self._prepared):
            points = mrml.folder_node_by_role(scene, run, mrml.ROLE_POINTS) if run in alive else None
            if points is None or not scene.IsNodePresent(points):
                del self._prepared[run]

    def _remember(self, run: int, prepared: pipeline.Prepared) -> None:
        self._prepared[run] = prepared
        self._prepared.move_to_end(run)
        while len(self._prepared) > CACHED_RUNS:
            self._prepared.popitem(last=False)

    def cleanup(self) -> None:
        """Stop observing the scene and forget the cache (the module widget calls this when it is deleted)."""
        for scene, tag in self._observations:
            scene.RemoveObserver(tag)
        self._observations.clear()
        self._prepared.clear()

    def __del__(self):
        try:
            self.cleanup()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    # ----------------------------------------------------------------- Detect

    def detect(self, volume_node, source, settings: EngineSettings = EngineSettings(),
               progress: ProgressCallback | None = None, name: str | None = None) -> DetectRun:
        """Input volume -> the source's evidence -> the engine -> a new results folder (in this process).

        Raises VertebraIDError (one sentence) for bad input or when no spine is found, and
        `Cancelled` when `progress` returns True. Nodes are created only once everything is
        computed, and removed again if creating them fails: an error or a cancel leaves the
        scene as it was. The GUI uses `start_detect` / `finish_detect` instead (a child process).
        """
        timings: dict[str, float] = {}
        self._check_input(volume_node, source)
        report(progress, 0.0, "Reading the volume")
        t0 = time.perf_counter()
        ct = mrml.volume_from_node(volume_node)
        timings["read_volume"] = time.perf_counter() - t0

        report(progress, 0.02, f"Finding the vertebrae ({source.description})")
        t0 = time.perf_counter()
        result = source.detect(ct, settings, scaled(progress, 0.02, 0.9))
        timings["detect"] = time.perf_counter() - t0
        self._check_found(volume_node, result)

        report(progress, 0.9, "Straightening the CT along the centreline")
        t0 = time.perf_counter()
        straight_ct = result.rectified.straighten(ct)
        timings["straighten_ct"] = time.perf_counter() - t0

        report(progress, 0.95, "Creating the results")
        run = self._add_run(volume_node, result, straight_ct, name, timings, getattr(source, "combined_is_sum", True))
        if progress is not None:
            progress(1.0, "Done")
        return run

    @staticmethod
    def _check_input(volume_node, source) -> None:
        """Raise VertebraIDError (one sentence) for an unusable volume or a source that cannot run here."""
        mrml.check_input_volume_node(volume_node)
        check = getattr(source, "check", None)
        if check is not None:
            check()

    @staticmethod
    def _check_found(volume_node, result: pipeline.Result) -> None:
        if result.prepared.centerline is None or not result.vertebrae:
            raise VertebraIDError(
                f"No spine was found in '{volume_node.GetName()}' ({result.prepared.description}); "
                "check that the scan shows the spine."
            )

    def start_detect(self, volume_node, source, settings: EngineSettings = EngineSettings(),
                     python: str | None = None) -> DetectJob:
        """Start Detect in a child process (the GUI's way: the application stays responsive).

        The input and the source are checked here first (one sentence for bad input or missing
        packages); the scene is not touched. Poll the job (`job.poll()`, `job.fraction`,
        `job.message`), cancel it (`job.cancel()`), then `finish_detect(job)` builds the nodes.
        """
        self._check_input(volume_node, source)
        ct = mrml.volume_from_node(volume_node, dtype=mrml.voxel_dtype(volume_node))
        job = DetectJob.start(ct, source.to_spec(), settings, python, volume_node.GetName())
        job.input_node_id = volume_node.GetID()
        job.combined_is_sum = getattr(source, "combined_is_sum", True)
        return job

    def finish_detect(self, job: DetectJob, volume_node=None, name: str | None = None) -> DetectRun:
        """The finished job's results as a new run folder (raises the job's error, or `Cancelled`)."""
        t0 = time.perf_counter()
        output = job.output()
        timings = dict(output.timings_s)
        timings["process_overhead"] = max(0.0, job.seconds - sum(timings.values()))
        timings["read_output"] = time.perf_counter() - t0
        volume_node = volume_node or self.scene.GetNodeByID(getattr(job, "input_node_id", ""))
        if volume_node is None:
            raise VertebraIDError("The input volume was removed while the vertebrae were being found; run Detect again.")
        self._check_found(volume_node, output.result)
        return self._add_run(volume_node, output.result, output.straight_ct, name, timings,
                             getattr(job, "combined_is_sum", True))

    def detect_in_background(self, volume_node, source, settings: EngineSettings = EngineSettings(),
                             progress: ProgressCallback | None = None, name: str | None = None,
                             python: str | None = None) -> DetectRun:
        """`detect` through the child process, waiting for it: `progress` returning True cancels
        (the child is ended, its folder removed, the scene left as it was)."""
        report(progress, 0.0, "Starting")
        job = self.start_detect(volume_node, source, settings, python)
        try:
            job.wait(scaled(progress, 0.0, 0.95))
        except BaseException:
            job.cancel()
            raise
        report(progress, 0.95, "Creating the results")
        run = self.finish_detect(job, volume_node, name)
        if progress is not None:
            progress(1.0, "Done")
        return run

    # ----------------------------------------------------------------- a run's nodes

    def _run_names(self, volume_node, name: str | None) -> tuple[str, str]:
        """(folder name, node name prefix), unique in the scene: 'VertebraID ct' / 'ct', then 'ct (2)'..."""
        scene = self.scene
        shn = scene.GetSubjectHierarchyNode()
        folders = {shn.GetItemName(f) for f in mrml.run_folders(scene)}
        input_name = volume_node.GetName()
        n = 1
        while True:
            prefix = input_name if n == 1 else f"{input_name} ({n})"
            base = name or f"VertebraID {input_name}"
            folder = base if n == 1 else f"{base} ({n})"
            taken = folder in folders or any(
                scene.GetFirstNodeByName(f"{prefix}: {suffix}") is not None for suffix, _ in NODE_NAMES.values())
            if not taken:
                return folder, prefix
            n += 1

    def _add_run(self, volume_node, result, straight_ct, name, timings, combined_is_sum=True) -> DetectRun:
        t0 = time.perf_counter()
        with mrml.NodeTracker(self.scene):
            folder, nodes = self._create_run_nodes(volume_node, result, straight_ct, name, combined_is_sum)
        timings = dict(timings)
        timings["create_nodes"] = time.perf_counter() - t0
        self._remember(folder, result.prepared)
        return DetectRun(folder, nodes, result, result.prepared.description, timings)

    def _create_run_nodes(self, volume_node, result: pipeline.Result, straight_ct: Volume, name,
                          combined_is_sum: bool = True):
        scene = self.scene
        rect = result.rectified
        input_name = volume_node.GetName()
        folder_name, prefix = self._run_names(volume_node, name)
        run_info = {
            "input": volume_node.GetID(),
            "input_name": input_name,
            "name": prefix,
            "evidence": result.prepared.description,
            "settings": result.prepared.settings.to_dict(),
            "energy": float(result.energy),
            "combined_is_sum": bool(combined_is_sum),
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
        details = mrml.create_folder(scene, "details", {mrml.ATTR_ROLE: mrml.ROLE_DETAILS}, parent=folder,
                                     expanded=False)
        nodes: dict = {}

        def node_name(role):
            return f"{prefix}: {NODE_NAMES[role][0]}"

        def keep(role, node):
            mrml.place_in_folder(scene, node, details if NODE_NAMES[role][1] else folder, role)
            nodes[role] = node
            return node

        keep(mrml.ROLE_POINTS, mrml.add_vertebrae_points(scene, result.vertebrae, node_name(mrml.ROLE_POINTS)))
        keep(mrml.ROLE_REGIONS, mrml.add_region_model(scene, result.vertebrae, node_name(mrml.ROLE_REGIONS)))
        keep(mrml.ROLE_CENTERLINE, mrml.add_centerline_curve(scene, result.centerline.points,
                                                             node_name(mrml.ROLE_CENTERLINE)))

        color_id = mrml.activation_color_node(scene).GetID()
        combined = result.prepared.combined
        peak = float(combined.array.max()) or 1.0
        keep(
            mrml.ROLE_COMBINED,
            mrml.add_scalar_volume(
                scene, combined, node_name(mrml.ROLE_COMBINED), color_id, (peak, peak / 2), threshold=0.05 * peak
            ),
        )
        heatmaps = keep(mrml.ROLE_HEATMAPS, mrml.add_multichannel_volume(scene, result.prepared.heatmaps,
                                                                        node_name(mrml.ROLE_HEATMAPS)))
        heatmaps.GetDisplayNode().SetVisibility(False)

        window_level = None
        display = volume_node.GetDisplayNode()
        if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode"):
            window_level = (display.GetWindow(), display.GetLevel())
        keep(mrml.ROLE_STRAIGHT_CT, mrml.add_scalar_volume(scene, straight_ct, node_name(mrml.ROLE_STRAIGHT_CT),
                                                           window_level=window_level))
        straight_combined = Volume(np.asarray(rect.combined, np.float32), rect.affine)
        speak = float(straight_combined.array.max()) or 1.0
        keep(
            mrml.ROLE_STRAIGHT_COMBINED,
            mrml.add_scalar_volume(
                scene, straight_combined, node_name(mrml.ROLE_STRAIGHT_COMBINED), color_id, (speak, speak / 2),
                threshold=0.05 * speak
            ),
        )
        table = keep(mrml.ROLE_SIGNALS, mrml.add_signals_table(scene, rect, node_name(mrml.ROLE_SIGNALS)))
        chart, series = mrml.add_signals_plot(scene, table, node_name(mrml.ROLE_PLOT))
        keep(mrml.ROLE_PLOT, chart)
        for s in series:
            mrml.place_in_folder(scene, s, details, mrml.ROLE_SERIES)
        return folder, nodes

    # ----------------------------------------------------------------- runs

    def run_of(self, node) -> int:
        """The run folder holding `node`, directly or in its details sub-folder (0 if none)."""
        if node is None:
            return 0
        return mrml.run_folder_of_node(self.scene, node)

    def run_nodes(self, run: int) -> dict:
        """The nodes of a run folder by role (those in its details sub-folder included)."""
        if not run:
            return {}
        return {n.GetAttribute(mrml.ATTR_ROLE): n for n in mrml.folder_nodes(self.scene, run, recursive=True)
                if n.GetAttribute(mrml.ATTR_ROLE)}

    def run_info(self, run: int) -> dict:
        """The run's stored settings and results (its folder's JSON attribute)."""
        return json.loads(self.scene.GetSubjectHierarchyNode().GetItemAttribute(run, mrml.ATTR_RUN) or "{}")

    def run_prefix(self, run: int) -> str:
        """What the run's nodes are named after ('ct', 'ct (2)')."""
        info = self.run_info(run)
        return info.get("name") or info.get("input_name") or "VertebraID"

    def output_node_ids(self, class_name: str = "vtkMRMLVolumeNode") -> list[str]:
        """IDs of every node of this class that a run made (to keep them out of the input selector)."""
        scene = self.scene
        out = []
        for i in range(scene.GetNumberOfNodesByClass(class_name)):
            node = scene.GetNthNodeByClass(i, class_name)
            if node.GetAttribute(mrml.ATTR_ROLE):
                out.append(node.GetID())
        return out

    def _settings_of(self, run: int) -> EngineSettings:
        """The settings a run was made with (scenes saved by earlier versions stored them as "options")."""
        info = self.run_info(run)
        return EngineSettings.from_dict(info.get("settings", info.get("options", {})))

    def _prepared_of(self, run: int) -> pipeline.Prepared:
        """The run's Ĝ, centreline and signals: kept from Detect, or rebuilt from the saved maps."""
        if run in self._prepared:
            self._prepared.move_to_end(run)
            return self._prepared[run]
        nodes = self.run_nodes(run)
        heatmaps_node = nodes.get(mrml.ROLE_HEATMAPS)
        if heatmaps_node is None:
            raise VertebraIDError("This run's activation maps were deleted, so it cannot be re-labelled; run Detect again.")
        heatmaps = mrml.multichannel_volume_from_node(heatmaps_node)
        combined_node = nodes.get(mrml.ROLE_COMBINED)
        combined = mrml.volume_from_node(combined_node) if combined_node is not None else None
        info = self.run_info(run)
        if info.get("combined_is_sum"):
            combined = None  # Ĝ is the maps' sum: recomputed, so that its floor is taken off as at Detect
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
        self._remember(run, prepared)
        return prepared

    def _points_of(self, run_or_node) -> tuple[int, object]:
        run = run_or_node if isinstance(run_or_node, int) else self.run_of(run_or_node)
        if not run:
            raise VertebraIDError("Select the 'Vertebrae' point list of a VertebraID run to re-label.")
        points_node = self.run_nodes(run).get(mrml.ROLE_POINTS)
        if points_node is None:
            raise VertebraIDError("This run has no 'Vertebrae' point list; run Detect again.")
        return run, points_node

    # ----------------------------------------------------------------- Re-label

    def relabel(self, run_or_node, progress: ProgressCallback | None = None) -> RelabelReport:
        """Re-solve the labels around the user's edits and update the run's "Vertebrae" list.

        The rule: a point the user locked, moved (> 0.5 mm), renamed or added is a hard
        constraint -- its label at its position -- provided its label is a vertebra level;
        such points are kept exactly as they are and locked (so they stay constraints).
        A point added without a label of its own (empty, or the "Vertebrae-7" Markups makes
        up) means "a vertebra here": it keeps its position and gets the level of the best chain
        through it (remembered, so later Re-labels name it again). Points with other labels are
        left untouched and unused. Every other point is replaced by the solver's result. A
        point the user deleted means "no vertebra here": solved vertebrae within 10 mm of it
        are left out (now and in later Re-labels), unless the user puts a point there again.
        Re-label always uses the exact solver (the paper's Algorithm 1 cannot take fixed
        points). Detect is never affected: it makes a new folder.
        """
        run, points_node = self._points_of(run_or_node)
        edits = mrml.read_point_edits(points_node)
        remembered = np.asarray(json.loads(points_node.GetAttribute(mrml.ATTR_ADDED) or "[]"), float).reshape(-1, 3)

        def near(position, positions, radius):
            return len(positions) > 0 and float(np.min(np.linalg.norm(positions - position, axis=1))) < radius

        constraints: list[Constraint] = []
        kept_as_is: list[mrml.PointState] = []
        ignored: list[str] = []
        anchors: list[np.ndarray] = []
        for state in edits.points:
            if state.is_vertebra_label:
                if state.locked or state.edited:
                    constraints.append(Constraint(state.label, state.position))
                elif near(state.position, remembered, ADDED_POINT_RADIUS_MM):
                    anchors.append(state.position)  # an added point named by an earlier Re-label: named again
            elif state.unnamed and (state.added or state.renamed):
                anchors.append(state.position)  # "a vertebra here": its level is solved
            else:
                kept_as_is.append(state)
                if state.edited or state.locked:
                    ignored.append(state.text.strip() or "(no label)")
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
        settings = prepared.settings.updated(method="exact")
        result, named = review.solve_with_anchors(prepared, settings, constraints, anchors,
                                                  progress=scaled(progress, 0.05, 0.9))

        fixed = {c.label for c in constraints}
        final = [Vertebra(c.label, c.position, 1.0, locked=True) for c in constraints]
        final += [Vertebra(a.label, a.position, a.confidence, extra={"added": True}) for a in named]
        fixed |= {a.label for a in named}
        left_out = []
        rejected_array = np.asarray(rejected, float).reshape(-1, 3)
        for v in result.vertebrae:
            if v.label in fixed:
                continue
            if near(v.position, rejected_array, DELETED_POINT_RADIUS_MM):
                left_out.append(v.label)
                continue
            final.append(Vertebra(v.label, v.position, v.confidence))
        kept_positions = [c.position for c in constraints] + [a.position for a in named]
        if len(rejected_array) and kept_positions:  # a point put back where one was deleted wins
            kept_array = np.array(kept_positions)
            keep = np.min(np.linalg.norm(rejected_array[:, None] - kept_array[None], axis=2), axis=1) >= DELETED_POINT_RADIUS_MM
            rejected_array = rejected_array[keep]

        changed = _count_changed([(s.position, s.label) for s in edits.points if s.is_vertebra_label], final)

        final = sort_by_level(final)
        self._write_points(points_node, final, kept_as_is)
        points_node.SetAttribute(ATTR_REJECTED, json.dumps(rejected_array.tolist()))
        points_node.SetAttribute(mrml.ATTR_ADDED, json.dumps([list(map(float, a.position)) for a in named]))
        regions = self.run_nodes(run).get(mrml.ROLE_REGIONS)
        if regions is not None:
            mrml.update_region_model(regions, final)
        info = self.run_info(run)
        info["relabelled"] = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "constraints": [c.label for c in constraints],
            "added": [a.label for a in named],
            "energy": float(result.energy),
        }
        self.scene.GetSubjectHierarchyNode().SetItemAttribute(run, mrml.ATTR_RUN, json.dumps(info))
        if progress is not None:
            progress(1.0, "Done")
        return RelabelReport(result, constraints, ignored, left_out, changed, final, [a.label for a in named])

    @staticmethod
    def _write_points(node, vertebrae: list[Vertebra], untouched: list) -> None:
        """Rewrite the list: the vertebrae in level order, then the untouched non-vertebra points."""
        import vtk

        was_modifying = node.StartModify()
        mrml.set_vertebrae_points(node, vertebrae)
        for state in untouched:
            index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), state.text)
            node.SetNthControlPointPositionWorld(index, *map(float, state.position))
            node.SetNthControlPointDescription(index, state.description)
            node.SetNthControlPointLocked(index, state.locked)
        node.EndModify(was_modifying)
        mrml.remember_solved(node)

    # ----------------------------------------------------------------- the correction panel

    def vertebra_rows(self, run_or_node) -> list[review.VertebraRow]:
        """The correction table: one row per vertebra point, labels to check first with their reason."""
        _, points_node = self._points_of(run_or_node)
        added = np.asarray(json.loads(points_node.GetAttribute(mrml.ATTR_ADDED) or "[]"), float).reshape(-1, 3)
        rows = []
        for i in range(points_node.GetNumberOfControlPoints()):
            if points_node.GetNthControlPointPositionStatus(i) != points_node.PositionDefined:
                continue
            text = points_node.GetNthControlPointLabel(i)
            label = mrml.normalize_label(text)
            if label not in review.all_levels():
                if mrml.is_unnamed_label(text, points_node):  # added with the toolbar: Re-label will name it
                    position = np.array(points_node.GetNthControlPointPositionWorld(i), float)
                    rows.append(review.VertebraRow(i, points_node.GetNthControlPointID(i), "", None, False, position,
                                                   review.UNNAMED_REASON, True))
                continue
            locked = bool(points_node.GetNthControlPointLocked(i))
            description = points_node.GetNthControlPointDescription(i)
            confidence = None if locked else mrml.parse_confidence(description)
            position = np.array(points_node.GetNthControlPointPositionWorld(i), float)
            is_added = len(added) > 0 and float(np.min(np.linalg.norm(added - position, axis=1))) < ADDED_POINT_RADIUS_MM
            rows.append(review.VertebraRow(i, points_node.GetNthControlPointID(i), label, confidence, locked, position,
                                           review.row_reason(label, confidence, locked, description), is_added))
        return review.order_rows(rows)

    def set_point_label(self, points_node, point_id: str, label: str) -> None:
        """The user picks a label for a point in the table (it then fixes its level at Re-label)."""
        label = mrml.normalize_label(label)
        if label not in review.all_levels():
            raise VertebraIDError(f"'{label}' is not a vertebra label (C1..C7, T1..T13, L1..L6, S1, S2).")
        index = points_node.GetNthControlPointIndexByID(point_id)
        if index < 0:
            raise VertebraIDError("That point is no longer in the list.")
        points_node.SetNthControlPointLabel(index, label)

    def set_point_locked(self, points_node, point_id: str, locked: bool) -> None:
        """The user locks (vouches for) or unlocks a point from the table."""
        index = points_node.GetNthControlPointIndexByID(point_id)
        if index < 0:
            raise VertebraIDError("That point is no longer in the list.")
        points_node.SetNthControlPointLocked(index, bool(locked))

    def shift_labels(self, run_or_node, steps: int, progress: ProgressCallback | None = None) -> RelabelReport:
        """Move every vertebra label `steps` levels (1: one level down the spine, T12 -> L1; -1: up),
        then Re-label around it.

        The usual failure of vertebra labelling is a whole spine named one level off; this is
        its one-click correction. The positions stay; locked points keep their lock (with their
        new label); when none is locked, the most confident point is locked as the anchor, so
        that Re-label keeps the shift and re-solves the rest (and the confidences) around it.
        """
        if steps == 0:
            raise VertebraIDError("Choose a shift of at least one level.")
        run, points_node = self._points_of(run_or_node)
        transitional = self._settings_of(run).transitional
        snapshot = json.loads(points_node.GetAttribute(mrml.ATTR_SOLVED) or "{}")
        plan = []
        for i in range(points_node.GetNumberOfControlPoints()):
            label = mrml.normalize_label(points_node.GetNthControlPointLabel(i))
            if label in review.all_levels():
                plan.append((i, label, review.shift_label(label, steps, transitional)))  # raises before any change
        if not plan:
            raise VertebraIDError("The point list holds no vertebra label to move.")
        before = [(np.array(points_node.GetNthControlPointPositionWorld(i)), old) for i, old, _ in plan]
        was_modifying = points_node.StartModify()
        for i, old, new in plan:
            points_node.SetNthControlPointLabel(i, new)
            entry = snapshot.get(points_node.GetNthControlPointID(i))
            if entry is not None and mrml.normalize_label(entry[0]) == old:
                entry[0] = new  # not a rename by the user: the shift, which the anchor carries
        if not any(points_node.GetNthControlPointLocked(i) for i, _, _ in plan):
            confidences = [mrml.parse_confidence(points_node.GetNthControlPointDescription(i)) for i, _, _ in plan]
            best = max(range(len(plan)), key=lambda k: (confidences[k], -abs(k - (len(plan) - 1) / 2)))
            points_node.SetNthControlPointLocked(plan[best][0], True)
        points_node.SetAttribute(mrml.ATTR_SOLVED, json.dumps(snapshot))
        points_node.EndModify(was_modifying)
        report_ = self.relabel(run, progress)
        report_.shifted = steps
        report_.changed = _count_changed(before, report_.vertebrae)
        return report_

    def check_summary(self, run_or_node) -> str:
        """'Check T12 (lowest rib?), L5 (sacrum?).' or '' when every label is confident."""
        rows = [r for r in self.vertebra_rows(run_or_node) if r.needs_check and r.label]
        if not rows:
            return ""
        return "Check " + ", ".join(f"{r.label} ({r.reason})" for r in rows) + "."

    # ----------------------------------------------------------------- views

    def show_level_map(self, run: int, label: str):
        """Show one level's own activation map: a '<input>: Activation map L1' volume in the run's details
        (created on demand, then updated)."""
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
        name = f"{self.run_prefix(run)}: Activation map {label}"
        if node is None:
            with mrml.NodeTracker(self.scene):
                node = mrml.add_scalar_volume(
                    self.scene, one, name, mrml.activation_color_node(self.scene).GetID(), (peak, peak / 2), 0.05 * peak
                )
                details = mrml.folder_of_node(self.scene, heatmaps_node) or run
                mrml.place_in_folder(self.scene, node, details, mrml.ROLE_LEVEL_MAP)
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
        """The whole scene as a Slicer scene bundle (.mrb); the scene then belongs to the bundle's folder."""
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
