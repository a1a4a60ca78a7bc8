"""The DVC pipeline end to end on a tiny project, with MLflow tracking and registry on a real `mlflow server` process,
and the DVC remote on a local S3-compatible server (moto).

One tiny project is reproduced once per session (chest X-ray task, 32 px, 4 iterations, noadapt + histmatch); tests
that change it work on git clones that share its DVC cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import dvc_project as dp
from siteadapt.io.atomic import sha256_file

# every test uses the session fixture `pipeline` (a whole `dvc repro` of a tiny project, ~41 s idle) and most run
# DVC again on a clone (8-24 s each): the module is the slow tier's biggest part
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a free port (its own sqlite store and artifact folder)."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(dp.BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=dp.env())
        self.root = root

    def wait(self, timeout: float = 240.0) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, mlflow_server):
    """The tiny project after `dvc repro` (tracking on the server), with dvc.lock and metrics committed."""
    root = dp.make_project(tmp_path_factory.mktemp("pipeline") / "proj", dp.tiny_params(["noadapt", "histmatch"]))
    dp.dvc("repro", "preprocess", cwd=root)  # data stages first, while the tracking server starts
    url = mlflow_server.wait()
    env = {"MLFLOW_TRACKING_URI": url}
    t0 = time.perf_counter()
    res = dp.dvc("repro", cwd=root, extra_env=env)
    secs = time.perf_counter() - t0
    dp.run(["git", "add", "-A"], root)
    dp.run(["git", "commit", "-q", "-m", "repro"], root)
    return SimpleNamespace(root=root, url=url, env=env, repro=res.stdout + res.stderr, seconds=secs)


def clone(base: Path, dest: Path) -> Path:
    """A git clone of the project that uses its DVC cache (no data copied over a remote)."""
    dp.run(["git", "clone", "-q", str(base), str(dest)], base.parent)
    dp.git_identity(dest)
    dp.dvc("cache", "dir", "--local", str(base / ".dvc" / "cache"), cwd=dest)
    dp.dvc("checkout", "-q", cwd=dest)
    return dest


# ---- the pipeline and what MLflow holds ------------------------------------------------------------------------------
def test_repro_runs_every_stage_and_tracks_runs(pipeline):
    root = pipeline.root
    ran = dp.ran_stages(pipeline.repro)
    for st in ("train_source@cxr_a", "adapt@cxr_b-noadapt", "adapt@cxr_b-histmatch", "evaluate@cxr_b-histmatch",
               "select@cxr_b", "report"):
        assert st in ran
    assert "up to date" in dp.dvc("status", cwd=root).stdout
    assert (root / "reports/chestxray/table.md").is_file() and (root / "reports/chestxray/ablation.md").is_file()
    m = json.loads((root / "metrics/chestxray/cxr_b/histmatch.json").read_text())
    assert m["labeled"] is True and 0 <= m["plausibility"]["empty_fraction"] <= 1

    from mlflow.tracking import MlflowClient

    c = MlflowClient(pipeline.url, registry_uri=pipeline.url)
    exp = c.get_experiment_by_name("siteadapt-chestxray")
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}
    src = runs["train_source/cxr_a/source"]
    steps = [h.step for h in c.get_metric_history(src.info.run_id, "train/seg")]
    assert steps == [2, 4]  # the engine's curve, every log_every iterations
    assert src.data.params["option.lr"] == "0.0002" and src.data.params["profile.image_size"] == "32"
    head = dp.run(["git", "rev-list", "--max-parents=0", "HEAD"], root).stdout.strip()
    assert src.data.tags["git_commit"] == head
    import torch  # the environment a seed's numbers depend on
    assert src.data.tags["env.torch"] == torch.__version__ and src.data.tags["env.cpu_capability"]
    assert src.data.tags["data.source.manifest_sha256"] == sha256_file(root / "data/ingested/cxr_a/manifest.json")
    hm = runs["adapt/cxr_b/histmatch"]  # evaluate re-opened the adapt run
    assert "eval/dice_mean" in hm.data.metrics and "eval/empty_fraction" in hm.data.metrics
    arts = [a.path for a in c.list_artifacts(hm.info.run_id, "images/overlays")]
    assert arts and all(a.endswith(".png") for a in arts)
    assert hm.data.tags["data.target.manifest_sha256"] == sha256_file(root / "data/ingested/cxr_b/manifest.json")


def test_registry_two_versions_promote_one_refuse_one(pipeline, monkeypatch):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from siteadapt.config import load_settings
    from siteadapt.registry.promote import promote
    from siteadapt.registry.register import register_model

    root, url = pipeline.root, pipeline.url
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    c = MlflowClient(url, registry_uri=url)  # other in-process tests may have set a global registry URI
    name = "siteadapt-chestxray-cxr_b"
    # the select stage registered one model, its label-free choice, as the candidate, with the evidence as tags
    sel = json.loads((root / "registry/chestxray/cxr_b/selection.json").read_text())
    registered = {v.tags["method"]: v for v in c.search_model_versions(f"name='{name}'")}
    assert set(registered) == {sel["winner"]} and sel["rule"] == "label_free"
    assert sel["registered"]["name"] == name and sel["registered"]["alias"] == "candidate"
    cand = c.get_model_version_by_alias(name, "candidate")
    assert cand.version == sel["registered"]["version"] and cand.tags["selection.rule"] == "label_free"
    # the other method registered by hand (`siteadapt register`): two versions
    s = load_settings("params.yaml")
    for m in {"noadapt", "histmatch"} - set(registered):
        register_model(s, "cxr_b", m)
    by_method = {v.tags["method"]: v for v in c.search_model_versions(f"name='{name}'")}
    assert {"noadapt", "histmatch"} == set(by_method)
    for method, v in by_method.items():  # tags: method, sites, data hashes, params, gate measurements
        assert v.tags["source_site"] == "cxr_a" and v.tags["target_site"] == "cxr_b"
        assert v.tags["data.target.manifest_sha256"] == sha256_file(root / "data/ingested/cxr_b/manifest.json")
        assert "gate.target_dice" in v.tags and json.loads(v.tags["params"]) is not None

    # the registered model loads through mlflow.pyfunc and segments preprocessed slices
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{by_method['histmatch'].version}")
    x = np.load(root / "data/prepared/cxr_b/test.npz")["images"][:, None].astype(np.float32)
    assert model.predict(x).shape == x[:, 0].shape

    # make histmatch the candidate (same weights: its version is re-used, only the alias moves)
    got = register_model(s, "cxr_b", "histmatch")
    assert got == {"name": name, "version": by_method["histmatch"].version, "alias": "candidate",
                   "run_id": by_method["histmatch"].run_id}

    # promote with a gate it passes
    lenient = s.model_copy(update={"registry": s.registry.model_copy(update={
        "gates": s.registry.gates.model_copy(update={"min_target_dice": 0.0})})})
    res = promote(lenient, "cxr_b", actor="alice", reason="test promotion", override_gates=True)  # 0.5 recorded
    assert res["promoted"] and res["version"] == got["version"]
    assert res["gates"][0]["name"] == "min_target_dice" and res["gates"][0]["passed"]
    champ = c.get_model_version_by_alias(name, "champion")
    assert champ.version == got["version"]
    assert champ.tags["promotion.actor_note"] == "alice" and champ.tags["promotion_reason"] == "test promotion"
    assert json.loads(champ.tags["promotion.override.gates"]) == [
        {"gate": "min_target_dice", "recorded": 0.5, "requested": 0.0}]
    assert champ.tags["promoted_at"]

    # the other version becomes candidate and is refused by a strict gate, from the CLI: gate name and value shown
    assert register_model(s, "cxr_b", "noadapt")["version"] == by_method["noadapt"].version
    strict = yaml.safe_load((root / "params.yaml").read_text())
    strict["registry"]["gates"]["min_target_dice"] = 1.0
    (root / "strict.yaml").write_text(yaml.safe_dump(strict))
    r = dp.siteadapt("--params", "strict.yaml", "promote", "--site", "cxr_b", cwd=root, extra_env=pipeline.env,
                     check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    value = float(by_method["noadapt"].tags["gate.target_dice"])
    assert f"refused: gate min_target_dice failed with value {value:.4f} (threshold 1.0)" in r.stderr
    assert c.get_model_version_by_alias(name, "champion").version == got["version"]  # champion unchanged
    refused = c.get_model_version(name, by_method["noadapt"].version)
    assert "min_target_dice" in refused.tags["promotion_refused_gates"]
    history = [k for k in c.get_registered_model(name).tags if k.startswith("promotion.")]
    assert len(history) >= 2


# ---- DVC decides what runs -----------------------------------------------------------------------------------------
def test_adding_a_site_runs_only_its_stages(pipeline, tmp_path):
    repo = clone(pipeline.root, tmp_path / "clone")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    # a new hospital without labels, its images in a folder (here: the synthetic PNG site's export)
    p["sites"]["cxr_c"] = {"task": "chestxray", "images": "data/raw/chestxray/cxr_b/images", "modality": "DX",
                           "pixel_spacing_mm": 5.6}
    p["tasks"]["chestxray"]["directions"].append({"source": "cxr_a", "target": "cxr_c"})
    dp.write_params(repo, p)
    stale = dp.siteadapt("dvc-gen", "--check", cwd=repo, check=False)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    dp.siteadapt("dvc-gen", cwd=repo)
    # DVC's own view: the stages that changed are the new site's and the report (which reads every metrics file)
    status = dp.dvc("status", cwd=repo).stdout
    new = {"ingest@cxr_c", "preprocess@cxr_c", "adapt@cxr_c-noadapt", "adapt@cxr_c-histmatch",
           "evaluate@cxr_c-noadapt", "evaluate@cxr_c-histmatch", "select@cxr_c"}
    assert set(dp.status_stages(status)) == new | {"report"}, status
    # and DVC runs them alone: the new site's data stages, every other stage is skipped as unchanged
    out = dp.dvc("repro", "preprocess", cwd=repo, extra_env=pipeline.env).stdout
    assert dp.ran_stages(out) == ["ingest@cxr_c", "preprocess@cxr_c"], out
    for old in ("synth@chestxray", "ingest@cxr_a", "ingest@cxr_b", "preprocess@cxr_a", "preprocess@cxr_b"):
        assert f"Stage '{old}' didn't change, skipping" in out
    assert set(dp.status_stages(dp.dvc("status", cwd=repo).stdout)) == new - {"ingest@cxr_c", "preprocess@cxr_c"} \
        | {"report"}


def test_adding_the_classification_task_changes_only_its_stages(pipeline, tmp_path):
    """pipeline.tasks opts a task in: with pneumonia (classification) added, DVC sees its stages and the report as
    new or changed, and every chest X-ray stage as unchanged although the stage templates gained per-item keys."""
    repo = clone(pipeline.root, tmp_path / "clone")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    full = yaml.safe_load((dp.REPO / "params.yaml").read_text())
    p["sites"] |= {k: v for k, v in full["sites"].items() if v["task"] == "pneumonia"}
    p["tasks"]["pneumonia"] = full["tasks"]["pneumonia"]
    p["pipeline"] = {"tasks": ["chestxray", "pneumonia"]}
    p["profiles"]["test"] |= {"adapt_iterations": 4, "synth_images_classification": 20}
    dp.write_params(repo, p)
    dp.siteadapt("dvc-gen", cwd=repo)
    status = dp.dvc("status", cwd=repo).stdout
    methods = full["tasks"]["pneumonia"]["methods"]
    new = {"synth@pneumonia", "ingest@adult", "ingest@pediatric", "preprocess@adult", "preprocess@pediatric",
           "train_source@adult"} | {f"{st}@pediatric-{m}" for st in ("adapt", "evaluate") for m in methods} \
        | {"select@pediatric"}
    assert set(dp.status_stages(status)) == new | {"report"}, status


def test_code_edits_change_the_stages_that_import_the_code(pipeline, tmp_path):
    """The project commits its copy of the code (src/siteadapt) and each stage depends on the files of the modules
    it imports (siteadapt.dvcgen): an edit in metrics/ changes the evaluate stages, and the target's select stage,
    whose classification evidence computes the source AUC with metrics.auc; an edit of the training loop changes the training
    stages (their new models then re-run what reads them); an edit of code no stage imports changes none."""
    repo = clone(pipeline.root, tmp_path / "clone")
    assert "up to date" in dp.dvc("status", cwd=repo).stdout

    def changed_by_editing(rel: str) -> set[str]:
        f = repo / "src/siteadapt" / rel
        f.write_text(f.read_text() + "\n# an edit of the code's bytes only\n")
        try:
            return set(dp.status_stages(dp.dvc("status", cwd=repo).stdout))
        finally:
            dp.run(["git", "checkout", "--", str(f)], repo)

    methods = ("noadapt", "histmatch")
    assert changed_by_editing("metrics/segmentation.py") == \
        {f"evaluate@cxr_b-{m}" for m in methods} | {"select@cxr_b"}
    # select@: when no adaptation wins without a run of its own, `siteadapt select --register` makes that run
    # (steps.api.adapt, which runs the engine for the methods that train)
    assert changed_by_editing("train/engine.py") == {"train_source@cxr_a", "select@cxr_b"} | {
        f"adapt@cxr_b-{m}" for m in methods}
    assert changed_by_editing("methods/histmatch.py") == \
        {"adapt@cxr_b-histmatch", "evaluate@cxr_b-histmatch", "select@cxr_b", "report"}  # report: its options
    assert changed_by_editing("io/dicom/assemble.py") == {"ingest@cxr_a", "ingest@cxr_b"}
    assert changed_by_editing("cli.py") == set()  # holds every command: no stage lists it (see dvcgen)
    assert "up to date" in dp.dvc("status", cwd=repo).stdout


def test_exp_run_reruns_only_the_changed_method_and_reports_the_ablation(pipeline, tmp_path):
    repo = clone(pipeline.root, tmp_path / "clone")
    r = dp.dvc("exp", "run", "-n", "hm-q16", "-S", "methods.histmatch.n_quantiles=16", cwd=repo,
               extra_env=pipeline.env)
    assert sorted(dp.ran_stages(r.stdout + r.stderr)) == sorted(
        ["adapt@cxr_b-histmatch", "evaluate@cxr_b-histmatch", "select@cxr_b", "report"])
    dp.siteadapt("report", "--experiments", cwd=repo, extra_env=pipeline.env)
    table = (repo / "reports/chestxray/experiments.md").read_text()
    row = [ln for ln in table.splitlines() if ln.startswith("| hm-q16 ")]
    assert row and "methods.histmatch.n_quantiles=16" in row[0]
    assert "| baseline (main) | - |" in table


# ---- storage: DVC remote and object-store folders on a local S3-compatible server ---------------------------------
@pytest.fixture
def s3(monkeypatch):
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="siteadapt")
    yield env
    srv.stop()


def test_s3_roundtrip_push_pull_reproduce(pipeline, s3, tmp_path, monkeypatch):
    pusher = clone(pipeline.root, tmp_path / "pusher")
    dp.dvc("remote", "add", "-d", "store", "s3://siteadapt/dvc", cwd=pusher)  # endpoint: AWS_ENDPOINT_URL
    dp.run(["git", "commit", "-q", "-am", "dvc remote"], pusher)
    assert "store" in (pusher / ".dvc/config").read_text() and "testing" not in (pusher / ".dvc/config").read_text()
    dp.dvc("push", cwd=pusher, extra_env=s3)

    fresh = tmp_path / "fresh"  # a clean checkout elsewhere: no cache, no data
    dp.run(["git", "clone", "-q", str(pusher), str(fresh)], tmp_path)
    assert not (fresh / "data").exists()
    dp.dvc("pull", cwd=fresh, extra_env=s3)
    assert "up to date" in dp.dvc("status", cwd=fresh).stdout
    assert dp.ran_stages(dp.dvc("repro", cwd=fresh, extra_env={**s3, **pipeline.env}).stdout) == []
    r = dp.dvc("repro", "-f", "-s", "report", cwd=fresh, extra_env={**s3, **pipeline.env})
    assert dp.ran_stages(r.stdout) == ["report"]
    assert (fresh / "reports/chestxray/table.md").read_text() == \
        (pipeline.root / "reports/chestxray/table.md").read_text()

    # siteadapt's own object-store paths: a site folder on S3 is mirrored and ingested; reports sync up and down
    from siteadapt import storage
    from siteadapt.cli import main

    storage.upload(fresh / "data/raw/chestxray/cxr_b/images", "s3://siteadapt/hospital-c/images")
    again = storage.upload(fresh / "data/raw/chestxray/cxr_b/images", "s3://siteadapt/hospital-c/images")
    assert again["uploaded"] == 0  # unchanged files are not sent again
    p = yaml.safe_load((fresh / "params.yaml").read_text())
    p["sites"]["cxr_s3"] = {"task": "chestxray", "images": "s3://siteadapt/hospital-c/images", "modality": "DX",
                            "pixel_spacing_mm": 5.6}
    dp.write_params(fresh, p)
    monkeypatch.chdir(fresh)
    monkeypatch.setenv("SITEADAPT_DEID_KEY", "test-key-not-secret")
    assert main(["ingest", "--site", "cxr_s3"]) == 0
    man = json.loads((fresh / "data/ingested/cxr_s3/manifest.json").read_text())
    assert len(man["items"]) == len(list((fresh / "data/raw/chestxray/cxr_b/images").iterdir()))
    assert main(["sync", "reports", "s3://siteadapt/results/reports"]) == 0
    assert main(["sync", "s3://siteadapt/results/reports", str(tmp_path / "down")]) == 0
    assert (tmp_path / "down/chestxray/table.md").read_text() == (fresh / "reports/chestxray/table.md").read_text()
