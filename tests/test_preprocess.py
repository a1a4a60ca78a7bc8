"""Preprocess: crop grids, normalization to [-1, 1] from training statistics, slicing, split, map-back, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from siteadapt.data.geometry import to_original, voxel_to_world
from siteadapt.steps.ingest import ingest
from siteadapt.steps.preprocess import preprocess, split_subjects

from helpers.sites import heart_xr_settings, write_volume_site


def _load_all(d: Path):
    return {p.name: dict(np.load(p)) for p in sorted(d.glob("*.npz"))}


def test_shapes_range_split_and_rules(prepared_env):
    s = prepared_env
    res = preprocess(s, "src")
    d = res["out_dir"]
    subj = json.loads((d / "subjects.json").read_text())
    splits = [r["split"] for r in subj["subjects"]]
    assert splits.count("test") == 1 and splits.count("val") == 1 and splits.count("train") == 4
    tr = np.load(d / "train.npz")
    assert tr["images"].shape[1:] == (24, 24) and tr["images"].shape[0] == 4 * 12  # 48 mm / 4 mm slices
    assert tr["images"].min() == pytest.approx(-1) and tr["images"].max() == pytest.approx(1)
    assert np.load(d / "train_labels.npz")["labels"].shape == tr["images"].shape
    assert all(r["crop_rule"] == "labels" for r in subj["subjects"])  # src is never a target
    res_t = preprocess(s, "tgt")
    subj_t = json.loads((res_t["out_dir"] / "subjects.json").read_text())
    assert all(r["crop_rule"] == "foreground" for r in subj_t["subjects"])
    norm = json.loads((res_t["out_dir"] / "norm.json").read_text())
    assert norm["ct"]["clip_low"] > -1100 and norm["ct"]["clip_high"] < 700


def test_target_inputs_do_not_depend_on_its_labels(prepared_env):
    s = prepared_env
    a = _load_all(preprocess(s, "tgt")["out_dir"])
    lab_dir = s.paths.ingested / "tgt" / "labels"
    for p in lab_dir.glob("*.nii.gz"):  # scramble the target's labels
        im = nib.load(p)
        nib.save(nib.Nifti1Image(np.roll(np.asanyarray(im.dataobj), 7, axis=0), im.affine), p)
    b = _load_all(preprocess(s, "tgt")["out_dir"])
    for split in ("train", "val", "test"):
        assert np.array_equal(a[f"{split}.npz"]["images"], b[f"{split}.npz"]["images"])


def test_deterministic_for_a_seed(prepared_env, tmp_path):
    s = prepared_env
    a = _load_all(preprocess(s, "src")["out_dir"])
    b = _load_all(preprocess(s, "src")["out_dir"])
    for k in a:
        for kk in a[k]:
            assert np.array_equal(a[k][kk], b[k][kk])
    s2 = s.model_copy(update={"seed": 5})
    c = split_subjects([f"sub-{i}" for i in range(20)], 5, "src", 0.2, 0.2)
    d = split_subjects([f"sub-{i}" for i in range(20)], 0, "src", 0.2, 0.2)
    assert c != d and list(c.values()).count("test") == 4
    assert split_subjects([f"sub-{i}" for i in range(20)][::-1], 0, "src", 0.2, 0.2) == d
    assert s2.seed == 5


def test_map_back_to_original_grid(prepared_env):
    s = prepared_env
    d = preprocess(s, "src")["out_dir"]
    subj = json.loads((d / "subjects.json").read_text())["subjects"]
    r = next(r for r in subj if r["split"] == "train")
    labs = np.load(d / "train_labels.npz")["labels"]
    start, n = r["rows"]
    grid_lab = np.moveaxis(labs[start:start + n], 0, r["slice_axis"])
    back = to_original(grid_lab, np.array(r["grid_affine"]), r["orig_shape"], np.array(r["orig_affine"]), ids=[1, 2])
    orig = np.asanyarray(nib.load(s.paths.ingested / r["label"]).dataobj)
    for k in (1, 2):
        inter = np.logical_and(back == k, orig == k).sum()
        dice = 2 * inter / ((back == k).sum() + (orig == k).sum())
        assert dice > 0.8, (k, dice)  # 2 mm x 4 mm grid and back: boundary voxels differ


def test_2d_task(prepared_env):
    s = prepared_env
    d = preprocess(s, "xa")["out_dir"]
    tr = np.load(d / "train.npz")
    assert tr["images"].shape[1:] == (24, 24)
    subj = json.loads((d / "subjects.json").read_text())["subjects"]
    r = subj[0]
    split_labels = np.load(d / f"{r['split']}_labels.npz")["labels"]
    lab = split_labels[r["rows"][0]]
    back = to_original(lab[..., None], np.array(r["grid_affine"]), r["orig_shape"], np.array(r["orig_affine"]),
                       ids=[1, 2])
    orig = np.asanyarray(nib.load(s.paths.ingested / r["label"]).dataobj)
    assert back.shape == orig.shape
    assert (back == orig).mean() > 0.9


def test_split_does_not_depend_on_the_deid_key(tmp_path, monkeypatch):
    """Two checkouts have two de-identification keys (other pseudonymous ids): the same data must get the same
    subject split and the same shards (slice order included: it decides the seeded sampler's batches), so a table is
    reproducible from a fresh clone."""
    write_volume_site(tmp_path / "raw/src", 10, "MR", 0)
    splits = []
    for n, key in enumerate(("a" * 64, "b" * 64)):
        monkeypatch.setenv("SITEADAPT_DEID_KEY", key)
        s = heart_xr_settings(tmp_path / f"co{n}")
        s = s.model_copy(update={"sites": {**s.sites, "src": s.sites["src"].model_copy(
            update={"images": tmp_path / "raw/src/images", "labels": tmp_path / "raw/src/labels"})}})
        res = ingest(tmp_path / "raw/src/images", "src", s.paths.ingested, labels=tmp_path / "raw/src/labels",
                     modality="MR")
        items = json.loads((res.out_dir / "manifest.json").read_text())["items"]
        content = {it["id"]: it["content_sha256"] for it in items}
        subj = json.loads((preprocess(s, "src")["out_dir"] / "subjects.json").read_text())["subjects"]
        splits.append(({content[r["id"]]: r["split"] for r in subj}, set(content),
                       _load_all(s.paths.prepared / "src")))
    (a, ids_a, arr_a), (b, ids_b, arr_b) = splits
    assert not ids_a & ids_b  # other keys, other ids
    assert a == b and sorted(a.values()).count("test") == 2
    for f in arr_a:
        for k in arr_a[f]:
            assert np.array_equal(arr_a[f][k], arr_b[f][k]), (f, k)


def test_site_roi_offset_moves_that_sites_label_free_boxes(prepared_env):
    """sites.<site>.roi_offset_mm replaces the task's offset for that site only (sites whose scanners centre the field
    of view differently): every box centre of the site moves by exactly the offset, in world mm."""
    s = prepared_env

    def centres(site):
        subj = json.loads((preprocess(s, site)["out_dir"] / "subjects.json").read_text())["subjects"]
        out = {}
        for r in subj:
            out[r["id"]] = voxel_to_world(np.asarray(r["grid_affine"]), (np.asarray(r["grid_shape"]) - 1) / 2)
        return out

    before = centres("tgt")
    s.sites["tgt"] = s.sites["tgt"].model_copy(update={"roi_offset_mm": (6.0, 0.0, -4.0)})
    after = centres("tgt")
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_allclose(after[k] - before[k], [6.0, 0.0, -4.0], atol=1e-6)
