"""Ingest: outputs, de-identification, idempotence and bad input (small inputs made here)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from siteadapt.errors import InputError
from siteadapt.io.dicom_write import write_series
from siteadapt.steps.ingest import explain, ingest

PHI = {
    "PatientName": "QUIXOTE^ALONSO",
    "PatientID": "HSP99812734",
    "PatientBirthDate": "19470312",
    "InstitutionName": "Hospital de la Mancha",
    "AccessionNumber": "ACC55501234",
    "ReferringPhysicianName": "PANZA^SANCHO",
}


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def _phantom(shape=(24, 20, 10), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[6:14, 5:12, 3:7] = 1
    lab[14:18, 5:12, 3:7] = 2
    x[lab == 1] += 80
    return x, lab


def _affine(spacing=(1.2, 1.1, 2.5), origin=(-10.0, 20.0, 5.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


@pytest.fixture
def nifti_site(tmp_path):
    img_dir, lab_dir = tmp_path / "in" / "images", tmp_path / "in" / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i in range(3):
        x, lab = _phantom(seed=i)
        a = _affine()
        im = nib.Nifti1Image(x, a)
        im.header["descrip"] = f"{PHI['PatientName']} {PHI['PatientID']}".encode()[:79]  # PHI in a header field
        nib.save(im, img_dir / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, a), lab_dir / f"case_{i:03d}.nii.gz")
    return img_dir, lab_dir


@pytest.fixture
def dicom_site(tmp_path):
    root = tmp_path / "dcm" / "images"
    labels = tmp_path / "dcm" / "labels"
    labels.mkdir(parents=True)
    for i in range(2):
        x, lab = _phantom(seed=10 + i)
        a = _affine(origin=(-12.0, -30.0, 40.0 + i))
        phi = {**PHI, "PatientID": f"{PHI['PatientID']}{i}", "AccessionNumber": f"{PHI['AccessionNumber']}{i}",
               "StudyDate": "20240102"}
        # a folder named after the patient, as some PACS exports do
        write_series(root / f"{PHI['PatientName'].replace('^', '_')}_{i}" / "series1", np.round(x - 1024),
                     a, modality="CT", patient=phi, rescale=(1.0, -1024.0), seed=i, file_names="random")
        nib.save(nib.Nifti1Image(lab, a), labels / f"{phi['AccessionNumber']}.nii.gz")
    return root, labels


def test_nifti_ingest_outputs_and_manifest(tmp_path, nifti_site, deid_key):
    img_dir, lab_dir = nifti_site
    res = ingest(img_dir, "siteA", tmp_path / "out", labels=lab_dir, modality="MR")
    assert len(res.items) == 3 and not res.rejected
    for it in res.items:
        assert it["id"].startswith("sub-") and it["modality"] == "MR"
        assert it["shape"] == [24, 20, 10]
        assert it["spacing"] == pytest.approx([1.2, 1.1, 2.5])
        assert it["orientation"] == "RAS"
        out = nib.load(res.out_dir / it["image"])
        assert np.allclose(out.affine, _affine())
        assert out.header["descrip"].tobytes().strip(b"\x00") == b""
        assert it["label_values"] == [1, 2]
    manifest = json.loads((res.out_dir / "manifest.json").read_text())
    assert manifest["items"] == res.items


def test_ids_are_keyed_and_stable(tmp_path, nifti_site, monkeypatch):
    img_dir, lab_dir = nifti_site
    monkeypatch.setenv("SITEADAPT_DEID_KEY", "key-one-0123456789")
    a = {it["id"] for it in ingest(img_dir, "s", tmp_path / "a", labels=lab_dir).items}
    b = {it["id"] for it in ingest(img_dir, "s", tmp_path / "b", labels=lab_dir).items}
    monkeypatch.setenv("SITEADAPT_DEID_KEY", "key-two-0123456789")
    c = {it["id"] for it in ingest(img_dir, "s", tmp_path / "c", labels=lab_dir).items}
    assert a == b and a.isdisjoint(c)


def test_key_file_is_created_outside_outputs(tmp_path, nifti_site, monkeypatch):
    monkeypatch.delenv("SITEADAPT_DEID_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    img_dir, _ = nifti_site
    ingest(img_dir, "s", tmp_path / "out")
    key = tmp_path / ".siteadapt" / "deid.key"
    assert key.is_file() and oct(key.stat().st_mode)[-3:] == "600"
    monkeypatch.setenv("SITEADAPT_DEID_KEY_FILE", str(tmp_path / "out" / "k"))
    with pytest.raises(Exception, match="inside the output tree"):
        ingest(img_dir, "s", tmp_path / "out")


def test_reingest_is_noop_and_new_series_adds_only_it(tmp_path, dicom_site, deid_key):
    src, labels = dicom_site
    out = tmp_path / "out"
    first = ingest(src, "ct", out, labels=labels)
    assert len(first.written) == 2 and all(it["label"] for it in first.items)
    before = _tree_digest(out / "ct")
    again = ingest(src, "ct", out, labels=labels)
    assert again.written == [] and len(again.skipped) == 2
    assert _tree_digest(out / "ct") == before  # not a byte nor an mtime changed
    x, _ = _phantom(seed=42)
    write_series(src / "new_patient" / "s1", np.round(x - 1024), _affine(), modality="CT",
                 patient={**PHI, "PatientID": "HSP1"}, rescale=(1.0, -1024.0), seed=77)
    third = ingest(src, "ct", out, labels=labels)
    assert len(third.written) == 1 and len(third.skipped) == 2
    new = [it for it in third.items if it["id"] == third.written[0]][0]
    assert new["label"] is None  # no label for it: ingested as unlabeled


def test_no_identifier_reaches_outputs_or_logs(tmp_path, dicom_site, deid_key, caplog):
    src, labels = dicom_site
    # a non-image DICOM and a junk file make ingest mention input paths in its manifest and logs
    (src / f"{PHI['PatientName'].replace('^', '_')}_0" / "notes.txt").write_text("scanned by tech")
    caplog.set_level(logging.DEBUG, logger="siteadapt")
    res = ingest(src, "ct", tmp_path / "out", labels=labels)
    assert len(res.items) == 2 and res.rejected
    import pydicom

    uids = set()
    for f in src.rglob("*"):
        if f.is_file() and f.suffix != ".txt":
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            uids |= {ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    needles = {v for v in PHI.values()} | {PHI["PatientName"].replace("^", "_"), "ALONSO", "QUIXOTE",
                                          "1947-03-12", PHI["AccessionNumber"]} | uids
    blobs = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    # NIfTI outputs are gzipped: search the decompressed bytes too
    import gzip

    blobs += [gzip.decompress(p.read_bytes()) for p in (tmp_path / "out").rglob("*.gz")]
    blobs.append(caplog.text.encode())
    blobs += [p.name.encode() for p in (tmp_path / "out").rglob("*")]
    for needle in needles:
        for variant in {needle, needle.lower(), needle.upper()}:
            assert not any(variant.encode() in b for b in blobs), f"identifier {variant!r} leaked"


def test_png_site_with_labels(tmp_path, deid_key):
    img, lab = tmp_path / "png" / "images", tmp_path / "png" / "labels"
    img.mkdir(parents=True)
    lab.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.integers(0, 255, (40, 30), dtype=np.uint8)
        m = np.zeros((40, 30), np.uint8)
        m[5:20, 3:12] = 1
        m[5:20, 18:27] = 2
        Image.fromarray(a).save(img / f"xr{i}.png")
        Image.fromarray(m).save(lab / f"xr{i}.png")
    res = ingest(img, "cxr", tmp_path / "out", labels=lab, modality="DX", pixel_spacing_mm=0.5)
    assert len(res.items) == 3 and not res.rejected
    it = res.items[0]
    assert it["shape"] == [30, 40] and it["spacing"][:2] == pytest.approx([0.5, 0.5])
    out = np.asanyarray(nib.load(res.out_dir / it["label"]).dataobj)
    assert out.shape == (30, 40) and set(np.unique(out)) == {0, 1, 2}


def test_bad_inputs_are_named_and_rest_ingests(tmp_path, nifti_site, deid_key):
    img_dir, lab_dir = nifti_site
    before = _tree_digest(img_dir.parent)
    # NaN image
    x, lab = _phantom(seed=5)
    x[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(x, _affine()), img_dir / "nan_case.nii.gz")
    # truncated NIfTI
    good = (img_dir / "case_000.nii.gz").read_bytes()
    (img_dir / "trunc.nii.gz").write_bytes(good[: len(good) // 3])
    # label with the wrong shape, label with the wrong geometry
    x, lab = _phantom(seed=6)
    nib.save(nib.Nifti1Image(x, _affine()), img_dir / "shape_case.nii.gz")
    nib.save(nib.Nifti1Image(lab[:-2], _affine()), lab_dir / "shape_case.nii.gz")
    nib.save(nib.Nifti1Image(x, _affine()), img_dir / "geom_case.nii.gz")
    nib.save(nib.Nifti1Image(lab, _affine(origin=(0.0, 0.0, 0.0))), lab_dir / "geom_case.nii.gz")
    # an orphan label
    nib.save(nib.Nifti1Image(lab, _affine()), lab_dir / "nobody.nii.gz")
    before = _tree_digest(img_dir.parent)

    res = ingest(img_dir, "s", tmp_path / "out", labels=lab_dir)
    # the manifest names refused files by keyed reference; explain() maps them back locally (input/..., labels/...)
    reasons = {r["path"].split("/", 1)[1]: r["reason"] for r in explain(img_dir, "s", tmp_path / "out", labels=lab_dir)}
    assert "NaN" in reasons["nan_case.nii.gz"]
    assert "unreadable NIfTI" in reasons["trunc.nii.gz"]
    assert "label shape" in reasons["shape_case.nii.gz"]
    assert "label geometry differs" in reasons["geom_case.nii.gz"]
    assert "matches no image" in reasons["nobody.nii.gz"]
    # the good cases and the images with bad labels are in; the broken images are not
    assert len(res.items) == 5
    assert sum(1 for it in res.items if it["label"]) == 3
    assert _tree_digest(img_dir.parent) == before  # input untouched
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]


def test_non_image_and_truncated_dicom(tmp_path, dicom_site, deid_key):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src, labels = dicom_site
    junk = src / "other"
    junk.mkdir()
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientName = PHI["PatientName"]
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(junk / "rs.dcm", enforce_file_format=True)
    one = next(p for p in sorted(src.rglob("*")) if p.is_file() and p.parent.name == "series1")
    (junk / "trunc.dcm").write_bytes(one.read_bytes()[:700])
    res = ingest(src, "ct", tmp_path / "out", labels=labels)
    reasons = {r["path"].split("/", 1)[1]: r["reason"] for r in explain(src, "ct", tmp_path / "out", labels=labels)}
    assert "RTSTRUCT" in reasons["other/rs.dcm"]
    assert any(k in reasons["other/trunc.dcm"].lower() for k in ("truncated", "unreadable"))
    assert len(res.items) == 2


def test_empty_folder(tmp_path, deid_key):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty folder"):
        ingest(tmp_path / "empty", "s", tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        ingest(tmp_path / "nope", "s", tmp_path / "out")


def test_cli_reports_bad_config_and_input(tmp_path, monkeypatch, capsys):
    from siteadapt.cli import main

    p = tmp_path / "params.yaml"
    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    p.write_text(repo_params.read_text().replace("slice_axis: coronal", "slice_axsi: coronal"))
    assert main(["--params", str(p), "ingest", "--site", "cardiac_mr"]) == 2
    assert "tasks.cardiac.preprocess.slice_axsi: unknown key" in capsys.readouterr().err
    p.write_text(repo_params.read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["--params", str(p), "ingest", str(tmp_path / "missing"), "--site", "cardiac_mr"]) == 2
    err = capsys.readouterr().err
    assert "site cardiac_mr: the input folder does not exist" in err  # named by site: paths carry patient names
    assert "missing" not in err and str(tmp_path) not in err
    assert main(["--params", str(p), "ingest", "--site", "nosuch"]) == 2
    assert "unknown site 'nosuch'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "data" / "ingested" / "cardiac_mr" / "manifest.json")
