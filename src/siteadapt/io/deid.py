"""De-identification: keyed anonymous ids and scrubbing of identifiers from anything we print or record.

Anonymous ids are ``sub-`` + the first 12 hex digits of HMAC-SHA256(key, "<site>|<kind>|<identity>"), where identity
is the SeriesInstanceUID for DICOM and the path relative to the input root for NIfTI/2D files. The same series
therefore maps to the same id at one site on every run, while nobody without the key can link an id back to a UID.

The key is looked up, in order, in ``$SITEADAPT_DEID_KEY``, in the file named by ``$SITEADAPT_DEID_KEY_FILE``, and in
``.siteadapt/deid.key`` under the current folder (created with 256 random bits, mode 0600, on first use; git-ignored).
It must never lie inside the output tree: :func:`load_key` refuses a key file under the data root.

Inputs that are not used (rejected files, unmatched labels) are named in the manifest and logs by an *input
reference* (:func:`input_ref`): ``in-`` + 12 hex digits of the same keyed HMAC over the file's path relative to its
root, never by the path or name itself (file and folder names often carry patient names or record numbers). Only a
holder of the key and of the input tree can map a reference back to its file, by hashing every path again
(``siteadapt ingest --explain``, which prints to the terminal and writes nothing).
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

_PATIENT_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs")


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


def _mac(key: bytes, text: str) -> str:
    # surrogateescape: a file name that is not valid UTF-8 (Python holds its raw bytes as lone surrogates) hashes as
    # its bytes on disk instead of failing; valid text encodes exactly as plain UTF-8
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def anon_id(key: bytes, site: str, kind: str, identity: str) -> str:
    return f"sub-{_mac(key, f'{site}|{kind}|{identity}')[:12]}"


def input_ref(key: bytes, site: str, where: str, rel: str) -> str:
    """Keyed reference of an input file (``where``: ``input``, ``labels`` or ``patients``; ``rel``: its POSIX path
    under that root, or a CSV's file name): what the manifest and the logs say instead of the file's name."""
    return f"in-{_mac(key, f'{site}|input-file|{where}|{rel}')[:12]}"


def keyed_digest(key: bytes, text: str) -> str:
    """Full keyed HMAC-SHA256 (hex) of ``text``: for fingerprints that mix input paths with sizes and times, so that
    nobody without the key can test a guessed file name against a recorded fingerprint."""
    return _mac(key, text)


# Folder and file-name words that name no one: DICOM export layouts, scanner and modality words, numbered series or
# image folders. A DICOM series' folder name is used to match labels, and used to be collected as an identifier; with
# these words collected, messages read "truncated or unreadable [redacted]" for a folder named DICOM.
GENERIC_WORDS = frozenset(w.lower() for w in (
    "DICOM", "DICOMDIR", "DCM", "IMAGES", "IMAGE", "IMG", "IMGS", "SERIES", "STUDY", "STUDIES", "EXAM", "EXAMS",
    "SCAN", "SCANS", "DATA", "INPUT", "INPUTS", "EXPORT", "EXPORTS", "RAW", "FILES", "SLICES", "PATIENT",
    "PATIENTS", "ANONYMOUS", "ANONYMIZED", "UNKNOWN", "NONE", "LABELS", "MASKS", "NIFTI", "PNG", "JPEG", "JPG", "TIFF",
    "CT", "MR", "MRI", "PT", "PET", "NM", "CR", "DX", "DR", "MG", "US", "XA", "RF", "OT", "SR", "SEG", "RTSTRUCT",
    "AXIAL", "SAGITTAL", "CORONAL", "LOCALIZER", "SCOUT", "T1", "T2", "FLAIR", "DWI", "ADC", "CINE", "CONTRAST",
    "SIEMENS", "PHILIPS", "GE", "GEMS", "TOSHIBA", "CANON", "HITACHI", "FUJI", "AGFA", "CARESTREAM", "HOLOGIC",
    "PHANTOM", "QA", "TEST", "TRAIN", "VAL", "VALIDATION", "NORMAL", "ABNORMAL", "CASE", "CASES",
))
_GENERIC_NUMBERED = re.compile(r"^(se|ser|series|st|study|im|img|image|scan|dir|exam|case)[ _\-]?\d{0,8}$",
                               re.IGNORECASE)


def is_generic(value: str) -> bool:
    """True for a name that identifies no one (``DICOM``, ``SE000001``, ``series_3``, ``IMAGES``, a modality code)."""
    v = value.strip()
    return v.lower() in GENERIC_WORDS or bool(_GENERIC_NUMBERED.match(v))


class Scrubber:
    """Collects identifier strings seen in headers and replaces them in free text (paths, messages).

    Used on free text that may quote an input (e.g. a reader's reason for refusing a file): a patient's name or id
    becomes ``[redacted]``. Generic words (:func:`is_generic`: ``DICOM``, ``IMAGES``, ``SE0001``, modality codes) are
    never collected from folder names or non-patient attributes, so a folder named ``DICOM`` does not blank out the
    word DICOM in every message; PatientName, PatientID and OtherPatientIDs values are always collected whole.
    """

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern | None = None

    def add(self, value, *, patient: bool = False) -> None:
        """Collect ``value`` (and its ``^``-separated parts). ``patient``: a PatientName/PatientID value, collected
        whole even when it looks generic; otherwise a generic value is skipped. Generic parts are always skipped."""
        if value is None:
            return
        s = str(value).strip()
        if len(s) < 3 or (not patient and is_generic(s)):
            return
        variants = {s, s.replace("^", " "), s.replace("^", "_")}
        variants |= {p for p in s.split("^") if len(p) >= 3 and not is_generic(p)}
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
                self.add(v, patient=kw in _PATIENT_KEYWORDS)

    def __call__(self, text: str) -> str:
        if not self._values:
            return text
        if self._pattern is None:
            alts = sorted(self._values, key=len, reverse=True)
            # a value without digits (a name or a part of one) is matched as a whole word only, so that "Doe" does
            # not blank out "does"; one with digits (ids, dates, UIDs) wherever it appears, glued to letters or not
            self._pattern = re.compile("|".join(
                re.escape(a) if any(ch.isdigit() for ch in a) else rf"(?<![^\W_]){re.escape(a)}(?![^\W_])"
                for a in alts), re.IGNORECASE)
        return self._pattern.sub("[redacted]", text)
