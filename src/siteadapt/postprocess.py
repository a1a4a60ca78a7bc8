"""Post-processing of predicted label maps (SeUDA: "largest connected-component selection and hole filling").

``postprocess(label_map, labels, largest_cc=True, fill_holes=True)`` returns a new label map of the input's
dtype (integer, or float holding integer ids as NIfTI files sometimes do); the input is not modified. Both steps are configurable per task and per structure: ``largest_cc`` / ``fill_holes`` accept
``True`` (every structure in ``labels``), ``False`` (none) or a collection of structure names or label ids.

Connectivity
    ``connectivity=1`` (default): voxels are connected through faces only (4-neighbourhood in 2D,
    6-neighbourhood in 3D); ``connectivity=ndim`` also connects through edges and corners (8 / 26). The same
    value is used for the structures' components and for the background pockets of the hole filling.

Largest connected component (step 1, per structure, in the full dimensionality of the array)
    The connected components of ``label_map == k`` are found; all but the largest are set to background (0).
    Ties in size: the component met first in C (row-major) order is kept. Other structures are untouched.

Hole filling (step 2, after step 1)
    A *hole of structure k* is a connected component of background (label 0) voxels that does not touch the
    border of the array and whose neighbours (under ``connectivity``) all carry label ``k``. Holes are filled
    with ``k``. Only background is ever changed: another structure is never overwritten, and a background
    pocket enclosed by two structures together (e.g. a gap between a cavity and the wall around it) belongs to
    neither and stays background. By default holes are searched in the full dimensionality of the array (a 2D
    image: in 2D; a volume: fully enclosed 3D cavities). ``hole_axis=a`` instead searches each 2D slice taken
    along array axis ``a`` independently (slice-wise filling, which also closes pockets open in 3D).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage as ndi

__all__ = ["postprocess", "keep_largest_component", "fill_structure_holes"]


def _label_ids(labels) -> dict[str, int]:
    if isinstance(labels, Mapping):
        return {str(k): int(v) for k, v in labels.items()}
    return {str(int(v)): int(v) for v in labels}


def _select(which, names: dict[str, int]) -> set[int]:
    if which is True:
        return {v for v in names.values() if v != 0}
    if which is False or which is None:
        return set()
    if isinstance(which, (str, int, np.integer)):
        which = [which]
    out = set()
    for w in which:
        if isinstance(w, str):
            if w not in names:
                raise ValueError(f"unknown structure {w!r}; known: {sorted(names)}")
            out.add(names[w])
        else:
            out.add(int(w))
    out.discard(0)
    return out


def _check_map(label_map) -> np.ndarray:
    """Integer working copy of ``label_map`` (float maps are accepted when every value is an integer)."""
    a = np.asarray(label_map)
    if a.ndim < 1:
        raise ValueError("label_map must have at least one axis")
    if np.issubdtype(a.dtype, np.integer):
        return a.copy()
    if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.array_equal(a, np.round(a)):
        return a.astype(np.int64)
    raise ValueError(f"label_map must contain integer label ids, got dtype {a.dtype}")


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= int(connectivity) <= ndim:
        raise ValueError(f"connectivity must be in 1..{ndim} for {ndim}D arrays, got {connectivity}")
    return ndi.generate_binary_structure(ndim, int(connectivity))


def keep_largest_component(label_map: np.ndarray, label_ids: Iterable[int], connectivity: int = 1) -> np.ndarray:
    """In place on ``label_map``: keep only the largest connected component of each listed label id."""
    ids = sorted({int(i) for i in label_ids if int(i) > 0})
    if not ids:
        return label_map
    st = _structure(label_map.ndim, connectivity)
    lm = label_map if label_map.min(initial=0) >= 0 else np.where(label_map < 0, 0, label_map)
    boxes = ndi.find_objects(lm, max_label=max(ids))
    for k in ids:
        box = boxes[k - 1]
        if box is None:
            continue
        view = label_map[box]
        m = view == k
        comp, n = ndi.label(m, structure=st)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        sizes[0] = -1
        keep = int(np.argmax(sizes))  # first maximum = first component in C order
        view[m & (comp != keep)] = 0
    return label_map


def _fill_holes_nd(lm: np.ndarray, fill_ids: set[int], st: np.ndarray) -> None:
    """In place: fill background pockets enclosed by exactly one structure of ``fill_ids`` (one array)."""
    bg = lm == 0
    comp, n = ndi.label(bg, structure=st)
    if n == 0:
        return
    nd = lm.ndim
    # components touching the array border are "outside"
    outside = np.zeros(n + 1, dtype=bool)
    for ax in range(nd):
        for end in (0, -1):
            face = np.take(comp, [end], axis=ax)
            outside[np.unique(face)] = True
    # neighbouring labels of every background component, gathered shift by shift
    pairs = []
    offsets = np.argwhere(st) - 1
    for off in offsets:
        if not off.any():
            continue
        src = tuple(slice(max(0, -o), lm.shape[i] - max(0, o)) for i, o in enumerate(off))
        dst = tuple(slice(max(0, o), lm.shape[i] - max(0, -o)) for i, o in enumerate(off))
        c = comp[src]
        nb = lm[dst]
        sel = (c > 0) & (nb != 0)
        if sel.any():
            pairs.append(np.stack([c[sel].astype(np.int64), nb[sel].astype(np.int64)], axis=1))
    if not pairs:
        return
    pairs = np.unique(np.concatenate(pairs), axis=0)
    cid, nlab = pairs[:, 0], pairs[:, 1]
    n_adj = np.bincount(cid, minlength=n + 1)
    fill = np.zeros(n + 1, dtype=lm.dtype)
    single = n_adj[cid] == 1
    fill[cid[single]] = nlab[single].astype(lm.dtype)
    fill[outside] = 0
    fill[~np.isin(fill, np.fromiter(fill_ids, dtype=np.int64))] = 0
    if not fill.any():
        return
    new = fill[comp]
    np.copyto(lm, new, where=new != 0)


def fill_structure_holes(label_map: np.ndarray, label_ids: Iterable[int], connectivity: int = 1,
                         hole_axis: int | None = None) -> np.ndarray:
    """In place on ``label_map``: fill the holes of the listed structures (see the module docstring)."""
    ids = {int(i) for i in label_ids if int(i) != 0}
    if not ids:
        return label_map
    if hole_axis is None:
        _fill_holes_nd(label_map, ids, _structure(label_map.ndim, connectivity))
        return label_map
    if label_map.ndim < 3:
        raise ValueError("hole_axis needs an array with at least 3 axes (slice-wise filling)")
    ax = int(hole_axis)
    if not -label_map.ndim <= ax < label_map.ndim:
        raise ValueError(f"hole_axis {hole_axis} out of range for a {label_map.ndim}D array")
    st = _structure(label_map.ndim - 1, connectivity)
    moved = np.moveaxis(label_map, ax, 0)  # a view: writes go to label_map
    for i in range(moved.shape[0]):
        sl = moved[i]
        if np.isin(sl, list(ids)).any():
            _fill_holes_nd(sl, ids, st)
    return label_map


def postprocess(label_map, labels, largest_cc=True, fill_holes=True, *, connectivity: int = 1,
                hole_axis: int | None = None) -> np.ndarray:
    """Largest connected component per structure, then hole filling into background; returns a new array.

    ``labels``: ``{name: id}`` or an iterable of ids. ``largest_cc`` / ``fill_holes``: bool or a collection of
    structure names / ids to apply the step to.
    """
    src = np.asarray(label_map)
    lm = _check_map(src)
    names = _label_ids(labels)
    cc_ids = _select(largest_cc, names)
    hole_ids = _select(fill_holes, names)
    if cc_ids:
        keep_largest_component(lm, cc_ids, connectivity)
    if hole_ids:
        fill_structure_holes(lm, hole_ids, connectivity, hole_axis)
    return lm if lm.dtype == src.dtype else lm.astype(src.dtype)
