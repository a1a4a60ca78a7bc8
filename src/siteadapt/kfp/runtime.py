"""What each Kubeflow component runs, as plain Python (no KFP import), so that it is testable on its own.

A component body is two lines: import this module, call one function with the component's parameters and its
artifact paths. Every function builds :class:`~siteadapt.config.Settings` for the run (:func:`settings_for`), lays
out a *workspace* in the project's usual folder layout, and calls the same step function the CLI and DVC call.

Artifacts are *partial project roots*: an artifact folder holds the subset of the project layout its step wrote, e.g.
the source segmenter artifact is ``models/<task>/<source>/source/model.pt``, a prepared site is
``prepared/<site>/{train,val,test}.npz, ...``. A step's workspace is its output artifact folder with every input
artifact's *files* symlinked into the same tree (:class:`Workspace`); after the step the links are removed, so the
output artifact holds exactly what the step wrote and inputs are never modified (a write over a linked file replaces
the link, not the file it points at).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import yaml

from ..config import Paths, Settings, parse_settings
from ..errors import ConfigError, InputError, SiteadaptError
from . import checkpoints, locations

log = logging.getLogger("siteadapt.kfp")

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_PARAMS = "params.yaml"


@contextlib.contextmanager
def cli_errors(command: str) -> Iterator[None]:
    """A component body's errors as the CLI ends on them: a :class:`~siteadapt.errors.SiteadaptError` prints the
    CLI's one line (``siteadapt <command>: error: ...``, :func:`siteadapt.redact.error_line`) on stderr and exits the
    process with the error's ``exit_code`` (``SystemExit``: KFP's executor lets it through, the container ends with
    that code and Python prints no traceback). Any other exception is a bug and keeps its traceback."""
    from .. import redact

    redact.install(at_creation=True)  # the step's log records and an uncaught traceback: credentials masked
    try:
        yield
    except SiteadaptError as e:
        print(redact.error_line(command, e), file=sys.stderr, flush=True)
        raise SystemExit(int(getattr(e, "exit_code", 2))) from None


def check_site_name(name: str) -> str:
    """Site names become folder names, registry model names and run names: lower-case letters, digits, - and _."""
    if not SITE_NAME.match(name or ""):
        raise ConfigError(f"site name {name!r}: use 1-63 lower-case letters, digits, '-' or '_' (starting with a "
                          "letter or digit)")
    return name


def base_params(params_yaml: str = "") -> dict:
    """The run's settings file: ``params_yaml`` when given (the pipeline parameter, reviewable in the run's page),
    else the file named by ``$SITEADAPT_PARAMS`` (the image sets ``/opt/siteadapt/params.yaml``), else
    ``./params.yaml``."""
    if params_yaml and params_yaml.strip():
        source, text = "params_yaml (pipeline parameter)", params_yaml
    else:
        path = Path(os.environ.get("SITEADAPT_PARAMS") or DEFAULT_PARAMS)
        if not path.is_file():
            raise ConfigError(f"{path}: settings file not found (set SITEADAPT_PARAMS or pass params_yaml)")
        source, text = str(path), path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class Job:
    """The pipeline parameters that shape the settings of one site-adaptation run.

    ``site`` is the target site; ``None`` for the steps that only concern the source site (ingest, preprocess and
    train_source of the source), so that their settings -- and therefore their Kubeflow cache keys -- do not depend
    on the target: the source segmenter is trained once and reused by every new site."""

    task: str
    source_site: str
    site: str | None = None
    params_yaml: str = ""
    profile: str = ""
    modality: str = ""  # of the target site; "" = from params (or DICOM)
    pixel_spacing_mm: float = 0.0  # of the target site's 2D images; 0 = from params / the files
    methods: tuple[str, ...] = ()
    gates: dict | None = None  # overrides of registry.gates (params) for this run; at the gates step and promotion
    #                            they only tighten the registered model's admin gate policy (siteadapt.registry)


def settings_for(job: Job, root: Path, *, source_location: str | None = None,
                 target_location: str | None = None) -> Settings:
    """Settings for one run: params (profile, task settings, method options) with every output path under ``root``,
    the task's directions replaced by the single ``source -> site`` direction, and site entries for both ends
    (an existing ``sites.<name>`` entry in params supplies modality and pixel spacing; locations replace ``images``).
    """
    data = base_params(job.params_yaml)
    if job.profile:
        data["profile"] = job.profile
    if job.gates:
        registry = dict(data.get("registry") or {})
        registry["gates"] = {**(registry.get("gates") or {}), **job.gates}
        data["registry"] = registry
    data["paths"] = {k: str(Path(root) / k) for k in Paths.model_fields}  # every output folder inside the workspace
    tasks = data.get("tasks") or {}
    if job.task not in tasks:
        raise ConfigError(f"unknown task {job.task!r}; tasks in params: {', '.join(sorted(tasks)) or '(none)'}")
    check_site_name(job.source_site)
    task = dict(tasks[job.task])
    task["directions"] = [] if job.site is None else [{"source": job.source_site, "target": job.site}]
    if job.methods:
        task["methods"] = list(job.methods)
    data["tasks"] = {**tasks, job.task: task}
    sites = dict(data.get("sites") or {})

    def entry(name: str, location: str | None) -> dict:
        e = dict(sites.get(name) or {})
        if e and e.get("task") != job.task:
            raise ConfigError(f"site {name!r} belongs to task {e.get('task')!r} in params, not {job.task!r}")
        e["task"] = job.task
        e.pop("synthetic", None)
        if location is not None:
            e["images"] = str(location)
            e.pop("labels", None)
        e.setdefault("images", f"(location of {name})")
        return e

    sites[job.source_site] = entry(job.source_site, source_location)
    if job.site is not None:
        check_site_name(job.site)
        if job.site == job.source_site:
            raise ConfigError(f"site {job.site!r} is the source site of the run; pick another name")
        t = entry(job.site, target_location)
        if job.modality:
            t["modality"] = job.modality
        if job.pixel_spacing_mm and job.pixel_spacing_mm > 0:
            t["pixel_spacing_mm"] = float(job.pixel_spacing_mm)
        sites[job.site] = t
    # other tasks' directions may name sites we keep; sites of this task that the run does not use are dropped
    data["sites"] = {n: e for n, e in sites.items()
                     if e.get("task") != job.task or n in (job.source_site, job.site)}
    return parse_settings(data, source="params (kubeflow run)")


# ---- workspace ---------------------------------------------------------------------------------------------------
class Workspace:
    """The project layout of one step: ``root`` (the output artifact folder, or a temporary one) with the files of
    input artifacts linked (or copied) in. Use as a context manager; on exit every link and copy made here is removed
    (unless the step replaced it: then it is the step's output) and emptied folders are pruned."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._links: list[Path] = []
        self._copies: dict[Path, int] = {}  # copied input file -> its inode (a replaced file is an output)

    def add(self, artifact_dir: str | Path | None, *, copy: bool = False) -> None:
        """Link (or, with ``copy``, copy: for consumers that refuse links, such as MLflow's artifact logging) every
        file of an input artifact into the workspace."""
        if artifact_dir is None:
            return
        src_root = Path(artifact_dir)
        if not src_root.is_dir():
            raise InputError(src_root, "input artifact is not a folder")
        for dirpath, _dirnames, filenames in os.walk(src_root):
            rel = Path(dirpath).relative_to(src_root)
            (self.root / rel).mkdir(parents=True, exist_ok=True)
            for fn in filenames:
                dst = self.root / rel / fn
                if dst.is_symlink() or dst in self._copies:
                    dst.unlink()  # two inputs with the same file: the later one wins (they are copies of one step)
                    self._copies.pop(dst, None)
                elif dst.exists():
                    raise InputError(dst, "an input artifact would overwrite an output of this step")
                if copy:
                    shutil.copy2(Path(dirpath) / fn, dst)
                    self._copies[dst] = dst.stat().st_ino
                else:
                    dst.symlink_to((Path(dirpath) / fn).resolve())
                    self._links.append(dst)

    def close(self) -> None:
        for link in self._links:
            if link.is_symlink():  # else the step replaced it with an output of its own
                link.unlink()
        for path, ino in self._copies.items():
            if path.is_file() and path.stat().st_ino == ino:  # an input copy the step did not replace
                path.unlink()
        self._links.clear()
        self._copies.clear()
        for dirpath, _dirnames, _files in sorted(os.walk(self.root), key=lambda w: -len(Path(w[0]).parts)):
            p = Path(dirpath)
            if p != self.root and not any(p.iterdir()):
                p.rmdir()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_checkpoints(root: Path) -> None:
    """Training checkpoints (optimizer state for resuming) are not part of a model artifact."""
    for p in Path(root).rglob("checkpoint.pt"):
        p.unlink()


# ---- steps -------------------------------------------------------------------------------------------------------
def run_fingerprint(location: str) -> str:
    fp = locations.fingerprint(location)
    log.info("%s: fingerprint %s", location, fp[:16])
    return fp


def _one_site(job: Job) -> str:
    """The site a single-site step (ingest, preprocess) works on: the target when the job names one, else the
    source."""
    return job.site or job.source_site


def run_ingest(job: Job, location: str, out_dir: str | Path) -> dict:
    """Ingest the site at ``location`` into ``out_dir/ingested/<site>``. Segmentation: ``images/`` and optional
    ``labels/`` (label maps). Classification: ``images/`` (one folder per class, or any layout) and optional
    ``labels.csv`` (``stem,label``) beside it, as ``siteadapt synth --task pneumonia`` writes them. An optional
    ``patients.csv`` (``stem,patient``) beside ``images/`` keys the patient-level split (DICOM: PatientID)."""
    from ..steps import api

    site = _one_site(job)
    out_dir = Path(out_dir)
    s = settings_for(job, out_dir, source_location=None if job.site else location,
                     target_location=location if job.site else None)
    task = s.tasks[job.task]
    classification = task.kind == "classification"
    with tempfile.TemporaryDirectory(prefix="siteadapt-fetch-") as tmp:
        local = locations.fetch(location, Path(tmp) / "site")
        images = local / "images"
        if not images.is_dir():
            raise InputError(None, f"{location}: no images/ folder in the site location")
        labels = local / ("labels.csv" if classification else "labels")
        if classification and (local / "labels").is_dir():
            raise InputError(None, f"{location}: task {job.task} is a classification task; its labels are a "
                                   "labels.csv (stem,label) beside images/, or one images/ folder per class, not a "
                                   "labels/ folder")
        patients = local / "patients.csv"  # optional stem,patient table: splits keep a patient's images together
        res = api.ingest(s, site, images=images, labels=labels if labels.exists() else None,
                         patients=patients if patients.is_file() else None)
    labeled = sum(1 for it in res.items if (it.get("class_label") is not None if classification else it.get("label")))
    summary = {"site": site, "items": len(res.items), "labeled": labeled, "rejected": len(res.rejected)}
    log.info("ingest %s: %s", site, summary)
    return summary


def run_preprocess(job: Job, ingested_dir: str | Path, out_dir: str | Path) -> dict:
    from ..steps import api

    site = _one_site(job)
    with Workspace(out_dir) as ws:
        ws.add(ingested_dir)
        res = api.preprocess(settings_for(job, ws.root), site)
    return {"site": site, "counts": res["counts"]}


def run_train_source(job: Job, prepared_source: str | Path, out_dir: str | Path) -> dict:
    """Train the source model; with ``$SITEADAPT_CHECKPOINTS`` set, checkpoints go to the object store and a
    retried or re-submitted step of the same work resumes from there (:mod:`siteadapt.kfp.checkpoints`)."""
    from ..steps import api  # the tracked step (MLflow run), as the CLI, DVC and the demo run it

    out_dir = Path(out_dir)
    with Workspace(out_dir) as ws:
        ws.add(prepared_source)
        s = settings_for(replace(job, site=None), ws.root)
        with checkpoints.persisted("train_source", s, job.source_site, "source", [prepared_source]) as hook:
            path = api.train_source(s, job.source_site, on_checkpoint=hook)
        rel = path.relative_to(ws.root)
    _drop_checkpoints(out_dir)
    return {"model": str(rel)}


def run_adapt(job: Job, method: str, prepared_source: str | Path, prepared_target: str | Path,
              source_model: str | Path, out_dir: str | Path) -> dict:
    """Adapt with one method; object-store checkpoints as :func:`run_train_source`."""
    from ..steps import api

    out_dir = Path(out_dir)
    with Workspace(out_dir) as ws:
        for a in (prepared_source, prepared_target, source_model):
            ws.add(a)
        s = settings_for(job, ws.root)
        with checkpoints.persisted("adapt", s, job.site, method,
                                   [prepared_source, prepared_target, source_model]) as hook:
            path = api.adapt(s, job.site, method, source=job.source_site, on_checkpoint=hook)
        rel = path.relative_to(ws.root)
    _drop_checkpoints(out_dir)
    return {"method": method, "model": str(rel)}


def run_evaluate(job: Job, method: str, ingested_target: str | Path, prepared_target: str | Path,
                 source_model: str | Path, model: str | Path, out_dir: str | Path) -> dict:
    """Predict the target's test subjects and evaluate them (the tracked step: metrics into the model's MLflow run):
    Dice etc. against labels when the site has labeled test subjects, the label-free checks always; classification:
    AUC etc. on labeled test images (``metrics/<task>/<site>/<method>.json``). Returns a summary of the evaluation
    with the method's label-free scores on the target's test images (``entropy``, ``consistency``;
    :mod:`siteadapt.steps.select`); the registration step measures the rest of the evidence and ranks the methods."""
    from ..layout import metrics_path, read_metrics
    from ..methods.build import load_for_prediction
    from ..steps import api
    from ..steps.select import target_images, unsupervised_scores

    out_dir = Path(out_dir)
    with Workspace(out_dir) as ws:
        for a in (ingested_target, prepared_target, source_model, model):
            ws.add(a)
        s = settings_for(job, ws.root)
        m = read_metrics(api.evaluate(s, job.site, method, predict=True))
        rel = metrics_path(s, job.site, method).relative_to(ws.root)
        task = s.tasks[job.task]
        ids = sorted(task.structures.values()) if task.kind == "segmentation" else ()
        scores = unsupervised_scores(load_for_prediction(s, job.site, method), *target_images(s, job.site),
                                     task.kind, ids)
    summary = {"method": method, "site": job.site, "task": job.task, "metrics_file": str(rel)}
    if m.get("kind") == "classification":
        labeled = bool(m.get("labeled", True) and m.get("auc") is not None)
        summary.update(kind="classification", labeled=labeled, auc=m.get("auc") if labeled else None)
    else:
        labeled = bool(m.get("labeled", True) and m.get("dice"))
        pl = m.get("plausibility") or {}
        summary.update(labeled=labeled, dice_mean=m["dice"]["mean"] if labeled else None,
                       assd_mean=(m.get("assd") or {}).get("mean") if labeled else None,
                       empty_fraction=pl.get("empty_fraction"), fragmented_fraction=pl.get("fragmented_fraction"))
    summary.update(scores)
    summary["score"] = score(summary)
    write_json_file(out_dir / "summary" / f"{method}.json", summary)
    return summary


def score(summary: dict) -> float | None:
    """The label-free score of one evaluated method that :func:`siteadapt.steps.select.rank` orders the methods
    passing the label-free gates by (its shift consistency on the target's test images); shown per method in the
    Kubeflow UI. The candidate is chosen by :func:`run_register` (:func:`siteadapt.steps.select.select`)."""
    v = summary.get("consistency")
    return None if v is None else float(v)


def write_json_file(path: Path, obj) -> None:
    from ..io.atomic import write_json

    write_json(path, obj)


def check_gates(job: Job, candidate: dict) -> dict:
    """The promotion gates, as the registry checks them (:func:`siteadapt.registry.promote.preview_promotion`): the
    registered model's gate policy (its admin policy, else the run's ``registry.gates``) tightened by the run's
    settings, applied to the measurements recorded on the candidate version at registration. The run's
    ``gate_thresholds`` can therefore tighten an admin policy but never loosen it, and a candidate recorded with
    gates looser than the policy does not pass. Returns ``{"passed": bool, "gates": [{name, value, threshold,
    passed}], "policy", "refused"}``."""
    from ..registry.promote import preview_promotion

    reg = candidate["registered"]
    with tempfile.TemporaryDirectory(prefix="siteadapt-gates-") as tmp:
        s = settings_for(job, Path(tmp))
    res = preview_promotion(s, reg["name"], str(reg["version"]), s.tasks[job.task].kind)
    if res["refused"]:
        log.warning("candidate %s version %s would be refused: %s", reg["name"], reg["version"], res["refused"])
    return res  # no gate configured: passes, as promote


def run_register(job: Job, summaries: list[str | dict], inputs: list[str | Path],
                 predictions_out: str | Path | None = None) -> dict:
    """Choose the run's candidate with the select step (:func:`siteadapt.steps.select.select`: label-trained
    references excluded, the label-free gates, then shift consistency; or the labels, as ``registry.selection``
    says) and register it (registry alias ``candidate``) with the selection as ``selection.*`` tags.

    ``inputs`` are the artifacts the select and registry steps read (both sites' ingested and prepared data, the
    source segmenter, every method's model and evaluation): they measure the models on them and the registry records
    their hashes. Returns the winner's evaluation summary with ``registered``, ``compared`` (per method: ``score``,
    ``rank``, ``gates_passed``) and ``selection`` (the record ``siteadapt select`` writes to selection.json).

    ``predictions_out``: an artifact folder that receives the winner's predictions (``predictions/<site>/<method>/``
    of its evaluation artifact), for the PACS export after promotion; the export step cannot take the loop's
    collected evaluations itself (KFP 2.17 does not compile a ``dsl.Collected`` input inside a ``dsl.If``)."""
    from ..steps import api

    parsed = [json.loads(s) if isinstance(s, str) else s for s in summaries]
    evaluated = [p["method"] for p in parsed]
    methods = [m for m in job.methods if m in evaluated] + [m for m in evaluated if m not in job.methods]
    with tempfile.TemporaryDirectory(prefix="siteadapt-register-") as tmp, Workspace(tmp) as ws:
        for a in inputs:  # models are copied: MLflow logs them as the registered model's files
            ws.add(a, copy=(Path(a) / "models").is_dir())
        s = settings_for(job, ws.root)
        # no adaptation may win without a model of it in this run (not in the job's methods): the step makes it
        # (nothing trains: the source segmenter as is), so that it is registered with its own evaluation
        sel = api.select(s, job.site, methods=methods, register=True)
        reg = sel.pop("registered")
        winner_predictions = s.paths.predictions / job.site / sel["winner"]
        if predictions_out is not None and winner_predictions.is_dir():  # links are copied as the files they name
            shutil.copytree(winner_predictions, Path(predictions_out) / "predictions" / job.site / sel["winner"],
                            dirs_exist_ok=True)
        root = f"{ws.root}{os.sep}"
        for r in sel["methods"]:  # paths in the record: relative to the project layout, not this temporary folder
            for k in ("model", "metrics"):
                r[k] = str(r[k]).removeprefix(root)
    best = next((p for p in parsed if p["method"] == sel["winner"]), {"method": sel["winner"]})
    sel["registered"] = {k: reg.get(k) for k in ("name", "version", "alias", "run_id")}
    out = {**best, "registered": sel["registered"], "selection": sel,
           "compared": [{"method": r["method"], "score": r["score"], "rank": r["rank"],
                         "gates_passed": r["gates_passed"]} for r in sel["methods"]]}
    log.info("registered %s for %s (selection %s): %s", sel["winner"], job.site, sel["rule"], out["registered"])
    return out


def run_promote(job: Job, candidate: dict, actor: str, reason: str) -> dict:
    from ..registry.promote import promote

    with tempfile.TemporaryDirectory(prefix="siteadapt-promote-") as tmp:
        s = settings_for(job, Path(tmp))
        res = promote(s, job.site, task=job.task, actor=actor, reason=reason)
    if res.get("promoted"):
        log.info("promoted %s version %s to champion", job.site, res.get("version"))
    else:
        failed = [g for g in res.get("gates", []) if not g.get("passed")]
        log.warning("registry refused promotion of %s version %s: %s", job.site, res.get("version"), failed)
    return res


def run_export(job: Job, candidate: dict, promotion: dict, pacs_uri: str, predictions: str | Path) -> dict:
    """Push the champion's segmentations of the site's test subjects back to its PACS: one DICOM SEG per subject,
    STOW-RS to ``pacs_uri`` (the site's ``dicomweb+http(s)://`` URI with its query). Returns a summary with counts
    and the model version only (no UIDs, no ids).

    - **Champion only.** Nothing is exported unless ``promotion`` (the promote step's result) says the registry
      moved ``champion`` to the version this run registered (``candidate["registered"]``), and, with tracking on,
      the alias still points there; otherwise the summary says why it was skipped.
    - **Predictions** are the winner's label maps of the test subjects on their original grids, as its evaluate
      step wrote them, in the artifact ``predictions`` (``predictions/<site>/<method>/``) that the register step
      fills from the winner's evaluation artifact.
    - **Original UIDs without a stored key file.** The ingest step's UID key file (:mod:`siteadapt.io.uidmap`)
      stayed in its pod, and no UID may enter an artifact, MLflow or a log. The export finds the subjects' series
      again on the PACS instead: QIDO-RS with the site's query, WADO-RS metadata, and the anonymous ids recomputed
      with the de-identification key (``SITEADAPT_DEID_KEY``, the same secret the ingest step had) and the site
      name (:func:`siteadapt.steps.export.pacs_uid_record`). Nothing extra is persisted; a subject no longer on the
      PACS fails the step.
    - The SEG files (they carry the patient and study of their source) are written to a temporary folder that is
      removed with the step: they leave the pod only by STOW-RS, never as an artifact.
    """
    from ..steps.export import export

    check_site_name(job.site or "")
    reg = candidate.get("registered") or {}
    version = str(promotion.get("version") or "")
    summary = {"site": job.site, "method": candidate.get("method"), "model_version": version or None,
               "exported": 0, "stored": 0}
    if not promotion.get("promoted"):
        return {**summary, "skipped": "the registry did not promote this run's candidate"}
    if version != str(reg.get("version")):
        return {**summary, "skipped": f"champion is version {version}, this run registered {reg.get('version')}"}
    champion = _champion_version(job, reg.get("name"))
    if champion is not None and champion != version:
        return {**summary, "skipped": f"champion moved to version {champion} since the promotion"}
    method = candidate["method"]
    if not (Path(predictions) / "predictions" / job.site / method / "predictions.json").is_file():
        raise InputError(None, f"no predictions of {method} for {job.site} in the predictions artifact")
    with tempfile.TemporaryDirectory(prefix="siteadapt-export-") as tmp, Workspace(Path(tmp) / "ws") as ws:
        ws.add(predictions)
        s = settings_for(job, ws.root, target_location=pacs_uri)
        res = export(s, job.site, method, out=Path(tmp) / "seg", stow=pacs_uri, model_version=version,
                     from_pacs=True)
    summary.update(exported=len(res["subjects"]), stored=res["stored"], seg_version=res["version"],
                   frames=sum(x["frames"] for x in res["subjects"]))
    log.info("export %s/%s (model version %s): %d SEG, %d stored over STOW-RS", job.site, method, version,
             summary["exported"], summary["stored"])
    return summary


def _champion_version(job: Job, name: str | None) -> str | None:
    """The registry's ``champion`` version of the site's model now (``"none"`` without one); None with tracking
    off (then the promote step's result is all there is to go by)."""
    from .. import tracking

    if not name or not tracking.enabled():
        return None
    try:
        return str(tracking.connect().get_model_version_by_alias(name, "champion").version)
    except Exception:  # noqa: BLE001 (MlflowException: no such alias)
        return "none"
