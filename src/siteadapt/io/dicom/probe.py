"""Reading one file's header, never its pixels: the fast struct walk when it applies, pydicom otherwise; locating
the pixel data (and checking encapsulated fragments end where the file does); and the reason a file is refused
(not DICOM, no image, truncated, unreadable).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..files import reading
from .fast import _DICOMDIR_SOP, _FAST_READ, _FAST_READ_MAX, _LONG_VRS, _fast_header
from .headers import _frames_from_header, _non_image_label, _vec
from .model import _Frame


_PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_TAG_BE = b"\x7f\xe0\x00\x10"
_ITEM_LE = b"\xfe\xff\x00\xe0"
_SEQ_DELIM_LE = b"\xfe\xff\xdd\xe0"


def _looks_like_raw_dataset(head: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble (old or badly written files) starts with a group 2 or 8 tag."""
    return len(head) >= 8 and head[0:2] in (b"\x02\x00", b"\x08\x00")


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
