"""Register step and promotion: each site's adapted models in the MLflow model registry, and the gate that decides
which version serves the site.

- :func:`register_model` logs an adapted model as an MLflow ``pyfunc`` model (a thin wrapper around the method's
  ``predict_subject``, with an input example and signature) into the model's training run, registers it as a new
  version of ``siteadapt-<task>-<site>``, tags it (method, variant, source and target site, sha256 of the sites' data,
  the method options, git commit, the gate measurements, the gate thresholds in force) and moves the alias
  ``candidate`` to it. Registering the same weights again re-uses their version (only the alias moves; the recorded
  thresholds can only get stricter).
- :func:`promote` moves the alias ``champion`` to the ``candidate`` version if every configured gate passes
  (``registry.gates`` in params.yaml, which may be stricter than the thresholds recorded at registration but not
  looser: :class:`GateLoosenedError`, unless overridden with a reason, which is recorded) and records the
  authenticated identity, when and why as tags, with a signed promotion record; a failed gate refuses the promotion
  (recorded as well) and is reported in the returned ``gates`` list.
- :func:`verify_champion` (``siteadapt promote --check``) tells whether the ``champion`` alias was put where it is
  by :func:`promote` (any MLflow client can move an alias; k8s/MLFLOW-AUTH.md puts the server behind authentication).

Gates (measured and their thresholds recorded at registration; promotion applies the promoter's ``registry.gates``,
which may tighten the recorded thresholds but not loosen them):

- segmentation, a site with labeled test subjects: ``min_target_dice`` (mean Dice over structures and test
  subjects, from ``siteadapt evaluate``);
- segmentation, a site without them (and every site with ``label_free: always``): ``max_source_dice_drop`` (the
  adapted model must not forget the source site: Dice of the source segmenter on the source site's test subjects
  minus the adapted model's), ``max_empty_fraction`` and ``max_fragmented_fraction`` (plausibility of the predicted
  shapes on the site's test subjects, :mod:`siteadapt.metrics.plausibility`);
- classification, a site with labeled test images: ``min_target_auc`` (AUC on them, from ``siteadapt evaluate``);
- classification, a site without them (and with ``label_free: always``): ``max_source_auc_drop`` (AUC of the source
  classifier on the source site's labeled test images minus the adapted model's). Shape plausibility has no
  classification counterpart.

A gate whose threshold is null is off; a gate whose measurement is missing fails (value ``None``). The task's kind
is recorded on the version (tag ``kind``) and picks the gates at promotion.

The pyfunc model's input is preprocessed images (``siteadapt preprocess`` output: a subject's slices, or a batch of
2D images of a classification task), float32 ``(N, 1, H, W)`` in [-1, 1] (the signature enforces it). Its output:
segmentation, the label map ``(N, H, W)`` (uint8, the task's label ids; :class:`SiteadaptSegmenter`);
classification, P(positive class) per image ``(N,)`` (float32, the task's ``classes[1]``;
:class:`SiteadaptClassifier`). It is stored as code (``siteadapt/pyfunc_model.py`` / ``pyfunc_classifier.py``), not
as a pickle. Loading it needs the ``siteadapt`` package in the environment (it is listed in the model's
requirements). Input with NaN or +/-Inf anywhere is refused (:class:`NonFiniteInputError`, with the counts), never
mapped to a label map or a probability.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from .. import __version__
from ..config import Gates, Settings
from ..errors import GateLoosenedError, InputError, RegistryError, SiteadaptError
from .evaluate import metrics_path
from .select import label_dice

log = logging.getLogger("siteadapt.register")

CANDIDATE = "candidate"
CHAMPION = "champion"
ENV_PROMOTION_KEY = "SITEADAPT_PROMOTION_KEY"  # HMAC key of the gate and promotion records (a k8s Secret)
GATES_PREFIX = "gates."                        # version tags: the gate thresholds recorded at registration
GATES_DIGEST = "gates.digest"
GATES_DIGEST_ALG = "gates.digest_alg"
RECORD_TAG = "promotion.record"                # version tags: what siteadapt wrote when it promoted the version
RECORD_SIG = "promotion.signature"
RECORD_SIG_ALG = "promotion.signature_alg"


class NonFiniteInputError(SiteadaptError, MlflowException):
    """The serving input holds NaN or infinite values: nothing is predicted. An ``MlflowException`` with error code
    ``INVALID_PARAMETER_VALUE`` as well, so that a model server answers 400 with this message rather than a
    generic 500."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


def model_name(task: str, site: str) -> str:
    return f"siteadapt-{task}-{site}"


class _SiteadaptModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a trained method (its ``model.pt`` and, for methods that apply it, the source model)."""

    _skip_type_hint_validation = True  # no type-hint validation: the input is a float32 tensor that the signature checks

    def load_context(self, context):
        from siteadapt.steps.train import load_model

        self.method, _ = load_model(Path(context.artifacts["model"]))
        if self.method.needs_source_model:
            src, _ = load_model(Path(context.artifacts["source_model"]))
            self.method.source_model = src

    def _logits(self, model_input):
        import torch

        with np.errstate(over="ignore"):  # a value beyond float32 becomes +/-Inf here, and is counted as such
            x = np.asarray(model_input, dtype=np.float32)
        check_finite(x)
        if x.ndim == 3:
            x = x[:, None]
        with torch.no_grad():
            return self.method.predict_subject(torch.from_numpy(np.ascontiguousarray(x))).float()


class SiteadaptSegmenter(_SiteadaptModel):
    """Segmentation: preprocessed slices of one subject -> label map (see the module docstring)."""

    def predict(self, context, model_input, params=None):
        return self._logits(model_input).argmax(1).numpy().astype(np.uint8)


class SiteadaptClassifier(_SiteadaptModel):
    """Classification: preprocessed images (N, 1, H, W) -> P(positive class) per image, float32 (N,)."""

    def predict(self, context, model_input, params=None):
        import torch

        logits = self._logits(model_input)
        if logits.ndim != 2:
            raise ValueError(f"expected class logits (N, K) from {self.method.name}, got shape {tuple(logits.shape)}")
        return torch.softmax(logits, 1)[:, 1].numpy().astype(np.float32)


def check_finite(x: np.ndarray) -> None:
    """Refuse input with NaN or +/-Inf anywhere (counted after the cast to float32, as the network would see it):
    a network maps NaN to some class silently (an all-background label map), so garbage in must not look like a
    result. Raises :class:`NonFiniteInputError` with the counts; names no value and no file."""
    finite = np.isfinite(x)
    if finite.all():
        return
    n_nan = int(np.isnan(x).sum())
    n_pos, n_neg = int(np.isposinf(x).sum()), int(np.isneginf(x).sum())
    raise NonFiniteInputError(
        f"input refused: {x.size - int(finite.sum())} of {x.size} values are not finite (NaN {n_nan}, +Inf {n_pos}, "
        f"-Inf {n_neg}); the model takes preprocessed images (siteadapt preprocess: float32 in [-1, 1]) and "
        "predicted nothing")


WRAPPERS = {"segmentation": (SiteadaptSegmenter, "pyfunc_model.py"),
            "classification": (SiteadaptClassifier, "pyfunc_classifier.py")}


# ---- measurements ---------------------------------------------------------------------------------------------------
def _weights_sha256(path: Path, h=None):
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=False)
    h = h or hashlib.sha256()
    h.update(json.dumps({"method": payload["method"], "options": payload["options"]}, sort_keys=True,
                        default=str).encode())
    for k in sorted(payload["state_dict"]):
        h.update(k.encode())
        h.update(payload["state_dict"][k].numpy().tobytes())
    return h


def source_regression(settings: Settings, site: str, method: str, seed: int | None = None) -> dict:
    """Segmentation: Dice on the source site's labeled test slices (per subject, mean over structures, then over
    subjects) of the source segmenter and of the adapted model; ``source_dice_drop`` = source segmenter - adapted.
    Classification: AUC on the source site's labeled test images of both; ``source_auc_drop`` = source - adapted.

    The source segmenter is the one the adapted model was built from (its seed). An adapted model that carries the
    target's batch-norm statistics (``site_statistics``: AdaBN, TENT, self-training with AdaBN, FDA) is measured as
    it would run on the source site, its statistics re-estimated on the source test images
    (:meth:`~siteadapt.methods.base.Method.for_site`; label-free): with the target's statistics on source images
    every such model "drops" by design, which says nothing about whether its weights still solve the task."""
    import torch

    from ..data.shards import load_slices
    from .train import load_for_prediction, load_model, model_dir, source_model_path

    adapted = load_for_prediction(settings, site, method, seed)
    payload = torch.load(model_dir(settings, site, method, seed) / "model.pt", map_location="cpu", weights_only=False)
    source = payload.get("source_site")
    if not source:
        return {}
    try:
        data = load_slices(settings.paths.prepared, source, "test", labels=True)
    except InputError as e:
        log.warning("source regression not measured: %s", e)
        return {}
    src_model, _ = load_model(source_model_path(settings, source, payload.get("seed", seed)))
    adapted = adapted.for_site(torch.from_numpy(np.ascontiguousarray(data.images)).unsqueeze(1))
    if settings.task_of(site).kind == "classification":
        return _source_auc(src_model, adapted, data)
    ids = sorted(settings.task_of(site).structures.values())
    d_src, d_ad = [], []
    with torch.no_grad():
        for subj in np.unique(data.subject):
            rows = data.subject == subj
            x = torch.from_numpy(np.ascontiguousarray(data.images[rows])).unsqueeze(1)
            ref = data.labels[rows]
            a = label_dice(src_model.predict_subject(x).argmax(1).numpy(), ref, ids)
            b = label_dice(adapted.predict_subject(x).argmax(1).numpy(), ref, ids)
            if a is not None and b is not None:
                d_src.append(a)
                d_ad.append(b)
    if not d_src:
        return {}
    return {"source_dice_source_model": float(np.mean(d_src)), "source_dice_adapted": float(np.mean(d_ad)),
            "source_dice_drop": float(np.mean(d_src) - np.mean(d_ad))}


def _source_auc(src_model, adapted, data) -> dict:
    """AUC of the source classifier and of the adapted model on the source site's labeled test images."""
    import torch

    from ..metrics import auc

    if data.labels is None or len(data) == 0 or len(np.unique(data.labels)) < 2:
        log.warning("source AUC not measured: the source site's test split needs images of both classes")
        return {}
    x = torch.from_numpy(np.ascontiguousarray(data.images)).unsqueeze(1)
    with torch.no_grad():
        s_src = torch.softmax(src_model.predict_subject(x).float(), 1)[:, 1].numpy()
        s_ad = torch.softmax(adapted.predict_subject(x).float(), 1)[:, 1].numpy()
    a_src, a_ad = auc(data.labels, s_src), auc(data.labels, s_ad)
    if not (np.isfinite(a_src) and np.isfinite(a_ad)):
        return {}
    return {"source_auc_source_model": float(a_src), "source_auc_adapted": float(a_ad),
            "source_auc_drop": float(a_src - a_ad)}


def gate_values(settings: Settings, site: str, method: str, seed: int | None = None) -> dict[str, float | None]:
    """What the gates threshold, measured now: segmentation: target Dice (labeled sites), plausibility, source
    Dice regression; classification: target AUC (labeled sites), source AUC regression."""
    mp = metrics_path(settings, site, method, seed)
    if not mp.is_file():
        raise InputError(mp, f"no evaluation of {method} on {site}: run `siteadapt evaluate --site {site} --method "
                             f"{method} --predict` first")
    m = json.loads(mp.read_text())
    if settings.task_of(site).kind == "classification":
        vals: dict[str, float | None] = {"target_auc": None}
        if m.get("labeled", True) and m.get("auc") is not None:
            vals.update({"target_auc": m["auc"], "target_accuracy": m.get("accuracy"),
                         "target_sensitivity": m.get("sensitivity"), "target_specificity": m.get("specificity"),
                         "target_n_images": m.get("n_test")})
        vals.update(source_regression(settings, site, method, seed))
        return vals
    vals = {"target_dice": None}
    if m.get("labeled", True) and m.get("dice"):
        vals["target_dice"] = m["dice"].get("mean")
        vals["target_assd"] = (m.get("assd") or {}).get("mean")
        vals["target_n_subjects"] = m.get("n_subjects")
    pl = m.get("plausibility") or {}
    vals["empty_fraction"] = pl.get("empty_fraction")
    vals["fragmented_fraction"] = pl.get("fragmented_fraction")
    vals.update(source_regression(settings, site, method, seed))
    return vals


GATES = [  # (gate = params key, measurement, comparison, label-free, task kind)
    ("min_target_dice", "target_dice", ">=", False, "segmentation"),
    ("max_source_dice_drop", "source_dice_drop", "<=", True, "segmentation"),
    ("max_empty_fraction", "empty_fraction", "<=", True, "segmentation"),
    ("max_fragmented_fraction", "fragmented_fraction", "<=", True, "segmentation"),
    ("min_target_auc", "target_auc", ">=", False, "classification"),
    ("max_source_auc_drop", "source_auc_drop", "<=", True, "classification"),
]
TARGET_MEASURE = {"segmentation": "target_dice", "classification": "target_auc"}  # present = a labeled site


def check_gates(cfg: Gates, values: dict[str, float | None], kind: str | None = None) -> list[dict]:
    """The gates of ``registry.gates`` that apply to a model of task kind ``kind`` (None: read from the
    measurements, ``target_auc`` only exists for classification) with measurements ``values``."""
    if kind is None:
        kind = "classification" if "target_auc" in values or "source_auc_drop" in values else "segmentation"
    if kind not in TARGET_MEASURE:
        raise RegistryError(f"unknown task kind {kind!r} (segmentation or classification)")
    labeled = values.get(TARGET_MEASURE[kind]) is not None
    out = []
    for name, key, op, label_free, gate_kind in GATES:
        threshold = getattr(cfg, name)
        if threshold is None or gate_kind != kind:
            continue
        if label_free and labeled and cfg.label_free == "auto":
            continue
        if not label_free and not labeled:
            continue
        v = values.get(key)
        passed = v is not None and (v >= threshold if op == ">=" else v <= threshold)
        out.append({"name": name, "value": v, "threshold": threshold, "passed": bool(passed)})
    return out


def format_gate(g: dict) -> str:
    op = ">=" if g["name"].startswith("min_") else "<="
    v = "missing" if g["value"] is None else f"{g['value']:.4f}"
    return f"{g['name']}: {v} (needs {op} {g['threshold']}) {'passed' if g['passed'] else 'FAILED'}"


# ---- gate policy: recorded at registration, compared at promotion ---------------------------------------------------
def _key() -> bytes | None:
    k = os.environ.get(ENV_PROMOTION_KEY, "")
    return k.encode() if k else None


def _digest(payload: dict) -> tuple[str, str]:
    """(algorithm, hex digest) of ``payload`` as canonical JSON: HMAC-SHA256 with ``$SITEADAPT_PROMOTION_KEY`` when
    set (a client without the key cannot forge it), else plain SHA-256 (a consistency check only)."""
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    key = _key()
    if key:
        return "hmac-sha256", hmac.new(key, data, hashlib.sha256).hexdigest()
    return "sha256", hashlib.sha256(data).hexdigest()


def _digest_problem(payload: dict, alg: str | None, digest: str | None, what: str) -> str | None:
    """Why ``digest`` (made with ``alg``) does not vouch for ``payload`` now, or None when it does. With the key set,
    only an HMAC made with it is accepted (a plain SHA-256 could have been written by anyone)."""
    if not digest:
        return f"{what} has no digest"
    want_alg, want = _digest(payload)
    if alg != want_alg:
        if alg == "hmac-sha256":
            return f"{what} is signed with a key: set {ENV_PROMOTION_KEY} to verify it"
        return f"{what} is not signed ({alg}) but {ENV_PROMOTION_KEY} is set: it may have been written without the key"
    if not hmac.compare_digest(want, digest):
        return f"{what} does not match its {alg} digest (changed after siteadapt wrote it)"
    return None


def gate_policy(cfg: Gates) -> dict:
    """Every setting of ``registry.gates`` (thresholds, None = off, and ``label_free``), numbers as floats."""
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in cfg.model_dump().items()}


def _looser(name: str, recorded, requested) -> bool:
    """Whether ``requested`` is looser than ``recorded`` for gate ``name``: a lower ``min_``, a higher ``max_``, a
    gate switched off that was on, or ``label_free`` weakened from ``always`` to ``auto``."""
    if name == "label_free":
        return recorded == "always" and requested != "always"
    if recorded is None:
        return False
    if requested is None:
        return True
    return requested < recorded if name.startswith("min_") else requested > recorded


def loosened_gates(recorded: dict, requested: Gates) -> list[dict]:
    """The gates of ``requested`` looser than ``recorded`` (a :func:`gate_policy`): ``[{"gate", "recorded",
    "requested"}]``. A gate the record does not know (added to siteadapt later) is not compared."""
    want = gate_policy(requested)
    return [{"gate": k, "recorded": recorded[k], "requested": want[k]}
            for k in want if k in recorded and _looser(k, recorded[k], want[k])]


def stricter_policy(a: dict, b: dict) -> dict:
    """Per gate the stricter of two policies (re-registering the same weights can tighten the record, never
    loosen it)."""
    out = dict(a)
    for k, v in b.items():
        if k not in out or _looser(k, v, out[k]):  # out[k] looser than v
            out[k] = v
    return out


def policy_tags(policy: dict) -> dict[str, str]:
    """Version tags of a gate policy: ``gates.<name>`` per setting plus its digest (:func:`_digest`)."""
    alg, digest = _digest(policy)
    return {**{f"{GATES_PREFIX}{k}": _tag_value(v) for k, v in policy.items()},
            GATES_DIGEST: digest, GATES_DIGEST_ALG: alg}


def recorded_policy(tags: dict[str, str]) -> dict | None:
    """The gate policy recorded on a version (its ``gates.*`` tags), None for a version registered without one."""
    out: dict = {}
    for k, v in tags.items():
        if not k.startswith(GATES_PREFIX) or k in (GATES_DIGEST, GATES_DIGEST_ALG):
            continue
        name = k.removeprefix(GATES_PREFIX)
        out[name] = v if name == "label_free" else _float_tag(v)
    return out or None


def recorded_gates(name: str, version: str) -> dict:
    """``{"thresholds": <policy>, "digest", "digest_alg"}`` recorded on a registered version (thresholds None when
    it has none)."""
    from .. import tracking

    tags = tracking.connect().get_model_version(name, version).tags
    return {"thresholds": recorded_policy(tags), "digest": tags.get(GATES_DIGEST),
            "digest_alg": tags.get(GATES_DIGEST_ALG)}


def promoter_identity() -> tuple[str, str]:
    """(who promotes, where the name comes from): ``$MLFLOW_TRACKING_USERNAME`` (``"mlflow"``) when set, else the
    OS user (``"os"``). Behind an authenticating MLflow server (k8s/MLFLOW-AUTH.md) the MLflow name is the one the
    server checked the password of on every request; with a local store only the OS user is known. ``--actor`` is
    never the identity: it is kept beside it as a display note."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    if user:
        return user, "mlflow"
    return _user(), "os"


# ---- registry -------------------------------------------------------------------------------------------------------
def _tag_value(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _float_tag(v: str | None) -> float | None:
    if v is None or v in ("none", "nan", ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def register_model(settings: Settings, site: str, method: str, seed: int | None = None,
                   extra_tags: dict[str, str] | None = None) -> dict:
    """Register the model of ``method`` adapted to ``site`` as a new version of ``siteadapt-<task>-<site>`` with alias
    ``candidate``. ``extra_tags`` are set on the version as well (``siteadapt select`` records why the method won:
    :func:`siteadapt.steps.select.selection_tags`). Returns ``{"name", "version", "alias": "candidate", "run_id"}``.

    The gate thresholds in force (all of ``registry.gates``) are recorded on the version (``gates.<name>`` tags and
    their digest, :func:`policy_tags`): :func:`promote` refuses looser ones. Registering the same weights again keeps
    per gate the stricter of the recorded and the current threshold."""
    import torch

    from .. import tracking
    from .train import model_dir

    task = settings.site(site).task
    kind = settings.tasks[task].kind
    mdir = model_dir(settings, site, method, seed)
    mpath = mdir / "model.pt"
    if not mpath.is_file():
        raise InputError(mpath, f"no model: run `siteadapt adapt --site {site} --method {method}` first")
    client = tracking.connect()  # fail fast (naming the URI) before measuring anything
    payload = torch.load(mpath, map_location="cpu", weights_only=False)
    source = payload.get("source_site")
    artifacts = {"model": str(mpath)}
    h = _weights_sha256(mpath)
    from .train import load_model

    built, _ = load_model(mpath)  # whether it applies the source model can depend on its options and the task's
    cls = type(built)             # kind (e.g. CycleGAN classifies with the source classifier), not only its class
    if built.needs_source_model or payload["options"].get("init_from_source"):
        src = model_dir(settings, source, "source") / "model.pt"
        artifacts["source_model"] = str(src)
        h = _weights_sha256(src, h)
    sha = h.hexdigest()
    values = gate_values(settings, site, method, seed)
    policy = gate_policy(settings.registry.gates)

    name = model_name(task, site)
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get("model_sha256") == sha:
            for k, v in values.items():  # the evaluation may have changed (e.g. post-processing): fresh measurements
                client.set_model_version_tag(name, mv.version, f"gate.{k}", _tag_value(v))
            old = recorded_policy(mv.tags)
            merged = policy if old is None else stricter_policy(old, policy)
            if old is not None and loosened_gates(old, settings.registry.gates):
                log.warning("%s version %s: registry.gates are looser than the recorded gates; the recorded (stricter)"
                            " thresholds stay", name, mv.version)
            if merged != old or _digest_problem(merged, mv.tags.get(GATES_DIGEST_ALG), mv.tags.get(GATES_DIGEST),
                                                 "the gate record"):
                for k, v in policy_tags(merged).items():
                    client.set_model_version_tag(name, mv.version, k, v)
            client.set_model_version_tag(name, mv.version, "kind", kind)
            for k, v in (extra_tags or {}).items():
                client.set_model_version_tag(name, mv.version, k, _tag_value(v))
            client.set_registered_model_alias(name, CANDIDATE, mv.version)
            log.info("%s: same weights as version %s; alias %s moved to it", name, mv.version, CANDIDATE)
            return {"name": name, "version": str(mv.version), "alias": CANDIDATE, "run_id": mv.run_id}

    exp = tracking.experiment_id(client, task)
    rid = tracking.existing_run_id(client, mdir)
    if rid is None:
        rid = client.create_run(exp, run_name=f"register/{site}/{method}",
                                tags={"siteadapt.stage": "register", "task": task, "site": site,
                                      "method": method}).info.run_id
    git = tracking.git_info()
    hashes = tracking.data_hashes(settings, {"source": source, "target": site})
    size = int(payload["context"]["image_size"])
    example = np.random.default_rng(0).uniform(-1, 1, (2, 1, size, size)).astype(np.float32)
    wrapper_cls, code_file = WRAPPERS[kind]
    wrapper = wrapper_cls()
    from mlflow.models import infer_signature

    class _Ctx:
        pass

    ctx = _Ctx()
    ctx.artifacts = artifacts
    wrapper.load_context(ctx)
    signature = infer_signature(example, wrapper.predict(ctx, example))
    with mlflow.start_run(run_id=rid):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).resolve().parents[1] / code_file),
            artifacts=artifacts, input_example=example, signature=signature, registered_model_name=name,
            pip_requirements=[f"siteadapt=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"])
        mlflow.log_metrics({f"gate/{k}": float(v) for k, v in values.items() if v is not None})
    version = str(info.registered_model_version)
    tags = {
        "method": payload["method"], "variant": payload.get("variant", method), "task": task, "kind": kind,
        "source_site": source, "target_site": site, "seed": payload.get("seed", settings.seed),
        "profile": settings.profile, "params": json.dumps(payload["options"], sort_keys=True, default=str),
        "model_sha256": sha, "uses_target_labels": str(cls.trains_on_target_labels).lower(), **git, **hashes,
        **{f"gate.{k}": v for k, v in values.items()}, **policy_tags(policy), **(extra_tags or {}),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, _tag_value(v))
    client.set_registered_model_alias(name, CANDIDATE, version)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=f"siteadapt models of task {task} for site {site} "
                                                         f"(alias {CHAMPION}: serving, {CANDIDATE}: newest)")
    log.info("%s: registered %s as version %s (alias %s), run %s", name, method, version, CANDIDATE, rid)
    return {"name": name, "version": version, "alias": CANDIDATE, "run_id": rid}


def version_gates(name: str, version: str) -> dict[str, float | None]:
    """The gate measurements recorded on a registered version (its ``gate.*`` tags)."""
    from .. import tracking

    mv = tracking.connect().get_model_version(name, version)
    return {k.removeprefix("gate."): _float_tag(v) for k, v in mv.tags.items() if k.startswith("gate.")}


def _by_alias(client, name: str, alias: str, hint: str = ""):
    """The version of ``name`` that ``alias`` points at; :class:`RegistryError` (with ``hint``) when there is none."""
    from .. import tracking

    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException: no such model or alias
        raise RegistryError(f"{name}: no version has alias '{alias}' in "
                            f"{tracking.redact(tracking.tracking_uri())}{hint}") from None


def promote(settings: Settings, site: str, task: str | None = None, actor: str | None = None,
            reason: str | None = None, override_gates: bool = False) -> dict:
    """Move alias ``champion`` to the ``candidate`` version of ``siteadapt-<task>-<site>`` if every gate passes.
    Returns ``{"promoted": bool, "version": str, "gates": [{"name", "value", "threshold", "passed"}, ...],
    "identity": str, "override": None | {...}}``.

    The thresholds applied are ``settings.registry.gates``, but they may not be looser than the ones recorded on the
    version at registration (:func:`loosened_gates`): looser ones raise :class:`GateLoosenedError` (naming each gate,
    its recorded and its requested value; the refusal is tagged on the version, no alias moves) unless
    ``override_gates`` is set with a ``reason``, which is recorded on the version (``promotion.override.*``: who,
    when, which gates, why) and in the promotion record. Stricter thresholds always apply as given.

    Who: the identity of :func:`promoter_identity` (the authenticated MLflow user, else the OS user) is recorded as
    ``promoted_by``; ``actor`` (``--actor``, else ``$SITEADAPT_ACTOR``) is only a display note,
    ``promotion.actor_note``. A promoted version gets a promotion record (``promotion.record``: version, weights and
    gates digests, time, identity, override) signed with ``$SITEADAPT_PROMOTION_KEY`` when set (else a SHA-256
    consistency digest), written before the alias moves; :func:`verify_champion` checks it."""
    from .. import tracking

    reason = (reason or "").strip() or None
    if override_gates and not reason:
        raise RegistryError("--override-gates needs --reason TEXT (recorded on the version with who and when)")
    task = task or settings.site(site).task
    name = model_name(task, site)
    client = tracking.connect()
    mv = _by_alias(client, name, CANDIDATE, f" (run `siteadapt register --site {site} --method METHOD` first)")
    version = str(mv.version)
    identity, source = promoter_identity()
    note = actor or os.environ.get("SITEADAPT_ACTOR") or None
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def history(record: dict) -> None:
        client.set_registered_model_tag(name, f"promotion.{int(_dt.datetime.now().timestamp() * 1000)}",
                                        json.dumps(record, default=str)[:5000])

    def refuse(what: str, details) -> None:
        for k, v in {"promotion_refused_by": identity, "promotion_refused_at": now,
                     "promotion_refused_gates": json.dumps(details, default=str)[:5000]}.items():
            client.set_model_version_tag(name, version, k, v)
        history({"version": version, "by": identity, "actor_note": note, "at": now, "promoted": False,
                 "refused": what, "details": details})

    recorded = recorded_policy(mv.tags)
    loose: list[dict] = []
    if recorded is None:
        if not override_gates:
            refuse("no recorded gates", [])
            raise RegistryError(f"{name} version {version} has no gate thresholds recorded (registered by an older "
                                f"siteadapt): register it again (`siteadapt register`) to record them")
    else:
        problem = _digest_problem(recorded, mv.tags.get(GATES_DIGEST_ALG), mv.tags.get(GATES_DIGEST),
                                  "the gate record")
        if problem:
            refuse("recorded gates do not verify", [problem])
            raise RegistryError(f"{name} version {version}: {problem}; register it again to record the gates")
        loose = loosened_gates(recorded, settings.registry.gates)
        if loose and not override_gates:
            refuse("gates looser than recorded", loose)
            raise GateLoosenedError(
                f"{name} version {version}: gates looser than recorded at registration: "
                + "; ".join(f"{g['gate']} recorded {g['recorded']}, requested {g['requested']}" for g in loose)
                + ". Promote with the recorded gates, or with --override-gates --reason TEXT (recorded)")
    override = None
    if override_gates and (loose or recorded is None):
        override = {"by": identity, "at": now, "gates": loose if recorded is not None else "no recorded gates",
                    "reason": reason[:1000]}

    values = {k.removeprefix("gate."): _float_tag(v) for k, v in mv.tags.items() if k.startswith("gate.")}
    kind = mv.tags.get("kind") or (settings.tasks[task].kind if task in settings.tasks else None)
    gates = check_gates(settings.registry.gates, values, kind)
    ok = all(g["passed"] for g in gates)
    reason = reason or ("gates passed" if ok else "refused by gates")
    summary = {"version": version, "by": identity, "identity_source": source, "actor_note": note, "at": now,
               "reason": reason, "promoted": ok, "gates": gates, "override": override}
    if ok:
        record = {"name": name, "version": version, "model_sha256": mv.tags.get("model_sha256"),
                  "gates_digest": mv.tags.get(GATES_DIGEST), "thresholds": gate_policy(settings.registry.gates),
                  "at": now, "by": identity, "identity_source": source, "override": override}
        alg, sig = _digest(record)
        tags = {RECORD_TAG: json.dumps(record, sort_keys=True, default=str), RECORD_SIG: sig, RECORD_SIG_ALG: alg,
                "promoted_by": identity, "promoted_at": now, "promotion_reason": reason[:1000],
                "promotion.identity_source": source, "promotion.actor_note": note or ""}
        if override:
            tags.update({"promotion.override.by": identity, "promotion.override.at": now,
                         "promotion.override.gates": json.dumps(override["gates"], default=str),
                         "promotion.override.reason": override["reason"]})
        for k, v in tags.items():  # the record first: a champion without one is what a raw client leaves
            client.set_model_version_tag(name, version, k, v)
        client.set_registered_model_alias(name, CHAMPION, version)
        for k, v in {"champion.version": version, "champion.promoted_by": identity, "champion.promoted_at": now,
                     "champion.reason": reason[:1000]}.items():
            client.set_registered_model_tag(name, k, str(v))
        history(summary)
    else:
        refuse("refused by gates", [g for g in gates if not g["passed"]])
    log.info("%s: version %s %s", name, version, "promoted to champion" if ok else "NOT promoted")
    return {"promoted": ok, "version": version, "gates": gates, "identity": identity, "override": override}


def verify_champion(settings: Settings, site: str, task: str | None = None) -> dict:
    """Check that the ``champion`` of ``siteadapt-<task>-<site>`` was put there by :func:`promote`: its version
    carries a promotion record naming this model and version, whose digest verifies (an HMAC with
    ``$SITEADAPT_PROMOTION_KEY`` when set; without the key only a SHA-256 consistency digest can be checked, which
    anyone able to write tags could recompute), whose weights digest is the version's (gates tightened by a later
    registration are fine), and the model's ``champion.version`` tag names the same version. Returns ``{"name",
    "version", "verified", "problems": [...], "record"}``; raises :class:`RegistryError` when there is no champion.
    Detection only: without server authentication any MLflow client can still move the alias (k8s/MLFLOW-AUTH.md)."""
    from .. import tracking

    task = task or settings.site(site).task
    name = model_name(task, site)
    client = tracking.connect()
    mv = _by_alias(client, name, CHAMPION)
    version, problems, record = str(mv.version), [], None
    raw = mv.tags.get(RECORD_TAG)
    if not raw:
        problems.append(f"version {version} has no siteadapt promotion record (the alias was moved outside "
                        f"`siteadapt promote`)")
    else:
        try:
            record = json.loads(raw)
        except ValueError:
            problems.append("the promotion record is not valid JSON")
    if record is not None:
        if record.get("name") != name or str(record.get("version")) != version:
            problems.append(f"the promotion record is for {record.get('name')} version {record.get('version')}")
        p = _digest_problem(record, mv.tags.get(RECORD_SIG_ALG), mv.tags.get(RECORD_SIG), "the promotion record")
        if p:
            problems.append(p)
        if record.get("model_sha256") != mv.tags.get("model_sha256"):
            problems.append("the version's weights digest (model_sha256) differs from the promotion record's")
    pointer = client.get_registered_model(name).tags.get("champion.version")
    if pointer != version:
        problems.append(f"siteadapt last promoted version {pointer}, the alias points at {version}")
    return {"name": name, "version": version, "verified": not problems, "problems": problems, "record": record}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database entry (containers)
        return "unknown"
