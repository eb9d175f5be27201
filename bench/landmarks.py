"""How well the ribs and the sacrum are read from the CT (engine/landmarks.py), vertebra by vertebra.

    python bench/landmarks.py [--phantoms 20] [--renders 6] [--out bench/results/landmarks.md]

The landmarks are read along a centreline through the true vertebra centres (so that what is
measured is the rib and sacrum reading, not the network's centreline), on every labelled real
CT of `bench/realct.py` (bone-only skeletons included: no network is needed here), and
optionally on validation phantoms (seeds from 1,000,000, never the test seeds) and on CTs rendered
from the real label maps (the validation render stream of `vertebraid tune-engine`). For each
group of levels: how many vertebrae had the evidence in view, and the share where the reading
says "rib" (or "sacrum", P > 0.5). The engine's observation model (RIB_PROBABILITY,
SACRUM_PROBABILITY in landmarks.py) should match these shares.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from realct import real_cases
from VertebraIDLib.engine.anatomy import CHANNEL_OF
from VertebraIDLib.engine.centerline import centerline_through
from VertebraIDLib.engine.landmarks import spine_landmarks
from VertebraIDLib.engine.vertebrae import Vertebra
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.io.files import write_text_atomic
from VertebraIDLib.io.images import read_image

#: Levels grouped by what the rib reading is expected to do there.
GROUPS = {
    "C1-C6": [f"C{i}" for i in range(1, 7)], "C7": ["C7"], "T1": ["T1"], "T2": ["T2"],
    "T3-T10": [f"T{i}" for i in range(3, 11)], "T11": ["T11"], "T12": ["T12"], "L1": ["L1"],
    "L2-L5": [f"L{i}" for i in range(2, 6)], "S1": ["S1"], "S2": ["S2"],
}
LABELMAPS = ("ts_s0327.nii.gz", "ts_s0328.nii.gz")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def readings(ct: Volume, truth: list[Vertebra]) -> list[tuple[str, float, float, float, float]]:
    """(level, P(rib), rib in view, P(sacrum), sacrum in view) at each true vertebra."""
    truth = sorted(truth, key=lambda v: CHANNEL_OF.get(v.label, 99))
    line = centerline_through(truth, 2.0)
    marks = spine_landmarks(ct, line)
    at = np.clip(np.round(line.project(np.array([v.position for v in truth]))).astype(int), 0, len(line) - 1)
    return [(v.label, float(marks.rib[k]), float(marks.rib_visible[k]), float(marks.sacrum[k]),
             float(marks.sacrum_visible[k])) for v, k in zip(truth, at)]


def real_readings(log=print) -> dict[str, list]:
    out = {}
    for case in real_cases():
        t0 = time.perf_counter()
        out[case.name] = readings(read_image(case.image_path), case.truth)
        log(f"{case.name}: {time.perf_counter() - t0:.1f} s")
    return out


def phantom_readings(count: int, log=print) -> list:
    from VertebraIDLib.synthetic.phantom import generate_phantom

    rows = []
    for seed in range(1_000_000, 1_000_000 + count):
        phantom = generate_phantom(seed, spacing=2.5)
        if len(phantom.truth) >= 3:
            rows += readings(phantom.ct, phantom.truth)
        log(f"phantom {seed}")
    return rows


def render_readings(count: int, log=print) -> list:
    from VertebraIDLib.synthetic.labelmap_ct import read_labelmap, vertebra_centres

    rows = []
    for name in LABELMAPS:
        labelmap = read_labelmap(SHARED / "labelmaps" / name)
        for seed in range(1_000_000, 1_000_000 + count):
            rng = np.random.default_rng([seed, 9901])  # the validation render stream of tune-engine
            hu, affine, labels, _ = labelmap.render(rng, spacing_mm=float(rng.choice([1.5, 2.0, 3.0])))
            centres = vertebra_centres(labels, affine, labelmap.prepared.names)
            truth = [Vertebra(level, p) for level, p in centres.items() if level in CHANNEL_OF]
            if len(truth) >= 3:
                rows += readings(Volume(hu, affine), truth)
            log(f"{name} render {seed}")
    return rows


def group_table(rows: list) -> list[str]:
    """Markdown rows: per level group, vertebrae with ribs / sacrum in view and the share read as present."""
    by_group = defaultdict(lambda: {"rib": [], "sacrum": []})
    for label, rib, rib_seen, sacrum, sacrum_seen in rows:
        group = next((g for g, levels in GROUPS.items() if label in levels), None)
        if group is None:
            continue
        if rib_seen > 0.5:
            by_group[group]["rib"].append(rib > 0.5)
        if sacrum_seen > 0.5:
            by_group[group]["sacrum"].append(sacrum > 0.5)

    def cell(values):
        return f"{100 * np.mean(values):.0f} % of {len(values)}" if values else "-"

    lines = ["| levels | read as rib-bearing | read as sacrum |", "|---|---|---|"]
    for group in GROUPS:
        if group in by_group:
            lines.append(f"| {group} | {cell(by_group[group]['rib'])} | {cell(by_group[group]['sacrum'])} |")
    return lines


def report(real: dict, phantoms: list, renders: list) -> str:
    lines = ["## Ribs and sacrum read from the CT, at the true vertebrae", "",
             "Along a centreline through the true centres. Per vertebra: P(rib) / P(sacrum); '·' where that "
             "evidence was out of view (P 0.5).", "", "| scan | readings |", "|---|---|"]
    for name, rows in real.items():
        cells = " ".join(f"{label} {rib:.2f}/{sacrum:.2f}" if rib_seen > 0.5 or sacrum_seen > 0.5 else f"{label} ·"
                         for label, rib, rib_seen, sacrum, sacrum_seen in rows)
        lines.append(f"| {name} | {cells} |")
    lines += ["", f"### Real scans ({len(real)}), in view", ""] + group_table([r for rows in real.values() for r in rows])
    if phantoms:
        lines += ["", "### Validation phantoms (seeds from 1,000,000)", ""] + group_table(phantoms)
    if renders:
        lines += ["", "### CTs rendered from the real label maps (validation stream)", ""] + group_table(renders)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=0, help="validation phantoms to add (default: none)")
    parser.add_argument("--renders", type=int, default=0, help="renders per real label map to add (default: none)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.phantoms < 0 or args.renders < 0:
        parser.error("--phantoms and --renders must be 0 or more")
    text = report(real_readings(), phantom_readings(args.phantoms), render_readings(args.renders))
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
