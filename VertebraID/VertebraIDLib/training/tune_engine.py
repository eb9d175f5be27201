"""Pick the engine's settings for a model's maps on validation cases; optionally store them.

    vertebraid tune-engine --model M [--phantoms 60] [--labelmaps MAP...] [--renders 30] [--seed 1000000] [--write]

The engine's defaults (centreline through Ĝ above 0.5 of its peak; α 20, floor 0.1) suit maps
whose peaks reach the targets' height everywhere. A network that is less sure of itself peaks
lower, and unevenly: the centreline then stops where Ĝ drops below half its peak, and the
spacing prior and the floor outweigh the evidence, so the exact optimiser places too few
vertebrae. This runs the model once on validation cases: phantoms (training's validation seeds,
never the held-out test seeds of `bench/network_eval.py`) and, with `labelmaps`, CTs rendered from
real anatomy (drawn from seeds training does not use), whose maps look like a real scan's. Each
setting is scored by the mean identification rate of the two kinds (each kind counts the same).
In turn it picks (threshold, α, floor) on a grid; the shortest gap a chain may take between
consecutive centres (a fraction of the level's typical gap: maps that ripple between vertebrae
otherwise get two labels per body); the spacing prior and how much the ribs and sacrum read from
the CT weigh; then the confidences' temperature that makes them honest by the Brier score (mean
squared gap between a vertebra's confidence and whether it was identified): the highest
temperature within one standard error of the lowest score (validation cases are not real scans:
among equals, the more cautious). With `write`, the settings go into the model's metadata
("engine" table; the weights and their checksum are untouched), where `detect`, the Slicer module
and the benches read them.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..engine.anatomy import CHANNEL_OF
from ..engine.pipeline import prepare, solve
from ..engine.settings import EngineSettings
from ..engine.vertebrae import Vertebra
from ..engine.volume import Volume
from ..evaluation.calibration import confidence_outcomes, confidence_table
from ..evaluation.metrics import evaluate_case, summarize
from ..io.files import PathLike, write_json_atomic
from ..networks.bundle import load_model, model_paths
from ..networks.predict import predict_evidence
from ..synthetic.labelmap_ct import read_labelmap, vertebra_centres
from ..synthetic.phantom import generate_phantom

THRESHOLDS = (0.5, 0.2, 0.1, 0.05)
WEIGHTS = (20.0, 80.0, 320.0, 1280.0, 5120.0)
FLOORS = (0.1, 0.02, 0.0)
GAP_FRACTIONS = (0.5, 0.6, 0.7, 0.8)  # shortest gap / the level's typical gap (engine default first)
# (spacing prior, its weight in units of α); the paper's exp(max ratio) has no weight
SPACING_PRIORS = (("paper", None), ("lognormal", 0.1), ("lognormal", 0.2), ("lognormal", 0.4), ("lognormal", 0.8))
ANATOMY_WEIGHTS = (0.0, 0.2, 0.4, 0.8, 1.6)  # ribs and sacrum, in units of α per nat
TEMPERATURES = (2.0, 8.0, 32.0, 128.0, 512.0, 2048.0, 8192.0)


def validation_cases(model, phantoms: int, seed: int, labelmaps=(), renders: int = 0, log: Callable = print):
    """[(kind, truth, evidence)]: phantoms seed.. (2.5 mm) and `renders` CTs per label map, drawn from
    seeds seed.. with a stream of their own (training renders draw from another)."""
    cases = []
    for case_seed in range(seed, seed + phantoms):
        phantom = generate_phantom(case_seed, spacing=2.5)
        cases.append(("phantoms", phantom.truth, predict_evidence(phantom.ct, model, "cpu")))
        log(f"phantom {case_seed}: maps ready")
    for path in labelmaps:
        labelmap = read_labelmap(path)
        for case_seed in range(seed, seed + renders):
            rng = np.random.default_rng([case_seed, 9901])
            hu, affine, labels, _ = labelmap.render(rng, spacing_mm=float(rng.choice([1.5, 2.0, 3.0])))
            centres = vertebra_centres(labels, affine, labelmap.prepared.names)
            truth = [Vertebra(level, p) for level, p in centres.items() if level in CHANNEL_OF]
            if len(truth) >= 2:
                cases.append(("real anatomy", truth, predict_evidence(Volume(hu, affine), model, "cpu")))
            log(f"{labelmap.name} render {case_seed}: maps ready")
    return cases


def tune_engine(model_path: PathLike, phantoms: int = 60, seed: int = 1_000_000, write: bool = False,
                log: Callable = print, labelmaps=(), renders: int = 30) -> str:
    """Tune the engine for a model on validation phantoms seed..seed+phantoms-1 (2.5 mm) and CTs rendered
    from `labelmaps`; returns the report (markdown). With `write`, the settings go into the model's metadata."""
    model = load_model(model_path, "cpu")
    base = EngineSettings().with_metadata({"sigma_mm": model.sigma_mm})
    cases = []  # (kind, truth, {threshold: prepared}); the maps themselves are not kept
    for kind, truth, evidence in validation_cases(model, phantoms, seed, labelmaps, renders, log):
        evidence = replace(evidence, settings={})  # the grid decides them all
        cases.append((kind, truth, {t: prepare(evidence, base.updated(centreline_threshold=t)) for t in THRESHOLDS}))
    kinds = sorted({kind for kind, _, _ in cases})

    def rates_by_kind(threshold: float, **settings) -> dict:
        chosen = base.updated(centreline_threshold=threshold, **settings)
        out = {}
        for k in kinds:
            evaluations = [evaluate_case(solve(p[threshold], chosen).vertebrae, t) for kind, t, p in cases if kind == k]
            out[k] = summarize(evaluations).regions["all"].id_rate
        return out

    def rate(threshold: float, **settings) -> float:
        return float(np.mean(list(rates_by_kind(threshold, **settings).values())))

    rates = {(t, w, f): rate(t, evidence_weight=w, evidence_floor=f) for t, w, f in itertools.product(THRESHOLDS, WEIGHTS, FLOORS)}
    default = (EngineSettings().centreline_threshold, EngineSettings().evidence_weight, EngineSettings().evidence_floor)
    # the best rate; among equals, the first in the grid's order (nearest the engine's defaults)
    best = max(rates, key=lambda k: round(rates[k], 6))
    threshold = best[0]
    chosen = dict(evidence_weight=best[1], evidence_floor=best[2])

    # then, with those, the shortest gap a chain may take (a network's maps can ripple between
    # vertebrae, and a chain then packs two labels onto one body)
    gap_rates = {fraction: rate(threshold, **chosen, gap_fraction_min=fraction) for fraction in GAP_FRACTIONS}
    best_gap = max(gap_rates, key=lambda k: round(gap_rates[k], 6))
    chosen["gap_fraction_min"] = best_gap

    # then the spacing prior and the weight of the ribs and sacrum read from the CT
    def prior_settings(prior, weight, anatomy):
        extra = {"spacing_prior": prior, "anatomy_weight": anatomy}
        return extra if weight is None else {**extra, "spacing_weight": weight}

    prior_rates = {(prior, weight, anatomy): rates_by_kind(threshold, **chosen, **prior_settings(prior, weight, anatomy))
                   for (prior, weight), anatomy in itertools.product(SPACING_PRIORS, ANATOMY_WEIGHTS)}
    best_prior = max(prior_rates, key=lambda k: round(float(np.mean(list(prior_rates[k].values()))), 6))
    chosen.update(prior_settings(*best_prior))

    temperature_rows, hits_at = [], {}
    for temperature in TEMPERATURES:
        settings = base.updated(centreline_threshold=threshold, **chosen, confidence_temperature=temperature)
        hits = []
        for _, truth, prepared in cases:
            vertebrae = solve(prepared[threshold], settings).vertebrae
            hits += confidence_outcomes(vertebrae, evaluate_case(vertebrae, truth))
        confidence, identified = np.array([h[0] for h in hits]), np.array([h[1] for h in hits], float)
        hits_at[temperature] = hits
        squared = (confidence - identified) ** 2
        temperature_rows.append((temperature, float(np.mean(squared)), float(np.mean(confidence)),
                                 float(np.std(squared) / np.sqrt(max(len(squared), 1)))))
    # One-standard-error rule: the most cautious (highest) temperature whose Brier score is within
    # one standard error of the lowest. Validation cases are not real scans; among equals, doubt more.
    lowest = min(temperature_rows, key=lambda row: row[1])
    best_temperature = max(row[0] for row in temperature_rows if row[1] <= lowest[1] + lowest[3])
    final = rates_by_kind(threshold, **chosen)

    counts = ", ".join(f"{sum(kind == k for kind, _, _ in cases)} {k}" for k in kinds)
    lines = [f"## Engine settings for {Path(model_path).name}: {counts} (phantom seeds {seed}..{seed + phantoms - 1}), "
             "exact optimiser, identification % (mean over the kinds of case)"]
    for t in THRESHOLDS:
        lines += ["", f"centreline threshold {t:g} (fraction of Ĝ's peak):", "",
                  "| α \\ floor | " + " | ".join(f"{f:g}" for f in FLOORS) + " |", "|---" * (len(FLOORS) + 1) + "|"]
        for weight in WEIGHTS:
            lines.append(f"| {weight:g} | " + " | ".join(f"{100 * rates[(t, weight, f)]:.1f}" for f in FLOORS) + " |")
    lines += ["", f"best: threshold {threshold:g}, α {best[1]:g}, floor {best[2]:g} ({100 * rates[best]:.1f} %); "
              f"engine defaults threshold {default[0]:g}, α {default[1]:g}, floor {default[2]:g} ({100 * rates[default]:.1f} %)"]
    lines += ["", "With these, the shortest gap between consecutive centres (fraction of the level's typical gap):", "",
              "| gap fraction | " + " | ".join(f"{f:g}" for f in GAP_FRACTIONS) + " |", "|---" * (len(GAP_FRACTIONS) + 1) + "|",
              "| identification % | " + " | ".join(f"{100 * gap_rates[f]:.1f}" for f in GAP_FRACTIONS) + " |",
              "", f"best: gap fraction {best_gap:g} ({100 * gap_rates[best_gap]:.1f} %)"]
    lines += ["", "With these, the spacing prior (weight in units of α) and the ribs and sacrum read from the CT "
              "(anatomy weight, units of α per nat), identification % per kind:", "",
              "| spacing prior | anatomy weight | " + " | ".join(kinds) + " | mean |", "|---" * (len(kinds) + 3) + "|"]
    for (prior, weight, anatomy), by_kind in prior_rates.items():
        name = prior if weight is None else f"{prior} {weight:g}"
        lines.append(f"| {name} | {anatomy:g} | " + " | ".join(f"{100 * by_kind[k]:.1f}" for k in kinds)
                     + f" | {100 * np.mean(list(by_kind.values())):.1f} |")
    lines += ["", f"best: {best_prior[0]}" + ("" if best_prior[1] is None else f" {best_prior[1]:g}")
              + f", anatomy weight {best_prior[2]:g}"]
    lines += ["", f"Confidence temperature with these settings (share identified: "
              f"{100 * np.mean([ok for _, ok in hits_at[best_temperature]]):.1f} % of the vertebrae placed):", "",
              "| temperature | Brier score | standard error | mean confidence |", "|---|---|---|---|"]
    lines += [f"| {t:g} | {brier:.3f} | {se:.3f} | {mean:.3f} |" for t, brier, mean, se in temperature_rows]
    lines += ["", f"chosen: temperature {best_temperature:g} (the highest within one standard error of the lowest Brier "
              f"score, {lowest[1]:.3f} at {lowest[0]:g})", "", confidence_table(hits_at[best_temperature])]
    if write:
        _, meta_path = model_paths(model_path)
        meta = json.loads(meta_path.read_text())
        meta["engine"] = {
            "centreline_threshold": threshold,
            **chosen,
            "confidence_temperature": best_temperature,
            "tuned_on": f"vertebraid tune-engine: {counts} (phantom seeds {seed}..{seed + phantoms - 1})",
            "validation_id_rate": {k: round(v, 4) for k, v in final.items()},
            "validation_id_rate_engine_defaults": round(rates[default], 4),
        }
        write_json_atomic(meta_path, meta)
        lines += ["", f"stored in {meta_path}"]
    return "\n".join(lines)
