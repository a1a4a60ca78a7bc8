"""Synthetic hospital sites: anatomy, a real (non-monotonic) domain shift, file layout, PHI, determinism, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage, stats

from siteadapt.data import synth as S
from siteadapt.data.geometry import voxel_to_world

SCALE = 0.5
N_CARDIAC = 5  # five subjects reach every CT transfer syntax (explicit/implicit LE, RLE, JPEG 2000)
N_CXR = 8  # includes one MONOCHROME1 radiograph (index 5)


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _hist_match(src: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-volume histogram matching (quantile mapping of ``src`` onto ``ref``'s distribution)."""
    q = np.linspace(0, 100, 1001)
    sq = np.percentile(src, q) + np.arange(q.size) * 1e-6  # strictly increasing
    rq = np.percentile(ref, q)
    return np.interp(src, sq, rq)


def _cohen_d(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2))


def _affine_from_dicom(files: list[Path]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Geometry a reader builds from a single-frame axial series: NIfTI (X, Y, Z) shape and RAS affine."""
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    p0 = np.array(dss[0].ImagePositionPatient, float)
    p1 = np.array(dss[1].ImagePositionPatient, float)
    dr, dc = (float(v) for v in dss[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dc, col * dr, p1 - p0, p0
    return (int(dss[0].Columns), int(dss[0].Rows), len(dss)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _series_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in (root / "images").rglob("IM*")})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _noise_sigma(v: np.ndarray, mask: np.ndarray) -> float:
    """Robust noise estimate from diagonal second differences (insensitive to smooth structure)."""
    d = (v[:-1, :-1] - v[1:, :-1] - v[:-1, 1:] + v[1:, 1:]) / 2
    x = d[mask[:-1, :-1] & mask[1:, 1:]]
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synth")
    summary = {"cardiac": S.synthesize("cardiac", out, seed=0, n_subjects=N_CARDIAC, scale=SCALE, workers=2),
               "chestxray": S.synthesize("chestxray", out, seed=0, n_images=N_CXR, scale=SCALE, workers=2)}
    return {"out": out, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------------
# anatomy (no files)


@pytest.mark.parametrize("site,grid", [("ct", S.ct_grid), ("mr", S.mr_grid)])
def test_cardiac_labels_present_plausible_connected_and_inside_body(site, grid):
    lv_volumes, centres = [], []
    for i in range(3):
        rng = S._rng(11, "cardiac", site, i)
        ph = S.phantom_cardiac(rng)
        shape, A = grid(ph, rng, SCALE)
        P, tissue, lab = S._evaluate_grid(ph, shape, A)
        ml = abs(np.linalg.det(A[:3, :3])) / 1000.0
        vol = {k: float((lab == v).sum() * ml) for k, v in S.CARDIAC_LABELS.items()}
        # plausible adult volumes (mL): LV cavity, LV myocardium (~1.05 g/mL), LA cavity, ascending aorta segment
        assert 40 < vol["LVC"] < 250, vol
        assert 40 < vol["MYO"] < 250, vol
        assert 15 < vol["LAC"] < 120, vol
        assert 5 < vol["AA"] < 100, vol
        for name, v in S.CARDIAC_LABELS.items():
            cc, n = ndimage.label(lab == v)
            sizes = np.bincount(cc.ravel())[1:]
            assert sizes.max() / sizes.sum() > 0.97, f"{name} is fragmented"
        # labelled voxels are well inside the body (>= 2 cm below the skin) and never air
        depth = ph.body_depth(P[:, lab.ravel() > 0])
        assert depth.min() > 20, depth.min()
        assert not np.any(tissue[lab > 0] == S.AIR)
        # the myocardium wraps the LV cavity: its surroundings are myocardium, or the LA / aorta through the valves
        ring = ndimage.binary_dilation(lab == 3) & (lab != 3)
        assert np.isin(lab[ring], (1, 2, 4)).mean() > 0.85
        assert np.all(tissue[lab == 1] == S.MYOCARD) and np.all(np.isin(tissue[lab == 3], (S.BLOOD, S.MYOCARD)))
        # the whole LV and LA are inside the field of view (the aorta may leave it at the top)
        for v in (1, 2, 3):
            m = lab == v
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any()
                        or m[:, :, -1].any()), f"label {v} touches the field of view edge"
        lv_volumes.append(vol["LVC"])
        centres.append(ph.heart_center)
    assert np.std(lv_volumes) > 2.0  # subjects differ in size ...
    assert np.ptp(np.array(centres), axis=0).max() > 3.0  # ... and in pose


def test_mr_and_ct_fields_of_view_centre_on_the_heart_alike():
    """Both sites' scanners centre on the labelled structures the same way (a body-centred crop follows the field of
    view): the mean offset of the grid centre from the labels' box centre agrees within a few mm."""
    off = {"mr": [], "ct": []}
    for i in range(40):
        ph = S.phantom_cardiac(np.random.default_rng([5, i]))
        mid = ph.heart_extent.mean(0)
        for site, grid in (("mr", S.mr_grid), ("ct", S.ct_grid)):
            shape, A = grid(ph, np.random.default_rng([6, i]), scale=0.5)
            off[site].append(voxel_to_world(A, (np.asarray(shape) - 1) / 2) - mid)
    mr, ct = np.mean(off["mr"], 0), np.mean(off["ct"], 0)
    assert np.abs(mr - ct).max() < 4.0, (mr, ct)


def test_scale_halves_matrix_same_field_of_view():
    for grid in (S.ct_grid, S.mr_grid):
        ph = S.phantom_cardiac(S._rng(3, "p"))
        s1, a1 = grid(ph, S._rng(3, "g"), 1.0)
        s2, a2 = grid(ph, S._rng(3, "g"), 0.5)
        assert all(abs(x / 2 - y) <= 1 for x, y in zip(s1, s2))
        fov1 = np.array(s1) * S._spacing(a1)
        fov2 = np.array(s2) * S._spacing(a2)
        assert np.allclose(fov1, fov2, rtol=0.03)
    assert max(s1) <= 160 and np.prod(S.ct_grid(ph, S._rng(3, "g"), 1.0)[0]) <= 160 * 160 * 64


def test_subjects_differ_between_and_within_sites():
    a = S.phantom_cardiac(S._rng(0, "cardiac", "mr", 0))
    b = S.phantom_cardiac(S._rng(0, "cardiac", "ct", 0))
    c = S.phantom_cardiac(S._rng(0, "cardiac", "mr", 1))
    for x, y in ((a, b), (a, c)):
        assert not np.allclose(x.heart["lv_axes"], y.heart["lv_axes"])
        assert not np.allclose(x.heart["R"], y.heart["R"])


# ---------------------------------------------------------------------------------------------------------------------
# the domain shift is real


@pytest.fixture(scope="module")
def rendered():
    out = []
    for i in range(2):
        rng = S._rng(0, "cardiac", "ct", i)
        ph = S.phantom_cardiac(rng)
        ct = S.render_ct(ph, *S.ct_grid(ph, rng, SCALE), rng)
        rng = S._rng(0, "cardiac", "mr", i)
        ph = S.phantom_cardiac(rng)
        mr = S.render_mr(ph, *S.mr_grid(ph, rng, SCALE), rng)
        out.append((ct, mr))
    return out


def test_tissue_intensity_order_differs_non_monotonically(rendered):
    tissues = (S.LUNG, S.FAT, S.MUSCLE, S.MYOCARD, S.BLOOD, S.CORTICAL, S.LIVER)
    for (ci, _, ct), (mi, _, mt) in rendered:
        cm = {t: float(ci[ct == t].mean()) for t in tissues}
        mm = {t: float(mi[mt == t].mean()) for t in tissues}
        # fat: darker than muscle in CT, brighter in MR; cortical bone: brightest in CT, below muscle in MR
        assert cm[S.FAT] < cm[S.MUSCLE] - 80 and mm[S.FAT] > 1.8 * mm[S.MUSCLE]
        assert cm[S.CORTICAL] > max(v for t, v in cm.items() if t != S.CORTICAL)
        assert mm[S.CORTICAL] < mm[S.MUSCLE]
        # CT is in HU: lung ~ -850 (partial volume raises it), blood with contrast bright
        assert cm[S.LUNG] < -600 and 200 < cm[S.BLOOD] < 500 and -150 < cm[S.FAT] < -50
        rho = stats.spearmanr([cm[t] for t in tissues], [mm[t] for t in tissues]).statistic
        assert rho < 0.6, rho  # far from a monotonic relation


def test_slow_flow_weights_stay_in_the_pool_and_are_strongest_at_its_wall():
    sp = np.array([1.5, 1.5, 2.0])
    ijk = np.indices((40, 40, 30)).astype(float)
    r = np.sqrt(sum(((ijk[a] - c) * sp[a]) ** 2 for a, c in enumerate((19.5, 19.5, 14.5))))
    pool = r < 22
    w = S._slow_flow(pool, sp, np.random.default_rng(0), reach_mm=6.0, coverage=0.4)
    assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1 and not w[~pool].any()
    assert 0.2 < float((w[pool] > 0).mean()) < 0.6
    wall, core = pool & (r > 18), pool & (r < 10)
    assert w[wall].mean() > 1.5 * w[core].mean() > 0
    assert not S._slow_flow(np.zeros_like(pool), sp, np.random.default_rng(0), reach_mm=6.0, coverage=0.4).any()


def test_mr_slow_flow_brightens_the_chambers_and_leaves_every_other_draw_alone(monkeypatch):
    def render():
        rng = S._rng(0, "cardiac", "mr", 1)
        ph = S.phantom_cardiac(rng)
        return S.render_mr(ph, *S.mr_grid(ph, rng, SCALE), rng)

    img, lab, tissue = render()
    monkeypatch.setattr(S.cardiac, "_slow_flow", lambda where, *a, **k: np.zeros(where.shape, np.float32))
    ref, lab0, _ = render()
    assert np.array_equal(lab, lab0)
    pools = np.isin(tissue, (S.BLOOD, S.BLOOD_R)) & (lab != S.CARDIAC_LABELS["AA"])
    near = ndimage.binary_dilation(pools, np.ones((3, 3, 3), bool), iterations=3)  # the blur reaches 2 voxels
    near |= np.roll(near, img.shape[0] // 2, axis=0)  # the N/2 ghost carries a copy
    changed = ~np.isclose(img, ref, rtol=1e-5, atol=1e-3)
    assert changed.any() and not changed[~near].any()
    cav = np.isin(lab, (2, 3))
    mid = 0.5 * (np.median(ref[lab == 1]) + np.median(ref[cav]))
    assert (img[cav] > mid).mean() > (ref[cav] > mid).mean() + 0.02


def test_histogram_matching_does_not_undo_the_shift(rendered):
    for (ci, cl, ct), (mi, ml, mt) in rendered:
        h = _hist_match(ci.ravel(), mi.ravel()).reshape(ci.shape)
        ks = {k: stats.ks_2samp(h[cl == v], mi[ml == v]).statistic for k, v in S.CARDIAC_LABELS.items()}
        # the blood pools look entirely different even after histogram matching
        assert min(ks["LAC"], ks["LVC"], ks["AA"]) > 0.9, ks
        assert np.mean(list(ks.values())) > 0.3, ks
        assert stats.ks_2samp(h[ct == S.FAT], mi[mt == S.FAT]).statistic > 0.9
        # fat/muscle contrast keeps the CT sign after matching, opposite to MR (effect sizes in units of std)
        d_mr = _cohen_d(mi[mt == S.FAT], mi[mt == S.MUSCLE])
        d_hm = _cohen_d(h[ct == S.FAT], h[ct == S.MUSCLE])
        assert d_mr > 2 and d_hm < -0.5, (d_mr, d_hm)
        # blood/myocardium contrast has opposite signs (black-blood MR, contrast CT), strong in both: each modality
        # stays segmentable on its own, and a segmenter cannot carry over from one to the other unadapted
        assert _cohen_d(mi[ml == 3], mi[ml == 1]) < -2 and _cohen_d(ci[cl == 3], ci[cl == 1]) > 2
        # the MR cavities stay brighter than lung (incomplete suppression): a tissue-wise map exists between sites
        assert _cohen_d(mi[ml == 3], mi[mt == S.LUNG]) > 1


def test_chest_sites_differ_in_contrast_noise_and_geometry():
    facts = {}
    for site in ("cxr_a", "cxr_b"):
        rows = []
        for i in range(6):
            rng = S._rng(0, "chestxray", site, i)
            img, lab, f = S.render_cxr(S.phantom_cxr(rng), site, rng, SCALE)
            assert set(np.unique(lab)) == {0, 1, 2}
            # the patient's right lung (label 1) is on the image's left side
            cols = np.nonzero(lab)[1]
            assert np.nonzero(lab == 1)[1].mean() < cols.mean() < np.nonzero(lab == 2)[1].mean()
            v = img / (2 ** S.CXR_STYLES[site]["bits"] - 1)
            lung = ndimage.binary_erosion(lab > 0, iterations=3)
            near = ndimage.binary_dilation(lab > 0, iterations=12) & ~ndimage.binary_dilation(lab > 0, iterations=3)
            flat = np.zeros_like(lung)
            R, C = v.shape
            flat[int(R * 0.82):int(R * 0.95), int(C * 0.35):int(C * 0.65)] = True  # below the heart: no edges
            rows.append((v[near].mean() - v[lung].mean(), _noise_sigma(v, flat), v.shape))
        facts[site] = rows
    con_a = np.array([r[0] for r in facts["cxr_a"]])
    con_b = np.array([r[0] for r in facts["cxr_b"]])
    noise_a = np.array([r[1] for r in facts["cxr_a"]])
    noise_b = np.array([r[1] for r in facts["cxr_b"]])
    assert (con_a > 0.2).all() and (con_b > 0.2).all()  # lungs dark against soft tissue at both sites
    assert con_a.mean() - con_b.mean() > 0.05, (con_a.mean(), con_b.mean())
    assert noise_b.min() > 2 * noise_a.max(), (noise_a, noise_b)
    assert facts["cxr_a"][0][2] != facts["cxr_b"][0][2]  # image size / aspect


def test_film_site_has_a_heel_effect_that_a_global_tone_curve_cannot_undo():
    """Site B's exposure falls off along the vertical axis (either way): the same patient and film drawn without the
    heel effect differs from the one with it by a ramp from top to bottom, not by a constant."""
    import copy

    st = S.CXR_STYLES["cxr_b"]
    slopes = []
    for i in range(4):
        imgs = []
        for heel in (st["heel"], None):
            S.CXR_STYLES["cxr_b"] = dict(st, heel=heel)
            try:
                rng = S._rng(0, "chestxray", "cxr_b", i)
                imgs.append(S.render_cxr(copy.deepcopy(S.phantom_cxr(rng)), "cxr_b", rng, SCALE)[0] / 255.0)
            finally:
                S.CXR_STYLES["cxr_b"] = st
        diff = (imgs[0] - imgs[1])[:, imgs[0].shape[1] // 4: -imgs[0].shape[1] // 4].mean(1)  # row means, middle
        rows = np.arange(diff.size)
        slopes.append(np.polyfit(rows / rows[-1], diff, 1)[0])  # end-to-end change of the difference
        assert abs(np.corrcoef(rows, diff)[0, 1]) > 0.8, i
    assert min(abs(s) for s in slopes) > 0.05, slopes


# ---------------------------------------------------------------------------------------------------------------------
# files: layout, formats, geometry, PHI


def test_layout_and_site_json(written):
    out, summary = written["out"], written["summary"]
    assert set(summary["cardiac"]) == {"mr", "ct"} and set(summary["chestxray"]) == {"cxr_a", "cxr_b"}
    assert summary["cardiac"]["ct"]["format"] == "dicom" and summary["cardiac"]["mr"]["format"] == "nifti"
    assert summary["chestxray"]["cxr_a"]["format"] == "dicom" and summary["chestxray"]["cxr_b"]["format"] == "png"
    for task, sites in summary.items():
        for site, info in sites.items():
            root = out / task / site
            assert Path(info["path"]) == root and (root / "images").is_dir() and (root / "labels").is_dir()
            meta = json.loads((root / "site.json").read_text())
            assert meta["n"] == info["n"] and meta["seed"] == 0 and meta["generator_version"] == S.GENERATOR_VERSION
            assert meta["structures"] == (S.CARDIAC_LABELS if task == "cardiac" else S.CXR_LABELS)
    assert not list(out.glob("*/.*"))  # no temporary folders left


def test_mr_site_nifti(written):
    root = written["out"] / "cardiac" / "mr"
    imgs = sorted((root / "images").glob("case_*.nii.gz"))
    assert [p.name for p in imgs] == [f"case_{i + 1:04d}.nii.gz" for i in range(N_CARDIAC)]
    for p in imgs:
        im, lb = nib.load(p), nib.load(root / "labels" / p.name)
        assert im.shape == lb.shape and np.allclose(im.affine, lb.affine)
        assert nib.aff2axcodes(im.affine) == ("L", "I", "A")  # coronal, not the CT's axial LPS
        assert im.get_data_dtype() == np.int16 and lb.get_data_dtype() == np.uint8
        lab = np.asarray(lb.dataobj)
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
        sp = nib.affines.voxel_sizes(im.affine)
        assert 2.5 < sp[0] < 3.6 and sp[2] > 4.5  # scale 0.5 doubles the spacing


def test_ct_site_dicom_series_labels_and_phi(written):
    root = written["out"] / "cardiac" / "ct"
    series = _series_dirs(root)
    assert len(series) == N_CARDIAC
    people, syntaxes = [], set()
    for d in series:
        rel = d.relative_to(root / "images")
        assert len(rel.parts) == 2  # PACS-like nesting with opaque names
        files = sorted(d.glob("IM*"))
        ds = pydicom.dcmread(files[0])
        syntaxes.add(ds.file_meta.TransferSyntaxUID.name)
        assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        for key in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
                    "AccessionNumber", "StudyDate"):
            assert str(ds.get(key, "")).strip(), f"{key} missing"
        assert str(ds.PatientID).startswith("HSP") and str(ds.AccessionNumber).startswith("ACC")
        assert "^" in str(ds.PatientName)
        people.append((str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)))
        # the label sits on exactly the grid a reader builds from the series
        shape, affine = _affine_from_dicom(files)
        lb = nib.load(root / "labels" / f"{ds.AccessionNumber}.nii.gz")
        assert lb.shape == shape and np.abs(lb.affine - affine).max() < 1e-3
        lab = np.asarray(lb.dataobj)
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
        # pixel data decodes, in HU; bright blood inside the LV cavity slice
        k = int(np.argmax((lab == 3).sum((0, 1))))
        slices = sorted((pydicom.dcmread(f) for f in files), key=lambda x: float(x.ImagePositionPatient[2]))
        hu = slices[k].pixel_array.T.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu[lab[:, :, k] == 3].mean() > 200 and hu.min() >= -1024
    for col in zip(*people):
        assert len(set(col)) == len(col)  # unique per subject
    assert {"Explicit VR Little Endian", "RLE Lossless"} <= syntaxes and len(syntaxes) >= 3
    meta = (root / "site.json").read_text()
    assert not any(v in meta for p in people for v in p)  # no identifiers in site.json


def test_chest_sites_files(written):
    root_a = written["out"] / "chestxray" / "cxr_a"
    photometrics, ids = [], set()
    for f in sorted((root_a / "images").rglob("IM*")):
        ds = pydicom.dcmread(f)
        assert ds.Modality == "CR" and ds.PatientName and ds.InstitutionName and ds.BitsStored == 12
        ids.add(str(ds.PatientID))
        lab = np.asarray(Image.open(root_a / "labels" / f"{ds.AccessionNumber}.png"))
        px = ds.pixel_array.astype(float)
        assert lab.shape == px.shape and lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 2}
        if ds.PhotometricInterpretation == "MONOCHROME1":
            px = 4095 - px
        photometrics.append(str(ds.PhotometricInterpretation))
        assert px[lab > 0].mean() < px[lab == 0].mean()  # lungs dark once displayed
    assert len(ids) == N_CXR and "MONOCHROME1" in photometrics
    root_b = written["out"] / "chestxray" / "cxr_b"
    imgs = sorted((root_b / "images").glob("*.png"))
    assert len(imgs) == N_CXR
    for p in imgs:
        im = Image.open(p)
        lab = np.asarray(Image.open(root_b / "labels" / p.name))
        assert im.mode == "L" and np.asarray(im).shape == lab.shape and set(np.unique(lab)) == {0, 1, 2}
        assert not im.info.get("text") and not getattr(im, "text", None)


# ---------------------------------------------------------------------------------------------------------------------
# determinism and atomic writes


def test_deterministic_byte_identical_and_seed_dependent(written, tmp_path):
    again = {"cardiac": S.synthesize("cardiac", tmp_path, seed=0, n_subjects=N_CARDIAC, scale=SCALE, workers=1),
             "chestxray": S.synthesize("chestxray", tmp_path, seed=0, n_images=N_CXR, scale=SCALE, workers=1)}
    for task, sites in again.items():
        for site in sites:
            a = _files(written["out"] / task / site)
            b = _files(tmp_path / task / site)
            assert a.keys() == b.keys()
            diff = [k for k in a if a[k] != b[k]]
            assert not diff, f"{task}/{site}: {diff[:3]} differ on re-run"
    other = tmp_path / "seed1"
    S.synthesize("cardiac", other, seed=1, n_subjects=2, scale=SCALE, workers=1)
    for i in range(2):
        a = np.asarray(nib.load(written["out"] / "cardiac" / "mr" / "labels" / f"case_{i + 1:04d}.nii.gz").dataobj)
        b = np.asarray(nib.load(other / "cardiac" / "mr" / "labels" / f"case_{i + 1:04d}.nii.gz").dataobj)
        assert a.shape != b.shape or not np.array_equal(a, b)
    ids0 = {pydicom.dcmread(next(d.glob("IM*")), stop_before_pixels=True).PatientID
            for d in _series_dirs(written["out"] / "cardiac" / "ct")}
    ids1 = {pydicom.dcmread(next(d.glob("IM*")), stop_before_pixels=True).PatientID
            for d in _series_dirs(other / "cardiac" / "ct")}
    assert not ids0 & ids1


def test_killed_run_leaves_no_half_site_and_keeps_the_old_one(tmp_path, monkeypatch):
    S.synthesize("chestxray", tmp_path, seed=0, n_images=2, scale=0.3, workers=1)
    before = _files(tmp_path / "chestxray" / "cxr_a")
    calls = {"n": 0}
    real = S._cxr_subject

    def dying(job):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(job)

    monkeypatch.setattr(S.sites, "_cxr_subject", dying)  # where _write_site looks it up
    with pytest.raises(KeyboardInterrupt):
        S.synthesize("chestxray", tmp_path, seed=5, n_images=3, scale=0.3, workers=1)
    assert _files(tmp_path / "chestxray" / "cxr_a") == before
    assert not list((tmp_path / "chestxray").glob(".*"))
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        S.synthesize("chestxray", tmp_path / "fresh", seed=5, n_images=3, scale=0.3, workers=1)
    assert not (tmp_path / "fresh" / "chestxray" / "cxr_a").exists()


def test_bad_arguments():
    with pytest.raises(ValueError):
        S.synthesize("brain", Path("/nonexistent"))
    with pytest.raises(ValueError):
        S.synthesize("cardiac", Path("/nonexistent"), scale=0)
