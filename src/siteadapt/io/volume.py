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

from .atomic import atomic_path, write_text


@dataclass
class Volume:
    data: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    # Non-identifying facts only (never names, ids, dates, institutions or UIDs).
    meta: dict = field(default_factory=dict)
    # Diffusion-weighted 4D series: {"bvals": (T,) s/mm2, "dirs_ras": (T, 3) unit gradient directions in the RAS world
    # frame, zeros for b=0}, in the volume order of ``data``; None otherwise. Written by save_fsl_gradients.
    diffusion: dict | None = None

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


def fsl_bvecs(vol: Volume) -> np.ndarray:
    """The gradient directions of ``vol.diffusion`` as FSL bvecs, shape (3, T).

    Convention (FSL's, which dcm2niix also writes): each vector is expressed in the image's voxel axes (the RAS
    direction projected on the normalised columns of the affine), and its first component is negated when the
    affine's determinant is positive (FSL reads such "neurological" images with the first axis flipped). A tool that
    follows FSL's rule therefore recovers the same world direction from our file and from dcm2niix's, although our
    arrays are not flipped the way dcm2niix's are.
    """
    m = np.asarray(vol.affine, dtype=np.float64)[:3, :3]
    m = m / np.linalg.norm(m, axis=0)
    vox = np.asarray(vol.diffusion["dirs_ras"], dtype=np.float64) @ m  # row t: m.T @ dir_t
    if np.linalg.det(m) > 0:
        vox[:, 0] *= -1.0
    vox[np.abs(vox) < 5e-7] = 0.0  # no "-0" in the text
    return vox.T


def _num(v: float) -> str:
    return f"{float(v):.6g}"


def save_fsl_gradients(vol: Volume, nifti_path: str | Path) -> dict[str, Path]:
    """Write ``<stem>.bval`` and ``<stem>.bvec`` (FSL text format, one column per volume, in the 4D volume order)
    beside ``nifti_path`` when ``vol.diffusion`` is set, each atomically; remove stale ones otherwise. Returns
    ``{"bval": path, "bvec": path}`` or ``{}``."""
    nifti_path = Path(nifti_path)
    stem = nifti_path.name[:-7] if nifti_path.name.endswith(".nii.gz") else nifti_path.stem
    paths = {"bval": nifti_path.with_name(stem + ".bval"), "bvec": nifti_path.with_name(stem + ".bvec")}
    if vol.diffusion is None:
        for p in paths.values():
            p.unlink(missing_ok=True)
        return {}
    bvals = np.asarray(vol.diffusion["bvals"], dtype=np.float64)
    if vol.data.ndim != 4 or bvals.shape != (vol.data.shape[3],):
        raise ValueError(f"{bvals.size} b-values for an image of shape {vol.data.shape}")
    write_text(paths["bval"], " ".join(_num(b) for b in bvals) + "\n")
    write_text(paths["bvec"], "".join(" ".join(_num(v) for v in row) + "\n" for row in fsl_bvecs(vol)))
    return paths
