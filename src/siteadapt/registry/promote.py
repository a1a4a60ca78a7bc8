"""Promotion: alias ``champion`` moved to the ``candidate`` version when every gate of the policy in force passes,
with a signed promotion record; and the same decision previewed without recording anything."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os

from ..config import Settings
from ..errors import GateLoosenedError, RegistryError
from .gates import check_gates
from .naming import CANDIDATE, CHAMPION, by_alias, float_tag, model_name, tag_value
from .policy import (ENV_PROMOTION_KEY, GATES_DIGEST, GATES_DIGEST_ALG, RECORD_SIG, RECORD_SIG_ALG, RECORD_TAG,
                     digest_problem, effective_gates, gate_policy, loose_against, loosened_gates, make_digest,
                     policy_label, policy_ref, promoter_identity, read_policy, recorded_policy)

log = logging.getLogger("siteadapt.register")


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
        below = loose_against(policy["gates"], recorded)
        if below and policy["source"] == "admin":
            refused = f"gates recorded looser than {policy_label(policy)}: {', '.join(below)}"
        loose = loosened_gates(recorded, applied)
    values = {k.removeprefix("gate."): float_tag(v) for k, v in tags.items() if k.startswith("gate.")}
    gates = check_gates(applied, values, tags.get("kind") or kind)
    return {"passed": refused is None and all(g["passed"] for g in gates), "gates": gates,
            "policy": policy_ref(policy), "refused": refused, "loosened": loose}


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
    mv = by_alias(client, name, CANDIDATE, f" (run `siteadapt register --site {site} --method METHOD` first)")
    version = str(mv.version)
    identity, source = promoter_identity()
    note = actor or os.environ.get("SITEADAPT_ACTOR") or None
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def history(record: dict) -> None:
        client.set_registered_model_tag(name, f"promotion.{int(_dt.datetime.now().timestamp() * 1000)}",
                                        json.dumps(record, default=str)[:5000])

    policy: dict = {}

    def refuse(what: str, details) -> None:
        ref = policy_ref(policy) if policy else None
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
        problem = digest_problem(recorded, mv.tags.get(GATES_DIGEST_ALG), mv.tags.get(GATES_DIGEST),
                                  "the gate record")
        if problem:
            refuse("recorded gates do not verify", [problem])
            raise RegistryError(f"{name} version {version}: {problem}; register it again to record the gates")
        below = [{"gate": k, "recorded": recorded[k], "policy": policy["gates"][k]}
                 for k in loose_against(policy["gates"], recorded)]
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

    values = {k.removeprefix("gate."): float_tag(v) for k, v in mv.tags.items() if k.startswith("gate.")}
    kind = mv.tags.get("kind") or (settings.tasks[task].kind if task in settings.tasks else None)
    gates = check_gates(applied, values, kind)
    ok = all(g["passed"] for g in gates)
    reason = reason or ("gates passed" if ok else "refused by gates")
    ref = policy_ref(policy)
    summary = {"version": version, "by": identity, "identity_source": source, "actor_note": note, "at": now,
               "reason": reason, "promoted": ok, "gates": gates, "override": override, "policy": ref}
    if ok:
        record = {"name": name, "version": version, "model_sha256": mv.tags.get("model_sha256"),
                  "gates_digest": mv.tags.get(GATES_DIGEST), "thresholds": gate_policy(applied), "policy": ref,
                  "at": now, "by": identity, "identity_source": source, "override": override}
        alg, sig = make_digest(record)
        tags = {RECORD_TAG: json.dumps(record, sort_keys=True, default=str), RECORD_SIG: sig, RECORD_SIG_ALG: alg,
                "promoted_by": identity, "promoted_at": now, "promotion_reason": reason[:1000],
                "promotion.identity_source": source, "promotion.actor_note": note or "",
                "promotion.policy.source": ref["source"], "promotion.policy.version": tag_value(ref["version"]),
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
