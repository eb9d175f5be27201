"""Real CT: every labelled real scan, detected as `vertebraid detect` does, one row per scan.

    python bench/realct.py [--model M] [--out bench/results/realct.md] [--pictures bench/results/realct]

Scans: every case of ../shared/data/realct with labels of its own (expert VerSe, TotalSegmentator
masks, read centres), and the scans labelled here by reading them (`bench/realct_labels/`, cues
and pictures beside each). Per scan: vertebrae identified (SpineWeb: the same label within 20 mm
and mutually nearest), per region, the chain shift (how many levels the names of the points that
landed on a true vertebra are off: -1 named one level too cranially), mean error of the identified,
and the confidences of the wrong labels. Overall: identification, scans all correct, and
calibration (labels with confidence >= 0.9 and the share right; wrong labels and the share
flagged below 0.5). A QC picture per scan. Scans the product refuses count as nothing identified.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.evaluation.calibration import (
    calibration_summary,
    confidence_outcomes,
    reliability_figure,
)
from VertebraIDLib.evaluation.metrics import (
    evaluate_case,
    name_offsets,
    summarize,
)
from VertebraIDLib.evaluation.qc import result_figure, save_figure
from VertebraIDLib.io.cases import iter_cases
from VertebraIDLib.io.files import write_text_atomic
from VertebraIDLib.io.formats import read_vertebrae_json
from VertebraIDLib.io.images import read_image
from VertebraIDLib.networks.bundle import load_model
from VertebraIDLib.networks.predict import detect

REPO = Path(__file__).resolve().parents[1]
REALCT = REPO.parent / "shared" / "data" / "realct"
LABELS = REPO / "bench" / "realct_labels"
#: scans labelled here (bench/realct_labels/<name>) -> their image in ../shared/data/realct
LABELLED_HERE = {
    "ts_ct244_bone": "ts_ct244_bone/ct.nrrd",
    "taichi_lumbar_mpr_series5": "taichi_lumbar_mpr/series5",
    "taichi_lumbar_mpr_series6": "taichi_lumbar_mpr/series6",
    "tcia_lung_thick": "tcia_lung_thick/dicom",
}


@dataclass
class RealCase:
    name: str
    image_path: Path
    truth: list


def real_cases(root: Path = REALCT, labels: Path = LABELS) -> list[RealCase]:
    """Every real scan with truth: its own labels first, then those read here (a scan without any is left out)."""
    cases = []
    for case in iter_cases(root):
        if case.image is not None and case.truth:
            cases.append(RealCase(case.name, Path(case.paths["image"]), case.truth))
    for name, image in LABELLED_HERE.items():
        truth_file = labels / name / "vertebrae_gt.json"
        if truth_file.is_file() and (root / image).exists():
            truth = read_vertebrae_json(truth_file)
            if truth:
                cases.append(RealCase(name, root / image, truth))
    return cases


def _region_cell(evaluation, region: str) -> str:
    outcomes = [o for o in evaluation.outcomes if o.label[0] == region]
    return f"{sum(o.identified for o in outcomes)}/{len(outcomes)}" if outcomes else "-"


def run(model_path: Path | None, pictures: Path | None, settings: EngineSettings, log=print) -> str:
    model = load_model(model_path, "cpu")
    rows, evaluations, hits, failures = [], [], [], []
    for case in real_cases():
        t0 = time.perf_counter()
        try:
            ct = read_image(case.image_path)
            result = detect(ct, model, settings)
        except VertebraIDError as exc:
            evaluation = evaluate_case([], case.truth, name=case.name)
            evaluations.append(evaluation)
            failures.append(case.name)
            rows.append(f"| {case.name} | {case.truth[0].label}..{case.truth[-1].label} | refused: {exc} | "
                        f"0/{len(case.truth)} | - | - | - | - | - | - | - |")
            log(rows[-1])
            continue
        seconds = time.perf_counter() - t0
        found = result.vertebrae
        evaluation = evaluate_case(found, case.truth, name=case.name)
        evaluations.append(evaluation)
        case_hits = confidence_outcomes(found, evaluation)
        hits += case_hits
        offsets = [o for o in name_offsets(found, case.truth) if o is not None]
        shift = ", ".join(f"{k:+d}:{n}" for k, n in sorted(Counter(offsets).items())) or "-"
        errors = [o.error_mm for o in evaluation.outcomes if o.identified and o.error_mm is not None]
        wrong = [f"{c:.2f}" for c, ok in case_hits if not ok]
        predicted = f"{found[0].label}..{found[-1].label} ({len(found)})" if found else "none"
        error = f"{np.mean(errors):.1f}" if errors else "-"
        regions = " | ".join(_region_cell(evaluation, r) for r in "CTLS")
        rows.append(f"| {case.name} | {case.truth[0].label}..{case.truth[-1].label} | {predicted} | "
                    f"{evaluation.num_identified}/{evaluation.num_gt} | {regions} | {shift} | {error} | "
                    f"{' '.join(wrong) or '-'} | {seconds:.0f} |")
        log(rows[-1])
        if pictures is not None:
            save_figure(result_figure(result, ct, title=case.name), pictures / f"{case.name}_qc.png")

    summary = summarize(evaluations)
    overall = summary.regions["all"]
    if pictures is not None and hits:
        save_figure(reliability_figure(hits, "Real scans: confidence against share right"),
                    pictures / "reliability.png")
    lines = [f"## Real scans ({len(evaluations)}), `vertebraid detect` with {Path(model.path).name}", "",
             "| scan | truth | predicted | identified | C | T | L | S | name off by (levels:vertebrae) | "
             "error (mm) | confidences of wrong labels | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"Identified: **{overall.num_identified} of {overall.num_gt} ({100 * overall.id_rate:.1f} %)**; "
             f"scans all correct: {sum(e.all_correct for e in evaluations)} of {len(evaluations)}"
             + (f"; refused: {', '.join(failures)}" if failures else "") + ".", "",
             f"Calibration: {calibration_summary(hits)}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the bundled model)")
    parser.add_argument("--method", default="exact")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "realct.md")
    parser.add_argument("--pictures", type=Path, default=REPO / "bench" / "results" / "realct")
    args = parser.parse_args(argv)
    args.pictures.mkdir(parents=True, exist_ok=True)
    report = run(args.model, args.pictures, EngineSettings(method=args.method), log=lambda m: print(m, flush=True))
    print(report)
    write_text_atomic(args.out, report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
