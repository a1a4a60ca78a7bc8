"""The ``chestxray`` task's generator: a 2D projection phantom of the chest, the radiograph physics shared with the
``pneumonia`` task (exposure, heel effect, markers) and the two sites' writers (CR DICOM, digitised-film PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .common import _quiet_encoders, _rng, _unit

CXR_LABELS = {"right_lung": 1, "left_lung": 2}


# ====================================================================================================================
# chest X-ray phantom (2D projection)


def phantom_cxr(rng: np.random.Generator) -> dict:
    """Draw one frontal chest's anatomy (mm on the detector plane; X to the image right = patient's left, Y down,
    Y = 0 at the lung apices, X = 0 on the midline)."""
    s = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.18))  # body size
    W = rng.uniform(118, 142) * s  # lung half-width (lateral border at its widest)
    H = rng.uniform(215, 270) * s  # apex to costophrenic angles
    ctr = rng.uniform(0.38, 0.52)  # cardiothoracic ratio
    D = ctr * 2 * (W + 10)
    y_dr = H * rng.uniform(0.70, 0.80)
    return dict(
        s=s, W=W, H=H, asym=rng.uniform(0.93, 1.0), wm=rng.uniform(20, 28) * s, knob=rng.uniform(12, 20) * s,
        knob_y=H * rng.uniform(0.26, 0.34), apex_x=rng.uniform(0.45, 0.55), apex_k=rng.uniform(2.2, 3.4),
        y_dr=y_dr, y_dl=y_dr + rng.uniform(6, 22) * s, heart_D=D, heart_x=0.2 * D + rng.normal(0, 5),
        heart_rot=np.radians(rng.uniform(-24, -8)), heart_b=D * rng.uniform(0.40, 0.48),
        wall=rng.uniform(14, 34) * s, ap=rng.uniform(190, 250) * s,
        neck=rng.uniform(50, 62) * s, shoulder=rng.uniform(35, 55) * s, lung_depth=rng.uniform(0.6, 0.75),
        rib_y0=rng.uniform(-22, -10) * s, rib_sp=rng.uniform(21, 25) * s, rib_sp_growth=rng.uniform(0.01, 0.04),
        rib_up=rng.uniform(0.08, 0.16), rib_curv=rng.uniform(0.0018, 0.0026) / s, rib_hw=rng.uniform(4.5, 6.0) * s,
        clav_y=rng.uniform(-20, -5) * s, clav_s=rng.uniform(6, 14) * s, vert_h=rng.uniform(22, 27) * s,
        vert_phase=rng.uniform(0, 30), trach=rng.uniform(7, 9.5) * s, carina=H * rng.uniform(0.28, 0.36),
        stomach=bool(rng.uniform() < 0.7), breasts=float(rng.uniform(0, 45) if rng.uniform() < 0.5 else 0.0),
        warp=[(rng.normal(size=2) * rng.uniform(2, 5), _unit(rng.normal(size=2)) * 2 * np.pi / rng.uniform(120, 260),
               rng.uniform(0, 2 * np.pi)) for _ in range(4)],
    )


def _nearest_gap(q: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """|q - nearest of the sorted ``centres``| (elementwise)."""
    k = np.clip(np.searchsorted(centres, q), 1, len(centres) - 1)
    return np.minimum(np.abs(q - centres[k - 1]), np.abs(q - centres[k]))


def _cxr_anatomy(ph: dict, X: np.ndarray, Y: np.ndarray):
    """Label map and physical maps (water-equivalent soft tissue mm, air mm, bone mm) at anatomy coordinates."""
    for a, k, p in ph["warp"]:
        sn = np.sin(k[0] * X + k[1] * Y + p)
        X, Y = X + a[0] * sn, Y + a[1] * sn
    W, H = ph["W"], ph["H"]
    ax = np.abs(X)
    t = Y / H
    # --- lungs -----------------------------------------------------------------------------------------------
    Wside = np.where(X < 0, W, W * ph["asym"])
    lat = Wside * (1 - 0.42 * np.clip(1 - t / 0.8, 0, 1) ** 2)  # widest at 80 % of the height
    top = ph["apex_k"] * H * 0.35 * ((ax - ph["apex_x"] * Wside) / Wside) ** 2  # rounded apices
    yd = np.where(X < 0, ph["y_dr"], ph["y_dl"])
    xc = 0.42 * Wside
    yd = yd + (H - yd) * ((ax - xc) / (Wside - xc)) ** 2  # dome, reaching H at the costophrenic angle
    medial = ph["wm"] * (0.8 + 0.35 * np.exp(-((Y - 0.12 * H) / (0.14 * H)) ** 2)) \
        + np.where(X > 0, ph["knob"] * np.exp(-((Y - ph["knob_y"]) / 22.0) ** 2), 0.0)
    heart_y = ph["y_dl"] - 0.5 * ph["heart_b"]  # the heart sits on the diaphragm
    cx, cy = X - ph["heart_x"], Y - heart_y
    c, s_ = np.cos(ph["heart_rot"]), np.sin(ph["heart_rot"])
    hu, hv = c * cx + s_ * cy, -s_ * cx + c * cy
    ha = ph["heart_D"] / 2 * np.where(hu > 0, 1.08, 0.9)  # egg-shaped: the apex side is longer
    heart = (hu / ha) ** 2 + (hv / (ph["heart_b"] * (1 - 0.12 * np.tanh(hu / 40.0)))) ** 2 < 1
    body_lung = (ax < lat) & (Y > top) & (ax > medial)
    lung = body_lung & (Y < yd) & ~heart
    label = np.where(lung, np.where(X < 0, 1, 2), 0).astype(np.uint8)  # patient right lung = image left
    # physical lung air: labelled lung, plus retro-cardiac lung and the posterior recesses below the domes
    air = lung.astype(np.float32)
    air += 0.35 * (body_lung & heart & (Y < yd))
    below = body_lung & (Y >= yd)
    air += below * np.clip(1 - (Y - yd) / 45.0, 0, 1) * 0.45
    # --- body outline, shoulders, arms -------------------------------------------------------------------------
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    wb = ph["neck"] + (W + ph["shoulder"] - ph["neck"]) * sig((Y + 45) / 10) \
        - (ph["shoulder"] - ph["wall"]) * sig((Y - 10) / 35)
    soft = ph["ap"] * np.sqrt(np.clip(1 - (X / wb) ** 2, 0, 1)) * (0.55 + 0.45 * sig((Y + 40) / 15))
    xa = W + ph["shoulder"] + 25
    arm = np.clip(1 - ((ax - xa) / 42.0) ** 2, 0, 1) * (Y < 0.55 * H) * (Y > -140)
    soft = soft + 85 * np.sqrt(arm)
    if ph["breasts"]:
        br = ((ax - 0.55 * W) / (0.35 * W)) ** 2 + ((Y - 0.88 * H) / (0.22 * H)) ** 2
        soft = soft + ph["breasts"] * np.sqrt(np.clip(1 - br, 0, 1))
    # --- airways and stomach gas -----------------------------------------------------------------------------
    gas = np.zeros_like(X, dtype=np.float32)
    tr = ph["trach"]
    xt = X - 3.0 * ph["s"]
    gas += 4 * tr * np.sqrt(np.clip(1 - (xt / tr) ** 2, 0, 1)) * (Y < ph["carina"]) * (Y > -150)
    for sx in (-1, 1):  # main bronchi
        along = (Y - ph["carina"])
        cxb = sx * along * 0.9
        inb = (along > 0) & (along < 45)
        gas += 3 * tr * np.sqrt(np.clip(1 - ((xt - cxb) / (0.75 * tr)) ** 2, 0, 1)) * inb
    if ph["stomach"]:
        st = ((X - 0.45 * W) / 38.0) ** 2 + ((Y - ph["y_dl"] - 28) / 16.0) ** 2
        gas += 55 * np.sqrt(np.clip(1 - st, 0, 1)) * (Y > ph["y_dl"] + 12)
    # --- bones -------------------------------------------------------------------------------------------------
    bone = np.zeros_like(X, dtype=np.float32)
    # spine: vertebral bodies with discs, pedicles
    vz = (Y - ph["vert_phase"]) % ph["vert_h"]
    body_v = np.clip(1 - (X / 19.0) ** 2, 0, 1)
    bone += np.sqrt(body_v) * np.where(vz < 4.5, 7.0, 12.0)
    for sx in (-1, 1):
        ped = ((X - sx * 13) / 4.5) ** 2 + ((vz - ph["vert_h"] * 0.45) / 6.5) ** 2
        bone += 6 * np.clip(1 - ped, 0, 1)
    # posterior ribs: from the spine laterally, a little up and then down; anterior ribs: down towards the midline
    base = -ph["rib_up"] * (ax - 20) + ph["rib_curv"] * (ax - 20) ** 2
    ks = np.arange(12)
    yk = ph["rib_y0"] + np.cumsum(ph["rib_sp"] * (1 + ph["rib_sp_growth"] * ks)) - ph["rib_sp"]
    q = Y - base
    d = _nearest_gap(q, yk)
    slope = -ph["rib_up"] + 2 * ph["rib_curv"] * (ax - 20)
    d = d / np.sqrt(1 + slope ** 2)
    hw = ph["rib_hw"]
    prof = np.clip(1 - (d / hw) ** 2, 0, 1)
    rib_shape = 0.55 * np.sqrt(prof) + 0.45 * np.exp(-((d - 0.8 * hw) / 1.3) ** 2) * (d < hw * 1.1)
    reach = (ax > 14) & (ax < lat + ph["wall"] * 0.6) & (Y < yd + 60)
    bone += 9 * rib_shape * reach
    base_a = 36 + 0.28 * (W - ax)
    qa = Y - base_a
    da = _nearest_gap(qa, yk[:9]) / np.sqrt(1 + 0.28 ** 2)
    prof_a = np.clip(1 - (da / (hw * 0.9)) ** 2, 0, 1)
    bone += 4.5 * np.sqrt(prof_a) * ((ax > 0.3 * W) & (ax < lat + 5))
    # clavicles (S-curves) and humeral heads
    u = np.clip((ax - 18) / (W + 10), 0, 1)
    yc = ph["clav_y"] - 16 * u + ph["clav_s"] * np.sin(np.pi * u) * 0.6
    dc = np.abs(Y - yc)
    bone += 14 * np.sqrt(np.clip(1 - (dc / 7.0) ** 2, 0, 1)) * ((ax > 14) & (ax < W + 35))
    hh = ((ax - (W + ph["shoulder"] + 18)) / 24.0) ** 2 + ((Y - ph["clav_y"] + 5) / 26.0) ** 2
    bone += 32 * np.sqrt(np.clip(1 - hh, 0, 1))
    return label, soft.astype(np.float32), (air * ph["ap"] * ph["lung_depth"]).astype(np.float32), gas, bone


# Site styles: how each hospital's equipment and processing turns the same physics into pixels.
CXR_STYLES = {
    "cxr_a": dict(rows=320, cols=264, pixel_mm=1.34, modality="CR", bits=12, scatter=(0.10, 0.2), n0=(2.5e4, 6e4),
                  mtf_mm=0.6, grain=0.0, unsharp=(0.3, 0.7), lut="cr", gamma=(0.8, 1.0), collimation="white",
                  margin=(0.0, 0.03), marker="R", apex_frac=(0.13, 0.19), zoom=(0.97, 1.05)),
    "cxr_b": dict(rows=256, cols=256, pixel_mm=1.40, modality="DX", bits=8, scatter=(0.25, 0.45), n0=(8e2, 2.5e3),
                  mtf_mm=1.4, grain=0.05, unsharp=(0.0, 0.0), lut="film", gamma=(1.2, 1.6), collimation="black",
                  film_centre=(0.55, 0.70), heel=(0.10, 0.25), margin=(0.0, 0.045), marker="L", apex_frac=(0.10, 0.16),
                  zoom=(0.92, 1.0)),
}

_FONT5x7 = {  # a few block letters for burned-in markers (rows of 5 bits)
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
}


def expose_radiograph(inten: np.ndarray, rng: np.random.Generator, st: dict, pm: float) -> tuple:
    """Detector side of a synthetic radiograph (chest X-ray and pneumonia sites): quantum noise on the transmitted
    intensity ``inten`` (``st["n0"]`` quanta per native pixel, more for larger pixels), log transform (attenuation ->
    value: bone bright, lung dark), a random collimation field (``st["margin"]``) and a window from the field's 0.5 and
    99.7 percentiles. Returns the windowed image in [0, 1], the field mask and its margins (top, bottom, left, right)
    in pixels (markers are placed inside the field)."""
    rows, cols = inten.shape
    n0 = rng.uniform(*st["n0"]) * (pm / st["pixel_mm"]) ** 2  # larger pixels collect more quanta
    noisy = inten + np.sqrt(np.maximum(inten, 1e-6) / n0) * rng.standard_normal(inten.shape).astype(np.float32)
    L = -np.log(np.clip(noisy, 1e-5, None))  # high attenuation -> high value (bone bright, lung dark)
    m = st["margin"]  # collimation field
    top, bot = (int(rows * rng.uniform(*m)) for _ in range(2))
    left, right = (int(cols * rng.uniform(*m)) for _ in range(2))
    field_ = np.zeros((rows, cols), bool)
    field_[top:rows - bot, left:cols - right] = True
    lo, hi = np.percentile(L[field_], [0.5, 99.7])
    return np.clip((L - lo) / max(hi - lo, 1e-6), 0, 1), field_, (top, bot, left, right)


def heel_ramp(rng: np.random.Generator, heel: tuple[float, float], rows: int) -> np.ndarray:
    """Heel effect: exposure falls off along the tube's anode-cathode axis (vertical, either way). A (rows, 1) ramp
    from -amp to +amp, amp drawn from ``heel`` with a random sign, added to the log-exposure image."""
    amp = rng.uniform(*heel) * rng.choice([-1.0, 1.0])
    return amp * np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]


def render_cxr(ph: dict, site: str, rng: np.random.Generator,
               scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Project ``ph`` with ``site``'s equipment: (stored pixel values (rows, cols) float, label uint8, facts).

    Physics: Beer-Lambert attenuation of soft tissue, lung air and bone; scatter (a blurred copy of the primary);
    detector blur; quantum noise. Processing: site tone curve (CR auto-window with edge enhancement, or a film
    characteristic curve with grain), collimation margins and burned-in markers."""
    st = CXR_STYLES[site]
    rows, cols = max(32, int(round(st["rows"] * scale))), max(32, int(round(st["cols"] * scale)))
    pm = st["pixel_mm"] * st["rows"] / rows
    r = (np.arange(rows, dtype=np.float32) + 0.5) * pm
    c = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * pm
    Yd, Xd = np.meshgrid(r, c, indexing="ij")
    # patient placement: apex height, lateral shift, tilt, magnification
    zoom = rng.uniform(*st["zoom"])
    y_apex = rows * pm * rng.uniform(*st["apex_frac"])
    tx = rng.normal(0, 8)
    th = np.radians(rng.normal(0, 2.0))
    Xs, Ys = (Xd - tx) / zoom, (Yd - y_apex) / zoom
    X = np.cos(th) * Xs + np.sin(th) * Ys
    Y = -np.sin(th) * Xs + np.cos(th) * Ys
    label, soft, air, gas, bone = _cxr_anatomy(ph, X, Y)
    # hila and lung markings: vessel-like ridges of soft tissue, denser towards the hila
    hy = ph["H"] * 0.42
    hil = sum(np.exp(-(((X - sx * (ph["wm"] + 18)) / 45.0) ** 2 + ((Y - hy) / 55.0) ** 2)) for sx in (-1, 1))
    n1 = ndimage.gaussian_filter(rng.standard_normal(X.shape).astype(np.float32), 3.0 / pm * 1.34)
    n1 /= max(float(n1.std()), 1e-6)
    ridge = np.clip(1 - np.abs(n1) / 0.35, 0, 1)
    soft = soft + (label > 0) * (6 + 26 * hil) * ridge + 28 * hil * (label == 0)
    mu = 0.021  # 1/mm, water at ~60 keV effective
    water = np.clip(soft - air - gas, 0, None)
    primary = np.exp(-mu * (water + 2.3 * bone))
    f = 4  # scatter is smooth: blur a 4x smaller copy
    small = primary[: rows // f * f, : cols // f * f].reshape(rows // f, f, cols // f, f).mean((1, 3))
    small = ndimage.gaussian_filter(small, 30.0 / pm / f, mode="nearest")
    scat = ndimage.zoom(small, (rows / small.shape[0], cols / small.shape[1]), order=1, grid_mode=True,
                        mode="nearest")[:rows, :cols]
    if scat.shape != primary.shape:
        scat = np.pad(scat, [(0, rows - scat.shape[0]), (0, cols - scat.shape[1])], mode="edge")
    scat = rng.uniform(*st["scatter"]) * scat
    inten = primary + scat
    inten = ndimage.gaussian_filter(inten, st["mtf_mm"] / pm, mode="nearest")  # detector MTF
    v, field_, (top, bot, left, right) = expose_radiograph(inten, rng, st, pm)
    facts = {"pixel_mm": round(float(pm), 4), "rows": rows, "cols": cols}
    if st["lut"] == "cr":
        amt = rng.uniform(*st["unsharp"])
        v = v + amt * (v - ndimage.gaussian_filter(v, 8.0 / pm * 1.34, mode="nearest"))
        g = rng.uniform(*st["gamma"])
        v = np.clip(v, 0, 1) ** g
        v = 0.04 + 0.92 * (0.5 + 0.5 * np.tanh(2.2 * (v - 0.5)) / np.tanh(1.1))
    else:
        # film: characteristic (sigmoid) curve in log exposure, exposure varies per film, grain, then digitised
        g = rng.uniform(*st["gamma"])
        centre = rng.uniform(*st["film_centre"])  # above 0.5: the film sits dark (overexposed for its speed)
        if st["heel"]:
            v = v + heel_ramp(rng, st["heel"], rows)
        v = 1 / (1 + np.exp(-(v - centre) * 4.5 * g))
        v = (v - v[field_].min()) / max(float(v[field_].max() - v[field_].min()), 1e-6)
        if st["grain"]:
            grain = ndimage.gaussian_filter(rng.standard_normal(v.shape).astype(np.float32), 0.7)
            v = v * (1 + st["grain"] * grain / max(float(grain.std()), 1e-6))
        v = 0.02 + 0.93 * np.clip(v, 0, 1)
    v = np.clip(v, 0, 1)
    px = collimate_and_mark(v, field_, rng, st, (top, left, right))
    # a text-like stripe of bright pixels
    n_chars = int(rng.integers(8, 16))
    stripe = rng.random((5 * px, n_chars * 4 * px)) < 0.45
    stripe[:, 3 * px::4 * px] = False
    sr = (rows - bot - stripe.shape[0] - int(rows * rng.uniform(0.01, 0.03))) if site == "cxr_a" else \
        (top + int(rows * rng.uniform(0.01, 0.03)))
    sc = (cols - right - stripe.shape[1] - 4 * px) if site == "cxr_a" else (left + 4 * px)
    sc = max(0, sc)
    region = v[sr:sr + stripe.shape[0], sc:sc + stripe.shape[1]]
    region[stripe[:region.shape[0], :region.shape[1]]] = 0.97
    maxv = 2 ** st["bits"] - 1
    return np.rint(np.clip(v, 0, 1) * maxv).astype(np.float32), label, facts


def collimate_and_mark(v: np.ndarray, field_: np.ndarray, rng: np.random.Generator, st: dict,
                       margins: tuple[int, int, int]) -> int:
    """In place on a processed radiograph ``v`` (rows, cols) in [0, 1]: outside the collimated ``field_`` the
    unexposed plate (white after CR processing, ``st["collimation"] == "white"``) or black film margins, then the
    burned-in side marker ``st["marker"]`` (a radio-opaque 5x7 letter in a box) near the top corner of its side;
    ``margins`` = (top, left, right) of the field. Returns the glyph's pixel size (text stripes use it). Random
    draws, in order: the margin noise, the marker's row, its column."""
    rows, cols = v.shape
    top, left, right = margins
    if st["collimation"] == "white":
        v[~field_] = 0.93 + 0.03 * rng.standard_normal(int((~field_).sum()))
    else:
        v[~field_] = 0.01 * rng.random(int((~field_).sum()))
    px = max(1, int(round(2 * rows / 320)))
    glyph = np.array([[ch == "1" for ch in row] for row in _FONT5x7[st["marker"]]], bool)
    glyph = np.kron(glyph, np.ones((px, px), bool))
    box = np.zeros((glyph.shape[0] + 2 * px, glyph.shape[1] + 2 * px), bool)
    box[px:-px, px:-px] = glyph
    r0 = top + int(rows * rng.uniform(0.02, 0.05))
    c0 = (left + int(cols * rng.uniform(0.03, 0.08))) if st["marker"] == "R" else \
        (cols - right - box.shape[1] - int(cols * rng.uniform(0.03, 0.08)))
    patch = v[r0:r0 + box.shape[0], max(c0, 0):max(c0, 0) + box.shape[1]]
    patch[...] = np.where(box[:patch.shape[0], :patch.shape[1]], 0.99, 0.15 if st["marker"] == "R" else 0.85)
    return px


def _cxr_subject(job: dict) -> dict:
    from PIL import Image

    site, seed, i, scale, root = job["site"], job["seed"], job["i"], job["scale"], Path(job["root"])
    rng = _rng(seed, "chestxray", site, i)
    ph = phantom_cxr(rng)
    img, lab, facts = render_cxr(ph, site, rng, scale)
    st = CXR_STYLES[site]
    if site == "cxr_a":
        write_radiograph_dicom(root / "images", img, job["plan"], st, facts["pixel_mm"],
                               seed=f"siteadapt-synth/{seed}/{site}/{i}")
        stem = job["plan"]["patient"]["AccessionNumber"]
    else:
        stem = f"case_{i + 1:04d}"
        Image.fromarray(img.astype(np.uint8), mode="L").save(root / "images" / f"{stem}.png", format="PNG")
    Image.fromarray(lab.astype(np.uint8), mode="L").save(root / "labels" / f"{stem}.png", format="PNG")
    area = facts["pixel_mm"] ** 2 / 100.0
    return {"shape": [facts["rows"], facts["cols"]], "pixel_mm": facts["pixel_mm"],
            "label_cm2": {k: round(float((lab == v).sum()) * area, 1) for k, v in CXR_LABELS.items()}}


def write_radiograph_dicom(images: Path, img: np.ndarray, plan: dict, style: dict, pixel_mm: float, seed: str) -> Path:
    """One synthetic 2D radiograph as a DICOM file ``<images>/<study>/<series>/IM0001`` with the plan's patient,
    transfer syntax and photometric interpretation (MONOCHROME1 stores the inverted values) and the style's bit depth
    and modality (chest X-ray site A, pneumonia adult site)."""
    from ...io.dicom_write import write_2d

    stored = (2 ** style["bits"] - 1 - img) if plan["photometric"] == "MONOCHROME1" else img
    folder = images / plan["study"] / plan["series"]
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_encoders():
        write_2d(folder / "IM0001", stored.astype(np.uint16), modality=style["modality"],
                 pixel_spacing=(pixel_mm, pixel_mm), patient=plan["patient"], transfer_syntax=plan["ts"],
                 photometric=plan["photometric"], bits_stored=style["bits"], seed=seed)
    return folder / "IM0001"
