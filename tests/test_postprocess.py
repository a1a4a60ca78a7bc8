"""Post-processing: largest connected component per structure and hole filling into background only."""

from __future__ import annotations

import numpy as np
import pytest

from siteadapt.postprocess import postprocess

LABELS = {"lung_r": 1, "lung_l": 2}


def _two_lungs_2d():
    a = np.zeros((20, 24), np.uint8)
    a[2:16, 2:10] = 1
    a[2:16, 13:21] = 2
    return a


def test_largest_component_per_structure_2d():
    a = _two_lungs_2d()
    a[18, 2:4] = 1  # small island of structure 1
    a[0, 22] = 2  # single-pixel island of structure 2
    out = postprocess(a, LABELS, fill_holes=False)
    expected = _two_lungs_2d()
    np.testing.assert_array_equal(out, expected)
    assert a[18, 2] == 1, "the input must not be modified"


def test_largest_component_3d_and_connectivity():
    a = np.zeros((8, 8, 8), np.int32)
    a[1:4, 1:4, 1:4] = 3  # 27 voxels
    a[4, 4, 4] = 3  # touches the cube only through a corner
    a[6:8, 6:8, 0:2] = 3  # 8 voxels, separate
    face = postprocess(a, {"s": 3}, fill_holes=False)  # connectivity=1: corner voxel is its own component
    assert face[4, 4, 4] == 0 and face[6, 6, 0] == 0 and face.sum() == 27 * 3
    full = postprocess(a, {"s": 3}, fill_holes=False, connectivity=3)
    assert full[4, 4, 4] == 3 and full[6, 6, 0] == 0
    assert face.dtype == a.dtype


def test_equal_sized_components_keep_the_first_in_c_order():
    a = np.zeros((6, 10), np.uint8)
    a[1:3, 6:8] = 1
    a[3:5, 1:3] = 1
    out = postprocess(a, {"s": 1}, fill_holes=False)
    assert out[1, 6] == 1 and out[3, 1] == 0


def test_fill_holes_only_into_background_2d():
    a = _two_lungs_2d()
    a[5:8, 4:7] = 0  # hole in structure 1
    a[10, 15] = 0  # hole in structure 2
    b = a.copy()
    b[12, 5] = 2  # a pixel of structure 2 inside structure 1: never overwritten
    out = postprocess(b, LABELS, largest_cc=False)
    assert np.all(out[5:8, 4:7] == 1) and out[10, 15] == 2
    assert out[12, 5] == 2
    only_left = postprocess(a, LABELS, largest_cc=False, fill_holes=["lung_l"])
    assert np.all(only_left[5:8, 4:7] == 0) and only_left[10, 15] == 2


def test_pocket_touching_border_or_two_structures_is_not_filled():
    a = np.zeros((10, 12), np.uint8)
    a[0:6, 0:6] = 1
    a[0:2, 2:4] = 0  # open to the array border: not a hole
    a[3, 5] = 0  # pocket between structure 1 and structure 2
    a[2:5, 6:9] = 2
    out = postprocess(a, {"a": 1, "b": 2}, largest_cc=False)
    assert np.all(out[0:2, 2:4] == 0)
    assert out[3, 5] == 0
    # cavity inside a ring (e.g. LV cavity in the myocardium), with a background gap between them
    r = np.zeros((11, 11), np.uint8)
    r[1:10, 1:10] = 1
    r[3:8, 3:8] = 0
    r[4:7, 4:7] = 3
    out = postprocess(r, {"myo": 1, "lvc": 3}, largest_cc=False)
    np.testing.assert_array_equal(out, r)


def test_fill_holes_3d_vs_slicewise():
    v = np.zeros((7, 9, 9), np.uint8)
    v[1:6, 1:8, 1:8] = 1
    v[2:5, 3:6, 3:6] = 0  # enclosed cavity in 3D
    out3 = postprocess(v, {"s": 1}, largest_cc=False)
    assert np.all(out3[1:6, 1:8, 1:8] == 1)
    v[0:3, 4, 4] = 0  # a channel from the cavity to the outside: no longer a hole
    assert np.all(postprocess(v, {"s": 1}, largest_cc=False)[2:5, 3:6, 3:6] == 0)
    # a tube open at both ends along axis 0: not a 3D hole, but a hole in every axial slice
    t = np.zeros((6, 9, 9), np.uint8)
    t[:, 2:7, 2:7] = 1
    t[:, 4, 4] = 0
    assert postprocess(t, {"s": 1}, largest_cc=False)[:, 4, 4].tolist() == [0] * 6
    assert postprocess(t, {"s": 1}, largest_cc=False, hole_axis=0)[:, 4, 4].tolist() == [1] * 6
    # slice-wise along another axis: the tube is open in those slices
    assert postprocess(t, {"s": 1}, largest_cc=False, hole_axis=1)[:, 4, 4].tolist() == [0] * 6


def test_largest_cc_then_fill_removed_island_becomes_background_first():
    a = np.zeros((12, 12), np.uint8)
    a[1:11, 1:11] = 1
    a[4:8, 4:8] = 0
    a[5, 5] = 2  # island of 2 inside the hole of 1
    a[0, 11] = 2  # both components of 2 are single pixels -> the first in C order, (0, 11), is kept
    out = postprocess(a, {"a": 1, "b": 2})
    assert out[0, 11] == 2
    assert np.all(out[4:8, 4:8] == 1), "after removing the island, the pocket is enclosed by 1 only"


def test_invalid_arguments():
    a = _two_lungs_2d()
    with pytest.raises(ValueError):
        postprocess(a + 0.5, LABELS)
    f = a.astype(np.float32)
    f[18, 2] = 1
    out = postprocess(f, LABELS)
    assert out.dtype == np.float32 and out[18, 2] == 0 and f[18, 2] == 1
    with pytest.raises(ValueError):
        postprocess(a, LABELS, fill_holes=["heart"])
    with pytest.raises(ValueError):
        postprocess(a, LABELS, hole_axis=0)  # slice-wise needs 3D
    with pytest.raises(ValueError):
        postprocess(a, LABELS, connectivity=3)
    np.testing.assert_array_equal(postprocess(a, LABELS, largest_cc=False, fill_holes=False), a)
