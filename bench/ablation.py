"""The paper's Table 2 (ablation) on simulated activation maps, plus the exact optimiser.

    python bench/ablation.py --cases 200 --seed 0 --workers 2 [--out results.md] [--cases-json cases.json]

Each case is a `simulate_case` draw (mixed difficulties, fields of view and orientations). The
maps are prepared once (Ĝ, centreline, rectification, 1-D signals) with the paper's energy as we
read it; then every method (base, rect, order, paper, exact; Wang et al. §4.4: base, base+rect,
base+rect+order, base+rect+optim, and the project's exact solver), with and without the anchor
weights λ, labels them. One more row is the product: exact with the engine's defaults (log-normal
spacing prior, its own threshold and floor), prepared again with those. The exact rows' confidences
are summarised (share right at >= 0.9, wrong labels flagged, expected calibration error) and, with
`--out`, the engine row's reliability diagram is written beside the report. Reported per region C/T/L/S/all: identification rate (SpineWeb definition:
same label, within 20 mm, mutually closest) and localisation error of identified vertebrae,
plus the per-scan all-correct rate. The exact solver must never end with a higher energy
than the paper's hill climbing on the same case: violations are counted, and any violation
(or any case that raised an error) makes the script exit with status 1.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from VertebraIDLib.engine.pipeline import prepare, solve
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.evaluation.calibration import (
    calibration_summary,
    confidence_outcomes,
    expected_calibration_error,
    reliability_figure,
)
from VertebraIDLib.evaluation.metrics import evaluate_case, summarize
from VertebraIDLib.evaluation.qc import save_figure
from VertebraIDLib.io.files import write_json_atomic, write_text_atomic
from VertebraIDLib.synthetic.simulate import simulate_case

METHODS = ("base", "rect", "order", "paper", "exact")
PAPER_NAMES = {
    "base": "base",
    "rect": "base+rect",
    "order": "base+rect+order",
    "paper": "base+rect+optim (paper)",
    "exact": "base+rect+exact (ours)",
    "engine": "exact, engine defaults",
}
#: The paper's energy as we read it (its R, floor 0.1, centreline at half of Ĝ's peak): Table 2's rows,
#: so that exact and Algorithm 1 minimise the same energy. "engine" is the product: exact with the
#: engine's defaults (log-normal spacing prior, no floor, a lower threshold; see settings.py).
PAPER_ENERGY = dict(centreline_threshold=0.5, spacing_prior="paper", evidence_floor=0.1, confidence_temperature=2.0)
CONFIGS = [(m, w) for m in (*METHODS, "engine") for w in (True, False)]
DIFFICULTY_MIX = {"clean": 0.2, "typical": 0.5, "hard": 0.3}
REGIONS = ("C", "T", "L", "S", "all")
ENERGY_TOLERANCE = 1e-6  # relative, for float round-off between the two solvers


def case_plan(seed: int, index: int) -> dict:
    """Difficulty and simulator seed of case `index`, reproducible from the bench seed."""
    rng = np.random.default_rng([seed, index])
    names = list(DIFFICULTY_MIX)
    difficulty = str(rng.choice(names, p=[DIFFICULTY_MIX[n] for n in names]))
    return {"index": index, "difficulty": difficulty, "sim_seed": int(rng.integers(2**31 - 1))}


def run_case(task: dict) -> dict:
    """Simulate one case and label it with every configuration; never raises."""
    plan, spacing = task["plan"], task["spacing_mm"]
    record = {**plan, "error": None, "results": {}, "temperature_hits": {}}
    try:
        t0 = time.perf_counter()
        case = simulate_case(plan["sim_seed"], spacing_mm=spacing, difficulty=plan["difficulty"])
        record["simulate_s"] = time.perf_counter() - t0
        record["levels"] = case.labels
        record["whole_spine"] = case.meta["whole_spine"]
        t0 = time.perf_counter()
        prepared = {"paper": prepare(case.heatmaps, EngineSettings(**PAPER_ENERGY))}
        record["prepare_s"] = time.perf_counter() - t0
        prepared["engine"] = prepare(case.heatmaps, EngineSettings())
        for method, weighted in CONFIGS:
            if method == "engine":
                settings, energy = EngineSettings(weighted=weighted), "engine"
            else:
                settings, energy = EngineSettings(method=method, weighted=weighted, **PAPER_ENERGY), "paper"
            t0 = time.perf_counter()
            result = solve(prepared[energy], settings)
            elapsed = time.perf_counter() - t0
            evaluation = evaluate_case(result.vertebrae, case.truth, metric="spineweb", name=f"case{plan['index']}")
            record["results"][f"{method}/{int(weighted)}"] = {
                "evaluation": evaluation,
                "energy": float(result.energy),
                "solve_s": elapsed,
                "labels": [v.label for v in result.vertebrae],
                "hits": confidence_outcomes(result.vertebrae, evaluation) if method in ("exact", "engine") else [],
            }
        for temperature in task.get("temperatures", ()):  # the engine row's chain, confidences at another T
            result = solve(prepared["engine"], EngineSettings(confidence_temperature=temperature))
            evaluation = evaluate_case(result.vertebrae, case.truth, metric="spineweb", name=f"case{plan['index']}")
            record["temperature_hits"][temperature] = confidence_outcomes(result.vertebrae, evaluation)
    except Exception:  # a benchmark reports failures instead of dying on the first
        record["error"] = traceback.format_exc()
    return record


def _cell(region) -> tuple[str, str]:
    if region is None or region.num_gt == 0:
        return "-", "-"
    err = "-" if region.error_mean_mm is None else f"{region.error_mean_mm:.2f} ± {region.error_std_mm:.2f}"
    return err, f"{100 * region.id_rate:.1f}"


def temperature_row(temperature: float, hits: list[tuple[float, bool]]) -> str:
    """One table row: how confidences at this temperature separate right labels from wrong ones."""
    confidence = np.array([c for c, _ in hits], float)
    right = np.array([ok for _, ok in hits], bool)

    def share(mask):
        return f"{100 * mask.mean():.1f} %" if mask.size else "-"

    sure = confidence >= 0.9
    return (f"| {temperature:g} | {int(sure.sum())} | {share(right[sure])} | {share(confidence[~right] < 0.5)} | "
            f"{share(confidence[right] < 0.5)} | {expected_calibration_error(hits):.3f} |")


def energy_violations(records: list[dict]) -> dict[bool, list[tuple[int, float, float]]]:
    """Cases where exact's energy exceeds paper's (same weights): (case index, exact, paper)."""
    out: dict[bool, list] = {True: [], False: []}
    for r in records:
        if r["error"]:
            continue
        for weighted in (True, False):
            exact = r["results"][f"exact/{int(weighted)}"]["energy"]
            paper = r["results"][f"paper/{int(weighted)}"]["energy"]
            if not np.isfinite(exact) or (np.isfinite(paper) and exact > paper + ENERGY_TOLERANCE * max(1.0, abs(paper))):
                out[weighted].append((r["index"], exact, paper))
    return out


def report(records: list[dict], args, wall_s: float) -> tuple[str, int]:
    good = [r for r in records if not r["error"]]
    errors = [r for r in records if r["error"]]
    counts = {d: sum(r["difficulty"] == d for r in good) for d in DIFFICULTY_MIX}
    whole = sum(r["whole_spine"] for r in good)
    lines = [
        f"## Ablation (Wang et al. 2021, Table 2) on {len(good)} simulated cases",
        "",
        f"Seed {args.seed}; spacing {args.spacing:g} mm; difficulties "
        + ", ".join(f"{d} {n}" for d, n in counts.items())
        + f"; whole spine {whole}, partial field of view {len(good) - whole}; every grid randomly "
        "oriented and oblique. Identification: SpineWeb definition (same label, ≤ 20 mm, mutually "
        "closest). Error: mean ± std (mm) over identified vertebrae. Id: identification rate (%).",
        "",
        "| method | λ | C error | C id | T error | T id | L error | L id | S error | S id | all error | all id | scans all correct |",
        "|---|---|" + "---|" * 11,
    ]
    summaries = {}
    for method, weighted in CONFIGS:
        key = f"{method}/{int(weighted)}"
        summary = summarize([r["results"][key]["evaluation"] for r in good]) if good else None
        summaries[key] = summary
        cells = []
        for name in REGIONS:
            cells.extend(_cell(summary.regions.get(name) if summary else None))
        correct = "-" if summary is None else f"{100 * summary.all_correct_rate:.1f} % ({summary.num_all_correct})"
        lines.append(f"| {PAPER_NAMES[method]} | {'yes' if weighted else 'no'} | " + " | ".join(cells) + f" | {correct} |")

    lines += ["", "### Identification rate (all vertebrae, %) by difficulty", ""]
    lines += ["| method | λ | " + " | ".join(DIFFICULTY_MIX) + " |", "|---|---|" + "---|" * len(DIFFICULTY_MIX)]
    for method, weighted in CONFIGS:
        key = f"{method}/{int(weighted)}"
        cells = []
        for d in DIFFICULTY_MIX:
            subset = [r["results"][key]["evaluation"] for r in good if r["difficulty"] == d]
            cells.append(f"{100 * summarize(subset).regions['all'].id_rate:.1f}" if subset else "-")
        lines.append(f"| {PAPER_NAMES[method]} | {'yes' if weighted else 'no'} | " + " | ".join(cells) + " |")

    lines += ["", "### Confidence (exact, λ on): labels with confidence >= 0.9 and the share right; wrong labels and "
              "the share flagged (< 0.5); expected calibration error (10 bins)", ""]
    for method in ("exact", "engine"):
        hits = [h for r in good for h in r["results"][f"{method}/1"]["hits"]]
        lines.append(f"- {PAPER_NAMES[method]}: {calibration_summary(hits)}")

    if args.temperatures:
        lines += ["", "### Confidence temperature (exact, engine defaults, λ on): the same chains, confidences at other T",
                  "", "| T | labels >= 0.9 | share right | wrong labels flagged (< 0.5) | right labels flagged | "
                  "expected calibration error |", "|---|---|---|---|---|---|"]
        for temperature in args.temperatures:
            hits = [h for r in good for h in r["temperature_hits"][temperature]]
            lines.append(temperature_row(temperature, hits))

    violations = energy_violations(records)
    n_viol = len(violations[True]) + len(violations[False])
    lines += [
        "",
        "### Exact versus the paper's optimiser (same energy)",
        "",
        f"Cases where exact's energy > paper's: {len(violations[True])} of {len(good)} with λ, "
        f"{len(violations[False])} of {len(good)} without.",
    ]
    for weighted in (True, False):
        pairs = [
            (r["results"][f"paper/{int(weighted)}"]["energy"], r["results"][f"exact/{int(weighted)}"]["energy"])
            for r in good
        ]
        pairs = np.array([(p, e) for p, e in pairs if np.isfinite(p) and np.isfinite(e)]).reshape(-1, 2)
        if pairs.size:
            gaps = pairs[:, 0] - pairs[:, 1]
            round_off = ENERGY_TOLERANCE * np.maximum(1.0, np.abs(pairs[:, 0]))
            lines.append(
                f"With{'' if weighted else 'out'} λ: exact lower than paper on {int((gaps > round_off).sum())} cases, "
                f"equal (within {ENERGY_TOLERANCE:g} relative) on {int((np.abs(gaps) <= round_off).sum())}; "
                f"paper − exact: median {np.median(gaps):.3f}, max {gaps.max():.3f}."
            )
    for weighted in (True, False):
        for index, exact, paper in violations[weighted][:20]:
            lines.append(f"- violation (λ {'on' if weighted else 'off'}): case {index}: exact {exact:.6f} > paper {paper:.6f}")

    if good:
        mean = lambda xs: float(np.mean(xs))  # noqa: E731
        lines += [
            "",
            "### Time per case (s, mean)",
            "",
            f"simulate {mean([r['simulate_s'] for r in good]):.3f}; prepare {mean([r['prepare_s'] for r in good]):.3f}; solve "
            + ", ".join(
                f"{m} {mean([r['results'][f'{m}/1']['solve_s'] for r in good]):.3f}" for m in METHODS
            )
            + f". Wall time {wall_s:.0f} s with {args.workers} worker(s).",
        ]
    if errors:
        lines += ["", f"### {len(errors)} case(s) raised an error", ""]
        for r in errors[:5]:
            last = r["error"].strip().splitlines()[-1]
            lines.append(f"- case {r['index']} ({r['difficulty']}, seed {r['sim_seed']}): {last}")
    status = 1 if (n_viol or errors) else 0
    return "\n".join(lines) + "\n", status


def case_json(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        entry = {k: r.get(k) for k in ("index", "difficulty", "sim_seed", "levels", "whole_spine", "error")}
        entry["results"] = {
            key: {
                "identified": res["evaluation"].num_identified,
                "num_gt": res["evaluation"].num_gt,
                "energy": res["energy"] if np.isfinite(res["energy"]) else None,
                "labels": res["labels"],
            }
            for key, res in r["results"].items()
        }
        out.append(entry)
    return out


def temperature_list(text: str) -> list[float]:
    """'2,4,8' -> [2.0, 4.0, 8.0]; anything else is an argparse error in one sentence."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of temperatures above 0, such as 2,4,8")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Table 2 of Wang et al. 2021 on simulated activation maps.")
    parser.add_argument("--cases", type=int, default=200, help="number of simulated cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bench seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes, at most 2 (default: %(default)s)")
    parser.add_argument("--spacing", type=float, default=2.0, help="map spacing in mm (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--temperatures", type=temperature_list, default=[],
                        help="also report the engine row's confidences at these temperatures (comma-separated)")
    parser.add_argument("--cases-json", type=Path, help="write per-case results (labels, energies) here")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    args.workers = max(1, min(args.workers, 2))

    tasks = [{"plan": case_plan(args.seed, i), "spacing_mm": args.spacing, "temperatures": args.temperatures}
             for i in range(args.cases)]
    start = time.perf_counter()
    records = []
    if args.workers == 1:
        iterator = map(run_case, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(args.workers)
        iterator = pool.imap(run_case, tasks, chunksize=1)
    try:
        for n, record in enumerate(iterator, start=1):
            records.append(record)
            if n % 10 == 0 or n == len(tasks):
                print(f"[{n}/{len(tasks)}] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    text, status = report(records, args, time.perf_counter() - start)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
        hits = [h for r in records if not r["error"] for h in r["results"]["engine/1"]["hits"]]
        if hits:
            picture = args.out.with_name(args.out.stem + "_reliability.png")
            save_figure(reliability_figure(hits, "Simulated maps, exact with the engine's defaults"), picture)
    if args.cases_json:
        write_json_atomic(args.cases_json, case_json(records))
    return status


if __name__ == "__main__":
    sys.exit(main())
