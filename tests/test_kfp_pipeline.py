"""The Kubeflow pipeline as compiled: what a cluster would run (GPU pool, secrets, loop, caching, gated promotion),
and the plain-Python pieces the components call (settings of a run, workspaces, candidate choice, gates)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")
pytest.importorskip("kfp.kubernetes")

from siteadapt.errors import ConfigError, InputError  # noqa: E402
from siteadapt.kfp import pipeline as P  # noqa: E402
from siteadapt.kfp import runtime as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU, GPU = "registry.example/siteadapt:t-cpu", "registry.example/siteadapt:t-cuda"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = P.compile_pipeline(tmp_path_factory.mktemp("kfp") / "p.yaml", CPU, GPU)
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec):
    """Every (dag name, task name, task spec) of the pipeline, root and sub-DAGs (loop body, condition)."""
    dags = {"root": spec["root"]["dag"]}
    dags.update({name: c["dag"] for name, c in spec["components"].items() if "dag" in c})
    for dag_name, dag in dags.items():
        for name, t in dag["tasks"].items():
            yield dag_name, name, t


def _executor_of(spec, task):
    return spec["components"][task["componentRef"]["name"]].get("executorLabel")


def _by_component(spec, comp):
    """Tasks of a component (KFP numbers a second use of one component: comp-ingest-2)."""
    return [(d, n, t) for d, n, t in _tasks(spec) if re.fullmatch(rf"comp-{comp}(-\d+)?", t["componentRef"]["name"])]


def test_gpu_steps_request_a_gpu_and_tolerate_the_gpu_pool(compiled):
    spec, k8s = compiled
    adapts = _by_component(spec, "adapt") + _by_component(spec, "train-source")
    assert len(_by_component(spec, "adapt")) == 1 and len(adapts) == 2
    for _dag, _name, task in adapts:
        label = _executor_of(spec, task)
        container = spec["deploymentSpec"]["executors"][label]["container"]
        acc = container["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
        assert container["image"] == GPU
        plat = k8s[label]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in plat["tolerations"]
        assert plat["nodeSelector"]["labels"] == {"siteadapt.io/node-pool": "gpu"}
        assert int(plat["activeDeadlineSeconds"]) > 0
    for label, ex in spec["deploymentSpec"]["executors"].items():
        res = ex["container"]["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert res.get(key), (label, key)  # every step has requests and limits
        if not re.fullmatch(r"exec-(adapt|train-source)(-\d+)?", label):
            assert "accelerator" not in res and "tolerations" not in k8s[label] and ex["container"]["image"] == CPU


def test_secrets_and_config_reach_every_step_as_env(compiled):
    spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for label in executors:
        secrets = {s["secretName"]: {m["envVar"]: m["secretKey"] for m in s["keyToEnv"]}
                   for s in k8s[label]["secretAsEnv"]}
        assert secrets["siteadapt-object-store"] == {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
        # the de-identification key only where anonymous ids are derived (ingest; export finds its subjects by them)
        assert ("siteadapt-deid" in secrets) == label.startswith(("exec-ingest", "exec-export")), label
        assert ("siteadapt-dicomweb" in secrets) == (label == "exec-export"), label
        cms = {c["configMapName"]: {m["envVar"] for m in c["keyToEnv"]} for c in k8s[label]["configMapAsEnv"]
               if not c.get("optional")}  # optional entries: GPU steps' SITEADAPT_CHECKPOINTS (test_resume_runs)
        assert cms["siteadapt-config"] == {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI"}
        assert k8s[label]["securityContext"]["runAsNonRoot"] is True
    # no credential value in the spec itself
    text = json.dumps(spec)
    assert "secretAccessKey" not in text and "AWS_SECRET_ACCESS_KEY=" not in text


def test_loop_over_methods_feeds_registration(compiled):
    spec, _ = compiled
    loops = [(n, t) for d, n, t in _tasks(spec) if "parameterIterator" in t]
    assert len(loops) == 1
    name, loop = loops[0]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--methods"
    assert loop["iteratorPolicy"]["parallelismLimit"] == P.MAX_PARALLEL_METHODS
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert {t["componentRef"]["name"] for t in body.values()} == {"comp-adapt", "comp-evaluate"}
    assert body["adapt"]["inputs"]["parameters"]["method"]["componentInputParameter"] == \
        "pipelinechannel--methods-loop-item"
    # the registration step gets every method's model, evaluation and summary (dsl.Collected)
    reg = spec["root"]["dag"]["tasks"]["register"]
    assert name in reg["dependentTasks"]
    assert reg["inputs"]["artifacts"]["models"]["taskOutputArtifact"]["producerTask"] == name
    assert reg["inputs"]["parameters"]["summaries"]["taskOutputParameter"]["producerTask"] == name
    assert spec["root"]["inputDefinitions"]["parameters"]["methods"]["parameterType"] == "LIST"


def test_caching_on_for_data_and_training_off_for_side_effects(compiled):
    spec, _ = compiled
    cached = {}
    for _d, name, t in _tasks(spec):
        comp = t["componentRef"]["name"].removeprefix("comp-")
        if comp.startswith(("condition", "for-loop")):
            continue
        cached.setdefault(comp.rsplit("-", 1)[0] if comp[-1].isdigit() else comp, set()).add(
            bool(t.get("cachingOptions", {}).get("enableCache")))
    assert cached["train-source"] == {True}  # the source segmenter is trained once per source, data and settings
    for comp in ("ingest", "preprocess", "adapt", "evaluate"):
        assert cached[comp] == {True}, comp
    for comp in ("fingerprint", "register", "gates", "promote", "export"):
        assert cached[comp] == {False}, comp
    # steps that read a location are keyed by its fingerprint, so changed data is not served from the cache
    for _d, _n, t in _by_component(spec, "ingest"):
        assert t["inputs"]["parameters"]["fingerprint"]["taskOutputParameter"]["producerTask"].startswith(
            "fingerprint")
    assert len(_by_component(spec, "ingest")) == 2


def test_promotion_only_when_gates_pass(compiled):
    spec, _ = compiled
    promotes = _by_component(spec, "promote")
    assert len(promotes) == 1
    dag_name = promotes[0][0]
    assert dag_name.startswith("comp-condition")
    cond = [t for _d, _n, t in _tasks(spec) if t["componentRef"]["name"] == dag_name]
    assert len(cond) == 1
    assert cond[0]["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gates-Output'] == true"
    assert "gates" in cond[0]["dependentTasks"]
    gates = spec["root"]["dag"]["tasks"]["gates"]
    assert gates["inputs"]["parameters"]["candidate"]["taskOutputParameter"]["producerTask"] == "register"
    assert spec["components"]["comp-gates"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == \
        "BOOLEAN"


def test_pacs_export_runs_after_promotion_only_with_a_pacs_and_gets_the_dicomweb_secret(compiled):
    spec, k8s = compiled
    ((dag_name, _name, task),) = _by_component(spec, "export")
    # the export's DAG is the pacs_uri condition, itself inside the gates-passed condition that holds promote
    ((outer, _n, cond),) = [(d, n, t) for d, n, t in _tasks(spec) if t["componentRef"]["name"] == dag_name]
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--pacs_uri'] != ''"
    assert cond["dependentTasks"] == ["promote"]
    ((promote_dag, _p, _t),) = _by_component(spec, "promote")
    assert outer == promote_dag and promote_dag.startswith("comp-condition")
    assert cond["inputs"]["parameters"]["pipelinechannel--promote-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "promote"}
    params = task["inputs"]["parameters"]
    assert params["promotion"]["componentInputParameter"] == "pipelinechannel--promote-Output"
    assert params["candidate"]["componentInputParameter"] == "pipelinechannel--register-Output"
    assert task["inputs"]["artifacts"]["predictions"]["componentInputArtifact"] == \
        "pipelinechannel--register-predictions"
    assert spec["root"]["inputDefinitions"]["parameters"]["pacs_uri"]["defaultValue"] == ""  # default: no export
    plat = k8s[_executor_of(spec, task)]
    secrets = {s["secretName"]: s for s in plat["secretAsEnv"]}
    dicomweb = secrets["siteadapt-dicomweb"]
    assert {m["envVar"]: m["secretKey"] for m in dicomweb["keyToEnv"]} == {
        k: k for k in ("SITEADAPT_DICOMWEB_USER", "SITEADAPT_DICOMWEB_PASSWORD", "SITEADAPT_DICOMWEB_TOKEN")}
    assert dicomweb["optional"] is True  # basic auth, a token, or neither
    assert secrets["siteadapt-deid"]["keyToEnv"] == [{"envVar": "SITEADAPT_DEID_KEY",
                                                      "secretKey": "SITEADAPT_DEID_KEY"}]


def test_components_run_on_the_project_image_without_installing(compiled):
    spec, _ = compiled
    for label, ex in spec["deploymentSpec"]["executors"].items():
        cmd = " ".join(ex["container"]["command"])
        assert "pip install" not in cmd and "pip3 install" not in cmd, label
        assert ex["container"]["image"] in (CPU, GPU)
        assert "from siteadapt.kfp import runtime" in cmd  # the same step functions as the CLI


def test_cli_compile_writes_the_committed_yaml(tmp_path, monkeypatch):
    """`siteadapt pipeline compile` writes the pipeline and one YAML per component; with the default images that is
    exactly what pipelines/ and components/ hold (what a platform engineer uploads): they must match the code."""
    from siteadapt.cli import main

    monkeypatch.delenv("SITEADAPT_IMAGE", raising=False)
    monkeypatch.delenv("SITEADAPT_GPU_IMAGE", raising=False)
    rc = main(["pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--components-dir", str(tmp_path / "c")])
    assert rc == 0
    assert (tmp_path / "p.yaml").read_text() == (REPO / "pipelines" / "site-adaptation.yaml").read_text(), \
        "pipelines/site-adaptation.yaml is stale: run `siteadapt pipeline compile`"
    written = sorted(p.name for p in (tmp_path / "c").glob("*.yaml"))
    assert written == sorted(p.name for p in (REPO / "components").glob("*.yaml"))
    assert written == sorted(f"{n.replace('_', '-')}.yaml" for n in (
        "fingerprint", "ingest", "preprocess", "train_source", "adapt", "evaluate", "register", "gates", "promote",
        "export"))
    for name in written:
        assert (tmp_path / "c" / name).read_text() == (REPO / "components" / name).read_text(), \
            f"components/{name} is stale: run `siteadapt pipeline compile`"


# ---- runtime: settings of a run, workspaces, candidate, gates ------------------------------------------------------
PARAMS = (REPO / "params.yaml").read_text()


def test_settings_for_a_new_site(tmp_path):
    job = R.Job(task="chestxray", source_site="cxr_a", site="hospital_q", params_yaml=PARAMS, profile="quick",
                modality="DX", pixel_spacing_mm=0.7, methods=("histmatch",))
    s = R.settings_for(job, tmp_path, target_location="s3://b/sites/hospital_q/")
    assert s.paths.models == tmp_path / "models" and s.paths.prepared == tmp_path / "prepared"
    assert [(d.source, d.target) for d in s.tasks["chestxray"].directions] == [("cxr_a", "hospital_q")]
    assert s.tasks["chestxray"].methods == ["histmatch"]
    assert s.site("hospital_q").modality == "DX" and s.site("hospital_q").pixel_spacing_mm == 0.7
    assert s.site("cxr_a").modality is None and s.roi_rule("hospital_q") == "foreground"
    assert "cxr_b" not in s.sites and "cardiac_mr" in s.sites  # unused sites of the task are dropped
    # source-only steps: no target in the settings, so their cache keys do not depend on it
    src = R.settings_for(R.Job(task="chestxray", source_site="cxr_a", params_yaml=PARAMS), tmp_path)
    assert src.tasks["chestxray"].directions == [] and src.roi_rule("cxr_a") == "labels"
    with pytest.raises(ConfigError, match="site name"):
        R.settings_for(R.Job(task="chestxray", source_site="cxr_a", site="Bad Name", params_yaml=PARAMS), tmp_path)
    with pytest.raises(ConfigError, match="unknown task"):
        R.settings_for(R.Job(task="brain", source_site="cxr_a", params_yaml=PARAMS), tmp_path)
    with pytest.raises(ConfigError, match="belongs to task"):
        R.settings_for(R.Job(task="chestxray", source_site="cardiac_mr", params_yaml=PARAMS), tmp_path)


def test_workspace_links_inputs_and_leaves_only_outputs(tmp_path):
    a = tmp_path / "a"
    (a / "prepared" / "s1").mkdir(parents=True)
    (a / "prepared" / "s1" / "train.npz").write_text("A")
    b = tmp_path / "b"
    (b / "prepared" / "s2").mkdir(parents=True)
    (b / "prepared" / "s2" / "train.npz").write_text("B")
    out = tmp_path / "out"
    with R.Workspace(out) as ws:
        ws.add(a)
        ws.add(b)
        assert (out / "prepared" / "s1" / "train.npz").read_text() == "A"
        assert (out / "prepared" / "s2" / "train.npz").read_text() == "B"
        (out / "models" / "t" / "s2" / "m").mkdir(parents=True)
        (out / "models" / "t" / "s2" / "m" / "model.pt").write_text("M")
        # replacing a linked file (what atomic writes do) replaces the link, never the input
        tmp = out / "prepared" / "s1" / ".new"
        tmp.write_text("X")
        tmp.replace(out / "prepared" / "s1" / "train.npz")
    assert (a / "prepared" / "s1" / "train.npz").read_text() == "A"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["models/t/s2/m/model.pt", "prepared/s1/train.npz"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    with pytest.raises(InputError, match="not a folder"):
        R.Workspace(tmp_path / "w").add(tmp_path / "missing")


def test_summary_score_is_the_selection_score():
    """The evaluation summary's ``score`` is what the select step orders label-free survivors by (shift
    consistency); the candidate itself is chosen by steps/select.py in the registration step (tests/test_select.py)."""
    assert R.score({"consistency": 0.75, "dice_mean": 0.9}) == 0.75  # labels do not leak into the label-free score
    assert R.score({"dice_mean": None, "empty_fraction": None}) is None
    assert not hasattr(R, "select_candidate")  # one selection, in siteadapt.steps.select


def test_run_gate_overrides_reach_the_registry_settings(tmp_path):
    job = R.Job(task="chestxray", source_site="cxr_a", site="h", params_yaml=PARAMS,
                gates={"min_target_dice": 0.9, "max_empty_fraction": None})
    g = R.settings_for(job, tmp_path).registry.gates
    assert g.min_target_dice == 0.9 and g.max_empty_fraction is None and g.max_fragmented_fraction == 0.25
    with pytest.raises(ConfigError, match="min_target_dise"):
        R.settings_for(R.Job(task="chestxray", source_site="cxr_a", site="h", params_yaml=PARAMS,
                             gates={"min_target_dise": 0.9}), tmp_path)


def test_local_locations(tmp_path):
    from siteadapt.kfp import locations as L

    site = tmp_path / "sites" / "h1"
    (site / "images" / "a").mkdir(parents=True)
    (site / "images" / "a" / "x.dcm").write_bytes(b"12345")
    (site / ".hidden").write_text("skip")
    (tmp_path / "sites" / "h2").mkdir()
    assert L.list_sites(str(tmp_path / "sites")) == ["h1", "h2"]
    entries = L.list_files(str(site))
    assert [(e.rel, e.size) for e in entries] == [("images/a/x.dcm", 5)]
    fp = L.fingerprint(str(site))
    (site / "images" / "a" / "y.dcm").write_bytes(b"1")
    assert L.fingerprint(str(site)) != fp
    assert L.fetch(str(site), tmp_path / "unused") == site  # a local location is read in place
    with pytest.raises(InputError, match="empty"):
        L.fingerprint(str(tmp_path / "sites" / "h2"))


def test_workspace_copies_for_consumers_that_refuse_links(tmp_path):
    a = tmp_path / "a" / "models" / "t" / "s" / "m"
    a.mkdir(parents=True)
    (a / "model.pt").write_text("W")
    (a / "losses.csv").write_text("L")
    out = tmp_path / "out"
    with R.Workspace(out) as ws:
        ws.add(tmp_path / "a", copy=True)
        copied = out / "models" / "t" / "s" / "m" / "model.pt"
        assert copied.is_file() and not copied.is_symlink() and copied.read_text() == "W"
        new = copied.with_name(".tmp")
        new.write_text("W2")
        new.replace(out / "models" / "t" / "s" / "m" / "losses.csv")  # the step rewrote this one: an output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "models/t/s/m/losses.csv"]
    assert (a / "losses.csv").read_text() == "L"


def test_cli_submit_and_run_local_build_the_run_arguments(tmp_path, monkeypatch, capsys):
    """`pipeline submit` goes to kfp.Client with the compiled package; `pipeline run-local` hands the local runner
    tiny synthetic sites and the tiny profile (the run itself is tested in test_kfp_local.py)."""
    import kfp

    import siteadapt.kfp.submit as S
    from siteadapt.cli import main

    created = []

    class FakeClient:
        def __init__(self, host=None, namespace=None):
            assert host == "http://kfp.example:8888"

        def create_run_from_pipeline_package(self, package, arguments, run_name, experiment_name, namespace,
                                             service_account):
            spec = next(yaml.safe_load_all(Path(package).read_text()))
            created.append((spec["pipelineInfo"]["name"], arguments, run_name, namespace, service_account))
            return type("R", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    rc = main(["pipeline", "submit", "--host", "http://kfp.example:8888", "--site", "hospital_x", "--target-uri",
               "s3://b/sites/hospital_x/", "--source-uri", "s3://b/sources/cardiac_mr/", "--methods", "sifa,histmatch",
               "--gate", "min_target_dice=0.6", "--gate", "max_empty_fraction=null", "--namespace", "siteadapt",
               "--service-account", "siteadapt-pipeline-runner", "--image", CPU, "--gpu-image", GPU])
    assert rc == 0 and "run-123" in capsys.readouterr().out
    name, args, run_name, ns, sa = created[0]
    assert name == P.PIPELINE_NAME and run_name == "siteadapt-hospital_x" and (ns, sa) == (
        "siteadapt", "siteadapt-pipeline-runner")
    assert args == {"site": "hospital_x", "target_uri": "s3://b/sites/hospital_x/",
                    "source_uri": "s3://b/sources/cardiac_mr/", "methods": ["sifa", "histmatch"],
                    "gate_thresholds": {"min_target_dice": 0.6, "max_empty_fraction": None}}
    assert main(["pipeline", "submit", "--host", "http://kfp.example:8888", "--site", "Bad Site", "--target-uri",
                 "s3://b/x/", "--source-uri", "s3://b/y/"]) == 2  # a clear error, no run

    ran = []
    monkeypatch.setattr(S.LocalSubmitter, "submit", lambda self, run_name, arguments: ran.append(
        (self.pipeline_root, run_name, arguments)) or "local")
    monkeypatch.setenv("SITEADAPT_DEID_KEY", "test-key-not-secret")
    rc = main(["--params", str(REPO / "params.yaml"), "pipeline", "run-local", "--root", str(tmp_path)])
    assert rc == 0
    root, run_name, args = ran[0]
    assert root == tmp_path / "kfp" and args["site"] == "cxr_b_local" and args["profile"] == "tiny"
    assert args["task"] == "chestxray" and args["source_site"] == "cxr_a" and args["methods"] == ["noadapt",
                                                                                                 "histmatch"]
    assert Path(args["source_uri"], "images").is_dir() and Path(args["target_uri"], "labels").is_dir()
    assert yaml.safe_load(args["params_yaml"])["profiles"]["tiny"]["image_size"] == 32
