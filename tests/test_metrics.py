"""Segmentation and classification metrics: definitions pinned by hand-computed cases, and agreement with medpy
and MONAI (test-only references, skipped when absent) where the definitions coincide; where they differ (HD95 and
legacy ASSD pooling) the stated numeric relation is asserted."""

from __future__ import annotations

import math
import warnings
from importlib.metadata import version

import numpy as np
import pytest
from scipy import ndimage as ndi

from siteadapt.metrics import (
    asd,
    assd,
    auc,
    classification_metrics,
    confusion_counts,
    dice,
    hd,
    hd95,
    precision,
    recall,
    segmentation_metrics,
    summarize,
    surface_distances,
    youden_threshold,
)

SPACING = (0.7, 1.1, 2.5)
SQ2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------- fixtures


def _smooth_pair(shape, seed, sigma=2.5, level=0.6, jitter=0.5):
    """Two correlated smooth random masks (thresholded gaussian-filtered noise): several blobs, some touching
    the array border, ``pred`` a perturbed copy of ``ref``."""
    rng = np.random.default_rng(seed)
    base = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    base /= base.std()
    other = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    other /= other.std()
    ref = base > level
    pred = (base + jitter * other) > level
    return pred, ref


def _label_pair(shape, seed):
    """Two label maps with three structures built from smooth blobs."""
    rng = np.random.default_rng(seed)
    pred = np.zeros(shape, np.int16)
    ref = np.zeros(shape, np.int16)
    for lab in (1, 2, 5):
        p, r = _smooth_pair(shape, int(rng.integers(1 << 30)), level=1.0)
        pred[p & (pred == 0)] = lab
        ref[r & (ref == 0)] = lab
    return pred, ref


def _naive_directed(query, features, spacing):
    """Reference directed distances by brute force over all voxel pairs (tiny arrays only)."""
    q = np.argwhere(query) * np.asarray(spacing, float)
    f = np.argwhere(features) * np.asarray(spacing, float)
    return np.sqrt(((q[:, None, :] - f[None, :, :]) ** 2).sum(-1)).min(1)


def _naive_surface(mask):
    """Voxels with a face neighbour outside the mask (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    er = ndi.binary_erosion(padded, structure=ndi.generate_binary_structure(mask.ndim, 1))
    return (padded & ~er)[tuple(slice(1, -1) for _ in mask.shape)]


# ------------------------------------------------------------------------------ hand-computed definitions


def _unequal_surfaces_case():
    """pred = 5x5 square; ref = the same square plus one far pixel: |P| = 16 with all distances 0,
    R = 16 zeros and one distance of 7 pixels along axis 1."""
    pred = np.zeros((8, 14), bool)
    pred[1:6, 1:6] = True
    ref = pred.copy()
    ref[3, 12] = True
    return pred, ref


def test_hand_case_pins_assd_and_hd95_definitions():
    pred, ref = _unequal_surfaces_case()
    d_pr, d_rp = surface_distances(pred, ref)
    assert d_pr.tolist() == [0.0] * 16
    assert sorted(d_rp.tolist()) == [0.0] * 16 + [7.0]
    assert asd(pred, ref) == 0.0
    assert asd(ref, pred) == pytest.approx(7 / 17)
    # ASSD: mean of the pooled set (default) vs mean of the two directed means (medpy < 0.5)
    assert assd(pred, ref) == pytest.approx(7 / 33)
    assert assd(pred, ref, pooling="mean_of_directed") == pytest.approx((0 + 7 / 17) / 2)
    # HD95: max of directed 95th percentiles (default): q95 of [0]*16+[7] = 0 + 0.2 * 7 (linear interpolation)
    assert hd95(pred, ref) == pytest.approx(1.4)
    # pooled (medpy): 32 zeros and one 7 -> the 95th percentile is 0
    assert hd95(pred, ref, pooling="pooled") == 0.0
    assert hd(pred, ref) == 7.0
    # symmetric metrics do not depend on the order of the arguments
    assert assd(ref, pred) == assd(pred, ref)
    assert hd95(ref, pred) == hd95(pred, ref)
    # anisotropic spacing scales the axis-1 distance: 7 * 0.5
    sp = (2.0, 0.5)
    assert hd(pred, ref, sp) == pytest.approx(3.5)
    assert assd(pred, ref, sp) == pytest.approx(3.5 / 33)
    assert hd95(pred, ref, sp) == pytest.approx(0.7)


def test_hand_case_square_and_point():
    # pred: 3x3 square (8 surface pixels, centre interior); ref: its centre pixel
    pred = np.zeros((5, 5), bool)
    pred[1:4, 1:4] = True
    ref = np.zeros((5, 5), bool)
    ref[2, 2] = True
    d_pr, d_rp = surface_distances(pred, ref)
    assert sorted(d_pr.tolist()) == pytest.approx([1, 1, 1, 1, SQ2, SQ2, SQ2, SQ2])
    assert d_rp.tolist() == [1.0]
    assert asd(pred, ref) == pytest.approx((1 + SQ2) / 2)
    assert assd(pred, ref) == pytest.approx((5 + 4 * SQ2) / 9)
    assert assd(pred, ref, pooling="mean_of_directed") == pytest.approx(((1 + SQ2) / 2 + 1) / 2)
    assert hd(pred, ref) == pytest.approx(SQ2)
    assert dice(pred, ref) == pytest.approx(2 * 1 / (9 + 1))
    assert recall(pred, ref) == 1.0
    assert precision(pred, ref) == pytest.approx(1 / 9)


def test_surface_is_face_connectivity_and_array_border_counts_as_outside():
    m = np.zeros((5, 6, 7), bool)
    m[0:4, 1:5, 1:6] = True  # touches the array border on axis 0
    d, _ = surface_distances(m, m)
    # the surface of a box is all its voxels minus the strictly inner ones; the face at index 0 is surface
    n_surface = m.sum() - (4 - 2) * (4 - 2) * (5 - 2)
    assert d.size == n_surface == _naive_surface(m).sum()
    assert np.all(d == 0)


def test_bbox_computation_equals_brute_force():
    pred, ref = _smooth_pair((14, 16, 12), seed=3, sigma=1.5)
    d_pr, d_rp = surface_distances(pred, ref, SPACING)
    sp_, sr_ = _naive_surface(pred), _naive_surface(ref)
    np.testing.assert_allclose(d_pr, _naive_directed(sp_, sr_, SPACING), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_rp, _naive_directed(sr_, sp_, SPACING), rtol=1e-12, atol=1e-12)


def test_spacing_none_means_voxels():
    pred, ref = _smooth_pair((20, 22, 18), seed=4)
    a = surface_distances(pred, ref)
    b = surface_distances(pred, ref, (1, 1, 1))
    c = surface_distances(pred, ref, 1.0)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


# ------------------------------------------------------------------------------------------------ empty


def test_empty_masks_give_nan_not_exceptions():
    z = np.zeros((6, 7, 8), bool)
    m = z.copy()
    m[2:4, 2:5, 3:6] = True
    # both empty
    assert math.isnan(dice(z, z)) and math.isnan(recall(z, z)) and math.isnan(precision(z, z))
    # pred empty, ref not
    assert dice(z, m) == 0.0 and recall(z, m) == 0.0 and math.isnan(precision(z, m))
    # ref empty, pred not
    assert dice(m, z) == 0.0 and math.isnan(recall(m, z)) and precision(m, z) == 0.0
    for a, b in ((z, z), (z, m), (m, z)):
        d_pr, d_rp = surface_distances(a, b)
        assert d_pr.size == 0 and d_rp.size == 0
        for f in (asd, assd, hd95, hd):
            assert math.isnan(f(a, b, SPACING))


def test_report_with_empty_structures_and_summary_counts():
    shape = (10, 12, 9)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred[3:7, 2:6, 2:6] = 1
    ref[7:9, 8:11, 1:4] = 2  # structure 2 missed by pred
    pred[0:2, 0:2, 6:8] = 3  # structure 3 only in pred; structure 4 absent from both
    labels = {"a": 1, "b": 2, "c": 3, "d": 4}
    r1 = segmentation_metrics(pred, ref, labels, SPACING)
    assert r1["dice"]["b"] == 0.0 and r1["recall"]["b"] == 0.0 and math.isnan(r1["precision"]["b"])
    assert r1["dice"]["c"] == 0.0 and math.isnan(r1["recall"]["c"]) and r1["precision"]["c"] == 0.0
    assert math.isnan(r1["dice"]["d"])
    for m in ("asd", "assd", "hd95", "hd"):
        assert not math.isnan(r1[m]["a"])
        assert all(math.isnan(r1[m][s]) for s in "bcd")
        assert r1[m]["mean"] == r1[m]["a"]  # NaN structures skipped
    assert r1["dice"]["mean"] == pytest.approx(np.mean([r1["dice"]["a"], 0.0, 0.0]))
    strict = segmentation_metrics(pred, ref, labels, SPACING, mean_skipna=False)
    assert math.isnan(strict["assd"]["mean"]) and math.isnan(strict["dice"]["mean"])
    assert r1["n_pred_voxels"] == {"a": 64, "b": 0, "c": 8, "d": 0}
    assert r1["n_ref_voxels"] == {"a": 64, "b": 18, "c": 0, "d": 0}

    # a second subject where everything is found
    r2 = segmentation_metrics(ref, ref, labels, SPACING)
    assert r2["dice"]["a"] == 1.0 and r2["assd"]["a"] == 0.0 and r2["hd"]["b"] == 0.0
    s = summarize([r1, r2])
    assert s["n_subjects"] == 2
    # structure c: only in pred of subject 1, absent from subject 2 (ref vs ref)
    assert s["n_empty_pred"] == {"a": 0, "b": 1, "c": 1, "d": 2}
    assert s["n_empty_ref"] == {"a": 0, "b": 0, "c": 2, "d": 2}
    assert s["n_empty_both"] == {"a": 0, "b": 0, "c": 1, "d": 2}
    da = s["metrics"]["dice"]["a"]
    assert da["n"] == 2 and da["n_nan"] == 0
    assert da["mean"] == pytest.approx((r1["dice"]["a"] + 1.0) / 2)
    assert da["std"] == pytest.approx(np.std([r1["dice"]["a"], 1.0]))
    ab = s["metrics"]["assd"]["b"]
    assert ab["n"] == 1 and ab["n_nan"] == 1 and ab["mean"] == 0.0 and ab["std"] == 0.0
    dd = s["metrics"]["hd"]["d"]
    assert dd["n"] == 0 and dd["n_nan"] == 2 and math.isnan(dd["mean"]) and math.isnan(dd["std"])
    assert "n_pred_voxels" not in s["metrics"]
    assert s["metrics"]["assd"]["mean"]["n"] == 2


def test_label_map_report_matches_binary_functions():
    pred, ref = _label_pair((24, 28, 20), seed=7)
    labels = {"x": 1, "y": 2, "z": 5}
    rep = segmentation_metrics(pred, ref, labels, SPACING)
    for name, k in labels.items():
        p, r = pred == k, ref == k
        assert rep["dice"][name] == dice(p, r)
        assert rep["recall"][name] == recall(p, r)
        assert rep["precision"][name] == precision(p, r)
        assert rep["asd"][name] == asd(p, r, SPACING)
        assert rep["assd"][name] == assd(p, r, SPACING)
        assert rep["hd95"][name] == hd95(p, r, SPACING)
        assert rep["hd"][name] == hd(p, r, SPACING)
    # integer dtypes, bool and integral floats give the same report; metrics can be restricted
    same = segmentation_metrics(pred.astype(np.int64), ref.astype(np.float32), labels, SPACING)
    assert same["assd"] == rep["assd"]
    only = segmentation_metrics(pred, ref, [1, 5], SPACING, metrics=("dice", "hd"))
    assert set(only) == {"dice", "hd", "n_pred_voxels", "n_ref_voxels"}
    assert only["hd"]["5"] == rep["hd"]["z"]
    b = segmentation_metrics(pred == 1, ref == 1, {"x": 1}, SPACING)
    assert b["assd"]["x"] == rep["assd"]["x"]


def test_invalid_inputs_raise_before_computing():
    a = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError):
        segmentation_metrics(a, np.zeros((4, 5), np.uint8), {"a": 1})
    with pytest.raises(ValueError):
        segmentation_metrics(a, a, {"a": 1}, spacing=(1.0, 0.0))
    with pytest.raises(ValueError):
        segmentation_metrics(a, a, {"a": 1}, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        segmentation_metrics(a, a, {"a": 1}, metrics=("dice", "jaccard"))
    with pytest.raises(ValueError):
        segmentation_metrics(a + 0.5, a, {"a": 1})


# ------------------------------------------------------------------------------------------------ medpy


@pytest.fixture(scope="module")
def medpy_binary():
    pytest.importorskip("medpy")
    from medpy.metric import binary

    return binary


def _medpy_directed(binary, a, b, spacing, connectivity=1):
    return getattr(binary, "__surface_distances")(a, b, spacing, connectivity)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medpy_3d_anisotropic(medpy_binary, seed):
    mb = medpy_binary
    pred, ref = _smooth_pair((36, 40, 24), seed)
    d_pr, d_rp = surface_distances(pred, ref, SPACING)
    # identical directed sets, voxel by voxel (both in C order of the surface voxels)
    np.testing.assert_allclose(d_pr, _medpy_directed(mb, pred, ref, SPACING), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_rp, _medpy_directed(mb, ref, pred, SPACING), rtol=1e-12, atol=1e-12)
    assert dice(pred, ref) == pytest.approx(mb.dc(pred, ref), abs=1e-12)
    assert recall(pred, ref) == pytest.approx(mb.recall(pred, ref), abs=1e-12)
    assert precision(pred, ref) == pytest.approx(mb.precision(pred, ref), abs=1e-12)
    assert asd(pred, ref, SPACING) == pytest.approx(mb.asd(pred, ref, SPACING), rel=1e-9)
    assert hd(pred, ref, SPACING) == pytest.approx(mb.hd(pred, ref, SPACING), rel=1e-12)
    # medpy >= 0.5 pools the two sets for ASSD (as we do); older medpy averaged the two directed means
    legacy = tuple(int(x) for x in version("medpy").split(".")[:2]) < (0, 5)
    ours_assd = assd(pred, ref, SPACING, pooling="mean_of_directed" if legacy else "pooled")
    assert ours_assd == pytest.approx(mb.assd(pred, ref, SPACING), rel=1e-9)
    # HD95: medpy = q95 of the pooled set = our pooling="pooled"; ours = max of the directed q95
    medpy_hd95 = mb.hd95(pred, ref, SPACING)
    assert hd95(pred, ref, SPACING, pooling="pooled") == pytest.approx(medpy_hd95, rel=1e-12)
    assert medpy_hd95 == pytest.approx(np.percentile(np.concatenate([d_pr, d_rp]), 95), rel=1e-12)
    ours = hd95(pred, ref, SPACING)
    assert ours == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)), rel=1e-12)
    assert ours <= hd(pred, ref, SPACING) and medpy_hd95 <= hd(pred, ref, SPACING)
    # the stated ASSD relation: pooled = |P|/(|P|+|R|) asd(P) + |R|/(|P|+|R|) asd(R)
    w = d_pr.size / (d_pr.size + d_rp.size)
    assert assd(pred, ref, SPACING) == pytest.approx(
        w * asd(pred, ref, SPACING) + (1 - w) * asd(ref, pred, SPACING), rel=1e-12)


def test_matches_medpy_2d_voxels_and_connectivity(medpy_binary):
    mb = medpy_binary
    pred, ref = _smooth_pair((64, 72), seed=11, sigma=3.0)
    assert asd(pred, ref) == pytest.approx(mb.asd(pred, ref), rel=1e-9)
    assert assd(pred, ref) == pytest.approx(mb.assd(pred, ref), rel=1e-9)
    assert hd(pred, ref) == pytest.approx(mb.hd(pred, ref), rel=1e-12)
    assert hd95(pred, ref, pooling="pooled") == pytest.approx(mb.hd95(pred, ref), rel=1e-12)
    assert assd(pred, ref, (0.5, 1.5)) == pytest.approx(mb.assd(pred, ref, (0.5, 1.5)), rel=1e-9)
    for conn in (2,):
        assert assd(pred, ref, connectivity=conn) == pytest.approx(mb.assd(pred, ref, connectivity=conn), rel=1e-9)
        assert hd(pred, ref, connectivity=conn) == pytest.approx(mb.hd(pred, ref, connectivity=conn), rel=1e-12)
    p3, r3 = _smooth_pair((20, 24, 16), seed=12)
    assert assd(p3, r3, SPACING, connectivity=3) == pytest.approx(
        mb.assd(p3, r3, SPACING, connectivity=3), rel=1e-9)


def test_medpy_relation_on_hand_case(medpy_binary):
    mb = medpy_binary
    pred, ref = _unequal_surfaces_case()
    assert mb.hd95(pred, ref) == 0.0 == hd95(pred, ref, pooling="pooled")
    assert hd95(pred, ref) == pytest.approx(1.4)
    # both empty: medpy's dc divides numpy integers, so it gives NaN (its ZeroDivisionError -> 1.0 branch is
    # never reached); ours is NaN by definition
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert math.isnan(mb.dc(np.zeros(3, bool), np.zeros(3, bool)))
    assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_label_map_report_matches_medpy(medpy_binary):
    mb = medpy_binary
    pred, ref = _label_pair((30, 34, 22), seed=5)
    labels = {"x": 1, "y": 2, "z": 5}
    rep = segmentation_metrics(pred, ref, labels, SPACING)
    for name, k in labels.items():
        p, r = pred == k, ref == k
        assert rep["dice"][name] == pytest.approx(mb.dc(p, r), abs=1e-12)
        assert rep["asd"][name] == pytest.approx(mb.asd(p, r, SPACING), rel=1e-9)
        assert rep["assd"][name] == pytest.approx(mb.assd(p, r, SPACING), rel=1e-9)
        assert rep["hd"][name] == pytest.approx(mb.hd(p, r, SPACING), rel=1e-12)
    pooled = segmentation_metrics(pred, ref, labels, SPACING, metrics=("hd95",), hd95_pooling="pooled")
    for name, k in labels.items():
        assert pooled["hd95"][name] == pytest.approx(mb.hd95(pred == k, ref == k, SPACING), rel=1e-12)


# ------------------------------------------------------------------------------------------------ MONAI


@pytest.fixture(scope="module")
def monai_metrics():
    pytest.importorskip("monai")
    import monai.metrics as mm

    return mm


def _t(mask):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)[None, None])


# MONAI returns float32: compare to float32 precision
_F32 = dict(rel=2e-6, abs=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", [0, 3])
def test_matches_monai_3d_anisotropic(monai_metrics, seed):
    mm = monai_metrics
    pred, ref = _smooth_pair((36, 40, 24), seed)
    P, R = _t(pred), _t(ref)
    kw = dict(include_background=True, spacing=SPACING)
    assert dice(pred, ref) == pytest.approx(float(mm.compute_dice(P, R, include_background=True)), **_F32)
    assert asd(pred, ref, SPACING) == pytest.approx(
        float(mm.compute_average_surface_distance(P, R, symmetric=False, **kw)), **_F32)
    assert assd(pred, ref, SPACING) == pytest.approx(
        float(mm.compute_average_surface_distance(P, R, symmetric=True, **kw)), **_F32)
    assert hd(pred, ref, SPACING) == pytest.approx(float(mm.compute_hausdorff_distance(P, R, **kw)), **_F32)
    assert hd95(pred, ref, SPACING) == pytest.approx(
        float(mm.compute_hausdorff_distance(P, R, percentile=95, **kw)), **_F32)
    d_pr, _ = surface_distances(pred, ref, SPACING)
    assert float(np.percentile(d_pr, 95)) == pytest.approx(
        float(mm.compute_hausdorff_distance(P, R, percentile=95, directed=True, **kw)), **_F32)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_monai_2d_voxels_and_hand_case(monai_metrics):
    mm = monai_metrics
    pred, ref = _smooth_pair((64, 72), seed=21, sigma=3.0)
    P, R = _t(pred), _t(ref)
    kw = dict(include_background=True)
    assert assd(pred, ref) == pytest.approx(float(mm.compute_average_surface_distance(P, R, symmetric=True, **kw)),
                                            **_F32)
    assert hd95(pred, ref) == pytest.approx(float(mm.compute_hausdorff_distance(P, R, percentile=95, **kw)), **_F32)
    assert hd(pred, ref) == pytest.approx(float(mm.compute_hausdorff_distance(P, R, **kw)), **_F32)
    a, b = _unequal_surfaces_case()
    A, B = _t(a), _t(b)
    # MONAI: max of directed percentiles (= ours, 1.4); medpy pooled gives 0 on the same case
    assert float(mm.compute_hausdorff_distance(A, B, percentile=95, **kw)) == pytest.approx(1.4, **_F32)
    assert float(mm.compute_average_surface_distance(A, B, symmetric=True, **kw)) == pytest.approx(7 / 33, **_F32)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_monai_relation_for_empty_reference(monai_metrics):
    mm = monai_metrics
    m = np.zeros((6, 6), bool)
    m[1:3, 1:4] = True
    z = np.zeros_like(m)
    # ref empty, pred not: MONAI's compute_dice(ignore_empty=True) gives NaN, ours 0 (a defined ratio)
    assert math.isnan(float(mm.compute_dice(_t(m), _t(z), include_background=True)))
    assert dice(m, z) == 0.0
    # both empty: NaN for both
    assert math.isnan(float(mm.compute_dice(_t(z), _t(z), include_background=True)))
    assert math.isnan(dice(z, z))


# -------------------------------------------------------------------------------------- classification


def _pairwise_auc(y, s):
    y, s = np.asarray(y), np.asarray(s, float)
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_auc_hand_values_and_ties():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([1, 0], [0.9, 0.1]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    y = [0, 1, 1, 0, 1, 0, 0, 1, 1]
    s = [0.2, 0.2, 0.7, 0.7, 0.7, 0.1, 0.5, 0.9, 0.5]
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s))
    rng = np.random.default_rng(0)
    for _ in range(5):
        yy = rng.integers(0, 2, 200)
        ss = np.round(rng.normal(size=200) + yy, 1)  # many ties
        assert auc(yy, ss) == pytest.approx(_pairwise_auc(yy, ss), abs=1e-12)


def test_confusion_and_metrics_hand_values():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.6, 0.3, 0.6, 0.2, 0.1, 0.5, 0.5]
    c = confusion_counts(y, s, 0.5)  # score >= 0.5 is positive
    assert c == {"tp": 3, "fp": 2, "tn": 2, "fn": 1}
    r = classification_metrics(y, s, 0.5)
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(2 / 4)
    assert r["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert r["auc"] == pytest.approx(_pairwise_auc(y, s))
    assert r["threshold"] == 0.5 and r["n"] == 8 and r["n_pos"] == 4 and r["nan_reasons"] == {}


def test_degenerate_classification_cases_give_nan_with_reason():
    r = classification_metrics([1, 1, 1], [0.2, 0.6, 0.9], 0.5)
    assert math.isnan(r["auc"]) and "one class" in r["nan_reasons"]["auc"]
    assert math.isnan(r["specificity"]) and "specificity" in r["nan_reasons"]
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(2 / 3)
    r0 = classification_metrics([0, 0], [0.1, 0.2], 0.5)
    assert math.isnan(r0["sensitivity"]) and math.isnan(r0["f1"]) and r0["specificity"] == 1.0
    assert "f1" in r0["nan_reasons"]
    assert math.isnan(auc([0, 0, 0], [0.1, 0.2, 0.3]))
    e = classification_metrics([], [], 0.5)
    assert all(math.isnan(e[k]) for k in ("auc", "accuracy", "sensitivity", "specificity", "f1"))
    bad = classification_metrics([0, 1], [0.3, float("nan")], 0.5)
    assert math.isnan(bad["auc"]) and bad["nan_reasons"]["accuracy"] == "non-finite scores"
    assert math.isnan(youden_threshold([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(youden_threshold([0, 1, 1], [0.5, 0.5, 0.5]))
    d = youden_threshold([0, 0], [0.1, 0.3], return_details=True)
    assert math.isnan(d["threshold"]) and "one class" in d["reason"]
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError):
        classification_metrics([0, 1, 1], [0.1, 0.2], 0.5)


def test_youden_threshold_chosen_on_validation_and_applied_unchanged_to_test():
    # validation: cuts 0.30|0.35 and 0.35..0.60|0.70... both reach J = 0.75
    y_val = [0, 0, 0, 1, 0, 1, 1, 1]
    s_val = [0.10, 0.20, 0.30, 0.35, 0.60, 0.70, 0.80, 0.90]
    det = youden_threshold(y_val, s_val, return_details=True)
    # brute force over all cuts: J per cut between consecutive sorted scores
    srt = np.sort(s_val)
    js = []
    for lo, hi in zip(srt[:-1], srt[1:]):
        t = (lo + hi) / 2
        c = confusion_counts(y_val, s_val, t)
        js.append((c["tp"] / 4 + c["tn"] / 4 - 1, t))
    best_j = max(j for j, _ in js)
    assert det["j"] == pytest.approx(best_j)
    # ties in J (0.325 and 0.65 both give J = 0.75) -> the lower threshold (higher sensitivity)
    assert det["threshold"] == pytest.approx(0.325)
    assert det["sensitivity"] == 1.0 and det["specificity"] == 0.75
    assert youden_threshold(y_val, s_val, placement="upper") == 0.35
    t_val = youden_threshold(y_val, s_val)

    # test data whose own Youden optimum is elsewhere (test scores shifted upwards)
    y_test = [0, 0, 0, 0, 1, 1, 1, 1]
    s_test = [0.30, 0.40, 0.50, 0.55, 0.60, 0.70, 0.75, 0.95]
    t_test_own = youden_threshold(y_test, s_test)
    assert t_test_own != pytest.approx(t_val)
    r = classification_metrics(y_test, s_test, t_val)
    assert r["threshold"] == t_val  # used unchanged
    c = confusion_counts(y_test, s_test, t_val)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (4, 3, 1, 0)  # only 0.30 < 0.325
    assert r["sensitivity"] == 1.0 and r["specificity"] == 0.25 and r["accuracy"] == 5 / 8
    # what the (forbidden) test-set threshold would have reported instead: perfect separation
    cheat = classification_metrics(y_test, s_test, t_test_own)
    assert cheat["accuracy"] == 1.0 and cheat["accuracy"] != r["accuracy"]
    # AUC does not depend on the threshold
    assert r["auc"] == cheat["auc"] == 1.0


def test_youden_midpoint_is_strictly_between_scores():
    y = [0, 1]
    s = [1.0, np.nextafter(1.0, 2.0)]
    t = youden_threshold(y, s)
    assert s[0] < t <= s[1]
    assert confusion_counts(y, s, t) == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}


def test_classification_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y_val, y_test = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    s_val = np.round(rng.normal(size=300) + 1.2 * y_val, 2)
    s_test = np.round(rng.normal(size=300) + 1.2 * y_test, 2)
    assert auc(y_test, s_test) == pytest.approx(skm.roc_auc_score(y_test, s_test), abs=1e-12)
    fpr, tpr, thr = skm.roc_curve(y_val, s_val)
    j = tpr - fpr
    assert youden_threshold(y_val, s_val, return_details=True)["j"] == pytest.approx(j.max(), abs=1e-12)
    t = youden_threshold(y_val, s_val)
    r = classification_metrics(y_test, s_test, t)
    yp = (s_test >= t).astype(int)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y_test, yp))
    assert r["sensitivity"] == pytest.approx(skm.recall_score(y_test, yp))
    assert r["specificity"] == pytest.approx(skm.recall_score(y_test, yp, pos_label=0))
    assert r["f1"] == pytest.approx(skm.f1_score(y_test, yp))
