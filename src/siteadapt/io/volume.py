"""The in-memory image every reader returns and every writer takes.

Conventions (the same as NIfTI and dcm2niix):
- ``data`` is indexed ``[i, j, k(, t)]`` where ``i`` runs along a DICOM row (the column index), ``j`` down the
  columns (the row index) and ``k`` across slices. 2D images are ``[i, j]``.
- ``affine`` maps voxel indices to world coordinates in millimetres, RAS+ (NIfTI), not DICOM's LPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_path


@dataclass
class Volume:
    data: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    # Non-identifying facts only (never names, ids, dates, institutions or UIDs).
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        nd = min(self.data.ndim, 3)
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :nd], axis=0))

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def save_nifti(vol_or_data, path: str | Path, affine: np.ndarray | None = None, *, dtype=None,
               compresslevel: int = 1) -> Path:
    """Write a NIfTI-1 file atomically. The header carries geometry only: no description, no aux file, no intent name."""
    if isinstance(vol_or_data, Volume):
        data, affine = vol_or_data.data, vol_or_data.affine
    else:
        data = vol_or_data
    if affine is None:
        raise ValueError("save_nifti needs an affine")
    if dtype is not None:
        data = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        if str(path).endswith(".gz"):
            import gzip

            # nibabel's gzip default (level 9) dominates ingest time; level 1 is much faster for a few % more bytes.
            # No file name and mtime 0 in the gzip header: the same volume always gives the same bytes (and sha256).
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                      compresslevel=compresslevel, mtime=0) as gz:
                gz.write(img.to_bytes())
        else:
            img.to_filename(tmp)
    return path


def load_nifti(path: str | Path) -> Volume:
    img = nib.load(str(path))
    return Volume(data=np.asanyarray(img.dataobj), affine=img.affine.copy(), modality="OT")
