"""Readers for NIfTI volumes and 2D image files (PNG/JPEG/TIFF), with the checks ingest needs.

Only pixel values and geometry are taken from an input file: NIfTI description/aux fields and extensions, PNG text
chunks and JPEG EXIF are never read into the outputs, so identifiers they may carry stay behind. Reasons for refusing
a file never quote its path or name (readers' exception texts often do: they go through :func:`why`), since reasons
are recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from .volume import Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_SUFFIXES = NIFTI_SUFFIXES + (".png", ".tif", ".tiff", ".bmp")  # never lossy JPEG for labels


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE2D_SUFFIXES):
        return "image2d"
    return "other"


def stem_of(path: Path) -> str:
    name = path.name
    for suf in NIFTI_SUFFIXES + IMAGE2D_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def why(e: BaseException, path: Path, limit: int = 120) -> str:
    """``"<ExceptionType>: <text>"`` with the file's path (as given and resolved), name and stem replaced by
    ``<file>``: nibabel and Pillow put the path in their messages."""
    text = str(e)
    names = {str(path), path.as_posix(), path.name, stem_of(path)}
    try:
        names |= {str(path.resolve()), path.resolve().as_posix()}
    except OSError:
        pass
    for n in sorted((n for n in names if len(n) >= 3), key=len, reverse=True):
        text = text.replace(n, "<file>")
    return f"{type(e).__name__}: {text[:limit]}"


# Smallest image side ingest accepts, in pixels, on each of the first two (in-plane) axes. Every task resamples its
# inputs to ``image_size`` (64+ pixels): an image a few pixels wide holds no anatomy to adapt to, and is almost always
# a thumbnail, an icon or an export error. Volumes may have any number of slices.
MIN_IMAGE_SIDE = 8


def unusable_reason(data: np.ndarray) -> str | None:
    """Why an image that was read cannot be used although its file is fine, or None: fewer than
    :data:`MIN_IMAGE_SIDE` pixels along either in-plane axis ("image too small"), or every voxel holding the same
    value ("image carries no signal": all zero, or one constant)."""
    shape = tuple(int(n) for n in data.shape)
    if len(shape) < 2 or min(shape[:2]) < MIN_IMAGE_SIDE:
        return (f"image too small: {' x '.join(map(str, shape))} pixels, the minimum is {MIN_IMAGE_SIDE} pixels "
                "along each in-plane axis")
    if data.size and np.all(data.flat[0] == data):  # one value everywhere (NaN is refused before this)
        return f"image carries no signal: every voxel holds the same value ({float(data.flat[0]):g})"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Reader notes: warnings and log lines that pydicom, nibabel and Pillow emit while reading an input. Left alone they
# reach stderr with whatever the library put in them (a header value such as PatientName, a file path). During
# :func:`reader_notes` they are held back, tied to the file being read (:func:`reading`, per thread, so that files
# read by a thread pool are told apart) and handed to the caller, which reports them under a file reference.

READER_LOGGERS = ("pydicom", "nibabel", "PIL")
_current = threading.local()


@contextlib.contextmanager
def reading(path: Path | None):
    """Attribute reader notes raised in this thread to ``path`` until the block ends."""
    before = getattr(_current, "path", None)
    _current.path = path
    try:
        yield
    finally:
        _current.path = before


class ReaderNotes:
    """What :func:`reader_notes` collected: ``(path or None, text)`` pairs in the order they came, the text as the
    library wrote it (callers must clean it with :func:`clean_note` before printing it)."""

    def __init__(self) -> None:
        self.notes: list[tuple[Path | None, str]] = []
        self.default: Path | None = None  # the file a note belongs to when no thread named one (set by the caller)
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        path = getattr(_current, "path", None) or self.default
        with self._lock:
            self.notes.append((path, text))

    def take(self) -> list[tuple[Path | None, str]]:
        """The notes collected so far, each (path, text) once, in first-seen order; the list is emptied."""
        with self._lock:
            got, self.notes = self.notes, []
        return list(dict.fromkeys(got))


class _NoteHandler(logging.Handler):
    def __init__(self, sink: ReaderNotes) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.add(record.getMessage())
        except Exception:  # a note that cannot be formatted is dropped, never printed raw
            pass


@contextlib.contextmanager
def reader_notes():
    """Hold back the readers' warnings (``warnings.warn``) and their loggers' records (:data:`READER_LOGGERS`, which
    stop propagating to the root logger meanwhile); yields the :class:`ReaderNotes` that collects them."""
    sink = ReaderNotes()
    handler = _NoteHandler(sink)
    loggers = [logging.getLogger(n) for n in READER_LOGGERS]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pydicom both logs and warns the same text: without the category, the two are one note
        warnings.showwarning = lambda message, category, *a, **k: sink.add(
            str(message) if issubclass(category, UserWarning) and category is UserWarning
            else f"{category.__name__}: {message}")
        for lg in loggers:
            lg.addHandler(handler)
            lg.propagate = False
            if lg.level == logging.NOTSET or lg.level > logging.WARNING:
                lg.setLevel(logging.WARNING)
        try:
            yield sink
        finally:
            for lg, (prop, level) in zip(loggers, saved):
                lg.removeHandler(handler)
                lg.propagate, lg.level = prop, level


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/][^\s,;:'\"()]+")


def clean_note(text: str, names: list[str] = (), limit: int = 200) -> str:
    """A reader note fit to print: ``names`` (paths and file names to hide) replaced by ``<file>``, quoted values
    (libraries quote the header value or the file they complain about) replaced by ``'...'``, anything shaped like a
    path replaced by ``<path>``, then cut to ``limit`` characters."""
    for n in sorted((n for n in names if n and len(n) >= 3), key=len, reverse=True):
        text = text.replace(n, "<file>")
    text = _QUOTED.sub("'...'", text)
    text = _PATHLIKE.sub("<path>", text)
    text = " ".join(text.split())
    return text[:limit]


def read_nifti(path: Path, *, modality: str = "OT") -> Volume:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        raise InputError(path, f"unreadable NIfTI: {why(e, path)}") from None
    if data.ndim < 2 or data.size == 0:
        raise InputError(path, f"NIfTI has no usable image (shape {data.shape})")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"NaN or infinite values in image ({n} voxels)")
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "NIfTI has no valid voxel-to-world affine (qform/sform)")
    # drop trailing singleton dimensions beyond 3 (e.g. X,Y,Z,1)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return Volume(data=np.ascontiguousarray(data), affine=affine.astype(np.float64), modality=modality,
                  meta={"source_format": "nifti"})


def affine_2d(spacing: float | tuple[float, float]) -> np.ndarray:
    """Voxel-to-world affine of a 2D image stored as [i=column, j=row]: LPS axes flipped to RAS, as for 2D DICOM."""
    sr, sc = (spacing, spacing) if np.isscalar(spacing) else spacing
    return np.diag([-float(sc), -float(sr), 1.0, 1.0])


def read_image2d(path: Path, *, spacing: float | None = None, modality: str = "OT") -> Volume:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.int32)
                arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() < 65536 else arr
            elif mode in ("L", "P", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
            elif mode == "F":
                arr = np.asarray(im, dtype=np.float32)
            else:  # RGB/RGBA/CMYK/LA: luminance
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(path, f"unreadable image file: {why(e, path)}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(path, f"not a 2D image (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(path, "NaN or infinite values in image")
    # PNG/JPEG carry no pixel size: without a configured one, 1.0 mm is assumed and recorded as assumed
    meta = {"source_format": path.suffix.lower().lstrip("."), "source_mode": mode, "spacing_assumed": not spacing}
    return Volume(data=np.ascontiguousarray(arr.T), affine=affine_2d(spacing or 1.0), modality=modality, meta=meta)


def label_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A label file's values as stored, unchecked: NIfTI with its affine, a 2D image (rows x cols; palette and
    integer modes as stored, others as 8-bit grey) with None. Raises InputError when it cannot be read."""
    if kind_of(path) == "nifti":
        try:
            img = nib.load(str(path))
            return np.asanyarray(img.dataobj), img.affine
        except Exception as e:
            raise InputError(path, f"unreadable label NIfTI: {why(e, path)}") from None
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im if im.mode in ("I", "I;16", "L", "P") else im.convert("L")), None
    except Exception as e:
        raise InputError(path, f"unreadable label image: {why(e, path)}") from None


def read_label(path: Path, like: Volume) -> np.ndarray:
    """Read a label map for image ``like`` and check it fits: same shape and, for NIfTI, the same geometry.

    Returns uint8 (or uint16 when ids exceed 255) in the image's index order. Raises InputError naming the problem.
    """
    k = kind_of(path)
    if k == "nifti":
        lab, affine = label_array(path)
        while lab.ndim > like.data.ndim and lab.shape[-1] == 1:
            lab = lab[..., 0]
        if lab.shape != like.data.shape[: lab.ndim] or lab.ndim != min(like.data.ndim, 3):
            raise InputError(path, f"label shape {tuple(lab.shape)} differs from image shape {tuple(like.data.shape)}")
        diff = float(np.abs(affine - like.affine).max())
        if diff > 1e-2:
            raise InputError(path, f"label geometry differs from image geometry (affines differ by up to {diff:.3g} mm)")
    elif k == "image2d":
        if path.suffix.lower() in (".jpg", ".jpeg"):
            raise InputError(path, "label stored as lossy JPEG: label values are not exact")
        lab = label_array(path)[0].T
        if lab.shape != like.data.shape:
            raise InputError(path, f"label shape {tuple(lab.shape[::-1])} (rows x cols) differs from image shape "
                                   f"{tuple(like.data.shape[::-1])}")
    else:
        raise InputError(path, "unsupported label file type")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all():
            raise InputError(path, "NaN or infinite values in label")
        if not np.all(lab == np.round(lab)):
            raise InputError(path, "label has non-integer values")
    if lab.min() < 0:
        raise InputError(path, "label has negative values")
    out_dtype = np.uint8 if lab.max() <= 255 else np.uint16
    return np.ascontiguousarray(lab.astype(out_dtype))
