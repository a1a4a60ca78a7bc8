"""Preprocess step: ingested NIfTI -> cropped, normalized 2D slices ready for training, plus a subject-level split.

For each subject (3D tasks):
1. A crop grid is chosen: RAS-aligned (canonical orientation), ``roi_mm`` wide, in-plane spacing
   ``roi_mm / image_size`` (so slices come out ``image_size`` square) and ``slice_spacing_mm`` along the slicing axis.
   Its centre is the labeled structures' bounding-box centre (rule ``labels``) or, label-free, the centre of the body
   mask's bounding box plus ``roi_offset_mm`` (rule ``foreground``; always used for a site that is a target in any
   direction, so a target's labels never influence its inputs). A body-centred box follows the field of view where
   the field of view cuts the body (cardiac MR and CT): sites whose scanners centre the field of view differently get
   the anatomy at different places in their crops, a geometric shift no intensity adaptation removes; a site's own
   ``roi_offset_mm`` (``sites.<site>.roi_offset_mm``) moves its boxes to match.
2. The image is resampled onto that grid in one interpolation (reorient + resample + crop; linear, Gaussian
   anti-aliasing when downsampling); labels go through per-label linear interpolation + argmax.
3. Intensities: CT is clipped to the training split's foreground percentiles (``ct_clip_percentiles``, HU) and
   z-scored with the training split's foreground mean/std (one set of statistics per site, as nnU-Net does); other
   modalities are z-scored per volume after cutting the top ``mr_top_cut`` of the histogram (SIFA's MR recipe).
   Then every value is mapped linearly to [-1, 1] with the min/max of the *training split only* and clipped.
4. Volumes are cut into slices along ``slice_axis``.

2D tasks (chest X-ray): the image is padded to a square around its centre and resampled to ``image_size``; the
intensity steps are the non-CT ones.

Output ``<prepared>/<site>/`` (written to a temporary folder, then swapped in whole)::

    {train,val,test}.npz          images (N, H, W) float32 in [-1, 1], subject (N,) int, slice (N,) int
    {train,val,test}_labels.npz   labels (N, H, W) uint8 (only when the site has labels; read by source training,
                                  the supervised upper bound and never by adaptation on a target)
    subjects.json                 per subject: id, split, crop grid (affine, shape), original grid, slice axis, rows in
                                  the split arrays -> what prediction needs to map slices back to the original grid
    norm.json                     the intensity statistics (from the training split) and settings used

The split is subject-level and seeded (``seed`` + site name): test = ``split.test`` of subjects (20% as in the
papers), val = ``split.val``, the rest train. Where the manifest gives items a ``patient`` key (DICOM PatientID or the
site's ``patients`` CSV, hashed at ingest), the images of one patient are drawn together, so that no patient is in
two splits (:func:`split_by_content`).

Classification tasks (image-level labels from the manifest's ``class_label``): every image is one "subject" with one
slice, the whole image padded square and resized to ``image_size`` with the 2D intensity steps above (as the chest
X-ray segmentation task); ``{split}_labels.npz`` holds ``labels`` (N,) uint8 class ids (255 = no label). The split is
stratified by class (the seeded split above, within each class and within the unlabeled images), so that validation
and test keep the site's class balance: a target's labels decide which images are held out, never what any image
looks like, and they never reach an adaptation method (its training split is read without labels; subjects.json
carries no classes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..config import Settings
from ..data.geometry import AXES, crop_grid, resample, resample_labels, voxel_to_world
from ..errors import InputError, LabelValuesError, NothingUsableError
from ..io.atomic import atomic_path, write_json

log = logging.getLogger("siteadapt.preprocess")

SPLITS = ("train", "val", "test")


def split_by_content(items: list[dict], seed: int, site: str, val: float, test: float,
                     strata: dict[str, object] | None = None) -> dict[str, str]:
    """The site's split, keyed by item id, drawn on the items' content hashes (``content_sha256`` of the ingest
    manifest) rather than on their ids: ids are keyed pseudonyms, and a checkout with another de-identification key
    must get the same split (the same table) from the same data. Items with identical pixels share a key and so a
    split. Manifests written before content hashes existed fall back to the ids.

    Patient-level: items that share a ``patient`` (the manifest's keyed patient hash) are one group, drawn as one, so
    no patient lands in two splits; groups are joined through shared content as well (union of both relations). A
    group is drawn on its smallest content hash, which does not depend on the key either (the grouping does not:
    equal hashes under one key are equal patients). An item without ``patient`` is its own patient, so a site where
    every item has its own patient gets exactly the image-level split. With ``strata``, a group's stratum is its
    most frequent class (ties: the first in sorted text order)."""
    content = {it["id"]: it.get("content_sha256") or f"id:{it['id']}" for it in items}
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for it in items:
        a = find(f"c:{content[it['id']]}")
        if it.get("patient"):
            b = find(f"p:{it['patient']}")
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for i in content:
        members.setdefault(find(f"c:{content[i]}"), []).append(i)
    key = {}
    for ids in members.values():
        k = min(content[i] for i in ids)
        key |= {i: k for i in ids}
    by_key_strata = None
    if strata is not None:
        votes: dict[str, dict[str, int]] = {}
        labels: dict[str, object] = {}
        for i, c in strata.items():
            if i in key:
                votes.setdefault(key[i], {}).setdefault(str(c), 0)
                votes[key[i]][str(c)] += 1
                labels[f"{key[i]}|{c}"] = c
        by_key_strata = {}
        for k, v in votes.items():
            best = max(sorted(v), key=lambda c: v[c])
            by_key_strata[k] = labels[f"{k}|{best}"]
    by_key = split_subjects(sorted(set(key.values())), seed, site, val, test, strata=by_key_strata)
    grouped = [ids for ids in members.values() if len({content[i] for i in ids}) > 1]
    if grouped:
        log.info("%s: split by patient: %d images in %d groups of one patient each (the rest one image per patient)",
                 site, sum(len(g) for g in grouped), len(grouped))
    return {i: by_key[k] for i, k in key.items()}


def split_subjects(ids: list[str], seed: int, site: str, val: float, test: float,
                   strata: dict[str, object] | None = None) -> dict[str, str]:
    """Seeded subject-level split; stable for a seed whatever the order of ``ids``. With ``strata`` (id -> class),
    each stratum is split on its own (stratified split)."""
    if strata is not None:
        out: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for i in ids:
            groups.setdefault(str(strata.get(i)), []).append(i)
        for g, members in sorted(groups.items()):
            out |= split_subjects(members, seed, f"{site}|{g}", val, test) if len(members) >= 3 else \
                {i: "train" for i in members}
        if not any(v == "train" for v in out.values()):
            raise InputError(None, f"site {site}: {len(ids)} images are too few for a train/val/test split")
        return out
    ids = sorted(ids)
    h = int(hashlib.sha256(f"{seed}|{site}".encode()).hexdigest()[:8], 16)
    order = np.random.default_rng(h).permutation(len(ids))
    n = len(ids)
    n_test = int(round(test * n)) if test > 0 else 0
    n_val = int(round(val * n)) if val > 0 else 0
    if n >= 3:
        n_test = max(n_test, 1 if test > 0 else 0)
        n_val = max(n_val, 1 if val > 0 else 0)
    if n - n_test - n_val < 1:
        raise InputError(None, f"site {site}: {n} subjects are too few for a train/val/test split")
    out = {}
    for rank, idx in enumerate(order):
        out[ids[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def body_mask(data: np.ndarray) -> np.ndarray:
    """Label-free foreground: Otsu threshold of a smoothed image, largest component, holes filled (3D or 2D)."""
    img = ndimage.gaussian_filter(data.astype(np.float32), 1.0)
    lo, hi = np.percentile(img, [1, 99])
    if hi <= lo:
        return np.ones(data.shape, bool)
    hist, edges = np.histogram(np.clip(img, lo, hi), bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    thr = centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)]
    mask = img > thr
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.ones(data.shape, bool)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def _coarse_mask_centre(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centre of the body mask's bounding box, computed on a ~4 mm copy (fast on big CTs)."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)[: data.ndim]
    step = [max(1, int(4.0 // max(s, 1e-3))) for s in sp]
    small = data[tuple(slice(None, None, s) for s in step)]
    mask = body_mask(small)
    idx = np.argwhere(mask)
    if idx.size == 0:
        idx = np.argwhere(np.ones(small.shape, bool))
    mid = (idx.min(0) + idx.max(0)) / 2.0 * np.asarray(step)
    if data.ndim == 2:
        mid = np.append(mid, 0.0)
    return voxel_to_world(affine, mid)


def _label_centre(label: np.ndarray, affine: np.ndarray, ids: list[int]) -> np.ndarray | None:
    idx = np.argwhere(np.isin(label, ids))
    if idx.size == 0:
        return None
    mid = (idx.min(0) + idx.max(0)) / 2.0
    if label.ndim == 2:
        mid = np.append(mid, 0.0)
    return voxel_to_world(affine, mid)


def _intensity_stats_ct(fg_values: list[np.ndarray], pct) -> dict:
    vals = np.concatenate([v.ravel() for v in fg_values]).astype(np.float64)
    if vals.size > 5_000_000:  # a fixed-stride subsample keeps this deterministic and bounded
        vals = vals[:: vals.size // 5_000_000 + 1]
    lo, hi = np.percentile(vals, pct)
    clipped = np.clip(vals, lo, hi)
    return {"clip_low": float(lo), "clip_high": float(hi), "mean": float(clipped.mean()),
            "std": float(clipped.std() or 1.0)}


def _normalize_ct(x: np.ndarray, st: dict) -> np.ndarray:
    return (np.clip(x, st["clip_low"], st["clip_high"]) - st["mean"]) / st["std"]


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine.copy()


def _check_usable(site: str, task, items: list[dict], rejected: list[dict], mpath: Path) -> None:
    """Refuse a site preprocessing would turn into nothing or into silent background. No item: NothingUsableError
    (exit 3) naming the ingest refusals, counted per reason (no file names or paths). Segmentation label maps whose
    values (the manifest's ``label_values``) are not the task's structure ids: LabelValuesError (exit 4), since
    resampling keeps only the task's ids (an ingest made before ingest checked values, or ``structures`` edited
    since: re-run ingest)."""
    if not items:
        raise NothingUsableError(f"site {site} has no ingested items: ingest refused all {len(rejected)} inputs "
                                 f"({NothingUsableError.count_refusals(rejected)}); the reasons are in {mpath}")
    if task.kind != "segmentation":
        return
    ids = set(task.structures.values())
    bad = [it for it in items if it.get("label") and not set(it.get("label_values") or []) <= ids]
    if bad:
        found = sorted({int(v) for it in bad for v in it.get("label_values") or []})
        raise LabelValuesError(
            f"site {site}: {len(bad)} of {sum(1 for it in items if it.get('label'))} ingested label maps hold values "
            f"that are not the task's ids: values found {found} (besides 0), expected {sorted({0, *ids})} (items "
            f"{', '.join(it['id'] for it in bad[:5])}{' ...' if len(bad) > 5 else ''}); re-run `siteadapt ingest "
            f"--site {site}` (it checks values and applies sites.{site}.label_map)")


def preprocess(settings: Settings, site: str) -> dict:
    s = settings
    site_cfg = s.site(site)
    task = s.task_of(site)
    pp = task.preprocess
    prof = s.active
    in_dir = s.paths.ingested / site
    mpath = in_dir / "manifest.json"
    if not mpath.is_file():
        raise InputError(mpath, f"no manifest for site {site}: run `siteadapt ingest --site {site}` first")
    manifest = json.loads(mpath.read_text())
    items = [it for it in manifest["items"]]
    _check_usable(site, task, items, manifest.get("rejected") or [], mpath)
    ids = list(task.structures.values())
    rule = s.roi_rule(site)
    classify = task.kind == "classification"
    classes = {it["id"]: it.get("class_label") for it in items} if classify else None
    split = split_by_content(items, s.seed, site, pp.split.val, pp.split.test, strata=classes)

    # ---- 1. choose each subject's crop grid and resample ------------------------------------------------------
    records, crops, crop_labels, ct_fg, vol_stats = [], {}, {}, {}, {}
    # subjects (and so the slices of each shard) in content-hash order, not id order: the ids are keyed pseudonyms, and
    # the order of the training slices decides which batches a seeded sampler draws, so id order gave each checkout
    # (each de-identification key) other trained models from the same data
    for it in sorted(items, key=lambda r: (r.get("content_sha256") or "", r["id"])):
        data, affine = _load(in_dir / it["image"])
        if task.dims == 3 and (data.ndim != 3 or min(data.shape) < 2):
            raise InputError(in_dir / it["image"], f"item {it['id']}: a 3D task needs a 3D volume, got shape "
                                                   f"{tuple(data.shape)}")
        if task.dims == 2:
            if data.ndim == 3 and data.shape[2] == 1:
                data = data[..., 0]
            if data.ndim != 2:
                raise InputError(in_dir / it["image"], f"item {it['id']}: a 2D task needs 2D images, got shape "
                                                       f"{tuple(data.shape)}")
        label = None
        if it.get("label"):
            label = np.asanyarray(nib.load(str(in_dir / it["label"])).dataobj).astype(np.uint8)
            label = label.reshape(data.shape)
        modality = (it.get("modality") or site_cfg.modality or "OT").upper()
        if task.dims == 3:
            ax = AXES[pp.slice_axis]
            shape = [prof.image_size] * 3
            spacing = [pp.roi_mm[i] / prof.image_size for i in range(3)]
            spacing[ax] = prof.slice_spacing_mm
            shape[ax] = max(1, int(round(pp.roi_mm[ax] / prof.slice_spacing_mm)))
            centre = None
            if rule == "labels":
                if label is None:
                    raise InputError(in_dir / it["image"], f"item {it['id']}: roi_rule 'labels' but the item has no "
                                                           "label (use roi_rule: foreground)")
                centre = _label_centre(label, affine, ids)
            if centre is None:
                offset = site_cfg.roi_offset_mm if site_cfg.roi_offset_mm is not None else pp.roi_offset_mm
                centre = _coarse_mask_centre(data, affine) + np.asarray(offset)
        else:
            ax = 2
            sp_in = np.linalg.norm(affine[:3, :2], axis=0)
            extent = max(data.shape[0] * sp_in[0], data.shape[1] * sp_in[1])
            shape = [prof.image_size, prof.image_size, 1]
            spacing = [extent / prof.image_size, extent / prof.image_size, 1.0]
            centre = voxel_to_world(affine, [(data.shape[0] - 1) / 2, (data.shape[1] - 1) / 2, 0.0])
            # keep the image's in-plane axis directions (2D images have no patient orientation to canonicalise)
        grid = crop_grid(centre, spacing, shape)
        if task.dims == 2:
            grid[:3, :3] = np.diag(np.sign(np.diag(affine[:3, :3])) * np.asarray(spacing))
            grid[:3, 3] = centre - grid[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
        fill = float(np.percentile(data, 0.5))
        vol = resample(data, affine, grid, shape, order=1, cval=fill)
        crops[it["id"]] = vol
        if label is not None:
            crop_labels[it["id"]] = resample_labels(label, affine, grid, shape, ids=ids)
        if modality == "CT":  # foreground voxels (every 2nd voxel per axis) for the site-level CT statistics
            sub = data[tuple(slice(None, None, 2) for _ in data.shape)]
            ct_fg[it["id"]] = sub[body_mask(sub)]
        else:  # per-volume statistics from the whole original volume (no crop fill values in them)
            x = data.astype(np.float32)
            top = float(np.percentile(x, 100 * (1 - pp.mr_top_cut))) if pp.mr_top_cut > 0 else float(x.max())
            xc = np.minimum(x, top)
            vol_stats[it["id"]] = (top, float(xc.mean()), float(xc.std()) or 1.0)
        records.append({
            "id": it["id"], "split": split[it["id"]], "modality": modality,
            "grid_affine": grid.tolist(), "grid_shape": list(shape), "slice_axis": int(ax),
            "orig_affine": affine.tolist(), "orig_shape": list(data.shape),
            "image": f"{site}/{it['image']}", "label": f"{site}/{it['label']}" if it.get("label") else None,
            "crop_rule": rule if task.dims == 3 else "whole_image",
        })

    # ---- 2. intensity statistics from the training split only ---------------------------------------------------
    train_ids = [r["id"] for r in records if r["split"] == "train"]
    ct_ids = [r["id"] for r in records if r["modality"] == "CT" and r["split"] == "train"]
    ct_stats = None
    if ct_ids:
        ct_stats = _intensity_stats_ct([ct_fg[i] for i in ct_ids], pp.ct_clip_percentiles)
    normed = {}
    for r in records:
        if r["modality"] == "CT":
            if ct_stats is None:
                raise InputError(None, f"site {site}: CT subjects but none in the training split")
            normed[r["id"]] = _normalize_ct(crops[r["id"]], ct_stats)
        else:
            top, mu, sd = vol_stats[r["id"]]
            normed[r["id"]] = (np.minimum(crops[r["id"]], top) - mu) / sd
    lo = float(min(normed[i].min() for i in train_ids))
    hi = float(max(normed[i].max() for i in train_ids))
    scale = 2.0 / (hi - lo) if hi > lo else 1.0
    norm = {"to_unit_range": {"min": lo, "max": hi}, "ct": ct_stats, "mr_top_cut": pp.mr_top_cut,
            "ct_clip_percentiles": list(pp.ct_clip_percentiles), "image_size": prof.image_size,
            "slice_spacing_mm": prof.slice_spacing_mm if task.dims == 3 else None, "roi_mm": list(pp.roi_mm),
            "slice_axis": pp.slice_axis if task.dims == 3 else None, "roi_rule": rule, "seed": s.seed,
            "profile": s.profile}

    # ---- 3. slice and write (temp folder, then swap) --------------------------------------------------------------
    out_dir = s.paths.prepared / site
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site}.", dir=out_dir.parent))
    try:
        counts = {}
        has_labels = bool(crop_labels) or (classify and any(v is not None for v in classes.values()))
        for sp in SPLITS:
            imgs, labs, subj, sl = [], [], [], []
            for si, r in enumerate(records):
                if r["split"] != sp:
                    continue
                v = np.clip((normed[r["id"]] - lo) * scale - 1.0, -1.0, 1.0).astype(np.float32)
                v = np.moveaxis(v, r["slice_axis"], 0)
                r["rows"] = [sum(len(a) for a in imgs), v.shape[0]]
                imgs.append(v)
                subj.append(np.full(v.shape[0], si, np.int32))
                sl.append(np.arange(v.shape[0], dtype=np.int32))
                if has_labels and classify:
                    k = classes.get(r["id"])
                    labs.append(np.full(v.shape[0], 255 if k is None else k, np.uint8))  # 255 = no label
                elif has_labels:
                    lab = crop_labels.get(r["id"])
                    labs.append(np.moveaxis(lab, r["slice_axis"], 0) if lab is not None
                                else np.full(v.shape, 255, np.uint8))  # 255 = unlabeled subject
            hw = (prof.image_size, prof.image_size)
            arr = np.concatenate(imgs) if imgs else np.zeros((0, *hw), np.float32)
            with atomic_path(tmp / f"{sp}.npz") as t:
                np.savez(t, images=arr, subject=np.concatenate(subj) if subj else np.zeros(0, np.int32),
                         slice=np.concatenate(sl) if sl else np.zeros(0, np.int32))
            if has_labels:
                with atomic_path(tmp / f"{sp}_labels.npz") as t:
                    np.savez(t, labels=np.concatenate(labs) if labs else
                             np.zeros((0,) if classify else (0, *hw), np.uint8))
            counts[sp] = {"subjects": sum(r["split"] == sp for r in records), "slices": int(arr.shape[0])}
        write_json(tmp / "subjects.json", {"site": site, "task": site_cfg.task, "dims": task.dims, "kind": task.kind,
                                            "structures": task.structures, "classes": task.classes,
                                            "subjects": records})
        write_json(tmp / "norm.json", norm)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = ", ".join(f"{k}: {v['subjects']} subjects / {v['slices']} slices" for k, v in counts.items())
    log.info("%s: preprocessed (%s) -> %s", site, summary, out_dir)
    return {"out_dir": out_dir, "counts": counts, "summary": summary}


def _swap_in(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
