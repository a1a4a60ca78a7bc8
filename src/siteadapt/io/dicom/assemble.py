"""Building a :class:`~siteadapt.io.volume.Volume` from one series: frames sorted along the slice normal, geometry
checks (gaps, uneven spacing, tilt, sizes, broken edge files), pixels read once per file (raw little-endian bytes
straight into the output array when possible, pydicom's decoders otherwise), rescaling, the RAS affine, diffusion
gradients, and the special layouts (2D radiographs, Siemens mosaics).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from ...errors import SeriesRejected
from ..files import reading
from ..volume import Volume
from .model import _PROJECTION_MODALITIES, DicomSeries, _FileInfo, _Frame, _workers
from .probe import _probe
from .series import _split_frames


_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _volume_diffusion(frames_tk: list[tuple[_Frame, int, int]], n_t: int, path: Path) -> dict | None:
    """Per-volume b-values and RAS gradient directions of a 4D series (None when no frame has a b-value). Every slice
    of one volume must carry the same values: otherwise the volume order is not the diffusion order and the series
    is refused."""
    if n_t < 2 or all(fr.bval is None for fr, _, _ in frames_tk):
        return None
    bvals = np.full(n_t, np.nan)
    dirs = np.full((n_t, 3), np.nan)
    for fr, t, _ in frames_tk:
        b = 0.0 if fr.bval is None else fr.bval
        d = np.zeros(3) if fr.bdir is None or b == 0 else fr.bdir
        if np.isnan(bvals[t]):
            bvals[t], dirs[t] = b, d
        elif abs(bvals[t] - b) > 1e-3 * max(1.0, abs(b)) or np.max(np.abs(dirs[t] - d)) > 1e-4:
            raise SeriesRejected(path, f"diffusion series: the slices of volume {t + 1} have different b-values or "
                                       "gradient directions (volumes cannot be told apart)")
    return {"bvals": bvals, "dirs_ras": dirs * np.array([-1.0, -1.0, 1.0])}



# reading


def _frames_of(series: DicomSeries) -> list[_Frame]:
    if series._frames is not None:
        return series._frames
    frames: list[_Frame] = []
    with ThreadPoolExecutor(_workers(len(series.files))) as pool:
        results = list(pool.map(_probe, [Path(p) for p in series.files]))
    for p, (fr, reason) in zip(series.files, results):
        if fr is None:
            raise SeriesRejected(p, reason)
        frames.extend(fr)
    if not frames:
        raise SeriesRejected(series.files[0] if series.files else None, "missing pixel data")
    groups = _split_frames(frames[0].info.series_uid, frames)
    for suid, g in groups:
        if suid == series.uid:
            return g
    if len(groups) == 1:
        return groups[0][1]
    raise SeriesRejected(series.files[0], f"files hold {len(groups)} different series; scan the folder first")


def _native_dtype(info: _FileInfo) -> np.dtype:
    if info.bits_alloc not in (8, 16, 32):
        raise SeriesRejected(info.path, f"unsupported BitsAllocated={info.bits_alloc}")
    return np.dtype(("<i" if info.pixel_rep else "<u") + str(info.bits_alloc // 8))


def _read_pixels(info: _FileInfo) -> np.ndarray:
    """All frames of one file as (frames, rows, cols) stored values."""
    expected = info.rows * info.cols * info.n_frames
    if info.pixel_offset is not None:
        dt = _native_dtype(info)
        nbytes = expected * dt.itemsize
        if info.pixel_length < nbytes:
            raise SeriesRejected(info.path, f"truncated or unreadable DICOM: pixel data has {info.pixel_length} "
                                            f"bytes, Rows x Columns x frames needs {nbytes}")
        with open(info.path, "rb") as fp:
            fp.seek(info.pixel_offset)
            buf = fp.read(nbytes)
        if len(buf) < nbytes:
            raise SeriesRejected(info.path, "truncated or unreadable DICOM: pixel data ends early")
        arr = np.frombuffer(buf, dtype=dt).reshape(info.n_frames, info.rows, info.cols)
        if 0 < info.bits_stored < info.bits_alloc:
            if info.pixel_rep:
                shift = info.bits_alloc - info.bits_stored
                arr = (arr << shift) >> shift  # sign-extend the stored bits
            else:
                arr = arr & _stored_mask(info)  # drop the bits above HighBit
        return arr
    try:
        with open(info.path, "rb") as fp:
            ds = pydicom.dcmread(BytesIO(fp.read()))
        # pydicom 3 already drops the bits above HighBit (unsigned) or sign-extends from it (signed): used as is.
        arr = ds.pixel_array
    except Exception as exc:
        raise SeriesRejected(info.path, f"cannot decode pixel data ({pydicom.uid.UID(info.ts).name}): "
                                        f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    return np.asarray(arr).reshape(info.n_frames, info.rows, info.cols)


def _read_native_into(info: _FileInfo, slots: list, out: np.ndarray) -> bool:
    """Read uncompressed frames straight into their slots of ``out`` (no intermediate copy; unsigned data with
    BitsStored < BitsAllocated is masked in place). False when the file needs the general path (other dtype, sign
    extension, compressed)."""
    if info.pixel_offset is None or info.pixel_rep and info.bits_stored < info.bits_alloc:
        return False
    try:
        dt = _native_dtype(info)
    except SeriesRejected:
        return False
    if dt != out.dtype:
        return False
    frame_bytes = info.rows * info.cols * dt.itemsize
    if info.pixel_length < frame_bytes * info.n_frames:
        return False
    with open(info.path, "rb", buffering=0) as fp:
        for idx, t, k in slots:
            fp.seek(info.pixel_offset + idx * frame_bytes)
            if fp.readinto(memoryview(out[t, k]).cast("B")) != frame_bytes:
                raise SeriesRejected(info.path, "truncated or unreadable DICOM: pixel data ends early")
            if 0 < info.bits_stored < info.bits_alloc:
                np.bitwise_and(out[t, k], _stored_mask(info), out=out[t, k])
    return True


def _stored_mask(info: _FileInfo) -> int:
    """Mask of the stored bits of unsigned data: BitsStored low bits (HighBit = BitsStored - 1, the only value the
    standard allows for these images). Scanners (e.g. 12-bit data, Siemens XA) may leave other bits set above
    HighBit; the standard says they are not part of the value, and pydicom and dcm2niix drop them too."""
    return (1 << info.bits_stored) - 1


def _check_common(frames: list[_Frame], first_path: Path) -> None:
    infos = list({id(f.info): f.info for f in frames}.values())
    for info in infos:
        if not info.has_pixels:
            raise SeriesRejected(info.path, "missing pixel data")
    sizes = sorted({(i.rows, i.cols) for i in infos})
    if len(sizes) > 1:
        raise SeriesRejected(first_path, "inconsistent rows/cols: " + ", ".join(f"{r}x{c}" for r, c in sizes))
    if any(i.spp != 1 for i in infos):
        raise SeriesRejected(first_path, f"colour images not supported (SamplesPerPixel={infos[0].spp})")
    if any(i.rows <= 0 or i.cols <= 0 for i in infos):
        raise SeriesRejected(first_path, "missing pixel data (Rows/Columns are 0)")
    sp = {f.spacing for f in frames if f.spacing is not None}
    if len(sp) > 1 and max(abs(a[0] - b[0]) + abs(a[1] - b[1]) for a in sp for b in sp) > 1e-4:
        raise SeriesRejected(first_path, "inconsistent pixel spacing")


def _lps_to_ras(row_cos, col_cos, spacing, origin, slice_vec) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = origin
    return _RAS @ lps


def _apply_rescale(raw: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """``raw`` is (T, Z, rows, cols); slopes/intercepts are (T, Z). Integer output where possible."""
    if np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)):
        if np.all(intercepts == 0):
            return raw
        raw_lo, raw_hi = float(raw.min()), float(raw.max())
        lo, hi = raw_lo + float(intercepts.min()), raw_hi + float(intercepts.max())
        for dt in (np.int16, np.uint16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                break
        else:
            dt = np.float32
        if dt is not np.float32 and raw.dtype.itemsize == np.dtype(dt).itemsize and raw.flags.writeable \
                and np.iinfo(dt).min <= raw_lo and raw_hi <= np.iinfo(dt).max:
            out = raw.view(dt)  # same values in the same bytes: add in place, no copy
        else:
            out = raw.astype(dt)
        if np.all(intercepts == intercepts.flat[0]):
            out += dt(intercepts.flat[0])
        else:
            out += intercepts.astype(dt)[:, :, None, None]
        return out
    out = raw.astype(np.float32)
    out *= slopes.astype(np.float32)[:, :, None, None]
    out += intercepts.astype(np.float32)[:, :, None, None]
    return out


def _scaling_name(frames: list[_Frame]) -> str:
    """Which value mapping the series used (see _scaling): "philips_fp" if any frame used the Philips precise
    values, else "rescale" if any frame had a RescaleSlope/Intercept other than 1/0, else "none"."""
    kinds = {f.scaling for f in frames}
    return next((k for k in ("philips_fp", "rescale") if k in kinds), "none")


def _meta(frames: list[_Frame], **extra) -> dict:
    infos = list({id(f.info): f.info for f in frames}.values())
    tss = sorted({UID(i.ts).name for i in infos})
    manu = sorted({i.manufacturer for i in infos if i.manufacturer})
    meta = {"transfer_syntaxes": tss, "n_files": len(infos), "n_frames": len(frames),
            "manufacturer": manu[0] if len(manu) == 1 else ", ".join(manu), "rows": infos[0].rows,
            "cols": infos[0].cols, "bits_stored": infos[0].bits_stored, "photometric": infos[0].photometric,
            "is_4d": False, "enhanced": any(i.enhanced for i in infos), "mosaic": any(i.is_mosaic for i in infos),
            "scaling": _scaling_name(frames)}
    meta.update(extra)
    return meta


def _fill(frames_slots: list[tuple[_Frame, int, int]], shape_tz: tuple[int, int], rows: int, cols: int):
    """Read every file once (thread pool) and place its frames at (t, k). Returns (T, Z, rows, cols) raw array."""
    by_file: dict[int, tuple[_FileInfo, list]] = {}
    for fr, t, k in frames_slots:
        by_file.setdefault(id(fr.info), (fr.info, []))[1].append((fr.index, t, k))
    items = list(by_file.values())
    out: np.ndarray | None = None
    first = _read_pixels(items[0][0])
    dtype = first.dtype

    def place(arr, slots):
        for idx, t, k in slots:
            out[t, k] = arr[idx]

    out = np.empty((shape_tz[0], shape_tz[1], rows, cols), dtype=dtype)
    place(first, items[0][1])

    def job(item):
        info, slots = item
        with reading(info.path):
            if _read_native_into(info, slots, out):
                return None
            arr = _read_pixels(info)
        if arr.dtype != out.dtype:
            return arr, slots
        place(arr, slots)
        return None

    mixed = []
    with ThreadPoolExecutor(_workers(len(items) - 1)) as pool:
        for res in pool.map(job, items[1:]):
            if res is not None:
                mixed.append(res)
    if mixed:
        dt = np.result_type(out.dtype, *[a.dtype for a, _ in mixed])
        out = out.astype(dt)
        for arr, slots in mixed:
            place(arr, slots)
    return out


def read_series(series: DicomSeries) -> Volume:
    """Read one series into a Volume (2D, 3D or 4D). Raises SeriesRejected(path, reason) when the geometry would be
    wrong or the pixels cannot be read; see the module docstring for what is supported."""
    frames = _frames_of(series)
    if not frames:
        raise SeriesRejected(series.files[0] if series.files else None, "missing pixel data")
    first_path = frames[0].info.path
    _check_common(frames, first_path)
    infos = list({id(f.info): f.info for f in frames}.values())
    modality = frames[0].info.modality or "OT"
    rows, cols = infos[0].rows, infos[0].cols

    if any(i.is_mosaic for i in infos):
        return _read_mosaic(frames, infos, modality)

    with_geo = [f for f in frames if f.ipp is not None and f.iop is not None]
    if len(with_geo) < len(frames):
        if len(frames) == 1:
            return _read_2d(frames[0], modality)
        if infos[0].n_frames > 1 and len(infos) == 1:
            raise SeriesRejected(first_path, "multi-frame image without per-frame geometry")
        raise SeriesRejected(first_path, "no slice geometry (ImagePositionPatient/ImageOrientationPatient missing)")
    if len(frames) == 1 and modality in _PROJECTION_MODALITIES:
        return _read_2d(frames[0], modality)

    iop = frames[0].iop
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    nn = np.linalg.norm(normal)
    if nn < 1e-6:
        raise SeriesRejected(first_path, "invalid ImageOrientationPatient (row and column cosines are parallel)")
    normal = normal / nn
    spacing = frames[0].spacing or (1.0, 1.0)

    # positions along the normal, clustered (a 4D series repeats each position T times)
    d = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    order = np.argsort(d, kind="stable")
    clusters: list[list[int]] = []
    for idx in order:
        if clusters and abs(d[idx] - d[clusters[-1][0]]) <= 1e-2:
            clusters[-1].append(int(idx))
        else:
            clusters.append([int(idx)])
    counts = {len(c) for c in clusters}
    if len(counts) > 1:
        raise SeriesRejected(first_path, "inconsistent number of images per slice position "
                                         f"({min(counts)} to {max(counts)}): duplicate slices or an incomplete "
                                         "4D series")
    n_t = counts.pop()
    n_z = len(clusters)
    for c in clusters:
        c.sort(key=lambda i: frames[i].tkey)
    pos = np.array([frames[c[0]].ipp for c in clusters])  # first time point
    dz = np.array([d[c[0]] for c in clusters])
    tilt = max((f.info.gantry_tilt for f in frames), key=abs)
    _check_broken(series, first_path, normal, dz, steps_known=n_z >= 2)

    if n_z >= 2:
        steps = np.diff(dz)
        med = float(np.median(steps))
        if n_z >= 3 and steps.max() > 1.5 * med:
            raise SeriesRejected(first_path, f"missing slices: gap of {steps.max():.4g} mm where the slice spacing "
                                             f"is {med:.4g} mm")
        if np.max(np.abs(steps - med)) > max(0.01 * med, 5e-3):
            raise SeriesRejected(first_path, f"non-uniform slice spacing: steps from {steps.min():.4g} to "
                                             f"{steps.max():.4g} mm")
        rel = pos - pos[0]
        along = rel @ normal
        perp = np.linalg.norm(rel - along[:, None] * normal[None, :], axis=1)
        if np.any(perp > 0.01 + 2e-3 * np.abs(along)):
            angle = math.degrees(math.atan2(perp[-1], abs(along[-1]))) if along[-1] else 90.0
            msg = f"gantry tilt / sheared slice geometry: slice positions deviate {angle:.2f} degrees from the " \
                  "slice normal"
            if tilt:
                msg += f" (GantryDetectorTilt {tilt:g})"
            raise SeriesRejected(first_path, msg)
        slice_vec = (pos[-1] - pos[0]) / (n_z - 1)
    else:
        f0 = frames[0]
        slice_vec = normal * float(f0.between or f0.thickness or 1.0)

    slots = [(frames[i], t, k) for k, c in enumerate(clusters) for t, i in enumerate(c)]
    raw = _fill(slots, (n_t, n_z), rows, cols)
    slopes = np.empty((n_t, n_z))
    icpts = np.empty((n_t, n_z))
    for fr, t, k in slots:
        slopes[t, k] = fr.slope
        icpts[t, k] = fr.intercept
    vals = _apply_rescale(raw, slopes, icpts)
    data = vals.transpose(3, 2, 1, 0)  # (cols, rows, Z, T): F-contiguous, written by nibabel without a copy
    if n_t == 1:
        data = data[..., 0]
    affine = _lps_to_ras(row_cos, col_cos, spacing, pos[0], slice_vec)
    return Volume(data=data, affine=affine, modality=modality, meta=_meta(frames, is_4d=n_t > 1),
                  diffusion=_volume_diffusion(slots, n_t, first_path))


def _check_broken(series: DicomSeries, first_path: Path, normal: np.ndarray, dz: np.ndarray, *,
                  steps_known: bool) -> None:
    """Refuse a series that lost a slice to a truncated file where the geometry checks cannot see it.

    A truncated file between two readable slices leaves a gap, which the spacing check below refuses as "missing
    slices"; one beyond the first or last readable slice leaves none: the series would be written one slice short
    without a word. Such a file (its position read from what is left of its header), or one whose position cannot be
    read at all, refuses the series here ("edge slice unreadable" / "slice unreadable")."""
    if not series.broken:
        return
    tol = 1e-2 if not steps_known else max(1e-2, 0.25 * float(np.median(np.abs(np.diff(dz)))))
    lo, hi = float(dz.min()), float(dz.max())
    edge = unknown = 0
    for _, ipp in series.broken:
        if ipp is None:
            unknown += 1
            continue
        at = float(np.dot(ipp, normal))
        if at < lo - tol or at > hi + tol:
            edge += 1
    if edge:
        n = "1 slice file" if edge == 1 else f"{edge} slice files"
        raise SeriesRejected(first_path, f"edge slice unreadable: {n} beyond the first or last readable slice "
                                         f"{'is' if edge == 1 else 'are'} truncated or unreadable; refused rather "
                                         f"than written {edge} slice{'' if edge == 1 else 's'} short")
    if unknown:
        n = "1 file" if unknown == 1 else f"{unknown} files"
        raise SeriesRejected(first_path, f"slice unreadable: {n} of this series {'is' if unknown == 1 else 'are'} "
                                         "truncated or unreadable at an unknown slice position; refused rather "
                                         "than written incomplete")


def _read_2d(frame: _Frame, modality: str) -> Volume:
    info = frame.info
    raw = _read_pixels(info)[frame.index]
    vals = _apply_rescale(raw[None, None], np.array([[frame.slope]]), np.array([[frame.intercept]]))[0, 0]
    sp = frame.spacing or (1.0, 1.0)
    if frame.iop is not None:
        row_cos, col_cos = frame.iop[:3], frame.iop[3:]
        normal = np.cross(row_cos, col_cos)
    else:
        row_cos, col_cos, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
    if frame.ipp is not None:
        origin = frame.ipp
    else:  # no position: centre the image on the origin, as dcm2niix does
        origin = -row_cos * sp[1] * (info.cols - 1) / 2.0 - col_cos * sp[0] * (info.rows - 1) / 2.0
    th = frame.between or frame.thickness or 1.0
    affine = _lps_to_ras(row_cos, col_cos, sp, origin, normal * th)
    return Volume(data=vals.T, affine=affine, modality=modality,
                  meta=_meta([frame], is_2d=True, spacing_assumed=frame.spacing is None))


def _read_mosaic(frames: list[_Frame], infos: list[_FileInfo], modality: str) -> Volume:
    first = infos[0]
    path = first.path

    def refuse(why):
        raise SeriesRejected(path, f"Siemens mosaic not supported: {why}")

    if not all(i.is_mosaic for i in infos):
        refuse("series mixes mosaic and plain images")
    if any(i.n_frames != 1 for i in infos):
        refuse("multi-frame mosaic")
    n = first.mosaic_n
    if not n or any(i.mosaic_n != n for i in infos):
        refuse("NumberOfImagesInMosaic missing or inconsistent")
    if first.mosaic_normal is None:
        refuse("no SliceNormalVector in the CSA image header")
    f0 = frames[0]
    if f0.ipp is None or f0.iop is None or f0.spacing is None:
        refuse("missing ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    if any(f.ipp is None or np.max(np.abs(f.ipp - f0.ipp)) > 1e-3 for f in frames):
        refuse("volumes of the series have different positions")
    m = math.ceil(math.sqrt(n))
    if first.rows % m or first.cols % m:
        refuse(f"{first.rows}x{first.cols} image does not divide into {m}x{m} tiles")
    tr, tc = first.rows // m, first.cols // m
    row_cos, col_cos = f0.iop[:3], f0.iop[3:]
    cross = np.cross(row_cos, col_cos)
    cross /= np.linalg.norm(cross)
    csa_n = np.asarray(first.mosaic_normal, dtype=np.float64)
    if abs(abs(float(np.dot(csa_n, cross))) - 1.0) > 1e-3:
        refuse("CSA SliceNormalVector is not perpendicular to the image plane")
    normal = cross if float(np.dot(csa_n, cross)) > 0 else -cross
    dz = first.mosaic_spacing
    if not dz or dz <= 0:
        refuse("no slice spacing")
    sp = f0.spacing  # (row spacing, column spacing)
    # ImagePositionPatient refers to the top-left of the whole mosaic; move it to the top-left of the first tile.
    origin = f0.ipp + row_cos * sp[1] * (first.cols - tc) / 2.0 + col_cos * sp[0] * (first.rows - tr) / 2.0
    order = sorted(range(len(frames)), key=lambda i: frames[i].tkey)
    n_t = len(frames)
    raw = None
    with ThreadPoolExecutor(_workers(n_t)) as pool:
        arrays = list(pool.map(lambda i: _read_pixels(frames[i].info)[frames[i].index], order))
    raw = np.empty((n_t, n, tr, tc), dtype=np.result_type(*[a.dtype for a in arrays]))
    for t, a in enumerate(arrays):
        raw[t] = a.reshape(m, tr, m, tc).transpose(0, 2, 1, 3).reshape(m * m, tr, tc)[:n]
    slopes = np.array([[frames[i].slope] * n for i in order])
    icpts = np.array([[frames[i].intercept] * n for i in order])
    vals = _apply_rescale(raw, slopes, icpts)
    data = vals.transpose(3, 2, 1, 0)
    if n_t == 1:
        data = data[..., 0]
    affine = _lps_to_ras(row_cos, col_cos, sp, origin, normal * dz)
    meta = _meta(frames, is_4d=n_t > 1, rows=tr, cols=tc, mosaic=True)
    diffusion = _volume_diffusion([(frames[i], t, 0) for t, i in enumerate(order)], n_t, path)
    return Volume(data=data, affine=affine, modality=modality, meta=meta, diffusion=diffusion)
