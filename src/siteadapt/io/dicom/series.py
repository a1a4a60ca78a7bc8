"""Grouping headers into series: :func:`scan_tree` / :func:`scan_dicom_files` probe every file (a thread pool) and
group the usable frames by SeriesInstanceUID, split where one UID mixes orientations, image sizes, echoes or
magnitude/phase; :func:`series_identities` does the same grouping for headers that come from elsewhere (DICOMweb).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...errors import InputError
from .headers import _frames_from_header, _non_image_label
from .model import _PROJECTION_MODALITIES, DicomSeries, _Frame, _workers
from .probe import _partial_header, _probe_safe


# grouping


def _cluster_orientations(frames: list[_Frame], tol: float = 1e-3) -> list[list[_Frame]]:
    reps: list[np.ndarray | None] = []
    groups: list[list[_Frame]] = []
    for fr in frames:
        for gi, rep in enumerate(reps):
            if (rep is None and fr.iop is None) or (rep is not None and fr.iop is not None
                                                     and np.max(np.abs(rep - fr.iop)) <= tol):
                groups[gi].append(fr)
                break
        else:
            reps.append(fr.iop)
            groups.append([fr])
    return groups


def _split_frames(uid: str, frames: list[_Frame]) -> list[tuple[str, list[_Frame]]]:
    """Split the frames of one SeriesInstanceUID into stackable groups; returns (uid with suffix, frames)."""
    out: list[tuple[list[str], list[_Frame]]] = []
    by_kind: dict[tuple, list[_Frame]] = {}
    for fr in frames:
        by_kind.setdefault((fr.echo if fr.echo is not None else -1.0, fr.phase), []).append(fr)
    kinds = sorted(by_kind)
    echoes = sorted({k[0] for k in kinds})
    for kind in kinds:
        parts = []
        if len(echoes) > 1:
            parts.append(f"+e{echoes.index(kind[0]) + 1}")
        if kind[1] and any(not k[1] for k in kinds):
            parts.append("+ph")
        orient = _cluster_orientations(by_kind[kind])
        for oi, og in enumerate(orient):
            oparts = parts + ([f"+o{oi + 1}"] if len(orient) > 1 else [])
            # Single projection images (no position/orientation, or CR/DX/MG/...): one series per file.
            projection = og[0].iop is None or all(f.info.modality in _PROJECTION_MODALITIES for f in og)
            if projection and all(f.info.n_frames == 1 for f in og) and len({id(f.info) for f in og}) > 1:
                files = sorted({f.info.path for f in og})
                for fi, p in enumerate(files):
                    out.append((oparts + [f"+i{fi + 1}"], [f for f in og if f.info.path == p]))
                continue
            sizes: dict[tuple, list[_Frame]] = {}
            for f in og:
                sizes.setdefault((f.info.rows, f.info.cols), []).append(f)
            # A UID holding whole stacks of different sizes is split; a stray odd-sized image stays in (and is
            # refused by read_series as "inconsistent rows/cols").
            if len(sizes) > 1 and all(len(v) >= 2 for v in sizes.values()):
                for (r, c), sg in sorted(sizes.items()):
                    out.append((oparts + [f"+s{r}x{c}"], sg))
            else:
                out.append((oparts, og))
    return [(uid + "".join(p), fr) for p, fr in out]


def _make_series(uid: str, frames: list[_Frame]) -> DicomSeries:
    files = sorted({f.info.path for f in frames})
    first = frames[0].info
    folder = files[0].parent.name if files else ""
    keys = [k for k in (folder, *first.keys) if k]
    return DicomSeries(uid=uid, files=files, modality=first.modality, match_keys=keys, n_frames=len(frames),
                       _frames=frames)



def scan_tree(root) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Find the image series under ``root`` (a folder, or one file).

    Returns ``(series, skipped)`` where ``skipped`` lists ``(file, reason)`` for every file not used: "not a DICOM
    file", "truncated or unreadable DICOM: ...", "non-image DICOM (RTSTRUCT)" (or SR, presentation state, ...),
    "DICOMDIR", "duplicate SOP instance (...)". Series are sorted by uid, files within a series by path.
    """
    root = Path(root)
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        raise InputError(root, "DICOM folder does not exist")
    return scan_dicom_files(paths)


def scan_dicom_files(paths) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """:func:`scan_tree` over an explicit list of files (e.g. what is left of a tree after other formats)."""
    paths = sorted(Path(p) for p in paths)
    skipped: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(_workers(len(paths))) as pool:
        results = list(pool.map(_probe_safe, paths))
    by_uid: dict[str, list[_Frame]] = {}
    seen_sop: dict[str, Path] = {}
    for p, (frames, reason) in zip(paths, results):
        if frames is None:
            skipped.append((p, reason))
            continue
        info = frames[0].info
        if info.sop_uid and info.sop_uid in seen_sop:
            skipped.append((p, "duplicate SOP instance (same SOPInstanceUID as another file)"))
            continue
        if info.sop_uid:
            seen_sop[info.sop_uid] = p
        uid = info.series_uid or f"no-series-uid:{p.parent}"
        by_uid.setdefault(uid, []).extend(frames)
    # Truncated files of a series that was otherwise read: without them the series would come out silently short
    # (an edge slice leaves no gap for the spacing check to see). Copies of a readable file (same SOPInstanceUID)
    # are only duplicates and change nothing.
    broken: dict[str, list] = {}
    for p, reason in skipped:
        if not str(reason).startswith("truncated or unreadable DICOM"):
            continue
        head = _partial_header(p)
        if head is not None and head[0] in by_uid and head[1] not in seen_sop:
            broken.setdefault(head[0], []).append((p, head[2]))
    series = []
    for uid in sorted(by_uid):
        for suid, frames in _split_frames(uid, by_uid[uid]):
            s = _make_series(suid, frames)
            s.broken = list(broken.get(uid, []))
            series.append(s)
    return series, skipped


def series_identities(datasets) -> list[tuple[str, list]]:
    """The series identities :func:`scan_dicom_files` gives a set of image *headers* (pydicom datasets, e.g. a PACS's
    WADO-RS metadata, with no file behind them): ``[(identity, datasets of that series)]``, where identity is the
    SeriesInstanceUID plus the suffix of a split series (``+e2``, ``+o1``, ``+s256x256``, ...), as ingest names it.

    The grouping is scan_dicom_files' own (same frame facts, :func:`_split_frames`), so the keyed anonymous ids of
    ingest can be computed again from headers alone (``siteadapt.steps.export``). Non-image objects (SEG, SR, ...)
    and duplicate SOP instances are left out, as the scan leaves them out."""
    by_uid: dict[str, list[_Frame]] = {}
    by_path: dict[Path, object] = {}
    seen_sop: set[str] = set()
    for n, ds in enumerate(datasets):
        sop = str(ds.get("SOPInstanceUID", "") or "")
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if _non_image_label(ds) is not None or "Rows" not in ds or not uid or (sop and sop in seen_sop):
            continue
        seen_sop.add(sop)
        path = Path(f"header-{n}")  # the frames' stand-in file: maps a group back to its datasets
        by_path[path] = ds
        by_uid.setdefault(uid, []).extend(_frames_from_header(ds, path, "", True, None, None))
    out = []
    for uid in sorted(by_uid):
        for suid, frames in _split_frames(uid, by_uid[uid]):
            paths = sorted({f.info.path for f in frames}, key=lambda p: int(p.name.split("-")[1]))
            out.append((suid, [by_path[p] for p in paths]))
    return out
