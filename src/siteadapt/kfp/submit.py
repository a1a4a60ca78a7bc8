"""Submitting site-adaptation runs: one interface, two implementations.

- :class:`KfpSubmitter`: a Kubeflow Pipelines API server (``kfp.Client``); used by ``siteadapt pipeline submit`` and
  by the watcher on a cluster.
- :class:`LocalSubmitter`: the KFP local runner (``kfp.local`` with ``SubprocessRunner``): the same pipeline, every
  step a subprocess on this machine; used by ``siteadapt pipeline run-local`` and by tests.

A submitter gets a *run name* it must use as the run's display name: the watcher derives it from the site and its
data so that, after a crash between "submit" and "remember", :meth:`Submitter.find` tells whether the run exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger("siteadapt.kfp")


class Submitter(Protocol):
    can_find: bool
    """Whether :meth:`find` can see earlier submissions (a server can; the local runner cannot)."""

    def submit(self, run_name: str, arguments: dict[str, Any]) -> str:
        """Start one pipeline run; returns its id."""

    def find(self, run_name: str) -> str | None:
        """The id of an existing run with this name, if any."""


class KfpSubmitter:
    """Runs on a Kubeflow Pipelines server. The pipeline is compiled once per submitter (images from the arguments or
    ``$SITEADAPT_IMAGE`` / ``$SITEADAPT_GPU_IMAGE``). Caching follows each task's setting in the compiled pipeline
    (``enable_caching`` is left unset on purpose: setting it would override every task)."""

    can_find = True

    def __init__(self, host: str | None, *, experiment: str = "siteadapt", namespace: str | None = None,
                 cpu_image: str | None = None, gpu_image: str | None = None, service_account: str | None = None,
                 client=None, package: str | Path | None = None):
        if client is None:
            import kfp

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        self.client = client
        self.experiment = experiment
        self.namespace = namespace
        self.service_account = service_account
        if package is None:
            from .pipeline import compile_pipeline

            self._tmp = tempfile.TemporaryDirectory(prefix="siteadapt-kfp-")
            package = compile_pipeline(Path(self._tmp.name) / "site-adaptation.yaml", cpu_image, gpu_image)
        self.package = str(package)

    def submit(self, run_name: str, arguments: dict[str, Any]) -> str:
        res = self.client.create_run_from_pipeline_package(
            self.package, arguments=arguments, run_name=run_name, experiment_name=self.experiment,
            namespace=self.namespace, service_account=self.service_account)
        log.info("submitted %s: run %s", run_name, res.run_id)
        return str(res.run_id)

    def find(self, run_name: str) -> str | None:
        flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": run_name}]})
        try:
            exp = self.client.get_experiment(experiment_name=self.experiment, namespace=self.namespace)
        except Exception:  # no experiment yet: no run either
            return None
        resp = self.client.list_runs(experiment_id=exp.experiment_id, filter=flt, page_size=5)
        runs = getattr(resp, "runs", None) or []
        return str(runs[0].run_id) if runs else None


@contextlib.contextmanager
def _child_imports_this_siteadapt():
    """kfp.local runs each step as ``python -m kfp.dsl.executor_main``: make that child import the same siteadapt
    as this process (a checkout on PYTHONPATH, not some other installed copy)."""
    import siteadapt

    src = str(Path(siteadapt.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([src] + [p for p in parts if p != src])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


class LocalSubmitter:
    """Runs the whole pipeline here and now with ``kfp.local`` (``SubprocessRunner(use_venv=False)``: steps use this
    Python environment; nothing is installed). ``submit`` returns when the run has finished; a failing step raises.

    ``pipeline_func`` defaults to the site-adaptation pipeline; ``cache`` turns on kfp.local's task cache (kept under
    the pipeline root), which honours each task's caching setting like a server does."""

    can_find = False

    def __init__(self, pipeline_root: str | Path, *, pipeline_func: Callable | None = None, cache: bool = True):
        self.pipeline_root = Path(pipeline_root).resolve()
        self.pipeline_func = pipeline_func
        self.cache = cache
        self.outputs: dict[str, Any] = {}

    def _pipeline(self):
        if self.pipeline_func is None:
            from .pipeline import build_pipeline

            self.pipeline_func = build_pipeline()
        return self.pipeline_func

    def submit(self, run_name: str, arguments: dict[str, Any]) -> str:
        from kfp import local

        pipeline = self._pipeline()
        self.pipeline_root.mkdir(parents=True, exist_ok=True)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(self.pipeline_root),
                   raise_on_error=True, enable_caching=self.cache)
        log.info("running %s with kfp.local under %s", run_name, self.pipeline_root)
        with _child_imports_this_siteadapt(), warnings.catch_warnings():
            # our images are not named "python*": kfp.local warns that it runs them in this Python environment,
            # which is exactly what we ask for
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            # requests/limits, accelerators and Kubernetes settings are for the cluster; locally they are no-ops
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            task = pipeline(**arguments)
        outputs = getattr(task, "outputs", {}) or {}
        self.outputs[run_name] = {k: v for k, v in outputs.items()}
        return f"local:{run_name}"

    def find(self, run_name: str) -> str | None:
        return None
