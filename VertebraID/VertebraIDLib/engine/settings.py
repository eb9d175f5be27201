"""Every knob of the engine, with one name and one default each: `EngineSettings`.

The centreline, the rectification, the energy of paper §3.3 and the confidences all read their
settings from here. A model file's metadata may carry its own values for some of them (its
`"engine"` table, tuned on validation phantoms for that model's maps, and its blobs' σ): those
keys are the field names below, and `EngineSettings.from_metadata` applies them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import VertebraIDError
from .anatomy import LabelSet

METHODS = ("exact", "paper", "order", "rect", "base")
SPACING_PRIORS = ("paper", "lognormal")

#: Settings a model's metadata may set in its "engine" table (the others are the user's or fixed).
MODEL_SETTINGS = ("centreline_threshold", "evidence_weight", "evidence_floor", "gap_fraction_min",
                  "confidence_temperature", "anatomy_weight", "spacing_prior", "spacing_weight")

#: Names used by files written before the settings had one name each.
_LEGACY_NAMES = {"threshold": "centreline_threshold", "floor": "evidence_floor", "temperature": "confidence_temperature"}


@dataclass(frozen=True)
class EngineSettings:
    """How the engine turns activation maps into labelled vertebrae."""

    # --- the run
    method: str = "exact"  # optimiser: exact, paper (Algorithm 1), or Table 2's baselines order/rect/base
    weighted: bool = True  # the paper's anchor weights (lambda = 2 for C1, C2, S1, S2)
    transitional: bool = False  # allow T13 and L6
    # The defaults were chosen on simulated maps (100 cases of `bench/ablation.py --seed 1`; the bench's
    # own seed 0 is the test): the log-normal prior, no floor and a 0.2 threshold name 94.9 % against
    # 86.7 % for the paper's R at floor 0.1 and threshold 0.5. T 6: of the temperatures whose labels at
    # confidence >= 0.9 were >= 99 % right there (T 4: 98.1 %, 5: 99.0 %, 6: 99.6 %), the one with a margin;
    # it flags 41 % of the wrong labels (T 4: 26 %) for 5 % of the right ones, at a calibration error of 0.055.
    # A network brings its own (tuned by `vertebraid tune-engine`, stored with its weights).
    # --- centreline and rectification (paper §3.2)
    centreline_threshold: float = 0.2  # voxels above this fraction of Ĝ's peak trace the centreline
    min_peak: float = 0.05  # Ĝ peak below this (absolute) means "no spine"
    step_mm: float | None = None  # rectification sampling δ; default: the maps' spacing
    window_mm: float = 25.0  # half-width of the sampled normal planes (centreline error + blob tails)
    sigma_mm: float | None = None  # the maps' blob width; estimated from them when None
    # --- energy (paper Eqs. 4-5): U(ℓ, k) = -α λ_ℓ (Q_ℓ(k) - f)
    evidence_weight: float = 20.0  # α: a clean vertebra (Q ≈ 1) is worth ~20, R costs >= e
    evidence_floor: float = 0.0  # f: Q below this counts against a chain
    level_spacing: bool = True  # R compares gaps after scaling by each level's typical growth
    # R: "paper" = exp(max(a/b, b/a)); "lognormal" = a log-likelihood in nats x spacing_weight x α (in units
    # of the evidence, so α and T can be tuned without changing its share): log gap ratios
    # ~ N(0, spacing_sigma), and each gap against its level's typical gap ~ N(0, gap_sigma) in log
    spacing_prior: str = "lognormal"
    spacing_sigma: float = 0.15
    gap_sigma: float = 0.25
    spacing_weight: float = 0.2
    transitional_cost: float = 6.0  # prior against T13 / L6 (present in a minority of spines)
    gap_min_mm: float = 10.0  # adult centres are >= ~13 mm apart (C3-C4), fractures included
    gap_max_mm: float = 90.0
    # Each gap must also lie within these fractions of its level's typical gap: stops a chain from
    # squeezing two labels onto one vertebra, or from skipping one, at any patient size.
    gap_fraction_min: float = 0.5
    gap_fraction_max: float = 2.2
    # Ribs and sacrum read from the CT (landmarks.py): their log-likelihood in nats x anatomy_weight x α
    anatomy_weight: float = 0.4
    # --- confidences: marginals of the Gibbs distribution exp(-L / T)
    confidence_temperature: float = 6.0  # scales with α: a model with its own α brings its own T
    confidence_radius_mm: float = 8.0  # a label is right when its level lies within this of the point

    def __post_init__(self):
        if self.method not in METHODS:
            raise VertebraIDError(f"Unknown method '{self.method}'; choose one of {', '.join(METHODS)}.")
        if self.spacing_prior not in SPACING_PRIORS:
            raise VertebraIDError(f"Unknown spacing prior '{self.spacing_prior}'; choose {' or '.join(SPACING_PRIORS)}.")
        if not _is_number(self.centreline_threshold) or not 0.0 < self.centreline_threshold < 1.0:
            raise VertebraIDError("The centreline threshold must be a fraction between 0 and 1, "
                                  f"got {self.centreline_threshold!r}.")
        for name in ("evidence_weight", "evidence_floor", "transitional_cost", "confidence_radius_mm", "anatomy_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise VertebraIDError(f"The engine setting {name} must be a non-negative number, got {value!r}.")
        for name in ("confidence_temperature", "window_mm", "min_peak", "gap_min_mm", "spacing_sigma", "gap_sigma",
                     "spacing_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise VertebraIDError(f"The engine setting {name} must be a number above 0, got {value!r}.")
        for name in ("step_mm", "sigma_mm"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                raise VertebraIDError(f"The engine setting {name} must be a number above 0, got {value!r}.")
        if not _is_number(self.gap_fraction_min) or not 0.0 < self.gap_fraction_min < 1.0:
            raise VertebraIDError("The engine setting gap_fraction_min must be a fraction between 0 and 1, "
                                  f"got {self.gap_fraction_min!r}.")
        if not _is_number(self.gap_fraction_max) or self.gap_fraction_max <= self.gap_fraction_min:
            raise VertebraIDError("The engine setting gap_fraction_max must be above gap_fraction_min.")
        if not _is_number(self.gap_max_mm) or self.gap_max_mm <= self.gap_min_mm:
            raise VertebraIDError("The engine setting gap_max_mm must be above gap_min_mm.")

    @property
    def labels(self) -> LabelSet:
        """The levels this run may use, with or without T13/L6 and the anchor weights."""
        return LabelSet.standard(self.transitional, self.weighted)

    def updated(self, **changes) -> "EngineSettings":
        """A copy with some settings changed (validated; unknown names are an error)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise VertebraIDError(f"Unknown engine setting '{unknown[0]}'.")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Every setting by name (what `from_dict` reads back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineSettings":
        """Settings saved with `to_dict` (older names are read too; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in (data or {}).items():
            key = _LEGACY_NAMES.get(key, key)
            if key in known and value is not None:
                values[key] = value
        return cls(**values)

    def with_metadata(self, metadata: dict) -> "EngineSettings":
        """These settings with a model's own: its blobs' σ and what its "engine" table sets."""
        return self.updated(**self.metadata_overrides(metadata))

    @staticmethod
    def metadata_overrides(metadata: dict) -> dict:
        """The settings a model's metadata fixes for its maps (σ, and its "engine" table's values)."""
        out = {}
        if metadata.get("sigma_mm") is not None:
            out["sigma_mm"] = float(metadata["sigma_mm"])
        engine = metadata.get("engine") or {}
        if not isinstance(engine, dict):
            raise VertebraIDError("The model's engine settings must be a table of values.")
        for key in MODEL_SETTINGS:
            if engine.get(key) is not None:
                out[key] = engine[key]
        return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
