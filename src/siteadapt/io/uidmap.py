"""The site-local key file that links pseudonymous ids back to the original DICOM UIDs (for ``siteadapt export``).

Ingest writes only de-identified NIfTI named by anonymous ids (:mod:`siteadapt.io.deid`). To push a result back to
the PACS, the export has to reference the source series as it was ingested: StudyInstanceUID, SeriesInstanceUID,
FrameOfReferenceUID and the SOPInstanceUID of every slice. :func:`record` keeps them, per anonymous id, in

    ``<key folder>/uids/<site>.json``

where the key folder is ``$SITEADAPT_UID_MAP_DIR``, else the folder of ``$SITEADAPT_DEID_KEY_FILE``, else
``.siteadapt/`` (beside ``deid.key``; git-ignored, never a DVC output). The file is written atomically with mode 0600,
refused inside the data root (like the key), and never logged, exported or tracked: it is as sensitive as the key.
It also names the source files (absolute paths) so that the export can read the original headers again.

Ingest calls :func:`record` once per run with the DICOM items it kept (a one-line hook); series whose input
fingerprint did not change are not read again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("siteadapt.uidmap")

VERSION = 1


def folder() -> Path:
    env = os.environ.get("SITEADAPT_UID_MAP_DIR")
    if env:
        return Path(env)
    key_file = os.environ.get("SITEADAPT_DEID_KEY_FILE")
    return (Path(key_file).parent if key_file else Path(".siteadapt")) / "uids"


def path_for(site: str, data_root: str | Path | None = None) -> Path:
    p = folder() / f"{site}.json"
    if data_root is not None:
        root, kp = Path(data_root).resolve(), p.resolve()
        if root in kp.parents:
            raise ConfigError(f"UID key file {p} lies inside the output tree {data_root}: keep it beside the "
                              "de-identification key, outside the outputs (SITEADAPT_UID_MAP_DIR)")
    return p


def load(site: str) -> dict:
    """``{id: {"study", "series", "frame_of_reference", "instances": [{"sop", "file"}], "fingerprint"}}``."""
    p = path_for(site)
    if not p.is_file():
        return {}
    return json.loads(p.read_text()).get("items", {})


def _read_series(files) -> dict:
    import pydicom

    inst, first = [], None
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        first = first or ds
        inst.append({"sop": str(ds.get("SOPInstanceUID", "")), "file": str(Path(f).resolve())})
    return {"study": str(first.get("StudyInstanceUID", "")), "series": str(first.get("SeriesInstanceUID", "")),
            "frame_of_reference": str(first.get("FrameOfReferenceUID", "")),
            "sop_class": str(first.get("SOPClassUID", "")), "instances": inst}


def record(site: str, data_root: str | Path, series: list[tuple[str, str, list]]) -> Path | None:
    """Record the original UIDs of the DICOM series ``[(id, input fingerprint, files)]`` of one ingest of ``site``
    (the items of that run: ids no longer ingested are dropped). Nothing is written for a site without DICOM."""
    p = path_for(site, data_root)
    old = load(site) if p.is_file() else {}
    if not series and not old:
        return None
    items = {}
    for cid, fingerprint, files in series:
        prev = old.get(cid)
        if prev and prev.get("fingerprint") == fingerprint and all(Path(i["file"]).is_file()
                                                                  for i in prev["instances"]):
            items[cid] = prev
            continue
        try:
            items[cid] = {**_read_series(files), "fingerprint": fingerprint}
        except Exception as e:  # noqa: BLE001 (the series was just ingested; export will say what is missing)
            log.warning("%s: %s: original UIDs not recorded (%s)", site, cid, type(e).__name__)
    if items == old and p.is_file():
        return p
    from .atomic import atomic_path

    p.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    with atomic_path(p, suffix="") as tmp:  # mkstemp: mode 0600 from the start
        tmp.write_text(json.dumps({"version": VERSION, "site": site, "items": items}, indent=1, sort_keys=True))
    os.chmod(p, 0o600)
    return p
