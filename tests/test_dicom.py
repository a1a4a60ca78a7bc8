"""DICOM reading (siteadapt.io.dicom) against dcm2niix, on synthetic series from siteadapt.io.dicom_write and on the
real scanner series under ../shared/data/dicom (marker ``realdata``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from siteadapt.errors import SeriesRejected
from siteadapt.io.dicom import DicomSeries, read_series, scan_dicom_files, scan_tree
from siteadapt.io.dicom_write import write_2d, write_series
from siteadapt.io.volume import save_nifti

from helpers.dicom import (ORIENTATIONS, REAL, REAL_SHAPES, assert_matches_dcm2niix, ct_data, make_affine,
                           only_series, run_dcm2niix, write_enhanced, write_mosaic)

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19700101", "PatientSex": "F",
           "InstitutionName": "St Elsewhere", "ReferringPhysicianName": "House^G", "AccessionNumber": "ACC123",
           "StudyDate": "20240102"}


# --------------------------------------------------------------------------------------------------------------------
# writer + reader agree with dcm2niix


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_orientations_match_dcm2niix(tmp_path, orientation):
    data = ct_data()
    aff = make_affine(orientation)
    write_series(tmp_path / "dcm", data, aff, modality="CT", patient=PATIENT, rescale=(1.0, -1024.0))
    vol = read_series(only_series(tmp_path / "dcm"))
    assert vol.modality == "CT"
    assert vol.data.shape == data.shape
    # our own convention: exactly the volume and affine that were written
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    refs = run_dcm2niix(tmp_path / "dcm", tmp_path / "ref")
    assert len(refs) == 1
    assert_matches_dcm2niix(vol, refs[0])


def test_ct_rescale_gives_hounsfield_units(tmp_path):
    hu = ct_data(seed=3)
    write_series(tmp_path / "a", hu, make_affine("axial"), modality="CT", patient=PATIENT, rescale=(1.0, -1024.0))
    ds = pydicom.dcmread(next((tmp_path / "a").iterdir()))
    assert float(ds.RescaleIntercept) == -1024.0 and ds.PixelRepresentation == 0  # stored values are >= 0
    vol = read_series(only_series(tmp_path / "a"))
    assert np.issubdtype(vol.data.dtype, np.integer)  # slope 1, integral intercept: integer kept
    np.testing.assert_array_equal(vol.data, hu)
    assert vol.data.min() < -1000
    # a non-unit slope gives float32 values
    half = hu.astype(np.float64) / 2.0
    write_series(tmp_path / "b", half, make_affine("axial"), modality="CT", patient=PATIENT, rescale=(0.5, -1024.0))
    vol = read_series(only_series(tmp_path / "b"))
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, half.astype(np.float32))


@pytest.mark.parametrize("ts", ["implicit_le", "rle", "jpeg2000_lossless", "jpegls_lossless", "jpeg_lossless"])
def test_transfer_syntaxes_round_trip(tmp_path, ts):
    if ts == "jpegls_lossless":
        pytest.importorskip("jpeg_ls", reason="the JPEG-LS encoder needs the 'pyjpegls' package")
    data = ct_data(shape=(32, 32, 5), seed=5)  # openjpeg needs rows and columns >= 32
    aff = make_affine("oblique")
    write_series(tmp_path / ts, data, aff, modality="CT", patient=PATIENT, rescale=(1.0, -1024.0), transfer_syntax=ts)
    vol = read_series(only_series(tmp_path / ts))
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    assert len(vol.meta["transfer_syntaxes"]) == 1
    if ts == "jpeg_lossless":  # our own encoder: dcm2niix's independent decoder must agree too
        assert_matches_dcm2niix(vol, run_dcm2niix(tmp_path / ts, tmp_path / "ref")[0])


def test_signed_pixels_all_codecs(tmp_path):
    rng = np.random.default_rng(9)
    data = rng.integers(-3000, 3000, size=(32, 32, 3)).astype(np.int16)
    codecs = ["explicit_le", "rle", "jpeg2000_lossless", "jpeg_lossless"]
    try:
        import jpeg_ls  # noqa: F401  (pyjpegls: the JPEG-LS encoder)

        codecs.append("jpegls_lossless")
    except ImportError:
        pass
    for ts in codecs:
        write_series(tmp_path / ts, data, np.eye(4), modality="MR", patient=PATIENT, transfer_syntax=ts, seed=ts)
        vol = read_series(only_series(tmp_path / ts))
        np.testing.assert_array_equal(vol.data, data, err_msg=ts)


def test_random_names_and_shuffled_order_give_same_volume(tmp_path):
    data = ct_data(seed=11)
    aff = make_affine("sagittal")
    write_series(tmp_path / "inst", data, aff, modality="MR", patient=PATIENT)
    files = write_series(tmp_path / "rand", data, aff, modality="MR", patient=PATIENT, file_names="random", seed=1)
    assert not any(p.name.startswith("IM") for p in files)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in sorted(files)]
    assert numbers != sorted(numbers)
    a = read_series(only_series(tmp_path / "inst"))
    b = read_series(only_series(tmp_path / "rand"))
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)
    # a DicomSeries built by hand (no cached headers, files in arbitrary order) reads the same
    s = only_series(tmp_path / "rand")
    c = read_series(DicomSeries(uid=s.uid, files=list(reversed(s.files)), modality="MR"))
    np.testing.assert_array_equal(a.data, c.data)


def test_4d_series(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 4000, size=(16, 12, 6, 5)).astype(np.uint16)
    aff = make_affine("coronal", spacing=(3.0, 3.0, 4.0))
    write_series(tmp_path / "d", data, aff, modality="MR", patient=PATIENT)
    vol = read_series(only_series(tmp_path / "d"))
    assert vol.data.shape == (16, 12, 6, 5)
    assert vol.meta["is_4d"] is True
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    assert_matches_dcm2niix(vol, run_dcm2niix(tmp_path / "d", tmp_path / "ref")[0])
    # Shuffled names and InstanceNumbers: time order comes from TemporalPositionIdentifier / AcquisitionTime.
    # (dcm2niix itself needs sensible InstanceNumbers here, so it is not the reference for this one.)
    write_series(tmp_path / "r", data, aff, modality="MR", patient=PATIENT, file_names="random", seed=3)
    shuffled = read_series(only_series(tmp_path / "r"))
    np.testing.assert_array_equal(shuffled.data, data)
    np.testing.assert_allclose(shuffled.affine, aff, atol=1e-4)


def test_2d_radiograph(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 4096, size=(40, 30))
    write_2d(tmp_path / "cr" / "x.dcm", img, modality="CR", pixel_spacing=(0.2, 0.3), patient=PATIENT)
    write_2d(tmp_path / "dx" / "y.dcm", img, modality="DX", pixel_spacing=(0.15, 0.15), patient=PATIENT,
             transfer_syntax="rle", photometric="MONOCHROME1")
    vol = read_series(only_series(tmp_path / "cr"))
    assert vol.data.shape == (30, 40) and vol.modality == "CR"
    np.testing.assert_array_equal(vol.data, img.T)
    np.testing.assert_allclose(vol.spacing, (0.3, 0.2))
    assert_matches_dcm2niix(vol, run_dcm2niix(tmp_path / "cr", tmp_path / "ref")[0])
    vol = read_series(only_series(tmp_path / "dx"))
    np.testing.assert_array_equal(vol.data, img.T)
    assert vol.meta["photometric"] == "MONOCHROME1"


def test_meta_and_match_keys_hold_no_identifiers(tmp_path):
    write_series(tmp_path / "case_007", ct_data(), make_affine("axial"), modality="CT", patient=PATIENT,
                 series_description="SECRET DESCRIPTION")
    s = only_series(tmp_path / "case_007")
    assert s.match_keys == ["case_007", "ACC123", "PID-4711", "1"]
    vol = read_series(s)
    text = repr(vol.meta)
    for v in [*PATIENT.values(), "SECRET", s.uid.split("+")[0]]:
        assert all(str(v) != str(m) for m in vol.meta.values())
        if len(v) > 2:
            assert v not in text
    assert vol.meta["n_files"] == 12 and vol.meta["rows"] == 24 and vol.meta["cols"] == 32


# --------------------------------------------------------------------------------------------------------------------
# bad input: every case is refused with its named reason


def rejected(root) -> str:
    with pytest.raises(SeriesRejected) as ei:
        read_series(only_series(root))
    assert ei.value.path is not None
    return ei.value.reason


def test_missing_slice(tmp_path):
    write_series(tmp_path, ct_data(), make_affine("axial"), modality="CT", patient=PATIENT, drop_slices=(5,))
    assert rejected(tmp_path).startswith("missing slices")


def test_non_uniform_spacing(tmp_path):
    pos = np.arange(12) * 2.5
    pos[7:] += 0.6  # one step of 3.1 mm among 2.5 mm steps (less than 1.5x: not a missing slice)
    write_series(tmp_path, ct_data(), make_affine("axial"), modality="CT", patient=PATIENT, slice_positions=pos)
    assert rejected(tmp_path).startswith("non-uniform slice spacing")


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_gantry_tilt(tmp_path, orientation):
    write_series(tmp_path, ct_data(), make_affine(orientation), modality="CT", patient=PATIENT, gantry_tilt_deg=12.0)
    reason = rejected(tmp_path)
    assert reason.startswith("gantry tilt / sheared slice geometry")
    assert "12" in reason


def test_inconsistent_rows_cols(tmp_path):
    data = ct_data()
    files = write_series(tmp_path, data, make_affine("axial"), modality="CT", patient=PATIENT, drop_slices=(4,))
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    small = np.zeros((32, 20, 12), dtype=np.int16)
    write_series(tmp_path / "odd", small, make_affine("axial"), modality="CT", patient=PATIENT, series_uid=uid,
                 drop_slices=[k for k in range(12) if k != 4], seed=99)
    assert rejected(tmp_path).startswith("inconsistent rows/cols")


def test_whole_stacks_of_different_size_or_orientation_are_split(tmp_path):
    files = write_series(tmp_path / "a", ct_data(), make_affine("axial"), modality="CT", patient=PATIENT)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    write_series(tmp_path / "b", ct_data((16, 16, 4)), make_affine("sagittal"), modality="CT", patient=PATIENT,
                 series_uid=uid, seed=5)
    write_series(tmp_path / "c", ct_data((20, 20, 3)), make_affine("axial", origin_lps=(0, 0, 100)), modality="CT",
                 patient=PATIENT, series_uid=uid, seed=6)
    series, skipped = scan_tree(tmp_path)
    assert not skipped
    assert sorted(read_series(s).data.shape for s in series) == [(16, 16, 4), (20, 20, 3), (32, 24, 12)]
    assert len({s.uid for s in series}) == 3 and all(s.uid.startswith(uid) for s in series)


def test_missing_pixel_data(tmp_path):
    files = write_series(tmp_path, ct_data(), make_affine("axial"), modality="CT", patient=PATIENT)
    ds = pydicom.dcmread(files[3])
    del ds.PixelData
    ds.save_as(files[3])
    assert rejected(tmp_path) == "missing pixel data"


def _non_image(path: Path, sop_class: str, modality: str):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "PID-4711"
    ds.save_as(path, enforce_file_format=True)


def test_scan_reports_every_unused_file(tmp_path):
    files = write_series(tmp_path / "ct", ct_data(), make_affine("axial"), modality="CT", patient=PATIENT)
    (tmp_path / "notes.txt").write_text("not dicom at all\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    raw = files[0].read_bytes()
    (tmp_path / "trunc_pixels.dcm").write_bytes(raw[: len(raw) - 500])
    (tmp_path / "trunc_header.dcm").write_bytes(raw[:200])
    (tmp_path / "trunc_header2.dcm").write_bytes(raw[:700])
    _non_image(tmp_path / "rs.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")
    _non_image(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR")
    _non_image(tmp_path / "pr.dcm", "1.2.840.10008.5.1.4.1.1.11.1", "PR")
    _non_image(tmp_path / "DICOMDIR", "1.2.840.10008.1.3.10", "")
    shutil.copy(files[1], tmp_path / "copy_of_slice")
    series, skipped = scan_tree(tmp_path)
    reasons = {p.name: r for p, r in skipped}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["empty.dcm"] == "not a DICOM file"
    assert reasons["trunc_pixels.dcm"].startswith("truncated or unreadable DICOM")
    assert reasons["trunc_header.dcm"].startswith("truncated or unreadable DICOM")
    assert reasons["trunc_header2.dcm"].startswith("truncated or unreadable DICOM")
    assert reasons["rs.dcm"] == "non-image DICOM (RTSTRUCT)"
    assert reasons["sr.dcm"] == "non-image DICOM (SR)"
    assert reasons["pr.dcm"] == "non-image DICOM (presentation state)"
    assert reasons["DICOMDIR"] == "DICOMDIR"
    assert len(series) == 1 and len(series[0].files) == 12
    assert sum(r.startswith("duplicate SOP instance") for r in reasons.values()) == 1
    assert len(skipped) == 10
    np.testing.assert_array_equal(read_series(series[0]).data, ct_data())


def test_truncated_compressed_file(tmp_path):
    files = write_series(tmp_path, ct_data(), make_affine("axial"), modality="CT", patient=PATIENT,
                         transfer_syntax="rle")
    raw = files[2].read_bytes()
    files[2].write_bytes(raw[: len(raw) - 300])
    series, skipped = scan_tree(tmp_path)
    assert [(p.name, r.split(":")[0]) for p, r in skipped] == [(files[2].name, "truncated or unreadable DICOM")]
    with pytest.raises(SeriesRejected, match="missing slices"):
        read_series(series[0])


# --------------------------------------------------------------------------------------------------------------------
# real scanner series (../shared/data/dicom), compared with dcm2niix


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL)
def test_real_series_match_dcm2niix(shared_data, tmp_path, name):
    src = shared_data / "dicom" / name
    series, skipped = scan_tree(src)
    assert skipped == [] and len(series) == 1
    vol = read_series(series[0])
    assert vol.modality == "MR"
    assert vol.data.shape == REAL_SHAPES[name]
    refs = run_dcm2niix(src, tmp_path / "ref")
    assert len(refs) == 1
    assert_matches_dcm2niix(vol, refs[0])
    # and what we write is what we read
    out = save_nifti(vol, tmp_path / "ours.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.data)
    assert vol.meta["mosaic"] == ("mosaic" in name) and vol.meta["enhanced"] == ("enhanced" in name)


# --------------------------------------------------------------------------------------------------------------------
# enhanced multi-frame and Siemens mosaic, built by hand (the real ones are in the realdata tests)


def test_enhanced_multiframe_synthetic(tmp_path):
    rng = np.random.default_rng(6)
    data = rng.integers(0, 4000, size=(20, 16, 5, 3)).astype(np.uint16)
    aff = make_affine("oblique", spacing=(1.5, 1.25, 3.0))
    write_enhanced(tmp_path / "mf.dcm", data, aff, rng.permutation(15))
    vol = read_series(only_series(tmp_path))
    assert vol.meta["enhanced"] is True and vol.meta["n_frames"] == 15
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)


@pytest.mark.parametrize("orientation,descending", [("axial", False), ("oblique", False), ("sagittal", True)])
def test_mosaic_synthetic_matches_truth_and_dcm2niix(tmp_path, orientation, descending):
    rng = np.random.default_rng(8)
    vol_true = rng.integers(0, 4000, size=(16, 16, 7)).astype(np.uint16)
    aff = make_affine(orientation, spacing=(3.0, 3.0, 3.6))
    if descending:  # slices stored against the IOP cross product (CSA SliceNormalVector says so)
        aff = aff @ np.diag([1.0, 1.0, -1.0, 1.0])
    write_mosaic(tmp_path / "m" / "mosaic.dcm", vol_true, aff)
    vol = read_series(only_series(tmp_path / "m"))
    assert vol.meta["mosaic"] is True and vol.data.shape == (16, 16, 7)
    np.testing.assert_array_equal(vol.data, vol_true)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    assert_matches_dcm2niix(vol, run_dcm2niix(tmp_path / "m", tmp_path / "ref")[0])


def test_mosaic_without_csa_is_refused(tmp_path):
    write_mosaic(tmp_path / "mosaic.dcm", np.ones((16, 16, 7), dtype=np.uint16), make_affine("axial"), with_csa=False)
    reason = rejected(tmp_path)
    assert reason.startswith("Siemens mosaic not supported")


def test_fast_header_path_agrees_with_pydicom(tmp_path, monkeypatch, request):
    """The struct-based header walk must give exactly what the pydicom parse gives."""
    from siteadapt.io.dicom import probe as mod  # _probe looks _fast_header up here

    data = ct_data(shape=(32, 32, 4))
    for ts in ["explicit_le", "implicit_le", "rle", "jpeg_lossless"]:
        write_series(tmp_path / ts, data, make_affine("oblique"), modality="CT", patient=PATIENT, transfer_syntax=ts,
                     rescale=(1.0, -1024.0), seed=ts)
    write_2d(tmp_path / "cr.dcm", np.zeros((8, 6)), patient=PATIENT)
    paths = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    n_synthetic = len(paths)
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
    if real.is_dir():
        paths += sorted(p for p in real.rglob("*") if p.is_file() and p.suffix != ".md")[::7]

    def facts(frames):
        out = []
        for f in frames:
            info = {k: v for k, v in vars(f.info).items()}
            out.append((info, f.index, None if f.ipp is None else tuple(f.ipp),
                        None if f.iop is None else tuple(f.iop), f.spacing, f.slope, f.intercept, f.tkey, f.echo,
                        f.phase, f.thickness, f.between))
        return out

    n_fast = 0
    for i, p in enumerate(paths):
        fast_frames, fast_reason = mod._probe(p)
        n_fast += i < n_synthetic and mod._fast_header(p.read_bytes()[: 1 << 20]) is not None
        with monkeypatch.context() as mp:
            mp.setattr(mod, "_fast_header", lambda buf: None)
            slow_frames, slow_reason = mod._probe(p)
        assert fast_reason == slow_reason, p
        if fast_frames is not None:
            assert facts(fast_frames) == facts(slow_frames), p
    # the fast walk must really be exercised on the synthetic files (with or without ../shared beside the checkout)
    assert n_fast >= 12, n_fast


def test_radiographs_sharing_a_series_uid_become_one_series_each(tmp_path):
    img = np.arange(12 * 10).reshape(12, 10)
    a = write_2d(tmp_path / "pa.dcm", img, modality="DX", patient=PATIENT)
    b = write_2d(tmp_path / "lat.dcm", img[::-1], modality="DX", patient=PATIENT)
    ds = pydicom.dcmread(b)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(b)
    series, skipped = scan_tree(tmp_path)
    assert not skipped and len(series) == 2
    assert {s.files[0].name for s in series} == {a.name, b.name}
    assert all(read_series(s).data.shape == (10, 12) for s in series)


def test_scan_tree_missing_folder(tmp_path):
    from siteadapt.errors import InputError

    with pytest.raises(InputError):
        scan_tree(tmp_path / "nope")


def test_files_without_preamble(tmp_path):
    """Old archives hold bare datasets (no 128-byte preamble, no file meta): read as implicit VR little endian."""
    data = ct_data(shape=(16, 12, 5))
    files = write_series(tmp_path / "a", data, make_affine("coronal"), modality="CT", patient=PATIENT,
                         transfer_syntax="implicit_le")
    (tmp_path / "bare").mkdir()
    for f in files:
        bare = Dataset()
        bare.update(pydicom.dcmread(f))
        bare.save_as(tmp_path / "bare" / f.name, implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare" / files[0].name).read_bytes()[128:132] != b"DICM"
    (tmp_path / "bare" / "junk.bin").write_bytes(b"\x08\x00\x00\x00" + b"garbage" * 20)
    series, skipped = scan_tree(tmp_path / "bare")
    assert [(p.name, r) for p, r in skipped] == [("junk.bin", "not a DICOM file")]
    np.testing.assert_array_equal(read_series(series[0]).data, data)


def test_scan_dicom_files_takes_a_file_list(tmp_path):
    files = write_series(tmp_path / "s", ct_data(), make_affine("axial"), modality="CT", patient=PATIENT)
    (tmp_path / "notes.txt").write_text("x")
    series, skipped = scan_dicom_files([*files[::-1], tmp_path / "notes.txt"])
    assert len(series) == 1 and series[0].files == sorted(files)
    assert skipped == [(tmp_path / "notes.txt", "not a DICOM file")]
