"""A throw-away Orthanc PACS (Debian packages ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests.

``OrthancServer(folder).start()`` fills ``tests/orthanc/orthanc.json`` (storage in ``folder``, a free HTTP port,
HTTP basic authentication with a random password, the DICOM listener off, remote access off) and starts the
``Orthanc`` binary on it; ``stop()`` terminates that one process. The DICOMweb root is ``<url>/dicom-web``.

``find_orthanc()`` returns the binary and the DICOMweb plugin, or the reason why they are absent (the tests skip with
that reason on a fresh clone without the Debian packages; ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")


def find_orthanc() -> tuple[str | None, str | None, str]:
    """``(binary, dicomweb plugin, reason)``; the reason is empty when both are present."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    plugin = next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
    if binary is None:
        return None, plugin, "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if plugin is None:
        return binary, None, "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return binary, plugin, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process on 127.0.0.1 with its storage under ``folder``."""

    def __init__(self, folder: str | Path, user: str = "siteadapt-test"):
        self.folder = Path(folder)
        self.user = user
        self.password = secrets.token_hex(12)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def _auth(self) -> str:
        return "Basic " + b64encode(f"{self.user}:{self.password}".encode()).decode()

    def request(self, path: str, data: bytes | None = None, method: str | None = None):
        """A call to Orthanc's own REST API (JSON in and out), for test set-up and checks."""
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": self._auth()})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def upload(self, path: Path) -> None:
        """Store one DICOM file through the REST API (what a modality's C-STORE would do)."""
        self.request("/instances", data=Path(path).read_bytes(), method="POST")

    def start(self, timeout_s: float = 30.0, *, keep_port: bool = False) -> "OrthancServer":
        """Start Orthanc; ``keep_port`` restarts a stopped server on its previous port (same URL, same storage)."""
        binary, plugin, why = find_orthanc()
        if why:
            raise RuntimeError(why)
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.port = self.port if keep_port and self.port else free_port()
        text = (HERE / "orthanc.json").read_text()
        for k, v in {"@STORAGE@": str(storage), "@HTTP_PORT@": str(self.port), "@DICOM_PORT@": str(free_port()),
                     "@USER@": self.user, "@PASSWORD@": self.password, "@PLUGINS@": plugin}.items():
            text = text.replace(k, v)
        config = self.folder / "orthanc.json"
        config.write_text(text)
        config.chmod(0o600)
        self.log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([binary, str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                self.request("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def env(self) -> dict[str, str]:
        """The environment variables through which siteadapt reads this server's credentials."""
        return {"SITEADAPT_DICOMWEB_USER": self.user, "SITEADAPT_DICOMWEB_PASSWORD": self.password}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":  # manual check: python tests/orthanc/server.py
    import tempfile

    with tempfile.TemporaryDirectory() as d, OrthancServer(d) as srv:
        print(srv.dicomweb, srv.request("/system")["Version"], os.getpid())
