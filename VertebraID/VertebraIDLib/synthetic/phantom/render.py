"""CT voxel rendering: approximate signed distance fields evaluated only inside local boxes.

A `Solid` is a union of primitives (vertebral body, capsules, ellipsoids, shells) with a shell
HU (cortex, annulus...) and a core HU (cancellous bone, nucleus...). Each primitive carries
its own shell thickness, so the union has one continuous cortex without inner walls where
parts meet. Distances are "along the ray" approximations (exact on the surface, close nearby),
which is all that the cortex thickness and partial-volume anti-aliasing need.

Coordinates: the rendering grid is axis-aligned in its own frame (x along i, y along j, z
along k, millimetres); primitives are built in the patient frame and moved into the grid
frame with `Solid.transformed(rotation, translation)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F32 = np.float32
_EPS = 1e-6


# --------------------------------------------------------------------------- grid


@dataclass
class Grid:
    """An axis-aligned voxel grid: voxel (i, j, k) centre = origin + (i, j, k) * spacing."""

    origin: np.ndarray  # (3,) mm
    spacing: np.ndarray  # (3,) mm
    shape: tuple[int, int, int]

    def __post_init__(self):
        self.origin = np.asarray(self.origin, float)
        self.spacing = np.asarray(self.spacing, float)
        self.shape = tuple(int(n) for n in self.shape)

    def index_range(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel index slices whose centres lie inside the box [lo, hi] (None when empty)."""
        i0 = np.ceil((np.asarray(lo) - self.origin) / self.spacing).astype(int)
        i1 = np.floor((np.asarray(hi) - self.origin) / self.spacing).astype(int) + 1
        i0 = np.maximum(i0, 0)
        i1 = np.minimum(i1, self.shape)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1))

    def axes(self, box: tuple[slice, slice, slice]):
        """Broadcastable coordinate arrays (X (n,1,1), Y (1,m,1), Z (1,1,k)) of a box, float32."""
        out = []
        for axis, s in enumerate(box):
            c = (self.origin[axis] + self.spacing[axis] * np.arange(s.start, s.stop)).astype(F32)
            shape = [1, 1, 1]
            shape[axis] = c.size
            out.append(c.reshape(shape))
        return out

    @property
    def antialias_mm(self) -> float:
        return float(self.spacing.min())


def _sub_box(outer: tuple[slice, ...], inner: tuple[slice, ...] | None):
    """`inner` expressed relative to `outer` (both absolute index slices), clipped; None if empty."""
    if inner is None:
        return None
    rel = []
    for o, i in zip(outer, inner):
        a, b = max(i.start, o.start), min(i.stop, o.stop)
        if b <= a:
            return None
        rel.append(slice(a - o.start, b - o.start))
    return tuple(rel)


# --------------------------------------------------------------------------- primitives


def _local(X, Y, Z, centre, frame):
    """Local coordinates (u, v, w) of points in a frame whose columns are the local axes."""
    dx, dy, dz = X - F32(centre[0]), Y - F32(centre[1]), Z - F32(centre[2])
    f = frame.astype(F32)
    u = f[0, 0] * dx + f[1, 0] * dy + f[2, 0] * dz
    v = f[0, 1] * dx + f[1, 1] * dy + f[2, 1] * dz
    w = f[0, 2] * dx + f[1, 2] * dy + f[2, 2] * dz
    return u, v, w


def _ray_distance(r, rho, min_radius):
    """Along-ray signed distance from a point at radius r with normalised radius rho (1 = surface)."""
    safe = np.maximum(rho, F32(_EPS))
    d = r * (1 - 1 / safe)
    return np.where(rho > _EPS, d, F32(-min_radius))


class Primitive:
    """Base class: `sdf(X, Y, Z)` (mm, negative inside), `bbox()` and a shell thickness."""

    shell: float = 1.0
    planes: list  # half-spaces kept: n . (p - p0) <= 0

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounding box (lo, hi) in mm."""
        raise NotImplementedError

    def _sdf(self, X, Y, Z):
        raise NotImplementedError

    def sdf(self, X, Y, Z):
        """Signed distance (mm, negative inside) at points (..., 3)."""
        return self.sdf_pair(X, Y, Z)[0]

    def _planes(self, d, X, Y, Z):
        for p0, n in getattr(self, "planes", ()):
            d = np.maximum(d, (X - F32(p0[0])) * F32(n[0]) + (Y - F32(p0[1])) * F32(n[1]) + (Z - F32(p0[2])) * F32(n[2]))
        return d

    def sdf_pair(self, X, Y, Z):
        """(outer distance, inner distance): the inner surface bounds the core (shell removed)."""
        d = self._planes(self._sdf(X, Y, Z), X, Y, Z)
        return d, d + F32(self.shell)

    def transformed(self, rotation: np.ndarray, translation: np.ndarray) -> "Primitive":
        """The primitive rotated and translated."""
        raise NotImplementedError

    def _move_planes(self, rotation, translation):
        return [(rotation @ p0 + translation, rotation @ n) for p0, n in getattr(self, "planes", ())]


def _frame_bbox(centre, frame, half_extent):
    """World AABB of a box with given half extents along the columns of `frame`."""
    ext = np.abs(frame) @ np.asarray(half_extent, float)
    return centre - ext, centre + ext


@dataclass
class VertebralBody(Primitive):
    """Superelliptic cylinder with a concave posterior wall, a waist, wedge and cupped endplates.

    Local axes (frame columns): x lateral, y anterior, z superior; `centre` is the middle of the
    cross-section box (not necessarily the centroid; see `centroid_offset`).
    """

    centre: np.ndarray
    frame: np.ndarray
    width: float
    depth: float
    height_ant: float
    height_post: float
    concavity: float = 1.2  # endplate cupping (mm) at the centre
    waist: float = 0.06  # relative narrowing at mid-height
    exponent: float = 2.3
    posterior_concavity: float = 2.0  # mm the posterior wall bows forward at the midline
    rounding: float = 1.5
    shell: float = 0.8
    planes: list = field(default_factory=list)
    endplate: float = 0.0  # endplate thickness (mm) when thicker than the side walls

    def bbox(self):
        """Bounding box (lo, hi) in mm."""
        h = max(self.height_ant, self.height_post) / 2 + 1
        return _frame_bbox(self.centre, self.frame, (self.width / 2 + 1, self.depth / 2 + 1, h))

    def _sdf(self, X, Y, Z):
        u, v, w = _local(X, Y, Z, self.centre, self.frame)
        a, b = F32(self.width / 2), F32(self.depth / 2)
        hmax = F32(max(self.height_ant, self.height_post) / 2)
        waist = 1 - F32(self.waist) * np.maximum(1 - (w / hmax) ** 2, 0)
        a_w, b_w = a * waist, b * waist
        pull = F32(self.posterior_concavity) * np.maximum(1 - (u / a) ** 2, 0) * np.clip(-v / (0.3 * b), 0, 1)
        vv = v - pull
        p = F32(self.exponent)
        rho = (np.abs(u / a_w) ** p + np.abs(vv / b_w) ** p) ** (1 / p)
        r = np.sqrt(u * u + vv * vv)
        d_xy = _ray_distance(r, rho, min(self.width, self.depth) / 2)
        frac = np.clip(v / (2 * b) + F32(0.5), 0, 1)
        half = F32(self.height_post / 2) + F32((self.height_ant - self.height_post) / 2) * frac
        half = half - F32(self.concavity) * np.maximum(1 - rho * rho, 0)
        d_z = np.abs(w) - half
        rr = F32(self.rounding)
        q1, q2 = d_xy + rr, d_z + rr
        outside = np.sqrt(np.maximum(q1, 0) ** 2 + np.maximum(q2, 0) ** 2)
        d = np.minimum(np.maximum(q1, q2), 0) + outside - rr
        self._inner = np.maximum(d_xy + F32(self.shell), d_z + F32(max(self.endplate, self.shell)))
        return d

    def sdf_pair(self, X, Y, Z):
        """Signed distances of the outer body and its cancellous core at points (..., 3)."""
        d = self._sdf(X, Y, Z)
        inner = self._inner
        self._inner = None
        if not self.planes:
            return d, inner
        d = self._planes(d, X, Y, Z)
        return d, np.maximum(inner, d + F32(self.shell))

    def transformed(self, rotation, translation):
        """The body rotated and translated."""
        return VertebralBody(
            rotation @ self.centre + translation, rotation @ self.frame, self.width, self.depth,
            self.height_ant, self.height_post, self.concavity, self.waist, self.exponent,
            self.posterior_concavity, self.rounding, self.shell, self._move_planes(rotation, translation),
            self.endplate,
        )

    def centroid_offset(self) -> np.ndarray:
        """Local (x, y, z) offset of the solid's centroid from `centre`, integrated on a 2-D grid."""
        a, b = self.width / 2, self.depth / 2
        u, v = np.meshgrid(np.linspace(-a, a, 81), np.linspace(-b, b, 81), indexing="ij")
        pull = self.posterior_concavity * np.maximum(1 - (u / a) ** 2, 0) * np.clip(-v / (0.3 * b), 0, 1)
        rho = (np.abs(u / a) ** self.exponent + np.abs((v - pull) / b) ** self.exponent) ** (1 / self.exponent)
        frac = np.clip(v / (2 * b) + 0.5, 0, 1)
        height = self.height_post + (self.height_ant - self.height_post) * frac
        height = height - 2 * self.concavity * np.maximum(1 - rho**2, 0)
        weight = np.where(rho <= 1, np.maximum(height, 0), 0.0)
        return np.array([0.0, float((weight * v).sum() / weight.sum()), 0.0])


@dataclass
class Capsule(Primitive):
    """Segment a->b swept by an ellipse (radii along `up` and across), tapering from a to b.

    With `miter_a`/`miter_b` (unit normals pointing from a towards b) the end is an open cut by
    that plane instead of a rounded cap: consecutive segments of a tube then partition space
    and can be composited one by one without overlapping.
    """

    a: np.ndarray
    b: np.ndarray
    radius_a: tuple[float, float]  # (along up, across) at a
    radius_b: tuple[float, float]
    up: np.ndarray | None = None
    shell: float = 1.0
    miter_a: np.ndarray | None = None
    miter_b: np.ndarray | None = None
    planes: list = field(default_factory=list)

    def __post_init__(self):
        self.a = np.asarray(self.a, float)
        self.b = np.asarray(self.b, float)
        self.radius_a = tuple(float(r) for r in np.broadcast_to(self.radius_a, 2))
        self.radius_b = tuple(float(r) for r in np.broadcast_to(self.radius_b, 2))

    def _axes(self):
        ab = self.b - self.a
        length = float(np.linalg.norm(ab))
        e = ab / max(length, _EPS)
        up = np.array([0.0, 0.0, 1.0]) if self.up is None else np.asarray(self.up, float)
        f1 = up - e * (up @ e)
        if np.linalg.norm(f1) < 1e-3:
            f1 = np.cross(e, [1.0, 0.0, 0.0])
            if np.linalg.norm(f1) < 1e-3:
                f1 = np.cross(e, [0.0, 1.0, 0.0])
        f1 = f1 / np.linalg.norm(f1)
        f2 = np.cross(e, f1)
        return length, e, f1, f2

    def bbox(self):
        """Bounding box (lo, hi) in mm."""
        length, e, f1, f2 = self._axes()
        pad = 0.5
        ends = []
        for point, (r1, r2), miter in ((self.a, self.radius_a, self.miter_a), (self.b, self.radius_b, self.miter_b)):
            # the swept ellipse's extent per axis, plus the cap or the mitre's overhang
            half = np.sqrt((r1 * f1) ** 2 + (r2 * f2) ** 2) + pad
            if miter is None:
                cap = min(r1, r2) * np.abs(e)
            else:
                cos = max(abs(float(np.dot(miter, e))), 0.3)
                cap = max(r1, r2) * np.sqrt(max(1 / cos**2 - 1, 0.0)) * np.sqrt(1 - e**2) + 0.5
            ends.append((point - half - cap, point + half + cap))
        lo = np.minimum(ends[0][0], ends[1][0])
        hi = np.maximum(ends[0][1], ends[1][1])
        return lo, hi

    def _sdf(self, X, Y, Z):
        length, e, f1, f2 = self._axes()
        dx, dy, dz = X - F32(self.a[0]), Y - F32(self.a[1]), Z - F32(self.a[2])

        def dot(v):
            return dx * F32(v[0]) + dy * F32(v[1]) + dz * F32(v[2])

        # offsets across the axis do not depend on where along the axis the point projects
        p1 = dot(f1)
        p2 = dot(f2)
        t = dot(e) * F32(1 / max(length, _EPS))
        lo = -np.inf if self.miter_a is not None else 0.0
        hi = np.inf if self.miter_b is not None else 1.0
        tc = np.clip(t, lo, hi)
        oe = (t - tc) * F32(length)
        (ra1, ra2), (rb1, rb2) = self.radius_a, self.radius_b
        if ra1 == rb1 and ra2 == rb2:
            r1, r2 = F32(ra1), F32(ra2)
            rc = F32(min(ra1, ra2))
        else:
            tr = np.clip(t, 0, 1)
            r1 = F32(ra1) + F32(rb1 - ra1) * tr
            r2 = F32(ra2) + F32(rb2 - ra2) * tr
            rc = np.minimum(r1, r2)
        rho = np.sqrt((p1 / r1) ** 2 + (p2 / r2) ** 2 + (oe / rc) ** 2)
        r = np.sqrt(p1 * p1 + p2 * p2 + oe * oe)
        d = np.where(rho > F32(_EPS), r - r / np.maximum(rho, F32(_EPS)), F32(-min(self.radius_a + self.radius_b)))
        if self.miter_a is not None:
            d = np.where(dot(self.miter_a) < 0, F32(np.inf), d)
        if self.miter_b is not None:
            n = self.miter_b
            off = float(np.dot(self.b - self.a, n))
            d = np.where(dot(n) >= F32(off), F32(np.inf), d)
        return d

    def transformed(self, rotation, translation):
        """The capsule rotated and translated."""
        mv = lambda n: None if n is None else rotation @ n  # noqa: E731
        return Capsule(
            rotation @ self.a + translation, rotation @ self.b + translation, self.radius_a, self.radius_b,
            None if self.up is None else rotation @ np.asarray(self.up, float), self.shell,
            mv(self.miter_a), mv(self.miter_b), self._move_planes(rotation, translation),
        )


@dataclass
class Ellipsoid(Primitive):
    """Superellipsoid |x/a|^p + |y/b|^p + |z/c|^p <= 1 in a local frame (p = 2: ellipsoid)."""

    centre: np.ndarray
    frame: np.ndarray
    radii: tuple[float, float, float]
    exponent: float = 2.0
    shell: float = 1.0
    hollow: float = 0.0  # > 0: keep only a shell of this thickness (mm)
    planes: list = field(default_factory=list)

    def bbox(self):
        """Bounding box (lo, hi) in mm."""
        return _frame_bbox(np.asarray(self.centre, float), self.frame, np.asarray(self.radii) + 0.5)

    def _sdf(self, X, Y, Z):
        u, v, w = _local(X, Y, Z, self.centre, self.frame)
        a, b, c = (F32(r) for r in self.radii)
        if self.exponent == 2.0:
            rho = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
        else:
            p = F32(self.exponent)
            rho = (np.abs(u / a) ** p + np.abs(v / b) ** p + np.abs(w / c) ** p) ** (1 / p)
        r = np.sqrt(u * u + v * v + w * w)
        d = _ray_distance(r, rho, min(self.radii))
        if self.hollow > 0:
            d = np.abs(d + F32(self.hollow / 2)) - F32(self.hollow / 2)
        return d

    def transformed(self, rotation, translation):
        """The ellipsoid rotated and translated."""
        return Ellipsoid(
            rotation @ np.asarray(self.centre, float) + translation, rotation @ self.frame, self.radii,
            self.exponent, self.shell, self.hollow, self._move_planes(rotation, translation),
        )


@dataclass
class FunnelShell(Primitive):
    """A curved plate on an elliptic funnel (the iliac wing): radii and centre vary along local z.

    Local frame: x lateral (the plate is on the +x side), y anterior, z superior. The plate
    covers angles `angle_range` (0 = posterior, 90 = lateral, 180 = anterior, degrees) and
    heights `z_range`; its thickness grows towards the rim, the back and the bottom.
    """

    centre: np.ndarray
    frame: np.ndarray
    radius_x: tuple[float, float]  # at z_range[0] and z_range[1]
    radius_y: tuple[float, float]
    centre_y: tuple[float, float]  # funnel axis y offset at both heights
    z_range: tuple[float, float]
    angle_range: tuple[float, float]
    thickness: float = 3.0
    rim: float = 8.0  # extra thickness at the crest
    root: float = 14.0  # extra thickness at the bottom (towards the acetabulum) and the back
    crest_rise: float = 15.0  # the crest is higher in the middle of the angle range
    shell: float = 1.2
    planes: list = field(default_factory=list)
    start_angle_bottom: float | None = None  # the back edge moves forward lower down (sciatic notch)

    def bbox(self):
        # sample the plate's mid-surface over its angle and height ranges
        """Bounding box (lo, hi) in mm."""
        ang = np.radians(np.linspace(*self.angle_range, 13))[:, None]
        s = np.linspace(0.0, 1.0, 6)[None, :]
        z = self.z_range[0] + (self.z_range[1] + self.crest_rise - self.z_range[0]) * s
        sc = np.clip(s * (self.z_range[1] - self.z_range[0]) / (self.z_range[1] + self.crest_rise - self.z_range[0]), 0, 1)
        rx = self.radius_x[0] + (self.radius_x[1] - self.radius_x[0]) * sc
        ry = self.radius_y[0] + (self.radius_y[1] - self.radius_y[0]) * sc
        cy = self.centre_y[0] + (self.centre_y[1] - self.centre_y[0]) * sc
        local = np.stack(np.broadcast_arrays(rx * np.sin(ang), cy - ry * np.cos(ang), z + 0 * ang), -1).reshape(-1, 3)
        world = local @ np.asarray(self.frame, float).T + np.asarray(self.centre, float)
        pad = (self.thickness + self.rim + self.root) / 2 + 3
        return world.min(0) - pad, world.max(0) + pad

    def _sdf(self, X, Y, Z):
        u, v, w = _local(X, Y, Z, self.centre, self.frame)
        z0, z1 = self.z_range
        s = np.clip((w - F32(z0)) / F32(z1 - z0), 0, 1)
        rx = F32(self.radius_x[0]) + F32(self.radius_x[1] - self.radius_x[0]) * s
        ry = F32(self.radius_y[0]) + F32(self.radius_y[1] - self.radius_y[0]) * s
        vc = v - (F32(self.centre_y[0]) + F32(self.centre_y[1] - self.centre_y[0]) * s)
        rho = np.sqrt((u / rx) ** 2 + (vc / ry) ** 2)
        r = np.sqrt(u * u + vc * vc)
        radial = r * (1 - 1 / np.maximum(rho, F32(_EPS)))  # signed distance to the funnel surface
        angle = np.degrees(np.arctan2(u, -vc)).astype(F32)
        a0, a1 = (F32(x) for x in self.angle_range)
        if self.start_angle_bottom is not None:
            a0 = F32(self.start_angle_bottom) + (a0 - F32(self.start_angle_bottom)) * s
        pos = np.clip((angle - a0) / (a1 - a0), 0, 1)  # 0 at the back, 1 at the front
        crest = F32(z1) + F32(self.crest_rise) * np.sin(np.pi * pos) - F32(self.crest_rise) * F32(0.4) * pos
        below_crest = crest - w
        near_rim = np.clip(1 - below_crest / F32(10), 0, 1) ** 2
        near_root = np.clip(1 - (w - F32(z0)) / F32(35), 0, 1) ** 2
        arc_from_back = (angle - a0) * r * F32(np.pi / 180)
        near_back = np.clip(1 - arc_from_back / F32(30), 0, 1) ** 2
        half = (F32(self.thickness / 2) + F32(self.rim / 2) * near_rim
                + F32(self.root / 2) * np.maximum(near_root, near_back))
        d = np.abs(radial) - half
        d = np.maximum(d, w - crest)
        d = np.maximum(d, F32(z0) - w)
        arc = r * F32(np.pi / 180)
        d = np.maximum(d, (a0 - angle) * arc)
        d = np.maximum(d, (angle - a1) * arc)
        return d.astype(F32)

    def transformed(self, rotation, translation):
        """The shell rotated and translated."""
        return FunnelShell(
            rotation @ np.asarray(self.centre, float) + translation, rotation @ self.frame, self.radius_x,
            self.radius_y, self.centre_y, self.z_range, self.angle_range, self.thickness, self.rim, self.root,
            self.crest_rise, self.shell, self._move_planes(rotation, translation), self.start_angle_bottom,
        )


def tube(points, radii, up=None, shell=1.0, caps=(True, True)) -> list[Capsule]:
    """A curved tube through `points` (N, 3) as mitred capsules (disjoint, see `Capsule`).

    `radii`: (N, 2) (along `up`, across) per point, or a pair for all. `up`: (N, 3) or (3,).
    """
    points = np.asarray(points, float)
    n = len(points)
    radii = np.broadcast_to(np.asarray(radii, float), (n, 2))
    ups = None if up is None else np.broadcast_to(np.asarray(up, float), (n, 3))
    dirs = np.diff(points, axis=0)
    dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), _EPS)
    out = []
    for k in range(n - 1):
        miter_a = miter_b = None
        if k > 0:
            m = dirs[k - 1] + dirs[k]
            miter_a = m / np.linalg.norm(m)
        elif not caps[0]:
            miter_a = dirs[0]
        if k < n - 2:
            m = dirs[k] + dirs[k + 1]
            miter_b = m / np.linalg.norm(m)
        elif not caps[1]:
            miter_b = dirs[-1]
        seg_up = None if ups is None else 0.5 * (ups[k] + ups[k + 1])
        out.append(Capsule(points[k], points[k + 1], radii[k], radii[k + 1], seg_up, shell, miter_a, miter_b))
    return out


# --------------------------------------------------------------------------- solids


@dataclass
class Solid:
    """A union of primitives rendered with a shell HU and a core HU (and optionally a label).

    `partitioned`: the primitives do not overlap (a mitred tube), so each is composited on its
    own box instead of one union box (much cheaper for long curved bones such as ribs).
    `carve`: primitives removed from the union (holes get their own shell).
    `texture`: relative amplitude of voxel noise in the core HU (trabecular pattern).
    """

    name: str
    parts: list
    shell_hu: float
    core_hu: float
    label: int = 0
    partitioned: bool = False
    carve: list = field(default_factory=list)
    body: list = field(default_factory=list)  # (part index, label) of vertebral bodies, for the body mask
    metal: bool = False
    texture: float = 0.0  # relative amplitude of voxel noise in the core (trabecular pattern)

    def transformed(self, rotation, translation) -> "Solid":
        """The solid (all its primitives) rotated and translated."""
        return Solid(
            self.name, [p.transformed(rotation, translation) for p in self.parts], self.shell_hu, self.core_hu,
            self.label, self.partitioned, [p.transformed(rotation, translation) for p in self.carve],
            list(self.body), self.metal, self.texture,
        )


def _box_of(prims, grid: Grid, pad: float):
    los, his = zip(*(p.bbox() for p in prims))
    lo = np.min(los, axis=0) - pad
    hi = np.max(his, axis=0) + pad
    return grid.index_range(lo, hi)


def _union(prims, grid: Grid, box, with_shell=True):
    shape = tuple(s.stop - s.start for s in box)
    D = np.full(shape, np.inf, F32)
    D_in = np.full(shape, np.inf, F32) if with_shell else None
    for p in prims:
        sub = _sub_box(box, grid.index_range(*p.bbox()))
        if sub is None:
            continue
        absolute = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
        if with_shell:
            d, d_in = p.sdf_pair(*grid.axes(absolute))
            np.minimum(D_in[sub], d_in, out=D_in[sub])
        else:
            d = p.sdf(*grid.axes(absolute))
        np.minimum(D[sub], d, out=D[sub])
    return D, D_in


def composite(solid: Solid, grid: Grid, ct: np.ndarray, mask: np.ndarray | None = None,
              body_mask: np.ndarray | None = None, rng=None) -> None:
    """Render one solid into `ct` (float32 HU, in place), and its label into `mask`.

    With `rng` and a `texture`, the core HU varies voxel by voxel (trabecular bone)."""
    groups = [[p] for p in solid.parts] if solid.partitioned else [solid.parts]
    aa = F32(grid.antialias_mm)
    for prims in groups:
        box = _box_of(prims + solid.carve, grid, pad=float(aa))
        if box is None:
            continue
        D, D_in = _union(prims, grid, box)
        for c in solid.carve:
            sub = _sub_box(box, grid.index_range(*c.bbox()))
            if sub is None:
                continue
            absolute = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
            dc = c.sdf(*grid.axes(absolute))
            np.maximum(D[sub], -dc, out=D[sub])
            np.maximum(D_in[sub], F32(c.shell) - dc, out=D_in[sub])
        a_out = np.clip(F32(0.5) - D / aa, 0, 1)
        if not a_out.any():
            continue
        a_in = np.clip(F32(0.5) - D_in / aa, 0, 1)
        if rng is not None and solid.texture > 0:
            core = rng.standard_normal(a_in.shape, dtype=F32)
            core *= F32(solid.texture * abs(solid.core_hu))
            core += F32(solid.core_hu)
            value = F32(solid.shell_hu) * (a_out - a_in) + core * a_in
        else:
            value = F32(solid.shell_hu) * (a_out - a_in) + F32(solid.core_hu) * a_in
        region = ct[box]
        region *= 1 - a_out
        region += value
        if mask is not None and solid.label:
            mask[box][D < 0] = solid.label
        if body_mask is not None and solid.body and not solid.partitioned:
            for index, label in solid.body:
                Db, _ = _union([prims[index]], grid, box, with_shell=False)
                body_mask[box][Db < 0] = label
