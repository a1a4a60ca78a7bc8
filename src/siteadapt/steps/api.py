"""The step layer: one function per pipeline step, called alike by every front door.

The command line (:mod:`siteadapt.cli`, and through it every DVC stage), the Kubeflow components
(:mod:`siteadapt.kfp.runtime`) and ``siteadapt demo`` (:mod:`siteadapt.steps.pipeline`) all run a step by calling
the function of the same name here; none of them works out a step's arguments or opens an MLflow run itself. The
functions share one shape, ``step(settings, site, method, *, seed=None, <step options>)`` (ingest, preprocess and
train-source have no method; report has neither site nor method), and return what the step wrote.

Tracking belongs to the step: ``train_source``, ``adapt`` and ``evaluate`` open their MLflow run
(:func:`siteadapt.tracking.stage_run`; ``SITEADAPT_TRACKING=off`` turns it off), and ``select --register`` /
``register`` record the model in the registry (:mod:`siteadapt.registry`). So a demo run is in MLflow and in the
registry exactly as a ``dvc repro`` run is.

The work itself stays in the step modules (:mod:`.ingest`, :mod:`.preprocess`, :mod:`.train`, :mod:`.evaluate`,
:mod:`.select`, :mod:`.report`), untracked and importable on their own; each function here imports its module only
when called, so a stage loads what it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from ..layout import model_dir, overlays_dir, read_metrics, registry_record_path

log = logging.getLogger("siteadapt.steps")

FROM_PARAMS = object()  # ingest's labels / patients: the site's entry in params.yaml


# ---- ingest, preprocess --------------------------------------------------------------------------------------------
def ingest_inputs(settings: Settings, site: str, images=None, labels=FROM_PARAMS) -> tuple[Path, Path | None]:
    """(images, labels) of ``site`` as local folders/files: the given ones, else the site's ``images`` / ``labels``
    in params; a location on an object store or a PACS is mirrored into ``paths.remote/<site>/`` first (only
    what changed is fetched). ``labels=None``: images only."""
    from .. import storage

    cfg = settings.site(site)
    images = cfg.images if images is None else images
    labels = cfg.labels if labels is FROM_PARAMS else labels
    images = storage.materialize(images, settings.paths.remote / site / "images")
    if labels is not None:
        labels = storage.materialize(labels, settings.paths.remote / site / "labels")
    return images, labels


def ingest(settings: Settings, site: str, *, images=None, labels=FROM_PARAMS, patients=FROM_PARAMS,
           modality: str | None = None, data_root: str | Path | None = None):
    """Ingest ``site`` into ``data_root`` (default ``paths.ingested``): the site's task decides the label checks
    (``label_options``) and, for classification, the classes; ``images``/``labels``/``patients``/``modality``
    default to the site's params entry (:func:`ingest_inputs`). Returns the ingest result (items, written, skipped,
    rejected, out_dir)."""
    from .ingest import ingest as ingest_files, label_options

    cfg = settings.site(site)
    task = settings.task_of(site)
    images, labels = ingest_inputs(settings, site, images, labels)
    return ingest_files(images, site, Path(data_root) if data_root else settings.paths.ingested, labels=labels,
                        modality=modality or cfg.modality, pixel_spacing_mm=cfg.pixel_spacing_mm,
                        classes=task.classes if task.kind == "classification" else None,
                        patients=cfg.patients if patients is FROM_PARAMS else patients, **label_options(task, cfg))


def preprocess(settings: Settings, site: str, *, roi_rule: str | None = None) -> dict:
    """Preprocess ``site``. ``roi_rule``: the crop rule the caller expects (dvc.yaml passes it); a different rule in
    params means the site's source/target role changed since dvc.yaml was written."""
    from .preprocess import preprocess as run

    if roi_rule and settings.roi_rule(site) != roi_rule:
        raise ConfigError(f"site {site}: params.yaml gives crop rule {settings.roi_rule(site)!r}, the caller expected "
                          f"{roi_rule!r} (the site's role changed): dvc.yaml is stale, run `siteadapt dvc-gen`")
    return run(settings, site)


# ---- training (tracked) --------------------------------------------------------------------------------------------
def train_params(settings: Settings, method: str, site: str) -> dict[str, str]:
    """What a training run records as its params (and what its resume key and Kubeflow's checkpoint key hash):
    method and variant, seed, profile, the task's profile sizes, the training settings and the method's options."""
    from ..methods.build import resolved_options
    from ..tracking import flatten

    base, opts = resolved_options(settings, method, site)
    return {"method": base, "variant": method, "seed": settings.seed, "profile": settings.profile,
            **flatten(settings.profile_for(settings.site(site).task).model_dump(), "profile."),
            **flatten(settings.train.model_dump(), "train."), **flatten(opts, "option.")}


def _log_training(run, folder: Path) -> None:
    """The trained model's summary, loss curves and translation grid into its run; the run pointer beside it."""
    import torch

    mp = folder / "model.pt"
    if mp.is_file():
        summary = torch.load(mp, map_location="cpu", weights_only=False).get("summary") or {}
        run.log_metrics({"train/seconds": summary.get("seconds"), "train/iterations": summary.get("iterations"),
                         "train/mean_it_per_s": summary.get("it_per_s")}, step=int(summary.get("iterations") or 0))
    run.log_artifact(folder / "losses.csv", "curves")
    run.log_artifact(folder / "translations.png", "images")
    run.save_pointer(folder)


def train_source(settings: Settings, site: str, *, seed: int | None = None, on_checkpoint=None) -> Path:
    """Train the source model of ``site`` in its MLflow run; an unfinished run of the same work in the model folder
    is continued (:mod:`siteadapt.tracking`, "Resuming a killed training"). ``on_checkpoint(path, step)`` runs after
    each checkpoint (Kubeflow copies it to the object store)."""
    from .. import tracking
    from .train import train_source as run

    out = model_dir(settings, site, "source", seed)
    with tracking.stage_run(settings, stage="train_source", task=settings.site(site).task, site=site,
                            method="source", continues=out,
                            params={**train_params(settings, "source", site), "source_site": site},
                            tags={"source_site": site, **tracking.data_hashes(settings, {"source": site})}) as r:
        path = run(settings, site, tracker=r.tracker, seed=seed, on_checkpoint=on_checkpoint)
        _log_training(r, out)
    return path


def adapt(settings: Settings, site: str, method: str, *, source: str | None = None, seed: int | None = None,
          on_checkpoint=None) -> Path:
    """Adapt ``method`` to target ``site`` (from ``source``, default the direction's) in its MLflow run, continued
    like :func:`train_source`'s."""
    from .. import tracking
    from .train import adapt as run

    d = settings.direction_to(site, source)
    out = model_dir(settings, site, method, seed)
    with tracking.stage_run(settings, stage="adapt", task=settings.site(site).task, site=site, method=method,
                            continues=out,
                            params={**train_params(settings, method, site), "source_site": d.source,
                                    "target_site": site},
                            tags={"source_site": d.source, "target_site": site,
                                  **tracking.data_hashes(settings, {"source": d.source, "target": site})}) as r:
        path = run(settings, site, method, source=d.source, tracker=r.tracker, seed=seed,
                   on_checkpoint=on_checkpoint)
        _log_training(r, out)
    return path


# ---- prediction and evaluation -------------------------------------------------------------------------------------
def predict(settings: Settings, site: str, method: str, *, seed: int | None = None, splits=("test",)) -> Path:
    """Label maps (classification: class scores) of ``method`` on ``site``'s ``splits``."""
    from .train import predict as run

    return run(settings, site, method, splits=tuple(splits), seed=seed)


def evaluation_metrics(m: dict) -> dict[str, float | None]:
    """The ``eval/*`` metrics of an evaluation (a metrics file's content) that its MLflow run records."""
    vals: dict[str, float | None] = {}
    if m.get("kind") == "classification":
        keys = ("auc", "accuracy", "sensitivity", "specificity", "f1", "threshold", "n_test") \
            if m.get("labeled", True) else ("score_mean", "positive_fraction_at_0.5", "n_test")
        vals.update({f"eval/{k}": m.get(k) for k in keys})
        return vals
    if m.get("labeled", True):
        for metric in ("dice", "assd", "hd95", "recall", "precision"):
            for k, v in (m.get(metric) or {}).items():
                vals[f"eval/{metric}_{k}"] = v
    pl = m.get("plausibility") or {}
    vals["eval/empty_fraction"] = pl.get("empty_fraction")
    vals["eval/fragmented_fraction"] = pl.get("fragmented_fraction")
    vals["eval/n_subjects"] = m.get("n_subjects")
    return vals


def evaluate(settings: Settings, site: str, method: str, *, seed: int | None = None, predict: bool = False) -> Path:
    """Evaluate ``method`` on ``site`` (``predict``: write its predictions first, as the DVC stage does) inside the
    model's MLflow run (a run of its own when the model's run is not in this store). Returns the metrics file."""
    from .. import tracking
    from .evaluate import evaluate as run
    from .train import predict as run_predict

    with tracking.stage_run(settings, stage="evaluate", task=settings.site(site).task, site=site, method=method,
                            resume=model_dir(settings, site, method, seed)) as r:
        if predict:
            run_predict(settings, site, method, seed=seed)
        path = run(settings, site, method, seed=seed)
        m = read_metrics(path)
        r.log_metrics(evaluation_metrics(m))
        r.set_tags({"eval.labeled": str(m.get("labeled", True)).lower(), "eval.split": m.get("split")})
        r.log_artifact(path, "evaluation")
        r.log_artifacts(overlays_dir(settings, site, method, seed), "images/overlays")
    return path


# ---- selection and registration ------------------------------------------------------------------------------------
def select(settings: Settings, site: str, *, methods: list[str] | None = None, selection: str | None = None,
           score: str | None = None, margin: float | None = None, seed: int | None = None,
           register: bool = False) -> dict:
    """Rank ``site``'s adapted models and choose its candidate (:func:`siteadapt.steps.select.select`), writing
    ``<registry>/<task>/<site>/selection.json``. ``register``: register the winner (alias ``candidate``) with the
    selection as tags; a winner without a run of its own (no adaptation measured on the source model) is adapted
    and evaluated first. The result carries ``registered`` then."""
    from ..registry.register import register_model
    from .select import select as rank, selection_tags, write_selection

    res = rank(settings, site, methods=methods, selection=selection, score=score, margin=margin, seed=seed)
    write_selection(settings, site, res)
    if not register:
        return res
    winner = next(r for r in res["methods"] if r["method"] == res["winner"])
    if winner.get("from_source_model"):  # nothing trains: the source model as is, as a run of its own
        adapt(settings, site, res["winner"], seed=seed)
        evaluate(settings, site, res["winner"], seed=seed, predict=True)
    reg = register_model(settings, site, res["winner"], seed=seed, extra_tags=selection_tags(res))
    res["registered"] = {k: reg.get(k) for k in ("name", "version", "alias", "run_id")}
    write_selection(settings, site, res)
    return res


def register(settings: Settings, site: str, method: str, *, seed: int | None = None) -> dict:
    """Register the model of ``method`` on ``site`` (alias ``candidate``) and write what was registered, with the
    gate measurements and thresholds recorded on the version, to ``<registry>/<task>/<site>/<run name>.json``."""
    from ..io.atomic import write_json
    from ..registry.register import recorded_gates, register_model, version_gates

    res = register_model(settings, site, method, seed=seed)
    record = {**res, "site": site, "method": method, "gates": version_gates(res["name"], res["version"]),
              "gate_thresholds": recorded_gates(res["name"], res["version"])}
    write_json(registry_record_path(settings, site, method, seed), record)
    return record


# ---- report --------------------------------------------------------------------------------------------------------
def report(settings: Settings) -> dict:
    """Tables and figures of every evaluated method: ``{task: table path}``."""
    from .report import report as run

    return run(settings)
