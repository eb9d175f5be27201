"""Regenerate the bundled example: simulated activation maps (T6..S2, 3 mm, oblique) and their truth.

    python bench/make_example.py [--out VertebraID/Resources/Examples]

Writes example_heatmaps.nii.gz (26 channels, uint8 with a scale factor) and
example_truth.vertebrae.json (the simulated body centres, RAS). Deterministic: the same files
come out every time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from VertebraIDLib.io.formats import write_vertebrae_json
from VertebraIDLib.io.images import write_scaled_uint8_nifti
from VertebraIDLib.synthetic.simulate import simulate_case

EXAMPLE_SEED = 2021
EXAMPLE_LEVELS = ("T6", "S2")
EXAMPLE_SPACING_MM = 3.0
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "VertebraID" / "Resources" / "Examples"


def make_example(out_dir: Path) -> tuple[Path, Path]:
    case = simulate_case(
        EXAMPLE_SEED, spacing_mm=EXAMPLE_SPACING_MM, difficulty="typical", levels=EXAMPLE_LEVELS,
        oblique=True, max_oblique_deg=15.0,
    )
    maps_path = out_dir / "example_heatmaps.nii.gz"
    truth_path = out_dir / "example_truth.vertebrae.json"
    write_scaled_uint8_nifti(case.heatmaps, maps_path)
    failures = sorted({e["kind"] for e in case.meta["events"]})
    write_vertebrae_json(
        truth_path,
        case.truth,
        description=(
            f"Ground truth of example_heatmaps.nii.gz: simulated heatmap-network output "
            f"(VertebraIDLib.simulate, seed {EXAMPLE_SEED}, difficulty 'typical', levels "
            f"{EXAMPLE_LEVELS[0]}..{EXAMPLE_LEVELS[1]}, {EXAMPLE_SPACING_MM:g} mm, oblique grid "
            f"{case.meta['oblique_deg']:g} degrees); regenerate with bench/make_example.py."
        ),
        simulated_failures=failures,
    )
    return maps_path, truth_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in make_example(args.out):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
