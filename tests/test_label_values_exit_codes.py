"""Issue 20 items 1 and 3: label values that are not the task's ids are refused (no silent all-background labels),
``sites.<s>.label_map`` maps an export's values, and exit codes tell "nothing usable" (3) and label errors (4) from
success. Every test runs the real CLI (``siteadapt.cli.main``) on tiny sites built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from siteadapt.cli import main
from siteadapt.errors import EmptyReferenceError, LabelValuesError, NothingUsableError, SiteadaptError

REPO = Path(__file__).resolve().parents[1]
PHI = ("Doe^Jane_MRN99887766", "Smith_John_4711", "MRN99887766", "Doe^Jane")


@pytest.fixture(autouse=True)
def _env(deid_key, monkeypatch):
    monkeypatch.setenv("SITEADAPT_TRACKING", "off")
    monkeypatch.delenv("SITEADAPT_PROFILE", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)


def _params(tmp_path: Path, sites: dict) -> Path:
    """The repo's params.yaml with only the cardiac (ids 1-4) and chestxray (ids 1, 2) tasks, no directions, and
    ``sites`` as given; every output path under tmp_path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp_path / "out" / k) for k in raw["paths"]}
    raw["tasks"] = {t: {**raw["tasks"][t], "directions": [], "methods": []} for t in ("cardiac", "chestxray")}
    raw["sites"] = sites
    raw.pop("pipeline", None)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _cxr_site(root: Path, n: int, mask_values: tuple[int, ...], size: int = 24) -> tuple[Path, Path]:
    """``n`` PNG chest images named like patients, with masks whose two lungs hold ``mask_values`` (0 elsewhere)."""
    img_dir, lab_dir = root / "images", root / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        stem = f"Doe^Jane_MRN9988776{i}"
        img = (rng.random((size, size)) * 200).astype(np.uint8)
        Image.fromarray(img, mode="L").save(img_dir / f"{stem}.png")
        lab = np.zeros((size, size), np.uint8)
        lab[4:20, 2:10] = mask_values[0]
        lab[4:20, 14:22] = mask_values[-1]
        Image.fromarray(lab, mode="L").save(lab_dir / f"{stem}.png")
    return img_dir, lab_dir


def _run(capsys, params: Path, *argv: str) -> tuple[int, str]:
    rc = main(["--params", str(params), *argv])
    return rc, capsys.readouterr().err


def _no_phi(text: str) -> None:
    for name in PHI:
        assert name not in text


def test_exit_code_scheme():
    assert SiteadaptError("x").exit_code == 2
    assert NothingUsableError("x").exit_code == 3
    assert LabelValuesError("x").exit_code == 4 and EmptyReferenceError("x").exit_code == 4


def test_png_masks_0_127_254_refused_then_mapped(tmp_path, capsys):
    img, lab = _cxr_site(tmp_path / "raw", 5, (127, 254))
    site = {"task": "chestxray", "images": str(img), "labels": str(lab)}
    p = _params(tmp_path, {"cxr": site})
    out = tmp_path / "out" / "ingested" / "cxr"

    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 4
    assert "5 of 5 label maps" in err
    assert "values found [0, 127, 254]" in err and "unexpected [127, 254]" in err and "expected [0, 1, 2]" in err
    assert "#1 (item " in err and "#5 (item " in err and "sites.cxr.label_map: {127: ID, 254: ID}" in err
    _no_phi(err)
    assert not (out / "manifest.json").exists() and not (out / "images").exists()  # nothing written

    # a partial map still refuses the value it leaves out
    p = _params(tmp_path, {"cxr": {**site, "label_map": {127: 1}}})
    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 4 and "unexpected [254]" in err and "label_map {127: 1} applied" in err

    p = _params(tmp_path, {"cxr": {**site, "label_map": {127: 1, 254: 2}}})
    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["items"]) == 5 and all(it["label_values"] == [1, 2] for it in man["items"])
    lab0 = np.asanyarray(nib.load(str(out / man["items"][0]["label"])).dataobj)
    assert sorted(np.unique(lab0).tolist()) == [0, 1, 2] and int((lab0 == 1).sum()) == 16 * 8
    _no_phi(json.dumps(man))

    # a changed label_map re-reads every label (fingerprint), so the written labels follow the map
    p = _params(tmp_path, {"cxr": {**site, "label_map": {127: 2, 254: 1}}})
    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 0, err
    man2 = json.loads((out / "manifest.json").read_text())
    by_id = {it["id"]: it for it in man2["items"]}
    swapped = np.asanyarray(nib.load(str(out / by_id[man["items"][0]["id"]]["label"])).dataobj)
    assert np.array_equal(swapped == 2, lab0 == 1) and np.array_equal(swapped == 1, lab0 == 2)

    rc, err = _run(capsys, p, "preprocess", "--site", "cxr")
    assert rc == 0, err
    labs = np.load(tmp_path / "out" / "prepared" / "cxr" / "train_labels.npz")["labels"]
    assert set(np.unique(labs).tolist()) == {0, 1, 2}


def test_nifti_label_value_7_refused_for_ids_1_to_4(tmp_path, capsys):
    img_dir, lab_dir = tmp_path / "raw" / "images", tmp_path / "raw" / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    for i, bad in enumerate((False, True, False)):
        stem = f"Smith_John_471{i}"
        vol = np.arange(8 * 8 * 6, dtype=np.int16).reshape(8, 8, 6)
        nib.save(nib.Nifti1Image(vol, aff), img_dir / f"{stem}.nii.gz")
        lab = np.zeros((8, 8, 6), np.uint8)
        lab[2:5, 2:5, 1:4] = 2
        if bad:
            lab[5:7, 5:7, 2:4] = 7
        nib.save(nib.Nifti1Image(lab, aff), lab_dir / f"{stem}.nii.gz")
    site = {"task": "cardiac", "images": str(img_dir), "labels": str(lab_dir), "modality": "MR"}
    p = _params(tmp_path, {"mr": site})
    rc, err = _run(capsys, p, "ingest", "--site", "mr")
    assert rc == 4
    assert "1 of 3 label maps" in err and "values found [0, 2, 7]" in err and "unexpected [7]" in err
    assert "expected [0, 1, 2, 3, 4]" in err and "#2 (item " in err
    _no_phi(err)
    assert not (tmp_path / "out" / "ingested" / "mr" / "manifest.json").exists()

    # mapping to 0 (drop the value) is allowed; the ingested label then holds only the task's ids
    p = _params(tmp_path, {"mr": {**site, "label_map": {7: 0}}})
    rc, err = _run(capsys, p, "ingest", "--site", "mr")
    assert rc == 0, err
    man = json.loads((tmp_path / "out" / "ingested" / "mr" / "manifest.json").read_text())
    assert [it["label_values"] for it in man["items"]] == [[2], [2], [2]]


def test_label_map_targets_validated_at_load(tmp_path, capsys):
    img, lab = _cxr_site(tmp_path / "raw", 3, (255, 255))
    p = _params(tmp_path, {"cxr": {"task": "chestxray", "images": str(img), "labels": str(lab),
                                   "label_map": {255: 9}}})
    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 2
    assert "sites.cxr.label_map.255: maps to 9, which is not one of the ids of task 'chestxray': [0, 1, 2]" in err


def test_nothing_usable_exits_3_and_preprocess_names_refusals(tmp_path, capsys):
    img_dir = tmp_path / "raw" / "images"
    img_dir.mkdir(parents=True)
    for i in range(3):
        (img_dir / f"Doe^Jane_MRN9988776{i}.png").write_bytes(b"not a png at all " * 4)
    (img_dir / "Doe^Jane_notes.txt").write_text("MRN99887766")
    p = _params(tmp_path, {"cxr": {"task": "chestxray", "images": str(img_dir)}})
    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 3
    assert "nothing usable: all 4 inputs were refused" in err and "3 x input: unreadable image file" in err
    _no_phi(err)
    man = json.loads((tmp_path / "out" / "ingested" / "cxr" / "manifest.json").read_text())
    assert man["items"] == [] and len(man["rejected"]) == 4  # written (atomically) so the user can read why
    leftovers = [q.name for q in (tmp_path / "out" / "ingested" / "cxr").rglob("*") if q.is_file()]
    assert sorted(leftovers) == ["manifest.json"]

    rc, err = _run(capsys, p, "preprocess", "--site", "cxr")
    assert rc == 3
    assert "ingest refused all 4 inputs" in err and "3 x input: unreadable image file" in err
    _no_phi(err)
    assert not (tmp_path / "out" / "prepared" / "cxr").exists()


def test_preprocess_refuses_labels_ingested_without_value_check(tmp_path, capsys):
    """A manifest written before ingest checked values (or before ``structures`` changed) is refused too."""
    from siteadapt.steps.ingest import ingest

    img, lab = _cxr_site(tmp_path / "raw", 5, (127, 254))
    p = _params(tmp_path, {"cxr": {"task": "chestxray", "images": str(img), "labels": str(lab)}})
    ingest(img, "cxr", tmp_path / "out" / "ingested", labels=lab)  # no label_ids: the old behaviour
    rc, err = _run(capsys, p, "preprocess", "--site", "cxr")
    assert rc == 4
    assert "5 of 5 ingested label maps" in err and "values found [127, 254]" in err and "expected [0, 1, 2]" in err
    _no_phi(err)
    assert not (tmp_path / "out" / "prepared" / "cxr").exists()
    # unchanged inputs are not skipped when their recorded label values are not the task's ids: ingest refuses them
    rc, err = _run(capsys, p, "ingest", "--site", "cxr")
    assert rc == 4 and "5 of 5 label maps" in err and "unexpected [127, 254]" in err


def test_evaluate_fails_when_references_hold_no_structure(tmp_path, capsys):
    img, lab = _cxr_site(tmp_path / "raw", 6, (0, 0))  # valid values, but every mask is background
    p = _params(tmp_path, {"cxr": {"task": "chestxray", "images": str(img), "labels": str(lab),
                                   "pixel_spacing_mm": 0.5}})
    assert _run(capsys, p, "ingest", "--site", "cxr")[0] == 0
    assert _run(capsys, p, "preprocess", "--site", "cxr")[0] == 0
    subjects = json.loads((tmp_path / "out" / "prepared" / "cxr" / "subjects.json").read_text())["subjects"]
    test = [r for r in subjects if r["split"] == "test"]
    assert test
    pred_dir = tmp_path / "out" / "predictions" / "cxr" / "noadapt"
    pred_dir.mkdir(parents=True)
    for r in test:
        pred = np.zeros(r["orig_shape"], np.uint8)
        pred[4:20, 2:10] = 1
        nib.save(nib.Nifti1Image(pred, np.asarray(r["orig_affine"])), pred_dir / f"{r['id']}.nii.gz")
    rc, err = _run(capsys, p, "evaluate", "--site", "cxr", "--method", "noadapt")
    assert rc == 4
    assert f"none of the {len(test)} labelled test subjects' reference label maps holds a voxel" in err
    assert "nan" not in err.lower()
    assert not (tmp_path / "out" / "metrics" / "chestxray" / "cxr" / "noadapt.json").exists()
    assert not (tmp_path / "out" / "reports").exists()  # no overlay drawn either


def test_kubeflow_ingest_step_checks_values_and_raises(tmp_path, monkeypatch):
    """The function the Kubeflow ingest component calls (no try/except around it there, so the component's process
    exits non-zero): label values are checked with the task's ids, and a site with nothing usable raises."""
    from siteadapt.kfp import runtime as R
    from siteadapt.kfp.local import tiny_params

    monkeypatch.chdir(tmp_path)
    _cxr_site(tmp_path / "loc", 4, (127, 254))
    job = R.Job(task="chestxray", source_site="cxr_a", site="new_site", params_yaml=tiny_params(REPO / "params.yaml"),
                profile="tiny", modality="DX", pixel_spacing_mm=0.5)
    with pytest.raises(LabelValuesError, match=r"unexpected \[127, 254\], expected \[0, 1, 2\]") as e:
        R.run_ingest(job, str(tmp_path / "loc"), tmp_path / "art")
    _no_phi(str(e.value))
    (tmp_path / "bad" / "images").mkdir(parents=True)
    (tmp_path / "bad" / "images" / "Doe^Jane_MRN99887766.png").write_bytes(b"garbage")
    with pytest.raises(NothingUsableError, match="1 x input: unreadable image file") as e:
        R.run_ingest(job, str(tmp_path / "bad"), tmp_path / "art2")
    _no_phi(str(e.value))
