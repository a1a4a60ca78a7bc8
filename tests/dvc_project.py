"""A tiny siteadapt project (git + DVC) for pipeline tests: the repository's params.yaml with a ``test`` profile
(32 px, a few iterations, few images), the chest X-ray task only, and the stages' ``siteadapt`` command resolving to
the project's own copy of the code, committed in its src/ (as in the repository, so the stages depend on the code files
they import), or to this checkout's src in a folder without one (PATH gets the interpreter's bin folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TEST_PROFILE = {"image_size": 32, "batch_size": 2, "iterations": 4, "width": 0.25, "synth_scale": 0.25,
                "synth_subjects": 4, "synth_images": 10, "slice_spacing_mm": 9.0}


def env(extra: dict | None = None, cwd: Path | None = None) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    src = Path(cwd) / "src" if cwd is not None and (Path(cwd) / "src/siteadapt/__init__.py").is_file() else REPO / "src"
    e["PYTHONPATH"] = f"{src}{os.pathsep}{e.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    e["SITEADAPT_DEID_KEY"] = "test-key-not-secret"
    e.setdefault("GIT_AUTHOR_NAME", "test")
    e.setdefault("GIT_AUTHOR_EMAIL", "test@example.org")
    e.setdefault("GIT_COMMITTER_NAME", "test")
    e.setdefault("GIT_COMMITTER_EMAIL", "test@example.org")
    e["DVC_NO_ANALYTICS"] = "1"
    e.update(extra or {})
    return e


def run(cmd: list[str] | str, cwd: Path, extra_env: dict | None = None, check: bool = True,
        timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=str(cwd), env=env(extra_env, cwd), capture_output=True, text=True, timeout=timeout,
                         shell=isinstance(cmd, str))
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def dvc(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, **kw)


def siteadapt(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "siteadapt", *args], cwd, **kw)


def tiny_params(methods: list[str] | None = None) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["profile"] = "test"
    p["profiles"]["test"] = dict(TEST_PROFILE)
    p["sites"] = {k: v for k, v in p["sites"].items() if v["task"] == "chestxray"}
    p["sites"]["cxr_b"]["pixel_spacing_mm"] = 5.6  # the synthetic PNG site at scale 0.25
    p["tasks"]["chestxray"]["methods"] = methods or ["supervised", "noadapt", "histmatch"]
    for name, task in p["tasks"].items():  # the other tasks keep their settings, without sites or directions
        if name != "chestxray":
            task["directions"] = []
    p["train"]["log_every"] = 2
    p["train"]["checkpoint_every"] = 2
    return p


def git_identity(root: Path) -> None:
    """A local committer identity (DVC experiments commit; CI machines may have no global git identity)."""
    run(["git", "config", "user.name", "siteadapt test"], root)
    run(["git", "config", "user.email", "test@example.org"], root)


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_source(root: Path) -> None:
    """This checkout's src/siteadapt as the project's src/siteadapt (tests edit the copy, never the checkout)."""
    shutil.copytree(REPO / "src" / "siteadapt", root / "src" / "siteadapt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def make_project(root: Path, params: dict | None = None) -> Path:
    """git init + dvc init + params.yaml + a copy of the code (src/siteadapt) + generated dvc.yaml, committed."""
    root.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], root)
    git_identity(root)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    copy_source(root)
    write_params(root, params or tiny_params())
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    siteadapt("dvc-gen", cwd=root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "tiny project"], root)
    return root


def ran_stages(output: str) -> list[str]:
    """Stage names from DVC's "Running stage 'x':" lines."""
    out = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Running stage '"):
            out.append(line[len("Running stage '"):].split("'")[0])
    return out


def status_stages(output: str) -> list[str]:
    """Stage names that ``dvc status`` reports as changed (its unindented ``name:`` lines)."""
    return [ln[:-1] for ln in output.splitlines() if ln and not ln[0].isspace() and ln.endswith(":")]
