"""Champion verification (``siteadapt promote --check``): was the ``champion`` alias put where it is by
:func:`siteadapt.registry.promote.promote`, under a policy no looser than the one in force now?"""

from __future__ import annotations

import json

from ..config import Settings
from .naming import CHAMPION, by_alias, model_name
from .policy import RECORD_SIG, RECORD_SIG_ALG, RECORD_TAG, digest_problem, loose_against, policy_label, policy_ref, read_policy


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
    mv = by_alias(client, name, CHAMPION)
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
        p = digest_problem(record, mv.tags.get(RECORD_SIG_ALG), mv.tags.get(RECORD_SIG), "the promotion record")
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
        looser = loose_against(policy["gates"], ref.get("gates") or {})
        if looser:
            problems.append(f"the champion was promoted under {policy_label(ref)}, looser than {policy_label(policy)}"
                            " in force now: " + "; ".join(f"{k} {ref['gates'][k]}, policy {policy['gates'][k]}"
                                                          for k in looser))
    return {"name": name, "version": version, "verified": not problems, "problems": problems, "record": record,
            "policy": policy_ref(policy)}
