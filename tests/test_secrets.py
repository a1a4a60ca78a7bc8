"""Secrets are never echoed or written (issue 27, item 4).

Each URI form of the issue goes through the real command (a subprocess: real stdout, stderr, logging handlers and
uncaught-exception hook), then stdout, stderr and every file under the project folder are scanned for the secret
string. A local HTTP server stands in for the PACS / MLflow server and records every request, so the tests also
count what reached the network: nothing for a refused URI, the environment's token for an accepted one. The
redaction functions themselves are checked against exact expected texts.
"""

from __future__ import annotations

import http.server
import io
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from siteadapt import dvcgen
from siteadapt.config import load_settings
from siteadapt.redact import (RedactingFilter, inline_secret_message, redact_text, redact_uri, secret_parts)

REPO = Path(__file__).resolve().parents[1]
DICOMWEB_ENV = ("SITEADAPT_DICOMWEB_USER", "SITEADAPT_DICOMWEB_PASSWORD", "SITEADAPT_DICOMWEB_TOKEN")


# ---- the redaction functions: exact outputs ---------------------------------------------------------------------
@pytest.mark.parametrize("uri, expected", [
    ("dicomweb+http://127.0.0.1:8042/dicom-web?access_token=SECRET1",
     "dicomweb+http://127.0.0.1:8042/dicom-web?access_token=***"),
    ("http://user:SECRET2@127.0.0.1:8042/dicom-web", "http://***@127.0.0.1:8042/dicom-web"),
    ("dicomweb+https://user:SECRET3@pacs.example/dicom-web?Modality=CT&StudyDate=20240101-20241231",
     "dicomweb+https://***@pacs.example/dicom-web?Modality=CT&StudyDate=20240101-20241231"),
    ("s3://bucket/x?X-Amz-Date=20240101T000000Z&X-Amz-Signature=SECRET4&X-Amz-Credential=AKIA%2F1",
     "s3://bucket/x?X-Amz-Date=20240101T000000Z&X-Amz-Signature=***&X-Amz-Credential=***"),
    ("s3://bucket/y?api_key=SECRET5", "s3://bucket/y?api_key=***"),
    ("http://u:p@ss@h:1/a?Modality=CT&TOKEN=zz#access_token=q", "http://***@h:1/a?Modality=CT&TOKEN=***#access_token=***"),
    ("https://h/p?key=&a=1", "https://h/p?key=&a=1"),  # an empty value carries nothing
    ("https://h/p?monkey=1&keyword=2&sas_key=3", "https://h/p?monkey=1&keyword=2&sas_key=***"),
    ("http://mluser:SECRET6@mlflow:5000", "http://***@mlflow:5000"),
    ("data/raw/cardiac/ct/images", "data/raw/cardiac/ct/images"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
])
def test_redact_uri_exact(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_uri_drop_userinfo_and_tracking_redact():
    from siteadapt import tracking

    assert redact_uri("http://user:SECRET6@mlflow:5000/x?token=t", drop_userinfo=True) == "http://mlflow:5000/x?token=***"
    assert tracking.redact("http://user:SECRET6@mlflow:5000/x?token=t") == "http://mlflow:5000/x?token=***"
    assert tracking.redact("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


@pytest.mark.parametrize("text, expected", [
    ("error: 'dicomweb+http://127.0.0.1:8042/dicom-web?access_token=SECRET1': unknown filter 'access_token'",
     "error: 'dicomweb+http://127.0.0.1:8042/dicom-web?access_token=***': unknown filter 'access_token'"),
    ("pull http://a:b@h/x and s3://k/y?sig=Z failed", "pull http://***@h/x and s3://k/y?sig=*** failed"),
    ("headers {'Authorization': 'Bearer SECRET7'}", "headers {'Authorization': 'Bearer ***'}"),
    ("Authorization: Basic dXNlcjpTRUNSRVQ=", "Authorization: Basic ***"),
    ("sent Bearer eyJhbGciOi.J9 to the server", "sent Bearer *** to the server"),
    ("form password=hunter2&user=x", "form password=***&user=x"),
    ("No such file or directory: 'http:/u:SECRET11@h/x'", "No such file or directory: 'http:/***@h/x'"),
    # left alone: plain English, a path, an e-mail address without a scheme, a dotted settings key
    ("HTTP Basic authentication with a Bearer token", "HTTP Basic authentication with a Bearer token"),
    ("sites.cxr_b.images: no such folder", "sites.cxr_b.images: no such folder"),
    ("ask admin@example.org", "ask admin@example.org"),
])
def test_redact_text_exact(text, expected):
    assert redact_text(text) == expected


def test_secret_parts_and_refusal_message_name_the_kind_not_the_value():
    assert secret_parts("dicomweb+http://u:SECRET3@h/dicom-web?Modality=CT") == ["user:password@"]
    assert secret_parts("http://onlyuser@h/x") == ["user@"]
    assert secret_parts("s3://b/x?X-Amz-Signature=SECRET4&X-Amz-Security-Token=T") == [
        "query parameter 'X-Amz-Signature'", "query parameter 'X-Amz-Security-Token'"]
    assert secret_parts("dicomweb+http://h/dicom-web?Modality=CT") == []
    assert inline_secret_message("--images", "dicomweb+http://h/dicom-web") is None
    msg = inline_secret_message("--labels", "s3://b/y?api_key=SECRET5")
    assert msg == ("--labels: credentials in the URI are refused (query parameter 'api_key'; not stored and not "
                   "shown); use the AWS credential chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                   "AWS_SESSION_TOKEN) in the environment, AWS_PROFILE or AWS_SHARED_CREDENTIALS_FILE (a mounted "
                   "file), or an instance role; the endpoint comes from AWS_ENDPOINT_URL")
    assert "SECRET5" not in msg


def test_dicomweb_parse_and_fail_messages_hold_no_secret():
    import requests

    from siteadapt.io import dicomweb

    with pytest.raises(dicomweb.DicomwebError) as e:
        dicomweb.parse("dicomweb+http://127.0.0.1:8042/dicom-web?Modality=CT&access_token=SECRET1")
    assert str(e.value) == (
        "dicomweb+http://127.0.0.1...: credentials in the URI are refused (query parameter 'access_token'; not stored "
        "and not shown); set SITEADAPT_DICOMWEB_USER and SITEADAPT_DICOMWEB_PASSWORD (HTTP basic) or "
        "SITEADAPT_DICOMWEB_TOKEN (bearer) in the environment")
    with pytest.raises(dicomweb.DicomwebError, match="^dicomweb\\+http://h...: credentials in the URI are refused "
                                                     "\\(user:password@;"):
        dicomweb.parse("dicomweb+http://u:SECRET2@h/dicom-web")
    assert dicomweb.parse("dicomweb+http://h:1/dicom-web/?Modality=CT").root == "http://h:1/dicom-web"
    err = dicomweb._fail("http://u:SECRET2@h/dicom-web?access_token=SECRET3", "STOW-RS store",
                         requests.ConnectionError("no route to http://u:SECRET2@h/dicom-web"))
    assert str(err) == "http://***@h/dicom-web?access_token=***: cannot reach the DICOMweb server (STOW-RS store)"


def test_log_filter_redacts_message_arguments_and_traceback():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    lg = logging.getLogger("siteadapt.test_secrets")
    lg.propagate = False
    lg.addHandler(handler)
    try:
        lg.warning("pull %s -> %s", "dicomweb+http://u:SECRET1@pacs:8042/dicom-web?access_token=SECRET2", "mirror")
        try:
            raise OSError("cannot open s3://b/x?X-Amz-Signature=SECRET3")
        except OSError:
            lg.exception("store %s failed", "http://h/dicom-web")
    finally:
        lg.removeHandler(handler)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == "WARNING pull dicomweb+http://***@pacs:8042/dicom-web?access_token=*** -> mirror"
    assert lines[1] == "ERROR store http://h/dicom-web failed"
    assert lines[-1] == "OSError: cannot open s3://b/x?X-Amz-Signature=***"
    assert "Traceback (most recent call last):" in text
    assert not any(s in text for s in ("SECRET1", "SECRET2", "SECRET3"))


# ---- the commands --------------------------------------------------------------------------------------------
class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 401 to everything and records (method, path, Authorization header)."""

    seen: list = []

    def _answer(self):
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def requests_seen(server):
    _Recorder.seen = []
    return _Recorder.seen


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SITEADAPT_PROFILE", raising=False)
        mp.chdir(root)
        dvcgen.write(load_settings("params.yaml"), "params.yaml", "dvc.yaml")
    return root


@pytest.fixture
def project(template, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(template, root)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real ``siteadapt`` command in ``root`` (no credential variables inherited, tracking to a local store)."""
    base = {k: v for k, v in os.environ.items()
            if k not in DICOMWEB_ENV + ("MLFLOW_TRACKING_URI", "SITEADAPT_PROFILE")}
    base["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "siteadapt", *args], cwd=root, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def _assert_nowhere(secrets: tuple[str, ...], res: subprocess.CompletedProcess, root: Path) -> None:
    """No secret in stdout, stderr (the log records go there) or any file under ``root``."""
    for s in secrets:
        assert s not in res.stdout and s not in res.stderr, (s, res.stdout, res.stderr)
        hits = [name for name, data in _files(root).items() if s.encode() in data]
        assert hits == [], (s, hits)


def test_pacs_uri_with_access_token_is_refused_without_echo(project, server, requests_seen):
    port = server.server_address[1]
    uri = f"dicomweb+http://127.0.0.1:{port}/dicom-web?access_token=SECRET1"
    before = _files(project)
    res = _cli(project, "watch", "--prefix", uri, "--site", "pacs_x", "--stage", str(project / "stage"),
               "--submitter", "local", "--local-root", str(project / "runs"), "--once")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        "siteadapt watch: error: --prefix: credentials in the URI are refused (query parameter "
        "'access_token'; not stored and not shown); set SITEADAPT_DICOMWEB_USER and SITEADAPT_DICOMWEB_PASSWORD "
        "(HTTP basic) or SITEADAPT_DICOMWEB_TOKEN (bearer) in the environment")
    assert _files(project) == before  # no state file, no stage folder
    assert requests_seen == []
    _assert_nowhere(("SECRET1",), res, project)

    # the same URI edited into params.yaml by hand: refused at load, naming the key
    text = (project / "params.yaml").read_text()
    assert "\nsites:\n" in text
    (project / "params.yaml").write_text(text.replace(
        "\nsites:\n", f"\nsites:\n  pacs_tok:\n    task: cardiac\n    images: {uri}\n", 1))
    before = _files(project)
    for args in (("pull", "--site", "pacs_tok"), ("dvc-gen",)):
        res = _cli(project, *args)
        assert res.returncode == 2, res.stderr
        err = res.stderr.strip()
        assert err.startswith(f"siteadapt {args[0]}: error: params.yaml: sites.pacs_tok.images: credentials in the "
                              "URI are refused (query parameter 'access_token'"), err
        assert "SITEADAPT_DICOMWEB_TOKEN" in err
        assert err.endswith(f"(got 'dicomweb+http://127.0.0.1:{port}/dicom-web?access_token=***')")
        assert _files(project) == before  # dvc.yaml not regenerated
        # params.yaml holds the secret (the user put it there): every other file and all output must not
        assert res.stdout == "" and "SECRET1" not in res.stderr
        assert [n for n, d in _files(project).items() if b"SECRET1" in d] == ["params.yaml"]
    assert requests_seen == []


def test_watch_stage_or_state_with_credentials_is_refused(project, server, requests_seen):
    port = server.server_address[1]
    before = _files(project)
    for opt in ("--stage", "--state"):
        res = _cli(project, "watch", "--prefix", f"dicomweb+http://127.0.0.1:{port}/dicom-web?Modality=CT",
                   "--site", "pacs_x", opt, "s3://bucket/stage?X-Amz-Security-Token=SECRET9", "--submitter", "local",
                   "--local-root", str(project / "runs"), "--once")
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().startswith(f"siteadapt watch: error: {opt}: credentials in the URI are refused "
                                             "(query parameter 'X-Amz-Security-Token'; not stored and not shown); "
                                             "use the AWS credential chain")
        _assert_nowhere(("SECRET9",), res, project)
    assert _files(project) == before
    assert requests_seen == []


@pytest.mark.parametrize("stow, secret, kind", [
    ("http://user:SECRET2@127.0.0.1:{port}/dicom-web", "SECRET2", "user:password@"),
    ("http://127.0.0.1:{port}/dicom-web?access_token=SECRET2b", "SECRET2b", "query parameter 'access_token'"),
])
def test_stow_with_credentials_is_refused_without_echo(project, server, requests_seen, stow, secret, kind):
    stow = stow.format(port=server.server_address[1])
    before = _files(project)
    res = _cli(project, "export", "--site", "cxr_b", "--method", "noadapt", "--stow", stow)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        f"siteadapt export: error: --stow: credentials in the URI are refused ({kind}; not stored and not shown); "
        "set SITEADAPT_DICOMWEB_USER and SITEADAPT_DICOMWEB_PASSWORD (HTTP basic) or SITEADAPT_DICOMWEB_TOKEN "
        "(bearer) in the environment")
    assert res.stdout == ""
    assert _files(project) == before
    assert requests_seen == []
    _assert_nowhere((secret,), res, project)


@pytest.mark.parametrize("option_args, secret, where", [
    (("--task", "cardiac", "--images", "dicomweb+http://user:SECRET3@127.0.0.1:8042/dicom-web?Modality=CT"),
     "SECRET3", "--images: credentials in the URI are refused (user:password@; not stored and not shown); set "
                "SITEADAPT_DICOMWEB_USER and SITEADAPT_DICOMWEB_PASSWORD"),
    (("--task", "chestxray", "--images", "s3://bucket/x?X-Amz-Date=20240101T000000Z&X-Amz-Signature=SECRET4"),
     "SECRET4", "--images: credentials in the URI are refused (query parameter 'X-Amz-Signature'; not stored and "
                "not shown); use the AWS credential chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    (("--task", "chestxray", "--images", "s3://bucket/x", "--labels", "s3://bucket/y.csv?api_key=SECRET5"),
     "SECRET5", "--labels: credentials in the URI are refused (query parameter 'api_key'; not stored and not "
                "shown); use the AWS credential chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
])
def test_site_add_refuses_inline_secrets_and_writes_nothing(project, option_args, secret, where):
    before = _files(project)
    res = _cli(project, "site", "add", "newsite", *option_args)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert err.startswith(f"siteadapt site: error: {where}"), err
    assert len(err.splitlines()) == 1
    assert res.stdout == ""
    assert _files(project) == before  # params.yaml and dvc.yaml byte-identical, no file added
    _assert_nowhere((secret,), res, project)


def test_site_add_in_process_log_records_and_output(project, monkeypatch, capsys, caplog):
    """main() with pytest's capture: the log filter is on the handlers, and no record or output holds the secret."""
    from siteadapt.cli import main

    monkeypatch.chdir(project)
    before = _files(project)
    with caplog.at_level(logging.DEBUG):
        rc = main(["site", "add", "newsite", "--task", "cardiac", "--images",
                   "dicomweb+https://u:SECRET3@pacs.example/dicom-web"])
        logging.getLogger("siteadapt.test_secrets").warning("echo %s", "dicomweb+https://u:SECRET3@pacs.example/x")
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("siteadapt site: error: --images: credentials in the URI are refused (user:password@")
    assert "SITEADAPT_DICOMWEB_TOKEN" in err
    assert any(isinstance(f, RedactingFilter) for f in caplog.handler.filters)
    assert [r.getMessage() for r in caplog.records if r.name == "siteadapt.test_secrets"] == [
        "echo dicomweb+https://***@pacs.example/x"]
    assert all("SECRET3" not in r.getMessage() for r in caplog.records)
    assert "SECRET3" not in out + err + caplog.text
    assert _files(project) == before


@pytest.mark.parametrize("uri, secret", [
    ("http://mluser:SECRET6@127.0.0.1:{port}", "SECRET6"),
    ("http://127.0.0.1:{port}/?token=SECRET6b", "SECRET6b"),
])
def test_mlflow_tracking_uri_with_credentials_never_shown(project, server, requests_seen, uri, secret):
    uri = uri.format(port=server.server_address[1])
    env = {"MLFLOW_TRACKING_URI": uri}
    res = _cli(project, "promote", "--check", "--site", "cxr_b", env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("siteadapt promote: error: MLFLOW_TRACKING_URI: credentials in the URI are "
                                         "refused (")
    assert res.stderr.strip().endswith("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                                       "MLFLOW_TRACKING_TOKEN, in the environment")
    assert requests_seen == []  # refused before the /health probe
    _assert_nowhere((secret,), res, project)
    res = _cli(project, "summary", env=env)
    assert res.returncode == 0, res.stderr
    shown = redact_uri(uri, drop_userinfo=True)
    assert f"MLflow:    open {shown} in a browser (tracking server)" in res.stdout
    _assert_nowhere((secret,), res, project)


def test_environment_token_reaches_the_server_but_no_output_or_file(project, server, requests_seen):
    port = server.server_address[1]
    res = _cli(project, "watch", "--prefix", f"dicomweb+http://127.0.0.1:{port}/dicom-web?Modality=CT", "--site",
               "pacs_x", "--stage", str(project / "stage"), "--submitter", "local", "--local-root",
               str(project / "runs"), "--once", env={"SITEADAPT_DICOMWEB_TOKEN": "SECRET10"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().endswith(
        f"siteadapt watch: error: http://127.0.0.1:{port}/dicom-web: QIDO-RS series search refused with HTTP 401 "
        "(set SITEADAPT_DICOMWEB_USER/PASSWORD or SITEADAPT_DICOMWEB_TOKEN)")
    assert len(requests_seen) == 1
    method, path, auth = requests_seen[0]
    assert (method, path.split("?")[0], auth) == ("GET", "/dicom-web/series", "Bearer SECRET10")
    _assert_nowhere(("SECRET10",), res, project)


def test_token_from_a_mounted_file_reaches_the_server_but_no_output(project, server, requests_seen, tmp_path):
    secret_file = tmp_path / "token"
    secret_file.write_text("SECRET13\n")  # a mounted Kubernetes secret ends with a newline
    port = server.server_address[1]
    res = _cli(project, "watch", "--prefix", f"dicomweb+http://127.0.0.1:{port}/dicom-web?Modality=CT", "--site",
               "pacs_x", "--stage", str(project / "stage"), "--submitter", "local", "--local-root",
               str(project / "runs"), "--once", env={"SITEADAPT_DICOMWEB_TOKEN_FILE": str(secret_file)})
    assert res.returncode == 2, res.stderr
    assert len(requests_seen) == 1
    assert requests_seen[0][2] == "Bearer SECRET13"
    _assert_nowhere(("SECRET13",), res, project)

    res = _cli(project, "watch", "--prefix", f"dicomweb+http://127.0.0.1:{port}/dicom-web?Modality=CT", "--site",
               "pacs_x", "--stage", str(project / "stage"), "--submitter", "local", "--local-root",
               str(project / "runs"), "--once", env={"SITEADAPT_DICOMWEB_TOKEN_FILE": str(tmp_path / "missing")})
    assert res.returncode == 2
    assert res.stderr.strip().endswith(
        "$SITEADAPT_DICOMWEB_TOKEN_FILE: cannot read the credential file (FileNotFoundError)")
    assert len(requests_seen) == 1  # nothing sent without the credential


def test_argparse_error_and_uncaught_traceback_are_redacted(project):
    res = _cli(project, "sync", "a", "b", "http://u:SECRET7@h/x")
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1] == "siteadapt: error: unrecognized arguments: http://***@h/x"
    _assert_nowhere(("SECRET7",), res, project)

    res = _cli(project, "sync", "http://u:SECRET11@h/x?token=SECRET12", "out")  # a local copy of a missing file
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == ("siteadapt sync: error: sync: the local source does not exist (neither a folder, "
                                  "a file nor an s3:// URI)")
    _assert_nowhere(("SECRET11", "SECRET12"), res, project)

    # an uncaught exception (a bug, not an input problem) keeps its traceback, redacted
    import os
    res = subprocess.run([sys.executable, "-c", "import sys; from siteadapt import cli, redact; redact.install(); "
                          "raise RuntimeError('failed on http://u:SECRET14@h/x?token=SECRET15')"],
                         capture_output=True, text=True, cwd=project, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1
    assert "Traceback (most recent call last):" in res.stderr
    assert res.stderr.splitlines()[-1] == "RuntimeError: failed on http://***@h/x?token=***"
    _assert_nowhere(("SECRET14", "SECRET15"), res, project)

    res = _cli(project, "sync", "s3://bucket/x?X-Amz-Signature=SECRET8", str(project / "dst"))
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "siteadapt sync: error: s3 location: credentials in the URI are refused (query parameter 'X-Amz-Signature'; "
        "not stored and not shown); use the AWS credential chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
        "AWS_SESSION_TOKEN) in the environment, AWS_PROFILE or AWS_SHARED_CREDENTIALS_FILE (a mounted file), or an "
        "instance role; the endpoint comes from AWS_ENDPOINT_URL")
    assert not (project / "dst").exists()
    _assert_nowhere(("SECRET8",), res, project)


KFP_STEP = """
import logging, sys
from siteadapt.errors import ConfigError
from siteadapt.kfp import runtime

with runtime.cli_errors("ingest"):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("siteadapt.kfp").info("fingerprint of %s", "s3://b/x?X-Amz-Signature=SECRET13")
    if sys.argv[1] == "bug":
        raise RuntimeError("boom at http://u:SECRET14@h/dicom-web")
    raise ConfigError("bad location dicomweb+http://u:SECRET15@h/dicom-web?access_token=SECRET16")
"""


@pytest.mark.parametrize("mode, rc, last", [
    ("bug", 1, "RuntimeError: boom at http://***@h/dicom-web"),
    ("config", 2, "siteadapt ingest: error: bad location dicomweb+http://***@h/dicom-web?access_token=***"),
])
def test_kubeflow_step_logs_errors_and_tracebacks_are_redacted(tmp_path, mode, rc, last):
    """A component body runs inside runtime.cli_errors: its log records (handlers set up inside the body), its
    one-line error and an uncaught traceback carry no credential."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", KFP_STEP, mode], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == rc, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "INFO fingerprint of s3://b/x?X-Amz-Signature=***"
    assert lines[-1] == last
    assert ("Traceback (most recent call last):" in res.stderr) == (mode == "bug")
    _assert_nowhere(("SECRET13", "SECRET14", "SECRET15", "SECRET16"), res, tmp_path)
