"""Gate policy: the thresholds recorded on a version at registration, the admin policy of a registered model
(``siteadapt policy set|show``), their digests, and who is acting (see :mod:`siteadapt.registry`, "Gate policy")."""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import hmac
import json
import logging
import os

from mlflow.exceptions import MlflowException

from ..config import Gates, Settings
from .naming import CANDIDATE, CHAMPION, float_tag, model_name, tag_value

log = logging.getLogger("siteadapt.register")

ENV_PROMOTION_KEY = "SITEADAPT_PROMOTION_KEY"  # HMAC key of the gate and promotion records (a k8s Secret)
GATES_PREFIX = "gates."                        # version tags: the gate thresholds recorded at registration
GATES_DIGEST = "gates.digest"
GATES_DIGEST_ALG = "gates.digest_alg"
RECORD_TAG = "promotion.record"                # version tags: what siteadapt wrote when it promoted the version
RECORD_SIG = "promotion.signature"
RECORD_SIG_ALG = "promotion.signature_alg"


# ---- gate policy: recorded at registration, compared at promotion ---------------------------------------------------
def _key() -> bytes | None:
    k = os.environ.get(ENV_PROMOTION_KEY, "")
    return k.encode() if k else None


def make_digest(payload: dict) -> tuple[str, str]:
    """(algorithm, hex digest) of ``payload`` as canonical JSON: HMAC-SHA256 with ``$SITEADAPT_PROMOTION_KEY`` when
    set (a client without the key cannot forge it), else plain SHA-256 (a consistency check only)."""
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    key = _key()
    if key:
        return "hmac-sha256", hmac.new(key, data, hashlib.sha256).hexdigest()
    return "sha256", hashlib.sha256(data).hexdigest()


def digest_problem(payload: dict, alg: str | None, digest: str | None, what: str) -> str | None:
    """Why ``digest`` (made with ``alg``) does not vouch for ``payload`` now, or None when it does. With the key set,
    only an HMAC made with it is accepted (a plain SHA-256 could have been written by anyone)."""
    if not digest:
        return f"{what} has no digest"
    want_alg, want = make_digest(payload)
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
    """Version tags of a gate policy: ``gates.<name>`` per setting plus its digest (:func:`make_digest`)."""
    alg, digest = make_digest(policy)
    return {**{f"{GATES_PREFIX}{k}": tag_value(v) for k, v in policy.items()},
            GATES_DIGEST: digest, GATES_DIGEST_ALG: alg}


def recorded_policy(tags: dict[str, str]) -> dict | None:
    """The gate policy recorded on a version (its ``gates.*`` tags), None for a version registered without one."""
    out: dict = {}
    for k, v in tags.items():
        if not k.startswith(GATES_PREFIX) or k in (GATES_DIGEST, GATES_DIGEST_ALG):
            continue
        name = k.removeprefix(GATES_PREFIX)
        out[name] = v if name == "label_free" else float_tag(v)
    return out or None


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


def loose_against(reference: dict, other: dict) -> list[str]:
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


def policy_ref(policy: dict) -> dict:
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
    if not isinstance(record, dict) or digest_problem(record, mv.tags.get(RECORD_SIG_ALG), mv.tags.get(RECORD_SIG),
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
        alg, digest = make_digest(gates)
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
    problem = digest_problem(doc, tags.get(POLICY_DIGEST_ALG), tags.get(POLICY_DIGEST), f"the admin gate policy of "
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
    alg, digest = make_digest(doc)
    if alg != "hmac-sha256":
        log.warning("%s is not set: the gate policy of %s carries a plain SHA-256 digest, a consistency check only "
                    "(whoever can write registry tags can rewrite it)", ENV_PROMOTION_KEY, name)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    for k, v in {POLICY_TAG: raw, POLICY_DIGEST: digest, POLICY_DIGEST_ALG: alg,
                 f"{POLICY_HISTORY}{doc['version']}": raw}.items():
        client.set_registered_model_tag(name, k, v)
    log.info("%s: gate policy v%s set by %s", name, doc["version"], identity)
    return {**doc, "digest": digest, "digest_alg": alg, "previous": (prev or {}).get("gates")}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database entry (containers)
        return "unknown"
