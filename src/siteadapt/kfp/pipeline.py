"""The site-adaptation pipeline: one Kubeflow run adapts the segmenter (or, for a classification task such as
``pneumonia``, the classifier) to one (new) hospital site.

::

    fingerprint(source) -> ingest(source) -> preprocess(source) -> train_source ---------------+  (cached)
    fingerprint(target) -> ingest(target) -> preprocess(target) --+                            |
                                                                   ParallelFor(methods): adapt [GPU] -> evaluate
                                                                   -> register (best method, alias candidate)
                                                                   -> gates -> If(passed): promote (alias champion)
                                                                      -> If(pacs_uri): export (DICOM SEG, STOW-RS)

Cluster conventions (the manifests in ``k8s/`` create the other side of each):

- GPU steps (``train_source``, ``adapt``) request ``nvidia.com/gpu``, tolerate the GPU pool's taint
  ``nvidia.com/gpu=present:NoSchedule`` and select nodes labeled ``siteadapt.io/node-pool=gpu``; every step has CPU
  and memory requests and limits (:data:`RESOURCES`).
- Object-store credentials come from the secret ``siteadapt-object-store`` (keys ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``), endpoint, region and MLflow address from the config map ``siteadapt-config``, the
  de-identification key from the secret ``siteadapt-deid`` (ingest, and export, which recomputes the anonymous ids),
  DICOMweb credentials from the optional secret ``siteadapt-dicomweb`` (export only), all as environment variables.
- PACS export: with ``pacs_uri`` (the site's ``dicomweb+http(s)://`` URI) set and the candidate promoted, ``export``
  pushes one DICOM SEG per test subject of the champion back to the PACS (:func:`siteadapt.kfp.runtime.run_export`);
  with ``pacs_uri`` empty (the default) the step does not run.
- Caching: on for the deterministic data and training steps (the source segmenter is trained once per source site,
  data and settings; steps that read a location are keyed by its fingerprint), off for steps with side effects or
  that read mutable state (``fingerprint``, ``register``, ``gates``, ``promote``).
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's annotations as real types

import os
from pathlib import Path
from typing import List

from kfp import compiler, dsl
from kfp import kubernetes as k8s

from .. import __version__
from . import components as C

PIPELINE_NAME = "siteadapt-site-adaptation"
DEFAULT_IMAGE = f"ghcr.io/siteadapt/siteadapt:{__version__}-cpu"
DEFAULT_GPU_IMAGE = f"ghcr.io/siteadapt/siteadapt:{__version__}-cuda"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("siteadapt.io/node-pool", "gpu")
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
OBJECT_STORE_SECRET = "siteadapt-object-store"
OBJECT_STORE_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
CONFIG_MAP = "siteadapt-config"
CONFIG_KEYS = {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
               "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
CHECKPOINT_KEYS = {"SITEADAPT_CHECKPOINTS": "SITEADAPT_CHECKPOINTS"}  # GPU steps, optional: kfp/checkpoints.py
DEID_SECRET = "siteadapt-deid"
DEID_KEYS = {"SITEADAPT_DEID_KEY": "SITEADAPT_DEID_KEY"}
DEID_STEPS = ("ingest", "export")  # the steps that derive anonymous ids (export: to find the subjects on the PACS)
DICOMWEB_SECRET = "siteadapt-dicomweb"  # optional keys: basic auth (user, password) or a bearer token
DICOMWEB_KEYS = {k: k for k in ("SITEADAPT_DICOMWEB_USER", "SITEADAPT_DICOMWEB_PASSWORD", "SITEADAPT_DICOMWEB_TOKEN")}
RUN_AS_USER = 10001  # the images' non-root user

# step -> (cpu request, cpu limit, memory request, memory limit)
RESOURCES = {
    "fingerprint": ("100m", "500m", "256Mi", "1Gi"),
    "ingest": ("1", "2", "2Gi", "8Gi"),
    "preprocess": ("1", "2", "4Gi", "16Gi"),
    "train_source": ("4", "8", "16Gi", "32Gi"),
    "adapt": ("4", "8", "16Gi", "32Gi"),
    "evaluate": ("2", "4", "4Gi", "16Gi"),
    "register": ("500m", "2", "2Gi", "8Gi"),
    "gates": ("100m", "500m", "512Mi", "1Gi"),
    "promote": ("100m", "1", "512Mi", "2Gi"),
    "export": ("500m", "2", "1Gi", "4Gi"),
}
CACHED = {"ingest", "preprocess", "train_source", "adapt", "evaluate"}
GPU_TIMEOUT_S = 24 * 3600
MAX_PARALLEL_METHODS = 4  # adapt tasks at once (GPUs a run may hold)
DEFAULT_METHODS = ["noadapt", "histmatch", "cyclegan", "sifa"]


def _configure(task: dsl.PipelineTask, step: str, display: str | None = None) -> dsl.PipelineTask:
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[step]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)
    task.set_caching_options(step in CACHED)
    if display:
        task.set_display_name(display)
    k8s.use_secret_as_env(task, secret_name=OBJECT_STORE_SECRET, secret_key_to_env=OBJECT_STORE_KEYS)
    k8s.use_config_map_as_env(task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_KEYS)
    k8s.add_pod_label(task, "app.kubernetes.io/part-of", "siteadapt")
    k8s.add_pod_label(task, "siteadapt.io/step", step.replace("_", "-"))
    k8s.set_security_context(task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, run_as_non_root=True)
    if step in DEID_STEPS:
        k8s.use_secret_as_env(task, secret_name=DEID_SECRET, secret_key_to_env=DEID_KEYS)
    if step == "export":  # optional: a PACS without authentication, or a secret with a token only
        k8s.use_secret_as_env(task, secret_name=DICOMWEB_SECRET, secret_key_to_env=DICOMWEB_KEYS, optional=True)
    if step in C.GPU_STEPS:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        k8s.add_toleration(task, **GPU_TAINT)
        k8s.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
        k8s.set_timeout(task, GPU_TIMEOUT_S)
        task.set_retry(num_retries=2, backoff_duration="60s")  # GPU nodes may be preempted (spot pools)
        # a retry resumes from the object store's checkpoint; optional: a config map without the key turns it off
        k8s.use_config_map_as_env(task, config_map_name=CONFIG_MAP, config_map_key_to_env=CHECKPOINT_KEYS,
                                  optional=True)
    return task


def build_pipeline(cpu_image: str | None = None, gpu_image: str | None = None):
    """The pipeline function, with components bound to the given images (default: ``$SITEADAPT_IMAGE`` /
    ``$SITEADAPT_GPU_IMAGE``, else this version's published tags)."""
    c = C.build(cpu_image or os.environ.get("SITEADAPT_IMAGE") or DEFAULT_IMAGE,
                gpu_image or os.environ.get("SITEADAPT_GPU_IMAGE") or DEFAULT_GPU_IMAGE)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Adapt a source-trained segmenter (or classifier) to a new hospital site without its "
                              "labels, evaluate every method, register the best as candidate, promote it when it "
                              "passes the gates.")
    def site_adaptation(
        site: str,
        target_uri: str,
        source_uri: str,
        task: str = "cardiac",
        source_site: str = "cardiac_mr",
        methods: List[str] = DEFAULT_METHODS,
        profile: str = "paper",
        target_modality: str = "",
        target_pixel_spacing_mm: float = 0.0,
        gate_thresholds: dict = {},
        params_yaml: str = "",
        pacs_uri: str = "",
    ) -> str:
        common = dict(params_yaml=params_yaml, profile=profile, task=task, source_site=source_site)

        fp_src = _configure(c.fingerprint(location=source_uri), "fingerprint", "fingerprint source")
        fp_tgt = _configure(c.fingerprint(location=target_uri), "fingerprint", "fingerprint target")
        ing_src = _configure(c.ingest(**common, site="", location=source_uri, modality="", pixel_spacing_mm=0.0,
                                      fingerprint=fp_src.output), "ingest", "ingest source")
        ing_tgt = _configure(c.ingest(**common, site=site, location=target_uri, modality=target_modality,
                                      pixel_spacing_mm=target_pixel_spacing_mm, fingerprint=fp_tgt.output),
                             "ingest", "ingest target")
        prep_src = _configure(c.preprocess(**common, site="", ingested=ing_src.outputs["ingested"]),
                              "preprocess", "preprocess source")
        prep_tgt = _configure(c.preprocess(**common, site=site, ingested=ing_tgt.outputs["ingested"]),
                              "preprocess", "preprocess target")
        src_model = _configure(c.train_source(**common, prepared_source=prep_src.outputs["prepared"]),
                               "train_source", "train source model")

        with dsl.ParallelFor(methods, parallelism=MAX_PARALLEL_METHODS, name="methods") as method:
            adapted = _configure(c.adapt(**common, site=site, method=method,
                                         prepared_source=prep_src.outputs["prepared"],
                                         prepared_target=prep_tgt.outputs["prepared"],
                                         source_model=src_model.outputs["source_model"]), "adapt")
            evaluated = _configure(c.evaluate(**common, site=site, method=method,
                                              ingested_target=ing_tgt.outputs["ingested"],
                                              prepared_target=prep_tgt.outputs["prepared"],
                                              source_model=src_model.outputs["source_model"],
                                              model=adapted.outputs["model"]), "evaluate")

        registered = _configure(c.register(**common, site=site, methods=methods, gate_thresholds=gate_thresholds,
                                           summaries=dsl.Collected(evaluated.outputs["Output"]),
                                           models=dsl.Collected(adapted.outputs["model"]),
                                           evaluations=dsl.Collected(evaluated.outputs["evaluation"]),
                                           source_model=src_model.outputs["source_model"],
                                           ingested_source=ing_src.outputs["ingested"],
                                           ingested_target=ing_tgt.outputs["ingested"],
                                           prepared_source=prep_src.outputs["prepared"],
                                           prepared_target=prep_tgt.outputs["prepared"]), "register")
        candidate = registered.outputs["Output"]  # register also outputs the candidate's predictions (export)
        gate = _configure(c.gates(**common, site=site, candidate=candidate, gate_thresholds=gate_thresholds),
                          "gates", "evaluation gates")
        with dsl.If(gate.output == True, name="gates-passed"):  # noqa: E712 (a KFP condition, not a Python test)
            promoted = _configure(c.promote(**common, site=site, candidate=candidate,
                                            gate_thresholds=gate_thresholds, actor=dsl.PIPELINE_JOB_NAME_PLACEHOLDER),
                                  "promote")
            # a PACS site: the champion's SEGs go back to it (the step itself checks that promote moved champion)
            with dsl.If(pacs_uri != "", name="pacs-export"):
                _configure(c.export(**common, site=site, pacs_uri=pacs_uri, candidate=candidate,
                                    promotion=promoted.output, predictions=registered.outputs["predictions"]),
                           "export", "export SEG to PACS")
        return candidate

    return site_adaptation


def compile_pipeline(out: str | Path, cpu_image: str | None = None, gpu_image: str | None = None) -> Path:
    """Write the pipeline (IR YAML with the Kubernetes platform spec) to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cpu_image, gpu_image), package_path=str(out))
    return out


def compile_components(out_dir: str | Path, cpu_image: str | None = None, gpu_image: str | None = None) -> list[Path]:
    """Write each component's spec (``<step>.yaml``) to ``out_dir``, for reuse in other pipelines
    (``kfp.components.load_component_from_file``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = C.build(cpu_image or os.environ.get("SITEADAPT_IMAGE") or DEFAULT_IMAGE,
                gpu_image or os.environ.get("SITEADAPT_GPU_IMAGE") or DEFAULT_GPU_IMAGE)
    written = []
    for name in C.STEPS:
        path = out_dir / f"{name.replace('_', '-')}.yaml"
        compiler.Compiler().compile(getattr(c, name), package_path=str(path))
        written.append(path)
    return written
