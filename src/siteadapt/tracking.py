"""MLflow tracking of the pipeline steps: one run per trained model, with its evaluation logged into the same run.

Where runs go
-------------
``$MLFLOW_TRACKING_URI`` when set (a tracking server such as ``http://mlflow:5000``, or any URI MLflow accepts);
otherwise the embedded store ``sqlite:///<project>/mlflow.db`` with artifacts under ``<project>/mlruns/`` (project =
``$DVC_ROOT`` inside a DVC stage, else the current folder; experiments queued with ``dvc exp run --queue/--temp`` run
in a temporary copy, so point ``MLFLOW_TRACKING_URI`` at a fixed store for them). ``SITEADAPT_TRACKING=off`` turns tracking off (the steps run
as before, nothing is logged). Look at the runs with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

What a run holds (experiment ``siteadapt-<task>``)
--------------------------------------------------
- ``train-source`` and ``adapt``: params (method options, the profile's sizes, seed, training settings, sites), tags
  (stage, task, site, method, source/target site, git commit and whether the checkout was dirty, the environment:
  Python, PyTorch, NumPy and SciPy versions, CPU kernel family and thread count (``env.*``), sha256 of each
  site's ingest manifest and of its prepared shards), the loss curves every ``train.log_every`` iterations (through
  the engine's ``tracker`` hook; ``train/<loss>``, ``train/it_per_s``), the curve CSV and the translated-image grid.
- ``evaluate`` re-opens the run of the model it evaluates (its id is in ``<model dir>/mlflow_run.json``) and adds
  ``eval/*`` metrics (Dice, ASSD, HD95 per structure and mean; label-free ``eval/empty_fraction`` and
  ``eval/fragmented_fraction``; classification: ``eval/auc``, accuracy, sensitivity, specificity, F1 and the
  threshold), the metrics JSON and the overlay images (classification: ``examples.png``). When that run is not in the current store
  (e.g. the model came from a DVC remote), evaluation gets a run of its own.
- ``register`` (:mod:`siteadapt.registry.register`) logs the model itself into the same run.

This module is MLflow plumbing only (where runs go, one run per step, the engine's tracker, resuming); the steps
that open runs are in :mod:`siteadapt.steps.api`, and nothing here imports :mod:`siteadapt.steps`.

Resuming a killed training
--------------------------
A training step writes ``<model dir>/mlflow_run.json`` as soon as its run is open, so a killed step leaves behind the
id of its run (status RUNNING: nothing could end it); inside a DVC stage a copy goes to ``.siteadapt/runs/``, since DVC
deletes the model folder before it runs the stage again (:func:`kept_pointer`). Run again in the same model folder, the step re-opens that run
when it did not finish (RUNNING, FAILED or KILLED) and was started with the same params and data (tag
``siteadapt.resume_key``, a digest of both): the engine resumes from the folder's checkpoint and the loss curves
continue in the same run. Points already in the run are not sent again (per metric, every step up to the last one
the run holds is skipped), and the tracker flushes at every checkpoint, so the resumed curve has each logged step
exactly once. An unfinished run of other params or data is closed as KILLED and linked: the new run gets
``siteadapt.resumed_from`` (its id), the old one ``siteadapt.superseded_by``. A run that finished is never
re-opened by a training step (training again gets a new run). Tags ``siteadapt.attempt`` (1, 2, ...) and
``siteadapt.start_step`` (the iteration the last attempt started from) say what happened.

Failing clearly
---------------
Before a step computes anything, the tracking store is checked: a server that does not answer within a few seconds
stops the step with :class:`TrackingError` naming the URI, and no output of the step is written. MLflow's own HTTP
retries are capped (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2, backoff factor 1, timeout 30 s unless set in the
environment), so a server that dies during a run fails the step within about a minute instead of retrying for many
minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from .config import Settings
from .errors import SiteadaptError
from .io.atomic import sha256_file, write_json

log = logging.getLogger("siteadapt.tracking")

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_SWITCH = "SITEADAPT_TRACKING"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
RUN_FILE = "mlflow_run.json"
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
PREFLIGHT_TIMEOUT_S = 5.0


class TrackingError(SiteadaptError):
    """The tracking store cannot be used (server down, wrong URI); the message names the URI."""


# ---- where ------------------------------------------------------------------------------------------------------------
def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def tracking_uri(root: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else the sqlite store ``<root>/mlflow.db`` (root: the DVC project a stage runs in,
    ``$DVC_ROOT``, else the current folder)."""
    env = os.environ.get(ENV_URI, "").strip()
    if env:
        return env
    root = Path(root or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    return f"sqlite:///{root / DEFAULT_DB}"


def redact(uri: str) -> str:
    """The URI without user:password and with token-like query values masked (for messages, tags and files):
    :func:`siteadapt.redact.redact_uri`, the userinfo dropped rather than masked."""
    from .redact import redact_uri

    return redact_uri(uri, drop_userinfo=True)


def ui_command(uri: str | None = None) -> str:
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {redact(uri)} in a browser (tracking server)"


def check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer (no retries, a few seconds at most), or
    when its URI carries credentials (they belong in ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``TOKEN``)."""
    from .redact import inline_secret_message

    if not uri.startswith(("http://", "https://")):
        return
    refused = inline_secret_message(ENV_URI, uri, "mlflow")  # user:password@ or ?token=... in a server URI
    if refused:
        raise TrackingError(refused)
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PREFLIGHT_TIMEOUT_S) as resp:
            if resp.status >= 500:
                raise TrackingError(f"MLflow tracking server {redact(uri)} answered {resp.status} on /health")
    except urllib.error.HTTPError as e:  # a reachable server (or proxy) that has no /health: let MLflow judge
        if e.code >= 500:
            raise TrackingError(f"MLflow tracking server {redact(uri)} answered {e.code} on /health") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start it, or point "
            f"{ENV_URI} at a running server, or unset {ENV_URI} to use the local store sqlite:///{DEFAULT_DB}"
        ) from None


class _LockRetryingClient:
    """An ``MlflowClient`` whose calls wait out a locked embedded (sqlite) store instead of failing.

    Stages writing to one sqlite file at once (``siteadapt study`` jobs side by side, ``dvc repro`` beside an
    ``adapt``) wait for each other's write lock, but only for MLflow's busy timeout (20 s). A writer that holds the
    lock longer (a process starved of CPU mid-transaction on a loaded machine) made the others' calls raise
    ``OperationalError: database is locked``, and the stage died (seen: two of four training jobs started together
    on 2 cores, beside two more). Such a call is retried with a growing pause, for up to ``wait_s`` seconds in all;
    any other error is raised at once. A sqlite transaction that fails on the lock wrote nothing, so a retry is
    safe."""

    def __init__(self, client, wait_s: float = 120.0):
        self._client, self._wait_s = client, wait_s

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            deadline, pause = time.monotonic() + self._wait_s, 0.2
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - MLflow wraps the sqlite error in its own exception types
                    if "database is locked" not in str(e) or time.monotonic() + pause > deadline:
                        raise
                    log.warning("MLflow store locked by another process (%s): retrying in %.1f s", name, pause)
                    time.sleep(pause)
                    pause = min(pause * 2, 10.0)

        return call


@contextlib.contextmanager
def _sqlite_init_lock(uri: str):
    """Holds an exclusive lock on ``<database>.init.lock`` while a client opens a sqlite store. Opening creates or
    migrates the schema, and processes doing that at once on a new database fail ("duplicate column name": three
    stages started together on a fresh workspace did). Other stores, and systems without ``fcntl``, need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".init.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def connect(uri: str | None = None):
    """An ``MlflowClient`` for the tracking store, after checking that it answers. Sets the global URI too (so that
    ``mlflow.pyfunc.log_model`` and the registry use the same store)."""
    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    uri = uri or tracking_uri()
    check_reachable(uri)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with _sqlite_init_lock(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            if uri.startswith("sqlite:"):
                client = _LockRetryingClient(client)
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is not usable
        raise TrackingError(f"MLflow tracking store {redact(uri)} is not usable: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return client


def experiment_id(client, task: str, uri: str | None = None) -> str:
    name = f"siteadapt-{task}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = uri or tracking_uri()
    location = None
    if uri.startswith("sqlite:"):  # embedded store: artifacts beside the database, not in the current folder
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created by a concurrent process in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---- what -------------------------------------------------------------------------------------------------------------
def git_info(root: str | Path | None = None) -> dict[str, str]:
    root = str(root or Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"git_commit": "unknown"}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30)
        return {"git_commit": commit.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}


def environment_info() -> dict[str, str]:
    """What a run's numbers depend on beyond the code and the data: Python, the numeric packages' versions and the
    CPU kernel family PyTorch dispatches to (``AVX512``, ``AVX2``, ...) and the thread count. One seed reproduces bit
    for bit only with all of these equal: two installs, or two thread counts on one machine, give the same seed
    different numbers (issue 7 closing note)."""
    import platform

    import numpy
    import scipy
    import torch

    info = {"env.python": platform.python_version(), "env.torch": torch.__version__, "env.numpy": numpy.__version__,
            "env.scipy": scipy.__version__, "env.torch_threads": str(torch.get_num_threads())}
    try:
        info["env.cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # older PyTorch
        info["env.cpu_capability"] = "unknown"
    if torch.cuda.is_available():
        info["env.cuda_device"] = torch.cuda.get_device_name(0)
    return info


def dir_sha256(folder: str | Path) -> str | None:
    """sha256 over the relative names and sha256 of every file below ``folder`` (None when absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def data_hashes(settings: Settings, sites: dict[str, str]) -> dict[str, str]:
    """``{"data.<role>.manifest_sha256": ..., "data.<role>.prepared_sha256": ...}`` for ``{role: site}``."""
    out = {}
    for role, site in sites.items():
        if site is None:
            continue
        out[f"data.{role}.site"] = site
        man = settings.paths.ingested / site / "manifest.json"
        if man.is_file():
            out[f"data.{role}.manifest_sha256"] = sha256_file(man)
        prep = dir_sha256(settings.paths.prepared / site)
        if prep:
            out[f"data.{role}.prepared_sha256"] = prep
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


# ---- logging ------------------------------------------------------------------------------------------------------
class MlflowTracker:
    """The engine's ``tracker``: buffers metric points and sends them in batches (at most every ``flush_s``
    seconds, at every checkpoint and at the end), so that a remote server costs one request per few seconds, not one
    per log line. ``logged`` (metric -> last step the run already holds, for a re-opened run) makes it drop the
    points a killed attempt already sent."""

    def __init__(self, client, run_id: str, flush_s: float = 10.0, logged: dict[str, int] | None = None):
        self.client, self.run_id, self.flush_s = client, run_id, flush_s
        self.logged = dict(logged or {})
        self._buf: list = []
        self._last = time.monotonic()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buf.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                         if int(step) > self.logged.get(k, -1))
        if time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def begin(self, start: int) -> None:
        """The engine starts at iteration ``start`` (0, or the checkpoint it resumed): tag ``siteadapt.start_step``."""
        self.client.set_tag(self.run_id, "siteadapt.start_step", str(int(start)))

    def checkpointed(self, step: int) -> None:
        """A checkpoint of iteration ``step`` was written: send every buffered point, so that the run holds the
        curve up to the checkpoint a later attempt resumes from."""
        self.flush()

    def flush(self) -> None:
        while self._buf:
            chunk, self._buf = self._buf[:1000], self._buf[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last = time.monotonic()


class StageRun:
    """One MLflow run, used by a step (params, tags, metrics, artifacts)."""

    def __init__(self, client, run_id: str, experiment_id: str, uri: str, logged: dict[str, int] | None = None):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri
        self.tracker = MlflowTracker(client, run_id, logged=logged)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]  # params are write-once
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        self.tracker.log_metrics({k: v for k, v in metrics.items() if v is not None}, step)
        self.tracker.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if Path(folder).is_dir() and any(Path(folder).iterdir()):
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def save_pointer(self, model_dir: Path) -> None:
        pointer = {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": redact(self.uri)}
        write_json(Path(model_dir) / RUN_FILE, pointer)
        kept = kept_pointer(model_dir)
        if kept is not None:
            write_json(kept, pointer)


class _NoRun:
    """Tracking switched off: every call does nothing."""

    run_id = None
    tracker = None

    def __getattr__(self, name):
        return lambda *a, **k: None


KEPT_POINTERS = Path(".siteadapt") / "runs"


def kept_pointer(model_dir: Path) -> Path | None:
    """Inside a DVC stage (``$DVC_STAGE`` set), a copy of ``<model_dir>/mlflow_run.json`` kept where DVC does not
    delete it: ``<DVC project>/.siteadapt/runs/<sha256 of the model folder's path in the project>.json``. DVC removes
    a stage's outputs (the model folder, pointer included) before it runs the stage again, so without the copy a
    re-run after a kill would open a new run and leave the killed one RUNNING. None outside DVC."""
    if not os.environ.get("DVC_STAGE"):
        return None
    root = Path(os.environ.get("DVC_ROOT") or ".").resolve()
    folder = Path(model_dir).resolve()
    rel = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else folder.as_posix()
    return root / KEPT_POINTERS / f"{hashlib.sha256(rel.encode()).hexdigest()[:32]}.json"


def existing_run_id(client, model_dir: Path) -> str | None:
    """The run id in ``<model_dir>/mlflow_run.json`` (inside a DVC stage, else its kept copy,
    :func:`kept_pointer`) if that run exists in the current store."""
    f = Path(model_dir) / RUN_FILE
    if not f.is_file():
        f = kept_pointer(model_dir)
    if f is None or not f.is_file():
        return None
    try:
        rid = json.loads(f.read_text())["run_id"]
        client.get_run(rid)
        return rid
    except Exception:  # noqa: BLE001 - another store, deleted run, unreadable file: start a new run
        return None


RESUME_KEY_TAG = "siteadapt.resume_key"


def resume_key(stage: str, site: str, method: str | None, params: dict | None, tags: dict | None) -> str:
    """sha256 of what a training run was started with: stage, site, method, its params and the step's tags (sites
    and the data hashes). A killed run is continued only by a step with the same key."""
    what = {"stage": stage, "site": site, "method": method,
            "params": {k: str(v) for k, v in (params or {}).items()},
            "tags": {k: str(v) for k, v in (tags or {}).items() if v is not None}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def unfinished_run(client, model_dir: Path, stage: str):
    """The run named by ``<model_dir>/mlflow_run.json`` when it is in the current store, not deleted, of
    ``stage``, and did not finish (RUNNING after a kill, FAILED, KILLED); else None."""
    rid = existing_run_id(client, model_dir)
    if rid is None:
        return None
    run = client.get_run(rid)
    if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED" \
            or run.data.tags.get("siteadapt.stage") != stage:
        return None
    return run


def logged_steps(client, run_id: str) -> dict[str, int]:
    """Metric -> the last step a run holds (what a re-opened run must not be sent again)."""
    run = client.get_run(run_id)
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in run.data.metrics}


@contextlib.contextmanager
def stage_run(settings: Settings, *, stage: str, task: str, site: str, method: str | None = None,
              resume: Path | None = None, tags: dict | None = None, continues: Path | None = None,
              params: dict | None = None) -> Iterator[StageRun | _NoRun]:
    """A run for one step. ``resume``: a model folder whose run (``mlflow_run.json``) is re-opened when it exists in
    the current store (evaluation, registration). ``continues``: the model folder a *training* step writes: its
    unfinished run of the same params and data is re-opened (see "Resuming a killed training" above), an unfinished
    run of others is closed as KILLED and linked, and the folder's pointer names the open run at once. ``params`` are
    logged (write-once) and, with ``tags``, make the resume key. The run ends FINISHED, or FAILED when the step
    raises."""
    if not enabled():
        yield _NoRun()
        return
    uri = tracking_uri()
    client = connect(uri)
    exp = experiment_id(client, task, uri)
    rid, logged, new_tags = None, None, {"siteadapt.stage": stage}
    if continues is not None:
        key = resume_key(stage, site, method, params, tags)
        new_tags[RESUME_KEY_TAG] = key
        old = unfinished_run(client, continues, stage)
        if old is not None and old.data.tags.get(RESUME_KEY_TAG) == key:
            rid = old.info.run_id
            logged = logged_steps(client, rid)
            attempt = int(old.data.tags.get("siteadapt.attempt", "1")) + 1
            log.info("continuing MLflow run %s (attempt %d)", rid, attempt)
        elif old is not None:
            new_tags["siteadapt.resumed_from"] = old.info.run_id
    elif resume is not None:
        rid = existing_run_id(client, resume)
    if rid is not None:
        client.update_run(rid, status="RUNNING")
    else:
        name = "/".join(x for x in (stage, site, method) if x)
        rid = client.create_run(exp, run_name=name, tags=new_tags).info.run_id
        attempt = 1
        if "siteadapt.resumed_from" in new_tags:  # an unfinished run of other params or data: close and link it
            old_id = new_tags["siteadapt.resumed_from"]
            client.set_tag(old_id, "siteadapt.superseded_by", rid)
            client.set_terminated(old_id, status="KILLED")
            log.info("MLflow run %s did not finish and was started with other params or data: closed as KILLED, "
                     "superseded by %s", old_id, rid)
    run = StageRun(client, rid, exp, uri, logged=logged)
    if continues is not None:
        run.save_pointer(continues)  # a kill from here on leaves the id of this run in the model folder
    base = {"task": task, "site": site, "method": method, "profile": settings.profile, "seed": settings.seed,
            **git_info(), **environment_info()}
    base["mlflow.source.git.commit"] = base.get("git_commit")
    if continues is not None:
        base["siteadapt.attempt"] = attempt
    run.set_tags({**base, **(tags or {})})
    if params:
        run.log_params(params)
    t0 = time.perf_counter()
    try:
        yield run
        run.tracker.flush()
        run.log_metrics({f"{stage}/wall_s": time.perf_counter() - t0})
        client.set_terminated(rid, status="FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):
            run.tracker.flush()
            client.set_terminated(rid, status="FAILED")
        raise
