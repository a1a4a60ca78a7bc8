"""The real chest X-ray kit end to end at a tiny size (issue 26): ``site add`` of both hospitals, ingest,
preprocess, a short source training, short adaptations (AdaBN, TENT), evaluation, the label-free ``select
--register``; then nothing written carries a case id: no file or folder name under the workspace, no line of the
commands' output, no MLflow tag, param or registered-version tag.

Reads ``../shared/data/cxr_lungs`` (marker ``realdata``; skipped when absent). Nothing of the kit is copied into the
repository: the workspace is a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KIT = REPO.parent / "shared" / "data" / "cxr_lungs"

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TINY = {"image_size": 32, "batch_size": 2, "iterations": 6, "adapt_iterations": 6, "width": 0.125,
        "synth_scale": 0.5, "synth_subjects": 4, "synth_images": 8, "slice_spacing_mm": 4.5}


def _case_ids() -> set[str]:
    """The kit's case ids (file stems, e.g. XXXCXR_0001_0) and the same without the class suffix (XXXCXR_0001).
    Bare record numbers are not searched for: hex digests and run ids contain such digit runs by chance."""
    ids = {p.stem for site in ("shenzhen", "montgomery") for p in (KIT / site / "images").glob("*.png")}
    return ids | {re.sub(r"_[01]$", "", i) for i in ids}


@pytest.fixture(scope="module")
def kit():
    if not (KIT / "shenzhen" / "images").is_dir() or not (KIT / "montgomery" / "images").is_dir():
        pytest.skip(f"real chest X-ray kit absent: {KIT}")
    return KIT


def test_real_kit_end_to_end_writes_no_case_id(kit, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["tiny"] = TINY
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "SITEADAPT_PROFILE": "tiny", "SITEADAPT_DEID_KEY": "realdata-test-key",
           "SITEADAPT_TRACKING": "on", "PYTHONHASHSEED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = str(Path(sys.executable).with_name("siteadapt"))
    out: list[str] = []

    def run(*args: str) -> None:
        r = subprocess.run([exe, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        out.append(r.stdout + r.stderr)
        assert r.returncode == 0, f"siteadapt {' '.join(args[:3])} failed:\n{r.stdout[-1500:]}{r.stderr[-3000:]}"

    for site, extra in (("shenzhen", ()), ("montgomery", ("--target-of", "shenzhen"))):
        run("site", "add", site, "--task", "chestxray", "--images", str(kit / site / "images"), "--labels",
            str(kit / site / "labels"), "--pixel-spacing", "1.4", *extra)
    for site in ("shenzhen", "montgomery"):
        run("ingest", "--site", site)
        run("preprocess", "--site", site)
    run("train-source", "--site", "shenzhen")
    for m in ("noadapt", "adabn", "tent"):
        run("adapt", "--site", "montgomery", "--method", m)
        run("evaluate", "--site", "montgomery", "--method", m, "--predict")
    run("select", "--site", "montgomery", "--methods", "adabn,tent", "--register")

    import json

    sel = json.loads(next(ws.glob("registry/chestxray/montgomery/selection.json")).read_text())
    assert "noadapt" in [r["method"] for r in sel["methods"]]  # the baseline always competes
    assert sel["decision"]["reason"] and sel["winner"] in ("noadapt", "adabn", "tent")
    assert (ws / "data" / "prepared" / "montgomery" / "test.npz").is_file()

    ids = _case_ids()
    assert len(ids) == 2 * 438

    def leaks(text: str) -> list[str]:
        low = text.lower()
        return sorted(i for i in ids if i.lower() in low)

    names = [p.relative_to(ws).as_posix() for p in ws.rglob("*")]
    bad_names = [n for n in names if leaks(n)]
    assert not bad_names, f"case ids in written names: {bad_names[:5]}"
    logs = "\n".join(out)
    assert not leaks(logs), f"case ids in the commands' output: {leaks(logs)[:5]}"
    # every text file written (manifests, metrics, selection, splits): no case id either
    for p in ws.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".yaml", ".csv", ".txt", ".md") and p.name != "params.yaml":
            assert not leaks(p.read_text(errors="replace")), f"case id in {p.relative_to(ws)}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", registry_uri=f"sqlite:///{ws / 'mlflow.db'}")
    texts = []
    for exp in client.search_experiments():
        for run_ in client.search_runs([exp.experiment_id]):
            texts += [f"{k}={v}" for k, v in {**run_.data.tags, **run_.data.params}.items()]
    for rm in client.search_registered_models():
        for v in client.search_model_versions(f"name='{rm.name}'"):
            texts += [f"{k}={val}" for k, val in v.tags.items()]
    assert texts, "nothing was tracked"
    # params.yaml's site paths are the user's own input paths (recorded as they gave them): the kit's folder names
    # carry no case id, and neither may anything else the tracker holds
    joined = "\n".join(texts)
    assert not leaks(joined), f"case ids in MLflow tags/params: {leaks(joined)[:5]}"
    shutil.rmtree(ws / "data" / "ingested", ignore_errors=True)  # tmp_path is cleaned by pytest; keep disk low
