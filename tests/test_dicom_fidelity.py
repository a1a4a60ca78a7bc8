"""DICOM pixel fidelity (issue 20 item 4): stored bits above HighBit, Philips private scale slope, diffusion
b-values/vectors, and the scaling path recorded in the manifest. Synthetic series built with pydicom; dcm2niix (the
reference converter) is run on the same files where it is installed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from siteadapt.errors import SeriesRejected
from siteadapt.io.dicom import read_series
from siteadapt.io.dicom_write import write_series
from siteadapt.steps.ingest import ingest

from helpers.dicom import (REAL, assert_matches_dcm2niix, base_mr, canonical, dcm2niix_bin, lps_parts, make_affine,
                           only_series, write_enhanced, write_mosaic)

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711"}


def _edit(files, fn):
    """Rewrite each file after ``fn(ds, index)`` changed its dataset."""
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        fn(ds, i)
        ds.save_as(f)


def _dcm2niix(src: Path, out: Path) -> Path:
    exe = dcm2niix_bin()
    if exe is None:
        pytest.skip("dcm2niix not installed")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "y", "-b", "n", "-f", "ref", "-o", str(out), str(src)], check=True, capture_output=True,
                   timeout=120)
    refs = sorted(out.glob("*.nii.gz"))
    assert len(refs) == 1, refs
    return refs[0]


def _ingest_one(src: Path, tmp_path: Path) -> tuple[dict, Path]:
    res = ingest(src, "site", tmp_path / "data")
    assert len(res.items) == 1, res.manifest
    return res.items[0], res.out_dir


# --------------------------------------------------------------------------------------------------------------------
# bits above HighBit


def _twelve_bit_with_garbage(src: Path, seed=0) -> np.ndarray:
    """A 12-bit unsigned series whose stored 16-bit words carry random bits 12-15; returns the 12-bit truth."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4096, size=(20, 14, 5)).astype(np.uint16)
    files = write_series(src, truth, make_affine("oblique"), modality="MR", patient=PATIENT, pixel_dtype=np.uint16)

    def dirty(ds, i):
        words = np.frombuffer(ds.PixelData, "<u2").copy()
        words |= rng.integers(1, 16, size=words.shape).astype(np.uint16) << 12  # never 0: every word is dirty
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = words.tobytes()
    _edit(files, dirty)
    return truth


def test_bits_above_high_bit_are_masked_like_dcm2niix(tmp_path):
    truth = _twelve_bit_with_garbage(tmp_path / "s")
    vol = read_series(only_series(tmp_path / "s"))
    assert int(vol.data.max()) <= 4095
    np.testing.assert_array_equal(vol.data, truth)
    assert_matches_dcm2niix(vol, _dcm2niix(tmp_path / "s", tmp_path / "ref"))
    item, out = _ingest_one(tmp_path / "s", tmp_path)
    ingested = np.asanyarray(nib.load(str(out / item["image"])).dataobj)
    np.testing.assert_array_equal(ingested, truth)
    assert item["meta"]["scaling"] == "none"


def test_signed_12_bit_garbage_is_sign_extended_once(tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.integers(-2048, 2048, size=(16, 12, 4)).astype(np.int16)
    files = write_series(tmp_path / "s", truth, make_affine("axial"), modality="CT", patient=PATIENT,
                         pixel_dtype=np.int16)

    def dirty(ds, i):
        words = np.frombuffer(ds.PixelData, "<u2").copy() & 0x0FFF
        words |= rng.integers(0, 16, size=words.shape).astype(np.uint16) << 12
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = words.tobytes()
    _edit(files, dirty)
    vol = read_series(only_series(tmp_path / "s"))
    np.testing.assert_array_equal(vol.data, truth)


# --------------------------------------------------------------------------------------------------------------------
# Philips private scale slope (2005,100E)

RS, RI, SS = 2.5, -10.0, 0.0123


def _philips(ds, i, ss=SS):
    ds.Manufacturer = "Philips Medical Systems"
    ds.RescaleSlope, ds.RescaleIntercept = RS, RI
    ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x0E, "FL", ss)


def _philips_series(src: Path, seed=1) -> np.ndarray:
    stored = np.random.default_rng(seed).integers(0, 4000, size=(18, 14, 5)).astype(np.uint16)
    files = write_series(src, stored, make_affine("sagittal"), modality="MR", patient=PATIENT, pixel_dtype=np.uint16)
    _edit(files, _philips)
    return stored


def test_philips_scale_slope_gives_dcm2niix_precise_values(tmp_path):
    stored = _philips_series(tmp_path / "s")
    vol = read_series(only_series(tmp_path / "s"))
    assert vol.meta["scaling"] == "philips_fp"
    expected = (stored * RS + RI) / (RS * SS)  # P = D / (RS * SS), D = stored * RS + RI
    np.testing.assert_allclose(vol.data, expected, rtol=1e-6, atol=1e-3)
    ref = nib.as_closest_canonical(nib.load(str(_dcm2niix(tmp_path / "s", tmp_path / "ref"))))
    ours = np.asarray(canonical(vol.data, vol.affine).dataobj, dtype=np.float64)
    np.testing.assert_allclose(ours, ref.get_fdata(), rtol=1e-6, atol=1e-3)
    item, _ = _ingest_one(tmp_path / "s", tmp_path)
    assert item["meta"]["scaling"] == "philips_fp"


def test_scale_slope_ignored_for_other_vendors_and_rescale_recorded(tmp_path):
    stored = np.random.default_rng(2).integers(0, 4000, size=(12, 10, 3)).astype(np.uint16)
    files = write_series(tmp_path / "s", stored, make_affine("axial"), modality="MR", patient=PATIENT,
                         pixel_dtype=np.uint16)

    def other(ds, i):
        _philips(ds, i)
        ds.Manufacturer = "SIEMENS"
    _edit(files, other)
    vol = read_series(only_series(tmp_path / "s"))
    assert vol.meta["scaling"] == "rescale"
    np.testing.assert_allclose(vol.data, stored * RS + RI, rtol=1e-6)


def test_philips_enhanced_scale_slope_per_frame(tmp_path):
    nx, ny, nz = 12, 10, 4
    aff = make_affine("coronal")
    lps, row, col, cs, rs, dz = lps_parts(aff)
    stored = np.random.default_rng(4).integers(0, 3000, size=(nx, ny, nz)).astype(np.uint16)
    slopes = [0.01, 0.02, 0.04, 0.05]  # one private scale slope per frame, inside the private sequence (2005,140F)
    ds = base_mr("1.2.840.10008.5.1.4.1.1.4.1")
    ds.Manufacturer = "Philips Medical Systems"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz
    shared = Dataset()
    pm, po, pv = Dataset(), Dataset(), Dataset()
    pm.PixelSpacing, pm.SliceThickness = [rs, cs], dz
    po.ImageOrientationPatient = [*row, *col]
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = RS, RI, "US"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(nz):
        fg, pp, priv = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = list(lps[:3, 3] + k * lps[:3, 2])
        fg.PlanePositionSequence = Sequence([pp])
        priv.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x0E, "FL", slopes[k])
        fg.private_block(0x2005, "Philips MR Imaging DD 005", create=True).add_new(0x0F, "SQ", Sequence([priv]))
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in range(nz)])).astype("<u2").tobytes()
    (tmp_path / "s").mkdir()
    ds.save_as(tmp_path / "s" / "enh.dcm", enforce_file_format=True)
    vol = read_series(only_series(tmp_path / "s"))
    assert vol.meta["scaling"] == "philips_fp"
    for k in range(nz):
        np.testing.assert_allclose(vol.data[:, :, k], (stored[:, :, k] * RS + RI) / (RS * slopes[k]), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# diffusion b-values / b-vectors

BVALS = [0, 1000, 1000, 1000, 2000]
DIRS_LPS = np.array([[0, 0, 0], [1, 0, 0], [0, 0.6, 0.8], [0.48, -0.6, 0.64], [-0.6, 0.0, 0.8]])


def _dwi_series(src: Path, orientation="oblique", private_siemens=False, names="random") -> np.ndarray:
    data = np.random.default_rng(5).integers(0, 3000, size=(14, 12, 4, len(BVALS))).astype(np.uint16)
    files = write_series(src, data, make_affine(orientation), modality="MR", patient=PATIENT, pixel_dtype=np.uint16,
                         file_names=names)

    def tag(ds, i):
        t = int(ds.TemporalPositionIdentifier) - 1
        if private_siemens:
            ds.Manufacturer = "SIEMENS"
            blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            blk.add_new(0x0C, "IS", BVALS[t])
            if BVALS[t]:
                blk.add_new(0x0E, "FD", [float(v) for v in DIRS_LPS[t]])
        else:
            ds.Manufacturer = "Philips Medical Systems"
            ds.DiffusionBValue = float(BVALS[t])
            if BVALS[t]:
                ds.DiffusionGradientOrientation = [float(v) for v in DIRS_LPS[t]]
    _edit(files, tag)
    return data


def _world(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL bvecs (3, T) of an image with ``affine`` -> RAS directions (T, 3) (undo the x flip of det > 0)."""
    m = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    v = np.array(bvecs, dtype=np.float64).T.copy()
    if np.linalg.det(m) > 0:
        v[:, 0] *= -1
    return v @ m.T


def _read_fsl(path_bval: Path, path_bvec: Path):
    bval = np.array(path_bval.read_text().split(), dtype=np.float64)
    bvec = np.array([line.split() for line in path_bvec.read_text().strip().splitlines()], dtype=np.float64)
    return bval, bvec


@pytest.mark.parametrize("orientation", ["oblique", "axial"])
def test_diffusion_sidecars_match_dcm2niix(tmp_path, orientation):
    _dwi_series(tmp_path / "s", orientation)
    item, out = _ingest_one(tmp_path / "s", tmp_path)
    img = nib.load(str(out / item["image"]))
    assert img.shape[3] == len(BVALS)
    bval_path, bvec_path = out / item["bval"], out / item["bvec"]
    assert bval_path.name == f"{item['id']}.bval" and bvec_path.name == f"{item['id']}.bvec"
    assert bval_path.parent == (out / item["image"]).parent
    bval, bvec = _read_fsl(bval_path, bvec_path)
    assert bval.tolist() == BVALS and bvec.shape == (3, len(BVALS))
    ras = DIRS_LPS * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(_world(bvec, img.affine), ras, atol=1e-5)
    # dcm2niix on the same series: same b-values, same gradient directions in the world
    ref = _dcm2niix(tmp_path / "s", tmp_path / "ref")
    rbval, rbvec = _read_fsl(ref.with_name("ref.bval"), ref.with_name("ref.bvec"))
    assert rbval.tolist() == bval.tolist()
    np.testing.assert_allclose(_world(bvec, img.affine), _world(rbvec, nib.load(str(ref)).affine), atol=1e-4)
    # re-running rewrites nothing; the sidecar hashes are in the manifest
    again = ingest(tmp_path / "s", "site", tmp_path / "data")
    assert again.written == [] and again.items[0]["bval_sha256"] == item["bval_sha256"]


def test_diffusion_siemens_private_tags(tmp_path):
    _dwi_series(tmp_path / "s", "axial", private_siemens=True)
    from siteadapt.io.volume import fsl_bvecs

    vol = read_series(only_series(tmp_path / "s"))
    assert vol.diffusion is not None
    assert vol.diffusion["bvals"].tolist() == BVALS
    bvec = fsl_bvecs(vol)
    np.testing.assert_allclose(_world(bvec, vol.affine), DIRS_LPS * np.array([-1.0, -1.0, 1.0]), atol=1e-6)
    # axial, no flip: voxel frame is LPS with x flipped by FSL's det > 0 rule
    np.testing.assert_allclose(bvec[:, 1], [-1, 0, 0], atol=1e-9)


def test_no_diffusion_no_sidecars(tmp_path):
    data = np.random.default_rng(6).integers(0, 3000, size=(10, 8, 3, 3)).astype(np.uint16)
    write_series(tmp_path / "s", data, make_affine("axial"), modality="MR", patient=PATIENT, pixel_dtype=np.uint16)
    item, out = _ingest_one(tmp_path / "s", tmp_path)
    assert "bval" not in item and not list(out.glob("images/*.bval")) and not list(out.glob("images/*.bvec"))


def test_diffusion_volumes_mixed_across_slices_are_refused(tmp_path):
    files = write_series(tmp_path / "s", np.zeros((8, 8, 3, 2), np.uint16), make_affine("axial"), modality="MR",
                         patient=PATIENT, pixel_dtype=np.uint16)

    def tag(ds, i):
        t, k = int(ds.TemporalPositionIdentifier) - 1, i % 3
        ds.DiffusionBValue = float(1000 * ((t + (k == 1)) % 2))  # slice 1 has the b-values of the other volume
    _edit(files, tag)
    with pytest.raises(SeriesRejected, match="different b-values"):
        read_series(only_series(tmp_path / "s"))


@pytest.mark.realdata
def test_real_series_have_no_diffusion_and_keep_scaling(shared_data):
    """The real corpus beside the checkout: none is diffusion-weighted or Philips, all stored as plain values (their
    bit-identity with dcm2niix is checked by test_dicom.py::test_real_series_match_dcm2niix)."""
    from siteadapt.io.dicom import scan_tree
    for name in REAL:
        series, _ = scan_tree(shared_data / "dicom" / name)
        vol = read_series(series[0])
        assert vol.diffusion is None and vol.meta["scaling"] == "none", name


@pytest.mark.parametrize("implicit", [False, True])
def test_private_tags_same_on_fast_and_pydicom_header_paths(tmp_path, monkeypatch, implicit):
    """Scale slope and Siemens diffusion tags are read alike by the struct header walk and by pydicom, in explicit
    and implicit VR (where the private tags carry no VR and pydicom may hand back raw bytes)."""
    from pydicom.uid import ImplicitVRLittleEndian

    from siteadapt.io.dicom import probe as mod  # _probe looks _fast_header up here

    _philips_series(tmp_path / "p")
    _dwi_series(tmp_path / "d", "axial", private_siemens=True, names="instance")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    if implicit:
        def to_implicit(ds, i):
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        _edit(files, to_implicit)

    def facts(frames):
        return [(f.slope, f.intercept, f.scaling, f.bval, None if f.bdir is None else tuple(f.bdir)) for f in frames]

    seen = set()
    for p in files:
        assert implicit or mod._fast_header(p.read_bytes()) is not None, p  # (implicit VR files go to pydicom)
        fast, _ = mod._probe(p)
        with monkeypatch.context() as mp:
            mp.setattr(mod, "_fast_header", lambda buf: None)
            slow, _ = mod._probe(p)
        assert facts(fast) == facts(slow), p
        seen.update((f[2], f[3]) for f in facts(fast))
    assert ("philips_fp", None) in seen and ("none", 2000.0) in seen and ("none", 0.0) in seen


def test_private_values_decoded_from_raw_bytes():
    """Without the private creator pydicom cannot know the VR and hands back bytes (VR UN): still decoded."""
    import struct

    from siteadapt.io.dicom import headers as mod

    ds = Dataset()
    ds.add_new(0x2005100E, "UN", struct.pack("<f", 0.5))
    ds.add_new(0x0019100C, "UN", b"1000")
    ds.add_new(0x0019100E, "UN", struct.pack("<3d", 0.0, 0.6, 0.8))
    assert mod._private(ds, 0x2005100E) == 0.5
    assert mod._scaling("Philips", 4.0, 2.0, mod._private(ds, 0x2005100E)) == (2.0, 1.0, "philips_fp")
    ds.Manufacturer = "SIEMENS"
    bval, bdir = mod._diffusion(ds, "SIEMENS")
    assert bval == 1000.0 and bdir.tolist() == [0.0, 0.6, 0.8]


def test_mosaic_diffusion_series_with_dirty_high_bits(tmp_path):
    """A Siemens DWI mosaic series (one mosaic file per volume, private b-value/direction tags) whose 12-bit words
    carry bits above HighBit: masked values, one bval/bvec column per volume in acquisition order, as dcm2niix."""
    from pydicom.uid import generate_uid
    rng = np.random.default_rng(9)
    aff = make_affine("axial", spacing=(3.0, 3.0, 3.6))
    series_uid = generate_uid()
    truth = rng.integers(0, 4096, size=(16, 16, 7, 3)).astype(np.uint16)
    order = [2, 0, 1]  # files named in another order than acquired
    for t in range(3):
        path = tmp_path / "m" / f"v{order[t]}.dcm"
        write_mosaic(path, truth[..., t], aff)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.InstanceNumber, ds.AcquisitionTime = series_uid, t + 1, f"1010{10 + t}.000"
        ds.Manufacturer = "SIEMENS"
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER")
        blk.add_new(0x0C, "IS", BVALS[t])
        if BVALS[t]:
            blk.add_new(0x0E, "FD", [float(v) for v in DIRS_LPS[t]])
        dirt = rng.integers(1, 16, size=ds.Rows * ds.Columns).astype(np.uint16) << 12
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | dirt).astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    vol = read_series(only_series(tmp_path / "m"))
    np.testing.assert_array_equal(vol.data, truth)
    assert vol.diffusion["bvals"].tolist() == BVALS[:3]
    from siteadapt.io.volume import fsl_bvecs

    np.testing.assert_allclose(_world(fsl_bvecs(vol), vol.affine), DIRS_LPS[:3] * np.array([-1.0, -1.0, 1.0]),
                               atol=1e-6)
    ref = _dcm2niix(tmp_path / "m", tmp_path / "ref")
    assert_matches_dcm2niix(vol, ref)
    rbval, rbvec = _read_fsl(ref.with_name("ref.bval"), ref.with_name("ref.bvec"))
    assert rbval.tolist() == BVALS[:3]
    np.testing.assert_allclose(_world(fsl_bvecs(vol), vol.affine), _world(rbvec, nib.load(str(ref)).affine),
                               atol=1e-4)


def test_enhanced_diffusion_sequence(tmp_path):
    """Enhanced MR: b-value and direction per frame in MRDiffusionSequence; frames stored in a scrambled order."""
    rng = np.random.default_rng(10)
    data = rng.integers(0, 4000, size=(12, 10, 3, 4)).astype(np.uint16)
    (tmp_path / "e").mkdir()
    write_enhanced(tmp_path / "e" / "enh.dcm", data, make_affine("oblique"), rng.permutation(12))
    ds = pydicom.dcmread(tmp_path / "e" / "enh.dcm")
    for fg in ds.PerFrameFunctionalGroupsSequence:
        t = int(fg.FrameContentSequence[0].TemporalPositionIndex) - 1
        diff = Dataset()
        diff.DiffusionBValue = float(BVALS[t])
        diff.DiffusionDirectionality = "DIRECTIONAL" if BVALS[t] else "NONE"
        if BVALS[t]:
            grad = Dataset()
            grad.DiffusionGradientOrientation = [float(v) for v in DIRS_LPS[t]]
            diff.DiffusionGradientDirectionSequence = Sequence([grad])
        fg.MRDiffusionSequence = Sequence([diff])
    ds.save_as(tmp_path / "e" / "enh.dcm")
    vol = read_series(only_series(tmp_path / "e"))
    np.testing.assert_array_equal(vol.data, data)
    assert vol.diffusion["bvals"].tolist() == BVALS[:4]
    from siteadapt.io.volume import fsl_bvecs

    np.testing.assert_allclose(_world(fsl_bvecs(vol), vol.affine), DIRS_LPS[:4] * np.array([-1.0, -1.0, 1.0]),
                               atol=1e-6)
