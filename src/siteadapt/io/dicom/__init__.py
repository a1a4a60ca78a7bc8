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

Modules: :mod:`.probe` (one file's header, :mod:`.fast` its struct walk, :mod:`.headers` the frames it holds),
:mod:`.series` (grouping into series), :mod:`.assemble` (one series into a volume), :mod:`.model` (the records).
"""

from __future__ import annotations

from .assemble import read_series
from .model import DicomSeries
from .series import scan_dicom_files, scan_tree, series_identities

__all__ = ["DicomSeries", "scan_tree", "scan_dicom_files", "series_identities", "read_series"]
