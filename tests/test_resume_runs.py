"""Issue 20 item 7: a killed training resumes into the same MLflow run, and a Kubeflow training step resumes from
a checkpoint on the object store.

The Kubeflow test's kill is real: a subprocess trains and sends itself SIGKILL in the middle of an iteration, so
nothing of the step's own clean-up runs (its MLflow run stays RUNNING, its pending uploads are lost), as when a pod
is preempted. The MLflow test simulates it in-process (an exception during the iteration while nothing can end an
MLflow run), to stay fast. Sites are hand-written prepared shards (32x32 slices), models the tiny profile at width
0.125, a dozen iterations with a checkpoint every 4 and a loss point every 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("mlflow")
pytest.importorskip("moto.server")

from helpers.engine import slices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ITERATIONS, EVERY_CKPT, EVERY_LOG = 12, 4, 2
KILL_IN = 7  # the subprocess dies during iteration 7: checkpoint 4 written, loss points 2, 4, 6 sent


def _params() -> str:
    from siteadapt.kfp.local import tiny_params

    data = yaml.safe_load(tiny_params(REPO / "params.yaml"))
    data["profiles"]["tiny"].update(iterations=ITERATIONS, width=0.125)
    data["train"].update(checkpoint_every=EVERY_CKPT, log_every=EVERY_LOG, device="cpu", threads=1)
    return yaml.safe_dump(data, sort_keys=False)


def _job(site: str):
    from siteadapt.kfp.runtime import Job

    return Job(task="chestxray", source_site=site, params_yaml=_params(), profile="tiny")


def _prepared(root: Path, site: str, n: int = 12, seed: int = 0) -> Path:
    """A prepared 2D site (train split only) under ``root/prepared/<site>``: squares of label 1 with a label-2 core."""
    sl = slices(n=n, seed=seed)  # the engine tests' slices, written as a prepared site's shards
    x, y = sl.images, sl.labels
    d = root / "prepared" / site
    d.mkdir(parents=True)
    np.savez(d / "train.npz", images=x, subject=np.arange(n), slice=np.zeros(n, np.int64))
    np.savez(d / "train_labels.npz", labels=y)
    (d / "subjects.json").write_text(json.dumps({"subjects": [{"id": f"s{i}", "split": "train"} for i in range(n)]}))
    return root


def _weights(model_pt: Path) -> dict:
    return torch.load(model_pt, map_location="cpu", weights_only=False)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # exact on CPU (one thread)


def _kill_during_training(script: str, env: dict | None = None) -> None:
    """Run ``script`` in a fresh interpreter with the source model's ``train_step`` patched to SIGKILL the process
    during iteration ``KILL_IN`` (after ``wait_before_kill()``, which the script may define), and with the MLflow
    tracker sending every point at once (so that the run holds points past the checkpoint, as a slow run would)."""
    prelude = textwrap.dedent(f"""
        import os, signal
        from siteadapt import tracking
        from siteadapt.methods import get_method

        _init = tracking.MlflowTracker.__init__
        def _eager(self, *a, **k):
            _init(self, *a, **k)
            self.flush_s = 0.0
        tracking.MlflowTracker.__init__ = _eager

        def wait_before_kill():
            pass

        cls = get_method("source")
        _step, _calls = cls.train_step, [0]
        def _dying_step(self, batch):
            _calls[0] += 1
            if _calls[0] == {KILL_IN}:
                wait_before_kill()
                os.kill(os.getpid(), signal.SIGKILL)
            return _step(self, batch)
        cls.train_step = _dying_step
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed, not finished or failed


class _Killed(BaseException):
    """The in-process stand-in for SIGKILL (see :func:`_simulate_kill`)."""


def _simulate_kill(m: pytest.MonkeyPatch) -> None:
    """In this process: the source model's ``train_step`` raises :class:`_Killed` during iteration ``KILL_IN``, and
    while ``m`` is active nothing can end an MLflow run (``set_terminated`` does nothing), so the run stays RUNNING as
    after a real kill; the tracker sends every point at once, as in :func:`_kill_during_training`."""
    from mlflow.tracking import MlflowClient

    from siteadapt import tracking
    from siteadapt.methods import get_method

    cls = get_method("source")
    step, calls = cls.train_step, [0]

    def dying_step(self, batch):
        calls[0] += 1
        if calls[0] == KILL_IN:
            raise _Killed
        return step(self, batch)

    init = tracking.MlflowTracker.__init__

    def eager(self, *a, **k):
        init(self, *a, **k)
        self.flush_s = 0.0

    m.setattr(cls, "train_step", dying_step)
    m.setattr(tracking.MlflowTracker, "__init__", eager)
    m.setattr(MlflowClient, "set_terminated", lambda *a, **k: None)


def _runs(client, site: str, stage: str = "train_source"):
    exp = client.get_experiment_by_name("siteadapt-chestxray")
    return client.search_runs([exp.experiment_id], f"tags.site = '{site}' and tags.`siteadapt.stage` = '{stage}'")


def _steps(client, run_id: str, key: str = "train/seg") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def _store_uri(tmp_path_factory):
    from siteadapt import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking.connect(uri)  # creates the tables once for the module (each test uses its own site names)
    return uri


@pytest.fixture
def store(tmp_path, monkeypatch, _store_uri):
    from siteadapt import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store_uri)
    monkeypatch.delenv("SITEADAPT_TRACKING", raising=False)
    monkeypatch.delenv("SITEADAPT_CHECKPOINTS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    return tracking.connect(_store_uri)


def _reference(tmp_path: Path, monkeypatch, site: str) -> Path:
    """The model of an uninterrupted run (tracking off)."""
    from siteadapt import tracking
    from siteadapt.steps import api
    from siteadapt.kfp.runtime import settings_for

    root = _prepared(tmp_path / "reference", site)
    with monkeypatch.context() as m:
        m.setenv("SITEADAPT_TRACKING", "off")
        m.delenv("SITEADAPT_CHECKPOINTS", raising=False)
        return api.train_source(settings_for(_job(site), root), site)


def test_killed_training_resumes_into_the_same_mlflow_run(tmp_path, monkeypatch, store):
    """Killed during iteration 7 (checkpoint 4 on disk, loss points 2-6 in the run), then the same command again:
    one run for the stage, FINISHED, each loss step once, weights equal to an uninterrupted run's. Training again
    after that opens a new run: a finished run is never re-opened."""
    from siteadapt import tracking
    from siteadapt.steps import api
    from siteadapt.kfp.runtime import settings_for

    site = "killed_site"
    root = _prepared(tmp_path / "work", site)
    s = settings_for(_job(site), root)
    with monkeypatch.context() as m, pytest.raises(_Killed):
        _simulate_kill(m)
        api.train_source(s, site)
    (killed,) = _runs(store, site)
    assert killed.info.status == "RUNNING"  # nothing could end it
    assert _steps(store, killed.info.run_id) == [2, 4, 6]
    model_dir = root / "models/chestxray" / site / "source"
    assert json.loads((model_dir / "mlflow_run.json").read_text())["run_id"] == killed.info.run_id

    path = api.train_source(s, site)

    (run,) = _runs(store, site)  # the same run, continued
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert _steps(store, run.info.run_id) == [2, 4, 6, 8, 10, 12]  # each step once: 6 was not sent again
    assert _steps(store, run.info.run_id, "train/it_per_s") == [2, 4, 6, 8, 10, 12]
    assert run.data.tags["siteadapt.attempt"] == "2" and run.data.tags["siteadapt.start_step"] == "4"
    assert run.data.params["seed"] == "0" and run.data.metrics["train/iterations"] == ITERATIONS
    _assert_same_weights(path, _reference(tmp_path, monkeypatch, site))

    api.train_source(s, site)  # the same work again, after it finished
    runs = _runs(store, site)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    again = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert "siteadapt.resumed_from" not in again.data.tags and again.data.tags["siteadapt.attempt"] == "1"


def test_killed_dvc_stage_continues_its_mlflow_run_after_dvc_deleted_the_model_folder(tmp_path, monkeypatch, store):
    """Inside a DVC stage ($DVC_STAGE, $DVC_ROOT): killed during iteration 7, then DVC deletes the stage's outputs
    (the whole model folder, pointer and all) and runs it again. The run pointer kept in .siteadapt/runs/ and the
    cached checkpoint let the re-run continue the same MLflow run from iteration 4, not open a second one."""
    import shutil

    from siteadapt import tracking
    from siteadapt.steps import api
    from siteadapt.kfp.runtime import settings_for

    site = "dvc_killed_site"
    root = _prepared(tmp_path / "work", site)
    monkeypatch.setenv("DVC_STAGE", f"train_source@{site}")
    monkeypatch.setenv("DVC_ROOT", str(root))
    s = settings_for(_job(site), root)
    with monkeypatch.context() as m, pytest.raises(_Killed):
        _simulate_kill(m)
        api.train_source(s, site)
    (killed,) = _runs(store, site)
    model_dir = root / "models/chestxray" / site / "source"
    kept = tracking.kept_pointer(model_dir)
    assert kept.parent == root / ".siteadapt" / "runs"
    assert json.loads(kept.read_text())["run_id"] == killed.info.run_id
    shutil.rmtree(model_dir)  # what DVC does to a stage's outputs before running it

    path = api.train_source(s, site)

    (run,) = _runs(store, site)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert _steps(store, run.info.run_id) == [2, 4, 6, 8, 10, 12]
    assert run.data.tags["siteadapt.attempt"] == "2" and run.data.tags["siteadapt.start_step"] == "4"
    assert json.loads((model_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    monkeypatch.delenv("DVC_STAGE")
    assert tracking.kept_pointer(model_dir) is None  # outside DVC the model folder's pointer is the only one
    _assert_same_weights(path, _reference(tmp_path, monkeypatch, site))


def test_unfinished_run_of_other_params_is_closed_as_killed_and_linked(tmp_path, store):
    """A model folder whose pointer names an unfinished (RUNNING) run started with other params or data: the new run
    does not continue it; the old one ends KILLED with ``superseded_by``, the new one has ``resumed_from``."""
    from siteadapt import tracking
    from siteadapt.steps import api
    from siteadapt.kfp.runtime import settings_for

    site = "changed_site"
    root = _prepared(tmp_path / "work", site)
    s = settings_for(_job(site), root)
    model_dir = root / "models/chestxray" / site / "source"
    exp = tracking.experiment_id(store, "chestxray")
    old_id = store.create_run(exp, tags={"siteadapt.stage": "train_source", "site": site,
                                         "siteadapt.resume_key": "started-with-other-params"}).info.run_id
    (model_dir / "mlflow_run.json").parent.mkdir(parents=True)
    (model_dir / "mlflow_run.json").write_text(json.dumps({"run_id": old_id}))  # as a killed step leaves it
    api.train_source(s, site)
    runs = {r.info.run_id: r for r in _runs(store, site)}
    assert len(runs) == 2
    old = runs.pop(old_id)
    (new,) = runs.values()
    assert old.info.status == "KILLED" and old.data.tags["siteadapt.superseded_by"] == new.info.run_id
    assert new.info.status == "FINISHED" and new.data.tags["siteadapt.resumed_from"] == old_id
    assert _steps(store, new.info.run_id) == list(range(EVERY_LOG, ITERATIONS + 1, EVERY_LOG))


# ---- Kubeflow: checkpoints on the object store ---------------------------------------------------------------------
def test_checkpoint_key_is_the_same_for_the_same_work_and_differs_otherwise(tmp_path, monkeypatch):
    from dataclasses import replace

    from siteadapt.kfp import checkpoints
    from siteadapt.kfp.runtime import settings_for

    monkeypatch.setenv("SITEADAPT_CHECKPOINTS", "s3://store/checkpoints")
    a = _prepared(tmp_path / "a", "s1")
    b = _prepared(tmp_path / "b", "s1")  # the same data in another folder (a re-submitted run's artifact)
    c = _prepared(tmp_path / "c", "s1", seed=1)  # other data

    def where(job, inputs, root=tmp_path / "ws"):
        return checkpoints.location("train_source", settings_for(job, root), "s1", "source", "source", inputs)

    job = _job("s1")
    first = where(job, [a])
    assert first.startswith("s3://store/checkpoints/chestxray/s1/source/") and first.endswith("/")
    assert len(first.split("/")[-2]) == 64  # the work digest
    assert where(job, [b], root=tmp_path / "other_ws") == first  # retried or re-submitted: found
    assert where(job, [c]) != first  # other data
    other_seed = yaml.safe_load(job.params_yaml) | {"seed": 5}
    assert where(replace(job, params_yaml=yaml.safe_dump(other_seed)), [a]) != first
    assert where(replace(job, profile="quick"), [a]) != first  # other sizes and schedule
    monkeypatch.delenv("SITEADAPT_CHECKPOINTS")
    assert where(job, [a]) is None  # off
    from siteadapt.errors import ConfigError

    monkeypatch.setenv("SITEADAPT_CHECKPOINTS", "/mnt/checkpoints")  # not an object store: refused, exit code 2
    with pytest.raises(ConfigError, match="SITEADAPT_CHECKPOINTS.*expected an s3://") as e:
        where(job, [a])
    assert e.value.exit_code == 2


CKPT_BUCKET = "siteadapt"


@pytest.mark.slow  # a training subprocess killed and a second one resuming: over 10 s on a loaded machine
def test_preempted_kubeflow_training_resumes_from_the_object_store(tmp_path, monkeypatch, store, s3,
                                                                   caplog):
    """The train_source component's function with ``SITEADAPT_CHECKPOINTS`` on the object store: killed during
    iteration 7 once checkpoint 4 is on the store, then run again in a fresh folder (a retried pod): it restores the
    checkpoint, starts at iteration 4, continues the same MLflow run, ends with an uninterrupted run's weights, and
    deletes its checkpoint from the store."""
    from siteadapt.kfp import runtime as R

    s3.create_bucket(Bucket=CKPT_BUCKET)
    monkeypatch.setenv("SITEADAPT_CHECKPOINTS", f"s3://{CKPT_BUCKET}/checkpoints/")
    site = "kfp_site"
    prepared = _prepared(tmp_path / "prepared_artifact", site)
    _kill_during_training(f"""
        import time
        from siteadapt.kfp import runtime as R
        from siteadapt.kfp.locations import s3_client

        def wait_before_kill():  # preempted once checkpoint 4 reached the store (the upload runs in the background)
            client, deadline = s3_client(), time.monotonic() + 60
            while time.monotonic() < deadline:
                for obj in client.list_objects_v2(Bucket={CKPT_BUCKET!r}).get("Contents", []):
                    if obj["Key"].endswith("/checkpoint.pt") and client.head_object(
                            Bucket={CKPT_BUCKET!r}, Key=obj["Key"])["Metadata"].get("step") == "{EVERY_CKPT}":
                        return
                time.sleep(0.05)
            raise SystemExit("checkpoint never reached the store")

        R.run_train_source(R.Job(task="chestxray", source_site={site!r}, params_yaml={_params()!r}, profile="tiny"),
                           {str(prepared)!r}, {str(tmp_path / "attempt1")!r})
    """)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=CKPT_BUCKET).get("Contents", [])]
    prefix = f"checkpoints/chestxray/{site}/source/"
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == ["checkpoint.pt", "mlflow_run.json"]
    assert all(k.startswith(prefix) for k in keys)
    (killed,) = _runs(store, site)
    assert killed.info.status == "RUNNING"

    caplog.set_level("INFO", logger="siteadapt")
    out = R.run_train_source(_job(site), prepared, tmp_path / "attempt2")  # a fresh folder: nothing local
    assert out == {"model": f"models/chestxray/{site}/source/model.pt"}
    assert "resuming source from iteration 4" in caplog.text
    (run,) = _runs(store, site)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["siteadapt.start_step"] == str(EVERY_CKPT)
    assert _steps(store, run.info.run_id) == [2, 4, 6, 8, 10, 12]
    _assert_same_weights(tmp_path / "attempt2" / out["model"], _reference(tmp_path, monkeypatch, site))
    assert s3.list_objects_v2(Bucket=CKPT_BUCKET).get("KeyCount") == 0  # done: the work's checkpoints deleted
    assert not list((tmp_path / "attempt2").rglob("checkpoint.pt")) and not list(
        (tmp_path / "attempt2").rglob(".upload-*"))


def test_gpu_steps_get_the_checkpoint_prefix_from_the_config_map():
    """The compiled pipeline maps ``SITEADAPT_CHECKPOINTS`` (optional: an older config map without it still starts
    the pods) into the training steps only; k8s/config.yaml sets it."""
    spec = list(yaml.safe_load_all((REPO / "pipelines" / "site-adaptation.yaml").read_text()))
    k8s = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for label, conf in k8s.items():
        optional = [e for c in conf.get("configMapAsEnv", []) if c.get("optional") for e in c["keyToEnv"]]
        if label.startswith(("exec-train-source", "exec-adapt")):
            assert [e["envVar"] for e in optional] == ["SITEADAPT_CHECKPOINTS"], label
        else:
            assert optional == [], label
    config = yaml.safe_load((REPO / "k8s" / "config.yaml").read_text())
    assert config["data"]["SITEADAPT_CHECKPOINTS"].startswith("s3://siteadapt/")
