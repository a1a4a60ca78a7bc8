"""Ingest step: a site's folder of DICOM / NIfTI / 2D images (+ labels) -> de-identified NIfTI + manifest.json.

Output under ``<data_root>/<site>/``::

    images/<id>.nii.gz     one per DICOM series, NIfTI file or 2D image (<id> = keyed anonymous id)
    labels/<id>.nii.gz     when a label file matched (same grid as the image)
    manifest.json          items (id, modality, shape, spacing, orientation, sha256, paths) and rejected inputs

Rules:
- The input tree is only read. Every output file is written under a temporary name and renamed.
- An input that cannot be used is listed in ``rejected`` with the file (relative to the input root, identifiers
  redacted) and the reason; the rest of the site still ingests.
- Re-running on the same input rewrites nothing: each item remembers a fingerprint of its input files (relative path,
  size, modification time, hashed) and the sha256 of its outputs; an item is re-read only when these changed.
- No identifier reaches outputs or logs: file names are anonymous ids, NIfTI headers carry geometry only, the manifest
  holds no UIDs, names, dates or input paths of used files; log lines name items by anonymous id.

Label matching: a label file (NIfTI or PNG/TIFF) is matched by its file stem: for NIfTI and 2D images, the image's own
stem; for DICOM series, in order, the name of the folder holding the series, its AccessionNumber, PatientID or StudyID.

Image-level labels (classification tasks, ``classes=[negative, positive]``): either a CSV file ``labels`` with a header
``stem,label`` (``label`` a class name, case-insensitive, or its index; ``stem`` matched as above, a file extension
is ignored), or, without a CSV, one folder per class: an image's class is the name of the nearest folder above it (under
the input root) that equals a class name, case-insensitively (``NORMAL/``, ``pneumonia/``, ``train/PNEUMONIA/``...).
The manifest item gets ``class_label`` (index), ``class_name`` and ``class_source`` (``csv`` or ``folder``); an image
without a class is ingested unlabeled. CSV rows that match no image, name an unknown class or repeat an image are
listed in ``rejected`` by line number (never by stem: stems are often patient ids).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import files as F
from ..io.atomic import remove_stale_temps, sha256_file, write_json
from ..io.deid import Scrubber, anon_id, load_key
from ..io.volume import Volume, save_nifti

log = logging.getLogger("siteadapt.ingest")

MANIFEST_VERSION = 1
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class _Candidate:
    kind: str  # dicom | nifti | image2d
    identity: str  # what the anonymous id is derived from (UID or relative path); never written out
    files: list[Path]
    match_keys: list[str]
    series: object = None  # DicomSeries for DICOM
    id: str = ""
    label_path: Path | None = None
    class_label: int | None = None
    class_source: str | None = None
    fingerprint: str = ""


@dataclass
class IngestResult:
    site: str
    out_dir: Path
    manifest: dict
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def items(self) -> list[dict]:
        return self.manifest["items"]

    @property
    def rejected(self) -> list[dict]:
        return self.manifest["rejected"]


def _fingerprint(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(root) if root in f.parents else f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn in IGNORED_NAMES or fn.startswith("."):
                continue
            out.append(Path(dirpath) / fn)
    return out


def _label_index(labels: Path | None, rejected: list) -> dict[str, Path]:
    if labels is None:
        return {}
    if not labels.exists():
        raise InputError(labels, "labels folder does not exist")
    if labels.is_file():
        raise InputError(labels, "labels must be a folder of label maps here (a CSV of image-level labels belongs to "
                                 "a classification task: kind: classification, classes: [...])")
    index: dict[str, Path] = {}
    for p in _walk(labels):
        if not p.name.lower().endswith(F.LABEL_SUFFIXES):
            rejected.append((p, labels, "not a label file (expected .nii, .nii.gz, .png or .tif)"))
            continue
        stem = F.stem_of(p)
        if stem in index:
            rejected.append((p, labels, f"two label files share the stem {stem!r}"))
            continue
        index[stem] = p
    return index


_STEM_COLUMNS = ("stem", "id", "image", "file", "filename")
_LABEL_COLUMNS = ("label", "class")


def _class_of(value: str, classes: list[str]) -> int | None:
    v = value.strip()
    low = [c.lower() for c in classes]
    if v.lower() in low:
        return low.index(v.lower())
    if v.isdigit() and int(v) < len(classes):
        return int(v)
    return None


def _class_table(path: Path, classes: list[str], rejected: list) -> dict[str, tuple[int, int]]:
    """``stem -> (class index, CSV line)`` from a ``stem,label`` CSV; bad rows go to ``rejected``."""
    if path.is_dir():
        raise InputError(path, "a classification site's labels must be a CSV file (stem,label), not a folder "
                               "(leave labels out to read classes from one folder per class)")
    if not path.is_file():
        raise InputError(path, "labels CSV does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"unreadable labels CSV: {type(e).__name__}") from None
    rows = list(csv.reader(text.splitlines()))
    head = [h.strip().lower() for h in rows[0]] if rows else []
    si = next((head.index(c) for c in _STEM_COLUMNS if c in head), None)
    li = next((head.index(c) for c in _LABEL_COLUMNS if c in head), None)
    if si is None or li is None:
        raise InputError(path, "labels CSV needs a header with a stem column (stem) and a label column (label), "
                               f"got {rows[0] if rows else 'an empty file'}")
    table: dict[str, tuple[int, int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not v.strip() for v in row):
            continue
        if len(row) <= max(si, li):
            rejected.append((path, path.parent, f"line {line}: missing stem or label"))
            continue
        stem = F.stem_of(Path(row[si].strip()))
        k = _class_of(row[li], classes)
        if k is None:
            rejected.append((path, path.parent, f"line {line}: unknown class {row[li].strip()[:40]!r} "
                                                f"(classes: {', '.join(classes)})"))
        elif stem in table:
            rejected.append((path, path.parent, f"line {line}: a second label for the image of line "
                                                f"{table[stem][1]}"))
        else:
            table[stem] = (k, line)
    return table


def _class_from_folders(c: _Candidate, source: Path, classes: list[str]) -> int | None:
    """The class named by the nearest folder above the candidate's files (under ``source``), if any."""
    low = [x.lower() for x in classes]
    for part in reversed(c.files[0].relative_to(source).parts[:-1]):
        if part.lower() in low:
            return low.index(part.lower())
    return None


def _discover(source: Path, rejected: list, scrub: Scrubber) -> list[_Candidate]:
    """Find every usable input under ``source``; unusable files go to ``rejected`` as (path, root, reason)."""
    nifti, image2d, other = [], [], []
    for p in _walk(source):
        k = F.kind_of(p)
        (nifti if k == "nifti" else image2d if k == "image2d" else other).append(p)
    cands: list[_Candidate] = []
    for p in nifti + image2d:
        rel = p.relative_to(source).as_posix()
        cands.append(_Candidate(kind=F.kind_of(p), identity=rel, files=[p], match_keys=[F.stem_of(p)]))
    if other:
        from ..io import dicom as D

        series, bad = D.scan_dicom_files(other) if hasattr(D, "scan_dicom_files") else D.scan_tree(source)
        used = {f for s in series for f in s.files}
        for s in series:
            for k in s.match_keys:
                scrub.add(k)
            _collect_phi(s.files[0], scrub)
            cands.append(_Candidate(kind="dicom", identity=s.uid, files=list(s.files), match_keys=list(s.match_keys),
                                    series=s))
        known = set(nifti) | set(image2d)
        for f, reason in bad:
            f = Path(f)
            if f not in known and f not in used:
                rejected.append((f, source, reason))
    return cands


def _collect_phi(path: Path, scrub: Scrubber) -> None:
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        scrub.add_dataset(ds)
    except Exception:  # the reader already decided this file is usable; scrubbing is best effort on top
        pass


def _load(c: _Candidate, modality: str | None, pixel_spacing: float | None) -> Volume:
    if c.kind == "dicom":
        from ..io import dicom as D

        vol = D.read_series(c.series)
        if vol.meta.get("photometric") == "MONOCHROME1":  # 0 = white: invert so that brighter = larger everywhere
            lo, hi = vol.data.min(), vol.data.max()
            vol.data = (hi + lo - vol.data).astype(vol.data.dtype)
            vol.meta["inverted_monochrome1"] = True
        if modality:
            vol.modality = modality
        return vol
    if c.kind == "nifti":
        return F.read_nifti(c.files[0], modality=modality or "OT")
    return F.read_image2d(c.files[0], spacing=pixel_spacing, modality=modality or "OT")


def content_sha256(data: np.ndarray) -> str:
    """sha256 of an image's voxel values (dtype, shape and bytes in C order): the same for the same pixels whatever
    the de-identification key, file format or time of ingest, so the subject split does not depend on the keyed ids
    (a fresh checkout has a fresh key) and identical images land in the same split."""
    a = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _item_record(c: _Candidate, vol: Volume, out_dir: Path, label: np.ndarray | None) -> dict:
    img_rel = f"images/{c.id}.nii.gz"
    rec = {
        "id": c.id,
        "kind": c.kind,
        "modality": vol.modality,
        "shape": list(vol.data.shape),
        "dtype": str(vol.data.dtype),
        "spacing": [round(s, 6) for s in vol.spacing],
        "orientation": vol.orientation,
        "image": img_rel,
        "image_sha256": sha256_file(out_dir / img_rel),
        "content_sha256": content_sha256(vol.data),
        "label": None,
        "label_sha256": None,
        "label_values": None,
        "input_fingerprint": c.fingerprint,
        "meta": {k: v for k, v in vol.meta.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }
    if label is not None:
        lab_rel = f"labels/{c.id}.nii.gz"
        rec.update(label=lab_rel, label_sha256=sha256_file(out_dir / lab_rel),
                   label_values=[int(v) for v in np.unique(label) if v != 0])
    return rec


def _outputs_intact(rec: dict, out_dir: Path) -> bool:
    for key in ("image", "label"):
        rel = rec.get(key)
        if rel is None:
            continue
        p = out_dir / rel
        if not p.is_file() or sha256_file(p) != rec.get(f"{key}_sha256"):
            return False
    return True


def ingest(source: str | Path, site: str, data_root: str | Path, *, labels: str | Path | None = None,
           modality: str | None = None, pixel_spacing_mm: float | None = None, key: bytes | None = None,
           classes: list[str] | None = None) -> IngestResult:
    source = Path(source)
    if not source.exists():
        raise InputError(source, "input folder does not exist")
    if source.is_file():
        raise InputError(source, "expected a folder of images (DICOM, NIfTI or 2D images), got a file")
    labels = Path(labels) if labels is not None else None
    data_root = Path(data_root)
    out_dir = data_root / site
    if out_dir.resolve() == source.resolve() or out_dir.resolve() in source.resolve().parents:
        raise InputError(source, f"the input lies inside the output folder {out_dir}")
    key = key or load_key(data_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)

    manifest_path = out_dir / "manifest.json"
    old: dict = {}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            log.warning("%s: unreadable manifest, re-ingesting everything", manifest_path)
            old = {}
    old_items = {it["id"]: it for it in old.get("items", [])}

    scrub = Scrubber()
    rejected_raw: list[tuple[Path, Path, str]] = []
    cands = _discover(source, rejected_raw, scrub)
    if labels is not None and labels.is_file():  # a labels CSV kept inside the image folder is not an input
        rejected_raw = [r for r in rejected_raw if Path(r[0]).resolve() != labels.resolve()]
    class_table = _class_table(labels, list(classes), rejected_raw) if classes and labels is not None else None
    label_index = _label_index(None if classes else labels, rejected_raw)
    if not cands and not rejected_raw:
        raise InputError(source, "empty folder: no DICOM, NIfTI or image files found")

    kind_tag = {"dicom": "dicom", "nifti": "file", "image2d": "file"}
    by_id: dict[str, _Candidate] = {}
    for c in cands:
        c.id = anon_id(key, site, kind_tag[c.kind], c.identity)
        if c.id in by_id:
            rejected_raw.append((c.files[0], source, f"duplicate of an input already ingested as {c.id}"))
            continue
        by_id[c.id] = c
        for k in c.match_keys:
            if k in label_index:
                c.label_path = label_index.pop(k)
                break
        if class_table is not None:
            for k in c.match_keys:
                if k in class_table:
                    c.class_label, c.class_source = class_table.pop(k)[0], "csv"
                    break
        elif classes:
            c.class_label = _class_from_folders(c, source, list(classes))
            c.class_source = "folder" if c.class_label is not None else None
        c.fingerprint = _fingerprint(c.files + ([c.label_path] if c.label_path else []), source)
        if c.class_label is not None:
            c.fingerprint = hashlib.sha256(f"{c.fingerprint}|class={c.class_label}".encode()).hexdigest()
    for stem, p in label_index.items():
        rejected_raw.append((p, labels, "label file matches no image"))
    for stem, (k, line) in (class_table or {}).items():
        rejected_raw.append((labels, labels.parent, f"line {line}: label row matches no image"))

    result = IngestResult(site=site, out_dir=out_dir, manifest={})
    items = []
    for cid in sorted(by_id):
        c = by_id[cid]
        prev = old_items.get(cid)
        if prev and prev.get("input_fingerprint") == c.fingerprint and _outputs_intact(prev, out_dir):
            items.append(prev)
            result.skipped.append(cid)
            continue
        try:
            vol = _load(c, modality, pixel_spacing_mm)
        except InputError as e:
            rejected_raw.append((e.path or c.files[0], source, e.reason))
            continue
        label = None
        if c.label_path is not None:
            try:
                label = F.read_label(c.label_path, vol)
            except InputError as e:
                rejected_raw.append((c.label_path, labels, e.reason))
        save_nifti(vol, out_dir / "images" / f"{cid}.nii.gz")
        lab_file = out_dir / "labels" / f"{cid}.nii.gz"
        if label is not None:
            save_nifti(label, lab_file, vol.affine)
        elif lab_file.exists():
            lab_file.unlink()
        rec = _item_record(c, vol, out_dir, label)
        if classes:
            rec.update(class_label=c.class_label, class_source=c.class_source,
                       class_name=None if c.class_label is None else list(classes)[c.class_label])
        items.append(rec)
        result.written.append(cid)
        log.info("%s: ingested %s (%s, %s)", site, cid, vol.modality, "x".join(map(str, vol.data.shape)))

    # items whose input disappeared: drop them (the output mirrors the input)
    for cid, rec in old_items.items():
        if cid not in by_id:
            for k in ("image", "label"):
                if rec.get(k):
                    (out_dir / rec[k]).unlink(missing_ok=True)
            result.removed.append(cid)
            log.info("%s: removed %s (its input is gone)", site, cid)

    rejected = []
    for path, root, reason in rejected_raw:
        path = Path(path)
        try:
            rel = path.relative_to(root).as_posix()
            where = "labels" if labels is not None and (root == labels or path == labels) else "input"
        except ValueError:
            rel, where = path.name, "input"
        rejected.append({"file": scrub(rel), "in": where, "reason": scrub(reason)})
        log.warning("%s: not used: %s/%s: %s", site, where, scrub(rel), scrub(reason))
    rejected.sort(key=lambda r: (r["in"], r["file"], r["reason"]))

    manifest = {"version": MANIFEST_VERSION, "site": site, "items": items, "rejected": rejected}
    new_text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    if not manifest_path.exists() or manifest_path.read_text() != new_text:
        write_json(manifest_path, manifest)
    result.manifest = manifest
    labeled = sum(1 for it in items if it["label"] or it.get("class_label") is not None)
    log.info("%s: %d items (%d written, %d unchanged, %d labeled), %d inputs not used", site, len(items),
             len(result.written), len(result.skipped), labeled, len(rejected))
    return result
