"""`vertebraid detect CT... -o DIR`: the main job, CT -> network -> pipeline -> labelled vertebrae.

Inputs: NIfTI, NRRD/MetaImage files or DICOM series folders; one, many, or a folder holding
them (searched recursively). For each case, into DIR:
  <case>.vertebrae.json   the engine's result (RAS mm), written last: it marks the case done
  <case>.mrk.json         Slicer markups point list
  <case>_ctd.json         VerSe centroids (voxel coordinates of the input CT)
  <case>_qc.png           Ĝ with centreline and labels, straightened spine, 1-D signals
  <case>_heatmaps.nii.gz  the 26 maps as scaled uint8 (--save-heatmaps)
Cases whose .vertebrae.json exists are skipped (--overwrite redoes them). Every file is
written atomically. With several inputs a failing case is reported and the others go on;
the exit code is then 2.

--fixed FILE (one CT): the headless Re-label. Every labelled point in FILE (Slicer markups,
vertebrae JSON/CSV or VerSe centroids) is a correction the user vouches for: it keeps its label
and position, and the rest of the spine is re-solved around it (exact optimiser).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import VertebraIDError
from ..vertebrae import CHECK_BELOW_CONFIDENCE
from ._common import add_locate_options, locate_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="find and label the vertebrae in CT scans with the network (the main job)",
        description="Run the heatmap network on each CT (NIfTI, NRRD or a DICOM series folder; files, "
        "folders of them), then the pipeline, and write <case>.vertebrae.json, .mrk.json, _ctd.json (VerSe) "
        "and a QC picture into the output folder. Cases already done are skipped.",
    )
    parser.add_argument("inputs", nargs="+", metavar="CT", help="CT file, DICOM series folder, or a folder of them")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--model", help="model file (.safetensors with its .json); default: the bundled model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the network runs")
    add_locate_options(parser)
    parser.add_argument("--save-heatmaps", action="store_true", help="also write the 26 maps (<case>_heatmaps.nii.gz)")
    parser.add_argument("--no-picture", action="store_true", help="skip the QC picture")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    parser.add_argument("--fixed", metavar="FILE",
                        help="one CT only: labelled points (markups, vertebrae JSON/CSV, VerSe centroids) to keep as "
                        "they are; the rest is re-solved around them, like Re-label in Slicer")
    parser.set_defaults(func=run)


# DICOM folders named like this say nothing about the case: theirs is the parent folder's name.
GENERIC_FOLDER_NAMES = {"dicom", "ct", "series", "image", "images", "img", "scan", "data"}


def _case_name(path: Path) -> str:
    from ..datasets import case_stem

    if path.is_dir():
        parent = path.resolve().parent.name
        generic = path.name.lower() in GENERIC_FOLDER_NAMES or path.name.isdigit()
        return parent if generic and parent else path.name
    return case_stem(path) or path.parent.name


def find_inputs(paths) -> list[tuple[str, Path]]:
    """(case name, path) of every CT under the inputs; names are unique."""
    from ..datasets import is_dicom_folder, is_image_file

    found: list[Path] = []

    def walk(p: Path, top: bool):
        if p.is_file():
            if top or is_image_file(p):
                found.append(p)
            return
        if is_dicom_folder(p):
            found.append(p)
            return
        for child in sorted(p.iterdir()):
            if not child.name.startswith("."):
                walk(child, False)

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise VertebraIDError(f"Cannot read '{p}': no such file or folder.")
        before = len(found)
        walk(p, True)
        if len(found) == before:
            raise VertebraIDError(f"Found no CT (NIfTI, NRRD or DICOM series) in '{p}'.")
    out, seen = [], {}
    for p in dict.fromkeys(found):
        name = _case_name(p)
        if name in seen:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 1
        out.append((name, p))
    return out


def output_paths(out_dir: Path, case: str) -> dict[str, Path]:
    return {
        "vertebrae": out_dir / f"{case}.vertebrae.json",
        "markups": out_dir / f"{case}.mrk.json",
        "ctd": out_dir / f"{case}_ctd.json",
        "picture": out_dir / f"{case}_qc.png",
        "heatmaps": out_dir / f"{case}_heatmaps.nii.gz",
    }


def read_fixed_points(path: Path, ct) -> list:
    """The user's corrections as constraints: every labelled point of the file, in RAS."""
    from ..formats import read_vertebrae_any
    from ..pipeline import Constraint

    points = read_vertebrae_any(path, reference=ct)
    if not points:
        raise VertebraIDError(f"The fixed points file '{path}' holds no labelled point.")
    return [Constraint(v.label, v.position) for v in points]


def detect_case(ct_path: Path, case: str, model, args, out_dir: Path) -> str:
    from ..formats import write_markups_json, write_verse_ctd, write_vertebrae_json
    from ..inference import predict_evidence
    from ..pipeline import locate
    from ..volume import read_image, write_scaled_uint8_nifti

    paths = output_paths(out_dir, case)
    timings = {}
    t0 = time.perf_counter()
    ct = read_image(ct_path)
    constraints = read_fixed_points(Path(args.fixed), ct) if args.fixed else []
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    heatmaps, level_evidence = predict_evidence(ct, model, args.device)
    timings["network"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    options = locate_options(args, **model.locate_settings)
    result = locate(heatmaps, options, constraints, level_evidence=level_evidence)
    timings["pipeline"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a case that fails early leaves no folder
    if args.save_heatmaps:
        write_scaled_uint8_nifti(heatmaps, paths["heatmaps"])
    write_markups_json(paths["markups"], result.vertebrae)
    write_verse_ctd(paths["ctd"], result.vertebrae, ct)
    if not args.no_picture:
        from ..qc import result_figure, save_figure

        t0 = time.perf_counter()
        save_figure(result_figure(result, ct, title=case), paths["picture"])
        timings["picture"] = time.perf_counter() - t0
    write_vertebrae_json(
        paths["vertebrae"], result.vertebrae, "RAS",
        case=case, image=str(ct_path), model=str(model.path.name if model.path else ""),
        model_sha256=model.metadata.get("weights_sha256"), method=result.method,
        energy=None if result.energy != result.energy else round(float(result.energy), 4),
        spine_found=result.centerline is not None,
        **({"fixed_points": str(args.fixed)} if args.fixed else {}),
        **({"level_labeller": model.metadata["level_labeller"]["weights_file"]} if model.labeller is not None else {}),
        timings_s={k: round(v, 3) for k, v in {**timings, **result.timings_s}.items()},
    )
    labels = " ".join(v.label for v in result.vertebrae) or "none (no spine found)"
    count = len(result.vertebrae)
    fixed = f", {len(constraints)} kept as fixed" if constraints else ""
    to_check = [v.label for v in result.vertebrae if v.needs_check]
    check = f"; check {' '.join(to_check)} (confidence < {CHECK_BELOW_CONFIDENCE:g})" if to_check else ""
    return f"{case}: {count} {'vertebra' if count == 1 else 'vertebrae'} ({labels}){fixed}{check}"


def _check_fixed_run(args, cases, out_dir: Path) -> None:
    """--fixed re-labels one case: refuse what would skip it or write over the user's file."""
    fixed = Path(args.fixed)
    if not fixed.is_file():
        raise VertebraIDError(f"Cannot read the fixed points file '{fixed}': no such file.")
    if len(cases) != 1:
        raise VertebraIDError(f"--fixed holds the corrections of one case; give one CT, not {len(cases)}.")
    if args.method != "exact":
        raise VertebraIDError("Fixed points need the exact method (--method exact).")
    paths = output_paths(out_dir, cases[0][0])
    if any(p.resolve() == fixed.resolve() for p in paths.values() if p.exists()):
        raise VertebraIDError(f"The results would overwrite the fixed points file '{fixed}'; "
                              "write them to another folder (-o).")
    if paths["vertebrae"].exists() and not args.overwrite:
        raise VertebraIDError(f"'{paths['vertebrae']}' exists; add --overwrite or choose another -o to re-label.")


def run(args) -> int:
    from ..network import default_model_path, load_model

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise VertebraIDError(f"The output '{out_dir}' is a file; give a folder.")
    cases = find_inputs(args.inputs)
    if args.fixed:
        _check_fixed_run(args, cases, out_dir)
    model_path = Path(args.model) if args.model else default_model_path()
    model = load_model(model_path, args.device)
    if model.metadata.get("status"):  # e.g. a research preview: say so before any label is read
        print(f"model {model_path.name}: {model.metadata['status']}")
    todo = [(n, p) for n, p in cases if args.overwrite or not output_paths(out_dir, n)["vertebrae"].exists()]
    skipped = len(cases) - len(todo)
    if skipped:
        print(f"skipping {skipped} case(s) already done in {out_dir}")
    failed = 0
    for name, path in todo:
        t0 = time.perf_counter()
        try:
            message = detect_case(path, name, model, args, out_dir)
        except VertebraIDError as exc:
            if len(cases) == 1:
                raise
            failed += 1
            print(f"vertebraid detect: error: {name}: {exc}", file=sys.stderr)
            continue
        print(f"{message} [{time.perf_counter() - t0:.1f} s]")
    if failed:
        print(f"vertebraid detect: {failed} of {len(todo)} case(s) failed.", file=sys.stderr)
        return 2
    return 0
