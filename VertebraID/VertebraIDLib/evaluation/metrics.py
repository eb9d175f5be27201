"""Identification rate and localisation error of labelled vertebrae against ground truth.

Two definitions of "identified" are offered; both look at one ground-truth (GT) vertebra g
with label l and the prediction p that carries the same label l:

- "spineweb" (Glocker et al., used by Wang et al. CVPR 2021): g is identified when p exists,
  |p - g| <= max_dist_mm (20 mm), and g and p are mutually closest: p is the prediction
  nearest to g (among all predictions) and g is the GT vertebra nearest to p (among all GT).
- "verse" (the VerSe challenge, anjany/verse `get_hits`): g is identified when p exists,
  |p - g| <= max_dist_mm, and g is the GT vertebra nearest to p, where, as in VerSe's code,
  only GT vertebrae whose label is also predicted compete.

Ties (another candidate exactly as close) count as not identified. The localisation error of
g is |p - g| when p exists; summaries average it over identified vertebrae only. A scan is
"all correct" when every one of its GT vertebrae is identified; predictions whose label has
no GT vertebra in the scan are counted separately as "extra" and do not change the rates.
Regions are C, T, L and S (T13 counts as T, L6 as L); "all" pools every vertebra.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..engine.anatomy import LabelSet, region
from ..engine.vertebrae import Vertebra, sort_by_level
from ..errors import VertebraIDError

METRICS = ("spineweb", "verse")
DEFAULT_MAX_DIST_MM = 20.0
REGION_ORDER = ("C", "T", "L", "S")


@dataclass
class VertebraOutcome:
    """One GT vertebra: whether it is identified and its distance to the same-label prediction."""

    label: str
    identified: bool
    error_mm: float | None  # None when no prediction carries this label

    @property
    def region(self) -> str:
        return region(self.label)


@dataclass
class CaseEvaluation:
    """The outcome of one scan: one entry per GT vertebra (cranial to caudal) and the extras."""

    outcomes: list[VertebraOutcome]
    extra_labels: list[str]  # predicted labels with no GT vertebra in this scan
    metric: str = "spineweb"
    max_dist_mm: float = DEFAULT_MAX_DIST_MM
    name: str | None = None

    @property
    def num_gt(self) -> int:
        return len(self.outcomes)

    @property
    def num_identified(self) -> int:
        return sum(o.identified for o in self.outcomes)

    @property
    def all_correct(self) -> bool:
        """Every GT vertebra identified (a scan without GT vertebra is not counted correct)."""
        return bool(self.outcomes) and all(o.identified for o in self.outcomes)

    def to_dict(self) -> dict:
        """The case's outcomes as plain data (JSON)."""
        return {
            "name": self.name,
            "num_gt": self.num_gt,
            "num_identified": self.num_identified,
            "all_correct": self.all_correct,
            "extra_labels": list(self.extra_labels),
            "vertebrae": [
                {
                    "label": o.label,
                    "identified": o.identified,
                    "error_mm": None if o.error_mm is None else round(o.error_mm, 3),
                }
                for o in self.outcomes
            ],
        }


def _check_unique(vertebrae: list[Vertebra], what: str, name: str | None) -> None:
    labels = [v.label for v in vertebrae]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        where = f" of case '{name}'" if name else ""
        raise VertebraIDError(f"The {what}{where} name {', '.join(duplicates)} more than once.")


def _strictly_nearest(distances: np.ndarray, index: int) -> bool:
    """True when entry `index` is closer than every other entry."""
    others = np.delete(distances, index)
    return others.size == 0 or bool(distances[index] < others.min())


def evaluate_case(
    pred: list[Vertebra],
    gt: list[Vertebra],
    metric: str = "spineweb",
    max_dist_mm: float = DEFAULT_MAX_DIST_MM,
    name: str | None = None,
) -> CaseEvaluation:
    """Judge each GT vertebra of one scan under `metric` ('spineweb' or 'verse'; module doc)."""
    if metric not in METRICS:
        raise VertebraIDError(f"Unknown metric '{metric}'; use one of {', '.join(METRICS)}.")
    if not np.isfinite(max_dist_mm) or max_dist_mm <= 0:
        raise VertebraIDError(f"The maximum distance must be a positive number of mm, got {max_dist_mm}.")
    _check_unique(pred, "predictions", name)
    _check_unique(gt, "ground-truth vertebrae", name)
    gt = sort_by_level(list(gt))
    pred_index = {v.label: i for i, v in enumerate(pred)}
    gt_pos = np.array([v.position for v in gt], dtype=float).reshape(-1, 3)
    pred_pos = np.array([v.position for v in pred], dtype=float).reshape(-1, 3)
    # distances[i, j] = |gt_i - pred_j|
    distances = np.linalg.norm(gt_pos[:, None, :] - pred_pos[None, :, :], axis=2)
    gt_labels = {v.label for v in gt}
    # VerSe: only GT vertebrae whose label is also predicted compete for a prediction.
    verse_rows = np.array([v.label in pred_index for v in gt], dtype=bool)

    outcomes = []
    for i, g in enumerate(gt):
        j = pred_index.get(g.label)
        if j is None:
            outcomes.append(VertebraOutcome(g.label, False, None))
            continue
        error = float(distances[i, j])
        identified = error <= max_dist_mm
        if metric == "spineweb":
            identified = identified and _strictly_nearest(distances[i, :], j) and _strictly_nearest(distances[:, j], i)
        else:
            rows = np.flatnonzero(verse_rows)
            identified = identified and _strictly_nearest(distances[rows, j], int(np.searchsorted(rows, i)))
        outcomes.append(VertebraOutcome(g.label, bool(identified), error))
    extras = [v.label for v in sort_by_level(list(pred)) if v.label not in gt_labels]
    return CaseEvaluation(outcomes, extras, metric, float(max_dist_mm), name)


@dataclass
class RegionSummary:
    """Pooled outcome of one region (or 'all') over scans."""

    region: str
    num_gt: int
    num_identified: int
    error_mean_mm: float | None  # over identified vertebrae
    error_std_mm: float | None

    @property
    def id_rate(self) -> float | None:
        return self.num_identified / self.num_gt if self.num_gt else None

    def to_dict(self) -> dict:
        """The region's counts and rates as plain data (JSON)."""
        def r(x, d):
            return None if x is None else round(x, d)

        return {
            "n": self.num_gt,
            "identified": self.num_identified,
            "id_rate": r(self.id_rate, 4),
            "error_mean_mm": r(self.error_mean_mm, 2),
            "error_std_mm": r(self.error_std_mm, 2),
        }


@dataclass
class Summary:
    """Identification over a set of scans: per region and overall, plus all-correct scans."""

    metric: str
    max_dist_mm: float
    regions: dict[str, RegionSummary]  # C, T, L, [S], all (only regions with GT vertebrae, plus all)
    num_scans: int
    num_all_correct: int
    num_extra: int
    cases: list[CaseEvaluation] = field(default_factory=list)

    @property
    def all_correct_rate(self) -> float | None:
        return self.num_all_correct / self.num_scans if self.num_scans else None

    def to_dict(self, include_cases: bool = True) -> dict:
        """Every region's summary (and each case's, with `include_cases`) as plain data (JSON)."""
        out = {
            "metric": self.metric,
            "max_dist_mm": self.max_dist_mm,
            "num_scans": self.num_scans,
            "regions": {name: r.to_dict() for name, r in self.regions.items()},
            "all_correct": {
                "scans": self.num_all_correct,
                "rate": None if self.all_correct_rate is None else round(self.all_correct_rate, 4),
            },
            "extra_predictions": self.num_extra,
        }
        if include_cases:
            out["cases"] = [c.to_dict() for c in self.cases]
        return out


def _region_summary(name: str, outcomes: list[VertebraOutcome]) -> RegionSummary:
    errors = np.array([o.error_mm for o in outcomes if o.identified], dtype=float)
    mean = float(errors.mean()) if errors.size else None
    std = float(errors.std()) if errors.size else None
    return RegionSummary(name, len(outcomes), sum(o.identified for o in outcomes), mean, std)


def summarize(cases: list[CaseEvaluation]) -> Summary:
    """Pool case evaluations: per-region counts, id rate, error mean/std (identified only)."""
    if not cases:
        raise VertebraIDError("There is no evaluated case to summarise.")
    metrics = {(c.metric, c.max_dist_mm) for c in cases}
    if len(metrics) > 1:
        raise VertebraIDError("The cases were evaluated with different metrics or distances and cannot be pooled.")
    metric, max_dist = metrics.pop()
    outcomes = [o for c in cases for o in c.outcomes]
    regions = {
        name: _region_summary(name, [o for o in outcomes if o.region == name])
        for name in REGION_ORDER
        if name != "S" or any(o.region == "S" for o in outcomes)
    }
    regions["all"] = _region_summary("all", outcomes)
    return Summary(
        metric=metric,
        max_dist_mm=max_dist,
        regions=regions,
        num_scans=len(cases),
        num_all_correct=sum(c.all_correct for c in cases),
        num_extra=sum(len(c.extra_labels) for c in cases),
        cases=list(cases),
    )


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def format_table(summary: Summary, title: str | None = None) -> str:
    """A plain-text table: one row per region and one for all, then the per-scan counts."""
    header = ("region", "n", "identified", "id rate", "error mean (mm)", "error std (mm)")
    rows = []
    for name, r in summary.regions.items():
        rows.append(
            (
                name,
                str(r.num_gt),
                str(r.num_identified),
                _percent(r.id_rate),
                "-" if r.error_mean_mm is None else f"{r.error_mean_mm:.2f}",
                "-" if r.error_std_mm is None else f"{r.error_std_mm:.2f}",
            )
        )
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    title = title or f"Identification ({summary.metric}, {summary.max_dist_mm:g} mm)"
    text = [title, rule, line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), rule]
    text.append(
        f"scans: {summary.num_scans}; all correct: {summary.num_all_correct} "
        f"({_percent(summary.all_correct_rate)}); extra predictions: {summary.num_extra}"
    )
    return "\n".join(text)


def name_offsets(vertebrae: list[Vertebra], truth: list[Vertebra], max_dist_mm: float = DEFAULT_MAX_DIST_MM) -> list[int | None]:
    """Per true vertebra: how many levels its nearest point's name is off (-1: named one level too
    cranially); None where no point lies within `max_dist_mm` as its mutually nearest."""
    if not vertebrae:
        return [None] * len(truth)
    standard, transitional = LabelSet.standard().levels, LabelSet.standard(transitional=True).levels
    pred = np.array([v.position for v in vertebrae], float)
    gt = np.array([v.position for v in truth], float)
    distances = np.linalg.norm(gt[:, None, :] - pred[None, :, :], axis=2)
    out = []
    for i, g in enumerate(truth):
        j = int(np.argmin(distances[i]))
        mutual = int(np.argmin(distances[:, j])) == i
        if distances[i, j] <= max_dist_mm and mutual:
            pair = (vertebrae[j].label, g.label)
            order = standard if all(label in standard for label in pair) else transitional  # T13, L6
            out.append(order.index(pair[0]) - order.index(pair[1]))
        else:
            out.append(None)
    return out
