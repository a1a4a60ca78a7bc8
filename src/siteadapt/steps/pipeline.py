"""The whole job in one process, in stage order: synth -> ingest -> preprocess -> train_source -> adapt -> predict ->
evaluate -> report, for the tasks of ``pipeline.tasks`` in params.yaml (default: every task with sites), or the
tasks given.

This is what ``siteadapt demo`` runs. Each stage is the same function the single-step CLI commands call; a stage whose
output already exists for unchanged settings is *not* detected here (use ``dvc repro`` for that): the demo redoes
training so that its wall time is honest.
"""

from __future__ import annotations

import logging
import time

from ..config import Settings

log = logging.getLogger("siteadapt.pipeline")


def run_all(settings: Settings, tasks: list[str] | None = None, synth: bool = True) -> dict:
    from ..data.synth import synthesize
    from .evaluate import evaluate
    from .ingest import ingest, label_options
    from .preprocess import preprocess
    from .report import report
    from .train import adapt, predict, train_source

    from ..errors import ConfigError

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
        site = s.sites[n]
        task = s.tasks[site.task]
        timed("ingest", ingest, site.images, n, s.paths.ingested, labels=site.labels, modality=site.modality,
              pixel_spacing_mm=site.pixel_spacing_mm, patients=site.patients,
              classes=task.classes if task.kind == "classification" else None, **label_options(task, site))
    for n in sites:
        timed("preprocess", preprocess, s, n)
    for task in tasks:
        t = s.tasks[task]
        for src in sorted({d.source for d in t.directions}):
            timed(f"train_source/{src}", train_source, s, src)
        for d in t.directions:
            for m in t.methods:
                timed(f"adapt/{d.target}/{m}", adapt, s, d.target, m, source=d.source)
                timed("predict", predict, s, d.target, m)
                timed("evaluate", evaluate, s, d.target, m)
    written = timed("report", report, s)
    return {"timings": timings, "reports": written}
