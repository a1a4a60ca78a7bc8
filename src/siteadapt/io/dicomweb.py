"""PACS sites over DICOMweb: pull new series (QIDO-RS search + WADO-RS retrieve) and push results (STOW-RS).

A site's ``images`` may be ``dicomweb+http://host:8042/dicom-web?Modality=CT&StudyDate=20240101-20241231`` (or
``dicomweb+https://``). The part after ``dicomweb+`` up to ``?`` is the DICOMweb root; the query holds QIDO-RS
matching keys, restricted to :data:`FILTERS` (study date range, modality, series description, ...). The client is
``dicomweb-client`` (the reference Python DICOMweb client); files are pydicom datasets.

Pull (:func:`pull`), called by :func:`siteadapt.storage.materialize` before ingest:

- one QIDO-RS search for series with the filters (all pages), then WADO-RS retrieve of each series not pulled yet,
  in the transfer syntax the PACS stored it in (``transfer-syntax=*``: no transcoding, pixels bit-exact);
- every instance is written atomically into the local mirror as ``<study>/<series>/<instance>.dcm``, where each name
  is a keyed hash (the de-identification key, :mod:`siteadapt.io.deid`) of the UID: no UID reaches a path;
- exactly once: a state file beside the mirror (``<mirror>.dicomweb-state.json``) lists the keyed hashes of the
  series already pulled; a series is added only after all its instances are on disk, so a pull killed halfway
  fetches that series again and nothing else. A second pull fetches nothing; a study stored later is fetched alone.
  The state holds hashes only (no UIDs), and is keyed to the query: another query starts another state;
- credentials come from the environment only: ``SITEADAPT_DICOMWEB_USER`` / ``SITEADAPT_DICOMWEB_PASSWORD`` (HTTP
  basic) or ``SITEADAPT_DICOMWEB_TOKEN`` (bearer); a URI with ``user:password@`` is refused.

Push (:func:`stow`): STOW-RS of datasets (the DICOM SEG objects of :mod:`siteadapt.steps.export`) to a DICOMweb root.

Logging: dicomweb-client logs request URLs (which carry UIDs) at INFO, urllib3 request paths at DEBUG and highdicom
dataset UIDs at INFO; :func:`quiet_libraries` caps those loggers at WARNING, and HTTP errors are re-raised with the
status code and the server root only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from ..errors import SiteadaptError
from .atomic import atomic_path, write_json
from .deid import keyed_digest

log = logging.getLogger("siteadapt.dicomweb")

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
STATE_VERSION = 1
# QIDO-RS matching keys a site URI may use (series-level search; study attributes match through their study)
FILTERS = ("StudyDate", "StudyTime", "Modality", "SeriesDescription", "BodyPartExamined", "StudyDescription",
           "InstitutionalDepartmentName", "ManufacturerModelName")


class DicomwebError(SiteadaptError):
    """The PACS cannot be reached or refuses (the message names the server root and the HTTP status, no UIDs)."""


def is_dicomweb(location) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


@dataclass(frozen=True)
class Source:
    root: str  # http(s)://host:port/path of the DICOMweb service
    filters: tuple[tuple[str, str], ...]

    @property
    def display(self) -> str:
        q = "&".join(f"{k}={v}" for k, v in self.filters)
        return f"dicomweb+{self.root}" + (f"?{q}" if q else "")


def parse(uri: str) -> Source:
    """Split a ``dicomweb+http(s)://`` site URI into the service root and its QIDO-RS filters."""
    if not is_dicomweb(uri):
        raise DicomwebError(f"{uri!r}: not a dicomweb+http(s):// URI")
    parts = urlsplit(uri[len("dicomweb+"):])
    if parts.username or parts.password:
        raise DicomwebError(f"dicomweb+{parts.scheme}://{parts.hostname}...: credentials in the URI are refused; set "
                            "SITEADAPT_DICOMWEB_USER/SITEADAPT_DICOMWEB_PASSWORD or SITEADAPT_DICOMWEB_TOKEN")
    if not parts.hostname:
        raise DicomwebError(f"{uri!r}: no host")
    filters = []
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=False, strict_parsing=bool(parts.query))
    except ValueError:
        raise DicomwebError(f"{uri!r}: the query is not a list of KEY=VALUE filters") from None
    for k, v in pairs:
        if k not in FILTERS:
            raise DicomwebError(f"{uri!r}: unknown filter {k!r} (allowed: {', '.join(FILTERS)})")
        filters.append((k, v))
    root = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return Source(root=root, filters=tuple(sorted(filters)))


def quiet_libraries() -> None:
    """Cap the loggers that print UIDs (request paths, dataset UIDs) at WARNING: dicomweb-client, urllib3, highdicom."""
    for name in ("dicomweb_client", "urllib3.connectionpool", "highdicom"):
        lg = logging.getLogger(name)
        if lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


def client(root: str):
    """A ``DICOMwebClient`` for ``root`` with the credentials of the environment (none when unset)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    quiet_libraries()
    session = requests.Session()
    user, password = os.environ.get("SITEADAPT_DICOMWEB_USER"), os.environ.get("SITEADAPT_DICOMWEB_PASSWORD")
    token = os.environ.get("SITEADAPT_DICOMWEB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    return DICOMwebClient(url=root, session=session, timeout=(5, 120))


def _fail(root: str, what: str, e: Exception) -> DicomwebError:
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        code = e.response.status_code
        hint = " (set SITEADAPT_DICOMWEB_USER/PASSWORD or SITEADAPT_DICOMWEB_TOKEN)" if code in (401, 403) else ""
        return DicomwebError(f"{root}: {what} refused with HTTP {code}{hint}")
    if isinstance(e, requests.ConnectionError):
        return DicomwebError(f"{root}: cannot reach the DICOMweb server ({what})")
    return DicomwebError(f"{root}: {what} failed: {type(e).__name__}")


def _hash(key: bytes, kind: str, uid: str) -> str:
    return keyed_digest(key, f"dicomweb|{kind}|{uid}")[:16]


def _value(item: dict, tag: str) -> str | None:
    v = item.get(tag, {}).get("Value")
    return str(v[0]) if v else None


def state_path(mirror: str | Path) -> Path:
    mirror = Path(mirror)
    return mirror.with_name(mirror.name + ".dicomweb-state.json")


def _load_state(path: Path, query: str) -> dict:
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("version") == STATE_VERSION and state.get("query") == query:
            return state
        log.warning("%s: state of another query or version; starting a new one", path.name)
    return {"version": STATE_VERSION, "query": query, "series": {}}


def pull(uri: str, mirror: str | Path, *, key: bytes | None = None) -> dict:
    """Fetch every series matching ``uri`` that is not in ``mirror`` yet; returns counts (no identifiers).

    ``key``: the de-identification key for the hashed names (default: :func:`siteadapt.io.deid.load_key`)."""
    from .deid import load_key

    src = parse(uri)
    key = key or load_key()
    mirror = Path(mirror)
    spath = state_path(mirror)
    query = keyed_digest(key, src.display)[:16]
    state = _load_state(spath, query)
    done: dict = state["series"]
    dw = client(src.root)
    try:
        found = dw.search_for_series(search_filters=dict(src.filters), get_remaining=True,
                                     fields=["StudyInstanceUID", "SeriesInstanceUID"])
    except Exception as e:  # noqa: BLE001
        raise _fail(src.root, "QIDO-RS series search", e) from None
    todo = []
    for item in found:
        study, series = _value(item, "0020000D"), _value(item, "0020000E")
        if not study or not series:
            continue
        hs = _hash(key, "series", series)
        if hs not in done:
            todo.append((study, series, hs))
    studies_new, instances = set(), 0
    t0 = time.perf_counter()
    for study, series, hs in sorted(todo, key=lambda t: t[2]):
        hst = _hash(key, "study", study)
        folder = mirror / hst / hs
        n = 0
        try:
            for ds in dw.iter_series(study, series, media_types=(("application/dicom", "*"),)):
                sop = str(ds.get("SOPInstanceUID", "") or f"no-sop-{n}")
                with atomic_path(folder / f"{_hash(key, 'instance', sop)}.dcm", suffix="") as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
                n += 1
        except DicomwebError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _fail(src.root, "WADO-RS series retrieve", e) from None
        done[hs] = {"study": hst, "instances": n, "at": round(time.time(), 3)}
        write_json(spath, state)  # this series is complete: never fetched again
        studies_new.add(hst)
        instances += n
    if not spath.exists():
        write_json(spath, state)
    mirror.mkdir(parents=True, exist_ok=True)
    res = {"matched_series": len(found), "fetched_series": len(todo), "fetched_studies": len(studies_new),
           "instances": instances, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("%s -> %s: %d series match, %d new series (%d studies, %d instances) fetched", src.display, mirror,
             res["matched_series"], res["fetched_series"], res["fetched_studies"], instances)
    return res


def stow(root_or_uri: str, datasets) -> int:
    """STOW-RS ``datasets`` to a DICOMweb root (``http(s)://...`` or a ``dicomweb+`` site URI); returns the count.

    Raises :class:`DicomwebError` when the server refuses any of them (the STOW response lists failed instances)."""
    root = parse(root_or_uri).root if is_dicomweb(root_or_uri) else root_or_uri.rstrip("/")
    datasets = list(datasets)
    if not datasets:
        return 0
    dw = client(root)
    try:
        resp = dw.store_instances(datasets=datasets)
    except Exception as e:  # noqa: BLE001
        raise _fail(root, "STOW-RS store", e) from None
    failed = resp.get("FailedSOPSequence") if resp is not None else None
    if failed:
        raise DicomwebError(f"{root}: STOW-RS refused {len(failed)} of {len(datasets)} instances")
    return len(datasets)


def search_series(root_or_uri: str, filters: dict | None = None) -> list[dict]:
    """QIDO-RS series search (DICOM JSON items); e.g. ``{"Modality": "SEG"}`` to find pushed results."""
    root = parse(root_or_uri).root if is_dicomweb(root_or_uri) else root_or_uri.rstrip("/")
    try:
        return client(root).search_for_series(search_filters=filters or {}, get_remaining=True)
    except Exception as e:  # noqa: BLE001
        raise _fail(root, "QIDO-RS series search", e) from None


def study_set(uri: str, *, key: bytes | None = None) -> list[str]:
    """Sorted keyed hashes of the studies with a series matching ``uri`` (what ``siteadapt watch`` compares between
    polls: a new or grown study set of a PACS site, without keeping any UID)."""
    from .deid import load_key

    src = parse(uri)
    key = key or load_key()
    try:
        found = client(src.root).search_for_series(search_filters=dict(src.filters), get_remaining=True,
                                                   fields=["StudyInstanceUID"])
    except Exception as e:  # noqa: BLE001
        raise _fail(src.root, "QIDO-RS series search", e) from None
    return sorted({_hash(key, "study", s) for s in (_value(it, "0020000D") for it in found) if s})
