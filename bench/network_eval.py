"""A trained model end to end on held-out phantoms, with the engine's ablation.

    python bench/network_eval.py --model M [--phantoms 50] [--seed 2000000] [--out-dir bench/results/network]

Phantoms use seeds far from training (training draws from its phantom_seed upwards, validation
from 1,000,000) and random anatomy, pathology and geometry. For each phantom the network's maps
are prepared once (with the model's level labeller when it has one) and labelled by every
method (base, rect, order, paper, exact), and by exact on the maps alone. Identification:
SpineWeb definition. Real scans: `bench/realct.py`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from VertebraIDLib.engine.pipeline import locate, prepare, solve
from VertebraIDLib.engine.settings import METHODS, EngineSettings
from VertebraIDLib.evaluation.calibration import (
    calibration_summary,
    confidence_outcomes,
    confidence_table,
)
from VertebraIDLib.evaluation.metrics import evaluate_case, summarize
from VertebraIDLib.io.files import write_text_atomic
from VertebraIDLib.networks.bundle import load_model
from VertebraIDLib.networks.predict import predict_evidence
from VertebraIDLib.synthetic.phantom import generate_phantom
from VertebraIDLib.training.validate import (
    level_peak_errors,
    strongest_channel_rates,
    strongest_levels,
)

DEFAULTS = EngineSettings()


def predicted_phantoms(model, n: int, seed: int):
    """(seed, truth, evidence, seconds) for phantoms seed..seed+n-1 (2.5 mm, all else drawn from the seed)."""
    for i in range(n):
        phantom = generate_phantom(seed + i, spacing=2.5)
        t0 = time.perf_counter()
        evidence = predict_evidence(phantom.ct, model, "cpu")
        yield seed + i, phantom.truth, evidence, time.perf_counter() - t0


def maps_only(prepared, settings=None):
    """The exact method on the heatmap network's signals alone (the labeller's set aside)."""
    if prepared.rectified is not None:
        prepared = replace(prepared, rectified=replace(prepared.rectified, level_signals=None))
    return solve(prepared, settings)


def strongest_channel_text(pairs) -> str:
    """Which channel fires on the vertebrae (within 6 mm of each centre), by true region."""
    rates = strongest_channel_rates(pairs)
    by_region = ", ".join(f"{r} {100 * rates[f'channel_region_right_{r}']:.1f} %"
                          for r in "CTLS" if rates[f"channel_region_right_{r}"] is not None)
    level = rates["channel_level_right"]
    level = "-" if level is None else f"{100 * level:.1f} %"
    return (f"Strongest channel within 6 mm of each of the {len(pairs)} vertebrae: its own level {level}; "
            f"a level of its own region: {by_region}.")


def phantom_ablation(model, n: int, seed: int, log) -> str:
    per_method = {m: [] for m in METHODS}
    if model.labeller is not None:
        per_method["exact, maps only"] = []
    engine_default = []
    times, peak_errors, confidence_hits, strongest = [], [], [], []
    for case_seed, truth, evidence, seconds in predicted_phantoms(model, n, seed):
        maps = evidence.heatmaps
        t0 = time.perf_counter()
        prepared = prepare(evidence)
        times.append(seconds + time.perf_counter() - t0)
        peak_errors += level_peak_errors(maps, truth)
        strongest += strongest_levels(maps, truth)
        for method in METHODS:
            result = solve(prepared, prepared.settings.updated(method=method))
            per_method[method].append(evaluate_case(result.vertebrae, truth, name=f"phantom-{case_seed}"))
            if method == "exact":
                confidence_hits += confidence_outcomes(result.vertebrae, per_method[method][-1])
        if model.labeller is not None:
            alone = maps_only(prepared)
            per_method["exact, maps only"].append(evaluate_case(alone.vertebrae, truth, name=f"phantom-{case_seed}"))
        default = locate(replace(evidence, settings={"sigma_mm": model.sigma_mm}))
        engine_default.append(evaluate_case(default.vertebrae, truth, name=f"phantom-{case_seed}"))
        exact = per_method["exact"][-1]
        log(f"phantom {case_seed}: {exact.num_identified}/{exact.num_gt} identified (exact)")
    labeller = " and its level labeller" if model.labeller is not None else ""
    lines = [f"## {n} held-out phantoms (seeds {seed}..{seed + n - 1}), maps predicted by the model{labeller}", ""]
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
    settings = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in model.engine_settings.items() if k != "sigma_mm") or "none"
    default_rate = 100 * summarize(engine_default).regions["all"].id_rate
    lines += ["", f"Optimiser settings from the model's metadata: {settings}; exact with the engine's defaults "
              f"(α {DEFAULTS.evidence_weight:g}, floor {DEFAULTS.evidence_floor:g}, centreline threshold "
              f"{DEFAULTS.centreline_threshold:g}) instead: {default_rate:.1f} %."]
    within = 100 * float(np.mean(np.asarray(peak_errors) <= 10.0)) if peak_errors else float("nan")
    lines += ["", f"The network alone: a level's map peaks within 10 mm of its vertebra for {within:.1f} % of the "
              f"{len(peak_errors)} vertebrae (median distance {np.median(peak_errors):.0f} mm).",
              "", strongest_channel_text(strongest),
              "", confidence_table(confidence_hits),
              "", f"Calibration (exact): {calibration_summary(confidence_hits)}",
              "", f"network + preparation per phantom: median {np.median(times):.1f} s", ""]
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
    report = phantom_ablation(model, args.phantoms, args.seed, print)
    print(report)
    write_text_atomic(args.out_dir / "network_eval.md", report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
