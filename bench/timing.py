"""Time of the engine (centreline, rectification + signals, exact optimiser, confidences) on one core.

    python bench/timing.py [--repeats 3]

Maps come from the simulator ("typical" difficulty, oblique grids). Prints how the time grows
with the spine's length (levels in view) and with the grid spacing. Targets (issue #2):
everything <= 1 s and the exact optimiser <= 20 ms on a full-spine 26-channel map at 2 mm.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, as the target says

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from VertebraIDLib.engine.pipeline import prepare, solve
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.synthetic.simulate import simulate_case

CASES = [
    ("lumbar L1-S2", ("L1", "S2"), 2.0),
    ("thoracolumbar T1-S2", ("T1", "S2"), 2.0),
    ("whole spine C1-S2", ("C1", "S2"), 2.0),
    ("whole spine C1-S2", ("C1", "S2"), 1.5),
    ("whole spine C1-S2", ("C1", "S2"), 3.0),
    ("whole spine C1-S2", ("C1", "S2"), 4.0),
]


def time_case(levels, spacing, repeats):
    case = simulate_case(7, spacing_mm=spacing, difficulty="typical", levels=levels)
    rows = []
    for _ in range(repeats):
        prepared = prepare(case.heatmaps, EngineSettings())
        t0 = time.perf_counter()
        result = solve(prepared, EngineSettings())
        solve_s = time.perf_counter() - t0
        rows.append({**prepared.timings_s, **result.timings_s, "solve_total": solve_s})
    med = {k: float(np.median([r.get(k, 0.0) for r in rows])) for k in rows[0]}
    rect = prepared.rectified
    med["total"] = med["combine"] + med["centerline"] + med["rectify_and_signals"] + med["solve_total"]
    return case, rect, med


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("| field of view | spacing (mm) | grid | samples along spine | Ĝ | centreline | rectify + signals | exact optimiser | confidences | to 3-D | total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, levels, spacing in CASES:
        case, rect, t = time_case(levels, spacing, args.repeats)
        shape = "x".join(str(n) for n in case.heatmaps.array.shape[:3])
        ms = {k: f"{1000 * v:.0f} ms" for k, v in t.items()}
        print(f"| {name} | {spacing:g} | {shape}x26 | {len(rect.combined_signal)} | {ms['combine']} | {ms['centerline']} | "
              f"{ms['rectify_and_signals']} | {1000 * t['optimize']:.1f} ms | {ms.get('confidence', '-')} | {ms['to_3d']} | {ms['total']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
