"""Detect away from the GUI thread: the evidence and the engine run in a child Python process.

As SlicerTotalSegmentator does, the long work runs in a separate process (PythonSlicer inside
3D Slicer, this Python elsewhere), so the application stays responsive, the progress streams
back line by line, and Cancel simply ends the process. The MRML scene is not touched until
the child has finished: the Logic then builds the run's nodes from its files
(`VertebraIDLogic.finish_detect`). A cancel or a failure leaves the scene as it was and the
job's temporary folder removed.

Parent side (the Logic, the Widget's timer):

    job = DetectJob.start(ct, source.to_spec(), settings)   # writes the CT, launches the child
    while job.poll(): ...                                     # job.fraction, job.message
    output = job.output()                                     # the engine's Result + straightened CT
    job.cancel()                                              # any time: kills the child

Child side (`python background.py FOLDER`): reads the job, runs the source's `detect` and
the straightening, writes `result.json` and `arrays.npz` into FOLDER and prints one JSON line
per progress step (marked with `MARK`, so that other output from libraries is only logged).
Files, not pickles: the parent reads plain JSON and numpy arrays (`allow_pickle=False`).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the parent: make VertebraIDLib importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from VertebraIDLib.engine import pipeline
from VertebraIDLib.engine.centerline import centerline_of_samples
from VertebraIDLib.engine.evidence import Evidence
from VertebraIDLib.engine.landmarks import Landmarks
from VertebraIDLib.engine.progress import Cancelled
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.errors import VertebraIDError

#: Prefix of the child's protocol lines on stdout (anything else is library chatter, kept in the log).
MARK = "@VertebraID "
JOB_FILE = "job.json"
CT_FILE = "ct.npy"
RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"
#: How long a cancelled child may take to end before it is killed (seconds).
TERMINATE_GRACE_S = 3.0


# =========================================================================== parent


@dataclass
class DetectOutput:
    """What a finished job brings back: the engine's result (intermediates rebuilt) and the straightened CT."""

    result: pipeline.Result
    straight_ct: Volume
    timings_s: dict = field(default_factory=dict)


def python_executable() -> str:
    """The Python that runs the child: PythonSlicer inside 3D Slicer, this interpreter elsewhere."""
    try:
        import slicer

        in_app = getattr(slicer, "app", None) is not None
    except ImportError:
        in_app = False
    if in_app:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def _launch(args: list[str]):
    """Start the child with its stdout (and stderr) piped, as text; console hidden on Windows."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:  # the application's launcher environment
            return slicer.util.launchConsoleProcess(args)
    except ImportError:
        pass
    kwargs = {}
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags = subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0
        kwargs["startupinfo"] = info
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            **kwargs)


class DetectJob:
    """One Detect running in a child process: poll it, read its output, or cancel it."""

    def __init__(self, folder: Path, process, description: str = ""):
        self.folder = Path(folder)
        self.process = process
        self.description = description
        self.fraction = 0.0
        self.message = "Starting"
        self.state = "running"  # running, done, failed, cancelled
        self.error: str | None = None
        self.log: list[str] = []  # the child's other output (warnings, a traceback)
        self._reports: list[tuple[float, str]] = [(self.fraction, self.message)]  # not yet passed on by wait()
        self.started = time.perf_counter()
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # ----------------------------------------------------------------- start

    @classmethod
    def start(cls, ct: Volume, source_spec: dict, settings: EngineSettings, python: str | None = None,
              input_name: str = "the volume") -> "DetectJob":
        """Write the CT and the job into a new temporary folder and launch the child."""
        folder = Path(tempfile.mkdtemp(prefix="VertebraID-"))
        try:
            np.save(folder / CT_FILE, np.ascontiguousarray(ct.array), allow_pickle=False)
            job = {"affine": np.asarray(ct.affine, float).tolist(), "source": source_spec,
                   "settings": settings.to_dict(), "input_name": input_name}
            (folder / JOB_FILE).write_text(json.dumps(job))
            process = _launch([python or python_executable(), str(Path(__file__).resolve()), str(folder)])
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise VertebraIDError(f"Cannot start the background process ({exc.strerror or exc}).") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, process, source_spec.get("description") or source_spec.get("kind", ""))

    # ----------------------------------------------------------------- progress

    def _read(self) -> None:
        stream = self.process.stdout
        try:
            for line in iter(stream.readline, ""):
                self._lines.put(line.rstrip("\n"))
        except (OSError, ValueError, UnicodeDecodeError):  # closed by a cancel, or undecodable output
            pass
        finally:
            self._lines.put(None)

    def poll(self) -> bool:
        """Take in what the child has said; True while it is still running."""
        if self.state != "running":
            return False
        finished_reading = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                finished_reading = True
                break
            self._take(line)
        if finished_reading or self.process.poll() is not None:
            if not finished_reading:  # the process ended: read what is left of its output
                self._reader.join(timeout=5.0)
                while not self._lines.empty():
                    line = self._lines.get_nowait()
                    if line is not None:
                        self._take(line)
            code = self.process.wait()
            if self.state == "running":
                self._finish(code)
        return self.state == "running"

    def _take(self, line: str) -> None:
        if not line.startswith(MARK):
            if line.strip():
                self.log.append(line)
            return
        try:
            message = json.loads(line[len(MARK):])
        except json.JSONDecodeError:
            self.log.append(line)
            return
        if "progress" in message:
            self.fraction = float(message["progress"])
            self.message = str(message.get("message", ""))
            self._reports.append((self.fraction, self.message))
        if "error" in message:
            self.error = str(message["error"])

    def _finish(self, code: int) -> None:
        if code == 0 and (self.folder / RESULT_FILE).is_file() and (self.folder / ARRAYS_FILE).is_file():
            self.state = "done"
            self.fraction, self.message = 1.0, "Done"
            return
        self.state = "failed"
        if not self.error:
            self.error = (f"The background process stopped unexpectedly (exit status {code}); "
                          "see the Python console for its output.")
        self.cleanup()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    # ----------------------------------------------------------------- end

    def cancel(self) -> None:
        """Stop the child (terminate, then kill) and remove the job's folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.state == "running":
            self.state = "cancelled"
        self._reader.join(timeout=5.0)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the job's temporary folder (its files are read by then)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self, progress=None, interval_s: float = 0.05) -> "DetectJob":
        """Block until the child ends, passing each of its progress reports on, in order, however fast
        it ran; `progress` returning True cancels (also after the child has finished: nothing is read).

        Raises `Cancelled` after a cancel and `VertebraIDError` (the child's sentence) after a failure.
        """
        while True:
            running = self.poll()
            while progress is not None and self._reports and self.state in ("running", "done"):
                fraction, message = self._reports.pop(0)
                if progress(fraction, message):
                    self.cancel()
                    self.state = "cancelled"
                    raise Cancelled(message)
            if not running:
                break
            time.sleep(interval_s)
        if self.state == "cancelled":
            raise Cancelled(self.message)
        if self.state == "failed":
            raise VertebraIDError(self.error)
        return self

    def output(self) -> DetectOutput:
        """The finished job's result, read from its files (then the folder is removed)."""
        if self.state == "running":
            self.wait()
        if self.state == "failed":
            raise VertebraIDError(self.error)
        if self.state == "cancelled":
            raise Cancelled(self.message)
        try:
            return read_output(self.folder)
        finally:
            self.cleanup()


# =========================================================================== files


def _vertebra_dict(v: Vertebra) -> dict:
    return {"label": v.label, "position": [float(x) for x in v.position], "confidence": float(v.confidence),
            "locked": bool(v.locked)}


def write_output(folder: Path, result: pipeline.Result, straight_ct: Volume, timings: dict,
                 combined_is_sum: bool = True) -> None:
    """The child's side: the result as JSON and arrays (written under temporary names, then renamed).

    `combined_is_sum`: Ĝ is the maps' sum (a network's), not a map of its own (rendered points)."""
    prepared, rect, line = result.prepared, result.rectified, result.centerline
    info = {
        "vertebrae": [_vertebra_dict(v) for v in result.vertebrae],
        "method": result.method,
        "energy": float(result.energy),
        "description": prepared.description,
        "settings": prepared.settings.to_dict(),
        "timings_s": {k: float(v) for k, v in timings.items()},  # the child's steps (detect, straighten_ct)
        "engine_timings_s": {k: float(v) for k, v in result.timings_s.items()},
        "combined_is_sum": bool(combined_is_sum),
        "centerline": None if line is None else {
            "points": np.asarray(line.points, float).tolist(), "supported": np.asarray(line.supported, bool).tolist(),
            "step_mm": float(line.step_mm)},
        "level_signals": None if rect is None or rect.level_signals is None else np.asarray(rect.level_signals).tolist(),
        "landmarks": None if rect is None or rect.landmarks is None else rect.landmarks.to_dict(),
    }
    arrays = {
        "heatmaps": np.asarray(prepared.heatmaps.array, np.float16),
        "heatmaps_affine": np.asarray(prepared.heatmaps.affine, float),
        "combined": np.asarray(prepared.combined.array, np.float32),
        "combined_affine": np.asarray(prepared.combined.affine, float),
        "straight_ct": np.asarray(straight_ct.array, np.float32),
        "straight_ct_affine": np.asarray(straight_ct.affine, float),
    }
    tmp = folder / ("." + ARRAYS_FILE)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, folder / ARRAYS_FILE)
    tmp = folder / ("." + RESULT_FILE)
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / RESULT_FILE)


def read_output(folder: Path) -> DetectOutput:
    """The parent's side: the child's files back into a `pipeline.Result` whose intermediates are rebuilt.

    The vertebrae, energy and settings are the child's; Ĝ's centreline, the straightened maps
    and the 1-D signals are rebuilt from the maps, the stored centreline, level signals and
    landmarks (as Re-label does for a reloaded scene; the engine's part takes a fraction of a second).
    """
    folder = Path(folder)
    info = json.loads((folder / RESULT_FILE).read_text())
    with np.load(folder / ARRAYS_FILE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    heatmaps = Volume(arrays["heatmaps"], arrays["heatmaps_affine"])
    combined = Volume(arrays["combined"], arrays["combined_affine"])
    settings = EngineSettings.from_dict(info["settings"])
    vertebrae = [Vertebra(v["label"], v["position"], v["confidence"], locked=v.get("locked", False))
                 for v in info["vertebrae"]]
    line = info.get("centerline")
    if line is None:
        prepared = pipeline.Prepared(heatmaps, combined, None, None, settings, {}, info["description"])
    else:
        stored_levels = info.get("level_signals")
        levels = None if stored_levels is None else np.asarray(stored_levels, float)
        marks = Landmarks.from_dict(info["landmarks"]) if info.get("landmarks") else None
        centerline = centerline_of_samples(line["points"], line["step_mm"], line["supported"])
        evidence = Evidence(heatmaps, None if info.get("combined_is_sum", True) else combined, info["description"],
                            level_evidence=None if levels is None else (lambda _line: levels),
                            anatomy=None if marks is None else (lambda _line: marks), centerline=centerline)
        prepared = pipeline.prepare(evidence, settings)
        prepared.combined = combined  # the child's Ĝ (the sum of float32 maps), not that of the float16 copies
    result = pipeline.Result(vertebrae, info["method"], float(info["energy"]), prepared,
                             dict(info.get("engine_timings_s", {})))
    straight_ct = Volume(arrays["straight_ct"], arrays["straight_ct_affine"])
    return DetectOutput(result, straight_ct, dict(info["timings_s"]))


# =========================================================================== child


def _say(**message) -> None:
    print(MARK + json.dumps(message), flush=True)


def run_job(folder: Path) -> int:
    """The child's work: the source's detect, the straightened CT, the files. Returns the exit status."""
    from VertebraIDLib.slicer.sources import source_from_spec

    folder = Path(folder)
    try:
        job = json.loads((folder / JOB_FILE).read_text())
        ct = Volume(np.load(folder / CT_FILE, allow_pickle=False).astype(np.float32, copy=False), job["affine"])
        settings = EngineSettings.from_dict(job["settings"])
        source = source_from_spec(job["source"])

        def progress(fraction, message):
            _say(progress=round(0.92 * float(fraction), 4), message=message)
            return False

        _say(progress=0.0, message=f"Finding the vertebrae ({source.description})")
        t0 = time.perf_counter()
        result = source.detect(ct, settings, progress)
        timings = {"detect": time.perf_counter() - t0}
        if result.prepared.centerline is None or not result.vertebrae:
            raise VertebraIDError(f"No spine was found in '{job.get('input_name', 'the volume')}' "
                                  f"({result.prepared.description}); check that the scan shows the spine.")
        _say(progress=0.92, message="Straightening the CT along the centreline")
        t0 = time.perf_counter()
        straight_ct = result.rectified.straighten(ct)
        timings["straighten_ct"] = time.perf_counter() - t0
        _say(progress=0.96, message="Handing the results over")
        write_output(folder, result, straight_ct, timings, getattr(source, "combined_is_sum", True))
        _say(progress=1.0, message="Done")
        return 0
    except VertebraIDError as exc:
        _say(error=str(exc))
        return 2
    except MemoryError:
        _say(error="The computer ran out of memory while finding the vertebrae; close other programs or "
                   "use a smaller scan.")
        return 3
    except Exception as exc:  # a bug: its traceback goes to the log, the user gets one sentence
        traceback.print_exc(file=sys.stdout)
        _say(error=f"Finding the vertebrae failed ({type(exc).__name__}: {exc}); "
                   "the Python console shows the details.")
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: background.py JOB_FOLDER", file=sys.stderr)
        return 2
    return run_job(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
