"""Synthetic DICOM writers and dcm2niix comparisons shared by the DICOM tests (reader, pixel fidelity, SEG export).

``make_affine`` gives a NIfTI (RAS) affine for a typical acquisition orientation; ``base_mr`` / ``write_enhanced`` /
``write_mosaic`` build enhanced multi-frame and Siemens mosaic files by hand; ``run_dcm2niix`` converts with the
reference converter (skips the test when it is not installed); ``REAL`` names the real scanner series of the
``realdata`` tests under ../shared/data/dicom.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from siteadapt.io.dicom import scan_tree


def dcm2niix_bin() -> str | None:
    cand = Path(sys.executable).parent / "dcm2niix"
    if cand.exists():
        return str(cand)
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except Exception:
        return shutil.which("dcm2niix")


def run_dcm2niix(src: Path, out: Path) -> list[Path]:
    exe = dcm2niix_bin()
    if exe is None:
        pytest.skip("dcm2niix not installed")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "y", "-b", "n", "-f", "%s", "-o", str(out), str(src)], check=True,
                   capture_output=True, timeout=120)
    return sorted(out.glob("*.nii.gz"))


def canonical(data, affine):
    data = np.asarray(data)
    if data.ndim == 2:  # nibabel needs a third axis to reorient
        data = data[..., None]
    return nib.as_closest_canonical(nib.Nifti1Image(data, affine))


def assert_matches_dcm2niix(vol, ref_path: Path):
    ref = nib.as_closest_canonical(nib.load(str(ref_path)))
    ours = canonical(vol.data, vol.affine)
    ref_data = ref.get_fdata()
    ours_data = np.asarray(ours.dataobj, dtype=np.float64)
    assert ours_data.shape == ref_data.shape
    np.testing.assert_array_equal(ours_data, ref_data)
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3, rtol=0)


def only_series(root):
    series, skipped = scan_tree(root)
    assert len(series) == 1, (series, skipped)
    return series[0]


def rotation(axis: int, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# DICOM (LPS) row / column direction cosines of typical acquisitions
ORIENTATIONS = {
    "axial": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),
    "sagittal": (np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),
    "coronal": (np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),
    "oblique": tuple(rotation(1, 15) @ rotation(0, 15) @ v for v in (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))),
}


def make_affine(orientation: str, spacing=(0.8, 0.9, 2.5), origin_lps=(-12.5, 30.0, -40.0)) -> np.ndarray:
    row, col = ORIENTATIONS[orientation]
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[0]
    lps[:3, 1] = col * spacing[1]
    lps[:3, 2] = normal * spacing[2]
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def ct_data(shape=(32, 24, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 2500, size=shape).astype(np.int16)


REAL = ["ge_3d_t1_oblique", "siemens_prisma_epi_4d", "siemens_xa10_enhanced_multiframe", "siemens_mosaic_uncompressed",
        "siemens_mosaic_jpeg_lossless"]


REAL_SHAPES = {"ge_3d_t1_oblique": (256, 256, 130), "siemens_prisma_epi_4d": (64, 64, 25, 12),
               "siemens_xa10_enhanced_multiframe": (64, 64, 6, 4), "siemens_mosaic_uncompressed": (64, 64, 35),
               "siemens_mosaic_jpeg_lossless": (64, 64, 35)}


def base_mr(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.PatientID = "PID-4711"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def lps_parts(aff):
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    cs, rs, dz = (float(np.linalg.norm(lps[:3, i])) for i in range(3))
    return lps, lps[:3, 0] / cs, lps[:3, 1] / rs, cs, rs, dz


def write_enhanced(path: Path, data: np.ndarray, aff: np.ndarray, order: np.ndarray):
    from pydicom.sequence import Sequence

    nx, ny, nz, nt = data.shape
    lps, row, col, cs, rs, dz = lps_parts(aff)
    ds = base_mr("1.2.840.10008.5.1.4.1.1.4.1")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz * nt
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [rs, cs]
    pm.SliceThickness = dz
    po = Dataset()
    po.ImageOrientationPatient = [*row, *col]
    pv = Dataset()
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 1, 0, "US"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per, frames = [], []
    for f in order:  # frames stored in a scrambled order
        t, k = divmod(int(f), nz)
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = list(lps[:3, 3] + k * lps[:3, 2])
        fc = Dataset()
        fc.TemporalPositionIndex = t + 1
        fc.InStackPositionNumber = k + 1
        fc.StackID = "1"
        fc.DimensionIndexValues = [1, k + 1, t + 1]
        fg.PlanePositionSequence = Sequence([pp])
        fg.FrameContentSequence = Sequence([fc])
        per.append(fg)
        frames.append(data[:, :, k, t].T)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.ascontiguousarray(np.stack(frames)).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def csa_header(tags: dict[str, list[str]]) -> bytes:
    import struct

    out = bytearray(b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77))
    for name, items in tags.items():
        out += name.encode().ljust(64, b"\x00") + struct.pack("<i", len(items)) + b"DS\x00\x00"
        out += struct.pack("<iii", 3, len(items), 77)
        for v in items:
            b = v.encode() + b"\x00"
            out += struct.pack("<iiii", len(b), len(b), 77, len(b)) + b.ljust((len(b) + 3) // 4 * 4, b"\x00")
    return bytes(out)


def write_mosaic(path: Path, vol: np.ndarray, aff: np.ndarray, with_csa=True):
    nx, ny, nz = vol.shape
    m = math.ceil(math.sqrt(nz))
    lps, row, col, cs, rs, dz = lps_parts(aff)
    normal = lps[:3, 2] / dz
    tiles = np.zeros((m * m, ny, nx), dtype=np.uint16)
    tiles[:nz] = vol.transpose(2, 1, 0)
    mosaic = tiles.reshape(m, m, ny, nx).transpose(0, 2, 1, 3).reshape(m * ny, m * nx)
    ipp = lps[:3, 3] - row * cs * (m * nx - nx) / 2 - col * rs * (m * ny - ny) / 2
    ds = base_mr("1.2.840.10008.5.1.4.1.1.4")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.Rows, ds.Columns = mosaic.shape
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.PixelSpacing = [rs, cs]
    ds.SliceThickness = dz
    ds.SpacingBetweenSlices = dz
    ds.AcquisitionMatrix = [nx, 0, 0, ny]
    ds.AcquisitionTime = "101010.000"
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0A, "US", nz)
    if with_csa:
        csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        csa.add_new(0x10, "OB", csa_header({"NumberOfImagesInMosaic": [str(nz)],
                                      "SliceNormalVector": [f"{v:.8f}" for v in normal]}))
    ds.PixelData = mosaic.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)

