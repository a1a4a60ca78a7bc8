"""Write synthetic DICOM series (for tests, benchmarks and the synthetic data generator).

``write_series`` takes a volume in NIfTI order (``data[i, j, k(, t)]``, ``affine`` voxel -> RAS+ mm) and writes one
classic single-frame file per slice (and per time point for 4D data) with the geometry a scanner would write:

- LPS affine ``A = diag(-1, -1, 1, 1) @ affine``;
- ``A[:3, 0] / PixelSpacing[1]`` is the row direction cosine (first three values of ImageOrientationPatient),
  ``A[:3, 1] / PixelSpacing[0]`` the column direction cosine, ``ImagePositionPatient_k = A[:3, 3] + k * A[:3, 2]``;
- the pixel array of slice ``k`` is ``data[:, :, k].T`` (DICOM rows run along ``j``, columns along ``i``);
- stored value = ``round((value - intercept) / slope)`` as int16 (any negative) or uint16.

Knobs that produce *bad* series on purpose (so that the reader's refusals can be tested): ``gantry_tilt_deg``,
``drop_slices`` and ``slice_positions``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000_lossless": JPEG2000Lossless,
    "jpegls_lossless": JPEGLSLossless,
    "jpeg_lossless": JPEGLosslessSV1,
}

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # PET Image Storage
    "NM": "1.2.840.10008.5.1.4.1.1.20",  # NM Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def _ds(v: float) -> DSfloat:
    """A DS value of at most 16 characters with as much precision as fits."""
    v = float(v)
    if abs(v) < 1e-12:
        v = 0.0
    return DSfloat(v, auto_format=True)


def _uid(seed, *parts) -> str:
    return generate_uid(entropy_srcs=["siteadapt-synthetic", str(seed), *[str(p) for p in parts]])


def _hex_name(seed, idx: int) -> str:
    return hashlib.sha256(f"{seed}/{idx}/siteadapt".encode()).hexdigest()[:16].upper()


def _stored(values: np.ndarray, rescale: tuple[float, float], pixel_dtype=None) -> np.ndarray:
    slope, intercept = float(rescale[0]), float(rescale[1])
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    s = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    if pixel_dtype is None:
        pixel_dtype = np.int16 if (s.size and s.min() < 0) else np.uint16
    pixel_dtype = np.dtype(pixel_dtype)
    if pixel_dtype not in (np.dtype(np.int16), np.dtype(np.uint16)):
        raise ValueError(f"pixel_dtype must be int16 or uint16, not {pixel_dtype}")
    info = np.iinfo(pixel_dtype)
    if s.size and (s.min() < info.min or s.max() > info.max):
        raise ValueError(f"values do not fit {pixel_dtype} after rescale {rescale}: stored range "
                         f"[{s.min():.0f}, {s.max():.0f}]")
    return s.astype(pixel_dtype)


def _set_patient(ds: Dataset, patient: dict) -> None:
    for key, value in (patient or {}).items():
        if not pydicom.datadict.tag_for_keyword(key):
            raise ValueError(f"patient key {key!r} is not a DICOM keyword")
        setattr(ds, key, value)


def _file_meta(sop_class: str, sop_uid: str, ts: UID) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ts
    fm.ImplementationClassUID = generate_uid(entropy_srcs=["siteadapt-writer"])
    fm.ImplementationVersionName = "SITEADAPT_01"
    return fm


def _set_pixels(ds: Dataset, arr: np.ndarray, transfer_syntax: str, bits_stored: int = 16) -> None:
    """Set the image pixel module for a 2D uint16/int16 ``arr`` (rows, cols) and encode it."""
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; one of {sorted(TRANSFER_SYNTAXES)}")
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    arr = np.ascontiguousarray(arr)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = ds.get("PhotometricInterpretation", "MONOCHROME2")
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = arr.astype("<" + arr.dtype.str[1:], copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        return
    if ts == JPEGLosslessSV1:
        # pydicom 3 has no encoder for JPEG Lossless process 14; a minimal one is implemented below.
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([encode_jpeg_lossless_sv1(arr, bits_stored)])
        ds["PixelData"].VR = "OB"
        return
    if ts == JPEG2000Lossless and min(arr.shape) < 32:
        raise ValueError(f"cannot encode {arr.shape[0]}x{arr.shape[1]} as 'jpeg2000_lossless': the installed "
                         "openjpeg encoder always uses 6 wavelet resolutions, which needs rows and columns >= 32")
    try:
        ds.compress(ts, arr, generate_instance_uid=False)
    except (RuntimeError, NotImplementedError) as exc:
        hint = {"jpegls_lossless": "install 'pyjpegls'", "jpeg2000_lossless": "install 'pylibjpeg-openjpeg'",
                "rle": "pydicom's native RLE encoder failed"}.get(transfer_syntax, "")
        raise RuntimeError(f"cannot encode transfer syntax {transfer_syntax!r} ({ts.name}): {exc}. {hint}") from exc


def encode_jpeg_lossless_sv1(arr: np.ndarray, precision: int = 16) -> bytes:
    """Encode a 2D uint16/int16 image as a JPEG Lossless (ITU T.81 process 14), selection value 1 codestream.

    Prediction: the left neighbour (first row: 2**(P-1) for the first pixel, then the left neighbour; first column:
    the pixel above). Differences are taken modulo 2**16 and coded with one Huffman table in which each of the 17
    difference categories has a 5-bit code, followed by the category's extra bits. Signed data is coded as its
    unsigned bit pattern (the decoder gives it back by PixelRepresentation).
    """
    a = np.ascontiguousarray(arr)
    if a.ndim != 2:
        raise ValueError("JPEG lossless encoder takes one 2D frame")
    if a.dtype.itemsize != 2:
        raise ValueError("JPEG lossless encoder takes 16-bit data")
    rows, cols = a.shape
    p = int(precision)
    if not 2 <= p <= 16:
        raise ValueError("precision must be 2..16")
    mask = (1 << p) - 1
    x = a.view(np.uint16).astype(np.int64) & mask
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[0, 0] = 1 << (p - 1)
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()  # in [-32768, 32767]; -32768 is coded as 32768
    mag = np.abs(diff)
    ssss = np.zeros(mag.shape, dtype=np.int64)
    nz = mag > 0
    ssss[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    ssss[diff == -32768] = 16
    extra = np.where(diff >= 0, diff, diff - 1) & ((1 << ssss) - 1)
    extra[ssss == 16] = 0
    nbits_extra = np.where(ssss == 16, 0, ssss)
    value = (ssss << nbits_extra) | extra  # the 5-bit code of category s is s itself
    length = 5 + nbits_extra
    ends = np.cumsum(length)
    total = int(ends[-1])
    starts = ends - length
    idx = np.arange(total, dtype=np.int64)
    owner = np.repeat(np.arange(length.size), length)
    shift = (length[owner] - 1 - (idx - starts[owner]))
    bits = ((value[owner] >> shift) & 1).astype(np.uint8)
    pad = (-total) % 8
    if pad:
        bits = np.concatenate([bits, np.ones(pad, dtype=np.uint8)])
    scan = np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00")

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    sof = struct.pack(">BHHB", p, rows, cols, 1) + bytes([1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # 1 component, table 0, predictor 1, Se 0, point transform 0
    return (b"\xff\xd8" + segment(0xFFC3, sof) + segment(0xFFC4, dht) + segment(0xFFDA, sos) + scan
            + b"\xff\xd9")


def _save(ds: Dataset, path: Path) -> None:
    ds.preamble = b"\x00" * 128
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


# --------------------------------------------------------------------------------------------------------------------
# public API


def write_series(out_dir, data, affine, *, modality: str, patient: dict, series_number: int = 1,
                 rescale: tuple[float, float] = (1.0, 0.0), transfer_syntax: str = "explicit_le",
                 file_names: str = "instance", study_uid: str | None = None, series_uid: str | None = None,
                 seed=0, gantry_tilt_deg: float = 0.0, drop_slices: Iterable[int] = (),
                 slice_positions: Sequence | np.ndarray | None = None, series_description: str = "",
                 pixel_dtype=None, repetition_time_s: float = 2.0) -> list[Path]:
    """Write ``data`` (X, Y, Z) or (X, Y, Z, T) with RAS ``affine`` as one single-frame DICOM file per slice.

    - ``rescale`` = (RescaleSlope, RescaleIntercept); stored values are ``round((data - intercept) / slope)``,
      int16 when any is negative, else uint16 (or ``pixel_dtype``).
    - ``file_names``: ``"instance"`` -> ``IM0001, IM0002, ...`` in slice order; ``"random"`` -> opaque hex names
      written in a shuffled order (InstanceNumber is shuffled too, so a reader cannot rely on either).
    - ``gantry_tilt_deg``: shifts each slice's position along the column direction by ``k * dz * tan(tilt)`` (the
      step between positions is then not parallel to the slice normal) and sets GantryDetectorTilt.
    - ``drop_slices``: slice indices (k) not written (a missing-slice series).
    - ``slice_positions``: either Z distances in mm along the slice normal from the origin (replacing ``k * dz``),
      or a (Z, 3) array of explicit LPS ImagePositionPatient values.
    - 4D data writes Z*T files; time point t gets TemporalPositionIdentifier t+1 and AcquisitionTime
      ``t * repetition_time_s``.

    Returns the written paths (in writing order).
    """
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"data must be 3D or 4D (X, Y, Z[, T]), got shape {data.shape}")
    if data.ndim == 3:
        data = data[..., None]
        n_t = 0
    else:
        n_t = data.shape[3]
    nx, ny, nz, nt = data.shape
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError("affine must be 4x4")
    modality = str(modality).upper()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    lps = _LPS @ affine
    col_sp = float(np.linalg.norm(lps[:3, 0]))  # PixelSpacing[1]: spacing between columns (along a row)
    row_sp = float(np.linalg.norm(lps[:3, 1]))  # PixelSpacing[0]: spacing between rows (down a column)
    dz = float(np.linalg.norm(lps[:3, 2]))
    if min(col_sp, row_sp, dz) <= 0:
        raise ValueError("affine has a zero-length axis")
    row_cos = lps[:3, 0] / col_sp
    col_cos = lps[:3, 1] / row_sp
    normal = lps[:3, 2] / dz
    origin = lps[:3, 3]

    if slice_positions is None:
        positions = np.array([origin + k * lps[:3, 2] for k in range(nz)])
    else:
        sp = np.asarray(slice_positions, dtype=np.float64)
        if sp.ndim == 1:
            if sp.shape[0] != nz:
                raise ValueError(f"slice_positions has {sp.shape[0]} values for {nz} slices")
            positions = origin[None, :] + sp[:, None] * normal[None, :]
        elif sp.shape == (nz, 3):
            positions = sp.copy()
        else:
            raise ValueError("slice_positions must have shape (Z,) or (Z, 3)")
    if gantry_tilt_deg:
        shift = math.tan(math.radians(float(gantry_tilt_deg))) * dz
        positions = positions + np.arange(nz)[:, None] * shift * col_cos[None, :]

    stored = _stored(data, rescale, pixel_dtype)
    dropped = {int(k) for k in drop_slices}

    study_uid = study_uid or _uid(seed, "study", (patient or {}).get("PatientID", ""))
    series_uid = series_uid or _uid(seed, "series", study_uid, series_number)
    frame_uid = _uid(seed, "frame", study_uid, series_number)
    sop_class = _SOP_CLASS.get(modality, _SECONDARY_CAPTURE)

    jobs = [(k, t) for t in range(nt) for k in range(nz) if k not in dropped]
    if file_names == "instance":
        order = list(range(len(jobs)))
        numbers = [i + 1 for i in range(len(jobs))]
    elif file_names == "random":
        rng = np.random.default_rng([int(hashlib.sha256(str(seed).encode()).hexdigest()[:8], 16), 7])
        order = [int(i) for i in rng.permutation(len(jobs))]
        numbers = [int(i) + 1 for i in rng.permutation(len(jobs))]
    else:
        raise ValueError(f"file_names must be 'instance' or 'random', not {file_names!r}")

    written: list[Path] = []
    for pos_in_order, idx in enumerate(order):
        k, t = jobs[idx]
        sop_uid = _uid(seed, "sop", series_uid, k, t)
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = modality
        ds.Manufacturer = "siteadapt-synthetic"
        ds.SeriesNumber = int(series_number)
        ds.InstanceNumber = int(numbers[pos_in_order] if file_names == "random" else idx + 1)
        ds.AcquisitionNumber = 1
        ds.StudyID = "1"
        if series_description:
            ds.SeriesDescription = series_description
        _set_patient(ds, patient)
        if modality == "MR":
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "NONE"
            ds.MagneticFieldStrength = _ds(3.0)
            ds.RepetitionTime = _ds(repetition_time_s * 1000.0)
            ds.EchoTime = _ds(30.0)
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.SliceLocation = _ds(float(np.dot(positions[k], normal)))
        ds.PixelSpacing = [_ds(row_sp), _ds(col_sp)]
        ds.SliceThickness = _ds(dz)
        ds.SpacingBetweenSlices = _ds(dz)
        if gantry_tilt_deg:
            ds.GantryDetectorTilt = _ds(gantry_tilt_deg)
        ds.RescaleSlope = _ds(rescale[0])
        ds.RescaleIntercept = _ds(rescale[1])
        ds.RescaleType = "HU" if modality == "CT" else "US"
        if n_t:
            ds.TemporalPositionIdentifier = t + 1
            ds.NumberOfTemporalPositions = nt
            secs = t * float(repetition_time_s)
            hh, rem = divmod(secs, 3600)
            mm, ss = divmod(rem, 60)
            ds.AcquisitionTime = f"{int(hh) + 10:02d}{int(mm):02d}{ss:09.6f}"
        ds.PhotometricInterpretation = "MONOCHROME2"
        _set_pixels(ds, stored[:, :, k, t].T, transfer_syntax)
        name = f"IM{idx + 1:04d}" if file_names == "instance" else _hex_name(seed, idx)
        path = out_dir / name
        _save(ds, path)
        written.append(path)
    return written


def write_2d(path, image, *, modality: str = "CR", pixel_spacing: tuple[float, float] = (0.2, 0.2), patient: dict,
             transfer_syntax: str = "explicit_le", photometric: str = "MONOCHROME2", bits_stored: int = 12,
             seed=0, series_number: int = 1) -> Path:
    """Write one projection radiograph. ``image`` is in DICOM order (rows, cols), stored as uint16 with
    ``bits_stored`` bits. PixelSpacing and ImagerPixelSpacing are both ``pixel_spacing`` (row, column spacing);
    there is no ImagePositionPatient / ImageOrientationPatient."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2D (rows, cols), got shape {image.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    s = np.rint(image.astype(np.float64))
    if s.size and (s.min() < 0 or s.max() >= 2 ** int(bits_stored)):
        raise ValueError(f"image values must lie in [0, {2 ** int(bits_stored) - 1}] for bits_stored={bits_stored}")
    arr = s.astype(np.uint16)
    modality = str(modality).upper()
    sop_class = _SOP_CLASS.get(modality, _SECONDARY_CAPTURE)
    study_uid = _uid(seed, "study", (patient or {}).get("PatientID", ""))
    series_uid = _uid(seed, "series", study_uid, series_number)
    sop_uid = _uid(seed, "sop", series_uid, 0)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.Manufacturer = "siteadapt-synthetic"
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = 1
    ds.StudyID = "1"
    _set_patient(ds, patient)
    if modality in ("DX", "MG"):
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.ImagerPixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope = _ds(1.0)
    ds.RescaleIntercept = _ds(0.0)
    _set_pixels(ds, arr, transfer_syntax, bits_stored=bits_stored)
    path = Path(path)
    _save(ds, path)
    return path
