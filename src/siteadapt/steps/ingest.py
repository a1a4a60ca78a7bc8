"""Ingest step: a site's folder of DICOM / NIfTI / 2D images (+ labels) -> de-identified NIfTI + manifest.json.

Output under ``<data_root>/<site>/``::

    images/<id>.nii.gz     one per DICOM series, NIfTI file or 2D image (<id> = keyed anonymous id)
    labels/<id>.nii.gz     when a label file matched (same grid as the image)
    images/<id>.bval/.bvec diffusion b-values/vectors (FSL format) of a diffusion-weighted DICOM series
    manifest.json          items (id, modality, shape, spacing, orientation, sha256, paths) and rejected inputs

Rules:
- The input tree is only read. Every output file is written under a temporary name and renamed.
- An input that cannot be used is listed in ``rejected`` with a keyed reference instead of its name (``file``:
  ``in-`` + 12 hex digits, :func:`siteadapt.io.deid.input_ref` of its path under its root), its root (``in``:
  ``input``, ``labels`` or ``patients``), its place in that root's sorted walk (``position``: ``"12 of 40"``) and
  folder depth, and the reason (the file's path and name, and identifiers seen in DICOM headers, replaced); the rest
  of the site still ingests. ``siteadapt ingest --site S --explain`` (:func:`explain`) maps the references back to
  files on the machine holding the inputs and the key, by hashing every path again; it prints and writes nothing.
- Re-running on the same input rewrites nothing: each item remembers a keyed fingerprint of its input files (relative
  path, size, modification time; plus the assumed-or-configured pixel spacing of 2D images, the class and the patient
  key) and the sha256 of its outputs; an item is re-read only when these changed.
- No identifier reaches outputs or logs: file names are anonymous ids, NIfTI headers carry geometry only, the manifest
  holds no UIDs, names, dates or input paths or file names (used or not); log lines name items by anonymous id and
  refused inputs by reference.
- 2D images (PNG/JPEG/TIFF) carry no pixel size: without ``pixel_spacing_mm`` 1.0 mm is assumed, each such item gets
  ``spacing_assumed: true`` and one warning per site says so (every item records ``spacing_assumed``).
- Patient key (for patient-level splits): each item records ``patient``, the keyed hash
  ``anon_id(key, site, "patient", ID)`` of its patient, never the ID: from the ``patients`` CSV (header
  ``stem,patient``; stems matched as labels are) when given, else from a DICOM series' PatientID; absent when unknown.
  CSV rows that match no image or repeat one are listed in ``rejected`` by line number.

Label matching: a label file (NIfTI or PNG/TIFF) is matched by its file stem: for NIfTI and 2D images, the image's own
stem; for DICOM series, in order, the name of the folder holding the series, its AccessionNumber, PatientID or StudyID.

Label values (segmentation): a label map may hold only 0 and the task's structure ids, after the site's ``label_map``
(``sites.<site>.label_map: {255: 1}``: export value -> task id, applied here, so the written labels carry the task's
ids). Any other value (PNG masks saved as 0/127/254, ids 7 or 255 where the task uses 1-4) would become background
downstream, so the site is refused as a whole with :class:`~siteadapt.errors.LabelValuesError` (exit 4) before any
output is written; the message lists the values found and expected and names each bad label map by its position in
path order under the labels folder and its anonymous item id (never by file name: stems are often patient ids).
A site whose every input is refused still gets its manifest (the refusals), then ingest fails with
:class:`~siteadapt.errors.NothingUsableError` (exit 3).

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
import errno
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, LabelValuesError, NothingUsableError
from ..io import files as F
from ..io.atomic import remove_stale_temps, sha256_file, write_json
from ..io.deid import Scrubber, anon_id, input_ref, is_generic, keyed_digest, load_key
from ..io.volume import Volume, save_fsl_gradients, save_nifti

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
    patient_id: str | None = None  # raw PatientID (DICOM) or patients-CSV value; never written out
    patient: str | None = None  # its keyed hash (what the manifest records)


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


def _fingerprint(files: list[Path], root: Path, key: bytes, extra: list[str] = ()) -> str:
    """Keyed (HMAC) digest of the files' relative paths, sizes and times plus ``extra`` settings: without the key a
    recorded fingerprint cannot confirm a guessed file name. A file that vanished since the walk counts as changed
    (reading it then refuses it)."""
    parts = []
    for f in sorted(files):
        try:
            st = f.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        parts.append(f"{f.relative_to(root) if root in f.parents else f}|{size}|{mtime}")
    return keyed_digest(key, "\n".join(parts + list(extra)))


def _not_utf8(text: str) -> bool:
    """True for a name Python decoded with surrogateescape (bytes that are not UTF-8 on a POSIX file system)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _entry_problem(p: Path, rel: str) -> str | None:
    """Why a walked entry cannot be read as an input, or None: a name that is not UTF-8, a symbolic link that is
    dangling, loops or points at a folder (not followed), something that is not a regular file (a FIFO would block
    the reader), or a file this process may not read. Read without following the entry's content."""
    if _not_utf8(rel):
        return "file or folder name is not valid UTF-8"
    try:
        if p.is_symlink():
            try:
                target = p.resolve(strict=True)
            except FileNotFoundError:
                return "dangling symbolic link: its target does not exist"
            except (RuntimeError, OSError) as e:  # RuntimeError: Python < 3.13 on a loop; OSError ELOOP after
                if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
                    return "symbolic link loop: the link never reaches a file"
                return f"unreadable symbolic link ({type(e).__name__})"
            if target.is_dir():
                return "symbolic link to a folder: not followed"
        mode = p.stat().st_mode
    except OSError as e:
        if getattr(e, "errno", None) == errno.ELOOP:
            return "symbolic link loop: the link never reaches a file"
        return f"file cannot be examined ({type(e).__name__})"
    if not stat.S_ISREG(mode):
        return "not a regular file (device, FIFO or socket)"
    if not os.access(p, os.R_OK):
        return "file cannot be read: permission denied"
    return None


def _scan_tree(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Every entry of ``root``'s sorted walk (dot-files, dot-folders and system files left out; symbolic links to
    folders listed as entries, not entered) and, for those that cannot be read as inputs, why (see
    :func:`_entry_problem`; a folder that cannot be listed is one entry with its reason). Never raises for a bad
    entry: each is refused on its own and the walk goes on."""
    out: list[Path] = []
    problems: dict[Path, str] = {}

    def unlistable(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root
        if where != root:
            out.append(where)
            problems[where] = f"folder cannot be listed ({type(err).__name__})"

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        here = Path(dirpath)
        linked = [d for d in dirnames if not d.startswith(".") and (here / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in linked)
        names = sorted([fn for fn in filenames if fn not in IGNORED_NAMES and not fn.startswith(".")] + linked)
        for fn in names:
            p = here / fn
            out.append(p)
            why = _entry_problem(p, p.relative_to(root).as_posix())
            if why is not None:
                problems[p] = why
    return out, problems


def _walk(root: Path) -> list[Path]:
    """The entries of ``root``'s sorted walk (see :func:`_scan_tree`): what positions count and references name."""
    return _scan_tree(root)[0]


def _label_index(labels: Path | None, rejected: list) -> dict[str, Path]:
    if labels is None:
        return {}
    if not labels.exists():
        raise InputError(None, "the labels folder does not exist")
    if labels.is_file():
        raise InputError(None, "labels must be a folder of label maps here (a CSV of image-level labels belongs to "
                               "a classification task: kind: classification, classes: [...])")
    index: dict[str, Path] = {}
    files, problems = _scan_tree(labels)
    for p in files:
        if p in problems:
            rejected.append((p, labels, problems[p]))
            continue
        if not p.name.lower().endswith(F.LABEL_SUFFIXES):
            rejected.append((p, labels, "not a label file (expected .nii, .nii.gz, .png or .tif)"))
            continue
        stem = F.stem_of(p)
        if stem in index:
            rejected.append((p, labels, "another label file with the same file stem comes first in path order "
                                        "(that one is used)"))
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
        raise InputError(None, "a classification site's labels must be a CSV file (stem,label), not a folder "
                               "(leave labels out to read classes from one folder per class)")
    if not path.is_file():
        raise InputError(None, "the labels CSV does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(None, f"unreadable labels CSV: {type(e).__name__}") from None
    rows = list(csv.reader(text.splitlines()))
    head = [h.strip().lower() for h in rows[0]] if rows else []
    si = next((head.index(c) for c in _STEM_COLUMNS if c in head), None)
    li = next((head.index(c) for c in _LABEL_COLUMNS if c in head), None)
    if si is None or li is None:
        raise InputError(None, "labels CSV needs a header with a stem column (stem) and a label column (label), "
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


def _patient_table(path: Path, site: str, rejected: list) -> dict[str, tuple[str, int]]:
    """``stem -> (patient, CSV line)`` from a ``stem,patient`` CSV; bad rows go to ``rejected`` by line number (never
    by stem or patient: both are identifiers)."""
    if not path.is_file():
        raise InputError(None, f"sites.{site}.patients: the patients CSV does not exist")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(None, f"sites.{site}.patients: unreadable patients CSV: {type(e).__name__}") from None
    head = [h.strip().lower() for h in rows[0]] if rows else []
    si = next((head.index(c) for c in _STEM_COLUMNS if c in head), None)
    pi = next((head.index(c) for c in ("patient", "patient_id", "patientid", "subject") if c in head), None)
    if si is None or pi is None:
        raise InputError(None, f"sites.{site}.patients: the patients CSV needs a header with a stem column (stem) "
                               "and a patient column (patient)")
    table: dict[str, tuple[str, int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not v.strip() for v in row):
            continue
        if len(row) <= max(si, pi) or not row[si].strip() or not row[pi].strip():
            rejected.append((path, path.parent, f"line {line}: missing stem or patient"))
            continue
        stem = F.stem_of(Path(row[si].strip()))
        if stem in table:
            rejected.append((path, path.parent, f"line {line}: a second patient for the image of line "
                                                f"{table[stem][1]}"))
        else:
            table[stem] = (row[pi].strip(), line)
    return table


def _positions(root: Path | None) -> dict[Path, str]:
    """``file -> "12 of 40"``: each file's rank in the sorted walk of ``root`` (what ingest walks, dot-files and
    system files left out), so that a refused file can be found without its name."""
    if root is None or not root.is_dir():
        return {}
    files = _walk(root)
    return {p: f"{i} of {len(files)}" for i, p in enumerate(files, start=1)}


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
    files, problems = _scan_tree(source)
    for p in files:
        if p in problems:
            rejected.append((p, source, problems[p]))
            continue
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
            with F.reading(s.files[0]):
                pid = _collect_phi(s.files[0], scrub)
            cands.append(_Candidate(kind="dicom", identity=s.uid, files=list(s.files), match_keys=list(s.match_keys),
                                    series=s, patient_id=pid))
        known = set(nifti) | set(image2d)
        for f, reason in bad:
            f = Path(f)
            if f not in known and f not in used:
                rejected.append((f, source, reason))
    return cands


def _collect_phi(path: Path, scrub: Scrubber) -> str | None:
    """Collect the identifiers of a series' first file for scrubbing; returns its PatientID (or None)."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        scrub.add_dataset(ds)
        pid = str(ds.get("PatientID", "") or "").strip()
        return pid or None
    except Exception:  # the reader already decided this file is usable; scrubbing is best effort on top
        return None


def _load(c: _Candidate, modality: str | None, pixel_spacing: float | None) -> Volume:
    if c.kind == "dicom":
        from ..io import dicom as D

        vol = D.read_series(c.series)
        if vol.meta.get("spacing_assumed") and pixel_spacing:  # a radiograph without (Imager)PixelSpacing: the
            vol.affine[:3, :2] *= float(pixel_spacing)            # site's pixel_spacing_mm replaces the assumed 1 mm
            vol.meta["spacing_assumed"] = False
            vol.meta["spacing_from_settings"] = True
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


def _load_checked(c: _Candidate, modality: str | None, pixel_spacing: float | None) -> Volume:
    """:func:`_load`, then the checks of an image's content (:func:`siteadapt.io.files.unusable_reason`: too small,
    no signal). Every failure is an InputError (an unexpected exception names only its type: its text may quote a
    path), so one bad input is refused and the site goes on."""
    try:
        vol = _load(c, modality, pixel_spacing)
    except InputError:
        raise
    except Exception as e:  # a reader's bug or an input nobody foresaw: refuse this input, never end the site
        raise InputError(c.files[0], f"unexpected error while reading ({type(e).__name__})") from None
    why = F.unusable_reason(vol.data)
    if why is not None:
        raise InputError(c.files[0], why)
    return vol


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
        "spacing_assumed": bool(vol.meta.get("spacing_assumed", False)),
        "meta": {k: v for k, v in vol.meta.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }
    if c.patient is not None:
        rec["patient"] = c.patient
    for k, p in save_fsl_gradients(vol, out_dir / img_rel).items():  # diffusion: images/<id>.bval, .bvec
        rec[k], rec[f"{k}_sha256"] = f"images/{p.name}", sha256_file(p)
    if label is not None:
        lab_rel = f"labels/{c.id}.nii.gz"
        rec.update(label=lab_rel, label_sha256=sha256_file(out_dir / lab_rel),
                   label_values=[int(v) for v in np.unique(label) if v != 0])
    return rec


def _outputs_intact(rec: dict, out_dir: Path) -> bool:
    for key in ("image", "label", "bval", "bvec"):
        rel = rec.get(key)
        if rel is None:
            continue
        p = out_dir / rel
        if not p.is_file() or sha256_file(p) != rec.get(f"{key}_sha256"):
            return False
    return True


def label_options(task, site_cfg) -> dict:
    """The label keywords of :func:`ingest` for a site of ``task`` (config ``Task``, ``Site``): a segmentation site's
    label maps are checked against the task's structure ids after the site's ``label_map``; other tasks get none."""
    if task.kind != "segmentation":
        return {}
    return {"label_ids": sorted(task.structures.values()), "label_map": dict(site_cfg.label_map)}


def _label_file_values(path: Path) -> np.ndarray | None:
    """The distinct values of a label file, read as :func:`siteadapt.io.files.read_label` reads it; None when it
    cannot be read (the main pass then refuses it with read_label's reason)."""
    try:
        lab = F.label_array(path)[0]
    except InputError:  # unreadable here means unreadable in the main pass, which names the reason
        return None
    if lab.dtype.kind == "f" and not np.isfinite(lab).all():
        return None
    return np.unique(lab)


def _unexpected_values(values, allowed: set[int]) -> list[int]:
    """Integer values not in ``allowed`` (non-integer values are read_label's refusal, with its own reason)."""
    return sorted({int(v) for v in np.asarray(values).ravel() if int(v) == v and int(v) not in allowed})


def _apply_label_map(label: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """``label`` with each mapped value replaced at once (a swap ``{1: 2, 2: 1}`` works), as uint8 when it fits."""
    if not label_map:
        return label
    out = label.copy()
    for value, target in label_map.items():
        out[label == value] = target
    return np.ascontiguousarray(out.astype(np.uint8 if int(out.max(initial=0)) <= 255 else np.uint16))


def _label_values_error(site: str, bad: list[tuple[int, str, list[int], list[int]]], n_labels: int,
                        label_ids: list[int], label_map: dict[int, int]) -> LabelValuesError:
    """The one-line error for label maps with unexpected values. ``bad``: (position, item id, values in the file,
    unexpected values). Labels are named by position in path order and by anonymous item id, never by file name."""
    found = sorted({v for _, _, vals, _ in bad for v in vals})
    unexpected = sorted({v for *_, u in bad for v in u})
    expected = sorted({0, *label_ids})
    where = ", ".join(f"#{pos} (item {cid})" for pos, cid, _, _ in sorted(bad)[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    mapped = f"; label_map {dict(sorted(label_map.items()))} applied" if label_map else ""
    template = ", ".join(f"{v}: ID" for v in unexpected[:8])
    return LabelValuesError(
        f"site {site}: {len(bad)} of {n_labels} label maps hold values that are not the task's ids (nothing was "
        f"written; the site is refused as a whole): values found {found}, unexpected {unexpected}, expected "
        f"{expected} (0 + the structure ids{mapped}); label maps {where}{more} in path order under the labels "
        f"folder. If the export uses other values, map them in params.yaml: sites.{site}.label_map: {{{template}}} "
        "with ID 0 or a structure id")


def _where(path: Path, root: Path, labels: Path | None, patients: Path | None) -> tuple[str, str]:
    """(root kind, path under that root) of a refused file, as :func:`input_ref` hashes it."""
    if patients is not None and path == patients:
        return "patients", path.name
    if labels is not None and (path == labels or root == labels):
        return "labels", path.name if path == labels else path.relative_to(root).as_posix()
    try:
        return "input", path.relative_to(root).as_posix()
    except ValueError:
        return "input", path.name


def _hidden_names(path: Path, rel: str, roots: list[str]) -> list[str]:
    """Every string that would tell where ``path`` lies: the path as given, its path under its root, each folder and
    file name along that path (generic words such as ``DICOM`` kept) and the roots themselves."""
    parts = [q for q in Path(rel).parts if not is_generic(q)]
    return [str(path), rel, *parts, *(F.stem_of(Path(q)) for q in parts), *roots]


def _report_notes(notes: list, site: str, key: bytes, source: Path, labels: Path | None, patients: Path | None,
                  scrub: Scrubber, item_of: dict[Path, str]) -> None:
    """Log the readers' held-back notes, one line per file and text (with a count): the file named by reference and
    position (and the item id when the file became part of an item), the text cleaned of paths, names and quoted
    values (:func:`siteadapt.io.files.clean_note`) and of identifiers seen in headers."""
    if not notes:
        return
    roots = sorted({str(r) for r in (source, source.resolve(), labels, patients) if r is not None}, key=len,
                   reverse=True)
    pos: dict[str, dict[Path, str]] = {}
    counts: dict[tuple, int] = {}
    for path, text in notes:
        if path is None:
            k = ("the inputs (file not known)", scrub(F.clean_note(text, roots)))
            counts[k] = counts.get(k, 0) + 1
            continue
        path = Path(path)
        root = labels if labels is not None and labels.is_dir() and labels in path.parents else source
        where, rel = _where(path, root, labels, patients)
        if where not in pos:
            pos[where] = _positions(labels if where == "labels" else source)
        ref = input_ref(key, site, where, rel)
        item = item_of.get(path)
        label = f"{where} {ref} ({pos[where].get(path, 'outside the walk')})" + (f", item {item}" if item else "")
        cleaned = scrub(F.clean_note(text, _hidden_names(path, rel, roots)))
        k = (label, cleaned)
        counts[k] = counts.get(k, 0) + 1
    for (label, text), n in counts.items():
        log.warning("%s: reader warning on %s%s: %s", site, label, f" (x{n})" if n > 1 else "", text)


def _rejected_records(rejected_raw: list, key: bytes, site: str, source: Path, labels: Path | None,
                      patients: Path | None, scrub: Scrubber) -> list[dict]:
    """The manifest's ``rejected`` entries: keyed reference, root, position and reason, never a path or name. The
    reason has the file's path, name and stem, the roots' paths and identifiers from DICOM headers replaced."""
    if not rejected_raw:  # positions need a second walk of the input tree: only when something was refused
        return []
    pos = {"input": _positions(source), "labels": _positions(labels)}
    roots = sorted({str(r) for r in (source, source.resolve(), labels, patients) if r is not None}, key=len,
                   reverse=True)
    out = []
    for path, root, reason in rejected_raw:
        path, root = Path(path), Path(root)
        where, rel = _where(path, root, labels, patients)
        text = str(reason)
        names = {str(path), rel} | {n for n in (path.name, F.stem_of(path)) if not is_generic(n)}
        for n in sorted(names, key=len, reverse=True):
            if len(n) >= 3:
                text = text.replace(n, "<file>")
        for r in roots:
            text = text.replace(r, "<root>")
        if path in (labels, patients):
            position, depth = f"the {where} CSV", 0
        else:
            position, depth = pos.get(where, {}).get(path, "outside the walk"), len(Path(rel).parts) - 1
        out.append({"file": input_ref(key, site, where, rel), "in": where, "position": position, "depth": depth,
                    "reason": scrub(text)})
    rank = {k: i for i, k in enumerate(("input", "labels", "patients"))}
    out.sort(key=lambda r: (rank[r["in"]], int(r["position"].split()[0]) if r["position"][0].isdigit() else 0,
                            r["reason"]))
    return out


def explain(source: str | Path, site: str, data_root: str | Path, *, labels: str | Path | None = None,
            patients: str | Path | None = None, key: bytes | None = None) -> list[dict]:
    """Map the references of the site's refused inputs (its manifest's ``rejected``) back to local files: every file
    under ``source`` and ``labels`` (and the CSVs) is hashed again with the key. Returns the rejected entries with
    ``path`` (relative to its root) added, ``None`` where no local file matches (other key, input moved). For the
    user's terminal only: the result holds file names and must not be written to outputs or logs."""
    source, data_root = Path(source), Path(data_root)
    labels = Path(labels) if labels is not None else None
    patients = Path(patients) if patients is not None else None
    key = key or load_key(data_root)
    mpath = data_root / site / "manifest.json"
    if not mpath.is_file():
        raise InputError(None, f"site {site}: no manifest.json yet: run `siteadapt ingest --site {site}` first")
    lookup: dict[str, str] = {}
    for where, root in (("input", source), ("labels", labels)):
        if root is not None and root.is_dir():
            for p in _walk(root):
                rel = p.relative_to(root).as_posix()
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # printable
                lookup[input_ref(key, site, where, rel)] = f"{where}/{shown}"
    for where, f in (("labels", labels), ("patients", patients)):
        if f is not None and f.is_file():
            lookup[input_ref(key, site, where, f.name)] = f"{where} CSV {f.name}"
    rejected = json.loads(mpath.read_text()).get("rejected", [])
    return [{**r, "path": lookup.get(r.get("file"))} for r in rejected]


def ingest(source: str | Path, site: str, data_root: str | Path, *, labels: str | Path | None = None,
           modality: str | None = None, pixel_spacing_mm: float | None = None, key: bytes | None = None,
           classes: list[str] | None = None, label_ids: list[int] | None = None,
           label_map: dict[int, int] | None = None, patients: str | Path | None = None) -> IngestResult:
    """Ingest the site at ``source`` (see the module docstring). ``label_ids``: the task's structure ids; when
    given, every label map must hold only 0 and these ids after ``label_map`` (the site's ``label_map``: export value
    -> task id, applied to the written labels), else :class:`LabelValuesError` (exit 4) before anything is written.
    One bad label map fails the whole site: a mismatch is almost always a systematic export setting, and refusing it
    loudly beats ingesting part of the site with its labels silently erased. A site that ends with no item raises
    :class:`NothingUsableError` (exit 3) after its manifest (with the refusals) is written. ``patients``: a
    ``stem,patient`` CSV giving each image's patient (hashed into the item's ``patient``).

    Warnings and log lines of the readers (pydicom, nibabel, Pillow) are held back while the inputs are read and
    logged afterwards under the file's reference, position and item id, with paths, file names and quoted header
    values taken out (:func:`_report_notes`)."""
    with F.reader_notes() as notes:
        return _ingest(source, site, data_root, labels=labels, modality=modality, pixel_spacing_mm=pixel_spacing_mm,
                       key=key, classes=classes, label_ids=label_ids, label_map=label_map, patients=patients,
                       notes=notes)


def _ingest(source, site, data_root, *, labels, modality, pixel_spacing_mm, key, classes, label_ids, label_map,
            patients, notes: F.ReaderNotes) -> IngestResult:
    """The body of :func:`ingest`, run while the readers' notes are held back in ``notes``."""
    source = Path(source)
    # these messages name the site, never the folder: input paths often carry a patient's name
    if not source.exists():
        raise InputError(None, f"site {site}: the input folder does not exist (the folder given, or "
                               f"sites.{site}.images)")
    if source.is_file():
        raise InputError(None, f"site {site}: expected a folder of images (DICOM, NIfTI or 2D images), got a file")
    labels = Path(labels) if labels is not None else None
    data_root = Path(data_root)
    out_dir = data_root / site
    if out_dir.resolve() == source.resolve() or out_dir.resolve() in source.resolve().parents:
        raise InputError(None, f"site {site}: the input lies inside the output folder {out_dir}")
    key = key or load_key(data_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)

    manifest_path = out_dir / "manifest.json"
    old: dict = {}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            log.warning("%s: unreadable manifest.json, re-ingesting everything", site)
            old = {}
    old_items = {it["id"]: it for it in old.get("items", [])}

    scrub = Scrubber()
    rejected_raw: list[tuple[Path, Path, str]] = []
    cands = _discover(source, rejected_raw, scrub)
    if labels is not None and labels.is_file():  # a labels CSV kept inside the image folder is not an input
        rejected_raw = [r for r in rejected_raw if Path(r[0]).resolve() != labels.resolve()]
    class_table = _class_table(labels, list(classes), rejected_raw) if classes and labels is not None else None
    label_index = _label_index(None if classes else labels, rejected_raw)
    patients = Path(patients) if patients is not None else None
    if patients is not None:  # a patients CSV kept inside the image folder is not an input
        rejected_raw = [r for r in rejected_raw if Path(r[0]).resolve() != patients.resolve()]
    patient_table = _patient_table(patients, site, rejected_raw) if patients is not None else None
    label_pos = {p: i for i, p in enumerate(label_index.values(), start=1)}  # path order: names stay unwritten
    label_map = dict(label_map or {})
    if not cands and not rejected_raw:
        raise InputError(None, f"site {site}: empty folder: no DICOM, NIfTI or image files found")

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
        if patient_table is not None:
            for k in c.match_keys:
                if k in patient_table:
                    c.patient_id = patient_table.pop(k)[0]
                    break
        c.patient = anon_id(key, site, "patient", c.patient_id) if c.patient_id else None
        extra = []
        if c.label_path is not None and label_map:  # a changed label_map re-reads the label
            extra.append(f"label_map={sorted(label_map.items())}")
        if c.class_label is not None:
            extra.append(f"class={c.class_label}")
        if c.kind == "image2d" or (c.kind == "dicom" and pixel_spacing_mm):  # setting pixel_spacing_mm later
            extra.append(f"spacing={pixel_spacing_mm or 'assumed'}")                # rewrites what assumed 1.0 mm
        if c.patient is not None:
            extra.append(f"patient={c.patient}")
        c.fingerprint = _fingerprint(c.files + ([c.label_path] if c.label_path else []), source, key, extra)
    for stem, p in label_index.items():
        rejected_raw.append((p, labels, "label file matches no image"))
    for stem, (k, line) in (class_table or {}).items():
        rejected_raw.append((labels, labels.parent, f"line {line}: label row matches no image"))
    for stem, (_, line) in (patient_table or {}).items():
        rejected_raw.append((patients, patients.parent, f"line {line}: patient row matches no image"))

    allowed = None if label_ids is None else {0, *map(int, label_ids)}

    def reusable(c: _Candidate, prev: dict | None) -> bool:
        return bool(prev and prev.get("input_fingerprint") == c.fingerprint and _outputs_intact(prev, out_dir)
                    and (allowed is None or set(prev.get("label_values") or []) <= allowed))

    if allowed is not None:  # every label map to (re)read is checked before any output is written
        bad = []
        for cid in sorted(by_id):
            c = by_id[cid]
            if c.label_path is None or reusable(c, old_items.get(cid)):
                continue
            with F.reading(c.label_path):
                values = _label_file_values(c.label_path)
            unexpected = [] if values is None else _unexpected_values(values, allowed | set(label_map))
            if unexpected:
                bad.append((label_pos.get(c.label_path, 0), cid, [int(v) for v in values], unexpected))
        if bad:
            raise _label_values_error(site, bad, len(label_pos), sorted(allowed - {0}), label_map)

    result = IngestResult(site=site, out_dir=out_dir, manifest={})
    items = []
    for cid in sorted(by_id):
        c = by_id[cid]
        prev = old_items.get(cid)
        if reusable(c, prev):
            items.append(prev)
            result.skipped.append(cid)
            continue
        notes.default = c.files[0]
        try:
            with F.reading(c.files[0]):
                vol = _load_checked(c, modality, pixel_spacing_mm)
        except InputError as e:
            rejected_raw.append((e.path or c.files[0], source, e.reason))
            continue
        finally:
            notes.default = None
        label = None
        if c.label_path is not None:
            try:
                with F.reading(c.label_path):
                    label = F.read_label(c.label_path, vol)
            except InputError as e:
                rejected_raw.append((c.label_path, labels, e.reason))
            except Exception as e:  # as for images: refused by type, never a traceback
                rejected_raw.append((c.label_path, labels, f"unexpected error while reading the label "
                                                           f"({type(e).__name__})"))
        if label is not None:
            label = _apply_label_map(label, label_map)
            if allowed is not None and _unexpected_values(np.unique(label), allowed):  # the check above missed it
                raise _label_values_error(site, [(label_pos.get(c.label_path, 0), cid, np.unique(label).tolist(),
                                                  _unexpected_values(np.unique(label), allowed))],
                                          len(label_pos), sorted(allowed - {0}), label_map)
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
            for k in ("image", "label", "bval", "bvec"):
                if rec.get(k):
                    (out_dir / rec[k]).unlink(missing_ok=True)
            result.removed.append(cid)
            log.info("%s: removed %s (its input is gone)", site, cid)

    rejected = _rejected_records(rejected_raw, key, site, source, labels, patients, scrub)
    for r in rejected:
        log.warning("%s: not used: %s %s (%s): %s", site, r["in"], r["file"], r["position"], r["reason"])
    _report_notes(notes.take(), site, key, source, labels, patients, scrub,
                  {f: it["id"] for it in items if it["id"] in by_id for f in by_id[it["id"]].files})
    assumed = sum(1 for it in items if it.get("spacing_assumed"))
    if assumed:
        log.warning("%s: %d of %d images carry no pixel spacing (PNG/JPEG/TIFF, or DICOM without PixelSpacing): "
                    "1.0 mm is assumed, so every size in mm (spacing, crops, surface distances) is in pixels; set "
                    "sites.%s.pixel_spacing_mm in params.yaml", site, assumed, len(items), site)

    from ..io.uidmap import record as record_uids  # original DICOM UIDs for `siteadapt export`: a site-local key

    record_uids(site, data_root, [(it["id"], it["input_fingerprint"], by_id[it["id"]].files) for it in items
                                  if it["kind"] == "dicom" and it["id"] in by_id])  # file, never in the outputs
    manifest = {"version": MANIFEST_VERSION, "site": site, "items": items, "rejected": rejected}
    new_text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    if not manifest_path.exists() or manifest_path.read_text() != new_text:
        write_json(manifest_path, manifest)
    result.manifest = manifest
    labeled = sum(1 for it in items if it["label"] or it.get("class_label") is not None)
    log.info("%s: %d items (%d written, %d unchanged, %d labeled), %d inputs not used", site, len(items),
             len(result.written), len(result.skipped), labeled, len(rejected))
    if not items:  # the manifest above (written atomically) lists the refusals; the step must not look green
        raise NothingUsableError(f"site {site}: nothing usable: all {len(rejected)} inputs were refused "
                                 f"({NothingUsableError.count_refusals(rejected)}); the reasons are in {manifest_path}")
    return result
