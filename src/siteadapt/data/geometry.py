"""Grid geometry shared by preprocessing and prediction: axis-aligned RAS crop grids, resampling between grids.

A *grid* is (shape, affine) with affine mapping voxel indices to RAS world mm. Preprocessing resamples each subject
from its original grid onto a crop grid (reorientation, resampling and cropping in one interpolation), and
prediction maps label maps from the crop grid back to the original grid with the inverse transform, so a 2D slice
prediction lands on exactly the voxels it came from.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def crop_grid(centre_world: np.ndarray, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of an RAS-aligned grid of ``shape`` voxels with ``spacing`` mm, centred on ``centre_world``."""
    sp = np.asarray(spacing, dtype=float)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = np.asarray(centre_world, dtype=float)[:3] - sp * (np.asarray(shape, dtype=float) - 1) / 2
    return aff


def voxel_to_world(affine: np.ndarray, ijk) -> np.ndarray:
    ijk = np.asarray(ijk, dtype=float)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _as3d(data: np.ndarray) -> np.ndarray:
    return data[..., None] if data.ndim == 2 else data


def _smooth_for(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """Gaussian anti-aliasing before downsampling: sigma = 0.4 x (downsampling factor) per source axis when > 1.5."""
    src_sp = np.linalg.norm(src_affine[:3, :3], axis=0)
    dst_sp = np.linalg.norm(dst_affine[:3, :3], axis=0)
    dst_min = float(np.min(dst_sp[:2] if data.ndim == 2 else dst_sp))
    factors = dst_min / src_sp[: data.ndim]
    sigma = [0.4 * f if f > 1.5 and data.shape[i] > 1 else 0.0 for i, f in enumerate(factors)]
    if not any(sigma):
        return data
    return ndimage.gaussian_filter(data.astype(np.float32, copy=False), sigma=sigma, mode="nearest")


def resample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape, *, order: int = 1,
             cval: float = 0.0, antialias: bool = True) -> np.ndarray:
    """Values of ``data`` (on the grid ``src_affine``) at the voxels of the grid (``dst_affine``, ``dst_shape``)."""
    data = np.asarray(data)
    dst_shape = tuple(int(s) for s in dst_shape)
    m = np.linalg.inv(src_affine) @ dst_affine
    planar = (data.ndim == 2 or data.shape[2] == 1) and dst_shape[2] == 1 and np.allclose(m[2, :2], 0) \
        and np.allclose(m[:2, 2], 0) and abs(m[2, 3]) < 1e-6
    src = data[..., 0] if planar and data.ndim == 3 else (data if planar else _as3d(data))
    if order > 0:
        src = src.astype(np.float32, copy=False)
        if antialias:
            src = _smooth_for(src, src_affine, dst_affine)
    if planar:  # 2D images: interpolate in the plane only (a size-1 axis would blend in the fill value)
        out = ndimage.affine_transform(src, m[:2, :2], offset=m[:2, 3], output_shape=dst_shape[:2], order=order,
                                       mode="constant", cval=cval, prefilter=False)
        return out[..., None]
    return ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=dst_shape, order=order,
                                    mode="constant", cval=cval, prefilter=False)


def resample_labels(labels: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape,
                    ids: list[int] | None = None, smooth: bool = True) -> np.ndarray:
    """Resample a label map. ``smooth``: interpolate each label's indicator linearly and take the argmax (smoother
    boundaries than nearest neighbour when going from a coarse grid to a fine one); otherwise nearest neighbour."""
    labels = np.asarray(labels)
    if not smooth:
        return resample(labels, src_affine, dst_affine, dst_shape, order=0).astype(labels.dtype)
    if ids is None:
        ids = [int(v) for v in np.unique(labels) if v != 0]
    dst_shape = tuple(int(s) for s in dst_shape)
    best = np.full(dst_shape, 0.5, dtype=np.float32)  # a label wins a voxel only where its indicator exceeds 0.5
    out = np.zeros(dst_shape, dtype=labels.dtype)
    for i in ids:
        ind = resample((labels == i).astype(np.float32), src_affine, dst_affine, dst_shape, order=1, antialias=False)
        win = ind > best
        out[win] = i
        best[win] = ind[win]
    return out


def to_original(pred_grid: np.ndarray, grid_affine: np.ndarray, orig_shape, orig_affine: np.ndarray,
                ids: list[int] | None = None) -> np.ndarray:
    """Map a label map on a preprocessing crop grid back to the subject's original grid (outside the crop: 0)."""
    out = resample_labels(pred_grid, grid_affine, orig_affine, tuple(orig_shape[:3]) if len(orig_shape) >= 3
                          else tuple(orig_shape) + (1,), ids=ids)
    return out[..., 0] if len(orig_shape) == 2 else out
