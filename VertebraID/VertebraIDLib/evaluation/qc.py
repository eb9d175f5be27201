"""Pictures for QC, reviews and the README: sagittal and coronal views of a CT with labelled
vertebrae.

The CT is sampled on a fixed RAS-aligned grid through its affine, so any stored orientation
(RAS, LPS, PIR, oblique...) shows upright with the same layout: sagittal with anterior on
the left, coronal with the patient's right on the left (radiological convention), head up.
Each view is a maximum-intensity projection over a thin slab that follows the spine (curved:
the slab centre tracks the vertebrae, the given centreline, or bone found in the image), so a
scoliotic spine stays in view.

Matplotlib runs with the Agg backend; nothing here opens a window.
"""
from __future__ import annotations

import os

import numpy as np

from ..engine.anatomy import CHECK_COLOR, LEVELS_26, REGION_COLORS
from ..engine.volume import Volume, resample_to_spacing
from ..errors import VertebraIDError
from ..io.files import atomic_path

#: Display window (HU) that shows bone and soft tissue.
BONE_WINDOW = (-250.0, 1250.0)


def figure_class():
    """Matplotlib's Figure on the Agg backend (no window, no pyplot state)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure


def _spine_line(ct: Volume, vertebrae, centerline_ras, z: np.ndarray) -> np.ndarray:
    """(x, y) of the slab centre at each height z: from vertebrae, a centreline, or bone."""
    pts = None
    if vertebrae:
        pts = np.array([v.position for v in vertebrae], float)
    elif centerline_ras is not None and len(centerline_ras):
        pts = np.asarray(centerline_ras, float).reshape(-1, 3)
    if pts is not None and len(pts):
        order = np.argsort(pts[:, 2])
        pts = pts[order]
        if len(pts) == 1:
            return np.repeat(pts[:, :2], len(z), axis=0)
        x = np.interp(z, pts[:, 2], pts[:, 0])
        y = np.interp(z, pts[:, 2], pts[:, 1])
        return np.stack([x, y], -1)
    return _bone_line(ct, z)


def _bone_line(ct: Volume, z: np.ndarray) -> np.ndarray:
    """Centre of dense bone near the middle of each axial level, smoothed (no annotations)."""
    from scipy.ndimage import map_coordinates, uniform_filter1d

    corners = ct.corners_world()
    lo, hi = corners.min(0), corners.max(0)
    step = max(float(ct.spacing.min()) * 2, 3.0)
    xs = np.arange(lo[0], hi[0] + 1e-6, step)
    ys = np.arange(lo[1], hi[1] + 1e-6, step)
    zs = np.arange(lo[2], hi[2] + 1e-6, max(step, (hi[2] - lo[2]) / 60))
    X, Y, Z = np.meshgrid(xs, ys, zs, indexing="ij")
    ijk = ct.world_to_voxel(np.stack([X, Y, Z], -1).reshape(-1, 3)).T
    values = map_coordinates(ct.array.astype(np.float32), ijk, order=0, mode="constant", cval=-1024.0)
    values = values.reshape(X.shape)
    bone = values > 250
    # favour the middle of the body: weight by closeness to the image centre in x
    wx = np.exp(-(((xs - xs.mean()) / max(np.ptp(xs) / 4, 1)) ** 2))[:, None, None]
    weight = bone * wx
    total = weight.sum(axis=(0, 1))
    cx = np.where(total > 0, (weight * X).sum(axis=(0, 1)) / np.maximum(total, 1e-9), xs.mean())
    cy = np.where(total > 0, (weight * Y).sum(axis=(0, 1)) / np.maximum(total, 1e-9), ys.mean())
    if len(zs) > 3:
        cx = uniform_filter1d(cx, 5, mode="nearest")
        cy = uniform_filter1d(cy, 5, mode="nearest")
    return np.stack([np.interp(z, zs, cx), np.interp(z, zs, cy)], -1)


def _slab_views(ct: Volume, line_fn, step: float, slab_mm: float, crop_mm: float | None = None):
    """MIP images: sagittal (z, y) and coronal (z, x), sampled in RAS at `step` mm."""
    from scipy.ndimage import map_coordinates

    corners = ct.corners_world()
    lo, hi = corners.min(0), corners.max(0)
    zs = np.arange(lo[2], hi[2] + 1e-6, step)
    line = line_fn(zs)
    if crop_mm is not None:
        centre = np.median(line, axis=0)
        lo[:2] = np.maximum(lo[:2], centre - crop_mm)
        hi[:2] = np.minimum(hi[:2], centre + crop_mm)
    xs = np.arange(lo[0], hi[0] + 1e-6, step)
    ys = np.arange(lo[1], hi[1] + 1e-6, step)
    offsets = np.arange(-slab_mm / 2, slab_mm / 2 + 1e-6, min(step, max(float(ct.spacing.min()), 0.5)))
    data = ct.array if ct.array.dtype == np.float32 else ct.array.astype(np.float32)
    fill = float(min(data.min(), -1024.0)) if data.size else -1024.0
    views = []
    for lateral in (True, False):
        acc = None
        for off in offsets:
            if lateral:  # sagittal: x follows the line; image axes (z, y)
                Z, Yg = np.meshgrid(zs, ys, indexing="ij")
                Xg = line[:, 0][:, None] + off + 0 * Yg
            else:  # coronal: y follows the line; image axes (z, x)
                Z, Xg = np.meshgrid(zs, xs, indexing="ij")
                Yg = line[:, 1][:, None] + off + 0 * Xg
            ijk = ct.world_to_voxel(np.stack([Xg, Yg, Z], -1).reshape(-1, 3)).T
            v = map_coordinates(data, ijk, order=1, mode="constant", cval=fill).reshape(Z.shape)
            acc = v if acc is None else np.maximum(acc, v)
        views.append(acc)
    return views[0], views[1], (xs, ys, zs)


def render_views(ct: Volume, vertebrae=None, centerline_ras=None, title: str | None = None,
                 slab_mm: float = 12.0, window=BONE_WINDOW, step_mm: float | None = None, height_in: float = 7.0,
                 crop_mm: float | None = None):
    """A matplotlib Figure with sagittal and coronal slab MIPs of `ct` and labelled vertebrae.

    `vertebrae`: list of Vertebra (RAS mm) drawn as labelled dots; `centerline_ras`: (N, 3)
    points drawn as a line. The slab follows the vertebrae (or the centreline, or bone).
    `crop_mm`: show only this far (mm) to each side of the spine (default: the whole scan).
    """
    if not isinstance(ct, Volume) or ct.array.ndim != 3:
        raise VertebraIDError("QC views need a 3-D CT volume.")
    if ct.array.size == 0:
        raise VertebraIDError("The CT volume is empty.")
    Figure = figure_class()
    corners = ct.corners_world()
    extent = corners.max(0) - corners.min(0)
    if step_mm is None:
        step_mm = max(float(ct.spacing.min()), float(extent.max()) / 500.0, 0.5)
    vertebrae = list(vertebrae or [])
    sag, cor, (xs, ys, zs) = _slab_views(ct, lambda z: _spine_line(ct, vertebrae, centerline_ras, z), step_mm, slab_mm,
                                         crop_mm)
    widths = [max(len(ys), 1), max(len(xs), 1)]
    aspect_w = sum(widths) / max(len(zs), 1)
    fig = Figure(figsize=(max(height_in * aspect_w, 3.0) + 0.4, height_in + (0.5 if title else 0.2)), facecolor="black")
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": widths, "wspace": 0.02})
    vmin, vmax = window
    # sagittal: anterior on the left -> columns run from high y to low y
    axes[0].imshow(sag[:, ::-1], cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="bilinear",
                   extent=(ys[-1] + step_mm / 2, ys[0] - step_mm / 2, zs[0] - step_mm / 2, zs[-1] + step_mm / 2) if len(ys) > 1 else None)
    # coronal: patient right on the left -> columns run from high x to low x
    axes[1].imshow(cor[:, ::-1], cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="bilinear",
                   extent=(xs[-1] + step_mm / 2, xs[0] - step_mm / 2, zs[0] - step_mm / 2, zs[-1] + step_mm / 2) if len(xs) > 1 else None)
    axes[0].set_xlim(ys[-1] + step_mm / 2, ys[0] - step_mm / 2)
    axes[1].set_xlim(xs[-1] + step_mm / 2, xs[0] - step_mm / 2)
    for ax in axes:
        ax.set_ylim(zs[0] - step_mm / 2, zs[-1] + step_mm / 2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("black")
    if centerline_ras is not None and len(centerline_ras):
        c = np.asarray(centerline_ras, float).reshape(-1, 3)
        axes[0].plot(c[:, 1], c[:, 2], "-", color=(1.0, 0.4, 0.2), lw=0.8, alpha=0.8)
        axes[1].plot(c[:, 0], c[:, 2], "-", color=(1.0, 0.4, 0.2), lw=0.8, alpha=0.8)
    fontsize = max(5.0, min(9.0, 0.9 * height_in))
    for v in vertebrae:
        p = np.asarray(v.position, float)
        color, text = _label_style(v)
        for ax, horizontal in ((axes[0], p[1]), (axes[1], p[0])):
            ax.plot(horizontal, p[2], "o", ms=3.5, color=color, mec="black", mew=0.5)
            ax.annotate(text, (horizontal, p[2]), xytext=(5, 0), textcoords="offset points", color=color,
                        fontsize=fontsize, va="center", fontweight="bold")
    axes[0].set_title("sagittal", color="white", fontsize=fontsize)
    axes[1].set_title("coronal", color="white", fontsize=fontsize)
    if title:
        fig.suptitle(title, color="white", fontsize=fontsize + 1)
    return fig


def _landmark_panel(ax, marks, t_mm) -> None:
    """P(rib-bearing) and P(S1 or below) along the centreline; grey where not seen."""
    ax.plot(marks.rib, t_mm, color=REGION_COLORS["T"], lw=1.2, label="rib")
    ax.plot(marks.sacrum, t_mm, color=REGION_COLORS["S"], lw=1.2, label="sacrum")
    unseen = (marks.rib_visible < 0.5) & (marks.sacrum_visible < 0.5)
    ax.fill_betweenx(t_mm, 0, 1, where=unseen, color="0.85", lw=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(t_mm[-1], t_mm[0])
    ax.set_xticks([0, 0.5, 1])
    ax.set_yticks([])
    ax.set_title("ribs, sacrum", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")


def _label_style(vertebra) -> tuple:
    """(colour, text) of a vertebra's label: its region's colour, red with a '?' when it is one to check."""
    if vertebra.needs_check:
        return CHECK_COLOR, f"{vertebra.label}?"
    return REGION_COLORS.get(vertebra.label[0], (1.0, 1.0, 0.3)), vertebra.label


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a figure atomically (PNG, or the format the suffix names)."""
    suffix = os.path.splitext(str(path))[1] or ".png"
    fmt = suffix.lstrip(".").lower()
    if fmt not in ("png", "jpg", "jpeg", "pdf", "svg"):
        raise VertebraIDError(f"Cannot save a picture as '{path}'; use a .png, .jpg, .pdf or .svg name.")
    try:
        with atomic_path(path, suffix=suffix) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, facecolor=fig.get_facecolor(), bbox_inches="tight", pad_inches=0.05)
    except OSError as exc:
        raise VertebraIDError(f"Cannot write the picture '{path}' ({exc.strerror or exc}).") from exc


def _projection_views(volume: Volume, step_mm: float):
    """Coronal (z, x) and sagittal (z, y) maximum projections on a RAS grid, with its axes."""
    ras = resample_to_spacing(volume, step_mm)
    lo = ras.affine[:3, 3]
    axes = [lo[d] + np.arange(ras.array.shape[d]) * step_mm for d in range(3)]
    return ras.array.max(axis=1).T, ras.array.max(axis=0).T, axes


def _suptitle(fig, title: str | None, result) -> None:
    """The title, and in red why every label is to be checked when the whole chain was flagged."""
    why = next((v.flag_reason for v in result.vertebrae if v.flag_reason), "")
    if why:
        fig.suptitle(f"{title + ': ' if title else ''}check every label ({why})", color=CHECK_COLOR)
    elif title:
        fig.suptitle(title)


def result_figure(result, ct: Volume | None = None, title: str | None = None):
    """The pipeline at a glance: Ĝ with centreline and labels, the straightened spine, 1-D signals.

    Panels: coronal and sagittal projections of Ĝ (maximum over the body) with the centreline
    and the labelled vertebrae; the straightened Ĝ (and CT when given) seen from the side; the
    ribs and sacrum read from the CT (when they were); the 1-D signals Q̂ and Q_v along the
    centreline with the chosen positions.
    """
    Figure = figure_class()
    prepared = result.prepared
    rect = prepared.rectified
    show_ct = ct is not None and rect is not None
    show_marks = rect is not None and rect.landmarks is not None
    ncols = 4 + show_ct + show_marks
    fig = Figure(figsize=(3.2 * ncols + 2 - 2.2 * show_marks, 7.0))
    widths = [1] * (ncols - 1) + [1.6]
    if show_marks:
        widths[-2] = 0.45
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": widths})
    step = float(max(prepared.heatmaps.spacing.min(), 1.0))
    coronal, sagittal, (xs, ys, zs) = _projection_views(prepared.combined, step)
    top = float(coronal.max()) or 1.0
    axes[0].imshow(coronal, origin="lower", cmap="magma", vmin=0, vmax=top, extent=(xs[0], xs[-1], zs[0], zs[-1]))
    axes[0].invert_xaxis()  # patient right on the left
    axes[1].imshow(sagittal, origin="lower", cmap="magma", vmin=0, vmax=top, extent=(ys[0], ys[-1], zs[0], zs[-1]))
    axes[1].invert_xaxis()  # anterior on the left
    axes[0].set_title("Ĝ coronal (max)")
    axes[1].set_title("Ĝ sagittal (max)")
    if result.centerline is not None:
        c = result.centerline.points
        axes[0].plot(c[:, 0], c[:, 2], "-", color="cyan", lw=1)
        axes[1].plot(c[:, 1], c[:, 2], "-", color="cyan", lw=1)
    for v in result.vertebrae:
        color, text = _label_style(v)
        for ax, h in ((axes[0], v.position[0]), (axes[1], v.position[1])):
            ax.plot(h, v.position[2], "o", ms=3, color=color, mec="black", mew=0.4)
            ax.annotate(text, (h, v.position[2]), xytext=(4, 0), textcoords="offset points", color=color, fontsize=7)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_ylabel("S (mm)")

    signal_ax = axes[-1]
    if rect is None:
        for ax in axes[2:]:
            ax.text(0.5, 0.5, "no spine found", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        _suptitle(fig, title, result)
        return fig
    t_mm = np.arange(len(rect.combined_signal)) * rect.step_mm
    side = rect.combined.max(axis=1).T  # (Z, X); columns flipped below so anterior is on the left
    hw_mm = rect.grid.half_width * rect.step_mm
    axes[2].imshow(side[:, ::-1], cmap="magma", aspect="equal", extent=(hw_mm, -hw_mm, t_mm[-1], t_mm[0]))
    axes[2].set_title("straightened Ĝ (side)")
    axes[2].set_xlabel("anterior ← mm")
    axes[2].set_ylabel("along the centreline (mm)")
    if ct is not None:
        straight_ct = rect.straighten(ct, window_mm=60.0)
        mid = straight_ct.array.shape[1] // 2
        hw_ct = (straight_ct.array.shape[0] // 2) * rect.step_mm
        axes[3].imshow(straight_ct.array[::-1, mid, :].T, cmap="gray", vmin=BONE_WINDOW[0], vmax=BONE_WINDOW[1],
                       aspect="equal", extent=(hw_ct, -hw_ct, t_mm[-1], t_mm[0]))
        axes[3].set_title("straightened CT (mid-sagittal)")
    if show_marks:
        _landmark_panel(axes[-2], rect.landmarks, t_mm)
    signal_ax.plot(rect.combined_signal, t_mm, color="black", lw=1.2, label="Q̂")
    for c, name in enumerate(LEVELS_26):
        signal_ax.plot(rect.evidence[:, c], t_mm, color=REGION_COLORS[name[0]], lw=0.6, alpha=0.7)
    for v in result.vertebrae:
        z = v.extra.get("axis_index")
        if z is None:
            continue
        signal_ax.axhline(z * rect.step_mm, color=REGION_COLORS.get(v.region, "grey"), lw=0.5, ls=":")
        text = _label_style(v)[1]
        signal_ax.annotate(f"{text} {v.confidence:.2f}", (signal_ax.get_xlim()[1], z * rect.step_mm), fontsize=7,
                           va="center", ha="right", color=CHECK_COLOR if v.needs_check else "black")
    signal_ax.invert_yaxis()
    signal_ax.set_xlabel("activation (blob heights)")
    labeller = " + level labeller" if rect.level_signals is not None else ""
    signal_ax.set_title(f"1-D signals{labeller}, {result.method} (energy {result.energy:.1f})")
    _suptitle(fig, title, result)
    fig.tight_layout()
    return fig
