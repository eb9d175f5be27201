"""`label-points` on the VID training split (Bürgin et al., MICCAI 2023): real detections, bodies only.

    python bench/vid_label_points.py [--root ../shared/data/vid/train] [--workers 2] [--limit N] [--out results.md]

Each scan's 'body' keypoints (with their C/T/L segment scores) are labelled by the same
pipeline as activation maps (rendered into 26 maps, straightened, exact optimiser,
transitional L6 allowed since the split's ground truth has L6). Reported with the SpineWeb
identification rate (same label, <= 20 mm, mutually closest), per region and per half of the
split: half A (first half of the file names) is where the level spacing table in anatomy.py
was measured, half B was never looked at for tuning. Also: the ground-truth vertebrae with no
detection within 20 mm (no labelling can identify them), and the per-scan all-correct rate.
Anchor: the GNN of Bürgin et al. reports 97.2 % on its validation split with bodies and pedicles.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from VertebraIDLib.engine.points import label_points
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.evaluation.metrics import evaluate_case, format_table, summarize
from VertebraIDLib.io.files import write_text_atomic
from VertebraIDLib.io.formats import read_vid_detections, read_vid_ground_truth

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vid" / "train"


def run_case(pred_path: str):
    pred_path = Path(pred_path)
    positions, probabilities = read_vid_detections(pred_path)
    truth = read_vid_ground_truth(pred_path.parent.parent / "gt" / pred_path.name)
    t0 = time.perf_counter()
    labelling = label_points(positions, probabilities, EngineSettings(transitional=True))
    seconds = time.perf_counter() - t0
    evaluation = evaluate_case(labelling.vertebrae, truth, name=pred_path.stem)
    undetected = sum(
        1 for g in truth if len(positions) == 0 or np.linalg.norm(positions - g.position, axis=1).min() > 20.0
    )
    return evaluation, undetected, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N scans (a quick look)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    files = sorted((args.root / "pred").glob("*.json"))
    if not files:
        parser.error(f"no VID predictions under {args.root / 'pred'}")
    half = len(files) // 2
    if args.limit:
        files = files[: args.limit]
    t0 = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        results = pool.map(run_case, [str(f) for f in files], chunksize=8)
    wall = time.perf_counter() - t0

    lines = [f"VID training split: {len(files)} scans, bodies only, `label-points --transitional` (exact optimiser)", ""]
    for name, part in (("all scans", results), ("half A (spacing table measured here)", results[:half]),
                       ("half B (held out)", results[half:])):
        if not part:
            continue
        summary = summarize([r[0] for r in part])
        undetected = sum(r[1] for r in part)
        total_gt = sum(r[0].num_gt for r in part)
        lines += ["```", format_table(summary, title=f"{name}: {len(part)} scans"),
                  f"ground-truth vertebrae with no detection within 20 mm: {undetected} of {total_gt} "
                  f"({100 * undetected / max(total_gt, 1):.1f} %): the ceiling is {100 * (1 - undetected / max(total_gt, 1)):.1f} %",
                  "```", ""]
    seconds = [r[2] for r in results]
    lines.append(f"label-points time per scan: median {np.median(seconds):.2f} s, max {np.max(seconds):.2f} s; "
                 f"wall {wall:.0f} s with {args.workers} workers.")
    report = "\n".join(lines)
    print(report)
    if args.out:
        write_text_atomic(args.out, report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
