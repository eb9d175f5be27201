"""Centreline tracing, moving frames and straightening (paper §3.2)."""
from __future__ import annotations

import numpy as np
import pytest
from VertebraIDLib.engine.centerline import trace_centerline
from VertebraIDLib.engine.points import render_gaussians
from VertebraIDLib.engine.rectify import rectify
from VertebraIDLib.engine.volume import Volume
from VertebraIDLib.synthetic.simulate import simulate_case


def _curve_spine(n=10, gap=25.0):
    """Body centres along a gently curved line, cranial first (RAS)."""
    z = -np.arange(n) * gap
    return np.stack([8 * np.sin(z / 120), 15 * np.cos(z / 90), z], axis=1)


def _grid(centres, spacing, perm=(0, 1, 2), flips=(1, 1, 1)):
    """A grid around the centres whose array axes are permuted/flipped world axes."""
    lo, hi = centres.min(0) - 50, centres.max(0) + 50
    shape_world = np.ceil((hi - lo) / spacing).astype(int) + 1
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for array_axis, world_axis in enumerate(perm):
        sign = flips[array_axis]
        affine[world_axis, array_axis] = sign * spacing
        affine[world_axis, 3] = lo[world_axis] if sign > 0 else lo[world_axis] + (shape_world[world_axis] - 1) * spacing
    shape = tuple(int(shape_world[w]) for w in perm)
    return Volume(np.zeros(shape, np.float32), affine)


def _combined(centres, grid, sigma=4.0, heights=None):
    heights = np.ones(len(centres)) if heights is None else np.asarray(heights)
    return Volume(render_gaussians(centres, heights[:, None], grid, sigma)[..., 0], grid.affine)


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (1, -1, 1)), ((1, 2, 0), (-1, 1, -1))])
def test_centreline_follows_the_spine_whatever_the_array_orientation(perm, flips):
    centres = _curve_spine()
    line = trace_centerline(_combined(centres, _grid(centres, 2.0, perm, flips)), step_mm=2.0)
    assert line is not None
    # runs cranial -> caudal and passes within 1.5 mm of every body centre
    assert line.points[0, 2] > line.points[-1, 2]
    d = np.linalg.norm(line.points[None, :, :] - centres[:, None, :], axis=2).min(axis=1)
    assert d.max() < 1.5
    # supported part covers the spine; extensions go past both ends
    assert line.points[line.supported][0, 2] >= centres[0, 2] - 3
    assert line.points[0, 2] > centres[0, 2] + 10 and line.points[-1, 2] < centres[-1, 2] - 10


def test_frames_are_orthonormal_right_handed_and_anterior():
    centres = _curve_spine()
    line = trace_centerline(_combined(centres, _grid(centres, 2.0)), step_mm=2.0)
    for a, b in [(line.e1, line.e2), (line.e2, line.e3), (line.e1, line.e3)]:
        assert np.abs((a * b).sum(1)).max() < 1e-6
    assert np.allclose(np.cross(line.e1, line.e2), line.e3, atol=1e-6)
    assert (line.e1[:, 1] > 0.9).all()  # close to RAS anterior
    # arc-length parameterised
    step = np.linalg.norm(np.diff(line.points, axis=0), axis=1)
    assert np.allclose(step, 2.0, atol=0.05)


def test_gap_of_a_missing_vertebra_is_bridged_and_side_blobs_ignored():
    centres = _curve_spine(12)
    kept = np.delete(centres, [5, 6], axis=0)  # two vertebrae without activation
    ribs = centres[[2, 3, 8]] + np.array([45.0, -20.0, 0.0])  # false positives off the spine
    blobs = np.concatenate([kept, ribs])
    line = trace_centerline(_combined(blobs, _grid(centres, 2.0), heights=[1] * len(kept) + [0.9] * 3), step_mm=2.0)
    d = np.linalg.norm(line.points[None, :, :] - centres[:, None, :], axis=2).min(axis=1)
    assert np.delete(d, [5, 6]).max() < 1.5  # the rib blobs do not pull the line sideways
    assert d.max() < 5.0  # a 75 mm gap on a curved spine is bridged by a straight segment


def test_no_spine_when_the_map_is_empty():
    grid = _grid(_curve_spine(), 3.0)
    assert trace_centerline(grid, step_mm=3.0) is None


@pytest.mark.parametrize("spacing,sigma", [(1.5, 3.0), (2.0, 4.0), (3.0, 6.0)])
def test_signal_peaks_equal_blob_heights_whatever_spacing_and_sigma(spacing, sigma):
    centres = _curve_spine(6)
    grid = _grid(centres, spacing)
    heights = np.array([1.0, 0.5, 1.0, 0.8, 1.0, 0.6])
    channels = np.zeros((6, 26))
    channels[np.arange(6), np.arange(10, 16)] = heights
    maps = Volume(render_gaussians(centres, channels, grid, sigma), grid.affine)
    combined = Volume(maps.array.sum(3), grid.affine)
    line = trace_centerline(combined, step_mm=spacing)
    rect = rectify(maps, combined, line, window_mm=30.0)
    assert rect.sigma_mm == pytest.approx(sigma, rel=0.15)
    peaks = rect.signals[:, 10:16].max(axis=0)
    assert np.allclose(peaks, heights, atol=0.12)


def test_straightened_ct_puts_the_spine_on_the_middle_axis():
    case = simulate_case(3, spacing_mm=2.0, difficulty="clean", levels=("T4", "L3"))
    combined = Volume(case.heatmaps.array.sum(3), case.heatmaps.affine)
    line = trace_centerline(combined, step_mm=2.0)
    rect = rectify(case.heatmaps, combined, line)
    straight = rect.straighten(combined, window_mm=40.0)
    hw = straight.array.shape[0] // 2
    # each vertebra's activation sits near the grid's central axis in its plane
    for z in np.nonzero(straight.array.max(axis=(0, 1)) > 0.5)[0]:
        i, j = np.unravel_index(np.argmax(straight.array[:, :, z]), straight.array.shape[:2])
        assert abs(i - hw) <= 3 and abs(j - hw) <= 3
    # display geometry: the grid runs head to foot
    assert straight.affine[2, 2] < 0
