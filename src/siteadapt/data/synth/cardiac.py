"""The ``cardiac`` task's generator: a parametric whole-heart phantom in world millimetres and its two scanners
(black-blood MR written as NIfTI, contrast-enhanced CT written as a DICOM series per subject). See the package
docstring for what each site looks like and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .common import _quiet_encoders, _random_rotation, _rng, _side_rng, _unit

CARDIAC_LABELS = {"MYO": 1, "LAC": 2, "LVC": 3, "AA": 4}

# tissue classes of the cardiac phantom
AIR, LUNG, FAT, MUSCLE, MYOCARD, BLOOD, BLOOD_R, CORTICAL, MARROW, LIVER, CSF, CARTILAGE, VESSEL = range(13)
TISSUES = ("air", "lung", "fat", "muscle", "myocardium", "blood", "blood_right", "cortical_bone", "marrow", "liver",
           "csf", "cartilage", "lung_vessel")

# CT: Hounsfield units (mean, texture std) of a contrast-enhanced (arterial phase) cardiac CT
_CT_HU = {AIR: (-1000, 4), LUNG: (-850, 25), FAT: (-100, 14), MUSCLE: (45, 10), MYOCARD: (115, 14), BLOOD: (340, 22),
          BLOOD_R: (260, 40), CORTICAL: (900, 90), MARROW: (260, 45), LIVER: (85, 9), CSF: (12, 6),
          CARTILAGE: (105, 18), VESSEL: (120, 60)}
# MR: black-blood fast spin echo-like signal relative to fat (mean, texture std). Flowing blood is suppressed by the
# double inversion, incompletely (slow flow near the walls leaves ~15-20% of the fat signal), so the cavities are
# darker than the myocardium but brighter than lung and cortical bone. Why black blood and not bSSFP (the MMWHS MR):
# with bright blood in both modalities, a CNN trained on one modality already segments the other fairly well, while
# on the real MMWHS data it mostly fails (SIFA Table I): the appearance gap a real cross-modality pair has comes from
# many factors a phantom lacks, and reversing the blood/myocardium contrast is the one factor that recreates a gap of
# that size while keeping each modality realistic on its own.
_MR_REL = {AIR: (0.0, 0.0), LUNG: (0.04, 0.02), FAT: (0.95, 0.05), MUSCLE: (0.30, 0.03), MYOCARD: (0.42, 0.035),
           BLOOD: (0.18, 0.03), BLOOD_R: (0.20, 0.04), CORTICAL: (0.03, 0.01), MARROW: (0.75, 0.06), LIVER: (0.45, 0.03),
           CSF: (1.0, 0.05), CARTILAGE: (0.35, 0.04), VESSEL: (0.15, 0.04)}




class _Warp:
    """A smooth random displacement field: a few sine modes per component (organic shapes, no boxes)."""

    def __init__(self, rng, amp_mm: float, wavelength_mm: tuple[float, float], n_modes: int = 4):
        self.k = []
        for _ in range(n_modes):
            direction = _unit(rng.normal(size=3))
            lam = rng.uniform(*wavelength_mm)
            self.k.append((2 * np.pi / lam * direction, rng.uniform(0, 2 * np.pi),
                           rng.normal(size=3) * amp_mm / np.sqrt(n_modes)))

    def __call__(self, P: np.ndarray) -> np.ndarray:
        out = P.astype(np.float32, copy=True)
        for wvec, phase, a in self.k:
            w = wvec.astype(np.float32)
            s = np.sin(w[0] * P[0] + w[1] * P[1] + w[2] * P[2] + np.float32(phase))
            for r in range(3):
                out[r] += np.float32(a[r]) * s
        return out


def _ellipsoid_sdf(Q: np.ndarray, axes) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid centred at 0 (Q: (3, N) local coordinates)."""
    a, b, c = (np.float32(1.0 / v) for v in axes)
    x, y, z = Q[0] * a, Q[1] * b, Q[2] * c
    k0 = np.sqrt(x * x + y * y + z * z)
    x *= a
    y *= b
    z *= c
    k1 = np.sqrt(x * x + y * y + z * z)
    return k0 * (k0 - 1) / np.maximum(k1, np.float32(1e-6))


def _ellipse_sdf2(x, y, a, b):
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return k0 * (k0 - 1) / np.maximum(k1, 1e-6)


def _curve(ctrl, n: int = 24) -> np.ndarray:
    """A smooth curve through control points (Catmull-Rom), sampled at ``n`` points per segment; (M, 3)."""
    c = np.asarray(ctrl, dtype=np.float64)
    c = np.vstack([2 * c[0] - c[1], c, 2 * c[-1] - c[-2]])
    pts = []
    for i in range(1, len(c) - 2):
        p0, p1, p2, p3 = c[i - 1], c[i], c[i + 1], c[i + 2]
        for t in np.linspace(0, 1, n, endpoint=False):
            t2, t3 = t * t, t * t * t
            pts.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    pts.append(c[-2])
    return np.array(pts)


@dataclass
class _Tube:
    """A vessel (or airway) of varying radius along a smooth centre line."""

    pts: np.ndarray  # (M, 3)
    radii: np.ndarray  # (M,)
    lumen: int
    wall: int = MUSCLE
    wall_mm: float = 1.5
    label: int = 0
    label_arc_mm: tuple[float, float] | None = None  # label only this arc-length range (mm from the start)
    arc: np.ndarray = field(init=False)

    def __post_init__(self):
        seg = np.linalg.norm(np.diff(self.pts, axis=0), axis=1)
        self.arc = np.concatenate([[0.0], np.cumsum(seg)])

    def sdf(self, P: np.ndarray):
        """Signed distance to the lumen surface and arc length of the nearest centre-line point, for the points of
        ``P`` (3, N) near the tube: returns (indices into P, distance, arc length).

        Segments are handled in groups, each on the points inside the group's bounding box (grown by the radius), so
        a long tube costs little more than a short one."""
        margin = float(self.radii.max()) + self.wall_mm + 1.0
        pts = self.pts.astype(np.float32)
        lo, hi = pts.min(0) - margin, pts.max(0) + margin
        cand = np.flatnonzero((P[0] >= lo[0]) & (P[0] <= hi[0]) & (P[1] >= lo[1]) & (P[1] <= hi[1])
                              & (P[2] >= lo[2]) & (P[2] <= hi[2]))
        X = P[:, cand]
        best = np.full(cand.size, np.inf, dtype=np.float32)
        arc = np.zeros(cand.size, dtype=np.float32)
        m = len(pts) - 1
        group = 6
        for g0 in range(0, m, group):
            g1 = min(m, g0 + group)
            glo = pts[g0:g1 + 1].min(0) - margin
            ghi = pts[g0:g1 + 1].max(0) + margin
            sel = np.flatnonzero((X[0] >= glo[0]) & (X[0] <= ghi[0]) & (X[1] >= glo[1]) & (X[1] <= ghi[1])
                                 & (X[2] >= glo[2]) & (X[2] <= ghi[2]))
            if sel.size == 0:
                continue
            qx, qy, qz = X[0, sel], X[1, sel], X[2, sel]
            b_sub = best[sel]
            a_sub = arc[sel]
            for i in range(g0, g1):
                a, b = pts[i], pts[i + 1]
                ab = b - a
                L2 = float(ab @ ab) or 1e-6
                dx, dy, dz = qx - a[0], qy - a[1], qz - a[2]
                t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) * np.float32(1.0 / L2), 0, 1)
                dx -= t * ab[0]
                dy -= t * ab[1]
                dz -= t * ab[2]
                r0, r1 = np.float32(self.radii[i]), np.float32(self.radii[i + 1])
                dist = np.sqrt(dx * dx + dy * dy + dz * dz) - (r0 + t * (r1 - r0))
                mm = dist < b_sub
                b_sub[mm] = dist[mm]
                a_sub[mm] = np.float32(self.arc[i]) + t[mm] * np.float32(self.arc[i + 1] - self.arc[i])
            best[sel] = b_sub
            arc[sel] = a_sub
        keep = best < self.wall_mm
        return cand[keep], best[keep], arc[keep]


class _Canvas:
    """Tissue and label maps painted in priority order (a later paint wins and clears a label it covers)."""

    def __init__(self, n: int):
        self.tissue = np.zeros(n, dtype=np.uint8)
        self.label = np.zeros(n, dtype=np.uint8)

    def paint(self, where, tissue: int, label: int = 0, idx=None) -> None:
        if idx is not None:
            where = idx[where]
        self.tissue[where] = tissue
        self.label[where] = label


# ====================================================================================================================
# cardiac phantom


@dataclass
class CardiacPhantom:
    """One subject's thorax and heart in RAS+ world millimetres: x grows towards the patient's Right, y Anterior,
    z Superior (so the cardiac apex, on the patient's left, has negative x). Made by :func:`phantom_cardiac`."""

    body: dict
    heart: dict
    tubes: list
    warp_body: _Warp
    warp_heart: _Warp
    heart_center: np.ndarray  # world mm, centre of the heart's bounding box (for placing a scanner's field of view)
    heart_extent: np.ndarray  # (2, 3) world bbox of the labelled structures

    # ---------------------------------------------------------------------------------------------------------------
    def evaluate(self, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue class and label id (uint8 each) at world points ``P`` (3, N) in mm."""
        P = np.asarray(P, dtype=np.float32)
        cv = _Canvas(P.shape[1])
        self._paint_body(P, cv)
        self._paint_heart(P, cv)
        return cv.tissue, cv.label

    def body_depth(self, P: np.ndarray) -> np.ndarray:
        """Depth (mm, positive inside) of world points ``P`` (3, N) below the skin (approximate distance)."""
        b = self.body
        W = self.warp_body(np.asarray(P, dtype=np.float32))
        A = np.float32(b["A"]) * (1 + np.float32(b["taper"]) * W[2])
        return -_ellipse_sdf2(W[0], W[1] - np.float32(b["y0"]), A, np.float32(b["B"]))

    # ---------------------------------------------------------------------------------------------------------------
    def _paint_body(self, P, cv: _Canvas) -> None:
        b = self.body
        W = self.warp_body(P)
        x, y, z = W[0], W[1], W[2]
        y = y - np.float32(b["y0"])  # body-centred from here on
        A = np.float32(b["A"]) * (1 + np.float32(b["taper"]) * z)
        B = np.float32(b["B"])
        sd = _ellipse_sdf2(x, y, A, B)
        inside = sd < 0
        cv.paint(inside, FAT)
        ax = np.abs(x)
        fat = np.float32(b["fat"]) * (0.75 + 0.5 * ax / A)  # thicker laterally
        cv.paint(sd < -fat, MUSCLE)
        wall = fat + np.float32(b["muscle"])
        depth = sd + wall + 6  # 0 at the depth of the rib centres
        cavity = depth < -6
        # diaphragm: two domes; the right one (+x) higher
        yy = (y / (0.95 * B)) ** 2
        zr = b["dome_r"] - 60 * (((x - 0.45 * A) / (0.62 * A)) ** 2 + yy)
        zl = b["dome_l"] - 60 * (((x + 0.45 * A) / (0.62 * A)) ** 2 + yy)
        zc = b["dome_l"] - 6 - 30 * yy - 20 * (x / A) ** 2  # central tendon under the heart: no midline valley
        zd = np.maximum(np.maximum(zr, zl), zc)
        above = z > zd
        cv.paint(cavity & above, LUNG)
        cv.paint(cavity & ~above & (z > zd - 5), MUSCLE)
        below = cavity & (z <= zd - 5)
        liver = below & (x > -25 - 0.7 * np.maximum(y, 0))
        cv.paint(below & ~liver, MUSCLE)
        cv.paint(liver, LIVER)
        yv, rv = b["y_vb"] - b["y0"], b["r_vb"]
        # spine column + paraspinal muscles (no lung behind the vertebral body)
        cv.paint(cavity & (ax < 1.3 * rv + 8) & (y < yv + 0.5 * rv), MUSCLE)
        # mediastinum (fat) between the lungs, sternum to spine
        # (narrow anterior junction, wider around the great vessels and towards the spine)
        wm = b["w_med"] * (1 + 0.25 * np.tanh(z / 40.0)) * (0.55 + 0.45 * np.clip((B * 0.5 - y) / B, 0, 1))
        med = cavity & above & (np.abs(x - b["x_med"] + 4 * np.sin(z / 37.0)) < wm) & (y > yv - 5)
        cv.paint(med, FAT)
        # ribs (oblique, descending anteriorly) with costal cartilage; sternum. Only the chest-wall shell is computed.
        sh = np.flatnonzero((np.abs(depth) < 8) & inside)
        xs, ys, zs, ds = x[sh], y[sh], z[sh], depth[sh]
        phi = np.arctan2(np.abs(xs) / A[sh], -ys / B)  # 0 posterior midline .. pi anterior midline
        zz = zs + b["rib_drop"] * (1 - np.cos(phi)) / 2 - b["rib_z0"]
        dz = zz - np.round(zz / b["rib_sp"]) * b["rib_sp"]
        rr = (ds / 5.5) ** 2 + (dz / 7.0) ** 2
        rib = (rr < 1) & (phi > 0.25) & (phi < 2.75)
        cart = rib & (phi > b["cart_phi"])
        bone = rib & ~cart
        cv.paint(bone, CORTICAL, idx=sh)
        cv.paint(bone & (rr < 0.45), MARROW, idx=sh)
        cv.paint(cart, CARTILAGE, idx=sh)
        rs = (xs / b["w_st"]) ** 2 + (ds / 7.0) ** 2
        st = (rs < 1) & (ys > 0) & (zs < b["st_top"])
        cv.paint(st, CORTICAL, idx=sh)
        cv.paint(st & (rs < 0.6), MARROW, idx=sh)
        # vertebrae: bodies with discs, canal, cord, posterior arch and spinous process (computed near the spine)
        yc = yv - rv - 9
        sv = np.flatnonzero((ax < 1.15 * rv + 2) & (y < yv + rv + 2) & (y > yc - 40) & inside)
        xs, ys, zs = x[sv], y[sv], z[sv]
        disc = (zs - b["vb_z0"]) % b["vb_period"] < b["disc"]
        rvb = np.sqrt((xs / (1.15 * rv)) ** 2 + ((ys - yv) / rv) ** 2)
        vb = rvb < 1
        cv.paint(vb & ~disc, CORTICAL, idx=sv)
        cv.paint(vb & ~disc & (rvb < 1 - 2.0 / rv), MARROW, idx=sv)
        cv.paint(vb & disc, CARTILAGE, idx=sv)
        rc = np.sqrt(xs ** 2 + (ys - yc) ** 2)
        arch = (rc < 15) & (ys < yc + 3)
        spinous = (np.abs(xs) < 4) & (ys < yc) & (ys > yc - 38) & ~disc
        cv.paint(arch | spinous, CORTICAL, idx=sv)
        cv.paint((rc < 12.5) & (ys < yc + 2) | (np.abs(xs) < 2.5) & (ys < yc - 2) & (ys > yc - 35) & ~disc,
                 MARROW, idx=sv)
        cv.paint(rc < 8.5, CSF, idx=sv)
        cv.paint((xs / 5.0) ** 2 + ((ys - yc) / 4.0) ** 2 < 1, MUSCLE, idx=sv)  # spinal cord

    # ---------------------------------------------------------------------------------------------------------------
    def _paint_heart(self, P, cv: _Canvas) -> None:
        h = self.heart
        c = self.heart_center.astype(np.float32)
        r = np.float32(h["radius"])
        dx, dy, dz = P[0] - c[0], P[1] - c[1], P[2] - c[2]
        idx = np.flatnonzero(dx * dx + dy * dy + dz * dz < r * r)
        Pw = self.warp_heart(P[:, idx])
        R = h["R"].astype(np.float64)  # rows: long axis d (base -> apex), e1 (towards RV), e2
        c_lv = h["c_lv"]
        Q = _affine3(R, -R @ c_lv, Pw)  # heart-local coordinates
        u = Q[0]
        ub = h["u_base"]

        def local(center, Rl=None):
            """Local coordinates about ``center`` (heart frame, optionally rotated by ``Rl``) from ``Q``."""
            shift = -(R @ (np.asarray(center) - c_lv))
            M = np.eye(3) if Rl is None else np.asarray(Rl)
            return _affine3(M, M @ shift, Q)

        sd_lv = _ellipsoid_sdf(Q, h["lv_axes"])
        t_myo = h["t_myo"] * (1 - 0.35 * np.clip(u / h["lv_axes"][0], 0, 1) ** 2) * (1 + h["t_mod"] * Q[1] / 30)
        sd_rv = _ellipsoid_sdf(local(h["c_rv"]), h["rv_axes"])
        sd_la = _ellipsoid_sdf(local(h["c_la"], h["R_la"]), h["la_axes"])
        sd_ra = _ellipsoid_sdf(local(h["c_ra"], h["R_ra"]), h["ra_axes"])
        sd_epi = sd_lv - t_myo
        # pericardial / epicardial fat around everything
        union = np.minimum(np.minimum(sd_epi, sd_rv - 3.5), np.minimum(sd_la - 2, sd_ra - 2))
        fat_t = h["fat_t"] * (1 + 0.6 * np.sin(Q[0] / 17.0 + h["fat_phase"]) * np.cos(Q[2] / 23.0))
        cv.paint(union < fat_t, FAT, idx=idx)
        # right atrium and right ventricle (unlabelled), thin walls
        cv.paint((sd_ra < 2) & (sd_rv > 0), MYOCARD, idx=idx)
        cv.paint(sd_ra < 0, BLOOD_R, idx=idx)
        rv_zone = u > ub - 4
        cv.paint((sd_rv < 3.5) & rv_zone, MYOCARD, idx=idx)
        cv.paint((sd_rv < 0) & rv_zone & (sd_epi > 1.0), BLOOD_R, idx=idx)
        # left atrium (label 2) beyond the mitral valve plane, with a thin wall
        la_zone = u < ub
        cv.paint((sd_la < 2) & la_zone & (sd_epi > 0), MYOCARD, idx=idx)
        cv.paint((sd_la < 0) & la_zone, BLOOD, CARDIAC_LABELS["LAC"], idx=idx)
        # left ventricle: myocardium (label 1) is a thick shell around the cavity (label 3), open at the base
        lv_zone = ~la_zone
        cv.paint((sd_epi < 0) & lv_zone, MYOCARD, CARDIAC_LABELS["MYO"], idx=idx)
        cv.paint((sd_lv < 0) & lv_zone, BLOOD, CARDIAC_LABELS["LVC"], idx=idx)
        # papillary muscles: myocardial tissue inside the cavity, labelled as cavity (the usual MMWHS convention)
        for cp, ax in h["papillary"]:
            cv.paint((_ellipsoid_sdf(local(cp), ax) < 0) & (sd_lv < -1) & lv_zone, MYOCARD, CARDIAC_LABELS["LVC"],
                     idx=idx)
        # great vessels and airways. Blood vessels may not cut into the LV or the LA lumen (the labelled aorta may
        # cut into the LA); airways and the oesophagus not into any chamber. Order: airways, vessel walls, vessel
        # lumens (the labelled aorta last).
        lv_core = (sd_epi < 0) & lv_zone
        la_lumen = (sd_la < 0) & la_zone
        no_blood = np.zeros(P.shape[1], dtype=bool)
        no_other = np.zeros(P.shape[1], dtype=bool)
        u_all = np.full(P.shape[1], np.inf, dtype=np.float32)
        no_blood[idx] = lv_core | la_lumen
        no_other[idx] = lv_core | la_lumen | (sd_ra < 0) | ((sd_rv < 3.5) & rv_zone)
        u_all[idx] = u
        evals = [(t, *t.sdf(P)) for t in self.tubes]
        for t, ti, sd, arc in evals:
            if t.lumen not in (BLOOD, BLOOD_R):
                ok = ~no_other[ti]
                cv.paint((sd < t.wall_mm) & (sd >= 0) & ok, t.wall, idx=ti)
                cv.paint((sd < 0) & ok, t.lumen, idx=ti)
        for t, ti, sd, arc in evals:
            if t.lumen in (BLOOD, BLOOD_R):  # a vessel wall never cuts through a blood pool it opens into
                cur = cv.tissue[ti]
                cv.paint((sd < t.wall_mm) & (sd >= 0) & ~no_blood[ti] & (cur != BLOOD) & (cur != BLOOD_R), t.wall,
                         idx=ti)
        no_aorta = np.zeros(P.shape[1], dtype=bool)
        no_aorta[idx] = lv_core  # the aortic root indents the left atrium, not the other way round
        for t, ti, sd, arc in sorted(evals, key=lambda e: e[0].label):
            if t.lumen in (BLOOD, BLOOD_R):
                lumen = (sd < 0) & ~(no_aorta[ti] if t.label else no_blood[ti])
                if t.label:
                    a0, a1 = t.label_arc_mm
                    lab = lumen & (arc >= a0) & (arc <= a1) & (u_all[ti] < ub)
                    cv.paint(lumen & ~lab, t.lumen, idx=ti)
                    cv.paint(lab, t.lumen, t.label, idx=ti)
                else:
                    cv.paint(lumen, t.lumen, idx=ti)


def _affine3(M, t, Q) -> np.ndarray:
    """``M @ Q + t`` for a 3x3 ``M`` and points ``Q`` (3, N), written out (faster than a tiny matmul)."""
    M = np.asarray(M, dtype=np.float32)
    t = np.asarray(t, dtype=np.float32)
    out = np.empty_like(Q)
    for r in range(3):
        out[r] = M[r, 0] * Q[0] + M[r, 1] * Q[1] + M[r, 2] * Q[2] + t[r]
    return out


def phantom_cardiac(rng: np.random.Generator, *, habitus: float | None = None) -> CardiacPhantom:
    """Draw one subject's thorax and heart (random size, shape, pose and body habitus).

    World frame: RAS+ mm (x to the patient's right, y anterior, z superior); the LV cavity centre is near the origin.
    """
    h = float(rng.uniform(0, 1) if habitus is None else habitus)
    size = rng.normal(1.0, 0.07)  # heart size factor
    # --- heart, in its own frame -------------------------------------------------------------------------------
    d0 = _unit([-0.62, 0.55, -0.45])  # base -> apex: to the patient's left, anterior, inferior
    Rpose = _random_rotation(rng, 14)
    d = Rpose @ d0
    v = _unit([0.6, 0.72, 0.15])
    e1 = _unit(v - (v @ d) * d)  # towards the right ventricle (right-anterior)
    e2 = np.cross(d, e1)
    R = np.vstack([d, e1, e2])
    lv_axes = np.array([rng.uniform(38, 46), rng.uniform(22, 27), rng.uniform(22, 27)]) * size
    u_base = -rng.uniform(0.5, 0.62) * lv_axes[0]
    t_myo = rng.uniform(8.0, 11.5) * (size ** 0.5)
    c_lv = np.zeros(3)
    w = lambda loc: c_lv + R.T @ np.asarray(loc, dtype=np.float64)  # heart-local -> world  # noqa: E731
    rv_axes = np.array([lv_axes[0] * rng.uniform(0.85, 0.95), rng.uniform(26, 33) * size, lv_axes[2] * 1.35])
    c_rv = w([-0.12 * lv_axes[0], lv_axes[1] * rng.uniform(0.55, 0.75), 0.0])
    la_axes = np.array([rng.uniform(17, 22), rng.uniform(22, 28), rng.uniform(18, 23)]) * size
    base = w([u_base, 0, 0])
    c_la = base + (-d) * la_axes[0] * 0.8 + np.array([-4.0, -10.0, 2.0]) + rng.normal(0, 2, 3)
    R_la = _random_rotation(rng, 20)
    ra_axes = np.array([rng.uniform(20, 25), rng.uniform(18, 23), rng.uniform(20, 26)]) * size
    c_ra = c_la + np.array([rng.uniform(34, 42), rng.uniform(14, 22), rng.uniform(-12, -4)])
    R_ra = _random_rotation(rng, 20)
    papillary = []
    for sgn in (-1, 1):
        cp = w([0.25 * lv_axes[0], sgn * 0.45 * lv_axes[1], -0.55 * lv_axes[2]])
        papillary.append((cp, np.array([9.0, 3.5, 3.5]) * size))
    heart = dict(R=R, c_lv=c_lv, lv_axes=lv_axes, u_base=u_base, t_myo=t_myo, t_mod=rng.uniform(-0.15, 0.15),
                 rv_axes=rv_axes, c_rv=c_rv, la_axes=la_axes, c_la=c_la, R_la=R_la, ra_axes=ra_axes, c_ra=c_ra,
                 R_ra=R_ra, fat_t=rng.uniform(2.0, 6.0), fat_phase=rng.uniform(0, 2 * np.pi), papillary=papillary,
                 radius=135.0)
    warp_heart = _Warp(rng, rng.uniform(1.5, 3.5), (60, 140))

    # --- great vessels ------------------------------------------------------------------------------------------
    r_aa = rng.uniform(12, 15.5) * size ** 0.5
    p0 = w([u_base + 6, 0.42 * lv_axes[1], 0.1 * lv_axes[2]])  # aortic valve, anterior-right of the mitral valve
    up = np.array([0.0, 0.0, 1.0])
    p1 = p0 + 22 * _unit(-d + 1.1 * up + 0.2 * e1)
    p2 = p1 + np.array([rng.uniform(4, 12), rng.uniform(0, 8), rng.uniform(28, 38)])
    p3 = p2 + np.array([rng.uniform(-2, 4), rng.uniform(-8, -2), rng.uniform(14, 22)])
    aa_len = float(np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1) + rng.uniform(0.6, 1.0) * np.linalg.norm(p3 - p2))

    # --- body (sized so the heart fits between sternum and spine) -----------------------------------------------
    fat = 5 + 22 * h + rng.normal(0, 2)
    fat = float(np.clip(fat, 4, 30))
    muscle = rng.uniform(8, 14)
    r_vb = rng.uniform(15, 19)
    # heart extent (coarse SDF evaluation) to place the body around it
    tmp = CardiacPhantom(body={}, heart=heart, tubes=[], warp_body=_Warp(rng, 0, (100, 100), 1), warp_heart=warp_heart,
                         heart_center=np.zeros(3), heart_extent=np.zeros((2, 3)))
    g = np.mgrid[-110:111:4, -110:111:4, -110:111:4].reshape(3, -1).astype(np.float32)
    cv = _Canvas(g.shape[1])
    tmp._paint_heart(g, cv)
    heart_pts = g[:, cv.tissue > 0]
    lab_pts = g[:, cv.label > 0]
    hmin, hmax = heart_pts.min(1), heart_pts.max(1)
    # anterior: heart touches the inner chest wall at y = y0 + B - (fat + muscle + 12) - gap
    gap = rng.uniform(2, 8)
    # posterior: leave room for oesophagus / aorta in front of the vertebral body
    room = rng.uniform(14, 20)
    A = 138 + 34 * h + rng.normal(0, 6)
    B_min = (hmax[1] - hmin[1] + gap + room + 2 * r_vb + 70 + 2 * fat + muscle + 12) / 2
    B = max(B_min, 98 + 28 * h + rng.normal(0, 5))
    y0 = hmax[1] + gap + fat + muscle + 12 - B  # body centre (AP)
    y_vb = hmin[1] - room - r_vb
    x_med = float(np.clip(rng.normal(4, 3), -4, 10))
    dome_l = hmin[2] + rng.uniform(0, 8)
    dome_r = dome_l + rng.uniform(10, 24)
    body = dict(A=float(A), B=float(B), y0=float(y0), taper=rng.uniform(0.0, 0.0012), fat=fat, muscle=muscle,
                dome_l=float(dome_l), dome_r=float(dome_r), y_vb=float(y_vb), r_vb=r_vb, x_med=x_med,
                w_med=rng.uniform(18, 26), rib_drop=rng.uniform(35, 60), rib_z0=rng.uniform(0, 30),
                rib_sp=rng.uniform(26, 32), cart_phi=rng.uniform(2.2, 2.45), w_st=rng.uniform(12, 17),
                st_top=float(hmax[2] + rng.uniform(30, 60)), vb_z0=rng.uniform(0, 30),
                vb_period=rng.uniform(26, 31), disc=rng.uniform(5, 7))
    warp_body = _Warp(rng, rng.uniform(2, 5), (90, 220))

    # aortic arch and descending aorta beside the vertebral body (left = -x)
    r_da = rng.uniform(9, 12)
    x_da = -(0.82 * r_vb + r_da + rng.uniform(3, 7))
    y_da = y_vb + 0.7 * r_vb
    p4 = p3 + np.array([-15.0, -(p3[1] - y_da) * 0.5, 14.0])
    p5 = np.array([x_da, y_da, p3[2] + 6])
    p6 = np.array([x_da + rng.uniform(-3, 3), y_da, hmin[2] - 120])
    aorta_pts = _curve([p0, p1, p2, p3, p4, p5, p6], n=10)
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(aorta_pts, axis=0), axis=1))])
    radii = np.interp(arc, [0, aa_len, arc[-1] * 0.55, arc[-1]], [r_aa * 1.1, r_aa, r_da * 1.05, r_da])
    tubes = [_Tube(aorta_pts, radii, BLOOD, label=CARDIAC_LABELS["AA"], label_arc_mm=(0.0, aa_len))]
    # pulmonary trunk from the right ventricular outflow, then left and right pulmonary arteries
    q0 = p0 + np.array([-13.0, 12.0, 8.0]) + 0.5 * e1 * 10
    q1 = q0 + np.array([-8.0, -4.0, 24.0])
    q2 = q1 + np.array([-4.0, -18.0, 10.0])
    r_pa = rng.uniform(11, 14)
    tubes.append(_Tube(_curve([q0, q1, q2, q2 + [-40, -12, -4], q2 + [-70, -18, -14]], 8),
                       np.linspace(r_pa, 6, 33), BLOOD_R))
    tubes.append(_Tube(_curve([q2, q2 + [25, -12, -6], q2 + [60, -16, -8], q2 + [85, -20, -14]], 8),
                       np.linspace(r_pa * 0.8, 6, 25), BLOOD_R))
    # venae cavae into the right atrium
    top_ra = c_ra + np.array([2.0, -4.0, ra_axes[2] * 0.8])
    tubes.append(_Tube(_curve([top_ra, top_ra + [4, -4, 40], top_ra + [6, -6, 110]], 6), np.full(13, 9.5), BLOOD_R))
    bot_ra = c_ra + np.array([0.0, -8.0, -ra_axes[2] * 0.8])
    tubes.append(_Tube(_curve([bot_ra, bot_ra + [4, -10, -40], bot_ra + [6, -14, -120]], 6), np.full(13, 11.0),
                       BLOOD_R))
    # pulmonary veins (left heart blood) into the left atrium from both lungs
    for sx in (-1, 1):
        for sz in (-1, 1):
            s = c_la + np.array([sx * la_axes[1] * 0.7, -la_axes[0] * 0.3, sz * 9.0])
            tubes.append(_Tube(_curve([s, s + [sx * 22, -8, sz * 6], s + [sx * 45, -14, sz * 14]], 5),
                               np.linspace(7, 4.5, 11), BLOOD))
    # trachea and main bronchi (air), oesophagus (muscle) in front of the spine
    carina = np.array([x_med * 0.5 + 3, y_vb + r_vb + room + 12, c_la[2] + la_axes[2] + 18])
    tr = rng.uniform(7.5, 9.5)
    tubes.append(_Tube(_curve([carina, carina + [0, 2, 60], carina + [0, 4, 150]], 6), np.full(13, tr), AIR,
                       wall=CARTILAGE, wall_mm=2.0))
    for sx, drop in ((1, 20), (-1, 30)):
        tubes.append(_Tube(_curve([carina, carina + [sx * 25, -5, -drop], carina + [sx * 55, -10, -drop - 20]], 5),
                           np.linspace(tr * 0.8, 5, 11), AIR, wall=CARTILAGE, wall_mm=1.8))
    eso = np.array([x_da * 0.25, y_vb + r_vb + 6, 0.0])
    tubes.append(_Tube(np.array([eso + [0, 0, -150], eso + [0, 0, 150]]), np.array([7.0, 7.0]), MUSCLE,
                       wall=MUSCLE, wall_mm=0.5))

    heart_center = (hmin + hmax) / 2
    heart["radius"] = float(np.sqrt(((heart_pts - heart_center[:, None].astype(np.float32)) ** 2).sum(0)).max()) + 15
    phantom = CardiacPhantom(body=body, heart=heart, tubes=tubes, warp_body=warp_body, warp_heart=warp_heart,
                             heart_center=heart_center, heart_extent=np.vstack([lab_pts.min(1), lab_pts.max(1)]))
    return phantom


# ====================================================================================================================
# cardiac imaging


def _grid_points(shape, affine) -> np.ndarray:
    """World coordinates (3, N) float32 of the voxel centres of a grid, C order over (i, j, k)."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    A = np.asarray(affine, dtype=np.float32)
    return A[:3, :3] @ ijk + A[:3, 3:4]


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _smooth_field(shape, spacing, sigma_mm: float, rng) -> np.ndarray:
    """Gaussian-correlated random field with unit standard deviation (cheap: coarse noise, blurred, upsampled)."""
    shape = tuple(int(s) for s in shape)
    sig = np.asarray(sigma_mm / np.asarray(spacing, dtype=np.float64)).reshape(-1)
    if sig.size == 1:
        sig = np.repeat(sig, len(shape))
    f = np.maximum(1, np.floor(sig / 1.5)).astype(int)
    cshape = tuple(int(np.ceil(s / ff)) + 1 for s, ff in zip(shape, f))
    w = ndimage.gaussian_filter(rng.standard_normal(cshape).astype(np.float32), sig / f, mode="wrap")
    if np.any(f > 1):
        w = ndimage.zoom(w, [ff for ff in f], order=1, grid_mode=False)
    w = w[tuple(slice(0, s) for s in shape)]
    if w.shape != shape:  # zoom rounding: pad at the end
        w = np.pad(w, [(0, s - ws) for s, ws in zip(shape, w.shape)], mode="edge")
    w = w - w.mean()
    return (w / max(float(w.std()), 1e-6)).astype(np.float32)


def _tissue_image(tissue, table, jitter, fields, rng) -> np.ndarray:
    """Mean intensity per tissue (jittered per subject) plus per-tissue texture from shared smooth fields."""
    coarse, fine = fields
    lut_mean = np.zeros(256, np.float32)
    lut_std = np.zeros(256, np.float32)
    for t, (mu, sd) in table.items():
        lut_mean[t] = mu + jitter * (abs(mu) + 20) * rng.normal()
        lut_std[t] = sd
    return lut_mean[tissue] + lut_std[tissue] * (0.7 * coarse + 0.7 * fine)


def _add_lung_vessels(tissue, spacing, rng) -> None:
    """Intersections of two random zero-level sets give a network of thin tubes: lung vessels (in place).

    The two smooth fields are made on a coarse grid and interpolated at the lung voxels only."""
    lung = np.flatnonzero(tissue == LUNG)
    if lung.size == 0:
        return
    shape = tissue.shape
    sig = 3.0 / np.asarray(spacing, dtype=np.float64)
    f = np.maximum(1, np.floor(sig / 1.2)).astype(int)
    cshape = tuple(int(np.ceil(s / ff)) + 2 for s, ff in zip(shape, f))
    ijk = np.stack(np.unravel_index(lung, shape)).astype(np.float32) / f[:, None].astype(np.float32)
    vessel = np.ones(lung.size, dtype=bool)
    for _ in range(2):
        w = ndimage.gaussian_filter(rng.standard_normal(cshape).astype(np.float32), sig / f, mode="wrap")
        w /= max(float(w.std()), 1e-6)
        vessel &= np.abs(ndimage.map_coordinates(w, ijk, order=1, mode="nearest")) < 0.34
    tissue.flat[lung[vessel]] = VESSEL


def _slow_flow(where, spacing, rng, *, reach_mm: float, coverage: float, patch_mm: float = 4.0) -> np.ndarray:
    """Weight in [0, 1] of slowly moving blood inside the blood pools ``where`` (bool grid): patches of a smooth random
    field covering about ``coverage`` of the pool, strongest at the pool's wall and fading to 40% over ``reach_mm``.

    Blood moves slowest along the walls, between trabeculae, in the apex and in the atrial appendages; how much of it
    there is in a scan depends on the patient (heart rate, ejection fraction) and on the moment of acquisition, not on
    the anatomy alone. Used by both modalities with their own physics: see :func:`render_mr` and :func:`render_ct`."""
    w = np.zeros(where.shape, np.float32)
    if not where.any() or coverage <= 0:
        return w
    d = ndimage.distance_transform_edt(where, sampling=spacing).astype(np.float32)
    field = _smooth_field(where.shape, spacing, patch_mm, rng)
    thr = float(np.quantile(field[where], 1 - coverage))
    patch = np.clip((field - thr) / 0.3, 0, 1)
    near = np.exp(-(d - 0.5 * float(np.min(spacing))) / reach_mm).clip(max=1)
    w[where] = (patch * (0.4 + 0.6 * near))[where]
    return w


def _kernel_gain(sigmas, truncate: float = 3.0) -> float:
    """Standard deviation of white noise after ``gaussian_filter(sigma=sigmas, truncate=truncate)``."""
    g = 1.0
    for sg in sigmas:
        if sg <= 0:
            continue
        r = int(truncate * sg + 0.5)
        x = np.arange(-r, r + 1)
        w = np.exp(-0.5 * (x / sg) ** 2)
        w /= w.sum()
        g *= float(np.sqrt((w * w).sum()))
    return g


def _fov_centre(phantom: CardiacPhantom, rng, sd_mm) -> np.ndarray:
    """Where a technologist centres a cardiac field of view (CT and MR alike): the labelled structures' box, 8 mm
    towards the head, plus placement noise of ``sd_mm`` per axis."""
    lab = phantom.heart_extent
    return (lab[0] + lab[1]) / 2 + np.array([0.0, 0.0, 8.0]) + rng.normal(0, list(sd_mm))


def ct_grid(phantom: CardiacPhantom, rng, scale: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axial cardiac CT grid centred near the heart: ~1.05-1.2 mm in-plane, 2.0-2.5 mm slices at scale 1.

    Centred as :func:`mr_grid` centres the MR (the labelled structures' box, 8 mm towards the head, plus a few mm of
    placement noise): both technologists centre on the heart the same way. Until generator 1.2 the CT was centred on
    the whole heart's box (right heart included), about 2 cm right of where the MR was centred. The field of view
    truncates the body, so a label-free body-centred crop follows the field of view, and that systematic offset put
    the heart 2 cm off between the two sites' crops: a geometric shift the papers' heart-centred data never had,
    and one that no intensity adaptation (CycleGAN included) can remove.

    The affine is the one a standard axial DICOM series gives (rows run to the patient's left, columns posterior,
    slices towards the head), so the ingest of the written series rebuilds exactly this grid."""
    n_xy, n_z = max(32, int(round(160 * scale))), max(12, int(round(64 * scale)))
    ext = phantom.heart_extent[1] - phantom.heart_extent[0]
    s0 = max(float(rng.uniform(1.05, 1.2)), (max(ext[0], ext[1]) + 50) / 160)
    dz0 = max(float(rng.uniform(2.0, 2.5)), (ext[2] + 40) / 64)
    s = round(s0 * 160 / n_xy, 3)
    dz = round(dz0 * 64 / n_z, 2)
    A = np.diag([-s, -s, dz, 1.0])
    centre = _fov_centre(phantom, rng, (6, 6, 5))
    shape = (n_xy, n_xy, n_z)
    A[:3, 3] = np.round(centre - A[:3, :3] @ ((np.array(shape) - 1) / 2), 2)
    return shape, A


def mr_grid(phantom: CardiacPhantom, rng, scale: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """A coronal whole-heart MR grid: ~1.5-1.7 mm in-plane, 2.6-3.0 mm slices, a smaller field of view than CT.

    Voxel axes: i towards the patient's left, j towards the feet, k anterior (orientation code LIA)."""
    n_in, n_sl = max(24, int(round(96 * scale))), max(12, int(round(48 * scale)))
    # like a technologist, widen the field of view (coarser voxels) when a large heart would not fit
    ext = phantom.heart_extent[1] - phantom.heart_extent[0]
    s0 = max(float(rng.uniform(1.5, 1.7)), (max(ext[0], ext[2] + 16) + 30) / 96)
    dz0 = max(float(rng.uniform(2.6, 3.0)), (ext[1] + 30) / 48)
    s = round(s0 * 96 / n_in, 3)
    dz = round(dz0 * 48 / n_sl, 2)
    A = np.zeros((4, 4))
    A[0, 0], A[2, 1], A[1, 2], A[3, 3] = -s, -s, dz, 1.0
    centre = _fov_centre(phantom, rng, (4, 4, 4))
    shape = (n_in, n_in, n_sl)
    A[:3, 3] = np.round(centre - A[:3, :3] @ ((np.array(shape) - 1) / 2), 2)
    return shape, A


def _evaluate_grid(phantom, shape, affine):
    P = _grid_points(shape, affine)
    tissue, label = phantom.evaluate(P)
    return P, tissue.reshape(shape), label.reshape(shape)


def render_ct(phantom: CardiacPhantom, shape, affine, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contrast-enhanced CT of ``phantom`` on a grid: (HU float32, labels uint8, tissue uint8), all (X, Y, Z).

    Dark fat (-100 HU) below muscle (~45), bright contrast blood (~340), brightest bone, lung ~-850; per-tissue
    texture, a partial-volume blur and in-plane correlated Gaussian noise (10-22 HU)."""
    _, tissue, label = _evaluate_grid(phantom, shape, affine)
    sp = _spacing(affine)
    _add_lung_vessels(tissue, sp, rng)
    # texture: a coarse field plus white noise that the point-spread function below makes fine-grained; quantum
    # noise is added before the same blur, so it is correlated in-plane like a reconstruction kernel makes it
    psf = (0.65, 0.65, 0.4)
    gain = _kernel_gain(psf)
    white = rng.standard_normal(shape).astype(np.float32)
    # contrast bolus timing differs per scan: scale the enhancement of blood (left and right heart separately)
    table = dict(_CT_HU)
    for t, f in ((BLOOD, rng.uniform(0.75, 1.35)), (BLOOD_R, rng.uniform(0.6, 1.4)), (VESSEL, rng.uniform(0.8, 1.2))):
        mu, sd = table[t]
        table[t] = (40 + (mu - 40) * f, sd)
    img = _tissue_image(tissue, table, 0.06, (_smooth_field(shape, sp, 6.0, rng), white / np.float32(gain)), rng)
    # incomplete mixing (generator 1.4): in an arterial-phase scan, blood that stagnates or entered before the bolus
    # (left atrial appendage, right atrium with unopacified inflow from the venae cavae) is less enhanced: soft-edged
    # filling defects that can mimic thrombus. The left ventricle and aorta are well mixed. Drawn per scan.
    art = _side_rng(rng)
    pools = (label == CARDIAC_LABELS["LAC"]) | (tissue == BLOOD_R)
    w = float(art.uniform(0.0, 1.0)) * _slow_flow(pools, sp, art, reach_mm=8.0, coverage=float(art.uniform(0.2, 0.5)),
                                                   patch_mm=6.0)
    img += w * (np.float32(art.uniform(60, 180)) - img)
    # residual cardiac motion (generator 1.4): a gated CT's temporal resolution (~150 ms for a single source) leaves
    # the heart's edges and the aortic root doubled and blurred at higher heart rates; amplitude and direction per scan
    amp = float(min(art.exponential(1.2), 4.0))
    ang = float(art.uniform(0, 2 * np.pi))
    heart = ndimage.gaussian_filter((label > 0).astype(np.float32), 4.0 / sp)
    heart = np.clip(2.5 * heart, 0, 1)
    ghost = ndimage.shift(img, (amp * np.cos(ang) / sp[0], amp * np.sin(ang) / sp[1], 0), order=1, mode="nearest")
    img += np.float32(art.uniform(0.3, 0.5)) * heart * (ghost - img)
    sigma_n = float(rng.uniform(10, 22))
    img += rng.standard_normal(shape).astype(np.float32) * np.float32(sigma_n / gain)
    img = ndimage.gaussian_filter(img, psf, truncate=3.0)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.float32)
    return img, label, tissue


def render_mr(phantom: CardiacPhantom, shape, affine, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Black-blood MR of ``phantom`` on a grid: (signal float32 >= 0, labels uint8, tissue uint8), all (X, Y, Z).

    Dark (incompletely suppressed) blood, brighter myocardium, bright fat, marrow and CSF, dark lung and cortical bone; a smooth
    multiplicative bias field (coil profile), a faint N/2 ghost, and Rician noise (magnitude of complex Gaussian)."""
    P, tissue, label = _evaluate_grid(phantom, shape, affine)
    sp = _spacing(affine)
    _add_lung_vessels(tissue, sp, rng)
    psf = (0.5, 0.5, 0.6)
    kg = _kernel_gain(psf)
    fields = (_smooth_field(shape, sp, 6.0, rng), rng.standard_normal(shape).astype(np.float32) / np.float32(kg))
    gain = float(rng.uniform(450, 900))
    table = {t: (mu * gain, sd * gain) for t, (mu, sd) in _MR_REL.items()}
    img = _tissue_image(tissue, table, 0.05, fields, rng)
    # slow flow (generator 1.4): the double inversion nulls only blood that leaves the slice before the readout; slow
    # blood along the walls, between trabeculae and in the appendages keeps a signal near the myocardium's (the
    # classic black-blood pitfall that mimics wall thickening or thrombus). Every chamber, not the aorta (fast flow).
    # How much depends on the patient and the moment: drawn per scan.
    art = _side_rng(rng)
    pools = ((tissue == BLOOD) | (tissue == BLOOD_R)) & (label != CARDIAC_LABELS["AA"])
    w = float(art.uniform(0.4, 1.0)) * _slow_flow(pools, sp, art, reach_mm=6.0, coverage=float(art.uniform(0.3, 0.6)))
    img += w * (np.float32(art.uniform(0.30, 0.45) * gain) - img)
    img = np.maximum(ndimage.gaussian_filter(img, psf, truncate=3.0), 0)
    # bias field: slow modes plus a stronger anterior coil sensitivity
    x, y, z = P
    c = phantom.heart_center.astype(np.float32)
    logb = np.zeros(P.shape[1], np.float32)
    for _ in range(3):
        k = _unit(rng.normal(size=3)) * 2 * np.pi / rng.uniform(250, 500)
        logb += np.float32(rng.uniform(0.08, 0.18)) * np.cos(
            k[0] * (x - c[0]) + k[1] * (y - c[1]) + k[2] * (z - c[2]) + np.float32(rng.uniform(0, 2 * np.pi)))
    logb += np.float32(rng.uniform(0.2, 0.45)) * np.tanh((y - c[1]) / 60.0)
    img *= np.exp(logb).reshape(shape)
    ghost = float(rng.uniform(0.0, 0.04))
    img += ghost * np.roll(img, shape[0] // 2, axis=0)
    sigma = float(rng.uniform(0.015, 0.035)) * gain
    re = img + sigma * rng.standard_normal(shape).astype(np.float32)
    im = sigma * rng.standard_normal(shape).astype(np.float32)
    img = np.sqrt(re * re + im * im)
    return img.astype(np.float32), label, tissue




def _ct_transfer_syntax(i: int) -> str:
    """Most series explicit little endian; some implicit LE (old PACS), RLE and JPEG 2000 lossless."""
    return {1: "rle", 3: "implicit_le", 4: "jpeg2000_lossless"}.get(i % 6, "explicit_le")




def _cardiac_subject(job: dict) -> dict:
    from ...io.volume import save_nifti

    site, seed, i, scale, root = job["site"], job["seed"], job["i"], job["scale"], Path(job["root"])
    rng = _rng(seed, "cardiac", site, i)
    ph = phantom_cardiac(rng)
    if site == "ct":
        from ...io.dicom_write import write_series

        shape, A = ct_grid(ph, rng, scale)
        img, lab, _ = render_ct(ph, shape, A, rng)
        plan = job["plan"]
        with _quiet_encoders():
            write_series(root / "images" / plan["study"] / plan["series"], img, A, modality="CT",
                         patient=plan["patient"], series_number=plan["series_number"], rescale=(1.0, -1024.0),
                         transfer_syntax=plan["ts"], file_names="instance", seed=f"siteadapt-synth/{seed}/ct/{i}",
                         series_description="CTA HEART 1.0 CE", pixel_dtype=np.uint16)
        save_nifti(lab, root / "labels" / f"{plan['patient']['AccessionNumber']}.nii.gz", A, dtype=np.uint8)
    else:
        shape, A = mr_grid(ph, rng, scale)
        img, lab, _ = render_mr(ph, shape, A, rng)
        name = f"case_{i + 1:04d}"
        save_nifti(np.clip(np.rint(img), 0, 32767).astype(np.int16), root / "images" / f"{name}.nii.gz", A)
        save_nifti(lab, root / "labels" / f"{name}.nii.gz", A, dtype=np.uint8)
    vox = float(abs(np.linalg.det(A[:3, :3])))
    return {"shape": list(shape), "spacing": [round(float(v), 4) for v in _spacing(A)],
            "label_ml": {k: round(float((lab == v).sum()) * vox / 1000, 2) for k, v in CARDIAC_LABELS.items()}}
