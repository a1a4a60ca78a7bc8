"""The one settings file: ``params.yaml`` validated into typed objects.

DVC reads the same file (``params:`` in dvc.yaml), so every number a stage depends on lives here. Unknown or
mistyped keys fail loudly with the dotted key path, e.g. ``sites.cardiac_ct.lables: unknown key``.

Profiles select sizes: ``quick`` runs on 2 CPU cores in minutes, ``paper`` uses the papers' values (256x256
slices, batch 8, 20k iterations). The active profile is ``profile:`` in the file, or ``--profile`` on the CLI, or
the ``SITEADAPT_PROFILE`` environment variable (CLI flag wins, then the environment, then the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Strict):
    raw: Path = Path("data/raw")  # synthetic sites are written here
    ingested: Path = Path("data/ingested")  # <ingested>/<site>/{images,labels,manifest.json}
    prepared: Path = Path("data/prepared")  # <prepared>/<site>/{train,val,test}.npz, subjects.json, norm.json
    predictions: Path = Path("data/predictions")
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    reports: Path = Path("reports")
    registry: Path = Path("registry")  # <registry>/<task>/<site>/<method>.json: what `siteadapt register` registered
    remote: Path = Path("data/remote")  # local copies of site folders that live on an object store (s3://)

    @field_validator("*", mode="before")
    @classmethod
    def _local_only(cls, v):
        if isinstance(v, str) and "://" in v:
            raise ValueError("a local folder is needed here; object-store URIs (s3://...) are for site images/labels, "
                             "`siteadapt sync` and the DVC remote (see README: Storage)")
        return v


class Augment(_Strict):
    """Random geometric augmentation of training slices, drawn by the training engine from its seeded sampler for
    every trained method alike: each source image with its label map and each target image gets its own rotation,
    isotropic scaling and shear (the SIFA papers: "rotation, scaling, and affine transformations"). No flips (they
    would swap left and right structures). All zero (the default) = off; the draws then do not happen, so runs without
    augmentation are unchanged."""

    rotate_deg: float = Field(0.0, ge=0, le=180, description="rotation angle drawn from [-rotate_deg, rotate_deg]")
    scale: float = Field(0.0, ge=0, lt=1, description="scale factor drawn from [1 - scale, 1 + scale]")
    shear_deg: float = Field(0.0, ge=0, lt=60, description="shear angle drawn from [-shear_deg, shear_deg]")

    @property
    def enabled(self) -> bool:
        return bool(self.rotate_deg or self.scale or self.shear_deg)


class Profile(_Strict):
    image_size: int = Field(gt=7, description="in-plane size of training slices (pixels)")
    batch_size: int = Field(gt=0)
    iterations: int = Field(gt=0)
    adapt_iterations: int | None = Field(None, gt=0, description="iterations of methods that learn from unlabeled "
                                         "target images (GANs converge slower than a segmenter); None: iterations")
    width: float = Field(gt=0, le=4, description="channel-width multiplier of the networks (1.0 = papers)")
    synth_scale: float = Field(gt=0, le=2, description="matrix-size factor of the synthetic sites")
    synth_subjects: int = Field(gt=2, description="3D subjects per synthetic site")
    synth_images: int = Field(gt=4, description="2D images per synthetic site")
    synth_images_classification: int = Field(400, gt=4, description="2D images per synthetic site of a "
                                              "classification task (AUC needs more test images than Dice)")
    slice_spacing_mm: float = Field(gt=0, description="spacing along the slicing axis of 3D tasks")
    augment: Augment = Augment()


class TaskProfile(_Strict):
    """A task's own values for some of a profile's training sizes (``tasks.<task>.profiles.<profile>``); what is not
    given comes from ``profiles.<profile>``."""

    width: float | None = Field(None, gt=0, le=4)
    batch_size: int | None = Field(None, gt=0)
    iterations: int | None = Field(None, gt=0)
    adapt_iterations: int | None = Field(None, gt=0)
    augment: Augment | None = None


class Direction(_Strict):
    source: str
    target: str


class Split(_Strict):
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _room_for_training(self):
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave subjects for training")
        return self


class Preprocess(_Strict):
    slice_axis: Literal["sagittal", "coronal", "axial"] = "coronal"
    roi_mm: tuple[float, float, float] = (128.0, 128.0, 128.0)
    """Box cropped around the region of interest, in mm along R, A, S of the canonical (RAS) grid. For 2D tasks only
    the first two are used and the box is the whole (padded-square) image."""
    roi_rule: Literal["auto", "labels", "foreground"] = "auto"
    """How the box is centred. ``labels``: centre of the labeled structures' bounding box. ``foreground``: label-free,
    centre of the body mask's bounding box plus ``roi_offset_mm``. ``auto``: ``labels`` for a site that is never a
    target, ``foreground`` otherwise (a target site's labels are never read before evaluation)."""
    roi_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mr_top_cut: float = Field(0.02, ge=0, lt=0.5, description="fraction of the brightest voxels clipped per MR volume")
    ct_clip_percentiles: tuple[float, float] = (0.5, 99.5)
    split: Split = Split()


class Postprocess(_Strict):
    largest_cc: bool = True
    fill_holes: bool = True


class Task(_Strict):
    kind: Literal["segmentation", "classification"] = "segmentation"
    dims: Literal[2, 3] = 3
    structures: dict[str, int] = {}
    """Segmentation: label ids of the structures (0 is background)."""
    classes: list[str] = []
    """Classification: image-level class names, index = class id; ``[negative, positive]`` (e.g. ``[normal,
    pneumonia]``): the metrics score the second class. Labels come from a CSV (``stem,label``) or class folders."""
    directions: list[Direction] = []
    methods: list[str] = []
    """Methods (or named variants from ``methods:``) run for every direction by the demo / DVC pipeline, in table
    order. ``supervised`` is the upper bound (it reads the target's labels; evaluation-only reference)."""
    preprocess: Preprocess = Preprocess()
    postprocess: Postprocess = Postprocess()
    profiles: dict[str, TaskProfile] = {}
    """Per-task overrides of a profile's training sizes (``{quick: {width: 0.25}}``): every model of the task's
    sites (source, adapted, upper bounds) trains with them; other tasks keep the profile's values."""
    method_options: dict[str, dict] = {}
    """Per-task overrides of ``methods.<name>`` options (e.g. a classifier's learning rate), applied on top of them
    for this task's sites only; for a named variant, the base method's entry applies first, then the variant's."""

    @field_validator("structures")
    @classmethod
    def _ids(cls, v):
        ids = list(v.values())
        if any(i <= 0 or i > 255 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("structure ids must be distinct integers in 1..255 (0 is background)")
        return v

    @model_validator(mode="after")
    def _kind(self):
        if self.kind == "segmentation" and not self.structures:
            raise ValueError("a segmentation task needs at least one structure (structures: {name: id})")
        if self.kind == "classification":
            if len(self.classes) != 2 or len({c.lower() for c in self.classes}) != 2:
                raise ValueError("a classification task needs exactly two distinct classes [negative, positive] "
                                 "(multi-class metrics are not implemented)")
            if self.dims != 2:
                raise ValueError("classification tasks are 2D (dims: 2)")
        return self


def _path_or_uri(v):
    """Local folders become ``Path``; object-store URIs (``s3://bucket/prefix``) stay strings (``Path`` would
    collapse the ``//``)."""
    if isinstance(v, str) and "://" in v:
        from .redact import inline_secret_message, redact_uri

        if not v.startswith(("s3://", "dicomweb+http://", "dicomweb+https://")):
            raise ValueError(f"unsupported URI scheme in {redact_uri(v)!r} (local paths, s3:// and dicomweb+http(s):// "
                             "are supported)")
        refused = inline_secret_message("", v)  # a secret edited into params.yaml: refused, never echoed
        if refused:
            raise ValueError(refused)
        return v
    return Path(v) if isinstance(v, str) else v


class Site(_Strict):
    task: str
    images: Path | str = Field(description="folder of DICOM, NIfTI or 2D images (any nesting), or s3://bucket/prefix")
    labels: Path | str | None = Field(None, description="folder of label maps (or s3:// prefix); for a classification "
                                      "task a CSV file (stem,label), or absent when the images sit in one folder per class")
    modality: str | None = Field(None, description="CT, MR, CR, DX, ...; read from DICOM when absent")
    patients: Path | None = Field(
        None, description="CSV with header stem,patient giving each image's patient (stems matched as labels are), "
                          "for patient-level splits of image folders; DICOM series use their PatientID without it. "
                          "Patient ids are only hashed (keyed), never written")
    pixel_spacing_mm: float | None = Field(None, gt=0, description="for 2D images without spacing (PNG/JPEG, "
                                           "DICOM radiographs without PixelSpacing)")
    synthetic: str | None = Field(None, description="'<task>/<site>' of `siteadapt synth` that produces `images`")
    roi_offset_mm: tuple[float, float, float] | None = Field(
        None, description="this site's label-free crop offset (mm along R, A, S), replacing the task's "
                          "preprocess.roi_offset_mm: for a site whose scanner centres its field of view elsewhere")
    label_map: dict[int, int] = Field(
        {}, description="segmentation: label values of this site's exports -> the task's ids (0 or a structure id), "
                        "e.g. {255: 1} for masks saved as 0/255; applied at ingest. A value neither mapped nor already "
                        "one of the task's ids is refused (LabelValuesError)")

    @field_validator("images", "labels", mode="before")
    @classmethod
    def _uris(cls, v):
        return _path_or_uri(v)

    @field_validator("label_map")
    @classmethod
    def _label_values(cls, v):
        bad = sorted(k for k in v if not 0 <= k <= 65535)
        if bad:
            raise ValueError(f"label values to map must be integers in 0..65535 (label files hold uint8/uint16), got "
                             f"{bad}")
        return v


class Train(_Strict):
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(20, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: int | None = Field(None, gt=0)
    channels_last: bool = Field(True, description="networks and batches in channels_last memory format (CPU too)")


class Gates(_Strict):
    """Promotion gates (``siteadapt promote``): the candidate becomes ``champion`` only if every gate that applies
    passes. A gate set to null is off. Values are measured when the candidate is registered, and these thresholds
    (all of them) are recorded on it then: a promotion with looser ones (a lower ``min_``, a higher ``max_``, a gate
    switched off, ``label_free`` weakened to ``auto``) is refused unless overridden with a recorded reason. The Dice,
    empty and fragmented gates apply to segmentation tasks, the AUC gates to classification tasks."""

    min_target_dice: float | None = Field(0.5, ge=0, le=1, description="mean Dice on the site's labeled test subjects")
    max_source_dice_drop: float | None = Field(
        0.1, ge=-1, le=1, description="label-free: source-site Dice of the source segmenter minus the adapted model's")
    max_empty_fraction: float | None = Field(
        0.1, ge=0, le=1, description="label-free: share of (test subject, structure) pairs predicted empty")
    max_fragmented_fraction: float | None = Field(
        0.25, ge=0, le=1, description="label-free: share of predicted structures whose largest connected component "
                                      "holds less than 90% of the structure")
    min_target_auc: float | None = Field(
        0.7, ge=0, le=1, description="classification: AUC on the site's labeled test images")
    max_source_auc_drop: float | None = Field(
        0.1, ge=-1, le=1, description="classification, label-free: AUC of the source classifier on the source site's "
                                      "test images minus the adapted model's")
    label_free: Literal["auto", "always"] = Field(
        "auto", description="auto: label-free gates only for a site without labeled test subjects; always: also "
                            "for labeled sites")


class Registry(_Strict):
    gates: Gates = Gates()
    selection: Literal["label_free", "labels", "auto"] = Field(
        "label_free", description="how `siteadapt select` picks a target's candidate: label_free (the label-free "
                                  "gates, then selection_score, against noadapt by selection_margin), labels (target "
                                  "Dice / AUC) or auto (labels when every method has a labeled evaluation)")
    selection_score: Literal["consistency", "entropy", "agreement", "tta_entropy"] = Field(
        "consistency", description="the label-free score that orders the candidates passing the gates: consistency "
                                   "(agreement with the prediction of shifted copies), entropy (negative mean "
                                   "prediction entropy), agreement (with the consensus of every candidate) or "
                                   "tta_entropy (negative entropy of the mean over the image and its shifted copies)")
    selection_margin: float = Field(
        0.02, ge=0, description="label-free rule: an adapted model is chosen only when its score beats noadapt's "
                                "(the source model as is) by at least this much (units of the score); else noadapt")


class Pipeline(_Strict):
    """What the main job runs: ``dvc.yaml`` (``siteadapt dvc-gen``) and ``siteadapt demo`` contain the stages of
    these tasks only (default: every task that has sites). A task left out keeps its settings and sites; adding it
    back and regenerating dvc.yaml runs only its stages (and the report)."""

    tasks: list[str] | None = None


class Settings(_Strict):
    profile: str = "quick"
    seed: int = 0
    paths: Paths = Paths()
    profiles: dict[str, Profile]
    tasks: dict[str, Task]
    sites: dict[str, Site]
    train: Train = Train()
    registry: Registry = Registry()
    pipeline: Pipeline = Pipeline()
    methods: dict[str, dict] = {}
    """Per-method options (``methods.<name>.<option>``), validated by each method's own ``Options``."""

    @model_validator(mode="after")
    def _cross_refs(self):
        if self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} is not one of profiles: {sorted(self.profiles)}")
        for name, site in self.sites.items():
            if site.task not in self.tasks:
                raise ValueError(f"sites.{name}.task: unknown task {site.task!r} (tasks: {sorted(self.tasks)})")
            task = self.tasks[site.task]
            if site.label_map and task.kind != "segmentation":
                raise ValueError(f"sites.{name}.label_map: only segmentation sites have label maps (task "
                                 f"{site.task!r} is a {task.kind} task)")
            ids = sorted({0, *task.structures.values()})
            for value, target in site.label_map.items():
                if target not in ids:
                    raise ValueError(f"sites.{name}.label_map.{value}: maps to {target}, which is not one of the ids "
                                     f"of task {site.task!r}: {ids} (0 + its structure ids)")
        for tname, task in self.tasks.items():
            for i, d in enumerate(task.directions):
                for end in ("source", "target"):
                    s = getattr(d, end)
                    if s not in self.sites:
                        raise ValueError(f"tasks.{tname}.directions.{i}.{end}: unknown site {s!r}")
                    if self.sites[s].task != tname:
                        raise ValueError(f"tasks.{tname}.directions.{i}.{end}: site {s!r} belongs to task "
                                         f"{self.sites[s].task!r}")
        for tname, task in self.tasks.items():
            for p in task.profiles:
                if p not in self.profiles:
                    raise ValueError(f"tasks.{tname}.profiles.{p}: unknown profile (profiles: {sorted(self.profiles)})")
        listed = self.pipeline.tasks or []
        for i, t in enumerate(listed):
            if t not in self.tasks:
                raise ValueError(f"pipeline.tasks.{i}: unknown task {t!r} (tasks: {sorted(self.tasks)})")
            if t in listed[:i]:
                raise ValueError(f"pipeline.tasks.{i}: task {t!r} is listed twice")
        return self

    # ---- derived views -------------------------------------------------------------------------------------
    @property
    def active(self) -> Profile:
        return self.profiles[self.profile]

    def profile_for(self, task: str) -> Profile:
        """The active profile with ``tasks.<task>.profiles.<active profile>`` applied (the task's training sizes)."""
        own = self.tasks[task].profiles.get(self.profile)
        if own is None:
            return self.active
        return Profile.model_validate(self.active.model_dump() | own.model_dump(exclude_none=True))

    def site(self, name: str) -> Site:
        try:
            return self.sites[name]
        except KeyError:
            raise ConfigError(f"unknown site {name!r}; sites in params.yaml: {', '.join(sorted(self.sites))}") from None

    def task_of(self, site: str) -> Task:
        return self.tasks[self.site(site).task]

    def is_target(self, site: str) -> bool:
        return any(d.target == site for d in self.task_of(site).directions)

    def direction_to(self, target: str, source: str | None = None) -> Direction:
        ds = [d for d in self.task_of(target).directions if d.target == target and (source is None or d.source == source)]
        if not ds:
            raise ConfigError(f"no adaptation direction in tasks.{self.site(target).task}.directions has target "
                              f"{target!r}" + (f" and source {source!r}" if source else ""))
        if len(ds) > 1:
            raise ConfigError(f"several directions end at {target!r}: pass --source ({', '.join(d.source for d in ds)})")
        return ds[0]

    def pipeline_tasks(self) -> list[str]:
        """The tasks of the main job (``pipeline.tasks``, default all), in the order of ``tasks:``, that have
        sites."""
        chosen = self.pipeline.tasks
        return [t for t in self.tasks if (chosen is None or t in chosen)
                and any(site.task == t for site in self.sites.values())]

    def synth_images(self, task: str) -> int:
        """Images per synthetic 2D site of ``task`` (classification tasks get more: AUC needs more test images)."""
        t = self.tasks.get(task)
        return self.active.synth_images_classification if t is not None and t.kind == "classification" \
            else self.active.synth_images

    def roi_rule(self, site: str) -> str:
        rule = self.task_of(site).preprocess.roi_rule
        if rule == "auto":
            return "foreground" if self.is_target(site) else "labels"
        return rule


def _format_errors(err: ValidationError, source: str) -> str:
    from .redact import redact_text

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{source}: {loc}: required key is missing")
        else:
            msg = redact_text(e["msg"].removeprefix("Value error, "))
            got = redact_text(repr(e.get("input")))  # the value as given, without a URI's credentials
            lines.append(f"{source}: {loc}: {msg} (got {got})" if loc != "(top level)" else f"{source}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently, which once
    dropped a whole ``methods:`` section after a merge)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_settings(data: dict, *, source: str = "params.yaml", profile: str | None = None) -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    data = dict(data)
    chosen = profile or os.environ.get("SITEADAPT_PROFILE")
    if chosen:
        data["profile"] = chosen
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_settings(path: str | Path = "params.yaml", *, profile: str | None = None) -> Settings:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found (run from the project folder or pass --params)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        from .redact import redact_text

        raise ConfigError(f"{path}: not valid YAML: {redact_text(e)}") from None  # the snippet may quote a URI
    return parse_settings(data or {}, source=str(path), profile=profile)
