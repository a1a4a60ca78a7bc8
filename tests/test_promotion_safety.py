"""Issue 20 items 5 and 6: promotion cannot be bypassed by loosening gates, is recorded with the authenticated
identity, a champion moved by another client is detected, and the served models refuse non-finite input.

The registered models are tiny untrained segmenters (no data, no training): the gate measurements are set by hand
(``gate_values`` patched), so each registration costs only the logging of one pyfunc model into a sqlite store.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml

import dvc_project as dp
from siteadapt.cli import main
from siteadapt.config import parse_settings

NAME = "siteadapt-chestxray-cxr_b"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """(settings, params file, register(dice, seed, **gates) -> version, client) in a fresh sqlite store."""
    import torch
    from mlflow import MlflowClient

    from siteadapt.layout import model_dir
    from siteadapt.methods.build import build_method, save_model
    from siteadapt.registry import register as R

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_TRACKING_USERNAME", "SITEADAPT_ACTOR", "SITEADAPT_PROMOTION_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    raw = dp.tiny_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    s = parse_settings(raw)
    measured = {}
    monkeypatch.setattr(R, "gate_values", lambda *a, **k: dict(measured))

    def register(dice: float, seed: int = 0, **gates) -> str:
        m = build_method(s, "supervised", "cxr_b", seed=seed)
        save_model(m, model_dir(s, "cxr_b", "supervised") / "model.pt", source_site="cxr_a", seed=seed)
        measured.clear()
        measured.update({"target_dice": dice, "empty_fraction": 0.0, "fragmented_fraction": 0.0})
        return R.register_model(with_gates(s, **gates), "cxr_b", "supervised")["version"]

    return s, tmp_path / "params.yaml", register, MlflowClient(uri, registry_uri=uri)


def with_gates(s, **kw):
    return s.model_copy(update={"registry": s.registry.model_copy(update={
        "gates": s.registry.gates.model_copy(update=kw)})})


def params_with(path, name, **gates):
    """A params file beside ``path`` with ``registry.gates`` changed (what a promoter would edit)."""
    raw = yaml.safe_load(path.read_text())
    raw["registry"]["gates"].update(gates)
    out = path.with_name(name)
    out.write_text(yaml.safe_dump(raw))
    return str(out)


def _alias(client, alias):
    try:
        return str(client.get_model_version_by_alias(NAME, alias).version)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def test_gates_recorded_at_registration_and_loosening_refused_without_override(registry, monkeypatch, capsys):
    s, params, register, client = registry
    v1 = register(dice=0.0)  # a Dice-0 model, registered under min_target_dice 0.5 (params.yaml)
    tags = client.get_model_version(NAME, v1).tags
    policy = {"min_target_dice": 0.5, "max_source_dice_drop": 0.1, "max_empty_fraction": 0.1,
              "max_fragmented_fraction": 0.25, "min_target_auc": 0.7, "max_source_auc_drop": 0.1,
              "label_free": "auto"}
    assert {k.removeprefix("gates."): v for k, v in tags.items()
            if k.startswith("gates.") and not k.startswith("gates.digest")} == {k: str(v) for k, v in policy.items()}
    canon = json.dumps(policy, sort_keys=True, separators=(",", ":")).encode()
    assert tags["gates.digest"] == hashlib.sha256(canon).hexdigest() and tags["gates.digest_alg"] == "sha256"

    # under the recorded gates the Dice-0 model is refused by its gate (exit 1), not promoted
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 1
    err = capsys.readouterr().err
    assert "refused: gate min_target_dice failed with value 0.0000 (threshold 0.5)" in err
    assert _alias(client, "champion") is None

    # a promoter's params.yaml with min_target_dice 0: refused as looser than recorded (exit 5), nothing moves
    loose = params_with(params, "loose.yaml", min_target_dice=0.0, max_empty_fraction=None)
    assert main(["--params", loose, "promote", "--site", "cxr_b"]) == 5
    err = capsys.readouterr().err
    assert "gates looser than recorded at registration: min_target_dice recorded 0.5, requested 0.0" in err
    assert _alias(client, "champion") is None
    refused = client.get_model_version(NAME, v1).tags
    assert json.loads(refused["promotion_refused_gates"]) == [
        {"gate": "min_target_dice", "recorded": 0.5, "requested": 0.0},
        {"gate": "max_empty_fraction", "recorded": 0.1, "requested": None}]  # a gate switched off is looser too
    loose_off = params_with(params, "off.yaml", max_empty_fraction=None)
    assert main(["--params", loose_off, "promote", "--site", "cxr_b"]) == 5
    assert "max_empty_fraction recorded 0.1, requested None" in capsys.readouterr().err
    assert _alias(client, "champion") is None
    always = params_with(params, "always.yaml", label_free="always")  # stricter: fine (the Dice gate still fails)
    assert main(["--params", always, "promote", "--site", "cxr_b"]) == 1
    capsys.readouterr()

    # an override needs a reason (exit 2), and is recorded with who, when, which gates, why
    assert main(["--params", loose, "promote", "--site", "cxr_b", "--override-gates"]) == 2
    assert "--override-gates needs --reason" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    rc = main(["--params", loose, "promote", "--site", "cxr_b", "--override-gates", "--reason", "pilot: reader study",
               "--actor", "Dr. Note"])
    assert rc == 0, capsys.readouterr().err
    assert _alias(client, "champion") == v1
    t = client.get_model_version(NAME, v1).tags
    assert t["promotion.override.by"] == "alice" and t["promotion.override.reason"] == "pilot: reader study"
    assert json.loads(t["promotion.override.gates"]) == [
        {"gate": "min_target_dice", "recorded": 0.5, "requested": 0.0},
        {"gate": "max_empty_fraction", "recorded": 0.1, "requested": None}]
    assert t["promotion.override.at"] == t["promoted_at"]
    assert t["promoted_by"] == "alice" and t["promotion.identity_source"] == "mlflow"
    assert t["promotion.actor_note"] == "Dr. Note"  # the free text is a note, never the identity
    record = json.loads(t["promotion.record"])
    assert record["override"]["gates"] == json.loads(t["promotion.override.gates"])
    assert record["by"] == "alice" and record["version"] == v1 and record["gates_digest"] == tags["gates.digest"]
    assert record["thresholds"]["min_target_dice"] == 0.0 and record["thresholds"]["max_empty_fraction"] is None
    history = [json.loads(v) for k, v in client.get_registered_model(NAME).tags.items()
               if k.startswith("promotion.")]
    assert [h["promoted"] for h in sorted(history, key=lambda h: h["at"])].count(True) == 1
    assert any(h.get("override") and h["override"]["reason"] == "pilot: reader study" for h in history)

    # without MLFLOW_TRACKING_USERNAME the identity is the OS user
    from siteadapt.registry.policy import _user, promoter_identity

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    assert promoter_identity() == (_user(), "os")


def test_reregistration_tightens_never_loosens_and_stricter_promotion_passes(registry, capsys):
    s, params, register, client = registry
    v1 = register(dice=0.8)
    assert register(dice=0.8, min_target_dice=0.0) == v1  # same weights, a looser params.yaml: record unchanged
    assert client.get_model_version(NAME, v1).tags["gates.min_target_dice"] == "0.5"
    assert register(dice=0.8, min_target_dice=0.6, label_free="always") == v1  # stricter: recorded
    t = client.get_model_version(NAME, v1).tags
    assert t["gates.min_target_dice"] == "0.6" and t["gates.label_free"] == "always"
    strict = params_with(params, "strict.yaml", min_target_dice=0.75, label_free="always", max_source_dice_drop=None)
    assert main(["--params", strict, "promote", "--site", "cxr_b"]) == 5  # drop gate off = looser than 0.1
    assert "max_source_dice_drop recorded 0.1, requested None" in capsys.readouterr().err
    strict = params_with(params, "strict2.yaml", min_target_dice=0.75, label_free="always")
    # stricter everywhere: no override needed; the label-free source-drop gate has no measurement -> fails (exit 1)
    assert main(["--params", strict, "promote", "--site", "cxr_b"]) == 1
    assert "max_source_dice_drop: missing" in capsys.readouterr().out


def test_champion_moved_by_a_raw_client_is_reported_unverified(registry, monkeypatch, capsys):
    s, params, register, client = registry
    v1 = register(dice=0.8)
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 0
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 0
    assert f"champion version {v1} verified" in capsys.readouterr().out

    v2 = register(dice=0.9, seed=1)
    assert v2 != v1
    client.set_registered_model_alias(NAME, "champion", v2)  # any MLflow client can do this
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 6
    err = capsys.readouterr().err
    assert f"champion (version {v2}) is NOT verified" in err and "has no siteadapt promotion record" in err

    # a raw move back to a version siteadapt once promoted: its record is valid, the model's pointer is not
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 0
    client.set_registered_model_alias(NAME, "champion", v1)
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 6
    assert f"siteadapt last promoted version {v2}, the alias points at {v1}" in capsys.readouterr().err

    # a forged record (plain digest) is refused once the deployment holds the promotion key
    client.set_registered_model_alias(NAME, "champion", v2)
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SITEADAPT_PROMOTION_KEY", "k8s-secret-value")
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 6
    assert "is not signed (sha256) but SITEADAPT_PROMOTION_KEY is set" in capsys.readouterr().err


def test_hmac_key_signs_records_and_edited_gate_tags_are_refused(registry, monkeypatch, capsys):
    s, params, register, client = registry
    monkeypatch.setenv("SITEADAPT_PROMOTION_KEY", "k8s-secret-value")
    v1 = register(dice=0.8)
    t = client.get_model_version(NAME, v1).tags
    assert t["gates.digest_alg"] == "hmac-sha256"
    client.set_model_version_tag(NAME, v1, "gates.min_target_dice", "0.0")  # loosened behind siteadapt's back
    loose = params_with(params, "loose.yaml", min_target_dice=0.0)
    assert main(["--params", loose, "promote", "--site", "cxr_b"]) == 2
    assert "the gate record does not match its hmac-sha256 digest" in capsys.readouterr().err
    assert _alias(client, "champion") is None
    assert register(dice=0.8) == v1  # registering again re-records (and re-signs) the gates of params.yaml
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 0
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 0
    assert client.get_model_version(NAME, v1).tags["promotion.signature_alg"] == "hmac-sha256"
    capsys.readouterr()
    monkeypatch.delenv("SITEADAPT_PROMOTION_KEY")  # a verifier without the key cannot vouch for a signed record
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 6
    assert "signed with a key: set SITEADAPT_PROMOTION_KEY" in capsys.readouterr().err


def test_served_segmenter_refuses_non_finite_input(registry, monkeypatch):
    """Through ``mlflow.pyfunc.load_model`` of the registered version (what a model server loads)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils

    from siteadapt.registry.pyfunc import NonFiniteInputError

    s, params, register, client = registry
    v1 = register(dice=0.8)
    uri = client._registry_uri
    monkeypatch.setattr(registry_utils, "_registry_uri", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{v1}")
    x = np.zeros((2, 1, 32, 32), np.float32)
    assert model.predict(x).shape == (2, 32, 32)  # finite input: a label map
    with pytest.raises(NonFiniteInputError, match=r"2048 of 2048 values are not finite \(NaN 2048, \+Inf 0, -Inf 0\)"):
        model.predict(np.full_like(x, np.nan))
    x[1, 0, 3, 4], x[0, 0, 0, 0], x[0, 0, 0, 1] = np.inf, -np.inf, np.nan
    with pytest.raises(NonFiniteInputError, match=r"3 of 2048 values are not finite \(NaN 1, \+Inf 1, -Inf 1\)"):
        model.predict(x)


def test_classifier_wrapper_refuses_non_finite_input():
    """The classification wrapper, called directly (same check, shared base class)."""
    import torch
    from mlflow.exceptions import MlflowException

    from siteadapt.errors import SiteadaptError
    from siteadapt.methods import get_method
    from siteadapt.methods.base import Context
    from siteadapt.registry.pyfunc import NonFiniteInputError, SiteadaptClassifier

    cls = get_method("source")
    torch.manual_seed(0)
    wrapper = SiteadaptClassifier()
    wrapper.method = cls(Context(n_classes=2, image_size=32, width=0.25, kind="classification"), cls.Options())
    wrapper.method.eval()
    x = np.zeros((3, 1, 32, 32), np.float32)
    assert wrapper.predict(None, x).shape == (3,)
    x[2, 0, 5:7, 5:7] = np.nan
    with pytest.raises(NonFiniteInputError, match=r"4 of 3072 values are not finite \(NaN 4, \+Inf 0, -Inf 0\)") as e:
        wrapper.predict(None, x)
    # a model server answers 400 with the message (an MlflowException), the CLI one line (a SiteadaptError)
    assert isinstance(e.value, MlflowException) and e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert isinstance(e.value, SiteadaptError)
    big = np.full((1, 1, 32, 32), 1e300)  # finite in float64, +Inf once cast to the model's float32
    with pytest.raises(NonFiniteInputError, match=r"1024 of 1024 values are not finite \(NaN 0, \+Inf 1024"):
        wrapper.predict(None, big)


# ---- issue 27 item 2: the gate policy comes from an admin, never from the version's own params ----------------------
KEY = "k8s-secret-value"
PARAMS_POLICY = {"min_target_dice": 0.5, "max_source_dice_drop": 0.1, "max_empty_fraction": 0.1,
                 "max_fragmented_fraction": 0.25, "min_target_auc": 0.7, "max_source_auc_drop": 0.1,
                 "label_free": "auto"}


def _canon(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def test_admin_policy_refuses_a_version_registered_with_looser_gates(registry, monkeypatch, capsys):
    """The issue: a registrant whose params carry ``min_target_dice: 0.0`` registers a Dice-0.02 model and promotes
    it with the same params. With an admin policy (min_target_dice 0.5) it is refused, exit 5, naming the policy."""
    import hmac

    from siteadapt.registry.promote import preview_promotion

    s, params, register, client = registry
    monkeypatch.setenv("SITEADAPT_PROMOTION_KEY", KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    assert main(["--params", str(params), "policy", "set", "--site", "cxr_b"]) == 0
    assert f"{NAME}: gate policy v1 set by admin (mlflow)" in capsys.readouterr().out
    mtags = client.get_registered_model(NAME).tags
    doc = json.loads(mtags["policy.document"])
    assert doc["name"] == NAME and doc["version"] == 1 and doc["gates"] == PARAMS_POLICY
    assert doc["set_by"] == "admin" and doc["identity_source"] == "mlflow"
    digest = hmac.new(KEY.encode(), _canon(doc), hashlib.sha256).hexdigest()
    assert mtags["policy.digest"] == digest and mtags["policy.digest_alg"] == "hmac-sha256"
    assert mtags["policy.v1"] == mtags["policy.document"]  # the audit trail
    label = f"admin policy v1 of {NAME} (hmac-sha256 {digest[:12]})"

    # a legitimate champion, promoted under the policy: the record names it
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    v1 = register(dice=0.8)
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 0
    t = client.get_model_version(NAME, v1).tags
    assert (t["promotion.policy.source"], t["promotion.policy.version"]) == ("admin", "1")
    assert t["promotion.policy.digest"] == digest and t["promotion.policy.digest_alg"] == "hmac-sha256"
    record = json.loads(t["promotion.record"])
    assert record["policy"]["version"] == 1 and record["policy"]["digest"] == digest
    assert record["policy"]["gates"] == PARAMS_POLICY and record["thresholds"]["min_target_dice"] == 0.5
    capsys.readouterr()

    # the registrant's loose params: registered (the record says 0.0), promotion refused, exit 5, naming the policy
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mallory")
    loose = params_with(params, "loose.yaml", min_target_dice=0.0)
    v2 = register(dice=0.02, seed=1, min_target_dice=0.0)
    assert v2 != v1 and client.get_model_version(NAME, v2).tags["gates.min_target_dice"] == "0.0"
    assert main(["--params", loose, "promote", "--site", "cxr_b"]) == 5
    err = capsys.readouterr().err
    assert (f"{NAME} version {v2}: refused by {label}: the gates recorded at registration are looser than the "
            "policy: min_target_dice recorded 0.0, policy 0.5.") in err
    assert _alias(client, "champion") == v1
    t2 = client.get_model_version(NAME, v2).tags
    assert t2["promotion_refused_by"] == "mallory"
    assert json.loads(t2["promotion_refused_gates"]) == [{"gate": "min_target_dice", "recorded": 0.0, "policy": 0.5}]
    refused_policy = json.loads(t2["promotion_refused_policy"])
    assert (refused_policy["source"], refused_policy["version"], refused_policy["digest"]) == ("admin", 1, digest)
    # an override does not reach below the policy; the gates step of Kubeflow sees the same refusal
    assert main(["--params", loose, "promote", "--site", "cxr_b", "--override-gates", "--reason", "trust me"]) == 5
    assert _alias(client, "champion") == v1
    capsys.readouterr()
    preview = preview_promotion(with_gates(s, min_target_dice=0.0), NAME, v2)
    assert not preview["passed"] and preview["refused"] == f"gates recorded looser than {label}: min_target_dice"
    assert [(g["name"], g["threshold"]) for g in preview["gates"]] == [("min_target_dice", 0.5)]
    from siteadapt.kfp import runtime as KR

    run = KR.Job(task="chestxray", source_site="cxr_a", site="cxr_b", params_yaml=params.read_text(),
                 gates={"min_target_dice": 0.0})  # a run's gate_thresholds: cannot go below the policy
    kfp = KR.check_gates(run, {"registered": {"name": NAME, "version": v2}})
    assert not kfp["passed"] and kfp["refused"] == preview["refused"] and kfp["policy"]["version"] == 1
    assert [(g["name"], g["threshold"], g["passed"]) for g in kfp["gates"]] == [("min_target_dice", 0.5, False)]

    # the earlier champion still verifies, and names its policy
    assert main(["--params", loose, "promote", "--site", "cxr_b", "--check"]) == 0
    assert f"champion version {v1} verified: promoted by carol (mlflow)" in capsys.readouterr().out

    # the policy tags edited without the key: refused (exit 2), the champion does not verify (exit 6)
    forged = {**doc, "gates": {**doc["gates"], "min_target_dice": 0.0}}
    client.set_registered_model_tag(NAME, "policy.document", json.dumps(forged, sort_keys=True))
    assert main(["--params", loose, "promote", "--site", "cxr_b"]) == 2
    assert f"refused: the admin gate policy of {NAME} does not match its hmac-sha256 digest" in capsys.readouterr().err
    client.set_registered_model_tag(NAME, "policy.digest", hashlib.sha256(_canon(forged)).hexdigest())
    client.set_registered_model_tag(NAME, "policy.digest_alg", "sha256")  # recomputed: still not the key's
    assert main(["--params", loose, "promote", "--site", "cxr_b"]) == 2
    assert (f"the admin gate policy of {NAME} is not signed (sha256) but SITEADAPT_PROMOTION_KEY is set"
            in capsys.readouterr().err)
    assert _alias(client, "champion") == v1
    assert json.loads(client.get_model_version(NAME, v2).tags["promotion_refused_gates"]) == [
        f"the admin gate policy of {NAME} is not signed (sha256) but SITEADAPT_PROMOTION_KEY is set: it may have "
        "been written without the key"]
    assert main(["--params", loose, "promote", "--site", "cxr_b", "--check"]) == 6
    assert "the gate policy in force does not verify: the admin gate policy" in capsys.readouterr().err
    assert main(["--params", loose, "policy", "show", "--site", "cxr_b"]) == 2
    capsys.readouterr()

    # the policy tags deleted: not a fallback to the registrant's params.yaml, since v1 promoted the champion
    for k in ("policy.document", "policy.digest", "policy.digest_alg"):
        client.delete_registered_model_tag(NAME, k)
    assert main(["--params", loose, "promote", "--site", "cxr_b"]) == 2
    assert (f"the admin gate policy of {NAME} is missing, but admin policy v1 promoted the current champion"
            in capsys.readouterr().err)

    # the admin sets a stricter policy (v2): the champion, promoted under v1, is flagged until replaced
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    strict = params_with(params, "admin2.yaml", min_target_dice=0.9)
    assert main(["--params", strict, "policy", "set", "--site", "cxr_b"]) == 0
    assert f"{NAME}: gate policy v2 set by admin (mlflow)" in capsys.readouterr().out  # v1 kept in policy.v1
    mtags = client.get_registered_model(NAME).tags
    assert json.loads(mtags["policy.document"])["version"] == 2 and "policy.v1" in mtags
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 6
    assert (f"the champion was promoted under {label}, looser than admin policy v2 of {NAME} (hmac-sha256 "
            f"{mtags['policy.digest'][:12]}) in force now: min_target_dice 0.5, policy 0.9") in capsys.readouterr().err
    # a promoter's looser params.yaml cannot go below it either: the policy's 0.9 applies
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 5  # v2 recorded 0.0 < 0.9
    capsys.readouterr()


def test_without_admin_policy_the_deployment_params_decide_not_the_version(registry, capsys):
    """No admin policy: the promoter's params.yaml is the policy (source ``params.yaml``); the gates the registrant
    recorded on the version never loosen it."""
    s, params, register, client = registry
    v1 = register(dice=0.02, min_target_dice=0.0)  # registered under loose gates
    assert client.get_model_version(NAME, v1).tags["gates.min_target_dice"] == "0.0"
    sha = hashlib.sha256(_canon(PARAMS_POLICY)).hexdigest()
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 1
    err = capsys.readouterr().err
    assert "refused: gate min_target_dice failed with value 0.0200 (threshold 0.5)" in err
    assert f"version {v1} stays 'candidate' (under params.yaml policy (sha256 {sha[:12]}))" in err
    assert _alias(client, "champion") is None
    ref = json.loads(client.get_model_version(NAME, v1).tags["promotion_refused_policy"])
    assert (ref["source"], ref["version"], ref["digest"], ref["gates"]) == ("params.yaml", None, sha, PARAMS_POLICY)

    v2 = register(dice=0.6, seed=1, min_target_dice=0.0)  # passes the deployment's 0.5, not only its own 0.0
    assert main(["--params", str(params), "promote", "--site", "cxr_b"]) == 0
    t = client.get_model_version(NAME, v2).tags
    assert (t["promotion.policy.source"], t["promotion.policy.version"], t["promotion.policy.digest"],
            t["promotion.policy.digest_alg"]) == ("params.yaml", "none", sha, "sha256")
    assert json.loads(t["promotion.record"])["thresholds"]["min_target_dice"] == 0.5
    assert main(["--params", str(params), "policy", "show", "--site", "cxr_b"]) == 0
    assert (f"{NAME}: params.yaml policy (sha256 {sha[:12]}) (no admin policy: promote applies the promoter's "
            "registry.gates)") in capsys.readouterr().out

    # an admin policy set afterwards: each set is a new version with the changes printed; a champion promoted under
    # the looser params.yaml policy is flagged by --check (exit 6) once the admin policy is stricter
    assert main(["--params", str(params), "policy", "set", "--site", "cxr_b"]) == 0
    capsys.readouterr()
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 0  # same gates: fine
    capsys.readouterr()
    stricter = params_with(params, "admin.yaml", min_target_dice=0.65, label_free="always")
    assert main(["--params", stricter, "policy", "set", "--site", "cxr_b"]) == 0
    out = capsys.readouterr().out
    assert "gate policy v2 set by" in out and "changed: min_target_dice 0.5 -> 0.65, label_free auto -> always" in out
    v2_digest = client.get_registered_model(NAME).tags["policy.digest"]
    assert main(["--params", str(params), "promote", "--site", "cxr_b", "--check"]) == 6
    assert (f"the champion was promoted under params.yaml policy (sha256 {sha[:12]}), looser than admin policy v2 of "
            f"{NAME} (sha256 {v2_digest[:12]}) in force now: label_free auto, policy always; min_target_dice 0.5, "
            "policy 0.65") in capsys.readouterr().err
