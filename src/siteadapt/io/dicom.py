"""Read DICOM series into :class:`~siteadapt.io.volume.Volume` (geometry as dcm2niix / NIfTI define it).

Two steps:

- :func:`scan_tree` walks a folder, reads every file's header once (never pixels), drops what is not a usable image
  (with a reason per file) and groups the rest into :class:`DicomSeries` by SeriesInstanceUID, split where one UID
  mixes orientations, image sizes, echoes or magnitude/phase.
- :func:`read_series` sorts the frames of one series by the projection of ImagePositionPatient on the slice normal
  (never by file name or InstanceNumber), checks the geometry (missing slices, uneven spacing, tilt/shear, sizes),
  reads the pixels once per file (numpy ``frombuffer`` on the raw bytes for uncompressed little-endian data, pydicom's
  pixel plugins otherwise, a small thread pool over files), applies RescaleSlope/Intercept and builds the RAS affine.

Pixel values follow dcm2niix's defaults: unsigned data keep only their BitsStored low bits (bits above HighBit are
dropped), signed data are sign-extended from HighBit (pydicom 3 does both on its decoding path, so its output is used
as is); Philips data with a private scale slope (2005,100E) get the "precise" floating point values (``_scaling``);
``meta["scaling"]`` records which mapping was used. A 4D diffusion series carries its b-values and gradient directions
in ``Volume.diffusion`` (written as FSL .bval/.bvec by :func:`~siteadapt.io.volume.save_fsl_gradients`).

Supported layouts: classic single-frame 3D and 4D (positions repeated over time), enhanced multi-frame (per-frame
functional groups), Siemens mosaic (unpacked to 3D with the CSA header, as dcm2niix does), multi-frame with
GridFrameOffsetVector, and single 2D radiographs (CR/DX/MG, or any single frame without position/orientation).

Conventions (see ``volume.py``): ``data[i, j, k(, t)]`` with ``i`` along a DICOM row (column index), ``j`` the row
index, ``k`` the slice; ``affine`` = diag(-1, -1, 1) @ (the LPS affine built from the DICOM tags). Unlike dcm2niix no
axis is flipped, so arrays differ from dcm2niix's by flips only; after ``nibabel.as_closest_canonical`` both agree.
"""

from __future__ import annotations

import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import InputError, SeriesRejected
from .files import reading
from .volume import Volume

__all__ = ["DicomSeries", "scan_tree", "scan_dicom_files", "read_series"]

_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_TAG_BE = b"\x7f\xe0\x00\x10"
_ITEM_LE = b"\xfe\xff\x00\xe0"
_SEQ_DELIM_LE = b"\xfe\xff\xdd\xe0"
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT"}
# Modalities whose single images are projections (no patient position/orientation): read as 2D.
_PROJECTION_MODALITIES = {"CR", "DX", "MG", "RG", "IO", "PX", "XA", "RF", "DR"}
# SOP classes that never carry an image, with the name used in the skip reason.
_NON_IMAGE_PREFIXES = (
    ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "key object selection"),
    ("1.2.840.10008.5.1.4.1.1.88.", "SR"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data"),
    ("1.2.840.10008.5.1.4.1.1.4.2", "MR spectroscopy"),
    ("1.3.12.2.1107.5.9.1", "Siemens CSA non-image"),
)
_NON_IMAGE_MODALITIES = {"RTSTRUCT": "RTSTRUCT", "SR": "SR", "PR": "presentation state", "KO": "key object selection",
                         "RTPLAN": "RTPLAN", "DOC": "encapsulated document"}


# ====================================================================================================================
# data holders


@dataclass
class DicomSeries:
    """One image series found by :func:`scan_tree`; holds header facts only, never pixel data."""

    uid: str
    files: list[Path]
    modality: str
    match_keys: list[str] = field(default_factory=list)
    n_frames: int = 0
    # Header facts gathered by scan_tree (so read_series need not parse headers again). Not part of the API.
    _frames: list | None = field(default=None, repr=False, compare=False)
    # Files of this SeriesInstanceUID that scan_tree refused as truncated or unreadable (and that are not copies of a
    # readable file): (path, ImagePositionPatient or None). read_series refuses the series when one of them holds a
    # slice beyond its first or last readable slice, or a slice whose position is unknown: see _check_broken.
    broken: list = field(default_factory=list, repr=False, compare=False)


@dataclass
class _FileInfo:
    path: Path
    ts: str
    sop_uid: str
    series_uid: str
    modality: str
    manufacturer: str
    rows: int
    cols: int
    bits_alloc: int
    bits_stored: int
    pixel_rep: int
    spp: int
    photometric: str
    n_frames: int
    has_pixels: bool
    pixel_offset: int | None  # start of the PixelData value for native uncompressed data read directly
    pixel_length: int | None
    is_mosaic: bool = False
    mosaic_n: int | None = None
    mosaic_normal: tuple | None = None
    mosaic_spacing: float | None = None
    gantry_tilt: float = 0.0
    enhanced: bool = False
    keys: tuple = ()  # folder name is added later; (AccessionNumber, PatientID, StudyID)


@dataclass
class _Frame:
    info: _FileInfo
    index: int  # frame number inside the file (0-based)
    ipp: np.ndarray | None
    iop: np.ndarray | None
    spacing: tuple | None  # (row spacing, column spacing) = PixelSpacing
    slope: float
    intercept: float
    tkey: tuple  # temporal sort key within one position
    echo: Any
    phase: bool
    thickness: float | None
    between: float | None
    scaling: str = "none"  # which value mapping slope/intercept hold: "none", "rescale" or "philips_fp"
    bval: float | None = None  # diffusion b-value (s/mm2) when the header has one
    bdir: np.ndarray | None = None  # diffusion gradient direction, DICOM patient (LPS) frame


# ====================================================================================================================
# header reading


def _f(v, default=None):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _vec(v, n):
    try:
        a = np.array([float(x) for x in _multi(v)], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) and np.all(np.isfinite(a)) else None


def _tm_seconds(v) -> float:
    s = str(v or "").strip().replace(":", "")
    if not s:
        return math.inf
    try:
        hh = int(s[0:2]) if len(s) >= 2 else 0
        mm = int(s[2:4]) if len(s) >= 4 else 0
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return math.inf
    return hh * 3600 + mm * 60 + ss


def _dt_seconds(v) -> float:
    s = str(v or "").strip()
    if len(s) < 8:
        return math.inf
    try:
        days = np.datetime64(f"{s[0:4]}-{s[4:6]}-{s[6:8]}").astype("int64")
    except ValueError:
        return math.inf
    return float(days) * 86400.0 + (_tm_seconds(s[8:14] + s[14:].split("+")[0].split("-")[0]) if len(s) > 8 else 0)


def _parse_csa(raw: bytes | None) -> dict[str, list[str]]:
    """Parse a Siemens CSA header (the "SV10" layout) into name -> list of item strings."""
    out: dict[str, list[str]] = {}
    if not raw or len(raw) < 16 or raw[:4] != b"SV10":
        return out
    n_tags = struct.unpack_from("<I", raw, 8)[0]
    pos = 16
    try:
        for _ in range(min(n_tags, 1000)):
            name = raw[pos:pos + 64].split(b"\x00", 1)[0].decode("latin-1")
            n_items = struct.unpack_from("<i", raw, pos + 76)[0]
            pos += 84
            items = []
            for _ in range(max(0, min(n_items, 10000))):
                item_len = struct.unpack_from("<i", raw, pos + 4)[0]
                pos += 16
                value = raw[pos:pos + item_len].split(b"\x00", 1)[0].decode("latin-1").strip()
                pos += (item_len + 3) // 4 * 4
                items.append(value)
            out[name] = [v for v in items if v != ""]
    except struct.error:
        pass
    return out


def _looks_like_raw_dataset(head: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble (old or badly written files) starts with a group 2 or 8 tag."""
    return len(head) >= 8 and head[0:2] in (b"\x02\x00", b"\x08\x00")


def _non_image_label(ds) -> str | None:
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or "") or (str(meta.get("MediaStorageSOPClassUID", "") or "")
                                                   if meta is not None else "")
    for prefix, label in _NON_IMAGE_PREFIXES:
        if sop.startswith(prefix):
            return label
    modality = str(ds.get("Modality", "") or "").upper()
    return _NON_IMAGE_MODALITIES.get(modality)


def _pixel_element(fp, pix_head: bytes, pix_tell: int, ts: UID, size: int):
    """Parse the PixelData element header. Returns (offset, length, problem): offset/length of the value when the
    pixels are native little-endian (read directly later), None otherwise; problem describes a truncated file."""
    little = ts.is_little_endian
    explicit = not ts.is_implicit_VR
    if explicit and pix_head[4:6] in _LONG_VRS:
        length = struct.unpack_from("<I" if little else ">I", pix_head, 8)[0]
        value_at = pix_tell + 12
    elif explicit:
        length = struct.unpack_from("<H" if little else ">H", pix_head, 6)[0]
        value_at = pix_tell + 8
    else:
        length = struct.unpack_from("<I", pix_head, 4)[0]
        value_at = pix_tell + 8
    if length == 0xFFFFFFFF:
        bad = _check_encapsulated(fp, value_at, size)
        return None, None, bad
    if value_at + length > size:
        return None, None, f"pixel data ends early ({size - value_at} of {length} bytes present)"
    if little and not ts.is_compressed and ts != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return value_at, length, None
    return None, None, None


def _probe_safe(path: Path) -> tuple[list[_Frame] | None, str | None]:
    """:func:`_probe` that never raises: an unexpected error becomes a refusal naming the exception type (its text
    may quote the path). Library warnings raised meanwhile are attributed to ``path`` (see files.reader_notes)."""
    with reading(path):
        try:
            return _probe(path)
        except Exception as exc:
            return None, f"truncated or unreadable DICOM: unexpected {type(exc).__name__} while reading the header"


def _partial_header(path: Path) -> tuple[str, str, np.ndarray | None] | None:
    """(SeriesInstanceUID, SOPInstanceUID, ImagePositionPatient or None) of a file refused as truncated, as far as
    its header can still be read; None when not even the series UID can."""
    with reading(path):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient"])
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            sop = str(ds.get("SOPInstanceUID", "") or "").strip()
            ipp = _vec(ds.get("ImagePositionPatient", None) or [], 3)
        except Exception:
            return None
    return (uid, sop, ipp) if uid else None


def _probe(path: Path) -> tuple[list[_Frame] | None, str | None]:
    """Read one file's header. Returns (frames, None) for an image file, (None, reason) for a file not used."""
    if path.name.upper() == "DICOMDIR":
        return None, "DICOMDIR"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp:
            buf = fp.read(_FAST_READ)
            magic = len(buf) >= 132 and buf[128:132] == b"DICM"
            if not magic and not _looks_like_raw_dataset(buf):
                return None, "not a DICOM file"
            fast = _fast_header(buf) if magic else None
            if fast is None and magic and len(buf) == _FAST_READ and size > _FAST_READ:
                buf += fp.read(_FAST_READ_MAX - _FAST_READ)  # a big (private) header: try with more of the file
                fast = _fast_header(buf)
            if fast is not None:  # the common case: a plain image file, parsed without pydicom
                hdr, ts, pix_tell = fast
                offset, length, bad = _pixel_element(fp, buf[pix_tell:pix_tell + 12], pix_tell, ts, size)
                if bad:
                    return None, f"truncated or unreadable DICOM: {bad}"
                try:
                    return _frames_from_header(hdr, path, str(ts), True, offset, length), None
                except Exception:
                    pass  # let pydicom have a go (and word the error)
            fp.seek(0)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not magic)
            except Exception as exc:  # pydicom raises many kinds on broken headers
                return None, f"truncated or unreadable DICOM: {type(exc).__name__}: {str(exc)[:120]}"
            pix_tell = fp.tell()
            fp.seek(pix_tell)
            pix_head = fp.read(12)
            meta = getattr(ds, "file_meta", None)
            if (meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP) \
                    or "DirectoryRecordSequence" in ds:
                return None, "DICOMDIR"
            if not magic and "SOPClassUID" not in ds and "Modality" not in ds:
                return None, "not a DICOM file"
            ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None and "TransferSyntaxUID" in meta \
                else None
            if ts is None or not ts.is_transfer_syntax:
                ts = ImplicitVRLittleEndian if not magic else ExplicitVRLittleEndian
            has_pixels = pix_head[:4] in (_PIXEL_TAG_LE, _PIXEL_TAG_BE)
            # pydicom stops quietly where a header is cut off: look for the signs of an incomplete header.
            if "SOPClassUID" not in ds:
                return None, "truncated or unreadable DICOM: header has no SOPClassUID"
            if not has_pixels and "Rows" not in ds and "Image Storage" in UID(str(ds.SOPClassUID)).name:
                return None, "truncated or unreadable DICOM: header of an image ends before the pixel data"
            if _last_value_short(ds):
                return None, "truncated or unreadable DICOM: last header element is cut off"
            label = _non_image_label(ds)
            if label is not None and not has_pixels:
                return None, f"non-image DICOM ({label})"
            if not has_pixels and "Rows" not in ds:
                what = str(ds.get("Modality", "") or "") or getattr(ds.get("SOPClassUID", None), "name", "") \
                    or "no pixel data"
                return None, f"non-image DICOM ({what})"
            pixel_offset = pixel_length = None
            if has_pixels:
                pixel_offset, pixel_length, bad = _pixel_element(fp, pix_head, pix_tell, ts, size)
                if bad:
                    return None, f"truncated or unreadable DICOM: {bad}"
    except OSError as exc:
        return None, f"truncated or unreadable DICOM: {exc.strerror or exc}"
    try:
        return _frames_from_header(ds, path, str(ts), has_pixels, pixel_offset, pixel_length), None
    except Exception as exc:  # malformed values in an otherwise readable header
        return None, f"truncated or unreadable DICOM: bad header value ({type(exc).__name__}: {str(exc)[:100]})"


# --------------------------------------------------------------------------------------------------------------------
# fast header path: most files are plain little-endian images whose header sits in the first few KB. Walking the
# top-level elements with struct and decoding only the ~40 tags needed is several times faster than a full pydicom
# parse. Anything unusual (no pixel data found, enhanced or mosaic, DICOMDIR, odd encodings) goes to pydicom.

_FAST_READ = 1 << 16
_FAST_READ_MAX = 1 << 20
_FAST_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "Manufacturer", "Rows", "Columns",
    "NumberOfFrames", "ImageType", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "GantryDetectorTilt", "AccessionNumber", "PatientID", "StudyID",
    "ComplexImageComponent", "EchoNumbers", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagerPixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "InstanceNumber", "TemporalPositionIdentifier", "AcquisitionDateTime",
    "AcquisitionTime", "ContentTime", "ImagePositionPatient", "ImageOrientationPatient", "GridFrameOffsetVector",
    "DiffusionBValue", "DiffusionGradientOrientation",
)
# Private tags read by tag number (the value representation is fixed by the vendor; implicit-VR files do not carry
# it). Only used when the Manufacturer matches (see _scaling and _diffusion).
_PRIVATE_TAGS = {
    0x2005100E: ("PhilipsScaleSlope", b"FL"),  # Philips MR Imaging DD 001: MR scale slope
    0x0019100C: ("SiemensBValue", b"IS"),  # SIEMENS MR HEADER: B_value
    0x0019100E: ("SiemensGradientDirection", b"FD"),  # SIEMENS MR HEADER: DiffusionGradientDirection (LPS)
}
_FAST_TAGS = {int(pydicom.datadict.tag_for_keyword(k)): k for k in _FAST_KEYWORDS}
_FAST_TAGS.update({tag: kw for tag, (kw, _) in _PRIVATE_TAGS.items()})
# presence of any of these sends the file to pydicom
_FAST_BAIL = {0x52009229, 0x52009230, 0x00041220}
_NUMERIC_VR = {b"US": "<H", b"SS": "<h", b"UL": "<I", b"SL": "<i", b"FL": "<f", b"FD": "<d"}


class _FastHeader:
    """The decoded subset of a header, with the ``get`` / ``in`` that _frames_from_header uses on a Dataset."""

    def __init__(self, raw: dict[str, tuple[bytes, bytes]]):
        self._raw = raw

    def __contains__(self, keyword) -> bool:
        return keyword in self._raw

    def get(self, keyword, default=None):
        if keyword not in self._raw:
            return default
        vr, value = self._raw[keyword]
        fmt = _NUMERIC_VR.get(vr)
        if fmt is not None:
            n = len(value) // struct.calcsize(fmt)
            vals = struct.unpack("<" + fmt[1] * n, value[: n * struct.calcsize(fmt)])
            return vals[0] if n == 1 else list(vals) if n else default
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        text = text.rstrip("\x00 ").strip()
        if "\\" in text:
            return [v.strip() for v in text.split("\\")]
        return text


def _elem_header(buf: bytes, pos: int, explicit: bool):
    """(tag, vr, length, value_pos) of the element at pos, or None past the buffer / on nonsense."""
    if pos + 8 > len(buf):
        return None
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:  # item / delimiters carry no VR
        return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    if explicit:
        vr = buf[pos + 4:pos + 6]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            return None
        if vr in _LONG_VRS:
            if pos + 12 > len(buf):
                return None
            return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
    return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8


def _skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int = 0) -> int | None:
    """Skip the items of an undefined-length sequence starting at pos; return the position after its delimiter."""
    if depth > 16:
        return None
    while True:
        h = _elem_header(buf, pos, explicit)
        if h is None:
            return None
        tag, _, length, vpos = h
        if tag == 0xFFFEE0DD:
            return vpos
        if tag != 0xFFFEE000:
            return None
        if length != 0xFFFFFFFF:
            pos = vpos + length
            continue
        pos = vpos
        while True:
            h = _elem_header(buf, pos, explicit)
            if h is None:
                return None
            tag, vr, length, vpos = h
            if tag == 0xFFFEE00D:
                pos = vpos
                break
            if length == 0xFFFFFFFF:
                pos = _skip_sequence(buf, vpos, explicit and vr != b"UN", depth + 1)
                if pos is None:
                    return None
            else:
                pos = vpos + length


def _fast_header(buf: bytes):
    """Parse a Part-10 file's header from ``buf``: returns (_FastHeader, transfer syntax, PixelData position) or
    None when the file should be read by pydicom instead."""
    pos = 132
    meta: dict[int, bytes] = {}
    while True:
        h = _elem_header(buf, pos, True)
        if h is None:
            return None
        tag, vr, length, vpos = h
        if tag >> 16 != 0x0002:
            break
        if length == 0xFFFFFFFF or vpos + length > len(buf):
            return None
        meta[tag] = buf[vpos:vpos + length]
        pos = vpos + length
    ts = UID(meta.get(0x00020010, b"").decode("ascii", "replace").rstrip("\x00 "))
    if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and not (ts.is_transfer_syntax and
                                                                          ts.is_compressed):
        return None
    if meta.get(0x00020002, b"").rstrip(b"\x00 ") == _DICOMDIR_SOP.encode():
        return None
    explicit = ts != ImplicitVRLittleEndian
    raw: dict[str, tuple[bytes, bytes]] = {}
    while True:
        h = _elem_header(buf, pos, explicit)
        if h is None:
            return None
        tag, vr, length, vpos = h
        if tag == 0x7FE00010:
            break
        if tag > 0x7FE00010 or tag in _FAST_BAIL:
            return None
        if length == 0xFFFFFFFF:
            pos = _skip_sequence(buf, vpos, explicit and vr != b"UN")
            if pos is None:
                return None
            continue
        if vpos + length > len(buf):
            return None
        kw = _FAST_TAGS.get(tag)
        if kw is not None:
            if vr is None or vr == b"UN":
                vr = _PRIVATE_TAGS[tag][1] if tag in _PRIVATE_TAGS else pydicom.datadict.dictionary_VR(tag).encode()
            raw[kw] = (vr, buf[vpos:vpos + length])
        pos = vpos + length
    if pos + 12 > len(buf) or "SOPClassUID" not in raw:
        return None
    hdr = _FastHeader(raw)
    if "MOSAIC" in str(hdr.get("ImageType", "")).upper():
        return None
    return hdr, ts, pos


def _last_value_short(ds) -> bool:
    """True when the last element pydicom read has fewer value bytes than its declared length."""
    try:
        last = ds._dict[max(ds._dict)] if ds._dict else None
    except Exception:
        return False
    value = getattr(last, "value", None)
    length = getattr(last, "length", None)
    if isinstance(value, (bytes, bytearray)) and isinstance(length, int) and length != 0xFFFFFFFF:
        return len(value) < length
    return False


def _check_encapsulated(fp, value_at: int, size: int) -> str | None:
    """Walk the items of encapsulated pixel data; return a problem description or None when complete."""
    pos = value_at
    n_items = 0
    while True:
        if pos + 8 > size:
            return "encapsulated pixel data ends early"
        fp.seek(pos)
        hdr = fp.read(8)
        tag, length = hdr[:4], struct.unpack_from("<I", hdr, 4)[0]
        if tag == _SEQ_DELIM_LE:
            return None if n_items >= 2 else "encapsulated pixel data has no frames"
        if tag != _ITEM_LE:
            return "encapsulated pixel data is malformed"
        pos += 8 + length
        n_items += 1
        if pos > size:
            return "encapsulated pixel data ends early"


def _frames_from_header(ds, path: Path, ts: str, has_pixels: bool, pixel_offset, pixel_length) -> list[_Frame]:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(_f(ds.get("NumberOfFrames", 1), 1) or 1)
    image_type = [str(v).upper() for v in _multi(ds.get("ImageType", None))]
    manufacturer = str(ds.get("Manufacturer", "") or "")
    info = _FileInfo(
        path=path, ts=ts, sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""), modality=str(ds.get("Modality", "") or "OT").upper(),
        manufacturer=manufacturer, rows=rows, cols=cols, bits_alloc=int(ds.get("BitsAllocated", 16) or 16),
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16),
        pixel_rep=int(ds.get("PixelRepresentation", 0) or 0), spp=int(ds.get("SamplesPerPixel", 1) or 1),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"), n_frames=n_frames,
        has_pixels=has_pixels, pixel_offset=pixel_offset, pixel_length=pixel_length,
        gantry_tilt=_f(ds.get("GantryDetectorTilt", 0.0), 0.0) or 0.0,
        keys=tuple(str(ds.get(k, "") or "").strip() for k in ("AccessionNumber", "PatientID", "StudyID")),
    )
    phase = "P" in image_type[2:4] or "PHASE" in image_type or str(ds.get("ComplexImageComponent", "")) == "PHASE"
    echo = _multi(ds.get("EchoNumbers", None))
    echo = _f(echo[0]) if echo else None
    slope = _f(ds.get("RescaleSlope", 1.0), 1.0) or 1.0
    intercept = _f(ds.get("RescaleIntercept", 0.0), 0.0) or 0.0
    slope, intercept, scaling = _scaling(manufacturer, slope, intercept, _private(ds, 0x2005100E))
    bval, bdir = _diffusion(ds, manufacturer)
    spacing = _vec(ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None) or [], 2)
    thickness = _f(ds.get("SliceThickness", None))
    between = _f(ds.get("SpacingBetweenSlices", None))
    instance = _f(ds.get("InstanceNumber", None), math.inf)
    tpi = _f(ds.get("TemporalPositionIdentifier", None), math.inf)
    acq = _dt_seconds(ds.get("AcquisitionDateTime")) if ds.get("AcquisitionDateTime") else \
        _tm_seconds(ds.get("AcquisitionTime", ds.get("ContentTime", "")))

    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        info.enhanced = True
        return _enhanced_frames(ds, info, phase, instance)

    ipp = _vec(ds.get("ImagePositionPatient", None) or [], 3)
    iop = _vec(ds.get("ImageOrientationPatient", None) or [], 6)
    if "MOSAIC" in image_type:
        info.is_mosaic = True
        n = ds.get((0x0019, 0x100A), None)
        csa = _parse_csa(ds.get((0x0029, 0x1010)).value if (0x0029, 0x1010) in ds else None)
        try:
            info.mosaic_n = int(n.value) if n is not None and not isinstance(n.value, bytes) else \
                int(struct.unpack("<H", n.value[:2])[0]) if n is not None else None
        except (TypeError, ValueError, struct.error):
            info.mosaic_n = None
        if info.mosaic_n is None and csa.get("NumberOfImagesInMosaic"):
            info.mosaic_n = int(float(csa["NumberOfImagesInMosaic"][0]))
        sn = csa.get("SliceNormalVector")
        if sn and len(sn) == 3:
            info.mosaic_normal = tuple(float(v) for v in sn)
        info.mosaic_spacing = between if between else thickness
    frames = []
    grid = _multi(ds.get("GridFrameOffsetVector", None)) or None
    if n_frames > 1 and grid is not None and ipp is not None and iop is not None and len(grid) == n_frames:
        normal = np.cross(iop[:3], iop[3:])
        for i, off in enumerate(grid):
            frames.append(_Frame(info, i, ipp + float(off) * normal, iop, _tuple(spacing), slope, intercept,
                                 (tpi, acq, instance), echo, phase, thickness, between, scaling, bval, bdir))
        return frames
    for i in range(n_frames):
        frames.append(_Frame(info, i, ipp if n_frames == 1 else None, iop if n_frames == 1 else None,
                             _tuple(spacing), slope, intercept, (tpi, acq, instance), echo, phase, thickness,
                             between, scaling, bval, bdir))
    return frames


def _multi(v) -> list:
    if v is None or v == "":
        return []
    if isinstance(v, (str, bytes, int, float)):
        return [v]
    return list(v)


def _tuple(a):
    return None if a is None else (float(a[0]), float(a[1]))


def _enhanced_frames(ds, info: _FileInfo, phase: bool, instance: float) -> list[_Frame]:
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    shared = shared[0] if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence", None) or []

    def pick(fg, seq, attr):
        for src in (fg, shared):
            if src is not None and seq in src and len(src[seq].value) and attr in src[seq].value[0]:
                return src[seq].value[0].get(attr)
        return None

    frames = []
    for i in range(info.n_frames):
        fg = per[i] if i < len(per) else None
        ipp = _vec(pick(fg, "PlanePositionSequence", "ImagePositionPatient") or [], 3)
        iop = _vec(pick(fg, "PlaneOrientationSequence", "ImageOrientationPatient") or [], 6)
        spacing = _vec(pick(fg, "PixelMeasuresSequence", "PixelSpacing") or [], 2)
        thickness = _f(pick(fg, "PixelMeasuresSequence", "SliceThickness"))
        between = _f(pick(fg, "PixelMeasuresSequence", "SpacingBetweenSlices")) or _f(ds.get("SpacingBetweenSlices"))
        slope = _f(pick(fg, "PixelValueTransformationSequence", "RescaleSlope"), None)
        intercept = _f(pick(fg, "PixelValueTransformationSequence", "RescaleIntercept"), None)
        if slope is None:
            slope = _f(ds.get("RescaleSlope", 1.0), 1.0) or 1.0
        if intercept is None:
            intercept = _f(ds.get("RescaleIntercept", 0.0), 0.0) or 0.0
        ss = None
        if "PHILIPS" in info.manufacturer.upper():
            ss = _private_in(fg, 0x2005100E)
            if ss is None:
                ss = _private_in(shared, 0x2005100E)
            if ss is None:
                ss = _private(ds, 0x2005100E)
        slope, intercept, scaling = _scaling(info.manufacturer, slope, intercept, ss)
        bval, bdir = _enhanced_diffusion(fg, shared)
        if bval is None:
            bval, bdir = _diffusion(ds, info.manufacturer)
        tpi = _f(pick(fg, "FrameContentSequence", "TemporalPositionIndex"), math.inf)
        acq = _dt_seconds(pick(fg, "FrameContentSequence", "FrameAcquisitionDateTime"))
        echo = _f(pick(fg, "MREchoSequence", "EffectiveEchoTime"))
        frame_type = pick(fg, "MRImageFrameTypeSequence", "FrameType") or pick(fg, "CTImageFrameTypeSequence",
                                                                               "FrameType")
        ft = [str(v).upper() for v in _multi(frame_type)]
        fphase = phase or "P" in ft[2:4] or "PHASE" in ft
        frames.append(_Frame(info, i, ipp, iop, _tuple(spacing), slope, intercept, (tpi, acq, instance, i), echo,
                             fphase, thickness, between, scaling, bval, bdir))
    return frames


# --------------------------------------------------------------------------------------------------------------------
# value scaling and diffusion tags


def _private(ds, tag: int):
    """Value of a private tag listed in _PRIVATE_TAGS, from a pydicom Dataset or a _FastHeader; numbers decoded from
    raw bytes where pydicom did not know the tag (implicit VR without the private creator's dictionary)."""
    if ds is None:
        return None
    kw, vr = _PRIVATE_TAGS[tag]
    if isinstance(ds, _FastHeader):
        return ds.get(kw)
    try:
        elem = ds.get(tag)
    except Exception:
        return None
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        fmt = _NUMERIC_VR.get(vr)
        if fmt is not None:
            n = len(value) // struct.calcsize(fmt)
            vals = struct.unpack("<" + fmt[1] * n, bytes(value[: n * struct.calcsize(fmt)]))
            return vals[0] if n == 1 else list(vals) if n else None
        return value.decode("latin-1").rstrip("\x00 ").strip()
    return value


def _private_in(fg, tag: int):
    """A private tag inside a functional group item: at its top level or in the item of a private sequence of the
    same group (Philips puts (2005,100E) in the per-frame private sequence (2005,140F))."""
    if fg is None:
        return None
    v = _private(fg, tag)
    if v is not None:
        return v
    group = tag >> 16
    for elem in fg:
        if elem.tag.group == group and elem.tag.is_private and elem.VR == "SQ" and elem.value:
            v = _private(elem.value[0], tag)
            if v is not None:
                return v
    return None


def _scaling(manufacturer: str, slope: float, intercept: float, scale_slope) -> tuple[float, float, str]:
    """The slope/intercept that map stored values to the values written, and which mapping that is.

    Follows dcm2niix's default (``-p y``, "Philips precise float"): for Philips data with a private scale slope SS
    (2005,100E), finite and non-zero, and a non-zero RescaleSlope RS, the value written is the precise (floating
    point) value ``P = (stored * RS + RI) / (RS * SS)``, i.e. slope ``1 / SS`` and intercept ``RI / (RS * SS)``
    ("philips_fp"). Otherwise RescaleSlope/Intercept as the standard says ("rescale"), or nothing when they are the
    identity ("none"). The scale slope of other vendors' files is ignored, as dcm2niix does; Philips real world value
    mapping (0040,9096) is not read.
    """
    ss = _f(scale_slope[0] if isinstance(scale_slope, (list, tuple)) and scale_slope else scale_slope)
    if ss is not None and math.isfinite(ss) and ss != 0 and slope != 0 and "PHILIPS" in manufacturer.upper():
        return 1.0 / ss, intercept / (slope * ss), "philips_fp"
    if slope != 1.0 or intercept != 0.0:
        return slope, intercept, "rescale"
    return slope, intercept, "none"


def _direction(v) -> np.ndarray | None:
    d = _vec(v if v is not None else [], 3)
    return d if d is not None and np.linalg.norm(d) > 0 else None


def _diffusion(ds, manufacturer: str) -> tuple[float | None, np.ndarray | None]:
    """(b-value, gradient direction in LPS) of a classic image: the standard DiffusionBValue (0018,9087) and
    DiffusionGradientOrientation (0018,9089), else Siemens' private B_value (0019,100C) and DiffusionGradientDirection
    (0019,100E) for Siemens files. (None, None) when the file has no b-value."""
    bval = _f(ds.get("DiffusionBValue", None))
    bdir = _direction(ds.get("DiffusionGradientOrientation", None))
    if bval is None and "SIEMENS" in manufacturer.upper():
        bval = _f(_private(ds, 0x0019100C))
        bdir = _direction(_private(ds, 0x0019100E))
    return (bval, bdir) if bval is not None and math.isfinite(bval) else (None, None)


def _enhanced_diffusion(fg, shared) -> tuple[float | None, np.ndarray | None]:
    """(b-value, LPS direction) from the MRDiffusionSequence of a frame's functional groups (or the shared ones)."""
    for src in (fg, shared):
        if src is None or "MRDiffusionSequence" not in src or not src.MRDiffusionSequence:
            continue
        item = src.MRDiffusionSequence[0]
        bval = _f(item.get("DiffusionBValue", None))
        if bval is None or not math.isfinite(bval):
            continue
        grad = item.get("DiffusionGradientDirectionSequence", None)
        bdir = _direction(grad[0].get("DiffusionGradientOrientation", None)) if grad else None
        return bval, bdir
    return None, None


def _volume_diffusion(frames_tk: list[tuple[_Frame, int, int]], n_t: int, path: Path) -> dict | None:
    """Per-volume b-values and RAS gradient directions of a 4D series (None when no frame has a b-value). Every slice
    of one volume must carry the same values: otherwise the volume order is not the diffusion order and the series
    is refused."""
    if n_t < 2 or all(fr.bval is None for fr, _, _ in frames_tk):
        return None
    bvals = np.full(n_t, np.nan)
    dirs = np.full((n_t, 3), np.nan)
    for fr, t, _ in frames_tk:
        b = 0.0 if fr.bval is None else fr.bval
        d = np.zeros(3) if fr.bdir is None or b == 0 else fr.bdir
        if np.isnan(bvals[t]):
            bvals[t], dirs[t] = b, d
        elif abs(bvals[t] - b) > 1e-3 * max(1.0, abs(b)) or np.max(np.abs(dirs[t] - d)) > 1e-4:
            raise SeriesRejected(path, f"diffusion series: the slices of volume {t + 1} have different b-values or "
                                       "gradient directions (volumes cannot be told apart)")
    return {"bvals": bvals, "dirs_ras": dirs * np.array([-1.0, -1.0, 1.0])}


# ====================================================================================================================
# grouping


def _cluster_orientations(frames: list[_Frame], tol: float = 1e-3) -> list[list[_Frame]]:
    reps: list[np.ndarray | None] = []
    groups: list[list[_Frame]] = []
    for fr in frames:
        for gi, rep in enumerate(reps):
            if (rep is None and fr.iop is None) or (rep is not None and fr.iop is not None
                                                     and np.max(np.abs(rep - fr.iop)) <= tol):
                groups[gi].append(fr)
                break
        else:
            reps.append(fr.iop)
            groups.append([fr])
    return groups


def _split_frames(uid: str, frames: list[_Frame]) -> list[tuple[str, list[_Frame]]]:
    """Split the frames of one SeriesInstanceUID into stackable groups; returns (uid with suffix, frames)."""
    out: list[tuple[list[str], list[_Frame]]] = []
    by_kind: dict[tuple, list[_Frame]] = {}
    for fr in frames:
        by_kind.setdefault((fr.echo if fr.echo is not None else -1.0, fr.phase), []).append(fr)
    kinds = sorted(by_kind)
    echoes = sorted({k[0] for k in kinds})
    for kind in kinds:
        parts = []
        if len(echoes) > 1:
            parts.append(f"+e{echoes.index(kind[0]) + 1}")
        if kind[1] and any(not k[1] for k in kinds):
            parts.append("+ph")
        orient = _cluster_orientations(by_kind[kind])
        for oi, og in enumerate(orient):
            oparts = parts + ([f"+o{oi + 1}"] if len(orient) > 1 else [])
            # Single projection images (no position/orientation, or CR/DX/MG/...): one series per file.
            projection = og[0].iop is None or all(f.info.modality in _PROJECTION_MODALITIES for f in og)
            if projection and all(f.info.n_frames == 1 for f in og) and len({id(f.info) for f in og}) > 1:
                files = sorted({f.info.path for f in og})
                for fi, p in enumerate(files):
                    out.append((oparts + [f"+i{fi + 1}"], [f for f in og if f.info.path == p]))
                continue
            sizes: dict[tuple, list[_Frame]] = {}
            for f in og:
                sizes.setdefault((f.info.rows, f.info.cols), []).append(f)
            # A UID holding whole stacks of different sizes is split; a stray odd-sized image stays in (and is
            # refused by read_series as "inconsistent rows/cols").
            if len(sizes) > 1 and all(len(v) >= 2 for v in sizes.values()):
                for (r, c), sg in sorted(sizes.items()):
                    out.append((oparts + [f"+s{r}x{c}"], sg))
            else:
                out.append((oparts, og))
    return [(uid + "".join(p), fr) for p, fr in out]


def _make_series(uid: str, frames: list[_Frame]) -> DicomSeries:
    files = sorted({f.info.path for f in frames})
    first = frames[0].info
    folder = files[0].parent.name if files else ""
    keys = [k for k in (folder, *first.keys) if k]
    return DicomSeries(uid=uid, files=files, modality=first.modality, match_keys=keys, n_frames=len(frames),
                       _frames=frames)


def _workers(n: int) -> int:
    return max(1, min(8, n, 2 * (os.cpu_count() or 1)))


def scan_tree(root) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Find the image series under ``root`` (a folder, or one file).

    Returns ``(series, skipped)`` where ``skipped`` lists ``(file, reason)`` for every file not used: "not a DICOM
    file", "truncated or unreadable DICOM: ...", "non-image DICOM (RTSTRUCT)" (or SR, presentation state, ...),
    "DICOMDIR", "duplicate SOP instance (...)". Series are sorted by uid, files within a series by path.
    """
    root = Path(root)
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        raise InputError(root, "DICOM folder does not exist")
    return scan_dicom_files(paths)


def scan_dicom_files(paths) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """:func:`scan_tree` over an explicit list of files (e.g. what is left of a tree after other formats)."""
    paths = sorted(Path(p) for p in paths)
    skipped: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(_workers(len(paths))) as pool:
        results = list(pool.map(_probe_safe, paths))
    by_uid: dict[str, list[_Frame]] = {}
    seen_sop: dict[str, Path] = {}
    for p, (frames, reason) in zip(paths, results):
        if frames is None:
            skipped.append((p, reason))
            continue
        info = frames[0].info
        if info.sop_uid and info.sop_uid in seen_sop:
            skipped.append((p, "duplicate SOP instance (same SOPInstanceUID as another file)"))
            continue
        if info.sop_uid:
            seen_sop[info.sop_uid] = p
        uid = info.series_uid or f"no-series-uid:{p.parent}"
        by_uid.setdefault(uid, []).extend(frames)
    # Truncated files of a series that was otherwise read: without them the series would come out silently short
    # (an edge slice leaves no gap for the spacing check to see). Copies of a readable file (same SOPInstanceUID)
    # are only duplicates and change nothing.
    broken: dict[str, list] = {}
    for p, reason in skipped:
        if not str(reason).startswith("truncated or unreadable DICOM"):
            continue
        head = _partial_header(p)
        if head is not None and head[0] in by_uid and head[1] not in seen_sop:
            broken.setdefault(head[0], []).append((p, head[2]))
    series = []
    for uid in sorted(by_uid):
        for suid, frames in _split_frames(uid, by_uid[uid]):
            s = _make_series(suid, frames)
            s.broken = list(broken.get(uid, []))
            series.append(s)
    return series, skipped


def series_identities(datasets) -> list[tuple[str, list]]:
    """The series identities :func:`scan_dicom_files` gives a set of image *headers* (pydicom datasets, e.g. a PACS's
    WADO-RS metadata, with no file behind them): ``[(identity, datasets of that series)]``, where identity is the
    SeriesInstanceUID plus the suffix of a split series (``+e2``, ``+o1``, ``+s256x256``, ...), as ingest names it.

    The grouping is scan_dicom_files' own (same frame facts, :func:`_split_frames`), so the keyed anonymous ids of
    ingest can be computed again from headers alone (``siteadapt.steps.export``). Non-image objects (SEG, SR, ...)
    and duplicate SOP instances are left out, as the scan leaves them out."""
    by_uid: dict[str, list[_Frame]] = {}
    by_path: dict[Path, object] = {}
    seen_sop: set[str] = set()
    for n, ds in enumerate(datasets):
        sop = str(ds.get("SOPInstanceUID", "") or "")
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if _non_image_label(ds) is not None or "Rows" not in ds or not uid or (sop and sop in seen_sop):
            continue
        seen_sop.add(sop)
        path = Path(f"header-{n}")  # the frames' stand-in file: maps a group back to its datasets
        by_path[path] = ds
        by_uid.setdefault(uid, []).extend(_frames_from_header(ds, path, "", True, None, None))
    out = []
    for uid in sorted(by_uid):
        for suid, frames in _split_frames(uid, by_uid[uid]):
            paths = sorted({f.info.path for f in frames}, key=lambda p: int(p.name.split("-")[1]))
            out.append((suid, [by_path[p] for p in paths]))
    return out


# ====================================================================================================================
# reading


def _frames_of(series: DicomSeries) -> list[_Frame]:
    if series._frames is not None:
        return series._frames
    frames: list[_Frame] = []
    with ThreadPoolExecutor(_workers(len(series.files))) as pool:
        results = list(pool.map(_probe, [Path(p) for p in series.files]))
    for p, (fr, reason) in zip(series.files, results):
        if fr is None:
            raise SeriesRejected(p, reason)
        frames.extend(fr)
    if not frames:
        raise SeriesRejected(series.files[0] if series.files else None, "missing pixel data")
    groups = _split_frames(frames[0].info.series_uid, frames)
    for suid, g in groups:
        if suid == series.uid:
            return g
    if len(groups) == 1:
        return groups[0][1]
    raise SeriesRejected(series.files[0], f"files hold {len(groups)} different series; scan the folder first")


def _native_dtype(info: _FileInfo) -> np.dtype:
    if info.bits_alloc not in (8, 16, 32):
        raise SeriesRejected(info.path, f"unsupported BitsAllocated={info.bits_alloc}")
    return np.dtype(("<i" if info.pixel_rep else "<u") + str(info.bits_alloc // 8))


def _read_pixels(info: _FileInfo) -> np.ndarray:
    """All frames of one file as (frames, rows, cols) stored values."""
    expected = info.rows * info.cols * info.n_frames
    if info.pixel_offset is not None:
        dt = _native_dtype(info)
        nbytes = expected * dt.itemsize
        if info.pixel_length < nbytes:
            raise SeriesRejected(info.path, f"truncated or unreadable DICOM: pixel data has {info.pixel_length} "
                                            f"bytes, Rows x Columns x frames needs {nbytes}")
        with open(info.path, "rb") as fp:
            fp.seek(info.pixel_offset)
            buf = fp.read(nbytes)
        if len(buf) < nbytes:
            raise SeriesRejected(info.path, "truncated or unreadable DICOM: pixel data ends early")
        arr = np.frombuffer(buf, dtype=dt).reshape(info.n_frames, info.rows, info.cols)
        if 0 < info.bits_stored < info.bits_alloc:
            if info.pixel_rep:
                shift = info.bits_alloc - info.bits_stored
                arr = (arr << shift) >> shift  # sign-extend the stored bits
            else:
                arr = arr & _stored_mask(info)  # drop the bits above HighBit
        return arr
    try:
        with open(info.path, "rb") as fp:
            ds = pydicom.dcmread(BytesIO(fp.read()))
        # pydicom 3 already drops the bits above HighBit (unsigned) or sign-extends from it (signed): used as is.
        arr = ds.pixel_array
    except Exception as exc:
        raise SeriesRejected(info.path, f"cannot decode pixel data ({pydicom.uid.UID(info.ts).name}): "
                                        f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    return np.asarray(arr).reshape(info.n_frames, info.rows, info.cols)


def _read_native_into(info: _FileInfo, slots: list, out: np.ndarray) -> bool:
    """Read uncompressed frames straight into their slots of ``out`` (no intermediate copy; unsigned data with
    BitsStored < BitsAllocated is masked in place). False when the file needs the general path (other dtype, sign
    extension, compressed)."""
    if info.pixel_offset is None or info.pixel_rep and info.bits_stored < info.bits_alloc:
        return False
    try:
        dt = _native_dtype(info)
    except SeriesRejected:
        return False
    if dt != out.dtype:
        return False
    frame_bytes = info.rows * info.cols * dt.itemsize
    if info.pixel_length < frame_bytes * info.n_frames:
        return False
    with open(info.path, "rb", buffering=0) as fp:
        for idx, t, k in slots:
            fp.seek(info.pixel_offset + idx * frame_bytes)
            if fp.readinto(memoryview(out[t, k]).cast("B")) != frame_bytes:
                raise SeriesRejected(info.path, "truncated or unreadable DICOM: pixel data ends early")
            if 0 < info.bits_stored < info.bits_alloc:
                np.bitwise_and(out[t, k], _stored_mask(info), out=out[t, k])
    return True


def _stored_mask(info: _FileInfo) -> int:
    """Mask of the stored bits of unsigned data: BitsStored low bits (HighBit = BitsStored - 1, the only value the
    standard allows for these images). Scanners (e.g. 12-bit data, Siemens XA) may leave other bits set above
    HighBit; the standard says they are not part of the value, and pydicom and dcm2niix drop them too."""
    return (1 << info.bits_stored) - 1


def _check_common(frames: list[_Frame], first_path: Path) -> None:
    infos = list({id(f.info): f.info for f in frames}.values())
    for info in infos:
        if not info.has_pixels:
            raise SeriesRejected(info.path, "missing pixel data")
    sizes = sorted({(i.rows, i.cols) for i in infos})
    if len(sizes) > 1:
        raise SeriesRejected(first_path, "inconsistent rows/cols: " + ", ".join(f"{r}x{c}" for r, c in sizes))
    if any(i.spp != 1 for i in infos):
        raise SeriesRejected(first_path, f"colour images not supported (SamplesPerPixel={infos[0].spp})")
    if any(i.rows <= 0 or i.cols <= 0 for i in infos):
        raise SeriesRejected(first_path, "missing pixel data (Rows/Columns are 0)")
    sp = {f.spacing for f in frames if f.spacing is not None}
    if len(sp) > 1 and max(abs(a[0] - b[0]) + abs(a[1] - b[1]) for a in sp for b in sp) > 1e-4:
        raise SeriesRejected(first_path, "inconsistent pixel spacing")


def _lps_to_ras(row_cos, col_cos, spacing, origin, slice_vec) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = origin
    return _RAS @ lps


def _apply_rescale(raw: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """``raw`` is (T, Z, rows, cols); slopes/intercepts are (T, Z). Integer output where possible."""
    if np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)):
        if np.all(intercepts == 0):
            return raw
        raw_lo, raw_hi = float(raw.min()), float(raw.max())
        lo, hi = raw_lo + float(intercepts.min()), raw_hi + float(intercepts.max())
        for dt in (np.int16, np.uint16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                break
        else:
            dt = np.float32
        if dt is not np.float32 and raw.dtype.itemsize == np.dtype(dt).itemsize and raw.flags.writeable \
                and np.iinfo(dt).min <= raw_lo and raw_hi <= np.iinfo(dt).max:
            out = raw.view(dt)  # same values in the same bytes: add in place, no copy
        else:
            out = raw.astype(dt)
        if np.all(intercepts == intercepts.flat[0]):
            out += dt(intercepts.flat[0])
        else:
            out += intercepts.astype(dt)[:, :, None, None]
        return out
    out = raw.astype(np.float32)
    out *= slopes.astype(np.float32)[:, :, None, None]
    out += intercepts.astype(np.float32)[:, :, None, None]
    return out


def _scaling_name(frames: list[_Frame]) -> str:
    """Which value mapping the series used (see _scaling): "philips_fp" if any frame used the Philips precise
    values, else "rescale" if any frame had a RescaleSlope/Intercept other than 1/0, else "none"."""
    kinds = {f.scaling for f in frames}
    return next((k for k in ("philips_fp", "rescale") if k in kinds), "none")


def _meta(frames: list[_Frame], **extra) -> dict:
    infos = list({id(f.info): f.info for f in frames}.values())
    tss = sorted({UID(i.ts).name for i in infos})
    manu = sorted({i.manufacturer for i in infos if i.manufacturer})
    meta = {"transfer_syntaxes": tss, "n_files": len(infos), "n_frames": len(frames),
            "manufacturer": manu[0] if len(manu) == 1 else ", ".join(manu), "rows": infos[0].rows,
            "cols": infos[0].cols, "bits_stored": infos[0].bits_stored, "photometric": infos[0].photometric,
            "is_4d": False, "enhanced": any(i.enhanced for i in infos), "mosaic": any(i.is_mosaic for i in infos),
            "scaling": _scaling_name(frames)}
    meta.update(extra)
    return meta


def _fill(frames_slots: list[tuple[_Frame, int, int]], shape_tz: tuple[int, int], rows: int, cols: int):
    """Read every file once (thread pool) and place its frames at (t, k). Returns (T, Z, rows, cols) raw array."""
    by_file: dict[int, tuple[_FileInfo, list]] = {}
    for fr, t, k in frames_slots:
        by_file.setdefault(id(fr.info), (fr.info, []))[1].append((fr.index, t, k))
    items = list(by_file.values())
    out: np.ndarray | None = None
    first = _read_pixels(items[0][0])
    dtype = first.dtype

    def place(arr, slots):
        for idx, t, k in slots:
            out[t, k] = arr[idx]

    out = np.empty((shape_tz[0], shape_tz[1], rows, cols), dtype=dtype)
    place(first, items[0][1])

    def job(item):
        info, slots = item
        with reading(info.path):
            if _read_native_into(info, slots, out):
                return None
            arr = _read_pixels(info)
        if arr.dtype != out.dtype:
            return arr, slots
        place(arr, slots)
        return None

    mixed = []
    with ThreadPoolExecutor(_workers(len(items) - 1)) as pool:
        for res in pool.map(job, items[1:]):
            if res is not None:
                mixed.append(res)
    if mixed:
        dt = np.result_type(out.dtype, *[a.dtype for a, _ in mixed])
        out = out.astype(dt)
        for arr, slots in mixed:
            place(arr, slots)
    return out


def read_series(series: DicomSeries) -> Volume:
    """Read one series into a Volume (2D, 3D or 4D). Raises SeriesRejected(path, reason) when the geometry would be
    wrong or the pixels cannot be read; see the module docstring for what is supported."""
    frames = _frames_of(series)
    if not frames:
        raise SeriesRejected(series.files[0] if series.files else None, "missing pixel data")
    first_path = frames[0].info.path
    _check_common(frames, first_path)
    infos = list({id(f.info): f.info for f in frames}.values())
    modality = frames[0].info.modality or "OT"
    rows, cols = infos[0].rows, infos[0].cols

    if any(i.is_mosaic for i in infos):
        return _read_mosaic(frames, infos, modality)

    with_geo = [f for f in frames if f.ipp is not None and f.iop is not None]
    if len(with_geo) < len(frames):
        if len(frames) == 1:
            return _read_2d(frames[0], modality)
        if infos[0].n_frames > 1 and len(infos) == 1:
            raise SeriesRejected(first_path, "multi-frame image without per-frame geometry")
        raise SeriesRejected(first_path, "no slice geometry (ImagePositionPatient/ImageOrientationPatient missing)")
    if len(frames) == 1 and modality in _PROJECTION_MODALITIES:
        return _read_2d(frames[0], modality)

    iop = frames[0].iop
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    nn = np.linalg.norm(normal)
    if nn < 1e-6:
        raise SeriesRejected(first_path, "invalid ImageOrientationPatient (row and column cosines are parallel)")
    normal = normal / nn
    spacing = frames[0].spacing or (1.0, 1.0)

    # positions along the normal, clustered (a 4D series repeats each position T times)
    d = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    order = np.argsort(d, kind="stable")
    clusters: list[list[int]] = []
    for idx in order:
        if clusters and abs(d[idx] - d[clusters[-1][0]]) <= 1e-2:
            clusters[-1].append(int(idx))
        else:
            clusters.append([int(idx)])
    counts = {len(c) for c in clusters}
    if len(counts) > 1:
        raise SeriesRejected(first_path, "inconsistent number of images per slice position "
                                         f"({min(counts)} to {max(counts)}): duplicate slices or an incomplete "
                                         "4D series")
    n_t = counts.pop()
    n_z = len(clusters)
    for c in clusters:
        c.sort(key=lambda i: frames[i].tkey)
    pos = np.array([frames[c[0]].ipp for c in clusters])  # first time point
    dz = np.array([d[c[0]] for c in clusters])
    tilt = max((f.info.gantry_tilt for f in frames), key=abs)
    _check_broken(series, first_path, normal, dz, steps_known=n_z >= 2)

    if n_z >= 2:
        steps = np.diff(dz)
        med = float(np.median(steps))
        if n_z >= 3 and steps.max() > 1.5 * med:
            raise SeriesRejected(first_path, f"missing slices: gap of {steps.max():.4g} mm where the slice spacing "
                                             f"is {med:.4g} mm")
        if np.max(np.abs(steps - med)) > max(0.01 * med, 5e-3):
            raise SeriesRejected(first_path, f"non-uniform slice spacing: steps from {steps.min():.4g} to "
                                             f"{steps.max():.4g} mm")
        rel = pos - pos[0]
        along = rel @ normal
        perp = np.linalg.norm(rel - along[:, None] * normal[None, :], axis=1)
        if np.any(perp > 0.01 + 2e-3 * np.abs(along)):
            angle = math.degrees(math.atan2(perp[-1], abs(along[-1]))) if along[-1] else 90.0
            msg = f"gantry tilt / sheared slice geometry: slice positions deviate {angle:.2f} degrees from the " \
                  "slice normal"
            if tilt:
                msg += f" (GantryDetectorTilt {tilt:g})"
            raise SeriesRejected(first_path, msg)
        slice_vec = (pos[-1] - pos[0]) / (n_z - 1)
    else:
        f0 = frames[0]
        slice_vec = normal * float(f0.between or f0.thickness or 1.0)

    slots = [(frames[i], t, k) for k, c in enumerate(clusters) for t, i in enumerate(c)]
    raw = _fill(slots, (n_t, n_z), rows, cols)
    slopes = np.empty((n_t, n_z))
    icpts = np.empty((n_t, n_z))
    for fr, t, k in slots:
        slopes[t, k] = fr.slope
        icpts[t, k] = fr.intercept
    vals = _apply_rescale(raw, slopes, icpts)
    data = vals.transpose(3, 2, 1, 0)  # (cols, rows, Z, T): F-contiguous, written by nibabel without a copy
    if n_t == 1:
        data = data[..., 0]
    affine = _lps_to_ras(row_cos, col_cos, spacing, pos[0], slice_vec)
    return Volume(data=data, affine=affine, modality=modality, meta=_meta(frames, is_4d=n_t > 1),
                  diffusion=_volume_diffusion(slots, n_t, first_path))


def _check_broken(series: DicomSeries, first_path: Path, normal: np.ndarray, dz: np.ndarray, *,
                  steps_known: bool) -> None:
    """Refuse a series that lost a slice to a truncated file where the geometry checks cannot see it.

    A truncated file between two readable slices leaves a gap, which the spacing check below refuses as "missing
    slices"; one beyond the first or last readable slice leaves none: the series would be written one slice short
    without a word. Such a file (its position read from what is left of its header), or one whose position cannot be
    read at all, refuses the series here ("edge slice unreadable" / "slice unreadable")."""
    if not series.broken:
        return
    tol = 1e-2 if not steps_known else max(1e-2, 0.25 * float(np.median(np.abs(np.diff(dz)))))
    lo, hi = float(dz.min()), float(dz.max())
    edge = unknown = 0
    for _, ipp in series.broken:
        if ipp is None:
            unknown += 1
            continue
        at = float(np.dot(ipp, normal))
        if at < lo - tol or at > hi + tol:
            edge += 1
    if edge:
        n = "1 slice file" if edge == 1 else f"{edge} slice files"
        raise SeriesRejected(first_path, f"edge slice unreadable: {n} beyond the first or last readable slice "
                                         f"{'is' if edge == 1 else 'are'} truncated or unreadable; refused rather "
                                         f"than written {edge} slice{'' if edge == 1 else 's'} short")
    if unknown:
        n = "1 file" if unknown == 1 else f"{unknown} files"
        raise SeriesRejected(first_path, f"slice unreadable: {n} of this series {'is' if unknown == 1 else 'are'} "
                                         "truncated or unreadable at an unknown slice position; refused rather "
                                         "than written incomplete")


def _read_2d(frame: _Frame, modality: str) -> Volume:
    info = frame.info
    raw = _read_pixels(info)[frame.index]
    vals = _apply_rescale(raw[None, None], np.array([[frame.slope]]), np.array([[frame.intercept]]))[0, 0]
    sp = frame.spacing or (1.0, 1.0)
    if frame.iop is not None:
        row_cos, col_cos = frame.iop[:3], frame.iop[3:]
        normal = np.cross(row_cos, col_cos)
    else:
        row_cos, col_cos, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
    if frame.ipp is not None:
        origin = frame.ipp
    else:  # no position: centre the image on the origin, as dcm2niix does
        origin = -row_cos * sp[1] * (info.cols - 1) / 2.0 - col_cos * sp[0] * (info.rows - 1) / 2.0
    th = frame.between or frame.thickness or 1.0
    affine = _lps_to_ras(row_cos, col_cos, sp, origin, normal * th)
    return Volume(data=vals.T, affine=affine, modality=modality,
                  meta=_meta([frame], is_2d=True, spacing_assumed=frame.spacing is None))


def _read_mosaic(frames: list[_Frame], infos: list[_FileInfo], modality: str) -> Volume:
    first = infos[0]
    path = first.path

    def refuse(why):
        raise SeriesRejected(path, f"Siemens mosaic not supported: {why}")

    if not all(i.is_mosaic for i in infos):
        refuse("series mixes mosaic and plain images")
    if any(i.n_frames != 1 for i in infos):
        refuse("multi-frame mosaic")
    n = first.mosaic_n
    if not n or any(i.mosaic_n != n for i in infos):
        refuse("NumberOfImagesInMosaic missing or inconsistent")
    if first.mosaic_normal is None:
        refuse("no SliceNormalVector in the CSA image header")
    f0 = frames[0]
    if f0.ipp is None or f0.iop is None or f0.spacing is None:
        refuse("missing ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    if any(f.ipp is None or np.max(np.abs(f.ipp - f0.ipp)) > 1e-3 for f in frames):
        refuse("volumes of the series have different positions")
    m = math.ceil(math.sqrt(n))
    if first.rows % m or first.cols % m:
        refuse(f"{first.rows}x{first.cols} image does not divide into {m}x{m} tiles")
    tr, tc = first.rows // m, first.cols // m
    row_cos, col_cos = f0.iop[:3], f0.iop[3:]
    cross = np.cross(row_cos, col_cos)
    cross /= np.linalg.norm(cross)
    csa_n = np.asarray(first.mosaic_normal, dtype=np.float64)
    if abs(abs(float(np.dot(csa_n, cross))) - 1.0) > 1e-3:
        refuse("CSA SliceNormalVector is not perpendicular to the image plane")
    normal = cross if float(np.dot(csa_n, cross)) > 0 else -cross
    dz = first.mosaic_spacing
    if not dz or dz <= 0:
        refuse("no slice spacing")
    sp = f0.spacing  # (row spacing, column spacing)
    # ImagePositionPatient refers to the top-left of the whole mosaic; move it to the top-left of the first tile.
    origin = f0.ipp + row_cos * sp[1] * (first.cols - tc) / 2.0 + col_cos * sp[0] * (first.rows - tr) / 2.0
    order = sorted(range(len(frames)), key=lambda i: frames[i].tkey)
    n_t = len(frames)
    raw = None
    with ThreadPoolExecutor(_workers(n_t)) as pool:
        arrays = list(pool.map(lambda i: _read_pixels(frames[i].info)[frames[i].index], order))
    raw = np.empty((n_t, n, tr, tc), dtype=np.result_type(*[a.dtype for a in arrays]))
    for t, a in enumerate(arrays):
        raw[t] = a.reshape(m, tr, m, tc).transpose(0, 2, 1, 3).reshape(m * m, tr, tc)[:n]
    slopes = np.array([[frames[i].slope] * n for i in order])
    icpts = np.array([[frames[i].intercept] * n for i in order])
    vals = _apply_rescale(raw, slopes, icpts)
    data = vals.transpose(3, 2, 1, 0)
    if n_t == 1:
        data = data[..., 0]
    affine = _lps_to_ras(row_cos, col_cos, sp, origin, normal * dz)
    meta = _meta(frames, is_4d=n_t > 1, rows=tr, cols=tc, mosaic=True)
    diffusion = _volume_diffusion([(frames[i], t, 0) for t, i in enumerate(order)], n_t, path)
    return Volume(data=data, affine=affine, modality=modality, meta=meta, diffusion=diffusion)
