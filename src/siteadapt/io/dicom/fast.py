"""A struct-based walk over the top-level elements of a plain little-endian DICOM header: it decodes only the tags
the scan needs, several times faster than a full pydicom parse, and gives up (returns None) on anything unusual so
that the caller falls back to pydicom.
"""

from __future__ import annotations

import struct

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian


_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT"}


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
