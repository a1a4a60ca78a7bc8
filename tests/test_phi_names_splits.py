"""Issue 20 items 2 and 8: no patient identifier from file or folder names (or absolute input paths) in the manifest,
logs or CLI output; generic folder names are not redaction tokens; assumed pixel spacing is flagged; splits keep each
patient's images together."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siteadapt.io.deid import Scrubber, anon_id, input_ref
from siteadapt.io.dicom_write import write_series
from siteadapt.steps.ingest import explain, ingest
from siteadapt.steps.preprocess import split_by_content, split_subjects

KEY = b"test-key-not-secret"
DOE = {"PatientName": "Doe^Jane", "PatientID": "MRN99887766", "PatientBirthDate": "19470312"}
PLANTED = ("Doe", "Jane", "MRN99887766", "Smith", "John", "12345", "QUIXOTE", "ALONSO", "19470312")


def _png(path: Path, seed: int, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)


def _sr(path: Path) -> None:
    """A DICOM Structured Report (no pixels) about Smith^John, in a file named after him."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName, ds.PatientID = "Smith^John", "12345"
    ds.SeriesInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def phi_site(tmp_path):
    """A site whose names carry identifiers: a folder named after a patient with PNGs, a corrupt PNG named
    ``Doe^Jane_MRN99887766.png``, an SR named ``Smith_John_12345.dcm``, a DICOM series of Doe^Jane in a folder named
    ``DICOM`` beside a truncated file of it, and an orphan label named after the patient."""
    src = tmp_path / "QUIXOTE_ALONSO_hospital" / "images"
    labels = tmp_path / "QUIXOTE_ALONSO_hospital" / "labels"
    for i in range(3):
        _png(src / "QUIXOTE_ALONSO" / f"QUIXOTE_ALONSO_{i}.png", seed=i)
    (src / "Doe^Jane_MRN99887766.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt
    _sr(src / "Smith_John_12345.dcm")
    rng = np.random.default_rng(0)
    files = write_series(src / "DICOM", np.round(rng.normal(100, 10, (8, 8, 4))), np.diag([1.0, 1.0, 2.0, 1.0]),
                         modality="CT", patient=DOE, seed=0)
    (src / "DICOM" / "IM9999").write_bytes(Path(files[0]).read_bytes()[:700])  # truncated copy
    _png(labels / "Doe^Jane_MRN99887766_mask.png", seed=9)  # matches no image
    return tmp_path, src, labels


def _assert_clean(text: str, tmp_path: Path, what: str) -> None:
    for s in (*PLANTED, str(tmp_path), tmp_path.name):
        assert s.lower() not in text.lower(), f"{s!r} found in {what}"


def test_scrubber_keeps_generic_words_and_redacts_patient_values():
    import pydicom

    scrub = Scrubber()
    for folder in ("DICOM", "SE000001", "series_3", "IMAGES", "CT", "Siemens"):
        scrub.add(folder)
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Doe^Jane", "MRN99887766", "Hospital de la Mancha"
    scrub.add_dataset(ds)
    text = "truncated or unreadable DICOM in SE000001/IMAGES (CT, Siemens): Doe Jane Doe^Jane MRN99887766 Mancha"
    assert scrub(text) == ("truncated or unreadable DICOM in SE000001/IMAGES (CT, Siemens): [redacted] [redacted] "
                           "[redacted] Mancha")
    assert scrub("Hospital de la Mancha") == "[redacted]"
    generic_id = Scrubber()
    generic_id.add("DICOM", patient=True)  # a real PatientID is redacted even when it looks generic
    assert generic_id("unreadable DICOM") == "unreadable [redacted]"


def test_no_names_or_paths_in_manifest_logs_or_cli(phi_site, monkeypatch, capsys, caplog):
    from siteadapt.cli import main

    tmp_path, src, labels = phi_site
    monkeypatch.setenv("SITEADAPT_DEID_KEY", KEY.decode())
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    caplog.set_level(logging.INFO, logger="siteadapt")
    rc = main(["--params", str(params), "ingest", str(src), "--site", "cxr_b", "--labels", str(labels),
               "--data-root", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    text = (out / "cxr_b" / "manifest.json").read_text()
    _assert_clean(text, tmp_path, "manifest.json")
    _assert_clean(caplog.text, tmp_path, "the log")
    manifest = json.loads(text)
    assert len(manifest["items"]) == 4  # 3 PNGs + the DICOM series
    by_where = {(r["in"], r["position"]): r for r in manifest["rejected"]}
    # the walk of images/ (files first, then folders, sorted): Doe^Jane..., Smith..., DICOM/IM0001..IM0004,
    # DICOM/IM9999, QUIXOTE_ALONSO/x3
    assert len(manifest["rejected"]) == 4
    doe = by_where[("input", "1 of 10")]
    assert doe["file"] == input_ref(KEY, "cxr_b", "input", "Doe^Jane_MRN99887766.png")
    assert doe["depth"] == 0 and doe["reason"].startswith("unreadable image file")
    assert by_where[("input", "2 of 10")]["reason"] == "non-image DICOM (SR)"
    trunc = by_where[("input", "7 of 10")]
    assert trunc["depth"] == 1 and trunc["reason"].startswith("truncated or unreadable DICOM")
    assert "[redacted]" not in trunc["reason"]
    orphan = by_where[("labels", "1 of 1")]
    assert orphan["reason"] == "label file matches no image"
    assert orphan["file"] == input_ref(KEY, "cxr_b", "labels", "Doe^Jane_MRN99887766_mask.png")
    assert caplog.text.count(doe["file"]) == 1  # the log names the refused file by its reference
    _assert_clean(cap.out + cap.err, src.parent, "stdout/stderr")

    # the local lookup maps each reference back to the file, on this machine's terminal only
    rows = explain(src, "cxr_b", out, labels=labels, key=KEY)
    assert {r["file"]: r["path"] for r in rows}[doe["file"]] == "input/Doe^Jane_MRN99887766.png"
    assert {r["file"]: r["path"] for r in rows}[orphan["file"]] == "labels/Doe^Jane_MRN99887766_mask.png"
    assert main(["--params", str(params), "ingest", str(src), "--site", "cxr_b", "--labels", str(labels),
                 "--data-root", str(out), "--explain"]) == 0
    shown = capsys.readouterr().out
    assert f"{doe['file']}  input 1 of 10  input/Doe^Jane_MRN99887766.png  unreadable image file" in shown
    assert (out / "cxr_b" / "manifest.json").read_text() == text  # --explain wrote nothing


def test_reader_messages_never_quote_the_path(tmp_path):
    from siteadapt.errors import InputError
    from siteadapt.io import files as F

    bad = tmp_path / "Doe^Jane_MRN99887766.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError) as ei:
        F.read_image2d(bad)
    assert "Doe" not in ei.value.reason and str(tmp_path) not in ei.value.reason
    assert ei.value.reason.startswith("unreadable image file: UnidentifiedImageError: cannot identify image file")
    nii = tmp_path / "Smith_John_12345.nii.gz"
    nii.write_bytes(b"\x1f\x8b" + b"\0" * 10)
    with pytest.raises(InputError) as ei:
        F.read_nifti(nii)
    assert "Smith" not in ei.value.reason and str(tmp_path) not in ei.value.reason


def test_assumed_spacing_warned_once_recorded_and_fixed_by_the_setting(tmp_path, deid_key, caplog):
    src = tmp_path / "in"
    for i in range(3):
        _png(src / f"img{i}.png", seed=i)
    caplog.set_level(logging.INFO, logger="siteadapt")
    res = ingest(src, "pngsite", tmp_path / "out")
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1
    msg = warn[0].getMessage()
    assert "3 of 3 images carry no pixel spacing" in msg and "1.0 mm is assumed" in msg
    assert "sites.pngsite.pixel_spacing_mm" in msg
    assert [it["spacing_assumed"] for it in res.items] == [True] * 3
    assert all(it["spacing"][:2] == [1.0, 1.0] for it in res.items)
    # following the advice rewrites the items (the setting is part of their fingerprint)
    caplog.clear()
    res = ingest(src, "pngsite", tmp_path / "out", pixel_spacing_mm=0.5)
    assert len(res.written) == 3 and not res.skipped
    assert [it["spacing_assumed"] for it in res.items] == [False] * 3
    assert all(it["spacing"][:2] == [0.5, 0.5] for it in res.items)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    res = ingest(src, "pngsite", tmp_path / "out", pixel_spacing_mm=0.5)
    assert len(res.skipped) == 3


def test_dicom_radiograph_without_pixel_spacing_is_flagged_and_takes_the_setting(tmp_path, deid_key, caplog):
    import pydicom

    from siteadapt.io.dicom_write import write_2d

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        pic = np.full((20, 30), 100 * (i + 1), np.uint16)
        pic[5:15, 10:20] += 50  # some signal: an image of one value everywhere is refused
        f = write_2d(src / f"cr{i}.dcm", pic, patient={"PatientID": f"P{i}"}, series_number=i + 1)
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing, ds.ImagerPixelSpacing
        ds.save_as(f)
    caplog.set_level(logging.INFO, logger="siteadapt")
    res = ingest(src, "crsite", tmp_path / "out")
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "2 of 2 images carry no pixel spacing" in warn[0]
    assert [it["spacing_assumed"] for it in res.items] == [True, True]
    assert all(it["spacing"][:2] == [1.0, 1.0] for it in res.items)
    caplog.clear()
    res = ingest(src, "crsite", tmp_path / "out", pixel_spacing_mm=0.143)
    assert len(res.written) == 2  # the setting is part of a DICOM item's fingerprint once it is set
    assert [it["spacing_assumed"] for it in res.items] == [False, False]
    assert all(np.allclose(it["spacing"][:2], [0.143, 0.143]) for it in res.items)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_object_store_errors_name_the_prefix_and_a_position_not_the_object(tmp_path, monkeypatch):
    from siteadapt import storage
    from siteadapt.errors import SiteadaptError

    name = "Doe^Jane_MRN99887766.dcm"
    monkeypatch.setattr(storage, "list_objects", lambda uri: {"a.dcm": (1, "x"), f"b/{name}": (1, "y")})

    class Client:
        def download_file(self, bucket, key, filename):
            if key.endswith(name):  # what a full disk or a permission error says: the local file's path
                raise OSError(28, "No space left on device", f"{filename}")
            Path(filename).write_bytes(b"1")

    monkeypatch.setattr(storage, "client", lambda: Client())
    with pytest.raises(SiteadaptError) as ei:
        storage.download("s3://bucket/sites/x", tmp_path / "mirror")
    msg = str(ei.value)
    assert "s3://bucket/sites/x (object 2 of 2 in key order)" in msg and "No space left" in msg
    assert "Doe" not in msg and "MRN" not in msg and str(tmp_path) not in msg


def test_patients_csv_gives_hashed_patient_and_one_split(tmp_path, deid_key):
    src = tmp_path / "in"
    for i in range(12):
        _png(src / f"case{i:02d}.png", seed=i)
    csv = tmp_path / "patients.csv"
    rows = ["stem,patient"] + [f"case{i:02d}.png,{'MRN99887766' if i in (1, 5, 9) else f'P{i:03d}'}"
                               for i in range(12)] + ["ghost,MRN11111111", "case01,MRN22222222"]
    csv.write_text("\n".join(rows) + "\n")
    res = ingest(src, "pt", tmp_path / "out", patients=csv)
    text = (tmp_path / "out" / "pt" / "manifest.json").read_text()
    assert "MRN" not in text and "P001" not in text
    doe = anon_id(KEY, "pt", "patient", "MRN99887766")
    same = [it for it in res.items if it.get("patient") == doe]
    assert len(same) == 3 and len({it["patient"] for it in res.items}) == 10
    reasons = sorted(r["reason"] for r in res.rejected)
    assert reasons == ["line 14: patient row matches no image", "line 15: a second patient for the image of line 3"]
    assert all(r["in"] == "patients" and r["position"] == "the patients CSV" for r in res.rejected)
    # every seed keeps the patient's 3 images in one split; without the patient key some seed separates them
    apart = 0
    for seed in range(20):
        split = split_by_content(res.items, seed, "pt", 0.2, 0.2)
        assert len({split[it["id"]] for it in same}) == 1
        assert sorted(split.values()).count("test") in (2, 3, 4)
        plain = split_by_content([{k: v for k, v in it.items() if k != "patient"} for it in res.items],
                                 seed, "pt", 0.2, 0.2)
        apart += len({plain[it["id"]] for it in same}) > 1
    assert apart > 0
    # a missing or headerless patients CSV is refused before anything is read (exit 2), naming the setting
    from siteadapt.errors import InputError

    with pytest.raises(InputError, match=r"^sites\.pt\.patients: the patients CSV does not exist$"):
        ingest(src, "pt", tmp_path / "out", patients=tmp_path / "nope.csv")
    csv.write_text("image,id\ncase00,P1\n")
    with pytest.raises(InputError, match=r"^sites\.pt\.patients: the patients CSV needs a header"):
        ingest(src, "pt", tmp_path / "out", patients=csv)


def test_split_unchanged_when_every_item_is_its_own_patient():
    items = [{"id": f"sub-{i:02d}", "content_sha256": f"{i * 7919 % 101:064x}", "patient": f"sub-p{i}"}
             for i in range(15)]
    for seed in range(5):
        old = split_subjects(sorted(it["content_sha256"] for it in items), seed, "s", 0.2, 0.2)
        assert split_by_content(items, seed, "s", 0.2, 0.2) == {it["id"]: old[it["content_sha256"]] for it in items}
    # stratified (classification): the same too
    strata = {it["id"]: i % 2 for i, it in enumerate(items)}
    old = split_subjects(sorted(it["content_sha256"] for it in items), 3, "s", 0.2, 0.2,
                         strata={it["content_sha256"]: strata[it["id"]] for it in items})
    assert split_by_content(items, 3, "s", 0.2, 0.2, strata=strata) == \
        {it["id"]: old[it["content_sha256"]] for it in items}


def test_dicom_patient_id_is_hashed_per_item(tmp_path, deid_key):
    rng = np.random.default_rng(1)
    for i, pid in enumerate(("MRN99887766", "MRN99887766", "MRN55544433")):
        write_series(tmp_path / "in" / f"s{i}", np.round(rng.normal(100, 10, (8, 8, 3))),
                     np.diag([1.0, 1.0, 2.0 + i, 1.0]), modality="CT", patient={**DOE, "PatientID": pid}, seed=i)
    res = ingest(tmp_path / "in", "ct", tmp_path / "out")
    pats = sorted(it["patient"] for it in res.items)
    assert pats == sorted([anon_id(KEY, "ct", "patient", "MRN99887766")] * 2
                          + [anon_id(KEY, "ct", "patient", "MRN55544433")])
    assert "MRN" not in (tmp_path / "out" / "ct" / "manifest.json").read_text()
