"""Register step and promotion: each site's adapted models in the MLflow model registry, and the gate that decides
which version serves the site.

- :func:`register_model` logs an adapted model as an MLflow ``pyfunc`` model (a thin wrapper around the method's
  ``predict_subject``, with an input example and signature) into the model's training run, registers it as a new
  version of ``siteadapt-<task>-<site>``, tags it (method, variant, source and target site, sha256 of the sites' data,
  the method options, git commit, the gate measurements, the registrant's gate thresholds) and moves the alias
  ``candidate`` to it. Registering the same weights again re-uses their version (only the alias moves; the recorded
  thresholds can only get stricter).
- :func:`promote` moves the alias ``champion`` to the ``candidate`` version if every gate of the gate policy in force
  passes (see "Gate policy" below) and records the authenticated identity, when, why and which policy decided as
  tags, with a signed promotion record; a failed gate refuses the promotion (recorded as well) and is reported in
  the returned ``gates`` list.
- :func:`verify_champion` (``siteadapt promote --check``) tells whether the ``champion`` alias was put where it is
  by :func:`promote` (any MLflow client can move an alias; k8s/MLFLOW-AUTH.md puts the server behind authentication)
  under a policy no looser than the one in force now.
- :func:`set_policy` (``siteadapt policy set``) is the admin command that writes the gate policy of a registered
  model; :func:`policy_in_force` (``siteadapt policy show``) reads it.

Gate policy (issue 27). The thresholds a version is judged by never come from the version itself: whoever registers
chooses the ``gates.*`` tags recorded on it (their own params.yaml, a Kubeflow run's ``gate_thresholds``), so those
tags can only make a promotion harder. The policy in force (:func:`read_policy`) is

1. the registered model's admin policy, when one was set: registered-model tags ``policy.document`` (canonical JSON:
   model name, policy version, gates, who, when) and ``policy.digest`` / ``policy.digest_alg``, written by
   ``siteadapt policy set`` from the admin's params.yaml ``registry.gates``. The digest is an HMAC-SHA256 with
   ``$SITEADAPT_PROMOTION_KEY`` when set: a registrant without the key can change the tags but not make them verify.
   Without the key it is a plain SHA-256, a consistency check only. A document that does not verify, names another
   model, or is absent or older than the admin version named by the current (verified) champion's record (a deleted
   or copied-back tag) refuses the promotion (:class:`RegistryError`, exit 2);
2. else the deployment's ``registry.gates`` (the params.yaml of whoever runs ``promote``), source ``params.yaml``,
   with its digest. Without an admin policy nothing stops the promoter's own params.yaml from being loose: a
   deployment where registrants can also run ``promote`` (or submit Kubeflow runs, whose ``params_yaml`` and
   ``gate_thresholds`` they choose) needs an admin policy and the key.

At promotion a version whose recorded gates are looser than the admin policy in any gate is refused
(:class:`GateLoosenedError`, exit 5, naming the policy: source, version, digest prefix, and each looser gate; no
override: register it again under the policy's gates). The thresholds applied are per gate the stricter of the
policy and the promoter's ``registry.gates`` (:func:`effective_gates`), so the version's own gates never loosen
anything. Under the params.yaml policy the promoter's gates *are* the policy: a version recorded with looser ones is
simply judged by the policy's thresholds (a failing gate refuses it, exit 1, the refusal naming the policy), because
a promoter tightening their own params.yaml must not be reported as a loosening registrant. Applied thresholds
looser than the version's recorded ones are refused (exit 5) unless overridden with ``--override-gates --reason``
(recorded), which therefore never goes below the admin policy. The promotion record and the version tags
``promotion.policy.*`` name the policy that decided (source, version, digest); a refusal records it in
``promotion_refused_policy``.

Gates (measured and the registrant's thresholds recorded at registration; promotion applies the policy in force,
tightened by the promoter's ``registry.gates``):

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


# ---- gate policy: admin-owned, the floor of every promotion ---------------------------------------------------------
POLICY_TAG = "policy.document"        # registered-model tags: the admin gate policy (canonical JSON) and its digest
POLICY_DIGEST = "policy.digest"
POLICY_DIGEST_ALG = "policy.digest_alg"
POLICY_HISTORY = "policy.v"           # policy.v<N>: every policy document set, for the audit trail
PARAMS_SOURCE = "params.yaml"         # the source named when no admin policy exists


def _loose_against(reference: dict, other: dict) -> list[str]:
    """The gates of ``reference`` for which ``other`` is looser (gates ``other`` does not know are skipped)."""
    return [k for k in reference if k in other and _looser(k, reference[k], other[k])]


def policy_label(policy: dict) -> str:
    """``admin policy v3 of siteadapt-t-s (hmac-sha256 1a2b3c4d5e6f)`` / ``params.yaml policy (sha256 ...)``: how
    messages and records name the policy that decided."""
    where = (f"admin policy v{policy.get('version')} of {policy.get('name')}" if policy.get("source") == "admin"
             else f"{policy.get('source')} policy")
    if not policy.get("digest"):
        return where
    return f"{where} ({policy.get('digest_alg')} {str(policy['digest'])[:12]})"


def _policy_ref(policy: dict) -> dict:
    """What a promotion (or refusal) records about the policy that decided: source, model, version, digest, gates."""
    return {k: policy.get(k) for k in ("source", "name", "version", "digest", "digest_alg", "gates")}


def _champion_policy_floor(client, name: str) -> int | None:
    """The admin policy version named by the current champion's promotion record when that record verifies: the
    admin policy in force may not be older (a copied-back old document) nor absent (a deleted tag)."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
        record = json.loads(mv.tags.get(RECORD_TAG) or "null")
    except Exception:  # noqa: BLE001 - no champion, or no readable record
        return None
    if not isinstance(record, dict) or _digest_problem(record, mv.tags.get(RECORD_SIG_ALG), mv.tags.get(RECORD_SIG),
                                                       "the promotion record"):
        return None
    ref = record.get("policy") or {}
    return int(ref["version"]) if ref.get("source") == "admin" and ref.get("version") is not None else None


def _model_tags(client, name: str) -> dict | None:
    """The registered model's tags, None when it does not exist. Any other registry error propagates: a policy that
    cannot be read must not silently become the params.yaml fallback."""
    try:
        return client.get_registered_model(name).tags
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def read_policy(client, name: str, settings: Settings) -> tuple[dict, str | None]:
    """(the gate policy in force for registered model ``name``, why it cannot be trusted or None).

    The registered model's admin policy (tags ``policy.document`` + ``policy.digest``, written by :func:`set_policy`)
    when present; else the deployment's ``registry.gates`` (``settings``: the params.yaml of whoever runs
    ``promote``), source ``params.yaml``, digested the way the version's gate record is. The problem is set when the
    admin document does not parse, names another model, does not verify against its digest (an HMAC with
    ``$SITEADAPT_PROMOTION_KEY`` when set), or is absent / older than the admin version that promoted the current
    champion (a deleted or copied-back tag)."""
    tags = _model_tags(client, name) or {}  # no model yet: nothing can have set a policy on it
    floor = _champion_policy_floor(client, name) if tags else None
    if POLICY_TAG not in tags and POLICY_DIGEST not in tags:
        gates = gate_policy(settings.registry.gates)
        alg, digest = _digest(gates)
        policy = {"source": PARAMS_SOURCE, "version": None, "name": name, "gates": gates, "digest": digest,
                  "digest_alg": alg}
        if floor is not None:
            return policy, (f"the admin gate policy of {name} is missing, but admin policy v{floor} promoted the "
                            f"current champion (the policy tag was removed)")
        return policy, None
    try:
        doc = json.loads(tags.get(POLICY_TAG) or "")
        if not isinstance(doc, dict) or not isinstance(doc.get("gates"), dict):
            raise ValueError
    except ValueError:
        return {"source": "admin", "name": name, "version": None, "gates": {}, "digest": tags.get(POLICY_DIGEST),
                "digest_alg": tags.get(POLICY_DIGEST_ALG)}, f"the admin gate policy of {name} is not a policy document"
    policy = {"source": "admin", "name": name, "version": doc.get("version"), "gates": doc["gates"],
              "set_by": doc.get("set_by"), "set_at": doc.get("set_at"), "digest": tags.get(POLICY_DIGEST),
              "digest_alg": tags.get(POLICY_DIGEST_ALG)}
    problem = _digest_problem(doc, tags.get(POLICY_DIGEST_ALG), tags.get(POLICY_DIGEST), f"the admin gate policy of "
                                                                                          f"{name}")
    if problem is None and doc.get("name") != name:
        problem = f"the admin gate policy of {name} was written for {doc.get('name')}"
    if problem is None and floor is not None and int(doc.get("version") or 0) < floor:
        problem = (f"the admin gate policy of {name} is v{doc.get('version')}, older than admin policy v{floor} that "
                   f"promoted the current champion")
    return policy, problem


def policy_in_force(settings: Settings, site: str, task: str | None = None) -> dict:
    """The gate policy :func:`promote` applies to the site's model now (:func:`read_policy`), plus ``problem`` (None
    when it can be trusted) and ``name``. ``siteadapt policy show``."""
    from .. import tracking

    name = model_name(task or settings.site(site).task, site)
    policy, problem = read_policy(tracking.connect(), name, settings)
    return {**policy, "name": name, "problem": problem}


def effective_gates(policy: dict, requested: Gates) -> Gates:
    """Per gate the stricter of the policy's and ``requested`` (the promoter's ``registry.gates``, or a Kubeflow
    run's ``gate_thresholds``): a promoter can tighten the policy, never loosen it."""
    merged = stricter_policy(policy["gates"], gate_policy(requested))
    return Gates(**{k: v for k, v in merged.items() if k in Gates.model_fields})


def preview_promotion(settings: Settings, name: str, version: str, kind: str | None = None) -> dict:
    """What :func:`promote` would decide on version ``version`` of ``name`` with ``settings``, without recording
    anything (the Kubeflow gates step): ``{"passed", "gates", "policy", "refused", "loosened"}``. ``refused`` names
    why promote would refuse the version whatever the gates say (a policy that does not verify, no recorded gates,
    recorded gates looser than the admin policy); then ``passed`` is False. ``loosened`` lists the applied thresholds
    looser than the recorded ones: promote refuses those unless overridden, so they are reported, not folded into
    ``passed`` (as before this check existed). The thresholds are the policy's tightened by
    ``settings.registry.gates`` (:func:`effective_gates`)."""
    from .. import tracking

    client = tracking.connect()
    tags = client.get_model_version(name, version).tags
    policy, problem = read_policy(client, name, settings)
    applied = effective_gates(policy, settings.registry.gates)
    recorded = recorded_policy(tags)
    refused = problem
    if refused is None and recorded is None:
        refused = f"{name} version {version} has no gate thresholds recorded"
    loose: list[dict] = []
    if refused is None:
        below = _loose_against(policy["gates"], recorded)
        if below and policy["source"] == "admin":
            refused = f"gates recorded looser than {policy_label(policy)}: {', '.join(below)}"
        loose = loosened_gates(recorded, applied)
    values = {k.removeprefix("gate."): _float_tag(v) for k, v in tags.items() if k.startswith("gate.")}
    gates = check_gates(applied, values, tags.get("kind") or kind)
    return {"passed": refused is None and all(g["passed"] for g in gates), "gates": gates,
            "policy": _policy_ref(policy), "refused": refused, "loosened": loose}


def set_policy(settings: Settings, site: str, task: str | None = None) -> dict:
    """Admin command (``siteadapt policy set``): make the deployment's ``registry.gates`` the gate policy of
    ``siteadapt-<task>-<site>``, as registered-model tags that every later promotion applies as a floor.

    The document ``{"name", "version", "gates", "set_by", "identity_source", "set_at"}`` is stored as canonical JSON
    (``policy.document``) with its digest (``policy.digest``, ``policy.digest_alg``): HMAC-SHA256 with
    ``$SITEADAPT_PROMOTION_KEY`` when set, which a registrant without the key cannot forge; else SHA-256, a
    consistency check only (anyone who can write tags can recompute it; a warning says so). ``version`` is one more
    than the previous document's (read even when it no longer verifies), and each document is also kept as
    ``policy.v<N>``. The registered model is created when it does not exist yet. Returns the document with ``digest``
    and ``digest_alg`` and ``previous`` (the gates it replaced, or None)."""
    from .. import tracking

    name = model_name(task or settings.site(site).task, site)
    client = tracking.connect()
    tags = _model_tags(client, name)
    if tags is None:  # no such model yet: the policy can come first
        client.create_registered_model(name, description=f"siteadapt models for site {site} (alias {CHAMPION}: "
                                                         f"serving, {CANDIDATE}: newest)")
        tags = {}
    try:
        prev = json.loads(tags.get(POLICY_TAG) or "null")
    except ValueError:
        prev = None
    prev = prev if isinstance(prev, dict) else None
    old_versions = [int(k.removeprefix(POLICY_HISTORY)) for k in tags
                    if k.startswith(POLICY_HISTORY) and k.removeprefix(POLICY_HISTORY).isdigit()]
    try:
        old_versions.append(int((prev or {}).get("version") or 0))
    except (TypeError, ValueError):
        pass
    identity, source = promoter_identity()
    doc = {"name": name, "version": max(old_versions, default=0) + 1, "gates": gate_policy(settings.registry.gates),
           "set_by": identity, "identity_source": source,
           "set_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    alg, digest = _digest(doc)
    if alg != "hmac-sha256":
        log.warning("%s is not set: the gate policy of %s carries a plain SHA-256 digest, a consistency check only "
                    "(whoever can write registry tags can rewrite it)", ENV_PROMOTION_KEY, name)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    for k, v in {POLICY_TAG: raw, POLICY_DIGEST: digest, POLICY_DIGEST_ALG: alg,
                 f"{POLICY_HISTORY}{doc['version']}": raw}.items():
        client.set_registered_model_tag(name, k, v)
    log.info("%s: gate policy v%s set by %s", name, doc["version"], identity)
    return {**doc, "digest": digest, "digest_alg": alg, "previous": (prev or {}).get("gates")}


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

    The registrant's gate thresholds (all of ``registry.gates``) are recorded on the version (``gates.<name>`` tags
    and their digest, :func:`policy_tags`): :func:`promote` refuses a promotion with looser ones, and refuses the
    version when they are looser than the gate policy in force (a warning says so here). Registering the same
    weights again keeps per gate the stricter of the recorded and the current threshold."""
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
    in_force, problem = read_policy(client, name, settings)
    below = _loose_against(in_force["gates"], policy)
    if problem or below:
        log.warning("%s: %s", name, problem or (
            f"registry.gates are looser than {policy_label(in_force)} ({', '.join(below)}): `siteadapt promote` "
            "will refuse this version"))
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

    The gate policy in force (:func:`read_policy`: the model's admin policy, else ``settings.registry.gates`` as
    the params.yaml policy) must verify (else :class:`RegistryError`), and the version's recorded gates may not be
    looser than an admin policy in any gate (else :class:`GateLoosenedError` naming the policy; no override). The
    thresholds
    applied are per gate the stricter of the policy and ``settings.registry.gates``; applied thresholds looser than
    the ones recorded on the version (:func:`loosened_gates`) raise :class:`GateLoosenedError` (naming each gate, its
    recorded and its requested value) unless ``override_gates`` is set with a ``reason``, which is recorded on the
    version (``promotion.override.*``: who, when, which gates, why) and in the promotion record. Every refusal is
    tagged on the version (``promotion_refused_*``, with the policy) and no alias moves. The result carries
    ``policy`` (source, version, digest, digest_alg, gates), recorded as well in the promotion record and the
    ``promotion.policy.*`` version tags.

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

    policy: dict = {}

    def refuse(what: str, details) -> None:
        ref = _policy_ref(policy) if policy else None
        for k, v in {"promotion_refused_by": identity, "promotion_refused_at": now,
                     "promotion_refused_gates": json.dumps(details, default=str)[:5000],
                     "promotion_refused_policy": json.dumps(ref, sort_keys=True, default=str)[:5000]}.items():
            client.set_model_version_tag(name, version, k, v)
        history({"version": version, "by": identity, "actor_note": note, "at": now, "promoted": False,
                 "refused": what, "details": details, "policy": ref})

    policy, problem = read_policy(client, name, settings)
    if problem:
        refuse("gate policy does not verify", [problem])
        raise RegistryError(f"{name} version {version}: refused: {problem}; an admin sets the policy again "
                            f"(`siteadapt policy set --site {site}` with {ENV_PROMOTION_KEY})")
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
        below = [{"gate": k, "recorded": recorded[k], "policy": policy["gates"][k]}
                 for k in _loose_against(policy["gates"], recorded)]
        if below and policy["source"] == "admin":  # a version registered under looser gates than the admin's
            refuse("recorded gates looser than the gate policy", below)
            raise GateLoosenedError(
                f"{name} version {version}: refused by {policy_label(policy)}: the gates recorded at registration "
                "are looser than the policy: "
                + "; ".join(f"{g['gate']} recorded {g['recorded']}, policy {g['policy']}" for g in below)
                + f". Register the version again under the policy's gates (`siteadapt policy show --site {site}`)")
    applied = effective_gates(policy, settings.registry.gates)
    if recorded is not None:
        loose = loosened_gates(recorded, applied)
        if loose and not override_gates:
            refuse("gates looser than recorded", loose)
            raise GateLoosenedError(
                f"{name} version {version}: gates looser than recorded at registration: "
                + "; ".join(f"{g['gate']} recorded {g['recorded']}, requested {g['requested']}" for g in loose)
                + f" (under {policy_label(policy)}). Promote with the recorded gates, or with --override-gates "
                  "--reason TEXT (recorded)")
    override = None
    if override_gates and (loose or recorded is None):
        override = {"by": identity, "at": now, "gates": loose if recorded is not None else "no recorded gates",
                    "reason": reason[:1000]}

    values = {k.removeprefix("gate."): _float_tag(v) for k, v in mv.tags.items() if k.startswith("gate.")}
    kind = mv.tags.get("kind") or (settings.tasks[task].kind if task in settings.tasks else None)
    gates = check_gates(applied, values, kind)
    ok = all(g["passed"] for g in gates)
    reason = reason or ("gates passed" if ok else "refused by gates")
    ref = _policy_ref(policy)
    summary = {"version": version, "by": identity, "identity_source": source, "actor_note": note, "at": now,
               "reason": reason, "promoted": ok, "gates": gates, "override": override, "policy": ref}
    if ok:
        record = {"name": name, "version": version, "model_sha256": mv.tags.get("model_sha256"),
                  "gates_digest": mv.tags.get(GATES_DIGEST), "thresholds": gate_policy(applied), "policy": ref,
                  "at": now, "by": identity, "identity_source": source, "override": override}
        alg, sig = _digest(record)
        tags = {RECORD_TAG: json.dumps(record, sort_keys=True, default=str), RECORD_SIG: sig, RECORD_SIG_ALG: alg,
                "promoted_by": identity, "promoted_at": now, "promotion_reason": reason[:1000],
                "promotion.identity_source": source, "promotion.actor_note": note or "",
                "promotion.policy.source": ref["source"], "promotion.policy.version": _tag_value(ref["version"]),
                "promotion.policy.digest": ref["digest"] or "", "promotion.policy.digest_alg": ref["digest_alg"] or ""}
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
    log.info("%s: version %s %s under %s", name, version, "promoted to champion" if ok else "NOT promoted",
             policy_label(policy))
    return {"promoted": ok, "version": version, "gates": gates, "identity": identity, "override": override,
            "policy": ref}


def verify_champion(settings: Settings, site: str, task: str | None = None) -> dict:
    """Check that the ``champion`` of ``siteadapt-<task>-<site>`` was put there by :func:`promote`: its version
    carries a promotion record naming this model and version, whose digest verifies (an HMAC with
    ``$SITEADAPT_PROMOTION_KEY`` when set; without the key only a SHA-256 consistency digest can be checked, which
    anyone able to write tags could recompute), whose weights digest is the version's (gates tightened by a later
    registration are fine), and the model's ``champion.version`` tag names the same version. Returns ``{"name",
    "version", "verified", "problems": [...], "record", "policy"}``; raises :class:`RegistryError` when there is no
    champion. The gate policy in force now (:func:`read_policy`) must verify, and the policy the record names (for a
    record written before policies, its applied thresholds) may not be looser than it in any gate: a policy tightened
    after the promotion flags the champion until one promoted under it replaces it.
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
    policy, problem = read_policy(client, name, settings)
    if problem:
        problems.append(f"the gate policy in force does not verify: {problem}")
    elif record is not None:
        ref = record.get("policy") or {"source": "an older siteadapt", "gates": record.get("thresholds") or {}}
        looser = _loose_against(policy["gates"], ref.get("gates") or {})
        if looser:
            problems.append(f"the champion was promoted under {policy_label(ref)}, looser than {policy_label(policy)}"
                            " in force now: " + "; ".join(f"{k} {ref['gates'][k]}, policy {policy['gates'][k]}"
                                                          for k in looser))
    return {"name": name, "version": version, "verified": not problems, "problems": problems, "record": record,
            "policy": _policy_ref(policy)}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database entry (containers)
        return "unknown"
