"""A trained model end to end: held-out phantoms (with the engine's ablation) and the real scans.

    python bench/network_eval.py --model M [--phantoms 50] [--seed 2000000] [--out-dir bench/results/network]

Phantoms use seeds far from training (training draws from its phantom_seed upwards, validation
from 1,000,000) and random anatomy, pathology and geometry. For each phantom the network's maps
are prepared once and labelled by every method (base, rect, order, paper, exact). Then every
case of ../shared/data/realct that has labels is run through `detect`'s path, scored, and a QC
picture is written. Identification: SpineWeb definition.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from VertebraIDLib.datasets import iter_cases
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.fileio import write_text_atomic
from VertebraIDLib.inference import load_model, predict_heatmaps
from VertebraIDLib.metrics import evaluate_case, summarize
from VertebraIDLib.phantom import generate_phantom
from VertebraIDLib.pipeline import METHODS, LocateOptions, prepare, solve
from VertebraIDLib.qc import result_figure, save_figure
from VertebraIDLib.training import level_peak_errors

REALCT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realct"


def phantom_ablation(model, n: int, seed: int, log) -> str:
    per_method = {m: [] for m in METHODS}
    times, peak_errors = [], []
    for i in range(n):
        phantom = generate_phantom(seed + i, spacing=2.5)
        t0 = time.perf_counter()
        maps = predict_heatmaps(phantom.ct, model, "cpu")
        prepared = prepare(maps, LocateOptions(sigma_mm=model.sigma_mm))
        times.append(time.perf_counter() - t0)
        peak_errors += level_peak_errors(maps, phantom.truth)
        for method in METHODS:
            result = solve(prepared, LocateOptions(method=method, sigma_mm=model.sigma_mm))
            per_method[method].append(evaluate_case(result.vertebrae, phantom.truth, name=f"phantom-{seed + i}"))
        exact = per_method["exact"][-1]
        log(f"phantom {seed + i}: {exact.num_identified}/{exact.num_gt} identified (exact)")
    lines = [f"## {n} held-out phantoms (seeds {seed}..{seed + n - 1}), maps predicted by the model", ""]
    lines.append("| method | C | T | L | S | all | error (mm) | scans all correct |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for method, cases in per_method.items():
        summary = summarize(cases)

        def rate(name):
            r = summary.regions.get(name)
            return "-" if r is None or not r.num_gt else f"{100 * r.id_rate:.1f}"

        a = summary.regions["all"]
        err = "-" if a.error_mean_mm is None else f"{a.error_mean_mm:.2f} ± {a.error_std_mm:.2f}"
        lines.append(f"| {method} | {rate('C')} | {rate('T')} | {rate('L')} | {rate('S')} | {rate('all')} | {err} | "
                     f"{100 * summary.all_correct_rate:.1f} % |")
    within = 100 * float(np.mean(np.asarray(peak_errors) <= 10.0)) if peak_errors else float("nan")
    lines += ["", f"The network alone: a level's map peaks within 10 mm of its vertebra for {within:.1f} % of the "
              f"{len(peak_errors)} vertebrae (median distance {np.median(peak_errors):.0f} mm).",
              "", f"network + preparation per phantom: median {np.median(times):.1f} s", ""]
    return "\n".join(lines)


def real_scans(model, out_dir: Path, log) -> str:
    lines = ["## Real scans with labels (../shared/data/realct)", "", "```"]
    for case in iter_cases(REALCT):
        if case.image is None or not case.truth:
            continue
        try:
            maps = predict_heatmaps(case.image, model, "cpu")
            prepared = prepare(maps, LocateOptions(sigma_mm=model.sigma_mm))
            result = solve(prepared, LocateOptions(sigma_mm=model.sigma_mm))
        except VertebraIDError as exc:
            lines.append(f"{case.name}: {exc}")
            continue
        evaluation = evaluate_case(result.vertebrae, case.truth, name=case.name)
        save_figure(result_figure(result, case.image, title=case.name), out_dir / f"{case.name}_qc.png")
        found = " ".join(v.label for v in result.vertebrae) or "none"
        lines.append(f"{case.name}: {evaluation.num_identified}/{evaluation.num_gt} identified "
                     f"(truth {case.truth[0].label}..{case.truth[-1].label}); predicted: {found}")
        log(lines[-1])
    lines.append("```")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--phantoms", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2_000_000)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/network"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, "cpu")
    report = phantom_ablation(model, args.phantoms, args.seed, print) + "\n" + real_scans(model, args.out_dir, print)
    print(report)
    write_text_atomic(args.out_dir / "network_eval.md", report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
