"""The records the scanner and the reader pass along: :class:`DicomSeries` (public) and the per-file and per-frame
header facts (``_FileInfo``, ``_Frame``) gathered once by the scan so that reading a series parses no header again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


# Modalities whose single images are projections (no patient position/orientation): read as 2D.
_PROJECTION_MODALITIES = {"CR", "DX", "MG", "RG", "IO", "PX", "XA", "RF", "DR"}


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


def _workers(n: int) -> int:
    return max(1, min(8, n, 2 * (os.cpu_count() or 1)))
