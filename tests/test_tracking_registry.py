"""Tracking failure modes, dvc.yaml generation, promotion gates and the label-free checks (no server, no DVC run)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import dvc_project as dp
from siteadapt import dvcgen
from siteadapt.cli import main
from siteadapt.config import Gates, load_settings, parse_settings
from siteadapt.errors import ConfigError
from siteadapt.metrics.plausibility import shape_checks, summarize_plausibility

REPO = dp.REPO


def test_checked_in_dvc_yaml_is_what_params_give():
    s = load_settings(REPO / "params.yaml")
    assert dvcgen.check(s, REPO / "params.yaml", REPO / "dvc.yaml") is None, \
        "dvc.yaml is stale: run `siteadapt dvc-gen` and commit it"


def test_stage_params_are_narrow_and_topology_is_resolved():
    s = load_settings(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    st = dvcgen.build(s, raw, REPO)["stages"]
    flat = json.dumps(st)
    assert "directions" not in flat and "tasks.cardiac.methods" not in flat  # topology is baked in, not a param
    assert "methods.${item.method}" in st["adapt"]["do"]["params"]
    assert "profiles.${profile}.iterations" in st["adapt"]["do"]["params"]
    # ingest reads its site and the label values the task allows (a removed structure id re-runs ingest)
    assert st["ingest"]["do"]["params"] == ["sites.${key}", "${item.p0}"]
    assert st["ingest"]["foreach"]["cardiac_ct"]["p0"] == "tasks.cardiac.structures"
    assert st["ingest"]["foreach"]["cxr_b"]["p0"] == "tasks.chestxray.structures"
    assert st["preprocess"]["foreach"]["cxr_a"]["roi_rule"] == "labels"  # a pure source site crops on its labels
    assert st["preprocess"]["foreach"]["cxr_b"]["roi_rule"] == "foreground"  # a target never does
    assert st["adapt"]["foreach"]["cxr_b-histmatch"]["source_model"] == "models/chestxray/cxr_a/source"
    assert st["adapt"]["foreach"]["cxr_b-supervised"]["source_model"] == "data/prepared/cxr_b"  # not needed
    # one candidate choice per target; upper bounds never compete
    assert set(st["select"]["foreach"]) == {"cardiac_ct", "cardiac_mr", "cxr_b"}
    assert not any("supervised" in str(v) for v in st["select"]["foreach"]["cxr_b"].values())
    assert {v for k, v in st["select"]["foreach"]["cxr_b"].items() if k.startswith("c") and k[1:].isdigit()} == {
        f"{d}/chestxray/cxr_b/{m}{x}" for m in ("noadapt", "histmatch", "adabn", "tent", "seuda")
        for d, x in (("models", ""), ("metrics", ".json"))}
    assert set(st["adapt"]["foreach"]) == {f"{t}-{m}" for t in ("cardiac_ct", "cardiac_mr") for m in (
        "supervised", "noadapt", "histmatch", "sifa")} | {f"cxr_b-{m}" for m in ("supervised", "noadapt",
                                                                                "histmatch", "adabn", "tent",
                                                                                "seuda")}
    # every listed key must exist in params.yaml (DVC refuses missing ones): the generator names what is missing
    del raw["methods"]["histmatch"]
    with pytest.raises(ConfigError, match="methods.histmatch"):
        dvcgen.build(s, raw, REPO)


def _rendered(group: dict) -> dict[str, set[str]]:
    """What DVC records per item of a generated ``foreach`` stage: its params keys after interpolation (a repeated
    key counts once)."""
    out = {}
    for key, item in group["foreach"].items():
        keys = set()
        for p in group["do"]["params"]:
            v = p.replace("${key}", key)
            for field, val in item.items():
                v = v.replace(f"${{item.{field}}}", str(val))
            keys.add(v)
        out[key] = keys
    return out


def test_classification_task_is_opt_in_and_leaves_the_other_stages_alone():
    """pipeline.tasks picks the tasks of dvc.yaml; adding the classification task adds its stages with the keys
    they read (classes, the task's method_options, the adaptation schedule) and renders every other stage as before."""
    s = load_settings(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["pipeline"]["tasks"] == ["cardiac", "chestxray"] and s.pipeline_tasks() == ["cardiac", "chestxray"]
    default = dvcgen.build(s, raw, REPO)["stages"]
    assert "pneumonia" not in json.dumps(default)

    raw_all = {**raw, "pipeline": {"tasks": ["cardiac", "chestxray", "pneumonia"]}}
    st = dvcgen.build(parse_settings(raw_all), raw_all, REPO)["stages"]
    for group in ("ingest", "preprocess", "train_source", "adapt", "evaluate", "select"):
        old, new = _rendered(default[group]), _rendered(st[group])
        assert {k: new[k] for k in old} == old, group  # the segmentation stages are what they were
    r = _rendered(st["adapt"])
    assert {"tasks.pneumonia.classes", "tasks.pneumonia.method_options.tunanet", "methods.tunanet",
            "profiles.${profile}.adapt_iterations"} <= r["pediatric-tunanet"]
    assert not any("structures" in k or "postprocess" in k for k in r["pediatric-tunanet"])
    assert "tasks.pneumonia.method_options.cyclegan" not in r["pediatric-tunanet"]  # only its own options
    assert "profiles.${profile}.adapt_iterations" not in r["pediatric-supervised"]
    assert "tasks.pneumonia.method_options.source" in _rendered(st["train_source"])["adult"]
    assert "tasks.pneumonia.classes" in _rendered(st["ingest"])["pediatric"]
    assert _rendered(st["evaluate"])["pediatric-noadapt"] == {"seed", "tasks.pneumonia.classes", "tasks.pneumonia.kind"}
    assert "pediatric" in st["select"]["foreach"]
    assert not any("supervised" in str(v) for v in st["select"]["foreach"]["pediatric"].values())
    assert st["synth"]["foreach"]["pneumonia"]["count"] == "synth_images_classification"
    assert "reports/pneumonia/table.md" in st["report"]["outs"]

    # every listed key must exist in params.yaml: a profile without the adaptation schedule is named
    del raw_all["profiles"]["paper"]["adapt_iterations"]
    with pytest.raises(ConfigError, match="profiles.paper.adapt_iterations"):
        dvcgen.build(parse_settings(raw_all), raw_all, REPO)
    with pytest.raises(ConfigError, match="pipeline.tasks.0: unknown task 'pneumonai'"):
        parse_settings({**raw, "pipeline": {"tasks": ["pneumonai"]}})


def test_preprocess_refuses_a_stale_role(tmp_path, capsys):
    p = dp.tiny_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    rc = main(["--params", str(tmp_path / "params.yaml"), "preprocess", "--site", "cxr_b", "--roi-rule", "labels"])
    assert rc == 2 and "dvc-gen" in capsys.readouterr().err


def test_stopped_tracking_server_fails_fast_naming_the_uri(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port where nothing listens (= a stopped server)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dp.tiny_params()))
    t0 = time.perf_counter()
    rc = main(["train-source", "--site", "cxr_a"])
    assert rc == 2 and time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert uri in err and "not reachable" in err
    assert not (tmp_path / "models").exists()  # nothing half-written


def test_tracking_can_be_switched_off(monkeypatch):
    from siteadapt import tracking

    monkeypatch.setenv("SITEADAPT_TRACKING", "off")
    s = load_settings(REPO / "params.yaml")
    with tracking.stage_run(s, stage="adapt", task="cardiac", site="cardiac_ct") as run:
        run.log_metrics({"a": 1.0})
        assert run.tracker is None


def test_default_store_is_sqlite_in_the_project_and_env_overrides(monkeypatch, tmp_path):
    from siteadapt import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@mlflow:5000")
    assert tracking.tracking_uri(tmp_path) == "http://user:secret@mlflow:5000"
    assert tracking.redact(tracking.tracking_uri()) == "http://mlflow:5000"


def test_gates_labeled_and_label_free():
    from siteadapt.registry.gates import check_gates

    g = Gates()
    labeled = {"target_dice": 0.42, "source_dice_drop": 0.5, "empty_fraction": 0.0, "fragmented_fraction": 0.0}
    res = check_gates(g, labeled)
    assert res == [{"name": "min_target_dice", "value": 0.42, "threshold": 0.5, "passed": False}]
    unlabeled = {"target_dice": None, "source_dice_drop": 0.02, "empty_fraction": 0.3, "fragmented_fraction": None}
    res = {r["name"]: r for r in check_gates(g, unlabeled)}
    assert set(res) == {"max_source_dice_drop", "max_empty_fraction", "max_fragmented_fraction"}
    assert res["max_source_dice_drop"]["passed"] and not res["max_empty_fraction"]["passed"]
    assert not res["max_fragmented_fraction"]["passed"] and res["max_fragmented_fraction"]["value"] is None
    both = check_gates(g.model_copy(update={"label_free": "always", "max_fragmented_fraction": None}), labeled)
    assert [r["name"] for r in both] == ["min_target_dice", "max_source_dice_drop", "max_empty_fraction"]


def test_gates_classification():
    from siteadapt.registry.gates import check_gates

    g = Gates()
    labeled = {"target_auc": 0.65, "source_auc_drop": 0.3}
    assert check_gates(g, labeled) == [{"name": "min_target_auc", "value": 0.65, "threshold": 0.7, "passed": False}]
    unlabeled = {"target_auc": None, "source_auc_drop": 0.05}
    assert check_gates(g, unlabeled) == [{"name": "max_source_auc_drop", "value": 0.05, "threshold": 0.1,
                                          "passed": True}]
    always = check_gates(g.model_copy(update={"label_free": "always"}), labeled, "classification")
    assert [(r["name"], r["passed"]) for r in always] == [("min_target_auc", False), ("max_source_auc_drop", False)]
    # the segmentation gates never apply to a classifier, nor the AUC gates to a segmenter
    assert [r["name"] for r in check_gates(g, {"target_dice": 0.9})] == ["min_target_dice"]


@pytest.mark.slow  # trains and evaluates a classifier, then registers it in MLflow: 12 s on a loaded machine
def test_register_and_promote_a_classifier(cls_env, tmp_path, monkeypatch):
    """A classifier registers as a pyfunc model that maps preprocessed images to P(positive class), with the
    classification gates measured (target AUC, source AUC drop) and applied at promotion."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from siteadapt.methods.build import load_model
    from siteadapt.registry.promote import promote
    from siteadapt.registry.register import register_model
    from siteadapt.steps.evaluate import evaluate
    from siteadapt.steps.preprocess import preprocess
    from siteadapt.steps.train import adapt, predict, train_source

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    s, *_ = cls_env
    for site in ("ad", "ped"):
        preprocess(s, site)
    train_source(s, "ad")
    adapt(s, "ped", "noadapt")
    predict(s, "ped", "noadapt")
    m = json.loads(evaluate(s, "ped", "noadapt").read_text())
    examples = s.paths.reports / "pn" / "overlays" / "ped" / "noadapt" / "examples.png"
    assert m["labeled"] and examples.is_file()  # the classification counterpart of the overlays (a DVC out)

    def with_gates(**kw):
        return s.model_copy(update={"registry": s.registry.model_copy(update={
            "gates": s.registry.gates.model_copy(update=kw)})})

    reg = register_model(with_gates(min_target_auc=0.0), "ped", "noadapt")  # promotion may not loosen these
    c = MlflowClient(uri, registry_uri=uri)
    v = c.get_model_version(reg["name"], reg["version"])
    assert reg["name"] == "siteadapt-pn-ped" and v.tags["kind"] == "classification"
    assert float(v.tags["gate.target_auc"]) == pytest.approx(m["auc"])
    assert float(v.tags["gate.source_auc_drop"]) == 0.0  # noadapt is the source classifier itself
    assert "gate.target_dice" not in v.tags

    from mlflow.tracking._model_registry import utils as registry_utils

    monkeypatch.setattr(registry_utils, "_registry_uri", uri)  # undone after the test (no global left behind)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{reg['name']}/{reg['version']}")
    x = np.load(s.paths.prepared / "ped" / "test.npz")["images"][:, None].astype(np.float32)
    p = model.predict(x)
    src, _ = load_model(s.paths.models / "pn" / "ad" / "source" / "model.pt")
    with torch.no_grad():
        want = torch.softmax(src.predict_subject(torch.from_numpy(x)).float(), 1)[:, 1].numpy()
    assert p.shape == (len(x),) and p.dtype == np.float32 and np.allclose(p, want, atol=1e-5)

    res = promote(with_gates(min_target_auc=0.0), "ped")
    assert res["promoted"] and [g["name"] for g in res["gates"]] == ["min_target_auc"]
    res = promote(with_gates(min_target_auc=0.0, max_source_auc_drop=-0.5, label_free="always"), "ped")
    assert not res["promoted"] and [g["name"] for g in res["gates"] if not g["passed"]] == ["max_source_auc_drop"]

    # a method that applies the source classifier only for classification tasks (CycleGAN) ships it as an artifact
    adapt(s, "ped", "cyclegan")
    predict(s, "ped", "cyclegan")
    evaluate(s, "ped", "cyclegan")
    reg2 = register_model(s, "ped", "cyclegan")
    assert reg2["version"] != reg["version"]
    p2 = mlflow.pyfunc.load_model(f"models:/{reg['name']}/{reg2['version']}").predict(x)
    assert p2.shape == (len(x),) and ((0 <= p2) & (p2 <= 1)).all()


def test_shape_checks():
    pred = np.zeros((20, 20), np.uint8)
    pred[2:8, 2:8] = 1
    pred[12:14, 12:14] = 1  # a second piece: 4 of 40 pixels
    pred[2:6, 12:18] = 2
    c = shape_checks(pred, {"a": 1, "b": 2, "c": 3})
    assert c["a"]["components"] == 2 and c["a"]["largest_share"] == pytest.approx(0.9) and not c["a"]["fragmented"]
    assert c["b"]["largest_share"] == 1.0 and c["c"]["empty"]
    pred[14:18, 12:16] = 1
    assert shape_checks(pred, {"a": 1})["a"]["fragmented"]
    summ = summarize_plausibility([c])
    assert summ["empty_fraction"] == pytest.approx(1 / 3) and summ["fragmented_fraction"] == 0.0


def test_site_images_may_be_s3_but_output_paths_are_local():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sites"]["cardiac_ct"]["images"] = "s3://hospital/ct/images"
    assert parse_settings(raw).sites["cardiac_ct"].images == "s3://hospital/ct/images"
    raw["paths"]["models"] = "s3://bucket/models"
    with pytest.raises(ConfigError, match="paths.models"):
        parse_settings(raw)


def test_evaluate_an_unlabeled_site_gives_label_free_checks_only(prepared_env):
    from siteadapt.steps.evaluate import evaluate
    from siteadapt.steps.preprocess import preprocess
    from siteadapt.steps.report import collect

    from helpers.sites import fake_predictions

    s = prepared_env
    s = s.model_copy(update={"paths": s.paths.model_copy(update={
        "predictions": s.paths.prepared.parent / "pred", "metrics": s.paths.prepared.parent / "metrics",
        "reports": s.paths.prepared.parent / "reports"})})
    preprocess(s, "tgt")
    subj_file = s.paths.prepared / "tgt" / "subjects.json"
    meta = json.loads(subj_file.read_text())
    fake_predictions(s, "tgt", "noadapt", shift=2)
    for r in meta["subjects"]:
        r["label"] = None  # as a site without labels
    subj_file.write_text(json.dumps(meta))
    m = json.loads(Path(evaluate(s, "tgt", "noadapt")).read_text())
    assert m["labeled"] is False and "dice" not in m and m["n_subjects"] == 0
    assert m["plausibility"]["n_subjects"] == 1 and m["plausibility"]["empty_fraction"] == 0.0
    assert list((s.paths.reports / "heart" / "overlays" / "tgt" / "noadapt").glob("*.png"))
    assert "heart" not in collect(s.paths.metrics)  # no table row for an unlabeled site


# ---- a locked embedded store -----------------------------------------------------------------------------------------
def test_a_locked_sqlite_store_is_waited_out_not_fatal(monkeypatch):
    """A process holding the sqlite store's write lock past MLflow's 20-s busy wait (a starved process on a loaded
    machine) used to kill every stage that wrote meanwhile; the client retries those calls, and only those."""
    from siteadapt import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    class Store:
        def log_batch(self, run_id, **kw):
            calls.append(run_id)
            if len(calls) < 3:
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return "logged"

        def get_run(self, run_id):
            raise KeyError(f"run {run_id} not found")

    client = tracking._LockRetryingClient(Store(), wait_s=60)
    assert client.log_batch("r1", tags=[]) == "logged" and calls == ["r1"] * 3
    with pytest.raises(KeyError):  # any other error at once
        client.get_run("r2")
    calls.clear()
    clock = iter(range(0, 1000, 50))  # a lock that outlasts the wait: the error comes through
    monkeypatch.setattr(tracking.time, "monotonic", lambda: next(clock))
    with pytest.raises(RuntimeError, match="locked"):
        client.log_batch("r3")
    assert 1 <= len(calls) <= 3


def test_connect_wraps_only_the_embedded_store(tmp_path):
    from siteadapt.tracking import _LockRetryingClient, connect

    client = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert isinstance(client, _LockRetryingClient)
    assert client.search_experiments(max_results=1)  # calls go through to MLflow


@pytest.mark.slow  # ~13 s idle: several Python processes importing MLflow at once
def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path):
    """Three stages started at once on a fresh workspace: two died creating the schema together ("duplicate column
    name: step"); opening a sqlite store is serialised by a lock file beside it."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys, time; from siteadapt.tracking import connect; t = float(sys.argv[2]);"
            "time.sleep(max(0.0, t - time.time())); connect(sys.argv[1]); print('ok')")
    start = time.time() + 8  # every process has imported MLflow by then and opens the store at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-300:] for _, err in results]
    assert (tmp_path / "mlflow.db.init.lock").exists()
