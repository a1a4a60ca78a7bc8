"""The watcher on a local S3-compatible server: one run per new site prefix, never twice, across restarts.

The runs go through the local submitter (``kfp.local``) with a probe pipeline that has the site-adaptation
pipeline's parameters and one step: it lists the site's location on the object store (so each run demonstrably saw its
site) and records itself. The full pipeline under kfp.local is tested in ``test_kfp_local.py``.
"""

# no `from __future__ import annotations`: KFP reads the probe's annotations as real types

import json
from pathlib import Path
from typing import List

import pytest

pytest.importorskip("kfp")
pytest.importorskip("moto.server")  # the `s3` fixture (conftest.py)
boto3 = pytest.importorskip("boto3")

from kfp import dsl  # noqa: E402

from siteadapt.kfp.submit import LocalSubmitter  # noqa: E402
from siteadapt.kfp.watch import Watcher  # noqa: E402

from helpers.s3 import BUCKET  # noqa: E402

PREFIX = f"s3://{BUCKET}/sites/"


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def probe(site: str, target_uri: str, task: str, source_site: str, record_dir: str) -> int:
    """Lists the site's location (on the object store) and records the run."""
    import json
    import os

    from siteadapt.kfp import locations

    files = [e.rel for e in locations.list_files(target_uri)]
    with open(os.path.join(record_dir, f"{site}.{os.getpid()}.json"), "w") as fh:
        json.dump({"site": site, "target_uri": target_uri, "task": task, "source_site": source_site,
                   "files": files}, fh)
    return len(files)


@dsl.pipeline(name="watch-probe")
def probe_pipeline(site: str, target_uri: str, source_uri: str, record_dir: str, task: str = "cardiac",
                   source_site: str = "cardiac_mr", methods: List[str] = ["noadapt"], profile: str = "tiny",
                   target_modality: str = "", target_pixel_spacing_mm: float = 0.0):
    probe(site=site, target_uri=target_uri, task=task, source_site=source_site, record_dir=record_dir)


def _upload_site(client, site: str, n: int = 2, extra=None):
    for i in range(n):
        client.put_object(Bucket=BUCKET, Key=f"sites/{site}/images/s{i}/IM{i}.dcm", Body=b"DICM" * (i + 1))
    for name, body in (extra or {}).items():
        client.put_object(Bucket=BUCKET, Key=f"sites/{site}/{name}", Body=body.encode())


def _records(d: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]


DEFAULTS = {"task": "chestxray", "source_site": "cxr_a", "source_uri": "s3://reference/sites/cxr_a/"}


def test_two_new_sites_two_runs_and_a_restart_submits_none(s3, tmp_path):
    record = tmp_path / "runs"
    record.mkdir()
    state = PREFIX + ".siteadapt-watch.json"
    submitter = LocalSubmitter(tmp_path / "kfp", pipeline_func=probe_pipeline, cache=False)
    defaults = {**DEFAULTS, "record_dir": str(record)}

    w = Watcher(PREFIX, state, submitter, defaults=defaults)
    assert w.poll() == []  # nothing uploaded yet
    _upload_site(s3, "hospital_a", 2)
    _upload_site(s3, "hospital_b", 3, extra={"site.yaml": "modality: DX\npixel_spacing_mm: 0.5\n"})
    assert sorted(w.poll()) == ["hospital_a", "hospital_b"]
    runs = _records(record)
    assert sorted(r["site"] for r in runs) == ["hospital_a", "hospital_b"]
    by_site = {r["site"]: r for r in runs}
    assert by_site["hospital_a"]["target_uri"] == PREFIX + "hospital_a/"
    assert by_site["hospital_a"]["files"] == ["images/s0/IM0.dcm", "images/s1/IM1.dcm"]  # the run read S3
    assert by_site["hospital_b"]["task"] == "chestxray" and len(by_site["hospital_b"]["files"]) == 4
    assert w.poll() == []  # the same watcher: nothing new

    # a restarted watcher (a new process: state from the object store) submits nothing, even after more uploads
    _upload_site(s3, "hospital_a", 4)  # more files in a site that already ran: not a new site
    w2 = Watcher(PREFIX, state, LocalSubmitter(tmp_path / "kfp2", pipeline_func=probe_pipeline, cache=False),
                 defaults=defaults)
    assert w2.recover() == [] and w2.poll() == []
    assert len(_records(record)) == 2
    saved = json.loads(s3.get_object(Bucket=BUCKET, Key="sites/.siteadapt-watch.json")["Body"].read())
    assert {k: v["state"] for k, v in saved["sites"].items()} == {"hospital_a": "submitted",
                                                                  "hospital_b": "submitted"}
    assert saved["sites"]["hospital_b"]["arguments"]["target_modality"] == "DX"
    assert saved["sites"]["hospital_b"]["arguments"]["target_pixel_spacing_mm"] == 0.5


class FakeServer:
    """A submitter with a server's memory of runs, that can fail on demand."""

    can_find = True

    def __init__(self):
        self.runs: dict[str, dict] = {}
        self.fail_next = False
        self.accept_then_fail = False

    def submit(self, run_name, arguments):
        if self.accept_then_fail:  # the server created the run, the client saw a timeout
            self.accept_then_fail = False
            self.runs[run_name] = arguments
            raise TimeoutError("read timed out")
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("server unavailable")
        self.runs[run_name] = arguments
        return f"id-{len(self.runs)}"

    def find(self, run_name):
        return f"found-{run_name}" if run_name in self.runs else None


def test_interrupted_submissions_are_settled_once(s3, tmp_path):
    state = str(tmp_path / "state.json")
    server = FakeServer()
    _upload_site(s3, "site_x")
    _upload_site(s3, "site_y")
    server.fail_next = True  # site_x: the server is down
    server.accept_then_fail = False
    w = Watcher(PREFIX, state, server, defaults=DEFAULTS)
    assert w.poll() == ["site_y"]
    assert w.sites["site_x"]["state"] == "submitting"
    assert w.recover() == ["site_x"]  # server has no such run: submitted now
    assert len(server.runs) == 2 and w.sites["site_x"]["state"] == "submitted"

    _upload_site(s3, "site_z")
    server.accept_then_fail = True  # created on the server, but the watcher did not learn the id
    assert Watcher(PREFIX, state, server, defaults=DEFAULTS).poll() == []
    restarted = Watcher(PREFIX, state, server, defaults=DEFAULTS)
    assert restarted.recover() == ["site_z"]
    assert restarted.sites["site_z"]["run_id"].startswith("found-")
    assert len(server.runs) == 3  # never a second run of site_z


def test_readiness_rules_and_refused_sites(s3, tmp_path):
    server = FakeServer()
    now = [1000.0]
    w = Watcher(PREFIX, str(tmp_path / "s.json"), server, defaults=DEFAULTS, marker="_READY", clock=lambda: now[0])
    _upload_site(s3, "slow_upload")
    assert w.poll() == []  # no marker yet
    s3.put_object(Bucket=BUCKET, Key="sites/slow_upload/_READY", Body=b"")
    assert w.poll() == ["slow_upload"]

    w2 = Watcher(PREFIX, str(tmp_path / "s2.json"), server, defaults=DEFAULTS, settle_s=30, clock=lambda: now[0])
    w2.sites.update(w.sites)
    _upload_site(s3, "settling")
    assert w2.poll() == []  # first sight: pending
    now[0] += 10
    assert w2.poll() == []  # unchanged, but not for 30 s
    _upload_site(s3, "settling", 3)  # still uploading: the clock restarts
    now[0] += 25
    assert w2.poll() == []
    now[0] += 31
    assert w2.poll() == ["settling"]

    _upload_site(s3, "Bad Name")
    _upload_site(s3, "typo_site", extra={"site.yaml": "modalty: CT\n"})
    w3 = Watcher(PREFIX, str(tmp_path / "s3.json"), server, defaults=DEFAULTS)
    w3.sites.update({k: v for k, v in w2.sites.items()})
    assert w3.poll() == []
    assert w3.sites["Bad Name"]["state"] == "invalid" and "site name" in w3.sites["Bad Name"]["reason"]
    assert "modalty" in w3.sites["typo_site"]["reason"]
    n = len(server.runs)
    s3.put_object(Bucket=BUCKET, Key="sites/typo_site/site.yaml", Body=b"modality: CT\n")  # fixed: retried
    assert w3.poll() == ["typo_site"] and len(server.runs) == n + 1
    assert server.runs[w3.sites["typo_site"]["run_name"]]["target_modality"] == "CT"


def test_watch_cli_on_a_folder(tmp_path, monkeypatch):
    """``siteadapt watch --once`` on a local folder, KFP submitter against a fake client."""
    import siteadapt.kfp.submit as S
    from siteadapt.cli import main

    created = []

    class FakeClient:
        def __init__(self, host=None, namespace=None):
            self.host = host

        def create_run_from_pipeline_package(self, package, arguments, run_name, experiment_name, namespace,
                                             service_account):
            assert Path(package).is_file()
            created.append((run_name, arguments, experiment_name))
            return type("R", (), {"run_id": f"r{len(created)}"})()

    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    sites = tmp_path / "sites"
    for name in ("h1", "h2"):
        (sites / name / "images").mkdir(parents=True)
        (sites / name / "images" / "x.png").write_bytes(b"png")
    args = ["watch", "--prefix", str(sites), "--once", "--host", "http://kfp.example:8888", "--task", "chestxray",
            "--source-site", "cxr_a", "--source-uri", "s3://ref/cxr_a/", "--methods", "histmatch,sifa"]
    assert main(args) == 0
    assert sorted(r[0].rsplit("-", 1)[0] for r in created) == ["siteadapt-h1", "siteadapt-h2"]
    assert created[0][1]["methods"] == ["histmatch", "sifa"] and created[0][2] == "siteadapt"
    assert main(args) == 0 and len(created) == 2  # state in sites/.siteadapt-watch.json: nothing twice
    assert (sites / ".siteadapt-watch.json").is_file()
    assert S.KfpSubmitter.can_find
