"""Where the pipeline keeps each thing it writes, in one place below every step.

Every folder here sits under a ``paths.*`` entry of params.yaml (:class:`siteadapt.config.Paths`); nothing is
created by this module, it only names locations (and reads the one JSON format several layers consume, the
evaluation's metrics file).

- a run's folder name: the method (or named variant), plus ``.seed<k>`` when the seed is not params' seed
  (:func:`run_name`);
- a trained model: ``<models>/<task>/<site>/<run name>/model.pt`` (:func:`model_dir`); the source model of a
  seed: ``<models>/<task>/<source>/source[.seed<k>]/model.pt`` (:func:`source_model_path`);
- predictions: ``<predictions>/<site>/<run name>/`` (:func:`predictions_dir`);
- an evaluation: ``<metrics>/<task>/<site>/<run name>.json`` (:func:`metrics_path`, read by :func:`read_metrics`);
- evaluation overlays: ``<reports>/<task>/overlays/<site>/<run name>/`` (:func:`overlays_dir`);
- a registration record: ``<registry>/<task>/<site>/<run name>.json`` (:func:`registry_record_path`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Settings


def run_name(settings: Settings, method: str, seed: int | None = None) -> str:
    """Folder name of a run: the method (or variant) name, plus ``.seed<k>`` for a seed other than params' seed."""
    return method if seed is None or seed == settings.seed else f"{method}.seed{seed}"


def model_dir(settings: Settings, site: str, method: str, seed: int | None = None) -> Path:
    """The folder of the model of ``method`` on ``site`` (``model.pt``, curves, the MLflow run pointer)."""
    return settings.paths.models / settings.site(site).task / site / run_name(settings, method, seed)


def source_model_path(settings: Settings, source: str, seed: int | None = None) -> Path:
    """The source model a run with ``seed`` builds on: the pipeline's (params' seed), or ``source.seed<k>``. A seed
    study varies the whole chain, source model included: without adaptation is the source model, so its spread over
    seeds is the source model's."""
    return model_dir(settings, source, "source", seed) / "model.pt"


def predictions_dir(settings: Settings, site: str, method: str, seed: int | None = None) -> Path:
    """Label maps (or class scores) that ``siteadapt predict`` writes for ``method`` on ``site``."""
    return settings.paths.predictions / site / run_name(settings, method, seed)


def metrics_path(settings: Settings, site: str, method: str, seed: int | None = None) -> Path:
    """The evaluation of ``method`` on ``site`` (``siteadapt evaluate``)."""
    return settings.paths.metrics / settings.site(site).task / site / f"{run_name(settings, method, seed)}.json"


def read_metrics(path: str | Path) -> dict:
    """An evaluation's metrics file as a dict (the one reader every consumer uses: tracking, selection,
    registration, the report and the Kubeflow summary)."""
    return json.loads(Path(path).read_text())


def overlays_dir(settings: Settings, site: str, method: str, seed: int | None = None) -> Path:
    """The evaluation's overlay images of ``method`` on ``site``."""
    task = settings.site(site).task
    return settings.paths.reports / task / "overlays" / site / run_name(settings, method, seed)


def registry_record_path(settings: Settings, site: str, method: str, seed: int | None = None) -> Path:
    """What ``siteadapt register`` wrote about the version it registered (name, version, gates)."""
    return settings.paths.registry / settings.site(site).task / site / f"{run_name(settings, method, seed)}.json"
