"""Phantom benchmarks: how realistic and how fast the synthetic spine CTs are.

    python bench/phantom.py gallery    # 12 diverse phantoms next to the real ts_lumbar scan
    python bench/phantom.py realism    # HU histograms (bone, soft tissue) vs ts_lumbar and tptbox_lumbar;
                                       # vertebral body dimensions per level vs the published values
    python bench/phantom.py speed      # generation time per case
    python bench/phantom.py all

Tables are printed; pictures and a results file go to bench/results/ (PNGs kept < 500 KB).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "VertebraID"))

from VertebraIDLib.engine.anatomy import LABEL_IDS
from VertebraIDLib.evaluation.qc import render_views
from VertebraIDLib.io.cases import (
    TOTALSEG_LEVELS,
    TOTALSEG_SACRUM,
    load_case,
    read_label_mask,
)
from VertebraIDLib.io.images import read_image
from VertebraIDLib.synthetic.phantom import generate_phantom
from VertebraIDLib.synthetic.phantom.morphometry import FEMALE_SCALE, PUBLISHED

REALCT = ROOT.parent / "shared" / "data" / "realct"
CROP_MM = 160.0  # views show this far to each side of the spine
PANEL_PX = 270
RESULTS = ROOT / "bench" / "results"

GALLERY = [
    ("lumbar, random conditions", dict(levels="T10..S2")),
    ("chest, female", dict(levels="T1..T12", sex="female", pathologies=["contrast"])),
    ("neck", dict(levels="C1..T2", pathologies=[])),
    ("whole spine, 2.5 mm", dict(levels="full", spacing=2.5, pathologies=[])),
    ("two severe fractures", dict(levels="T8..L4", pathologies=["fracture", "osteoporosis"], fractures=2,
                                  fracture_grade="severe")),
    ("scoliosis 45 deg", dict(levels="T3..L5", scoliosis_deg=45, pathologies=["scoliosis"])),
    ("pedicle screws", dict(levels="T11..S2", pathologies=["screws"])),
    ("hip prosthesis", dict(levels="L3..S2", pathologies=["hip_prosthesis"], shape=(300, 300, 250), spacing=1.5)),
    ("low dose, blur", dict(levels="T9..L5", pathologies=["low_dose", "blur"])),
    ("L6 (transitional)", dict(levels="T12..S2", transitional="L6", pathologies=[])),
    ("13 rib pairs (T13)", dict(levels="T8..L3", transitional="13_ribs", pathologies=[])),
    ("oblique 25 deg, PIR, 5 mm slices, cut", dict(levels="T6..L2", oblique_deg=25, orientation="PIR",
                                                   spacing=(0.9, 5.0), cut=True, pathologies=[])),
]


# --------------------------------------------------------------------------- helpers


def _figure_rgb(fig, height_px: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="black", bbox_inches="tight", pad_inches=0.02)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    w = int(round(img.width * height_px / img.height))
    return np.asarray(img.resize((w, height_px), Image.LANCZOS))


def _save_png(rgb: np.ndarray, path: Path, colors: int = 96) -> int:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb).quantize(colors=colors, method=Image.MEDIANCUT, dither=Image.NONE)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp, optimize=True)
    tmp.replace(path)
    return path.stat().st_size


def _tile(panels, columns: int, pad: int = 6) -> np.ndarray:
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    height = max(p.shape[0] for p in panels)
    widths = [sum(p.shape[1] for p in row) + pad * (len(row) - 1) for row in rows]
    out = np.zeros((len(rows) * height + pad * (len(rows) - 1), max(widths), 3), np.uint8)
    y = 0
    for row in rows:
        x = 0
        for p in row:
            out[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += p.shape[1] + pad
        y += height + pad
    return out


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(str(h).rjust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- gallery


def gallery(seed: int = 100) -> dict:
    """12 diverse phantoms and the real ts_lumbar scan, all drawn by qc.render_views."""
    panels, rows = [], []
    real = load_case(REALCT / "ts_lumbar")
    fig = render_views(real.image, real.truth, title="REAL: ts_lumbar (TotalSegmentator test CT)", height_in=4.0,
                       crop_mm=CROP_MM)
    panels.append(_figure_rgb(fig, PANEL_PX))
    for k, (name, kwargs) in enumerate(GALLERY):
        start = time.perf_counter()
        p = generate_phantom(seed + k, **kwargs)
        elapsed = time.perf_counter() - start
        levels = p.meta["levels_in_image"]
        title = f"phantom {seed + k}: {name}"
        fig = render_views(p.ct, p.truth, title=title, height_in=4.0, crop_mm=CROP_MM)
        panels.append(_figure_rgb(fig, PANEL_PX))
        rows.append([seed + k, name, f"{levels[0]}..{levels[-1]}" if levels else "-", "x".join(map(str, p.ct.shape3)),
                     "/".join(f"{s:g}" for s in p.meta["scan"]["spacing_mm"]), ",".join(p.meta["pathologies"]) or "-",
                     f"{elapsed:.1f}"])
    size = _save_png(_tile(panels, columns=5), RESULTS / "phantom_gallery.png", colors=48)
    print(_table(rows, ["seed", "case", "levels", "shape", "spacing", "conditions", "s"]))
    print(f"\nwrote {RESULTS / 'phantom_gallery.png'} ({size / 1024:.0f} KB)")
    return {"cases": rows, "png_kb": round(size / 1024)}


# --------------------------------------------------------------------------- HU realism


def _body_region(ct: np.ndarray) -> np.ndarray:
    """Voxels inside the patient: the largest connected component above -500 HU, filled per slice."""
    from scipy import ndimage

    inside = ct > -500
    labels, n = ndimage.label(inside)
    if n == 0:
        return inside
    sizes = ndimage.sum(inside, labels, range(1, n + 1))
    body = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(body)


def _hu_samples(ct: np.ndarray, bone: np.ndarray, body_core: np.ndarray | None):
    body = _body_region(ct)
    soft = body & ~bone & (ct > -300) & (ct < 250)
    from scipy import ndimage

    soft &= ~ndimage.binary_dilation(bone, iterations=2)
    out = {"bone (vertebra mask)": ct[bone], "soft tissue (-300..250, body)": ct[soft]}
    if body_core is not None:
        out["cancellous (body interior)"] = ct[body_core]
    return out


def _phantoms_like(spacing, levels, n, seed, **kw):
    for k in range(n):
        p = generate_phantom(seed + k, levels=levels, spacing=spacing, orientation="RAS", with_body_mask=True,
                             pathologies=[], cut=False, **kw)
        yield p


def realism(seed: int = 300, n: int = 4) -> dict:
    from scipy import ndimage

    results = {}
    # --- real scans
    ts = load_case(REALCT / "ts_lumbar")
    seg = read_label_mask(REALCT / "ts_lumbar" / "seg_totalseg.nii.gz").array
    ts_bone = np.isin(seg, list(TOTALSEG_LEVELS) + [TOTALSEG_SACRUM])
    ts_core = ndimage.binary_erosion(np.isin(seg, [k for k, v in TOTALSEG_LEVELS.items() if v[0] == "L"]), iterations=2)
    real_ts = _hu_samples(ts.image.array, ts_bone, ts_core)
    tpt_ct = read_image(REALCT / "tptbox_lumbar" / "ct.nii.gz").array
    tpt_vert = read_label_mask(REALCT / "tptbox_lumbar" / "seg_vert.nii.gz").array > 0
    tpt_sub = read_label_mask(REALCT / "tptbox_lumbar" / "seg_subreg.nii.gz").array
    real_tpt = _hu_samples(tpt_ct, tpt_vert, tpt_sub == 50)
    # --- phantoms at each real scan's spacing (lumbar, no pathologies)
    ph = {}
    for key, spacing in (("phantom @3 mm", 3.0), ("phantom @1.5 mm", 1.5)):
        acc = {}
        for p in _phantoms_like(spacing, "T11..S1", n, seed):
            bone = p.mask.array > 0
            core = ndimage.binary_erosion(np.isin(p.body_mask.array, [LABEL_IDS[f"L{i}"] for i in range(1, 6)]),
                                          iterations=max(1, int(round(3 / spacing))))
            for name, values in _hu_samples(p.ct.array.astype(np.float32), bone, core).items():
                acc.setdefault(name, []).append(values)
        ph[key] = {k: np.concatenate(v) for k, v in acc.items()}
    sources = {"ts_lumbar (3 mm)": real_ts, "phantom @3 mm": ph["phantom @3 mm"],
               "tptbox_lumbar (1.5 mm)": real_tpt, "phantom @1.5 mm": ph["phantom @1.5 mm"]}
    rows = []
    for tissue in ["bone (vertebra mask)", "cancellous (body interior)", "soft tissue (-300..250, body)"]:
        for src, data in sources.items():
            v = data.get(tissue)
            if v is None or v.size == 0:
                continue
            q = np.percentile(v, [5, 25, 50, 75, 95])
            rows.append([tissue, src, v.size] + [f"{x:.0f}" for x in q])
    print(_table(rows, ["tissue", "source", "voxels", "p5", "p25", "p50", "p75", "p95"]))
    results["hu_percentiles"] = rows
    _plot_histograms(sources, RESULTS / "phantom_hu_histograms.png")
    print(f"\nwrote {RESULTS / 'phantom_hu_histograms.png'}")
    results["dimensions"] = dimensions(seed + 50)
    return results


def _plot_histograms(sources, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tissues = [("bone (vertebra mask)", (-200, 1600)), ("cancellous (body interior)", (-100, 500)),
               ("soft tissue (-300..250, body)", (-300, 250))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"ts_lumbar (3 mm)": ("k", "-"), "phantom @3 mm": ("tab:red", "-"),
              "tptbox_lumbar (1.5 mm)": ("k", "--"), "phantom @1.5 mm": ("tab:red", "--")}
    for ax, (tissue, rng) in zip(axes, tissues):
        bins = np.linspace(*rng, 90)
        for src, data in sources.items():
            v = data.get(tissue)
            if v is None or v.size == 0:
                continue
            h, _ = np.histogram(np.clip(v, *rng), bins=bins, density=True)
            color, ls = styles[src]
            ax.plot(0.5 * (bins[1:] + bins[:-1]), h, color=color, ls=ls, label=src, lw=1.3)
        ax.set_title(tissue)
        ax.set_xlabel("HU")
        ax.set_yticks([])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    from PIL import Image

    _save_png(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), path, colors=64)


# --------------------------------------------------------------------------- body dimensions


def _extents(points: np.ndarray, axis_z: np.ndarray, voxel: float):
    """Width (lateral), depth (AP) and height (along the spine) of a point cloud, mm."""
    ez = axis_z / np.linalg.norm(axis_z)
    ex = np.array([1.0, 0.0, 0.0]) - ez * ez[0]
    ex /= np.linalg.norm(ex)
    ey = np.cross(ez, ex)
    c = points - points.mean(0)
    out = []
    for e in (ex, ey, ez):
        proj = c @ e
        out.append(float(np.ptp(proj)) + voxel)
    return out


def dimensions(seed: int = 350, n: int = 4, spacing: float = 0.8) -> dict:
    """Measure the rendered vertebral bodies (body mask) in the vertebra frame against the table.

    Phantoms: adult males of size 1 (so the expected values are the published ones, up to the
    2.5 % per-level jitter), no pathologies, no tilt. Height is the extent along the spine axis
    (so it is the larger of the anterior and posterior heights); width and depth are the
    largest extents (the endplate rims), as the published endplate widths and depths.
    """
    measured = {}
    for k in range(n):
        p = generate_phantom(seed + k, levels="C3..L5", spacing=spacing, matrix=160, orientation="RAS", tilt_deg=0,
                             with_body_mask=True, pathologies=[], noise_hu=0, sex="male", size=1.0, transitional="none",
                             cut=False)
        truth = p.truth
        for i, v in enumerate(truth):
            vox = np.argwhere(p.body_mask.array == LABEL_IDS[v.label])
            if len(vox) < 50:
                continue
            pts = p.body_mask.voxel_to_world(vox)
            a = truth[max(i - 1, 0)].position
            b = truth[min(i + 1, len(truth) - 1)].position
            measured.setdefault(v.label, []).append(_extents(pts, a - b, spacing))
    rows, table = [], {}
    for label in [f"C{i}" for i in range(3, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]:
        if label not in measured:
            continue
        m = np.array(measured[label])
        pub = PUBLISHED[label]
        ref = (pub.width, pub.depth, max(pub.height_ant, pub.height_post))
        mean = m.mean(0)
        rows.append([label] + [f"{r:.1f} / {x:.1f}" for r, x in zip(ref, mean)]
                    + [f"{100 * (x - r) / r:+.0f}%" for r, x in zip(ref, mean)])
        table[label] = {"published": ref, "measured_mean": mean.round(2).tolist(), "n": len(m)}
    print("\nVertebral body size, published / measured on the rendered body mask (mm), male, size 1:")
    print(_table(rows, ["level", "width", "depth", "height", "dW", "dD", "dH"]))
    print(f"(female phantoms are scaled by {FEMALE_SCALE[0]} laterally and {FEMALE_SCALE[1]} vertically)")
    return table


# --------------------------------------------------------------------------- speed


def speed(repeats: int = 3) -> dict:
    cases = [
        ("256x256x300 @1.5 mm, T10..S2, clean", dict(shape=(256, 256, 300), spacing=1.5, levels="T10..S2", pathologies=[])),
        ("256x256x300 @1.5 mm, screws + streaks", dict(shape=(256, 256, 300), spacing=1.5, levels="T10..S2",
                                                       pathologies=["screws", "low_dose"])),
        ("128x128x128 @2.5 mm (training patch)", dict(shape=(128, 128, 128), spacing=2.5)),
        ("512x512x200 @0.8/1.5 mm (clinical)", dict(shape=(512, 512, 200), spacing=(0.8, 1.5), levels="L1..L5")),
        ("random defaults", dict()),
    ]
    rows, out = [], {}
    for name, kwargs in cases:
        times, stages = [], []
        for r in range(repeats):
            start = time.perf_counter()
            p = generate_phantom(1000 + r, **kwargs)
            times.append(time.perf_counter() - start)
            stages.append(p.meta["timings_s"])
        med = float(np.median(times))
        st = {k: float(np.median([s[k] for s in stages])) for k in stages[0]}
        rows.append([name, "x".join(map(str, p.ct.shape3)), f"{med:.2f}", f"{min(times):.2f}",
                     f"{st['anatomy']:.2f}", f"{st['soft_tissue']:.2f}", f"{st['bones']:.2f}", f"{st['image']:.2f}"])
        out[name] = {"median_s": round(med, 3), "min_s": round(min(times), 3), "stages_s": st}
    print(_table(rows, ["case", "shape (last run)", "median s", "min s", "anatomy", "soft", "bones", "image"]))
    print(f"(one core, {repeats} runs each; numpy/scipy single-threaded)")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["gallery", "realism", "speed", "all"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not REALCT.is_dir() and args.what in ("gallery", "realism", "all"):
        sys.exit(f"needs the real scans in {REALCT}")
    results = {}
    if args.what in ("gallery", "all"):
        results["gallery"] = gallery()
    if args.what in ("realism", "all"):
        results["realism"] = realism()
    if args.what in ("speed", "all"):
        results["speed"] = speed(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"phantom_{args.what}.json"
    target.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
