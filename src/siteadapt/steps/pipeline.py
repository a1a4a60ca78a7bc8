"""The whole job in one process, in stage order: synth -> ingest -> preprocess -> train_source -> adapt -> predict ->
evaluate -> select (and register the candidate) -> report, for the tasks of ``pipeline.tasks`` in params.yaml
(default: every task with sites), or the tasks given.

This is what ``siteadapt demo`` runs. Each stage is the step function of :mod:`siteadapt.steps.api` that the CLI
(hence every DVC stage) and the Kubeflow components call, tracking included: the demo's runs are in MLflow and its
candidates in the model registry as ``dvc repro``'s are (``SITEADAPT_TRACKING=off`` leaves both out, and then no
candidate is registered). A stage whose output already exists for unchanged settings is *not* detected here (use
``dvc repro`` for that): the demo redoes training so that its wall time is honest.
"""

from __future__ import annotations

import logging
import time

from ..config import Settings

log = logging.getLogger("siteadapt.pipeline")


def run_all(settings: Settings, tasks: list[str] | None = None, synth: bool = True) -> dict:
    from .. import tracking
    from ..data.synth import synthesize
    from ..errors import ConfigError
    from . import api

    s = settings
    for t in tasks or []:
        if t not in s.tasks:
            raise ConfigError(f"unknown task {t!r}; tasks in params.yaml: {', '.join(s.tasks)}")
    tasks = tasks or s.pipeline_tasks()
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    sites = [n for n, site in s.sites.items() if site.task in tasks]
    if synth:
        for task in sorted({s.sites[n].synthetic.split("/")[0] for n in sites if s.sites[n].synthetic}):
            timed("synth", synthesize, task, s.paths.raw, seed=s.seed, n_subjects=s.active.synth_subjects,
                  n_images=s.synth_images(task), scale=s.active.synth_scale)
    for n in sites:
        timed("ingest", api.ingest, s, n)
    for n in sites:
        timed("preprocess", api.preprocess, s, n)
    registered: dict[str, dict] = {}
    for task in tasks:
        t = s.tasks[task]
        for src in sorted({d.source for d in t.directions}):
            timed(f"train_source/{src}", api.train_source, s, src)
        for d in t.directions:
            for m in t.methods:
                timed(f"adapt/{d.target}/{m}", api.adapt, s, d.target, m, source=d.source)
                timed("evaluate", api.evaluate, s, d.target, m, predict=True)
        for target in dict.fromkeys(d.target for d in t.directions):  # one candidate per target, as dvc.yaml's select
            res = timed("select", api.select, s, target, register=tracking.enabled())
            registered[target] = res.get("registered") or {"winner": res["winner"]}
    written = timed("report", api.report, s)
    return {"timings": timings, "reports": written, "registered": registered}
