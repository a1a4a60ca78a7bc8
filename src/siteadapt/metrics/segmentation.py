"""Per-structure segmentation metrics on 2D or 3D label maps: overlap and surface distances.

All metrics are computed per subject on the whole image/volume (never per slice) and per structure.
``pred`` is the prediction (the "result" in medpy's words), ``ref`` the reference (ground truth).

Definitions
===========

Masks
    For a structure with label id ``k``, its mask is ``label_map == k``. The binary functions
    (:func:`dice`, :func:`surface_distances`, ...) take masks directly; any non-zero value is foreground.

Overlap (``TP = |pred & ref|``)
    * Dice      = 2 TP / (|pred| + |ref|)
    * recall    = TP / |ref|      (sensitivity)
    * precision = TP / |pred|

    Rule for empty masks: a ratio whose denominator is 0 is NaN; nothing else is. Hence
    pred empty & ref non-empty -> Dice 0, recall 0, precision NaN;
    ref empty & pred non-empty -> Dice 0, recall NaN, precision 0;
    both empty                 -> Dice NaN, recall NaN, precision NaN.
    (medpy 0.5.2's ``dc`` also gives NaN when both are empty, with a RuntimeWarning, although its code means
    to return 1.0; MONAI's ``compute_dice(ignore_empty=True)`` returns NaN whenever ``ref`` is empty, even if
    ``pred`` is not, where we return 0. Both agree with us whenever ``ref`` is non-empty.)

Surface
    The surface of a mask is the set of its voxels that have at least one *face* neighbour (4-neighbourhood
    in 2D, 6-neighbourhood in 3D; ``connectivity=1``) outside the mask. Positions outside the array count as
    outside the mask, so mask voxels on the border of the array are surface voxels. This is
    ``mask & ~binary_erosion(mask, generate_binary_structure(ndim, 1), border_value=0)``, i.e. exactly the
    surface of ``medpy.metric.binary`` (default ``connectivity=1``) and of MONAI's ``get_mask_edges``
    (scipy erosion after cropping with a margin of 1). ``connectivity=2`` or ``3`` (edge / corner neighbours
    also count) is available for comparison with medpy's same-named argument.

Directed surface distances
    ``d(pred->ref)``: for every surface voxel of ``pred``, the Euclidean distance between its centre and the
    centre of the nearest surface voxel of ``ref``; ``d(ref->pred)`` the other way round. Distances use the
    physical voxel size ``spacing`` (one value per array axis, in array-axis order; a scalar means isotropic);
    ``spacing=None`` means 1 per axis, i.e. distances in voxels. They are computed with
    ``scipy.ndimage.distance_transform_edt(~surface_ref, sampling=spacing)`` (feature transform, then the
    distance at the query voxels only), run only inside the bounding box of the two masks of that structure
    (which is the bounding box of the two surfaces); the surfaces themselves are found in that box padded
    by one background voxel. The result is exactly the full-array computation.

Distance metrics (``P`` = d(pred->ref), ``R`` = d(ref->pred), ``|P|``, ``|R|`` surface voxel counts)
    * ``asd``  (directed average surface distance, pred -> ref) = mean(P)
    * ``assd`` (average symmetric surface distance) = mean of the *pooled* set P u R
      = (sum P + sum R) / (|P| + |R|) = (|P| mean(P) + |R| mean(R)) / (|P| + |R|).
      This equals MONAI ``compute_average_surface_distance(symmetric=True)`` and medpy 0.5 ``assd`` (checked
      with 0.5.2). medpy 0.4 and earlier (before its issue #108 was fixed; the SIFA reference ``evaluate.py``,
      written in 2019, calls ``mmb.assd`` in voxels) used the mean of the two directed means,
      (mean(P) + mean(R)) / 2, available as ``assd_pooling="mean_of_directed"``. The two coincide when
      |P| == |R|; otherwise the pooled value is weighted towards the larger surface. Why pooled: it is the
      usual literature definition ("the average of all distances from the boundary of one segmentation to the
      other and vice versa") and what both current reference libraries compute. The papers' tables in voxels
      (SIFA, DSAN "ASD") correspond to ``spacing=None``.
    * ``hd95`` = max(q95(P), q95(R)): the larger of the two directed 95th percentiles
      (``q`` = ``numpy.percentile`` with its default linear interpolation). This equals MONAI
      ``compute_hausdorff_distance(percentile=95)`` (torch.quantile, also linear). medpy's ``hd95`` is instead the
      95th percentile of the pooled set q95(P u R), available as ``hd95_pooling="pooled"``. There is no fixed
      order between the two in general (linear interpolation can put the pooled value above both directed
      ones on tiny sets), but both are <= ``hd``. Why max of directed: it is the classical partial Hausdorff
      distance taken in both directions (MONAI, DeepMind surface-distance), and it is not dominated by the
      larger surface: a far-off part missed by the smaller set still counts (pinned in the tests: a square
      versus the same square plus one pixel 7 voxels away gives 1.4 here and 0 with the pooled definition).
    * ``hd`` = max(max(P), max(R)) (Hausdorff distance; all three definitions agree).

    Empty masks: if ``pred`` or ``ref`` of a structure is empty, every distance metric of it is NaN (no
    exception, no sentinel value such as 0 or the image diagonal).

Per-subject report (:func:`segmentation_metrics`)
    ``{metric: {structure: value, ..., "mean": mean over structures}}``. ``"mean"`` skips NaN structures
    (``mean_skipna=True``, NaN if all are NaN); with ``mean_skipna=False`` a single NaN structure makes the
    mean NaN (the "N/A" convention of the SIFA tables). The report also carries ``"n_pred_voxels"`` and
    ``"n_ref_voxels"`` (``{structure: int}``, no "mean") so that :func:`summarize` can count empty cases.

Summary over subjects (:func:`summarize`)
    For each metric and structure (and "mean"): the mean and standard deviation over the subjects whose value
    is not NaN (``ddof=0`` by default, as ``numpy.std`` in the papers' evaluation code), the number of those
    subjects ``n`` and of NaN subjects ``n_nan``; plus, per structure, ``n_empty_pred`` / ``n_empty_ref`` /
    ``n_empty_both``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "SEGMENTATION_METRICS",
    "dice",
    "recall",
    "precision",
    "surface_distances",
    "asd",
    "assd",
    "hd95",
    "hd",
    "segmentation_metrics",
    "summarize",
]

SEGMENTATION_METRICS = ("dice", "recall", "precision", "asd", "assd", "hd95", "hd")
_DISTANCE_METRICS = frozenset({"asd", "assd", "hd95", "hd"})
ASSD_POOLINGS = ("pooled", "mean_of_directed")
HD95_POOLINGS = ("max_directed", "pooled")
_NAN = float("nan")


# ----------------------------------------------------------------------------------------------- helpers


def _as_mask(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == np.bool_ else a != 0


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    if pred.ndim < 1:
        raise ValueError("pred and ref must be arrays with at least one axis")


def _normalize_spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise ValueError(f"spacing has {sp.size} values but the arrays have {ndim} axes")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be finite and > 0, got {tuple(sp.tolist())}")
    return sp


def _check_connectivity(connectivity: int, ndim: int) -> int:
    c = int(connectivity)
    if not 1 <= c <= ndim:
        raise ValueError(f"connectivity must be in 1..{ndim} for {ndim}D arrays, got {connectivity}")
    return c


def _mask_bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask (tuple of slices), None when the mask is empty."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        proj = np.any(mask, axis=other) if other else mask
        nz = np.flatnonzero(proj)
        if nz.size == 0:
            return None
        out.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


def _union_bbox(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _padded(mask_crop: np.ndarray) -> np.ndarray:
    """Copy of ``mask_crop`` with one background voxel added on every side."""
    out = np.zeros(tuple(s + 2 for s in mask_crop.shape), dtype=bool)
    out[tuple(slice(1, -1) for _ in mask_crop.shape)] = mask_crop
    return out


def _surface(padded_mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Surface voxels of a mask that has a background margin of at least one voxel on every side."""
    m = padded_mask
    if connectivity == 1:
        # interior = voxels whose 2*ndim face neighbours are all in the mask (the margin makes wrap-free
        # shifting safe: the outermost layer is background, so it is never interior nor surface)
        interior = m.copy()
        nd = m.ndim
        for ax in range(nd):
            hi = tuple(slice(1, None) if i == ax else slice(None) for i in range(nd))
            lo = tuple(slice(None, -1) if i == ax else slice(None) for i in range(nd))
            interior[hi] &= m[lo]
            interior[lo] &= m[hi]
    else:
        structure = ndi.generate_binary_structure(m.ndim, connectivity)
        interior = ndi.binary_erosion(m, structure=structure, border_value=0)
    return m & ~interior


def _directed(query: np.ndarray, features: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distances from every True voxel of ``query`` to the nearest True voxel of ``features`` (same box)."""
    idx = np.nonzero(query)
    if idx[0].size == 0:
        return np.empty(0, dtype=np.float64)
    ft = ndi.distance_transform_edt(~features, sampling=spacing, return_distances=False, return_indices=True)
    sq = np.zeros(idx[0].size, dtype=np.float64)
    for ax, pos in enumerate(idx):
        delta = (ft[ax][idx] - pos).astype(np.float64) * spacing[ax]
        sq += delta * delta
    return np.sqrt(sq)


def _distances_in_box(pred_box: np.ndarray, ref_box: np.ndarray, spacing: np.ndarray, connectivity: int):
    """(d_pred_to_ref, d_ref_to_pred) for two non-empty masks cropped to (at least) their joint bounding box."""
    sp = _surface(_padded(pred_box), connectivity)
    sr = _surface(_padded(ref_box), connectivity)
    inner = tuple(slice(1, -1) for _ in range(sp.ndim))  # surfaces never lie on the added margin
    sp, sr = sp[inner], sr[inner]
    return _directed(sp, sr, spacing), _directed(sr, sp, spacing)


def _asd_from(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    return float(d_pr.mean()) if d_pr.size and d_rp.size else _NAN


def _assd_from(d_pr: np.ndarray, d_rp: np.ndarray, pooling: str = "pooled") -> float:
    if not (d_pr.size and d_rp.size):
        return _NAN
    if pooling == "pooled":
        return float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    if pooling == "mean_of_directed":
        return float((d_pr.mean() + d_rp.mean()) / 2.0)
    raise ValueError(f"assd pooling must be one of {ASSD_POOLINGS}, got {pooling!r}")


def _hd95_from(d_pr: np.ndarray, d_rp: np.ndarray, pooling: str = "max_directed", percentile: float = 95.0) -> float:
    if not (d_pr.size and d_rp.size):
        return _NAN
    if pooling == "max_directed":
        return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))
    if pooling == "pooled":
        return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))
    raise ValueError(f"hd95 pooling must be one of {HD95_POOLINGS}, got {pooling!r}")


def _hd_from(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    if not (d_pr.size and d_rp.size):
        return _NAN
    return float(max(d_pr.max(), d_rp.max()))


def _ratio(num: int, den: int) -> float:
    return num / den if den else _NAN


# ------------------------------------------------------------------------------------------ binary API


def dice(pred_mask, ref_mask) -> float:
    """Dice = 2|P&R| / (|P|+|R|); NaN when both masks are empty (see module docstring)."""
    p, r = _as_mask(pred_mask), _as_mask(ref_mask)
    _check_pair(p, r)
    n_p, n_r = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    return _ratio(2 * int(np.count_nonzero(p & r)), n_p + n_r)


def recall(pred_mask, ref_mask) -> float:
    """Recall (sensitivity) = |P&R| / |R|; NaN when ``ref`` is empty."""
    p, r = _as_mask(pred_mask), _as_mask(ref_mask)
    _check_pair(p, r)
    return _ratio(int(np.count_nonzero(p & r)), int(np.count_nonzero(r)))


def precision(pred_mask, ref_mask) -> float:
    """Precision = |P&R| / |P|; NaN when ``pred`` is empty."""
    p, r = _as_mask(pred_mask), _as_mask(ref_mask)
    _check_pair(p, r)
    return _ratio(int(np.count_nonzero(p & r)), int(np.count_nonzero(p)))


def surface_distances(pred_mask, ref_mask, spacing=None, connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(d_pred_to_ref, d_ref_to_pred)`` as float64 arrays.

    ``d_pred_to_ref[i]`` belongs to the i-th surface voxel of ``pred`` in C (row-major) order.
    When either mask is empty both arrays are empty (the distances are undefined).
    """
    p, r = _as_mask(pred_mask), _as_mask(ref_mask)
    _check_pair(p, r)
    sp = _normalize_spacing(spacing, p.ndim)
    conn = _check_connectivity(connectivity, p.ndim)
    bp, br = _mask_bbox(p), _mask_bbox(r)
    if bp is None or br is None:
        return np.empty(0), np.empty(0)
    box = _union_bbox(bp, br)
    return _distances_in_box(p[box], r[box], sp, conn)


def asd(pred_mask, ref_mask, spacing=None, connectivity: int = 1) -> float:
    """Directed average surface distance pred -> ref (NaN if a mask is empty)."""
    return _asd_from(*surface_distances(pred_mask, ref_mask, spacing, connectivity))


def assd(pred_mask, ref_mask, spacing=None, connectivity: int = 1, pooling: str = "pooled") -> float:
    """Average symmetric surface distance; ``pooling`` "pooled" (default) or "mean_of_directed"."""
    if pooling not in ASSD_POOLINGS:
        raise ValueError(f"assd pooling must be one of {ASSD_POOLINGS}, got {pooling!r}")
    return _assd_from(*surface_distances(pred_mask, ref_mask, spacing, connectivity), pooling=pooling)


def hd95(pred_mask, ref_mask, spacing=None, connectivity: int = 1, pooling: str = "max_directed",
         percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance; ``pooling`` "max_directed" (default) or "pooled" (medpy)."""
    if pooling not in HD95_POOLINGS:
        raise ValueError(f"hd95 pooling must be one of {HD95_POOLINGS}, got {pooling!r}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    d = surface_distances(pred_mask, ref_mask, spacing, connectivity)
    return _hd95_from(*d, pooling=pooling, percentile=float(percentile))


def hd(pred_mask, ref_mask, spacing=None, connectivity: int = 1) -> float:
    """Hausdorff distance (maximum of both directed distance sets)."""
    return _hd_from(*surface_distances(pred_mask, ref_mask, spacing, connectivity))


# ------------------------------------------------------------------------------------- label-map API


def _as_label_map(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name} must contain integer label ids")
        return a.astype(np.int64)
    raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")


def _normalize_labels(labels) -> dict[str, int]:
    if isinstance(labels, Mapping):
        out = {str(k): int(v) for k, v in labels.items()}
    else:
        out = {str(int(v)): int(v) for v in labels}
    if not out:
        raise ValueError("labels is empty")
    if "mean" in out:
        raise ValueError('"mean" is reserved for the mean over structures and cannot name a structure')
    return out


def _label_boxes(label_map: np.ndarray, ids: Iterable[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box per label id with one pass over the array (find_objects) where possible."""
    ids = list(ids)
    pos = [i for i in ids if i >= 1]
    out: dict[int, tuple[slice, ...] | None] = {}
    if pos:
        lm = label_map
        if lm.dtype.kind == "i" and lm.size and lm.min() < 0:
            lm = np.where(lm < 0, 0, lm)
        if lm.dtype.kind in "iu" and lm.dtype.itemsize > 4 and lm.size and lm.max() <= np.iinfo(np.int32).max:
            lm = lm.astype(np.int32)
        objs = ndi.find_objects(lm, max_label=max(pos))
        for i in pos:
            out[i] = objs[i - 1]
    for i in ids:
        if i < 1:
            out[i] = _mask_bbox(label_map == i)
    return out


def segmentation_metrics(
    pred,
    ref,
    labels: Mapping[str, int] | Iterable[int],
    spacing=None,
    metrics: Sequence[str] = SEGMENTATION_METRICS,
    *,
    assd_pooling: str = "pooled",
    hd95_pooling: str = "max_directed",
    connectivity: int = 1,
    mean_skipna: bool = True,
) -> dict[str, dict[str, float]]:
    """Per-structure metrics of one subject: ``{metric: {structure: value, ..., "mean": ...}}``.

    ``labels`` maps structure names to label ids (an iterable of ids names them by their id). ``spacing``:
    voxel size per array axis (None = voxels). Empty structures never raise: see the module docstring.
    The result also holds ``"n_pred_voxels"`` and ``"n_ref_voxels"`` ({structure: int}) for :func:`summarize`.
    """
    pred = _as_label_map(pred, "pred")
    ref = _as_label_map(ref, "ref")
    _check_pair(pred, ref)
    names = _normalize_labels(labels)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in SEGMENTATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available: {SEGMENTATION_METRICS}")
    if assd_pooling not in ASSD_POOLINGS:
        raise ValueError(f"assd_pooling must be one of {ASSD_POOLINGS}, got {assd_pooling!r}")
    if hd95_pooling not in HD95_POOLINGS:
        raise ValueError(f"hd95_pooling must be one of {HD95_POOLINGS}, got {hd95_pooling!r}")
    sp = _normalize_spacing(spacing, pred.ndim)
    conn = _check_connectivity(connectivity, pred.ndim)
    want_dist = any(m in _DISTANCE_METRICS for m in metrics)

    ids = set(names.values())
    boxes_p = _label_boxes(pred, ids)
    boxes_r = _label_boxes(ref, ids)

    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    n_pred: dict[str, int] = {}
    n_ref: dict[str, int] = {}
    for name, lab in names.items():
        box = _union_bbox(boxes_p[lab], boxes_r[lab])
        if box is None:
            p = r = np.zeros((1,) * pred.ndim, dtype=bool)
        else:
            p = pred[box] == lab
            r = ref[box] == lab
        n_p, n_r = int(np.count_nonzero(p)), int(np.count_nonzero(r))
        tp = int(np.count_nonzero(p & r)) if n_p and n_r else 0
        n_pred[name], n_ref[name] = n_p, n_r
        values = {
            "dice": _ratio(2 * tp, n_p + n_r),
            "recall": _ratio(tp, n_r),
            "precision": _ratio(tp, n_p),
        }
        if want_dist:
            if n_p and n_r:
                d_pr, d_rp = _distances_in_box(p, r, sp, conn)
            else:
                d_pr = d_rp = np.empty(0)
            values["asd"] = _asd_from(d_pr, d_rp)
            values["assd"] = _assd_from(d_pr, d_rp, assd_pooling)
            values["hd95"] = _hd95_from(d_pr, d_rp, hd95_pooling)
            values["hd"] = _hd_from(d_pr, d_rp)
        for m in metrics:
            out[m][name] = values[m]
    for m in metrics:
        vals = np.array([out[m][n] for n in names], dtype=np.float64)
        if mean_skipna:
            finite = vals[~np.isnan(vals)]
            out[m]["mean"] = float(finite.mean()) if finite.size else _NAN
        else:
            out[m]["mean"] = float(vals.mean())
    out["n_pred_voxels"] = n_pred
    out["n_ref_voxels"] = n_ref
    return out


_COUNT_KEYS = ("n_pred_voxels", "n_ref_voxels")


def summarize(per_subject: Sequence[Mapping[str, Mapping[str, float]]], ddof: int = 0) -> dict:
    """Mean and std over subjects of every metric/structure, NaN-aware, with counts of NaN and empty cases.

    Returns ``{"n_subjects": N,
    "metrics": {metric: {structure: {"mean", "std", "n", "n_nan"}}},
    "n_empty_pred": {structure: k}, "n_empty_ref": {structure: k}, "n_empty_both": {structure: k}}``.
    ``mean``/``std`` are over the ``n`` subjects whose value is not NaN (NaN when ``n`` is 0, std NaN when
    ``n <= ddof``). Empty counts are present only when the reports carry voxel counts
    (as :func:`segmentation_metrics` reports do).
    """
    per_subject = list(per_subject)
    summary: dict = {"n_subjects": len(per_subject), "metrics": {}}
    metric_names: list[str] = []
    for rep in per_subject:
        for m in rep:
            if m not in _COUNT_KEYS and m not in metric_names:
                metric_names.append(m)
    for m in metric_names:
        structures: list[str] = []
        for rep in per_subject:
            for s in rep.get(m, {}):
                if s not in structures:
                    structures.append(s)
        per_struct = {}
        for s in structures:
            vals = np.array([float(rep.get(m, {}).get(s, _NAN)) for rep in per_subject], dtype=np.float64)
            ok = vals[~np.isnan(vals)]
            n = int(ok.size)
            per_struct[s] = {
                "mean": float(ok.mean()) if n else _NAN,
                "std": float(ok.std(ddof=ddof)) if n > ddof else _NAN,
                "n": n,
                "n_nan": int(vals.size - n),
            }
        summary["metrics"][m] = per_struct
    if per_subject and all(all(k in rep for k in _COUNT_KEYS) for rep in per_subject):
        structures = []
        for rep in per_subject:
            for s in rep["n_ref_voxels"]:
                if s not in structures:
                    structures.append(s)
        e_pred, e_ref, e_both = {}, {}, {}
        for s in structures:
            ps = [int(rep["n_pred_voxels"].get(s, 0)) == 0 for rep in per_subject]
            rs = [int(rep["n_ref_voxels"].get(s, 0)) == 0 for rep in per_subject]
            e_pred[s] = int(sum(ps))
            e_ref[s] = int(sum(rs))
            e_both[s] = int(sum(a and b for a, b in zip(ps, rs)))
        summary["n_empty_pred"] = e_pred
        summary["n_empty_ref"] = e_ref
        summary["n_empty_both"] = e_both
    return summary




def label_dice(a: np.ndarray, b: np.ndarray, ids) -> float | None:
    """Mean Dice over the structures ``ids`` present in either label map (None when none is): the per-subject
    overlap that selection and the registry's source-regression gate compare models by."""
    vals = []
    for i in ids:
        x, y = a == i, b == i
        s = int(x.sum() + y.sum())
        if s:
            vals.append(2.0 * int((x & y).sum()) / s)
    return float(np.mean(vals)) if vals else None
