"""``siteadapt demo`` runs the same step functions as the CLI, DVC and Kubeflow (siteadapt.steps.api), tracking
included: its trainings and evaluations are MLflow runs and each target's candidate is registered, as after
``dvc repro``."""

from __future__ import annotations

import json

import pytest
import yaml

import dvc_project as dp

pytest.importorskip("mlflow")


@pytest.mark.slow
def test_demo_runs_are_tracked_and_registered(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from siteadapt.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("SITEADAPT_TRACKING", "SITEADAPT_PROFILE", "DVC_STAGE", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dp.tiny_params(["noadapt", "histmatch"]), sort_keys=False))

    assert main(["--params", "params.yaml", "demo", "--task", "chestxray"]) in (0, None)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("siteadapt-chestxray")
    runs = client.search_runs([exp.experiment_id])
    stages = {(r.data.tags.get("siteadapt.stage"), r.data.tags.get("method")) for r in runs}
    assert {("train_source", "source"), ("adapt", "noadapt"), ("adapt", "histmatch")} <= stages
    assert all(r.info.status == "FINISHED" for r in runs)
    evaluated = [r for r in runs if any(k.startswith("eval/") for k in r.data.metrics)]
    assert {r.data.tags.get("method") for r in evaluated} >= {"noadapt", "histmatch"}  # evaluate logged into them

    mv = client.get_model_version_by_alias("siteadapt-chestxray-cxr_b", "candidate")
    selection = json.loads((tmp_path / "registry/chestxray/cxr_b/selection.json").read_text())
    assert selection["registered"]["version"] == str(mv.version)
    assert mv.tags.get("method") == selection["winner"] or mv.tags.get("variant") == selection["winner"]
    assert (tmp_path / "metrics/chestxray/cxr_b/histmatch.json").is_file()
