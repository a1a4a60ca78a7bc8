"""The Kubeflow components of siteadapt: one lightweight Python component per step.

Each function below is the body of one component. KFP copies a lightweight component's source into the container
command and runs it on ``base_image``; our images (``docker/``) already contain siteadapt, kfp and their
dependencies, so nothing is pip-installed when a step starts (``install_kfp_package=False``, no
``packages_to_install``). Every body is an import and one call into :mod:`siteadapt.kfp.runtime`, which calls the
same step functions as the CLI and DVC, inside :func:`siteadapt.kfp.runtime.cli_errors`: bad input (a
:class:`~siteadapt.errors.SiteadaptError`) ends the step as it ends the CLI, with the CLI's one-line message on stderr
and its exit code (2 for bad settings or input, 3 for a site with nothing usable, ...), not a traceback and exit 1.

Artifacts between steps are KFP artifacts (``Dataset``, ``Model``, ``Metrics``); on a cluster KFP stores them under
the pipeline root in the object store, under ``kfp.local`` in a local folder. Each artifact folder is a partial
project root (``ingested/<site>/``, ``prepared/<site>/``, ``models/<task>/<site>/<method>/``, ...), see
:mod:`siteadapt.kfp.runtime`.

:func:`build` binds the functions to images: CPU steps run on the CPU image, training steps on the CUDA image. This
module has no ``from __future__ import annotations``: KFP reads the annotations as real types.
"""

from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def fingerprint(location: str) -> str:
    """Digest of a site location's listing (names, sizes, ETags): the cache key of the steps that read it."""
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("fingerprint"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        return runtime.run_fingerprint(location)


def ingest(params_yaml: str, profile: str, task: str, source_site: str, site: str, location: str, modality: str,
           pixel_spacing_mm: float, fingerprint: str, ingested: Output[Dataset]):
    """DICOM / NIfTI / 2D images (+ labels) at ``location`` -> de-identified NIfTI + manifest (``site`` = ""
    ingests the source site). ``fingerprint`` is only a cache key: a changed location reruns the step."""
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("ingest"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site or None, params_yaml=params_yaml,
                          profile=profile, modality=modality, pixel_spacing_mm=pixel_spacing_mm)
        summary = runtime.run_ingest(job, location, ingested.path)
        ingested.metadata.update({**summary, "fingerprint": fingerprint})


def preprocess(params_yaml: str, profile: str, task: str, source_site: str, site: str, ingested: Input[Dataset],
               prepared: Output[Dataset]):
    """Reorient, resample, crop, normalize, slice and split one site (``site`` = "" for the source site)."""
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("preprocess"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site or None, params_yaml=params_yaml,
                          profile=profile)
        summary = runtime.run_preprocess(job, ingested.path, prepared.path)
        counts = {k: v["subjects"] for k, v in summary["counts"].items()}
        prepared.metadata.update({"site": summary["site"], **counts})


def train_source(params_yaml: str, profile: str, task: str, source_site: str, prepared_source: Input[Dataset],
                 source_model: Output[Model]):
    """Train the source segmenter (classifier) on the labeled source site. Its inputs do not name the target, so
    Kubeflow's cache serves it to every later site of the same source, data and settings."""
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("train-source"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, params_yaml=params_yaml, profile=profile)
        source_model.metadata.update(runtime.run_train_source(job, prepared_source.path, source_model.path))


def adapt(params_yaml: str, profile: str, task: str, source_site: str, site: str, method: str,
          prepared_source: Input[Dataset], prepared_target: Input[Dataset], source_model: Input[Model],
          model: Output[Model]):
    """Adapt to the target site with one method, without the target's labels."""
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("adapt"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site, params_yaml=params_yaml, profile=profile)
        model.metadata.update(runtime.run_adapt(job, method, prepared_source.path, prepared_target.path,
                                                source_model.path, model.path))


def evaluate(params_yaml: str, profile: str, task: str, source_site: str, site: str, method: str,
             ingested_target: Input[Dataset], prepared_target: Input[Dataset], source_model: Input[Model],
             model: Input[Model], evaluation: Output[Dataset], metrics: Output[Metrics]) -> str:
    """Predict the target's test subjects (classification: class scores of its images); metrics against labels when
    the site has them, the label-free checks always. Returns the summary (JSON) that registration ranks methods
    by."""
    import json
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("evaluate"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site, params_yaml=params_yaml, profile=profile)
        summary = runtime.run_evaluate(job, method, ingested_target.path, prepared_target.path, source_model.path,
                                       model.path, evaluation.path)
        values = {k: summary[k] for k in ("dice_mean", "assd_mean", "empty_fraction", "fragmented_fraction", "auc",
                                          "score") if summary.get(k) is not None}
        for key, value in values.items():
            metrics.log_metric(key, value)
        with open(metrics.path, "w") as fh:  # also a file: the artifact then exists in the store (and caches locally)
            json.dump(values, fh)
        evaluation.metadata.update({"method": method, "score": summary["score"]})
        return json.dumps(summary, sort_keys=True)


def register(params_yaml: str, profile: str, task: str, source_site: str, site: str, methods: List[str],
             gate_thresholds: dict, summaries: List[str], models: Input[List[Model]], evaluations: Input[List[Dataset]],
             source_model: Input[Model], ingested_source: Input[Dataset], ingested_target: Input[Dataset],
             prepared_source: Input[Dataset], prepared_target: Input[Dataset], predictions: Output[Dataset]) -> str:
    """Register the run's best method in the MLflow model registry (``siteadapt-<task>-<site>``, alias
    ``candidate``), recording the run's gate thresholds (params with ``gate_thresholds``) on the version: the
    promotion may not loosen them. Returns the candidate (JSON) for the gates and the promotion; ``predictions``
    receives the candidate's predictions (for the PACS export)."""
    import json
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("register"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site, params_yaml=params_yaml, profile=profile,
                          methods=tuple(methods), gates=gate_thresholds)
        inputs = [a.path for a in (ingested_source, ingested_target, prepared_source, prepared_target, source_model)]
        out = runtime.run_register(job, summaries, inputs + [m.path for m in models] + [e.path for e in evaluations],
                                   predictions_out=predictions.path)
        predictions.metadata.update({"method": out["method"]})
        return json.dumps(out, sort_keys=True)


def gates(params_yaml: str, profile: str, task: str, source_site: str, site: str, candidate: str,
          gate_thresholds: dict) -> bool:
    """The promotion gates as the registry checks them (``registry.gates`` in params, overridden by
    ``gate_thresholds``) on the measurements recorded at registration: True only when every gate that applies
    passes."""
    import json

    from siteadapt.kfp import runtime

    with runtime.cli_errors("gates"):  # a SiteadaptError exits as the CLI does
        job = runtime.Job(task=task, source_site=source_site, site=site, params_yaml=params_yaml, profile=profile,
                          gates=gate_thresholds)
        res = runtime.check_gates(job, json.loads(candidate))
        for g in res["gates"]:
            print(f"gate {g['name']}: {g['value']} (threshold {g['threshold']}): {'pass' if g['passed'] else 'FAIL'}")
        return bool(res["passed"])


def promote(params_yaml: str, profile: str, task: str, source_site: str, site: str, candidate: str,
            gate_thresholds: dict, actor: str) -> str:
    """Move the site's ``champion`` alias to the candidate (the registry re-checks the same gates)."""
    import json
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("promote"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site, params_yaml=params_yaml, profile=profile,
                          gates=gate_thresholds)
        cand = json.loads(candidate)
        reason = (f"kubeflow run {actor}: {cand['method']} ranked first of "
                  f"{', '.join(c['method'] for c in cand['compared'])} and passed the gates")
        res = runtime.run_promote(job, cand, actor=f"kubeflow:{actor}", reason=reason)
        return json.dumps(res, sort_keys=True, default=str)


def export(params_yaml: str, profile: str, task: str, source_site: str, site: str, pacs_uri: str, candidate: str,
           promotion: str, predictions: Input[Dataset]) -> str:
    """Push the champion's segmentations of the site's test subjects to its PACS (one DICOM SEG each, STOW-RS to
    ``pacs_uri``); the original UIDs are found again on the PACS with the de-identification key. Returns a summary
    (JSON: counts and model version, no identifiers)."""
    import json
    import logging

    from siteadapt.kfp import runtime

    with runtime.cli_errors("export"):  # a SiteadaptError exits as the CLI does
        logging.basicConfig(level=logging.INFO)
        job = runtime.Job(task=task, source_site=source_site, site=site, params_yaml=params_yaml, profile=profile)
        res = runtime.run_export(job, json.loads(candidate), json.loads(promotion), pacs_uri, predictions.path)
        return json.dumps(res, sort_keys=True)


STEPS = {"fingerprint": fingerprint, "ingest": ingest, "preprocess": preprocess, "train_source": train_source,
         "adapt": adapt, "evaluate": evaluate, "register": register, "gates": gates, "promote": promote,
         "export": export}
GPU_STEPS = ("train_source", "adapt")
"""Steps that train networks: they run on the CUDA image and the GPU node pool."""


def build(cpu_image: str, gpu_image: str) -> SimpleNamespace:
    """The components, bound to images: ``build(...).adapt`` is a KFP component factory."""
    return SimpleNamespace(**{
        name: dsl.component(fn, base_image=gpu_image if name in GPU_STEPS else cpu_image, install_kfp_package=False)
        for name, fn in STEPS.items()})
