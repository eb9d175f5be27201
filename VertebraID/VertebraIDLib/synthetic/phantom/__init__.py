"""Synthetic spine CT phantoms with exact ground truth (issue 3).

    phantom = generate_phantom(7, levels="T10..S2", pathologies=["fracture"], spacing=(1.0, 2.0))
    phantom.ct      # Volume, int16 HU
    phantom.mask    # Volume, uint8 VerSe ids
    phantom.truth   # list[Vertebra]: body centres (RAS mm) inside the image
    phantom.meta    # everything that was drawn
    write_phantom(phantom, "out", "case0007")

Modules: morphometry (published per-level dimensions), spine_shape (curvature, scoliosis,
poses), skeleton (bones as solids), soft_tissue (body, organs, lungs), render (signed
distance fields in local boxes), conditions (fractures, metal and streaks, noise, blur,
geometry), options (validation), generate (one case), io (files).
"""
from .generate import Phantom, generate_phantom
from .io import case_paths, write_phantom
from .options import (
    PATHOLOGIES,
    REGION_PRESETS,
    TRANSITIONAL,
    PhantomOptions,
    parse_levels,
)

__all__ = [
    "PATHOLOGIES",
    "REGION_PRESETS",
    "TRANSITIONAL",
    "Phantom",
    "PhantomOptions",
    "case_paths",
    "generate_phantom",
    "parse_levels",
    "write_phantom",
]
