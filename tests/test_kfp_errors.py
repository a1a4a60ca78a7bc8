"""Issue 27 item 7: a Kubeflow component that meets bad input ends as the CLI does: the CLI's one-line error on
stderr and its exit code (2: an unusable input, 3: a site with nothing usable), not a traceback and exit 1.

The components run as KFP runs them: ``kfp.local``'s ``SubprocessRunner`` starts the component's own command (a
``sh -c`` that writes the function's source to a file and runs ``python -m kfp.dsl.executor_main``) in a
subprocess. ``kfp.local`` reports only SUCCESS or FAILURE, so the test records the subprocess's return code by
wrapping the function that runs it (the real subprocess still runs) and reads its output, which kfp.local copies to
this process's stdout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kfp")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local with the subprocess runner in this interpreter; yields the return codes of the components run."""
    from kfp import local
    from kfp.local import subprocess_task_handler as handler

    codes: list[int] = []
    real = handler.run_local_subprocess

    def recording(*args, **kwargs):
        rc = real(*args, **kwargs)
        codes.append(rc)
        return rc

    monkeypatch.setattr(handler, "run_local_subprocess", recording)
    monkeypatch.setenv("SITEADAPT_DEID_KEY", "test-key-not-secret")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=False)
    yield codes


def _components():
    from siteadapt.kfp import components as C

    return C.build("python:3.11", "python:3.11")  # kfp.local's subprocess runner wants a Python image name


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and "SiteadaptError" not in out, out[-3000:]


def test_ingest_component_of_a_site_with_nothing_usable_exits_3_like_the_cli(tmp_path, kfp_local, capfd):
    from siteadapt.kfp.local import tiny_params

    site = tmp_path / "bad_site"
    (site / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (site / "images" / name).write_text("not an image")
    _components().ingest(params_yaml=tiny_params(REPO / "params.yaml"), profile="tiny", task="chestxray",
                         source_site="cxr_a", site="new_site", location=str(site), modality="DX",
                         pixel_spacing_mm=1.0, fingerprint="-")
    out = capfd.readouterr().out
    assert kfp_local == [3], out[-3000:]  # NothingUsableError's code, as `siteadapt ingest` returns
    assert "siteadapt ingest: error: site new_site: nothing usable: all 2 inputs were refused (2 x input: " \
           "unreadable image file)" in out
    _no_traceback(out)


def test_fingerprint_component_of_a_missing_location_exits_2_like_the_cli(tmp_path, kfp_local, capfd):
    _components().fingerprint(location=str(tmp_path / "no_such_site"))
    out = capfd.readouterr().out
    assert kfp_local == [2], out[-3000:]  # InputError
    assert f"siteadapt fingerprint: error: {tmp_path / 'no_such_site'}: site location is not a folder" in out
    _no_traceback(out)


def test_component_function_exits_with_the_code_and_one_line_on_stderr(tmp_path):
    """The component's Python function called directly in a fresh interpreter (as the executor calls it): exit code
    2 for a bad site name, stderr the CLI's single line, no traceback."""
    code = ("from types import SimpleNamespace\n"
            "from siteadapt.kfp import components as C\n"
            "from siteadapt.kfp.local import tiny_params\n"
            f"C.ingest(tiny_params({str(REPO / 'params.yaml')!r}), 'tiny', 'chestxray', 'cxr_a', 'Bad Name!', "
            f"{str(tmp_path)!r}, 'DX', 1.0, '-', SimpleNamespace(path={str(tmp_path / 'out')!r}, metadata={{}}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        "siteadapt ingest: error: site name 'Bad Name!': use 1-63 lower-case letters, digits, '-' or '_' "
        "(starting with a letter or digit)"]
    _no_traceback(res.stderr)


def test_cli_errors_prints_the_cli_line_and_leaves_other_exceptions(capsys):
    from siteadapt.redact import error_line
    from siteadapt.errors import NothingUsableError
    from siteadapt.kfp.runtime import cli_errors

    with pytest.raises(SystemExit) as e, cli_errors("adapt"):
        raise NothingUsableError("site x: nothing usable")
    assert e.value.code == 3
    assert capsys.readouterr().err == error_line("adapt", NothingUsableError("site x: nothing usable")) + "\n" \
        == "siteadapt adapt: error: site x: nothing usable\n"
    with pytest.raises(ZeroDivisionError), cli_errors("adapt"):  # a bug keeps its traceback
        1 / 0
    with cli_errors("adapt"):
        value = 7
    assert value == 7 and capsys.readouterr().err == ""
