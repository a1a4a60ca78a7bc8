"""Synthetic ``pneumonia`` task: adult and pediatric frontal chest X-ray sites, normal or pneumonia per image (the
TUNA-Net setting: RSNA adult -> Guangzhou pediatric chest X-rays).

Layout (``synthesize("pneumonia", out_dir, ...)`` of :mod:`siteadapt.data.synth` dispatches here)::

    <out>/pneumonia/adult/images/<opaque>/<opaque>/IM0001      2D DICOM (CR, 12 bit), invented patient identifiers
    <out>/pneumonia/adult/labels.csv                            stem,label  (stem = PatientID, label normal|pneumonia)
    <out>/pneumonia/pediatric/images/NORMAL/case_0001.png       8-bit PNG, one folder per class (as the public
    <out>/pneumonia/pediatric/images/PNEUMONIA/case_0002.png    pediatric data set is distributed)
    <out>/pneumonia/<site>/site.json                            counts, classes, opacity types, acquisition facts

Classes and balance (the paper's data sets): adult 6993 normal / 4659 pneumonia (40.0 % pneumonia), pediatric
1349 normal / 3883 pneumonia (74.2 %). Every site gets exactly ``round(prevalence * n)`` pneumonia images, at positions
drawn from the seed.

Pneumonia is drawn as one of the paper's three radiographic findings, in the lungs only (it replaces lung air by
fluid in the projection, so it is brighter than the lung around it and silhouettes what it touches):
    ``airspace``      patchy, ill-defined confluent opacities (2-5 fluffy blobs), uni- or bilateral;
    ``lobar``         dense homogeneous consolidation of (part of) one lobe, sharp along a fissure, air bronchograms;
    ``interstitial``  reticular/reticulonodular network with a ground-glass haze, bilateral, perihilar/lower zones.
Their mix differs per site (adult more airspace, children more lobar/round consolidation).

What differs between the sites (the domain shift), besides the class balance:
- anatomy proportions: the pediatric phantom is a young child's chest: the whole body 0.60-0.68 times the adult size
  (projected path lengths too), a rounder thorax (shorter for its width), a larger heart (cardiothoracic ratio
  0.50-0.60 vs 0.38-0.52), horizontal ribs, a wide upper mediastinum (thymus), more stomach gas, no breast shadows;
- acquisition: adult CR with a high dose (little quantum noise), sharp, edge enhancement, a narrow tone-curve range,
  white collimation borders, an "R" marker and a burned-in text stripe; pediatric DX with a low dose (3-8x the
  quantum noise), little scatter (thin bodies), breathing motion blur, strong broad local-contrast processing
  (equalisation: 0.8-1.4 x the image minus its 20-mm blur), a heel effect (exposure falling off along the vertical
  tube axis by 10-25% of the range end to end, either way), exposure and contrast (gamma 0.6-1.6) varying per image,
  black collimation margins, more tilted patients, an "L" marker;
- field of view: the adult detector covers 430 x 354 mm; the pediatric one 230 x 205 mm around a much smaller chest.

Generator 1.1 added the heel effect and made the equalisation stronger (it was 0.2-0.6 x). With 1.0 the shift was
almost all anatomy: rendering the pediatric site with adult acquisition settings left an adult-trained classifier's
AUC unchanged, so image translation had nothing to undo. Real pediatric and adult archives also differ in equipment
and processing; with 1.1 that part of the shift matters to a classifier and translation can undo some of it.
Measured results: ``docs/results.md`` (written by ``siteadapt report``).

The anatomy is :func:`.chestxray.phantom_cxr` / ``_cxr_anatomy`` (the ``chestxray`` task's phantom); imaging here adds the
opacities to the physics and the two sites' equipment. Deterministic for a seed (independent of worker processes).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy import ndimage

from .chestxray import _cxr_anatomy, collimate_and_mark, expose_radiograph, heel_ramp, phantom_cxr, write_radiograph_dicom
from .common import _atomic_dir, _fake_patients, _opaque, _range, _rng, _run_jobs

GENERATOR_VERSION = "1.1.0"
SITES = ("adult", "pediatric")
CLASSES = ("normal", "pneumonia")
PREVALENCE = {"adult": 4659 / (6993 + 4659), "pediatric": 3883 / (1349 + 3883)}
OPACITY_TYPES = ("airspace", "lobar", "interstitial")
OPACITY_MIX = {"adult": (0.45, 0.30, 0.25), "pediatric": (0.30, 0.45, 0.25)}
LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")

STYLES = {
    "adult": dict(rows=320, cols=264, pixel_mm=1.34, modality="CR", bits=12, scatter=(0.10, 0.20), n0=(2.5e4, 6e4),
                  mtf_mm=0.6, motion_mm=(0.0, 0.0), unsharp=(0.3, 0.7), unsharp_mm=8.0, gamma=(0.8, 1.0),
                  exposure=(0.0, 0.0), lut="cr", collimation="white", margin=(0.0, 0.03), marker="R",
                  apex_frac=(0.13, 0.19), zoom=(0.97, 1.05), tilt_deg=2.0, shift_mm=8.0, stripe=True),
    "pediatric": dict(rows=288, cols=256, pixel_mm=0.8, modality="DX", bits=8, scatter=(0.04, 0.12), n0=(3e3, 8e3),
                      mtf_mm=0.8, motion_mm=(0.0, 2.0), unsharp=(0.8, 1.4), unsharp_mm=20.0, gamma=(0.6, 1.6),
                      heel=(0.10, 0.25), exposure=(-0.12, 0.12), lut="dx", collimation="black", margin=(0.0, 0.05),
                      marker="L", apex_frac=(0.10, 0.16), zoom=(0.60, 0.68), tilt_deg=3.0, shift_mm=8.0, stripe=False),
}
FOLDERS = {"normal": "NORMAL", "pneumonia": "PNEUMONIA"}  # the pediatric site's folder-per-class names


# ====================================================================================================================
# anatomy


def phantom_adult(rng: np.random.Generator) -> dict:
    return phantom_cxr(rng)


def phantom_pediatric(rng: np.random.Generator) -> dict:
    """A young child's chest in the adult phantom's units (the site's ``zoom`` makes it 0.5-0.66 times as big)."""
    ph = phantom_cxr(rng)
    ph["H"] *= rng.uniform(0.80, 0.90)  # rounder: shorter for its width
    H = ph["H"]
    ph["y_dr"] = H * rng.uniform(0.72, 0.82)
    ph["y_dl"] = ph["y_dr"] + rng.uniform(4, 14)
    ph["knob_y"] = H * rng.uniform(0.26, 0.34)
    ph["carina"] = H * rng.uniform(0.28, 0.36)
    ctr = rng.uniform(0.50, 0.60)  # cardiothoracic ratio of a toddler
    ph["heart_D"] = ctr * 2 * (ph["W"] + 10)
    ph["heart_b"] = ph["heart_D"] * rng.uniform(0.44, 0.52)
    ph["heart_x"] = 0.15 * ph["heart_D"] + rng.normal(0, 5)
    ph["heart_rot"] = np.radians(rng.uniform(-14, -2))  # more horizontal heart axis
    ph["rib_up"] = rng.uniform(0.0, 0.05)  # horizontal ribs
    ph["wm"] *= rng.uniform(1.25, 1.5)  # thymus: a wide upper mediastinum
    ph["knob"] *= 0.5
    ph["wall"] *= 0.7
    ph["breasts"] = 0.0
    ph["stomach"] = bool(rng.uniform() < 0.9)
    return ph


# ====================================================================================================================
# pneumonia


def draw_finding(rng: np.random.Generator, site: str) -> dict:
    """Parameters of one pneumonia finding (type, place, density), in the phantom's anatomy coordinates."""
    kind = str(rng.choice(OPACITY_TYPES, p=OPACITY_MIX[site]))
    f = {"type": kind, "seed": int(rng.integers(0, 2**31 - 1))}
    if kind == "lobar":
        f.update(lobe=str(rng.choice(LOBES)), density=float(rng.uniform(0.6, 0.95)),
                 extent=float(rng.uniform(0.55, 1.0)), fissure=float(rng.uniform(0.36, 0.44)))
    elif kind == "airspace":
        n = int(rng.integers(2, 6))
        bilateral = bool(rng.uniform() < 0.4)
        side0 = 1.0 if rng.uniform() < 0.5 else -1.0
        f["blobs"] = [dict(side=side0 if (not bilateral or i % 2 == 0) else -side0,
                           x=float(rng.uniform(0.3, 0.85)), y=float(rng.uniform(0.3, 0.9)),
                           r=float(rng.uniform(16, 36)), density=float(rng.uniform(0.5, 0.85))) for i in range(n)]
    else:
        f.update(density=float(rng.uniform(0.45, 0.7)), period=float(rng.uniform(5, 9)),
                 zone=float(rng.uniform(0.35, 0.55)))
    return f


def _sig(v):
    return 1.0 / (1.0 + np.exp(-np.clip(v, -30, 30)))


def _noise(shape, sigma_px: float, rng) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(sigma_px, 0.3))
    return n / max(float(n.std()), 1e-6)


def opacity(f: dict, ph: dict, X: np.ndarray, Y: np.ndarray, mm_per_px: float) -> np.ndarray:
    """Fraction of lung air replaced by fluid, in [0, 1], on the grid ``X, Y`` (anatomy mm); ``mm_per_px`` is the grid
    spacing in anatomy mm (for the textures)."""
    rng = np.random.default_rng(f["seed"])
    W, H = ph["W"], ph["H"]
    px = lambda mm: mm / mm_per_px  # noqa: E731
    right, left = _sig(-X / 3.0), _sig(X / 3.0)  # patient right = image left (X < 0)
    if f["type"] == "lobar":
        sharp, soft = 2.0, 14.0
        fiss = f["fissure"] * H
        lobe = f["lobe"]
        if lobe == "RUL":
            m = right * _sig((fiss - Y) / sharp)
        elif lobe == "RML":
            m = right * _sig((Y - fiss) / sharp) * _sig((0.85 * ph["y_dr"] - Y) / soft) * _sig((0.62 * W + X) / soft)
        elif lobe == "RLL":
            m = right * _sig((Y - 0.52 * H) / soft)
        elif lobe == "LUL":
            m = left * _sig((0.5 * H - Y) / soft)
        else:  # LLL, partly behind the heart
            m = left * _sig((Y - 0.55 * H) / soft)
        # only part of the lobe: a large soft disc around a random point of it
        ys, xs = np.nonzero(m > 0.5)
        if ys.size:
            k = int(rng.integers(ys.size))
            cy, cx = Y[ys[k], xs[k]], X[ys[k], xs[k]]
            reach = f["extent"] * 0.9 * H
            m = m * _sig((reach - np.hypot(X - cx, Y - cy)) / soft)
        tex = np.clip(1 + 0.12 * _noise(X.shape, px(6), rng), 0, None)
        bronch = np.exp(-(_noise(X.shape, px(5), rng) / 0.12) ** 2)  # air bronchograms: thin branching lucencies
        return np.clip(f["density"] * m * tex * (1 - 0.3 * bronch), 0, 1)
    if f["type"] == "airspace":
        o = np.zeros(X.shape, np.float32)
        for b in f["blobs"]:
            cx, cy = b["side"] * b["x"] * W, b["y"] * H
            o += b["density"] * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * b["r"] ** 2))
        patch = _sig(2.5 * _noise(X.shape, px(5), rng))  # fluffy, patchy margins
        return np.clip(o * (0.35 + 0.9 * patch), 0, 0.9)
    # interstitial
    zone = 0.45 + 0.55 * _sig((Y - f["zone"] * H) / 25.0)
    hil = np.exp(-((np.abs(X) - 0.35 * W) / (0.45 * W)) ** 2)
    bp = _noise(X.shape, px(f["period"] * 0.35), rng) - 0.6 * _noise(X.shape, px(f["period"]), rng)
    net = np.exp(-(bp / 0.45) ** 2)  # zero crossings of band-passed noise: a reticular network
    nod = np.clip(_noise(X.shape, px(2.5), rng) - 1.6, 0, None)  # small nodules
    return np.clip(f["density"] * zone * (0.3 + 0.6 * hil) * (0.35 + 0.75 * net + 0.8 * nod), 0, 0.8)


# ====================================================================================================================
# imaging


def render(ph: dict, site: str, rng: np.random.Generator, scale: float = 1.0,
           finding: dict | None = None) -> tuple[np.ndarray, dict]:
    """Project ``ph`` (with ``finding`` when pneumonia) with ``site``'s equipment: (stored pixel values (rows, cols)
    float in [0, 2**bits - 1], facts). Physics as :func:`.chestxray.render_cxr` (Beer-Lambert, scatter, blur, quantum
    noise); the opacity replaces lung air by water-equivalent fluid before projection."""
    st = STYLES[site]
    rows, cols = max(32, int(round(st["rows"] * scale))), max(32, int(round(st["cols"] * scale)))
    pm = st["pixel_mm"] * st["rows"] / rows
    r = (np.arange(rows, dtype=np.float32) + 0.5) * pm
    c = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * pm
    Yd, Xd = np.meshgrid(r, c, indexing="ij")
    zoom = rng.uniform(*st["zoom"])  # body size (and magnification): anatomy mm -> detector mm
    y_apex = rows * pm * rng.uniform(*st["apex_frac"])
    tx = rng.normal(0, st["shift_mm"])
    th = np.radians(rng.normal(0, st["tilt_deg"]))
    Xs, Ys = (Xd - tx) / zoom, (Yd - y_apex) / zoom
    X = (np.cos(th) * Xs + np.sin(th) * Ys).astype(np.float32)
    Y = (-np.sin(th) * Xs + np.cos(th) * Ys).astype(np.float32)
    label, soft, air, gas, bone = _cxr_anatomy(ph, X, Y)
    mm_anat = pm / zoom
    hy = ph["H"] * 0.42  # hila and lung markings (as the chestxray task)
    hil = sum(np.exp(-(((X - sx * (ph["wm"] + 18)) / 45.0) ** 2 + ((Y - hy) / 55.0) ** 2)) for sx in (-1, 1))
    ridge = np.clip(1 - np.abs(_noise(X.shape, 3.0 / mm_anat, rng)) / 0.35, 0, 1)
    soft = soft + (label > 0) * (6 + 26 * hil) * ridge + 28 * hil * (label == 0)
    o_frac = 0.0
    if finding is not None:
        o = opacity(finding, ph, X, Y, mm_anat)
        air = air * (1 - o)  # fluid replaces air: the water path grows by what the air path loses
        lung = label > 0
        o_frac = float((o[lung] > 0.2).mean()) if lung.any() else 0.0
    mu = 0.021
    water = np.clip(soft - air - gas, 0, None) * zoom  # path lengths scale with the body
    primary = np.exp(-mu * (water + 2.3 * bone * zoom))
    f = 4
    small = primary[: rows // f * f, : cols // f * f].reshape(rows // f, f, cols // f, f).mean((1, 3))
    small = ndimage.gaussian_filter(small, 30.0 / pm / f, mode="nearest")
    scat = ndimage.zoom(small, (rows / small.shape[0], cols / small.shape[1]), order=1, grid_mode=True,
                        mode="nearest")[:rows, :cols]
    if scat.shape != primary.shape:
        scat = np.pad(scat, [(0, rows - scat.shape[0]), (0, cols - scat.shape[1])], mode="edge")
    inten = primary + rng.uniform(*st["scatter"]) * scat
    motion = rng.uniform(*st["motion_mm"])  # breathing: blur mostly along the patient's long axis
    inten = ndimage.gaussian_filter(inten, (np.hypot(st["mtf_mm"], motion) / pm, st["mtf_mm"] / pm), mode="nearest")
    v, field_, (top, bot, left, right) = expose_radiograph(inten, rng, st, pm)
    amt = rng.uniform(*st["unsharp"])
    v = v + amt * (v - ndimage.gaussian_filter(v, st["unsharp_mm"] / pm, mode="nearest"))
    g = rng.uniform(*st["gamma"])
    if st["lut"] == "cr":
        v = np.clip(v, 0, 1) ** g
        v = 0.04 + 0.92 * (0.5 + 0.5 * np.tanh(2.2 * (v - 0.5)) / np.tanh(1.1))
    else:  # DX: local-contrast processing, then a per-image exposure / contrast that the technologist left as is
        if st.get("heel"):
            v = v + heel_ramp(rng, st["heel"], rows)
        v = np.clip(v + rng.uniform(*st["exposure"]), 0, 1) ** g
        lo2, hi2 = np.percentile(v[field_], [1, 99])
        v = 0.03 + 0.94 * np.clip((v - lo2) / max(hi2 - lo2, 1e-6), 0, 1)
    v = np.clip(v, 0, 1)
    px = collimate_and_mark(v, field_, rng, st, (top, left, right))
    if st["stripe"]:
        stripe = rng.random((5 * px, int(rng.integers(8, 16)) * 4 * px)) < 0.45
        stripe[:, 3 * px::4 * px] = False
        sr = rows - bot - stripe.shape[0] - int(rows * rng.uniform(0.01, 0.03))
        sc = max(0, cols - right - stripe.shape[1] - 4 * px)
        region = v[sr:sr + stripe.shape[0], sc:sc + stripe.shape[1]]
        region[stripe[:region.shape[0], :region.shape[1]]] = 0.97
    maxv = 2 ** st["bits"] - 1
    lung_px = int((label > 0).sum())
    heart_w = _heart_width(label)
    facts = {"pixel_mm": round(float(pm), 4), "rows": rows, "cols": cols, "zoom": round(float(zoom), 4),
             "thorax_mm": round(float(2 * ph["W"] * zoom), 1), "ctr": round(float(ph["heart_D"] / (2 * (ph["W"] + 10))), 3),
             "lung_cm2": round(lung_px * pm * pm / 100.0, 1), "heart_gap_px": heart_w,
             "opacified_lung_fraction": round(o_frac, 3)}
    return np.rint(np.clip(v, 0, 1) * maxv).astype(np.float32), facts


def _heart_width(label: np.ndarray) -> int:
    """Widest gap between the two lungs on one row (pixels): a crude mediastinum + heart width."""
    best = 0
    for row in label:
        r = np.flatnonzero(row == 1)
        left = np.flatnonzero(row == 2)
        if r.size and left.size:
            best = max(best, int(left.min() - r.max()))
    return best


def make_image(seed: int, site: str, i: int, label: int, scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """Image ``i`` of ``site`` with class ``label`` (0 normal, 1 pneumonia): (stored pixels, facts incl. finding)."""
    rng = _rng(seed, "pneumonia", site, i)
    ph = phantom_pediatric(rng) if site == "pediatric" else phantom_adult(rng)
    finding = draw_finding(rng, site) if label == 1 else None
    img, facts = render(ph, site, rng, scale, finding)
    facts["finding"] = None if finding is None else finding["type"]
    return img, facts


# ====================================================================================================================
# writing the sites


def class_plan(seed: int, site: str, n: int) -> np.ndarray:
    """Class of every image (0/1): exactly ``round(prevalence * n)`` positives at seeded positions."""
    rng = _rng(seed, "pneumonia", site, "classes")
    y = np.zeros(n, np.int64)
    y[rng.permutation(n)[: int(round(PREVALENCE[site] * n))]] = 1
    return y


def _image_job(job: dict) -> dict:
    from PIL import Image

    site, seed, i, scale, root, y = job["site"], job["seed"], job["i"], job["scale"], Path(job["root"]), job["label"]
    img, facts = make_image(seed, site, i, y, scale)
    st = STYLES[site]
    if site == "adult":
        write_radiograph_dicom(root / "images", img, job["plan"], st, facts["pixel_mm"],
                                 seed=f"siteadapt-synth/{seed}/pneumonia/{site}/{i}")
    else:
        folder = root / "images" / FOLDERS[CLASSES[y]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8), mode="L").save(folder / f"case_{i + 1:04d}.png", format="PNG")
    return facts


def _write_site(site: str, final: Path, seed: int, n: int, scale: float, workers: int) -> dict:
    from ...io.atomic import write_json, write_text

    ys = class_plan(seed, site, n)
    plan_rng = _rng(seed, "pneumonia", site, "plan")
    with _atomic_dir(final) as root:
        (root / "images").mkdir()
        jobs = [{"site": site, "seed": seed, "i": i, "scale": scale, "root": str(root), "label": int(ys[i])}
                for i in range(n)]
        if site == "adult":
            people = _fake_patients(plan_rng, n, "cxr_a")
            used: set = set()
            for i, (job, person) in enumerate(zip(jobs, people)):
                person = dict(person, InstitutionName="Riverbend University Hospital",
                              InstitutionAddress="12 Mill Road^Riverbend^XX^00003")
                job["plan"] = {"patient": person, "study": _opaque(plan_rng, used),
                               "series": _opaque(plan_rng, used),
                               "ts": {2: "rle", 6: "jpeg2000_lossless"}.get(i % 9, "explicit_le"),
                               "photometric": "MONOCHROME1" if i % 8 == 5 else "MONOCHROME2"}
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["stem", "label"])
            for job in jobs:
                w.writerow([job["plan"]["patient"]["PatientID"], CLASSES[job["label"]]])
            write_text(root / "labels.csv", buf.getvalue())
        facts = _run_jobs(_image_job, jobs, workers)
        st = STYLES[site]
        findings = [f["finding"] for f in facts if f["finding"]]
        info = {
            "task": "pneumonia", "site": site, "n": n, "seed": seed, "scale": scale,
            "generator": "siteadapt.data.synth_pneumonia", "generator_version": GENERATOR_VERSION, "synthetic": True,
            "kind": "classification", "classes": list(CLASSES), "images": "images",
            "counts": {c: int((ys == k).sum()) for k, c in enumerate(CLASSES)},
            "prevalence": round(float(ys.mean()), 4) if n else None,
            "findings": {t: findings.count(t) for t in OPACITY_TYPES},
            "shape_range": _range([[f["rows"], f["cols"]] for f in facts]),
            "pixel_spacing_mm": facts[0]["pixel_mm"] if facts else None, "bits": st["bits"],
            "modality": st["modality"],
            "ctr_range": _range([f["ctr"] for f in facts]),
            "thorax_mm_range": _range([f["thorax_mm"] for f in facts]),
        }
        if site == "adult":
            info.update(format="dicom", contains_phi=True, labels="labels.csv",
                        label_naming="labels.csv: stem = PatientID, label = normal | pneumonia",
                        photometric=["MONOCHROME2", "MONOCHROME1"] if n > 5 else ["MONOCHROME2"])
        else:
            info.update(format="png", labels=None, label_naming="folder per class: images/NORMAL, images/PNEUMONIA")
        write_json(root / "site.json", info)
    return {"n": n, "format": info["format"], "path": str(final)}


def synthesize_pneumonia(out_dir: Path, *, seed: int = 0, n_images: int = 400, scale: float = 1.0,
                         workers: int = 1) -> dict:
    base = Path(out_dir) / "pneumonia"
    return {site: _write_site(site, base / site, int(seed), int(n_images), float(scale), workers) for site in SITES}
