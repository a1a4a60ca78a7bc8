"""Training checkpoints on the object store, so that a preempted or retried Kubeflow training step resumes.

A Kubeflow step starts in a fresh container: the engine's ``checkpoint.pt`` written in its model folder is gone when
the pod is preempted, and a retried 20k-iteration step would start at iteration 0. With ``$SITEADAPT_CHECKPOINTS``
set (an ``s3://bucket/prefix/`` on the S3-compatible store; endpoint and credentials from the environment, as for
site locations, :mod:`siteadapt.kfp.locations`), the training steps (``train_source``, ``adapt``):

- on start, download the work's checkpoint (and the MLflow run pointer ``mlflow_run.json``) into the model folder,
  so that the engine resumes exactly from it and the tracked step continues the same MLflow run;
- after every checkpoint the engine writes (``train.checkpoint_every``), copy it to the object store;
- when the step succeeds, delete the work's checkpoint prefix (the model is the step's output artifact; checkpoints
  hold optimizer state and would pile up).

Unset (``kfp.local``, the CLI, DVC): nothing is copied, the step behaves as before.

Key layout: ``<prefix>/<task>/<site>/<method>/<work digest>/checkpoint.pt`` and ``.../mlflow_run.json``. The work
digest is a sha256 of the step name, the task's settings, the source and target sites, the method, the training
params (method options, the profile's sizes, the ``train`` settings, the seed), the siteadapt version and the sha256
of every file of the step's input artifacts (prepared data, source model). A retried step, or a re-submitted run of
the same work, computes the same digest and finds the checkpoint; other params, data, seed, source model or code
version give another digest and never see it. No pipeline-run id is part of the key, so that a re-submitted run
resumes too; the engine checks its own signature on load in any case (a mismatch starts afresh).

Atomicity: each checkpoint is one object, overwritten in place, and the choice relies on S3 PUT atomicity: a reader
gets the previous complete object or the new complete one, never a partial one (a multipart upload becomes visible
only when it is completed). The pointer ``mlflow_run.json`` does not change during a step and is written once, just
before the first checkpoint's upload, so a checkpoint on the store always has its run pointer beside it. Downloads go to a temporary name and are renamed into place.

Uploads run in a background thread, so that training does not wait for the network: each checkpoint is hard-linked
to a snapshot (the engine replaces ``checkpoint.pt`` by rename, so the snapshot keeps its content), and when a new
checkpoint arrives while the previous one is still uploading, only the newest waits (older pending ones are
dropped). A failed upload logs a warning and training continues. The object store thus holds a checkpoint at most
one upload behind the engine's latest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator

from . import locations

log = logging.getLogger("siteadapt.kfp")

ENV_PREFIX = "SITEADAPT_CHECKPOINTS"
CHECKPOINT = "checkpoint.pt"
POINTER = "mlflow_run.json"  # tracking.RUN_FILE


def prefix() -> str | None:
    """``$SITEADAPT_CHECKPOINTS`` (an ``s3://`` prefix), or None when object-store checkpoints are off."""
    value = os.environ.get(ENV_PREFIX, "").strip()
    if not value:
        return None
    if not locations.is_s3(value):
        from ..errors import ConfigError

        raise ConfigError(f"{ENV_PREFIX}={value!r}: expected an s3://bucket/prefix/ location")
    locations.split_s3(value)  # names a bucket
    return locations.as_prefix(value)


def work_digest(step: str, settings, site: str, method: str, inputs: list[str | Path]) -> str:
    """sha256 of what makes two training steps the same work (see the module's key layout)."""
    from .. import __version__
    from ..steps.api import train_params
    from ..tracking import dir_sha256

    task = settings.site(site).task
    t = settings.tasks[task].model_dump(mode="json", exclude={"directions", "methods"})
    direction = [(d.source, d.target) for d in settings.tasks[task].directions]
    what = {"step": step, "task": task, "task_settings": t, "site": site, "direction": direction, "method": method,
            "params": {k: str(v) for k, v in train_params(settings, method, site).items()},
            "version": __version__, "inputs": [dir_sha256(a) for a in inputs]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def location(step: str, settings, site: str, method: str, run_name: str, inputs: list[str | Path]) -> str | None:
    """``<prefix>/<task>/<site>/<run name>/<work digest>/`` of one training step, or None when checkpoints are
    off."""
    root = prefix()
    if root is None:
        return None
    task = settings.site(site).task
    return f"{root}{task}/{site}/{run_name}/{work_digest(step, settings, site, method, inputs)}/"


def restore(where: str, model_dir: Path) -> int | None:
    """Download the checkpoint (and the MLflow run pointer) under ``where`` into ``model_dir``; the checkpoint's
    iteration, or None when the object store holds none."""
    from ..io.atomic import atomic_path

    bucket, key = locations.split_s3(where)
    client = locations.s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key + CHECKPOINT)
    except client.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / CHECKPOINT) as tmp:
        client.download_file(bucket, key + CHECKPOINT, str(tmp))
    pointer = locations.read_text(where + POINTER)
    if pointer is not None:
        from ..io.atomic import write_text

        write_text(model_dir / POINTER, pointer)
    step = (head.get("Metadata") or {}).get("step")
    log.info("restored the checkpoint of iteration %s from the object store", step)
    return int(step) if step is not None else None


def discard(where: str) -> int:
    """Delete every object under ``where`` (the work is done); how many were deleted."""
    bucket, key = locations.split_s3(where)
    client = locations.s3_client()
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for obj in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
    return len(keys)


class Uploader:
    """The engine's ``on_checkpoint``: copies each checkpoint to ``where`` in a background thread (newest wins, see
    the module's notes). :meth:`close` stops it; ``flush=True`` first uploads the newest pending checkpoint."""

    def __init__(self, where: str, model_dir: Path):
        self.where, self.model_dir = where, Path(model_dir)
        self.bucket, self.key = locations.split_s3(where)
        self.uploaded: list[int] = []  # iterations whose checkpoint reached the object store, in order
        self._cv = threading.Condition()
        self._pending: tuple[Path, int] | None = None
        self._busy = False
        self._closed = False
        self._pointer_sent = False
        self._thread: threading.Thread | None = None

    def __call__(self, path: Path, step: int) -> None:
        snap = Path(path).with_name(f".upload-{step}.pt")
        with contextlib.suppress(FileNotFoundError):
            snap.unlink()
        try:
            os.link(path, snap)
        except OSError:  # no hard links on this file system: a copy
            shutil.copyfile(path, snap)
        with self._cv:
            if self._pending is not None:  # not uploaded yet and already superseded
                self._pending[0].unlink(missing_ok=True)
            self._pending = (snap, int(step))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _work(self) -> None:
        client = locations.s3_client()
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                (snap, step), self._pending = self._pending, None
                self._busy = True
            try:
                # the pointer first: a pod killed right after the checkpoint's upload still finds its MLflow run
                if not self._pointer_sent and (self.model_dir / POINTER).is_file():
                    client.put_object(Bucket=self.bucket, Key=self.key + POINTER,
                                      Body=(self.model_dir / POINTER).read_bytes())
                    self._pointer_sent = True
                client.upload_file(str(snap), self.bucket, self.key + CHECKPOINT,
                                   ExtraArgs={"Metadata": {"step": str(step)}})
                self.uploaded.append(step)
            except Exception as e:  # noqa: BLE001 - a lost upload costs a longer resume, not the training
                log.warning("checkpoint of iteration %d not copied to the object store: %s", step, type(e).__name__)
            finally:
                snap.unlink(missing_ok=True)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def wait(self) -> None:
        """Block until every checkpoint handed over so far was uploaded (or failed)."""
        with self._cv:
            while self._pending is not None or self._busy:
                self._cv.wait()

    def close(self, flush: bool = True) -> None:
        with self._cv:
            if not flush and self._pending is not None:
                self._pending[0].unlink(missing_ok=True)
                self._pending = None
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        for stale in self.model_dir.glob(".upload-*.pt"):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def persisted(step: str, settings, site: str, method: str, inputs: list[str | Path]) -> Iterator[Uploader | None]:
    """Object-store checkpoints around one training step: restores the work's checkpoint into the model folder,
    yields the ``on_checkpoint`` hook (None when ``$SITEADAPT_CHECKPOINTS`` is unset), and on success deletes the
    work's checkpoints; when the step raises, the newest pending checkpoint is uploaded first."""
    from ..layout import model_dir, run_name

    where = location(step, settings, site, method, run_name(settings, method), inputs)
    if where is None:
        yield None
        return
    out = model_dir(settings, site, method)
    got = restore(where, out)
    log.info("%s %s/%s: %s", step, site, method,
             f"resuming from the object store's checkpoint of iteration {got}" if got is not None
             else "no checkpoint in the object store yet")
    up = Uploader(where, out)
    try:
        yield up
    except BaseException:
        up.close(flush=True)
        raise
    up.close(flush=False)
    try:
        n = discard(where)
        log.info("%s %s/%s: done, %d checkpoint object(s) deleted from the object store", step, site, method, n)
    except Exception as e:  # noqa: BLE001 - the model is written; a leftover checkpoint only costs storage
        log.warning("checkpoints of %s %s/%s not deleted from the object store: %s", step, site, method,
                    type(e).__name__)
