"""PACS in and out against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``; skipped when absent).

One module-scoped PACS site: a tiny synthetic cardiac CT site (4 DICOM studies) is stored in Orthanc, three studies
first and the fourth later; the site ``pacs_ct`` points at Orthanc with ``images: dicomweb+http://...?Modality=CT``.
The chain is the README's: ``siteadapt ingest`` (QIDO-RS + WADO-RS pull, exactly once), preprocess, a source
segmenter trained for a few iterations on the synthetic MR site, ``noadapt`` (the source model on the target, the
issue's "tiny model"), predict, then ``siteadapt export --format seg --stow`` and a QIDO-RS search for Modality SEG.
The SEGs read back with highdicom must equal the predictions on the original DICOM grid, voxel for voxel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.watch import Recorder

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("orthanc_server", HERE / "orthanc" / "server.py")
orthanc_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orthanc_server)

_binary, _plugin, _why = orthanc_server.find_orthanc()
needs_orthanc = pytest.mark.skipif(bool(_why), reason=_why or "Orthanc present")

KEY = "test-key-not-secret"


def _uids_of(files) -> set[str]:
    import pydicom

    out = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                str(ds.FrameOfReferenceUID), str(ds.PatientID), str(ds.PatientName)}
    return out


def _params(root: Path, uri: str) -> dict:
    p = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    p["profile"] = "test"
    p["profiles"]["test"] = {"image_size": 32, "batch_size": 2, "iterations": 60, "width": 0.25, "synth_scale": 0.25,
                             "synth_subjects": 4, "synth_images": 10, "slice_spacing_mm": 9.0}
    p["paths"] = {k: str(root / v) for k, v in p["paths"].items()}
    raw = root / "data/raw/cardiac"
    p["sites"] = {"cardiac_mr": {"task": "cardiac", "images": str(raw / "mr/images"), "labels": str(raw / "mr/labels"),
                                 "modality": "MR"},
                  "pacs_ct": {"task": "cardiac", "images": uri}}
    for name, task in p["tasks"].items():
        task["directions"] = []
    p["tasks"]["cardiac"].update(directions=[{"source": "cardiac_mr", "target": "pacs_ct"}], methods=["noadapt"])
    p["tasks"]["cardiac"]["preprocess"]["split"] = {"val": 0.25, "test": 0.5}
    p["pipeline"] = {"tasks": ["cardiac"]}
    p["train"].update(device="cpu", log_every=2, checkpoint_every=60)
    return p


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with the synthetic CT studies, the site pulled three times (3 studies, none, the late one), trained,
    predicted and exported with STOW-RS; yields what the tests check."""
    import torch

    from siteadapt import cli
    from siteadapt.config import load_settings
    from siteadapt.data.synth import synthesize
    from siteadapt.io import dicomweb
    from siteadapt.steps.ingest import ingest
    from siteadapt.steps.preprocess import preprocess
    from siteadapt.steps.train import adapt, predict, train_source

    root = tmp_path_factory.mktemp("pacs")
    mp = pytest.MonkeyPatch()
    mp.setenv("SITEADAPT_DEID_KEY", KEY)
    mp.setenv("SITEADAPT_UID_MAP_DIR", str(root / "site-keys" / "uids"))
    mp.setenv("SITEADAPT_TRACKING", "off")
    mp.chdir(root)
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda r: records.append(f"{r.name} {r.getMessage()}")
    root_log = logging.getLogger()
    old_level = root_log.level
    root_log.addHandler(handler)
    root_log.setLevel(logging.DEBUG)  # every library's debug lines too (urllib3 logs request paths there)
    srv = orthanc_server.OrthancServer(root / "orthanc").start()
    try:
        for k, v in srv.env().items():
            mp.setenv(k, v)
        synthesize("cardiac", root / "data/raw", seed=0, n_subjects=4, scale=0.25, workers=1)
        studies = sorted(p for p in (root / "data/raw/cardiac/ct/images").iterdir() if p.is_dir())
        for st in studies[:3]:
            for f in sorted(st.rglob("*")):
                if f.is_file():
                    srv.upload(f)
        uri = f"dicomweb+{srv.dicomweb}?Modality=CT&StudyDate=20100101-20301231"
        params = _params(root, uri)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        s = load_settings(root / "params.yaml")
        mirror = s.paths.remote / "pacs_ct" / "images"
        pulls = [dicomweb.pull(uri, mirror), dicomweb.pull(uri, mirror)]
        for f in sorted(studies[3].rglob("*")):
            if f.is_file():
                srv.upload(f)
        before = {f: f.stat().st_mtime_ns for f in mirror.rglob("*.dcm")}
        assert cli.main(["--params", str(root / "params.yaml"), "ingest", "--site", "pacs_ct"]) == 0  # pull + ingest
        late = {f: f.stat().st_mtime_ns for f in mirror.rglob("*.dcm") if before.get(f) != f.stat().st_mtime_ns}
        pulls.append(json.loads(dicomweb.state_path(mirror).read_text()))
        pulls.append(dicomweb.pull(uri, mirror))
        again = ingest(mirror, "pacs_ct", s.paths.ingested)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            site = s.sites["cardiac_mr"]
            ingest(site.images, "cardiac_mr", s.paths.ingested, labels=site.labels, modality="MR")
            preprocess(s, "cardiac_mr")
            preprocess(s, "pacs_ct")
            train_source(s, "cardiac_mr")
            adapt(s, "pacs_ct", "noadapt")
            predict(s, "pacs_ct", "noadapt")
        finally:
            torch.set_num_threads(threads)
        assert cli.main(["--params", str(root / "params.yaml"), "export", "--site", "pacs_ct", "--method", "noadapt",
                         "--format", "seg", "--stow", uri, "--model-version", "7"]) == 0
        yield {"srv": srv, "settings": s, "uri": uri, "mirror": mirror, "pulls": pulls, "again": again,
               "root": root, "studies": studies, "log": records,
               "late": late}
    finally:
        root_log.removeHandler(handler)
        root_log.setLevel(old_level)
        srv.stop()
        mp.undo()


@needs_orthanc
def test_pull_fetches_each_series_exactly_once(pacs):
    first, second, state, fourth = pacs["pulls"]
    assert (first["fetched_studies"], first["fetched_series"], first["matched_series"]) == (3, 3, 3)
    assert (second["fetched_series"], second["instances"]) == (0, 0)  # nothing new: nothing fetched
    assert len(state["series"]) == 4
    late = pacs["late"]  # the files the CLI's pull wrote: the late study's, all in one study folder
    assert len(late) == sum(1 for f in pacs["studies"][3].rglob("*") if f.is_file())
    assert len({f.parent.parent for f in late}) == 1
    assert (fourth["fetched_series"], fourth["matched_series"]) == (0, 4)
    assert pacs["again"].written == [] and len(pacs["again"].skipped) == 4  # ingest: nothing rewritten


@needs_orthanc
def test_no_original_identifier_in_names_state_manifest_export_or_logs(pacs):
    s, root = pacs["settings"], pacs["root"]
    raw = [f for st in pacs["studies"] for f in st.rglob("*") if f.is_file()]
    secrets_ = {u for u in _uids_of(raw) if len(u) > 4}
    texts = [p.as_posix() for p in (s.paths.remote / "pacs_ct").rglob("*")]
    texts.append(pacs["mirror"].with_name("images.dicomweb-state.json").read_text())
    texts.append((s.paths.ingested / "pacs_ct" / "manifest.json").read_text())
    export_dir = s.paths.ingested.parent / "export" / "pacs_ct" / "noadapt"
    texts += [p.name for p in export_dir.iterdir()] + [(export_dir / "export.json").read_text()]
    texts += pacs["log"]  # every log line of pull, ingest, training, export and STOW
    blob = "\n".join(texts)
    leaked = sorted(u for u in secrets_ if u in blob)
    assert not leaked, [x for x in texts if any(u in x for u in leaked)][:5]
    keyfile = root / "site-keys" / "uids" / "pacs_ct.json"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert s.paths.ingested.resolve() not in keyfile.resolve().parents
    entries = json.loads(keyfile.read_text())["items"]
    assert len(entries) == 4 and {e["series"] for e in entries.values()} <= secrets_


@needs_orthanc
def test_seg_round_trip_equals_the_prediction_on_the_original_grid(pacs):
    from siteadapt.io import dicomweb, uidmap

    s = pacs["settings"]
    pred_dir = s.paths.predictions / "pacs_ct" / "noadapt"
    subjects = json.loads((pred_dir / "predictions.json").read_text())["subjects"]
    assert len(subjects) >= 2
    found = dicomweb.search_series(pacs["uri"], {"Modality": "SEG"})
    assert len(found) == len(subjects)
    segs = _assert_segs_equal_predictions(dicomweb.client(pacs["srv"].dicomweb), found, subjects,
                                          uidmap.load("pacs_ct"), pred_dir, "+model.7")
    for seg in segs:
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["MYO", "LAC", "LVC", "AA"]
        assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "87878005"  # left ventricle


@needs_orthanc
def test_credentials_come_from_the_environment_only(pacs, tmp_path, monkeypatch):
    from siteadapt.io import dicomweb

    srv = pacs["srv"]
    with pytest.raises(dicomweb.DicomwebError, match="credentials in the URI"):
        dicomweb.parse(f"dicomweb+http://u:p@127.0.0.1:{srv.port}/dicom-web")
    with pytest.raises(dicomweb.DicomwebError, match="unknown filter"):
        dicomweb.parse(f"dicomweb+http://127.0.0.1:{srv.port}/dicom-web?PatientName=X")
    monkeypatch.delenv("SITEADAPT_DICOMWEB_PASSWORD")
    with pytest.raises(dicomweb.DicomwebError, match="HTTP 401"):
        dicomweb.pull(pacs["uri"], tmp_path / "mirror")


@needs_orthanc
def test_query_filters_select_studies(pacs, tmp_path):
    from siteadapt.io import dicomweb

    dates = sorted(pacs["srv"].request(f"/studies/{i}")["MainDicomTags"]["StudyDate"]
                   for i in pacs["srv"].request("/studies"))
    res = dicomweb.pull(f"dicomweb+{pacs['srv'].dicomweb}?Modality=CT&StudyDate={dates[0]}-{dates[1]}",
                        tmp_path / "mirror")
    assert res["fetched_studies"] == 2
    assert dicomweb.pull(f"dicomweb+{pacs['srv'].dicomweb}?Modality=MR", tmp_path / "mr")["matched_series"] == 0


def test_site_uri_is_accepted_by_the_settings():
    from siteadapt.config import Site
    from siteadapt.io import dicomweb

    site = Site(task="cardiac", images="dicomweb+https://pacs.example.org/dicom-web?Modality=CT")
    assert isinstance(site.images, str)
    src = dicomweb.parse(site.images)
    assert src.root == "https://pacs.example.org/dicom-web" and src.filters == (("Modality", "CT"),)




@needs_orthanc
def test_watch_a_pacs_submits_one_run_for_a_new_site(pacs, tmp_path):
    from siteadapt.kfp.watch import Watcher

    uri, stage = pacs["uri"], tmp_path / "stage"
    state = str(tmp_path / "watch.json")
    defaults = {"task": "cardiac", "source_site": "cardiac_mr", "source_uri": "s3://bucket/sites/cardiac_mr/"}
    rec = Recorder()
    w = Watcher(uri, state, rec, defaults=defaults, site="hospital_x", stage=str(stage))
    assert w.poll() == ["hospital_x"]
    (args,) = rec.runs.values()
    assert args["target_uri"] == str(stage / "hospital_x") and args["site"] == "hospital_x"
    assert args["pacs_uri"] == uri  # the run stores its champion's SEGs back there
    assert len([f for f in (stage / "hospital_x" / "images").rglob("*.dcm")]) > 0
    assert w.poll() == []
    assert Watcher(uri, state, rec, defaults=defaults, site="hospital_x", stage=str(stage)).poll() == []  # restart
    assert len(rec.runs) == 1
    empty = Watcher(uri.replace("Modality=CT", "Modality=MR"), str(tmp_path / "w2.json"), rec, defaults=defaults,
                    site="hospital_y", stage=str(stage))
    assert empty.poll() == [] and len(rec.runs) == 1


@needs_orthanc
def test_export_reads_the_source_headers_from_the_pacs_when_the_files_are_gone(pacs, tmp_path):
    import pydicom

    from siteadapt.io import dicomweb
    from siteadapt.steps.export import export

    s, mirror = pacs["settings"], pacs["mirror"]
    first = s.paths.ingested.parent / "export" / "pacs_ct" / "noadapt"
    moved = mirror.with_name("images.moved")
    mirror.rename(moved)
    try:
        res = export(s, "pacs_ct", "noadapt", out=tmp_path / "again", model_version="7", stow=pacs["uri"])
    finally:
        moved.rename(mirror)
    assert res["stored"] == len(res["subjects"]) >= 2
    assert len(dicomweb.search_series(pacs["uri"], {"Modality": "SEG"})) == len(res["subjects"])  # no duplicates
    for sub in res["subjects"]:
        a, b = pydicom.dcmread(first / sub["file"]), pydicom.dcmread(tmp_path / "again" / sub["file"])
        assert a.SOPInstanceUID == b.SOPInstanceUID  # the same result exported again: the same SEG instance
        assert a.PixelData == b.PixelData and a.PatientID == b.PatientID
        assert a.PerFrameFunctionalGroupsSequence == b.PerFrameFunctionalGroupsSequence


@needs_orthanc
def test_a_pull_killed_mid_series_fetches_that_series_again_and_nothing_else(pacs, tmp_path):
    from siteadapt.io import dicomweb

    mirror = tmp_path / "images"
    assert dicomweb.pull(pacs["uri"], mirror)["fetched_series"] == 4
    spath = dicomweb.state_path(mirror)
    state = json.loads(spath.read_text())
    lost = sorted(state["series"])[0]  # killed after writing this series' files, before recording it
    del state["series"][lost]
    spath.write_text(json.dumps(state))
    res = dicomweb.pull(pacs["uri"], mirror)
    assert (res["fetched_series"], res["fetched_studies"]) == (1, 1)
    assert lost in json.loads(spath.read_text())["series"]
    assert dicomweb.pull(pacs["uri"], mirror)["fetched_series"] == 0


def test_labels_land_on_the_source_slices_voxel_exact_or_are_refused(tmp_path):
    """Without a PACS: an oblique, non-isotropic series written with io/dicom_write.py, its label map placed back on
    its slices (shuffled file order), and a prediction grid shifted by half a voxel refused."""
    import pydicom

    from siteadapt.io.dicom_write import write_series
    from siteadapt.steps.export import ExportError, build_seg, labels_on_source

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, size=(7, 5, 4)).astype(np.uint8)
    c, s_ = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.8 * c, -0.9 * s_, 0, 10.0], [0.8 * s_, 0.9 * c, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    files = write_series(tmp_path / "s", lab.astype(np.int16), affine, modality="CT", file_names="random",
                         patient={"PatientName": "TEST^PATIENT", "PatientID": "P1"})
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    got = labels_on_source(lab, affine, heads)
    for ds, sl in zip(heads, got):
        np.testing.assert_array_equal(sl, pydicom.dcmread(ds.filename).pixel_array)
    seg = build_seg(heads, got, {"MYO": 1, "LAC": 2, "LVC": 3, "AA": 4}, method="m", version="v",
                    series_uid="1.2.3.4", sop_uid="1.2.3.5")
    back = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in heads], combine_segments=True)
    np.testing.assert_array_equal(back, got)
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 0]
    with pytest.raises(ExportError, match="voxel grid"):
        labels_on_source(lab, shifted, heads)


@needs_orthanc
def test_kfp_export_step_finds_the_uids_on_the_pacs_and_stores_the_champions_segs(pacs, tmp_path, monkeypatch,
                                                                                   caplog):
    """The pipeline's export step (:func:`siteadapt.kfp.runtime.run_export`, what the component calls) as in a fresh
    pod: no UID key file, no pulled files, only the de-identification key, the DICOMweb credentials and the
    candidate's predictions artifact. A PACS of its own holds the site's CT studies (the module's one also holds the
    CLI's SEGs): nothing is stored before the promotion, then one SEG per test subject, equal to the predictions."""
    import shutil

    from siteadapt.io import dicomweb
    from siteadapt.kfp import runtime as R

    s, root = pacs["settings"], pacs["root"]
    pred_dir = s.paths.predictions / "pacs_ct" / "noadapt"
    subjects = json.loads((pred_dir / "predictions.json").read_text())["subjects"]
    ids = json.loads((root / "site-keys" / "uids" / "pacs_ct.json").read_text())["items"]  # for the checks only
    art = tmp_path / "predictions-artifact"
    shutil.copytree(pred_dir, art / "predictions" / "pacs_ct" / "noadapt")
    monkeypatch.setenv("SITEADAPT_UID_MAP_DIR", str(tmp_path / "no-key-file"))
    monkeypatch.chdir(tmp_path)
    srv = orthanc_server.OrthancServer(tmp_path / "orthanc").start()
    try:
        for f in sorted(f for st in pacs["studies"] for f in st.rglob("*") if f.is_file()):
            srv.upload(f)
        for k, v in srv.env().items():
            monkeypatch.setenv(k, v)
        uri = f"dicomweb+{srv.dicomweb}?Modality=CT&StudyDate=20100101-20301231"
        job = R.Job(task="cardiac", source_site="cardiac_mr", site="pacs_ct",
                    params_yaml=(root / "params.yaml").read_text())
        cand = {"method": "noadapt", "registered": {"name": "siteadapt-cardiac-pacs_ct", "version": "3"}}
        refused = R.run_export(job, cand, {"promoted": False, "version": "3"}, uri, art)
        other = R.run_export(job, cand, {"promoted": True, "version": "4"}, uri, art)  # another run's candidate
        assert refused["exported"] == other["exported"] == 0 and refused["skipped"] and other["skipped"]
        assert dicomweb.search_series(uri, {"Modality": "SEG"}) == []
        caplog.set_level(logging.DEBUG)
        res = R.run_export(job, cand, {"promoted": True, "version": "3"}, uri, art)
        assert not (tmp_path / "no-key-file").exists()
        assert res["exported"] == res["stored"] == len(subjects) >= 2 and res["model_version"] == "3"
        found = dicomweb.search_series(uri, {"Modality": "SEG"})
        assert len(found) == len(subjects)
        _assert_segs_equal_predictions(dicomweb.client(srv.dicomweb), found, subjects, ids, pred_dir, "+model.3")
        raw = [f for st in pacs["studies"] for f in st.rglob("*") if f.is_file()]
        blob = json.dumps(res) + "\n".join(r.getMessage() for r in caplog.records)
        assert not [u for u in _uids_of(raw) if len(u) > 4 and u in blob]  # no UID in the summary or the logs
        assert not any(c in json.dumps(res) for c in subjects)  # the summary is counts only
    finally:
        srv.stop()


def _assert_segs_equal_predictions(client, found, subjects, ids, pred_dir, version_suffix):
    """Each SEG series of ``found`` read back with highdicom equals its subject's predicted label map, voxel for
    voxel, on the original slices (ordered as the ingested grid); it joins the source study and frame of
    reference. Returns the SEGs read back. At least one predicted map is non-empty: the comparison is not one of empty
    maps."""
    import highdicom as hd
    import nibabel as nib
    import pydicom

    nonempty, segs = 0, []
    for item in found:
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        (ds,) = client.retrieve_series(study, series)
        seg = hd.seg.Segmentation.from_dataset(ds)
        segs.append(seg)
        cid = next(c for c in subjects if ids[c]["series"] in seg.get_source_image_uids()[0])
        entry = ids[cid]
        assert seg.StudyInstanceUID == entry["study"] and seg.FrameOfReferenceUID == entry["frame_of_reference"]
        algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "noadapt" and algo.AlgorithmVersion.endswith(version_suffix)
        heads = [pydicom.dcmread(i["file"], stop_before_pixels=True) for i in entry["instances"]]
        normal = np.cross(*np.reshape([float(v) for v in heads[0].ImageOrientationPatient], (2, 3)))
        heads.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
        back = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in heads], combine_segments=True,
                                                 relabel=False)
        expected = np.asarray(nib.load(str(pred_dir / f"{cid}.nii.gz")).dataobj).transpose(2, 1, 0)
        assert back.shape == expected.shape
        np.testing.assert_array_equal(back, expected)
        nonempty += int(expected.any())
    assert nonempty >= 1
    return segs


def test_series_identities_of_headers_are_the_ones_ingest_gives_the_files(tmp_path):
    """The export step recomputes anonymous ids from PACS headers: its grouping must be ingest's, split series
    (here one SeriesInstanceUID holding stacks of two sizes) included, and leave non-image objects out."""
    import pydicom

    from siteadapt.io.dicom import scan_dicom_files, series_identities
    from siteadapt.io.dicom_write import write_series

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    patient = {"PatientName": "TEST^SPLIT", "PatientID": "P2"}
    files = write_series(tmp_path / "a", np.zeros((6, 5, 3), np.int16), affine, modality="CT", patient=patient,
                         series_uid="1.2.826.0.1.3680043.8.498.1", study_uid="1.2.826.0.1.3680043.8.498.9")
    files += write_series(tmp_path / "b", np.zeros((4, 4, 2), np.int16), affine, modality="CT", patient=patient,
                          series_uid="1.2.826.0.1.3680043.8.498.1", study_uid="1.2.826.0.1.3680043.8.498.9", seed=1)
    files += write_series(tmp_path / "c", np.zeros((4, 4, 2), np.int16), affine, modality="CT", patient=patient,
                          series_uid="1.2.826.0.1.3680043.8.498.2", study_uid="1.2.826.0.1.3680043.8.498.9", seed=2)
    series, _ = scan_dicom_files(files)
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in reversed(files)]
    seg_like = pydicom.Dataset()
    seg_like.update({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4", "Modality": "SEG", "Rows": 4, "Columns": 4,
                     "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.2", "SOPInstanceUID": "1.2.3"})
    got = series_identities(heads + [seg_like])
    assert len(series) == 3 and any("+s" in s.uid for s in series)
    assert sorted((uid, sorted(str(d.SOPInstanceUID) for d in ds)) for uid, ds in got) == sorted(
        (s.uid, sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in s.files))
        for s in series)
