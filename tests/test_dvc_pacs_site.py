"""A PACS site (``images: dicomweb+http://...``) in dvc.yaml: DVC cannot hash a DICOMweb URI, so a ``pull@SITE``
stage (always run, persistent uncached mirror) asks the PACS for new series and ingest depends on the mirror."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from siteadapt import dvcgen
from siteadapt.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
URI = "dicomweb+http://127.0.0.1:8042/dicom-web?Modality=CT"


def _project(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sites"]["pacs_ct"] = {"task": "cardiac", "images": URI, "modality": "CT"}
    raw["tasks"]["cardiac"]["directions"].append({"source": "cardiac_mr", "target": "pacs_ct"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(ROOT / "src", tmp_path / "src")
    return tmp_path


def test_pacs_site_gets_an_always_run_pull_stage_and_ingest_reads_its_mirror(tmp_path, monkeypatch):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    s = load_settings("params.yaml")
    dvcgen.write(s, "params.yaml", "dvc.yaml")
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    pull = stages["pull"]
    assert list(pull["foreach"]) == ["pacs_ct"]  # only the PACS site; the folder and s3 sites need no pull
    assert pull["do"]["always_changed"] is True
    assert pull["do"]["cmd"] == "siteadapt pull --site ${key}"
    assert pull["do"]["outs"] == [{"${item.mirror}": {"cache": False, "persist": True}}]
    assert pull["foreach"]["pacs_ct"]["mirror"] == "data/remote/pacs_ct"
    item = stages["ingest"]["foreach"]["pacs_ct"]
    assert item["images"] == item["labels"] == item["patients"] == "data/remote/pacs_ct/images"
    assert all(not str(v).startswith("dicomweb+") for it in stages["ingest"]["foreach"].values() for v in it.values())
    # DVC itself accepts the file (before, `dvc status` refused the whole project: "Unsupported URL type")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], check=True, cwd=root)
    out = subprocess.run(dvc + ["stage", "list"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pull@pacs_ct" in out.stdout and "ingest@pacs_ct" in out.stdout
    dag = subprocess.run(dvc + ["dag", "ingest@pacs_ct", "--dot"], cwd=root, capture_output=True, text=True)
    assert dag.returncode == 0, dag.stderr
    assert '"pull@pacs_ct" -> "ingest@pacs_ct"' in dag.stdout
