"""A PACS pull under faults, against a real Orthanc (skipped when Orthanc or its DICOMweb plugin is absent).

Each test starts its own Orthanc on 127.0.0.1 (free port, storage in the test's folder) holding small synthetic CT
series written with :func:`siteadapt.io.dicom_write.write_series`, and stops it at the end:

- the server stopped after k of n instances: the pull exits 7, the state and the mirror hold the complete series
  only, and after a restart on the same storage the next ``siteadapt ingest`` fetches exactly the n - k missing
  instances, bit-identical to the server's files;
- a series receiving instances between polls: the next poll fetches the new instances only and ingest rewrites
  the series; with a stability window, a series whose count changed is deferred until it has been stable;
- the watcher sees a grown series as a change (its settle window restarts) and submits once it is stable;
- retries: a transient fault (connection refused, HTTP 503) twice, then success: three attempts and the waits
  ``backoff``, ``2 * backoff``; a 404 is not retried.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from helpers.watch import Recorder

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("orthanc_server_faults", HERE / "orthanc" / "server.py")
orthanc_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orthanc_server)

_binary, _plugin, _why = orthanc_server.find_orthanc()
needs_orthanc = pytest.mark.skipif(bool(_why), reason=_why or "Orthanc present")

KEY = "test-key-faults-not-secret"
STUDY = "1.2.826.0.1.3680043.8.498.7001"


def _series(folder: Path, n: int, series_uid: str, seed: int) -> list[Path]:
    """``n`` single-frame CT slices of one series (16 x 16 pixels), in slice order."""
    from siteadapt.io.dicom_write import write_series

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 400, size=(16, 16, n)).astype(np.int16)
    return write_series(folder, data, np.diag([1.5, 1.5, 3.0, 1.0]), modality="CT",
                        patient={"PatientName": "FAULT^TEST", "PatientID": "PF1"}, study_uid=STUDY,
                        series_uid=series_uid, seed=seed)


def _raw_file(srv, orthanc_id: str) -> bytes:
    req = urllib.request.Request(f"{srv.url}/instances/{orthanc_id}/file", headers={"Authorization": srv._auth()})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def _server_files(srv, key: bytes) -> dict[str, bytes]:
    """``{mirror path relative to the mirror: bytes}`` of every instance Orthanc holds (its stored files)."""
    from siteadapt.io import dicomweb

    out = {}
    for oid in srv.request("/instances"):
        tags = srv.request(f"/instances/{oid}/simplified-tags")
        rel = "/".join((dicomweb._hash(key, "study", tags["StudyInstanceUID"]),
                        dicomweb._hash(key, "series", tags["SeriesInstanceUID"]),
                        dicomweb._hash(key, "instance", tags["SOPInstanceUID"]) + ".dcm"))
        out[rel] = _raw_file(srv, oid)
    return out


def _mirror_files(mirror: Path) -> dict[str, bytes]:
    return {p.relative_to(mirror).as_posix(): p.read_bytes() for p in sorted(mirror.rglob("*")) if p.is_file()}


def _params(root: Path, uri: str) -> Path:
    p = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    p["paths"] = {k: str(root / v) for k, v in p["paths"].items()}
    p["sites"] = {"pacs_ct": {"task": "cardiac", "images": uri}}
    for task in p["tasks"].values():
        task["directions"] = []
    p["pipeline"] = {"tasks": ["cardiac"]}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


class _Counter:
    """Wraps :func:`siteadapt.io.dicomweb._retrieve_instance`: counts the instances fetched and can stop the server
    after the k-th one (the server dies between two instance requests of one pull)."""

    def __init__(self, real, srv=None, stop_after: int | None = None):
        self.real, self.srv, self.stop_after = real, srv, stop_after
        self.attempts = self.fetched = 0

    def __call__(self, *a, **kw):
        self.attempts += 1
        data = self.real(*a, **kw)
        self.fetched += 1
        if self.stop_after is not None and self.fetched == self.stop_after:
            self.srv.stop()
        return data


@pytest.fixture
def orthanc(tmp_path, monkeypatch):
    monkeypatch.setenv("SITEADAPT_DEID_KEY", KEY)
    monkeypatch.setenv("SITEADAPT_UID_MAP_DIR", str(tmp_path / "site-keys" / "uids"))
    monkeypatch.setenv("SITEADAPT_TRACKING", "off")
    monkeypatch.delenv("SITEADAPT_DICOMWEB_STABLE_SECONDS", raising=False)
    monkeypatch.chdir(tmp_path)
    srv = orthanc_server.OrthancServer(tmp_path / "orthanc").start()
    try:
        for k, v in srv.env().items():
            monkeypatch.setenv(k, v)
        yield srv
    finally:
        srv.stop()


@needs_orthanc
def test_server_stopped_mid_pull_exits_7_keeps_complete_series_and_resumes(orthanc, tmp_path, monkeypatch, capsys):
    from siteadapt import cli
    from siteadapt.io import dicomweb

    srv, key = orthanc, KEY.encode()
    files = _series(tmp_path / "src/a", 8, "1.2.826.0.1.3680043.8.498.7101", 1)
    files += _series(tmp_path / "src/b", 8, "1.2.826.0.1.3680043.8.498.7102", 2)
    for f in files:
        srv.upload(f)
    uri = f"dicomweb+{srv.dicomweb}?Modality=CT"
    params = _params(tmp_path, uri)
    mirror = tmp_path / "data/remote/pacs_ct/images"
    monkeypatch.setattr(dicomweb, "BACKOFF_S", 0.01)
    counter = _Counter(dicomweb._retrieve_instance, srv, stop_after=11)  # 8 of one series, 3 of the other
    monkeypatch.setattr(dicomweb, "_retrieve_instance", counter)

    assert cli.main(["--params", str(params), "pull", "--site", "pacs_ct"]) == 7
    err = capsys.readouterr().err
    assert f"{srv.dicomweb}: 1 series incomplete (5 instances missing); 1 series completed and recorded" in err
    assert "1.2.826" not in err
    assert (counter.fetched, counter.attempts) == (11, 12 + dicomweb.RETRIES)  # the 12th retried, then given up
    state = json.loads(dicomweb.state_path(mirror).read_text())
    assert [r["instances"] for r in state["series"].values()] == [8]  # the complete series only
    assert len([p for p in mirror.rglob("*.dcm")]) == 8 and len({p.parent for p in mirror.rglob("*.dcm")}) == 1
    assert len(list(dicomweb.partial_path(mirror).rglob("*.dcm"))) == 3  # the partial one waits outside the mirror
    assert dicomweb.partial_path(mirror).name == "images.dicomweb-partial"

    srv.start(keep_port=True)  # the same storage, the same URL
    resumed = _Counter(dicomweb._retrieve_instance.real)
    monkeypatch.setattr(dicomweb, "_retrieve_instance", resumed)
    assert cli.main(["--params", str(params), "ingest", "--site", "pacs_ct"]) == 0
    assert "pacs_ct: 2 items (2 written, 0 unchanged)" in capsys.readouterr().out
    assert (resumed.fetched, resumed.attempts) == (5, 5)  # exactly the missing instances
    state = json.loads(dicomweb.state_path(mirror).read_text())
    assert sorted(r["instances"] for r in state["series"].values()) == [8, 8] and state["seen"] == {}
    assert not dicomweb.partial_path(mirror).exists()
    assert _mirror_files(mirror) == _server_files(srv, key)  # 16 files, byte for byte the server's
    assert len(_mirror_files(mirror)) == 16
    assert dicomweb.pull(uri, mirror)["instances"] == 0 and resumed.attempts == 5  # up to date: nothing fetched


@needs_orthanc
def test_a_series_receiving_instances_is_completed_by_the_next_poll(orthanc, tmp_path, monkeypatch):
    from siteadapt.io import dicomweb
    from siteadapt.steps.ingest import ingest

    srv = orthanc
    files = _series(tmp_path / "src/c", 9, "1.2.826.0.1.3680043.8.498.7201", 3)
    for f in files[:5]:
        srv.upload(f)
    uri = f"dicomweb+{srv.dicomweb}?Modality=CT"
    mirror = tmp_path / "mirror" / "images"
    counter = _Counter(dicomweb._retrieve_instance)
    monkeypatch.setattr(dicomweb, "_retrieve_instance", counter)

    first = dicomweb.pull(uri, mirror)
    assert (first["fetched_series"], first["instances"]) == (1, 5)
    before = dicomweb.series_state(uri)
    assert len(before) == 1 and before[0].endswith("=5")
    one = ingest(mirror, "pacs_ct", tmp_path / "ingested")
    assert (len(one.written), len(one.skipped)) == (1, 0)

    for f in files[5:]:
        srv.upload(f)
    after = dicomweb.series_state(uri)
    assert after != before and after[0].endswith("=9")  # the watcher's view changes with the count
    second = dicomweb.pull(uri, mirror)
    assert (second["fetched_series"], second["instances"], counter.fetched) == (1, 4, 9)  # the 4 new ones only
    (rec,) = json.loads(dicomweb.state_path(mirror).read_text())["series"].values()
    assert rec["instances"] == 9 and len(list(mirror.rglob("*.dcm"))) == 9
    two = ingest(mirror, "pacs_ct", tmp_path / "ingested")
    assert (len(two.written), len(two.skipped)) == (1, 0)  # the grown series is ingested again
    import nibabel as nib

    (img,) = [p for p in (tmp_path / "ingested" / "pacs_ct").rglob("*.nii.gz") if "label" not in p.name]
    assert nib.load(str(img)).shape[2] == 9
    third = dicomweb.pull(uri, mirror)
    assert (third["fetched_series"], third["instances"]) == (0, 0)


@needs_orthanc
def test_stability_window_defers_a_changing_series_until_it_is_stable(orthanc, tmp_path, monkeypatch):
    from siteadapt.io import dicomweb

    srv = orthanc
    files = _series(tmp_path / "src/d", 6, "1.2.826.0.1.3680043.8.498.7301", 4)
    for f in files[:3]:
        srv.upload(f)
    uri = f"dicomweb+{srv.dicomweb}?Modality=CT"
    mirror = tmp_path / "mirror" / "images"
    counter = _Counter(dicomweb._retrieve_instance)
    monkeypatch.setattr(dicomweb, "_retrieve_instance", counter)
    monkeypatch.setenv("SITEADAPT_DICOMWEB_STABLE_SECONDS", "60")  # the environment sets the window

    def poll(t):
        res = dicomweb.pull(uri, mirror, clock=lambda: t)
        return res["deferred_series"], res["fetched_series"], res["instances"]

    assert poll(1000.0) == (1, 0, 0)  # first seen with 3: the clock starts
    state = json.loads(dicomweb.state_path(mirror).read_text())
    assert state["series"] == {} and list(state["seen"].values()) == [{"count": 3, "since": 1000.0}]
    for f in files[3:]:
        srv.upload(f)
    assert poll(1100.0) == (1, 0, 0)  # the count changed to 6: the clock restarts
    assert poll(1130.0) == (1, 0, 0)  # stable for 30 s < 60 s
    assert counter.attempts == 0 and not any(mirror.rglob("*.dcm"))
    assert poll(1160.0) == (0, 1, 6)  # stable for 60 s: fetched whole
    state = json.loads(dicomweb.state_path(mirror).read_text())
    assert [r["instances"] for r in state["series"].values()] == [6] and state["seen"] == {}
    assert poll(1200.0) == (0, 0, 0)
    assert dicomweb.pull(uri, mirror, stable_seconds=0)["instances"] == 0 and counter.attempts == 6




@needs_orthanc
def test_watcher_waits_for_a_growing_series_and_submits_it_whole(orthanc, tmp_path):
    from siteadapt.kfp.watch import Watcher

    srv = orthanc
    files = _series(tmp_path / "src/e", 6, "1.2.826.0.1.3680043.8.498.7401", 5)
    for f in files[:4]:
        srv.upload(f)
    uri, stage = f"dicomweb+{srv.dicomweb}?Modality=CT", tmp_path / "stage"
    now = [0.0]
    rec = Recorder()
    w = Watcher(uri, str(tmp_path / "watch.json"), rec, settle_s=30, clock=lambda: now[0], site="hospital_z",
                stage=str(stage), defaults={"task": "cardiac", "source_site": "cardiac_mr",
                                            "source_uri": "s3://bucket/sites/cardiac_mr/"})
    assert w.poll() == []  # pending
    now[0] = 20.0
    for f in files[4:]:
        srv.upload(f)
    assert w.poll() == []  # the series grew: pending again from t=20
    now[0] = 40.0
    assert w.poll() == [] and not stage.exists()  # 20 s < 30 s
    now[0] = 55.0
    assert w.poll() == ["hospital_z"]
    assert len(rec.runs) == 1 and len(list((stage / "hospital_z" / "images").rglob("*.dcm"))) == 6


@needs_orthanc
def test_transient_faults_are_retried_with_exponential_backoff(orthanc, tmp_path, monkeypatch):
    from siteadapt.io import dicomweb

    srv = orthanc
    for f in _series(tmp_path / "src/f", 4, "1.2.826.0.1.3680043.8.498.7501", 6):
        srv.upload(f)
    uri = f"dicomweb+{srv.dicomweb}?Modality=CT"
    real = dicomweb._retrieve_instance
    busy = requests.Response()
    busy.status_code = 503
    faults = [requests.ConnectionError("refused"), requests.HTTPError("503", response=busy)]
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if faults:
            raise faults.pop(0)
        return real(*a, **kw)

    monkeypatch.setattr(dicomweb, "_retrieve_instance", flaky)
    delays: list[float] = []
    res = dicomweb.pull(uri, tmp_path / "mirror", retries=3, backoff_s=0.25, sleep=delays.append)
    assert (res["fetched_series"], res["instances"], res["incomplete_series"]) == (1, 4, 0)
    assert len(calls) == 6 and delays == [0.25, 0.5]  # the first instance took 3 attempts, the others one each

    # a refusal that is not transient is not retried; a transient one outlasting the retries gives up
    def gone(*a, **kw):
        calls.append(1)
        r = requests.Response()
        r.status_code = 404
        raise requests.HTTPError("404", response=r)

    calls.clear()
    delays.clear()
    with pytest.raises(dicomweb.DicomwebError, match="HTTP 404") as e:
        dicomweb._with_retry(gone, srv.dicomweb, "WADO-RS instance retrieve", retries=3, backoff_s=1,
                             sleep=delays.append)
    assert (len(calls), delays, e.value.http_status, e.value.transient) == (1, [], 404, False)

    def down():
        calls.append(1)
        raise requests.ConnectionError("refused")

    calls.clear()
    with pytest.raises(dicomweb.DicomwebError, match="cannot reach") as e:
        dicomweb._with_retry(down, srv.dicomweb, "QIDO-RS series search", retries=2, backoff_s=1, sleep=delays.append)
    assert (len(calls), delays, e.value.transient) == (3, [1, 2], True)


@needs_orthanc
def test_a_killed_pull_resumes_where_it_stopped(orthanc, tmp_path, monkeypatch):
    """The process dies (KeyboardInterrupt, which nothing catches) after 3 of 8 instances: nothing is recorded, the
    3 files wait in staging, and the next pull fetches the other 5 only."""
    from siteadapt.io import dicomweb

    srv = orthanc
    for f in _series(tmp_path / "src/g", 8, "1.2.826.0.1.3680043.8.498.7601", 7):
        srv.upload(f)
    uri = f"dicomweb+{srv.dicomweb}?Modality=CT"
    mirror = tmp_path / "mirror" / "images"
    real = dicomweb._retrieve_instance
    fetched = []

    def dies_after_3(*a, **kw):
        if len(fetched) == 3:
            raise KeyboardInterrupt
        fetched.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(dicomweb, "_retrieve_instance", dies_after_3)
    with pytest.raises(KeyboardInterrupt):
        dicomweb.pull(uri, mirror)
    assert not dicomweb.state_path(mirror).exists() or json.loads(dicomweb.state_path(mirror).read_text())[
        "series"] == {}
    assert len(list(dicomweb.partial_path(mirror).rglob("*.dcm"))) == 3 and not list(mirror.rglob("*.dcm"))
    counter = _Counter(real)
    monkeypatch.setattr(dicomweb, "_retrieve_instance", counter)
    res = dicomweb.pull(uri, mirror)
    assert (res["fetched_series"], res["instances"], counter.attempts) == (1, 5, 5)
    assert len(list(mirror.rglob("*.dcm"))) == 8 and not dicomweb.partial_path(mirror).exists()
