"""Turning a parsed header (a pydicom Dataset or a ``_FastHeader``) into frames: positions, orientations, spacing,
value scaling (including Philips' private scale slope), timing, diffusion tags, Siemens CSA mosaic facts and the
per-frame functional groups of enhanced multi-frame files; and the labels of SOP classes that hold no image.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from .fast import _NUMERIC_VR, _PRIVATE_TAGS, _FastHeader
from .model import _FileInfo, _Frame


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


def _non_image_label(ds) -> str | None:
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or "") or (str(meta.get("MediaStorageSOPClassUID", "") or "")
                                                   if meta is not None else "")
    for prefix, label in _NON_IMAGE_PREFIXES:
        if sop.startswith(prefix):
            return label
    modality = str(ds.get("Modality", "") or "").upper()
    return _NON_IMAGE_MODALITIES.get(modality)


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
