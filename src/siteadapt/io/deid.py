"""De-identification: keyed anonymous ids and scrubbing of identifiers from anything we print or record.

Anonymous ids are ``sub-`` + the first 12 hex digits of HMAC-SHA256(key, "<site>|<kind>|<identity>"), where identity
is the SeriesInstanceUID for DICOM and the path relative to the input root for NIfTI/2D files. The same series
therefore maps to the same id at one site on every run, while nobody without the key can link an id back to a UID.

The key is looked up, in order, in ``$SITEADAPT_DEID_KEY``, in the file named by ``$SITEADAPT_DEID_KEY_FILE``, and in
``.siteadapt/deid.key`` under the current folder (created with 256 random bits, mode 0600, on first use; git-ignored).
It must never lie inside the output tree: :func:`load_key` refuses a key file under the data root.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from ..errors import ConfigError

DEFAULT_KEY_FILE = Path(".siteadapt") / "deid.key"

# DICOM attributes whose values are identifiers and are collected for scrubbing free text (paths, reasons).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "StudyID",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StationName",
)


def load_key(data_root: str | Path | None = None) -> bytes:
    env = os.environ.get("SITEADAPT_DEID_KEY")
    if env:
        return env.encode("utf-8")
    path = Path(os.environ.get("SITEADAPT_DEID_KEY_FILE") or DEFAULT_KEY_FILE)
    if data_root is not None:
        root = Path(data_root).resolve()
        kp = path.resolve()
        if kp == root or root in kp.parents:
            raise ConfigError(f"de-identification key file {path} lies inside the output tree {data_root}: "
                              "keep it outside the outputs")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    key = path.read_text().strip()
    if len(key) < 16:
        raise ConfigError(f"de-identification key in {path} is too short (need at least 16 characters)")
    return key.encode("utf-8")


def anon_id(key: bytes, site: str, kind: str, identity: str) -> str:
    mac = hmac.new(key, f"{site}|{kind}|{identity}".encode("utf-8"), hashlib.sha256).hexdigest()
    return f"sub-{mac[:12]}"


class Scrubber:
    """Collects identifier strings seen in headers and replaces them in free text (paths, messages).

    Used for anything that has to mention an input (e.g. the path of a rejected file relative to the input root):
    a folder named after a patient becomes ``[redacted]``.
    """

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern | None = None

    def add(self, value) -> None:
        if value is None:
            return
        s = str(value).strip()
        if len(s) < 3:
            return
        variants = {s, s.replace("^", " "), s.replace("^", "_")}
        variants |= {p for p in s.split("^") if len(p) >= 3}
        if s.isdigit() and len(s) == 8:  # a DA value (birth date) also shows up as YYYY-MM-DD
            variants.add(f"{s[:4]}-{s[4:6]}-{s[6:]}")
        new = {v for v in variants if v.strip() and v not in self._values}
        if new:
            self._values |= new
            self._pattern = None

    def add_dataset(self, ds) -> None:
        for kw in PHI_KEYWORDS:
            v = getattr(ds, kw, None) if hasattr(ds, "get") else None
            if v is not None:
                self.add(v)

    def __call__(self, text: str) -> str:
        if not self._values:
            return text
        if self._pattern is None:
            alts = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(a) for a in alts), re.IGNORECASE)
        return self._pattern.sub("[redacted]", text)
