"""Export step: a method's label maps on a PACS site -> one DICOM SEG per subject (highdicom), optionally STOW-RS.

``siteadapt export --site T --method M --format seg [--stow URL]`` takes the predictions of ``predict`` (label maps on
each subject's original grid, ``<predictions>/<T>/<M>/<id>.nii.gz``, the test subjects by default) and writes
``<out>/<id>.dcm`` (default ``<data root>/export/<T>/<M>/``): a binary DICOM Segmentation of the original series.

Choices it follows:

- **Source series as ingested.** The original StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID and the
  SOPInstanceUID of each slice come from the site-local UID key file (:mod:`siteadapt.io.uidmap`, recorded by
  ingest), and the headers from the source files it names (for a PACS site whose files are gone: WADO-RS series
  metadata from the PACS); the SEG is built with highdicom from those headers, so it joins the original study,
  patient and frame of reference, and references every source instance. Where the key file is not at hand (the
  Kubeflow export step runs in a fresh pod), ``from_pacs`` rebuilds the same record from the PACS: the site's
  QIDO-RS query, WADO-RS metadata and the anonymous ids recomputed with the de-identification key
  (:func:`pacs_uid_record`).
- **Voxel-exact mapping.** Each pixel centre of each source slice is located in the prediction's voxel grid through
  the DICOM geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing; LPS -> RAS as ingest built the
  affine); it must land on a voxel centre (within 1e-3 voxel) or the export refuses the subject. No resampling.
- **Segments** are the task's structures in label-id order (segment k = k-th structure), each with a SNOMED CT
  category and property type from :func:`structure_code_table` (pydicom's ``codes`` where the concept is there,
  otherwise the SNOMED CT code itself); a structure without an entry is exported as SCT "Anatomical structure" with
  its name as the segment label.
- **Algorithm identification** (every segment, type AUTOMATIC): name = the method, family = DCM "Artificial
  Intelligence", version = siteadapt's version + the model registry version (``--model-version``, else the
  MLflow registry version carrying alias ``champion`` or ``candidate`` for this method, else ``unregistered``).
- **SEG UIDs follow the content** (keyed hash of id, method, version and a SHA-256 digest of the label values on
  each source instance, :func:`content_digest`): exporting the same result again gives the same SeriesInstanceUID
  and SOPInstanceUID, so a second STOW stores no duplicate; a prediction that changed (even under the same model
  version) or a new model version gives a new SEG series, so a PACS that keeps the first copy of an instance never
  hides the new result behind the old one.
- **One orientation within a tolerance.** Scanners write ImageOrientationPatient per slice, and some (GE) write
  values that differ in the last digits between slices of one stack; highdicom compares them as exact strings. The
  export accepts a series whose direction cosines agree within :data:`ORIENTATION_TOLERANCE` (1e-4 per component,
  the tolerance dcm2niix stacks slices with) and gives highdicom in-memory copies of the headers carrying the
  series' most frequent value (the files are never changed); the labels are still placed with each slice's own
  geometry. A series whose slices really differ is refused with its anonymous id.
- **Library messages are scrubbed.** highdicom and pydicom quote header values (e.g. a PatientName that does not
  look like a person name) in warnings and log records; during a subject's export their warnings are caught and
  logged again with identifier values and quoted strings replaced, and their log records are rewritten the same way.
- **No identifier outside the SEG.** File names are the anonymous ids; logs and ``export.json`` carry ids, counts and
  segment names only. The SEG itself carries the patient/study module of its source (it goes back into that
  patient's record in the PACS): keep the export folder with the same care as the source DICOM (it is not a DVC
  output and the pipeline never uploads it anywhere but to ``--stow``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import Settings
from ..errors import InputError, SiteadaptError
from ..io.deid import Scrubber, keyed_digest

log = logging.getLogger("siteadapt.export")


class ExportError(SiteadaptError):
    """A subject cannot be exported (missing UID record, source files or a grid that does not match)."""


def _sct(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, "SCT", meaning)


def structure_code_table() -> dict:
    """``{structure name: (segmented property category, segmented property type)}`` for the tasks' structures."""
    from pydicom.sr.codedict import codes

    anat = codes.SCT.AnatomicalStructure
    return {
        # cardiac (MM-WHS / SIFA label ids): left ventricle myocardium, left atrium / left ventricle blood cavities,
        # ascending aorta
        "MYO": (codes.SCT.Tissue, codes.SCT.LeftVentricleMyocardium),
        "LAC": (anat, codes.SCT.LeftAtrium),
        "LVC": (anat, codes.SCT.LeftVentricle),
        "AA": (anat, codes.SCT.AscendingAorta),
        # chest X-ray lungs
        "right_lung": (anat, _sct("3341006", "Right lung")),
        "left_lung": (anat, _sct("44029006", "Left lung")),
    }


def structure_codes(name: str):
    """``(category, property type)`` coded concepts of a task structure (see the module docstring)."""
    table = structure_code_table()
    if name in table:
        return table[name]
    from pydicom.sr.codedict import codes

    return codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure



def labels_on_source(pred: np.ndarray, affine: np.ndarray, datasets) -> np.ndarray:
    """The label map ``pred`` (NIfTI order, voxel -> RAS ``affine``) on the source slices, ``(n, rows, cols)`` in the
    order of ``datasets``; raises :class:`ExportError` when a pixel centre is not a voxel centre of ``pred``."""
    inv = np.linalg.inv(np.asarray(affine, float))
    out = []
    for n, ds in enumerate(datasets):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "ImagePositionPatient" not in ds:
            raise ExportError(f"slice {n}: only single-frame source images with slice geometry can be exported "
                              "(multi-frame and projection images: not yet)")
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        rows, cols = int(ds.Rows), int(ds.Columns)
        m, k = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = ipp[None, None] + k[..., None] * dc * iop[None, None, :3] + m[..., None] * dr * iop[None, None, 3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk)
        err = float(np.abs(ijk - idx).max())
        idx = idx.astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(pred.shape[:3])), axis=-1)
        if err > 1e-3 or not inside.all():
            raise ExportError(f"slice {n}: the source geometry does not fall on the prediction's voxel grid "
                              f"(off by {err:.3g} voxel, {int((~inside).sum())} pixels outside)")
        out.append(pred[idx[..., 0], idx[..., 1], idx[..., 2]])
    return np.stack(out).astype(np.uint8)


# Largest difference, per direction cosine component, between the ImageOrientationPatient of two slices that are still
# one stack. dcm2niix stacks slices whose orientation components agree within 1e-4 (its GE kludge); at 1e-4 the
# shared orientation moves the far edge of a 512-pixel row by at most 0.05 pixel, while the per-slice jitter scanners
# write is far below it (the real GE oblique series in ../shared/data: 6.5e-8). highdicom itself calls orientations
# equal within 1e-5 when it compares a SEG's to its source's (but demands identical strings among the sources).
ORIENTATION_TOLERANCE = 1e-4


def shared_orientation(datasets, name: str, tol: float = ORIENTATION_TOLERANCE) -> list:
    """``datasets`` with one shared ImageOrientationPatient, as highdicom needs for a SEG of single-frame images.

    When the slices' values are already identical (or no slice has one) ``datasets`` is returned as it is. When they
    differ by at most ``tol`` per component, a list is returned in which each differing dataset is replaced by a
    copy carrying the value most slices have (ties: the smallest in string order, so the choice does not depend on
    the order of the slices); the inputs are left untouched. Larger differences raise :class:`ExportError` naming
    ``name`` (a series' anonymous id, never a path)."""
    values = [tuple(str(v) for v in ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None
              for ds in datasets]
    present = [v for v in values if v is not None]
    if not present or len(set(values)) == 1:
        return list(datasets)
    if len(present) != len(values):
        raise ExportError(f"{name}: {len(values) - len(present)} of {len(values)} source slices have no "
                          "ImageOrientationPatient")
    arr = np.array([[float(x) for x in v] for v in present])
    counts = Counter(present)
    best = max(counts.values())
    shared = min(v for v, c in counts.items() if c == best)
    spread = float(np.abs(arr - np.array([float(x) for x in shared])).max())
    if not spread <= tol:
        raise ExportError(f"{name}: the source slices' orientations differ by up to {spread:.3g} per direction "
                          f"cosine (more than the {tol:g} tolerance); a DICOM SEG needs one orientation for the "
                          "whole series")
    out = []
    for ds, v in zip(datasets, values):
        if v != shared:
            ds = copy.deepcopy(ds)  # (a shallow copy of a pydicom Dataset shares its element dict)
            ds.ImageOrientationPatient = list(shared)
        out.append(ds)
    log.debug("%s: %d of %d slice orientations set to the series' shared value (spread %.3g)", name,
              sum(v != shared for v in values), len(values), spread)
    return out


def content_digest(datasets, labels: np.ndarray, structures: dict[str, int]) -> str:
    """SHA-256 (hex) of what a SEG says: the task's structures and the label values on each source instance.

    The slices are taken in SOPInstanceUID order, so the digest does not depend on the order the headers came in
    (UID key file or PACS metadata); equal predictions give equal digests, any changed voxel another one."""
    h = hashlib.sha256()
    h.update(repr(sorted((str(k), int(v)) for k, v in structures.items())).encode())
    sops = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    labels = np.asarray(labels)
    if labels.shape[0] != len(sops):
        raise ValueError(f"{labels.shape[0]} label slices for {len(sops)} source instances")
    for n in sorted(range(len(sops)), key=lambda i: sops[i]):
        sl = np.ascontiguousarray(labels[n], dtype=np.uint8)
        h.update(f"|{sops[n]}|{sl.shape[0]}x{sl.shape[1]}|".encode())
        h.update(sl.tobytes())
    return h.hexdigest()


_LIBRARIES = ("highdicom", "pydicom")
_QUOTED = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'")


def _scrub_library_text(scrub: Scrubber, text: str) -> str:
    """A library message without identifiers: collected header values, then every quoted string, replaced."""
    return _QUOTED.sub(lambda m: m.group(0)[0] + "[redacted]" + m.group(0)[0], scrub(str(text)))


@contextlib.contextmanager
def library_messages(name: str, scrub: Scrubber):
    """Keep header values that highdicom and pydicom quote out of warnings and logs while exporting ``name``.

    Warnings raised inside are caught and, on leaving, logged once each on ``siteadapt.export`` with identifiers
    removed (``scrub``'s values, which may still be added to inside, and any quoted string). Log records of the
    ``highdicom`` and ``pydicom`` loggers created inside are rewritten the same way when they are made."""
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        if record.name.split(".")[0] in _LIBRARIES:
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 (a malformed library record: keep only its format string)
                text = str(record.msg)
            record.msg, record.args = _scrub_library_text(scrub, text), ()
        return record

    logging.setLogRecordFactory(factory)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logging.setLogRecordFactory(previous)
        seen = set()
        for w in caught:
            text = _scrub_library_text(scrub, str(w.message))
            if (w.category, text) not in seen:
                seen.add((w.category, text))
                log.warning("%s: %s: %s", name, w.category.__name__, text)


def _source_datasets(entry: dict, cid: str, pacs: str | None = None) -> list:
    """The source headers, in the order of the UID record: read from the files it names, or, when those are gone
    and the site is a PACS (``pacs``: its DICOMweb URI), from the PACS as WADO-RS series metadata."""
    import pydicom

    missing = [i for i in entry["instances"] if not (i.get("file") and Path(i["file"]).is_file())]
    if not missing:
        return [pydicom.dcmread(i["file"], stop_before_pixels=True) for i in entry["instances"]]
    if pacs is None:
        raise ExportError(f"{cid}: {len(missing)} of {len(entry['instances'])} source files are gone; ingest the "
                          "site again")
    from ..io import dicomweb

    root = dicomweb.parse(pacs).root
    by_sop = {str(ds.get("SOPInstanceUID", "")): ds
              for ds in _metadata_datasets(dicomweb.client(root), root, entry["study"], entry["series"])}
    absent = [i for i in entry["instances"] if i["sop"] not in by_sop]
    if absent:
        raise ExportError(f"{cid}: {len(absent)} of {len(entry['instances'])} source instances are no longer on "
                          "the PACS")
    return [by_sop[i["sop"]] for i in entry["instances"]]


def _metadata_datasets(dw, root: str, study: str, series: str) -> list:
    """WADO-RS series metadata as header-only pydicom datasets (bulk data such as PixelData left empty)."""
    import pydicom

    from ..io import dicomweb

    try:
        meta = dw.retrieve_series_metadata(study, series)
    except Exception as e:  # noqa: BLE001
        raise dicomweb._fail(root, "WADO-RS series metadata", e) from None
    return [pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda *a: b"") for item in meta]


def pacs_uid_record(uri: str, site: str, subjects, key: bytes) -> tuple[dict, dict]:
    """The UID record of ``subjects`` rebuilt from the PACS, without the site-local key file: ``(record, headers)``
    with ``record`` in :func:`siteadapt.io.uidmap.load`'s shape (no source files) and ``headers`` the source
    datasets per id.

    Anonymous ids are keyed hashes of the series identity (:func:`siteadapt.io.deid.anon_id`), so they are computed
    again rather than looked up: a QIDO-RS series search with the site's own query (``uri``) lists the candidate
    series, the WADO-RS metadata of a series gives its headers, :func:`siteadapt.io.dicom.series_identities` groups
    them as ingest did (a SeriesInstanceUID, or its split parts), and an identity whose keyed id is a subject is that
    subject's series. Series whose plain SeriesInstanceUID gives a subject's id are read first; the metadata of the
    other series is read only while subjects are still unmatched (a series ingest split has suffixed ids). Needs the
    de-identification key and the site name of the ingest; an id not found is left out (the caller decides)."""
    from ..io import dicomweb
    from ..io.deid import anon_id
    from ..io.dicom import series_identities

    src = dicomweb.parse(uri)
    dw = dicomweb.client(src.root)
    try:
        found = dw.search_for_series(search_filters=dict(src.filters), get_remaining=True,
                                     fields=["StudyInstanceUID", "SeriesInstanceUID"])
    except Exception as e:  # noqa: BLE001
        raise dicomweb._fail(src.root, "QIDO-RS series search", e) from None
    wanted = set(subjects)
    pairs = {(dicomweb._value(it, "0020000D"), dicomweb._value(it, "0020000E")) for it in found}
    pairs = sorted(((st, se) for st, se in pairs if st and se),
                   key=lambda p: (anon_id(key, site, "dicom", p[1]) not in wanted, p))
    record, headers = {}, {}
    for study, series in pairs:
        if anon_id(key, site, "dicom", series) not in wanted and not wanted - set(record):
            break  # every subject found; the rest (train/val series, other results) need not be read
        for identity, datasets in series_identities(_metadata_datasets(dw, src.root, study, series)):
            cid = anon_id(key, site, "dicom", identity)
            if cid not in wanted or cid in record:
                continue
            # in the order of the UID key file for a pulled site (files named by the keyed hash of the SOP UID):
            # the SEG's frames come out as `siteadapt export` writes them
            datasets = sorted(datasets, key=lambda d: dicomweb._hash(key, "instance", str(d.get("SOPInstanceUID"))))
            first = datasets[0]
            record[cid] = {"study": study, "series": series,
                           "frame_of_reference": str(first.get("FrameOfReferenceUID", "")),
                           "sop_class": str(first.get("SOPClassUID", "")),
                           "instances": [{"sop": str(d.get("SOPInstanceUID", ""))} for d in datasets]}
            headers[cid] = datasets
    log.info("%s: %d of %d subjects found on the PACS (%d series searched)", site, len(record), len(wanted),
             len(pairs))
    return record, headers


def registry_version(settings: Settings, site: str, method: str) -> str | None:
    """The MLflow registry version of ``method`` on ``site`` (alias champion, else candidate); None when unknown."""
    from .. import tracking

    if not tracking.enabled():
        return None
    try:
        from .register import model_name

        client = tracking.connect()
        name = model_name(settings.site(site).task, site)
        for alias in ("champion", "candidate"):
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except Exception:  # noqa: BLE001 (no such alias / model)
                continue
            if (mv.tags or {}).get("method") in (None, method):
                return str(mv.version)
    except Exception as e:  # noqa: BLE001 (the export does not need the registry)
        log.warning("%s/%s: registry version unknown (%s)", site, method, type(e).__name__)
    return None


_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _uid(key: bytes, *parts) -> str:
    from pydicom.uid import generate_uid

    mac = keyed_digest(key, "|".join(map(str, parts)))
    return generate_uid(entropy_srcs=[mac])


def build_seg(datasets, labels: np.ndarray, structures: dict[str, int], *, method: str, version: str,
              series_uid: str, sop_uid: str, name: str = "series"):
    """A binary highdicom Segmentation of ``datasets`` from the label map ``labels`` ``(n, rows, cols)``.

    Slices whose orientations differ within :data:`ORIENTATION_TOLERANCE` are given one shared value first
    (:func:`shared_orientation`; ``name`` names the series in its refusal)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__
    from ..io.dicomweb import quiet_libraries

    quiet_libraries()  # highdicom logs the source datasets' UIDs at INFO
    datasets = shared_orientation(datasets, name)
    for ds in datasets:  # type 2 attributes that highdicom copies and some exports leave out: present, empty
        for kw in _TYPE2:
            if kw not in ds:
                setattr(ds, kw, None)

    order = sorted(structures.items(), key=lambda kv: kv[1])
    seg_arr = np.zeros(labels.shape, np.uint8)
    algo = hd.AlgorithmIdentificationSequence(name=method, family=codes.DCM.ArtificialIntelligence, version=version,
                                              source="siteadapt")
    descs = []
    for number, (name, lid) in enumerate(order, start=1):
        seg_arr[labels == lid] = number
        category, prop = structure_codes(name)
        descs.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo))
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=seg_arr, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=series_uid, series_number=9901, sop_instance_uid=sop_uid,
        instance_number=1, manufacturer="siteadapt", manufacturer_model_name=method,
        software_versions=f"siteadapt {__version__}", device_serial_number="siteadapt",
        series_description=f"siteadapt {method} {version}"[:64], omit_empty_frames=False,
        content_label="SITEADAPT", content_description=f"{method} segmentation"[:64])


def export(settings: Settings, site: str, method: str, *, fmt: str = "seg", out: str | Path | None = None,
           stow: str | None = None, model_version: str | None = None, seed: int | None = None,
           from_pacs: bool = False) -> dict:
    """Write one DICOM SEG per predicted subject of ``site`` / ``method`` and STOW-RS them to ``stow`` when given.
    Returns ``{"site", "method", "version", "out", "subjects": [...], "stored"}`` (anonymous ids only).

    ``from_pacs``: the original UIDs and headers come from the PACS the site's ``images`` URI names
    (:func:`pacs_uid_record`), not from the site-local UID key file: for a machine that did not ingest the site (a
    Kubeflow step in a fresh pod)."""
    import nibabel as nib

    from .. import __version__
    from ..io import dicomweb, uidmap
    from ..io.atomic import atomic_path, write_json
    from ..io.deid import load_key
    from .train import run_name

    if fmt != "seg":
        raise ExportError(f"unknown export format {fmt!r} (supported: seg)")
    task = settings.task_of(site)
    if task.kind != "segmentation":
        raise ExportError(f"site {site}: task {settings.site(site).task} is a {task.kind} task; SEG export needs "
                          "a segmentation task")
    pred_dir = settings.paths.predictions / site / run_name(settings, method, seed)
    listing = pred_dir / "predictions.json"
    if not listing.is_file():
        raise InputError(listing, f"no predictions: run `siteadapt predict --site {site} --method {method}` first")
    import json

    subjects = json.loads(listing.read_text())["subjects"]
    images = settings.site(site).images
    pacs = str(images) if dicomweb.is_dicomweb(str(images)) else None
    registered = model_version or registry_version(settings, site, method) or "unregistered"
    version = f"{__version__}+model.{registered}"
    key = load_key()
    headers: dict = {}
    scrub = Scrubber()  # identifier values of every source header read: kept out of library warnings and logs
    if from_pacs:
        if pacs is None:
            raise ExportError(f"site {site}: its images are not a dicomweb+http(s):// URI; the UIDs can only be "
                              "rebuilt from a PACS")
        with library_messages(site, scrub):
            ids, headers = pacs_uid_record(pacs, site, subjects, key)
            for datasets in headers.values():
                for ds in datasets:
                    scrub.add_dataset(ds)
        gone = [c for c in subjects if c not in ids]
        if gone:
            raise ExportError(f"{len(gone)} of {len(subjects)} subjects ({', '.join(gone[:5])}) are not on the PACS "
                              f"under the site's query (deleted since, or ingested as another site name or with "
                              "another de-identification key)")
    else:
        ids = uidmap.load(site)
    out = Path(out) if out else settings.paths.ingested.parent / "export" / site / run_name(settings, method, seed)
    written, segs = [], []
    for cid in subjects:
        entry = ids.get(cid)
        if entry is None:
            raise ExportError(f"{cid}: no original UIDs on record for site {site} (not a DICOM series, or ingested "
                              f"before the UID key file existed: run `siteadapt ingest --site {site}` again)")
        with library_messages(cid, scrub):
            datasets = headers.get(cid) or _source_datasets(entry, cid, pacs)
            for ds in datasets:
                scrub.add_dataset(ds)
            # refused here, before the labels are placed, so that a series whose slices really are not one stack
            # is named as such; labels_on_source still uses each slice's own orientation
            shared = shared_orientation(datasets, cid)
            img = nib.load(str(pred_dir / f"{cid}.nii.gz"))
            pred = np.asarray(img.dataobj).astype(np.uint8)
            try:
                labels = labels_on_source(pred, img.affine, datasets)
            except ExportError as e:
                raise ExportError(f"{cid}: {e}") from None
            digest = content_digest(datasets, labels, task.structures)
            seg = build_seg(shared, labels, task.structures, method=method, version=version, name=cid,
                            series_uid=_uid(key, "seg-series", site, cid, method, version, digest),
                            sop_uid=_uid(key, "seg-instance", site, cid, method, version, digest))
            with atomic_path(out / f"{cid}.dcm", suffix="") as tmp:
                seg.save_as(tmp)
        written.append({"id": cid, "file": f"{cid}.dcm", "frames": int(seg.NumberOfFrames),
                        "segments": [s.SegmentLabel for s in seg.SegmentSequence], "content": digest[:16]})
        segs.append(seg)
        log.info("%s/%s: %s -> SEG (%d frames)", site, method, cid, int(seg.NumberOfFrames))
    stored = 0
    if stow:
        from ..io.dicomweb import stow as stow_rs

        with library_messages(site, scrub):
            stored = stow_rs(stow, segs)
        log.info("%s/%s: %d SEG stored over STOW-RS", site, method, stored)
    result = {"site": site, "method": method, "version": version, "format": fmt, "out": str(out),
              "subjects": written, "stored": stored}
    write_json(out / "export.json", {k: v for k, v in result.items() if k != "out"})
    return result
