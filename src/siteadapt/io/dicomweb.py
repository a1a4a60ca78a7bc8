"""PACS sites over DICOMweb: pull new series (QIDO-RS search + WADO-RS retrieve) and push results (STOW-RS).

A site's ``images`` may be ``dicomweb+http://host:8042/dicom-web?Modality=CT&StudyDate=20240101-20241231`` (or
``dicomweb+https://``). The part after ``dicomweb+`` up to ``?`` is the DICOMweb root; the query holds QIDO-RS
matching keys, restricted to :data:`FILTERS` (study date range, modality, series description, ...). The client is
``dicomweb-client`` (the reference Python DICOMweb client) for searches; instances are fetched as the bytes the PACS
sends.

Pull (:func:`pull`), called by :func:`siteadapt.storage.materialize` before ingest (and by ``siteadapt watch``):

- one QIDO-RS series search with the filters (all pages) that also asks for each series' instance count
  (NumberOfSeriesRelatedInstances, 0020,1209). A series whose count equals the one recorded is up to date and costs
  no further request;
- every other series is listed instance by instance (a QIDO-RS instance search for SOPInstanceUID), and only the
  instances not on disk yet are fetched, one WADO-RS instance retrieve each, in the transfer syntax the PACS stored
  them in (``transfer-syntax=*``). The Part 10 bytes are written as received (bit-identical to the PACS copy) after
  checking that they parse and carry the SOP Instance UID asked for;
- names are keyed hashes (the de-identification key, :mod:`siteadapt.io.deid`) of the UIDs:
  ``<study>/<series>/<instance>.dcm``; no UID reaches a path, the state, a log line or an error message;
- complete or absent: instances land first in a staging folder beside the mirror (``<mirror>.dicomweb-partial``).
  A series moves into the mirror (one directory rename for a new series, file by file for a grown one) and is
  recorded in the state only when the instance files on disk equal both the instance list and the count the server
  reported. So the mirror, and what ingest reads, holds complete series only; a series fetched in part is left
  unrecorded and its files wait in staging: a killed or failed pull resumes there, fetching only the missing
  instances. Files of a series that the server no longer lists are removed when the series is recorded (the
  mirror equals the PACS series);
- faults: connection errors, timeouts, broken transfers, HTTP 429 and 5xx are retried ``retries`` times (default
  :data:`RETRIES`) after waiting ``backoff_s * 2**i`` seconds (default :data:`BACKOFF_S`: 1, 2, 4 s); 401/403 stop
  the pull at once. When a transient fault outlasts the retries the server is taken as gone: the pull stops asking,
  keeps every series it completed (recorded), and raises :class:`~siteadapt.errors.IncompletePullError` (exit code
  7) counting the series left incomplete and the instances they lack (the server root only). Another fault on one
  series (an instance refused with 404, a mismatching answer) leaves that series incomplete and goes on with the
  others; the error is raised at the end all the same;
- growth: a recorded series whose reported count changed (instances stored after it was pulled) is re-opened: the
  new instances are fetched and its record updated, so the mirror changes and ingest re-ingests that series;
  :func:`series_state` lets the watcher see the change too;
- stability window (as PACS routers use): the state keeps, per series hash, the count last seen and since when.
  A series is fetched only once its count has been unchanged for ``stable_seconds``; a change restarts the clock
  and the series is left for a later poll (counted as ``deferred_series``, not an error). Settings do not reach
  the pull (:func:`~siteadapt.storage.materialize` gets a location and a folder), so the window comes from the
  argument or the environment variable ``SITEADAPT_DICOMWEB_STABLE_SECONDS``; the default 0 fetches every series
  on the poll that sees it (a one-off ``siteadapt ingest``). With a window, a new series is never fetched on the
  poll that first sees it: a watcher polling more often than the window picks it up later;
- the state file beside the mirror (``<mirror>.dicomweb-state.json``) holds hashes and counts only, and is keyed to
  the query: another query starts another state;
- credentials come from the environment only: ``SITEADAPT_DICOMWEB_USER`` / ``SITEADAPT_DICOMWEB_PASSWORD`` (HTTP
  basic) or ``SITEADAPT_DICOMWEB_TOKEN`` (bearer), each also as ``<NAME>_FILE`` naming a file that holds it (a
  mounted secret, :func:`credential`); a URI with ``user:password@`` or a token in its query is refused.

Push (:func:`stow`): STOW-RS of datasets (the DICOM SEG objects of :mod:`siteadapt.steps.export`) to a DICOMweb root.

Logging: dicomweb-client logs request URLs (which carry UIDs) at INFO, urllib3 request paths at DEBUG and highdicom
dataset UIDs at INFO; :func:`quiet_libraries` caps those loggers at WARNING, and HTTP errors are re-raised with the
status code and the server root only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from ..errors import IncompletePullError, SiteadaptError
from .atomic import atomic_path, write_json
from .deid import keyed_digest

log = logging.getLogger("siteadapt.dicomweb")

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
STATE_VERSION = 1
# QIDO-RS matching keys a site URI may use (series-level search; study attributes match through their study)
FILTERS = ("StudyDate", "StudyTime", "Modality", "SeriesDescription", "BodyPartExamined", "StudyDescription",
           "InstitutionalDepartmentName", "ManufacturerModelName")
TIMEOUT = (5, 120)  # seconds: connect, read
RETRIES = 3  # retries of one request after a transient fault
BACKOFF_S = 1.0  # first wait; doubled after each further fault
STABLE_ENV = "SITEADAPT_DICOMWEB_STABLE_SECONDS"
COUNT_TAG = "00201209"  # NumberOfSeriesRelatedInstances
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class DicomwebError(SiteadaptError):
    """The PACS cannot be reached or refuses (the message names the server root and the HTTP status, no UIDs).
    ``transient``: a fault worth retrying (connection, timeout, 429, 5xx); ``http_status``: the status, if any."""

    transient: bool = False
    http_status: int | None = None


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
    """Split a ``dicomweb+http(s)://`` site URI into the service root and its QIDO-RS filters.

    A URI with credentials (``user:password@`` or a token-like query parameter such as ``access_token``) is refused
    with a message that names the host and says where credentials go; no message quotes a secret
    (:func:`siteadapt.redact.redact_uri`)."""
    from ..redact import inline_secret_message, redact_uri

    shown = redact_uri(uri) if isinstance(uri, str) else uri
    if not is_dicomweb(uri):
        raise DicomwebError(f"{shown!r}: not a dicomweb+http(s):// URI")
    parts = urlsplit(uri[len("dicomweb+"):])
    refused = inline_secret_message(f"dicomweb+{parts.scheme}://{parts.hostname}...", uri, "dicomweb")
    if refused:
        raise DicomwebError(refused)
    if not parts.hostname:
        raise DicomwebError(f"{shown!r}: no host")
    filters = []
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=False, strict_parsing=bool(parts.query))
    except ValueError:
        raise DicomwebError(f"{shown!r}: the query is not a list of KEY=VALUE filters") from None
    for k, v in pairs:
        if k not in FILTERS:
            raise DicomwebError(f"{shown!r}: unknown filter {k!r} (allowed: {', '.join(FILTERS)})")
        filters.append((k, v))
    root = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return Source(root=root, filters=tuple(sorted(filters)))


def quiet_libraries() -> None:
    """Cap the loggers that print UIDs (request paths, dataset UIDs) at WARNING: dicomweb-client, urllib3, highdicom."""
    for name in ("dicomweb_client", "urllib3.connectionpool", "highdicom"):
        lg = logging.getLogger(name)
        if lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


def credential(name: str) -> str | None:
    """The value of credential variable ``name``: ``$NAME`` when set, else the content of the file named by
    ``$NAME_FILE`` (a mounted Kubernetes secret), stripped of surrounding whitespace. An unreadable file is an error
    naming the variable, never the file's content."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as e:
        raise DicomwebError(f"${name}_FILE: cannot read the credential file ({type(e).__name__})") from None


def _session():
    """A ``requests`` session with the credentials of the environment (none when unset)."""
    import requests

    session = requests.Session()
    user, password = credential("SITEADAPT_DICOMWEB_USER"), credential("SITEADAPT_DICOMWEB_PASSWORD")
    token = credential("SITEADAPT_DICOMWEB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    return session


def client(root: str, session=None):
    """A ``DICOMwebClient`` for ``root`` on ``session`` (default: a new one with the environment's credentials)."""
    from dicomweb_client.api import DICOMwebClient

    quiet_libraries()
    return DICOMwebClient(url=root, session=session if session is not None else _session(), timeout=TIMEOUT)


def _transient(e: Exception) -> bool:
    import requests

    if isinstance(e, requests.HTTPError):
        return e.response is not None and (e.response.status_code >= 500 or e.response.status_code == 429)
    return isinstance(e, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))


def _fail(root: str, what: str, e: Exception) -> DicomwebError:
    import requests

    from ..redact import redact_uri

    root = redact_uri(root)  # a --stow root given with user:password@ or ?access_token=... is never quoted whole

    if isinstance(e, requests.HTTPError) and e.response is not None:
        code = e.response.status_code
        hint = " (set SITEADAPT_DICOMWEB_USER/PASSWORD or SITEADAPT_DICOMWEB_TOKEN)" if code in (401, 403) else ""
        err = DicomwebError(f"{root}: {what} refused with HTTP {code}{hint}")
        err.http_status = code
    elif isinstance(e, requests.ConnectionError):
        err = DicomwebError(f"{root}: cannot reach the DICOMweb server ({what})")
    else:
        err = DicomwebError(f"{root}: {what} failed: {type(e).__name__}")
    err.transient = _transient(e)
    return err


def _with_retry(fn, root: str, what: str, *, retries: int | None = None, backoff_s: float | None = None,
                sleep=None):
    """``fn()``, tried again up to ``retries`` times after a transient fault, waiting ``backoff_s * 2**i`` seconds
    before retry ``i + 1``. The last fault, or the first one that is not transient, is raised as a
    :class:`DicomwebError` (root, operation and status only: the library's text carries request URLs). Defaults:
    :data:`RETRIES`, :data:`BACKOFF_S`, :func:`time.sleep`."""
    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    sleep = sleep or time.sleep
    for attempt in range(retries + 1):
        try:
            return fn()
        except DicomwebError:
            raise
        except Exception as e:  # noqa: BLE001
            if attempt == retries or not _transient(e):
                raise _fail(root, what, e) from None
            delay = backoff_s * 2 ** attempt
            log.warning("%s: %s failed (%s); retry %d of %d in %.1f s", root, what, type(e).__name__, attempt + 1,
                        retries, delay)
            sleep(delay)


def _multipart(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` message (the whole body when it is not multipart)."""
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        return [body]
    boundary = next((v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)
                     if k.strip().lower() == "boundary"), None)
    if not boundary:
        return [body]
    parts = []
    for piece in (b"\r\n" + body).split(b"\r\n--" + boundary.encode())[1:]:
        if piece.startswith(b"--"):  # the closing delimiter
            break
        _, sep, content = piece.partition(b"\r\n\r\n")
        if sep:
            parts.append(content)
    return parts


def _retrieve_instance(session, root: str, study: str, series: str, sop: str) -> bytes:
    """WADO-RS retrieve of one instance in its stored transfer syntax: the Part 10 bytes as the server sent them."""
    r = session.get(f"{root}/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": DICOM_ACCEPT},
                    timeout=TIMEOUT)
    r.raise_for_status()
    parts = _multipart(r.headers.get("Content-Type", ""), r.content)
    if len(parts) != 1:
        raise DicomwebError(f"{root}: WADO-RS instance retrieve answered {len(parts)} parts instead of 1")
    return parts[0]


def _sop_of(data: bytes) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # noqa: BLE001
        return None
    return str(ds.get("SOPInstanceUID", "")) or None


def _hash(key: bytes, kind: str, uid: str) -> str:
    return keyed_digest(key, f"dicomweb|{kind}|{uid}")[:16]


def _value(item: dict, tag: str) -> str | None:
    v = item.get(tag, {}).get("Value")
    return str(v[0]) if v else None


def _count(item: dict) -> int | None:
    v = _value(item, COUNT_TAG)
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def state_path(mirror: str | Path) -> Path:
    mirror = Path(mirror)
    return mirror.with_name(mirror.name + ".dicomweb-state.json")


def partial_path(mirror: str | Path) -> Path:
    """The staging folder beside ``mirror`` where series wait until they are complete."""
    mirror = Path(mirror)
    return mirror.with_name(mirror.name + ".dicomweb-partial")


def _load_state(path: Path, query: str) -> dict:
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("version") == STATE_VERSION and state.get("query") == query:
            state.setdefault("seen", {})
            return state
        log.warning("%s: state of another query or version; starting a new one", path.name)
    return {"version": STATE_VERSION, "query": query, "series": {}, "seen": {}}


def _stable_seconds(value) -> float:
    if value is None:
        raw = os.environ.get(STABLE_ENV, "").strip()
        if not raw:
            return 0.0
        try:
            value = float(raw)
        except ValueError:
            raise DicomwebError(f"{STABLE_ENV}={raw!r}: not a number of seconds") from None
    value = float(value)
    if not value >= 0:
        raise DicomwebError(f"stable window {value!r}: must be 0 or more seconds")
    return value


def _names(folder: Path) -> set[str]:
    """Instance hashes of the complete ``.dcm`` files in ``folder`` (temporary files of a killed write excluded)."""
    return {p.stem for p in folder.glob("*.dcm")} if folder.is_dir() else set()


def _prune(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to (and including) ``stop`` while they are empty."""
    while folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        if folder == stop:
            return
        folder = folder.parent


def _commit(stage: Path, final: Path, names: set[str], staging: Path) -> None:
    """Move a complete series from ``stage`` into ``final`` and drop files of instances the server no longer lists."""
    if stage.is_dir():
        for p in stage.iterdir():  # temporary files of a killed write
            if not p.name.endswith(".dcm"):
                p.unlink()
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage, final)  # the whole series appears at once
        else:
            for p in sorted(stage.glob("*.dcm")):
                os.replace(p, final / p.name)
        _prune(stage.parent if not stage.exists() else stage, staging)
    for p in (final.iterdir() if final.is_dir() else ()):
        if p.is_file() and (not p.name.endswith(".dcm") or p.stem not in names):
            p.unlink()


def pull(uri: str, mirror: str | Path, *, key: bytes | None = None, stable_seconds: float | None = None,
         retries: int | None = None, backoff_s: float | None = None, sleep=None, clock=None) -> dict:
    """Bring ``mirror`` up to date with the series matching ``uri``; returns counts (no identifiers).

    ``key``: the de-identification key for the hashed names (default: :func:`siteadapt.io.deid.load_key`).
    ``stable_seconds``: the stability window (default: ``SITEADAPT_DICOMWEB_STABLE_SECONDS``, else 0).
    ``retries``/``backoff_s``/``sleep``: retries of a transient fault and their waits (default :data:`RETRIES`,
    :data:`BACKOFF_S`, :func:`time.sleep`, read when called); ``clock``: the time source of the window (default
    :func:`time.time`). Raises :class:`~siteadapt.errors.IncompletePullError` after recording every series it completed
    when some series stay incomplete (see the module text)."""
    from .deid import load_key

    src = parse(uri)
    key = key or load_key()
    stable = _stable_seconds(stable_seconds)
    mirror = Path(mirror)
    spath, staging = state_path(mirror), partial_path(mirror)
    query = keyed_digest(key, src.display)[:16]
    state = _load_state(spath, query)
    done: dict = state["series"]
    seen: dict = state["seen"]
    session = _session()
    dw = client(src.root, session)

    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    sleep, clock = sleep or time.sleep, clock or time.time

    def call(fn, what):
        return _with_retry(fn, src.root, what, retries=retries, backoff_s=backoff_s, sleep=sleep)

    def listing(study, series):
        items = call(lambda: dw.search_for_instances(study, series, fields=["SOPInstanceUID"], get_remaining=True),
                     "QIDO-RS instance search")
        return {_hash(key, "instance", s): s for s in (_value(it, "00080018") for it in items) if s}

    t0 = time.perf_counter()
    found = call(lambda: dw.search_for_series(search_filters=dict(src.filters), get_remaining=True,
                                              fields=["StudyInstanceUID", "SeriesInstanceUID", COUNT_TAG]),
                 "QIDO-RS series search")
    now = clock()
    matched: dict[str, tuple[str, str, int | None]] = {}
    for item in found:
        study, series = _value(item, "0020000D"), _value(item, "0020000E")
        if study and series:
            matched[_hash(key, "series", series)] = (study, series, _count(item))
    for hs in [h for h in seen if h not in matched]:
        del seen[hs]

    studies_new: set[str] = set()
    recorded = fetched = deferred = missing = 0
    incomplete: list[str] = []
    down: DicomwebError | None = None  # a transient fault outlasted the retries: the server is gone for this pull
    for hs, (study, series, reported) in sorted(matched.items()):
        rec = done.get(hs)
        if reported is not None and rec and rec.get("instances") == reported:
            seen.pop(hs, None)  # up to date
            continue
        hst = _hash(key, "study", study)
        final, stage = mirror / hst / hs, staging / hst / hs
        names: dict[str, str] | None = None
        count = reported
        try:
            if count is None:  # the server reports no count: the instance list is the count
                if down is not None:
                    raise down
                names = listing(study, series)
                count = len(names)
                if rec and rec.get("instances") == count and set(names) <= _names(final):
                    seen.pop(hs, None)
                    continue
            if seen.get(hs, {}).get("count") != count:
                seen[hs] = {"count": count, "since": round(now, 3)}
            if stable > 0 and now - seen[hs]["since"] < stable:
                deferred += 1  # changed within the window: a later poll takes it
                continue
            if down is not None:
                raise down
            if names is None:
                names = listing(study, series)
            have = _names(final) | _names(stage)
            for h in sorted(set(names) - have):
                sop = names[h]
                data = call(lambda: _retrieve_instance(session, src.root, study, series, sop),
                            "WADO-RS instance retrieve")
                if _sop_of(data) != sop:
                    raise DicomwebError(f"{src.root}: WADO-RS instance retrieve answered a file that is not the "
                                        "instance asked for")
                with atomic_path(stage / f"{h}.dcm", suffix="") as tmp:
                    tmp.write_bytes(data)
                fetched += 1
        except DicomwebError as e:
            if e.http_status in (401, 403):
                raise
            if e.transient and down is None:
                down = e
                log.error("%s: the server stopped answering; series not complete yet are left for the next pull",
                          src.root)
            elif not e.transient:
                log.error("%s: one series left incomplete: %s", src.root, e)
        on_disk = (_names(final) | _names(stage)) & set(names or ())
        if names is not None and len(on_disk) == len(names) == count:
            _commit(stage, final, set(names), staging)
            done[hs] = {"study": hst, "instances": count, "at": round(now, 3)}
            seen.pop(hs, None)
            write_json(spath, state)  # this series is complete: recorded before the next one is fetched
            recorded += 1
            studies_new.add(hst)
        else:
            incomplete.append(hs)
            want = count if count is not None else (len(names) if names is not None else 0)
            missing += max(want - len(on_disk), 0)
    write_json(spath, state)
    mirror.mkdir(parents=True, exist_ok=True)
    res = {"matched_series": len(matched), "fetched_series": recorded, "fetched_studies": len(studies_new),
           "instances": fetched, "deferred_series": deferred, "incomplete_series": len(incomplete),
           "missing_instances": missing, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("%s -> %s: %d series match, %d series completed (%d studies, %d instances fetched), %d deferred by the "
             "%g s stability window, %d incomplete", src.display, mirror, res["matched_series"], recorded,
             len(studies_new), fetched, deferred, stable, len(incomplete))
    if incomplete:
        raise IncompletePullError(
            f"{src.root}: {len(incomplete)} series incomplete ({missing} instances missing); {recorded} series "
            f"completed and recorded, {deferred} deferred; the next pull fetches only what is missing")
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
    """Sorted keyed hashes of the studies with a series matching ``uri`` (no UID kept). ``siteadapt watch`` compares
    :func:`series_state` instead, which also sees a new series or instances added to a series."""
    from .deid import load_key

    src = parse(uri)
    key = key or load_key()
    try:
        found = client(src.root).search_for_series(search_filters=dict(src.filters), get_remaining=True,
                                                   fields=["StudyInstanceUID"])
    except Exception as e:  # noqa: BLE001
        raise _fail(src.root, "QIDO-RS series search", e) from None
    return sorted({_hash(key, "study", s) for s in (_value(it, "0020000D") for it in found) if s})


def series_state(uri: str, *, key: bytes | None = None) -> list[str]:
    """Sorted ``<study hash>/<series hash>=<instance count>`` entries of the series matching ``uri`` (one QIDO-RS
    search, retried on transient faults): what ``siteadapt watch`` compares between polls, so that a new study, a new
    series and a series still receiving instances all read as a change. Hashes and counts only."""
    from .deid import load_key

    src = parse(uri)
    key = key or load_key()
    found = _with_retry(lambda: client(src.root).search_for_series(
        search_filters=dict(src.filters), get_remaining=True,
        fields=["StudyInstanceUID", "SeriesInstanceUID", COUNT_TAG]), src.root, "QIDO-RS series search")
    out = set()
    for it in found:
        study, series = _value(it, "0020000D"), _value(it, "0020000E")
        if study and series:
            count = _count(it)
            out.add(f"{_hash(key, 'study', study)}/{_hash(key, 'series', series)}="
                    f"{'?' if count is None else count}")
    return sorted(out)
