"""Evaluate step: a method's predictions on a site's labeled evaluation subjects -> metrics JSON + overlay PNGs.

- Subjects: the site's ``test`` split (subject-level, from preprocessing). For a target site, its labels are read here
  and nowhere else in the adaptation path.
- Predictions (label maps on each subject's original grid, from ``siteadapt predict``) are post-processed as the task
  configures (largest connected component per structure, hole filling: the SeUDA paper's post-processing), then
  compared with the reference in 3D (2D for 2D tasks) per subject, distances in mm on the original voxel grid.
- Output ``<metrics>/<task>/<site>/<method>.json`` (``<method>.seed<k>.json`` for extra seeds): per metric, per
  structure and "mean" (over structures), per subject, and the mean/std over subjects with counts of NaN cases.
  The papers' "ASD" column is our ``assd`` (symmetric, pooled; see :mod:`siteadapt.metrics.segmentation`).
- Overlays ``<reports>/<task>/overlays/<site>/<method>/<id>.png`` for the first ``n_overlays`` subjects: image,
  reference and prediction on the slice with the largest reference area. 3D: the slice of the canonical (RAS) volume
  along the task's slice axis, shown with superior at the top (axial slices: anterior) and the patient's right on the
  image's right (the neurological convention, as nibabel-based viewers show RAS data); 2D: the picture the way up the
  input file shows it (its first row at the top, its first column at the left), see :func:`display_slice`.
- Label-free checks (``plausibility``: empty and fragmented predicted structures, on the raw predictions of every test
  subject, labeled or not; :mod:`siteadapt.metrics.plausibility`). A site without labels gets only these
  (``"labeled": false``, no Dice); the report's tables skip it and the promotion gates use them.

Classification tasks (TUNA-Net's protocol, :func:`evaluate_classification`): the method's scores P(positive class) of
the site's val and test images (``siteadapt predict`` writes both) and the image-level labels of the ingest manifest.
"The validation set is only used to optimize the threshold using Youden's index": the operating threshold is chosen
on the labeled **validation** split (:func:`~siteadapt.metrics.classification.youden_threshold`) and applied unchanged
to the **test** split, whose labels are used for the metrics (AUC, accuracy, sensitivity, specificity, F1) and for
nothing else. For a target site this is the one place where target validation labels are read: no adaptation method
trains or picks a checkpoint on them (the engine keeps the final iteration), they only set the operating point.
A classification site without labeled test images gets a label-free file (``"labeled": false``: the scores'
distribution only; no table row; the registry gates it on the source AUC drop). The classification counterpart of the
overlays is ``<reports>/<task>/overlays/<site>/<method>/examples.png``: test images (as the model saw them) with
their score, reference class and the decision at the threshold (the most confident correct ones and the worst errors
of each class; without labels, the highest- and lowest-scored images).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from ..config import Settings
from ..data.geometry import AXES
from ..errors import EmptyReferenceError, InputError
from ..figures import examples_title, overlay_title
from ..io.atomic import write_json
from ..layout import metrics_path, run_name
from ..metrics import classification_metrics, segmentation_metrics, summarize, youden_threshold
from ..metrics.plausibility import shape_checks, summarize_plausibility
from ..postprocess import postprocess

log = logging.getLogger("siteadapt.evaluate")


def _canonical(img: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(img).dataobj)


def display_slice(a: np.ndarray, *, two_d: bool) -> np.ndarray:
    """A 2D array in the order ``imshow`` draws it (row 0 at the top, its default ``origin="upper"``).

    2D images are stored ``[i, j]`` = (column, row) of the picture as exported (io/files.py reads a PNG as its
    transpose, io/dicom/assemble.py a radiograph likewise; the voxel-to-world affine only flips signs for LPS -> RAS and
    preprocessing keeps these axis directions), so the transpose is the input picture the way up it was saved.
    Rotating it by 90 degrees like a 3D slice (what this code once did for both) shows it upside down.
    A slice of a canonical (RAS) 3D volume is ``[first, second]`` of the two remaining RAS axes (coronal: R, S;
    axial: R, A; sagittal: A, S): rotated by 90 degrees counter-clockwise, the second axis's positive end (superior
    or anterior) is at the top and the first axis's positive end (the patient's right) is at the right."""
    return np.ascontiguousarray(a.T if two_d else np.rot90(a))


def save_overlay(image: np.ndarray, ref: np.ndarray | None, pred: np.ndarray, axis: int, path: Path, title: str,
                 n_labels: int, structures: dict[str, int] | None = None,
                 zooms: tuple[float, ...] | None = None) -> None:
    """Image | reference | prediction on the slice with the largest reference area (the largest predicted area when
    the subject has no reference: unlabeled sites). A 2-dimensional ``image`` is a 2D picture indexed (column, row),
    a 3-dimensional one a canonical (RAS) volume; :func:`display_slice` says which way up each is drawn. The figure
    (:func:`siteadapt.figures.overlay_figure`) has panels sized to the slice, ``title`` on top (see
    :func:`siteadapt.figures.overlay_title`) and a colour key of ``structures`` (name -> label value). ``zooms``:
    the size of a voxel along each axis of ``image`` (mm; see :func:`_zooms`), so that a slice of anisotropic voxels
    is drawn with its true proportions (square pixels when not given)."""
    from ..figures import overlay_figure, save_figure

    ref_title = "reference"
    if ref is None:
        ref, ref_title = np.zeros_like(pred), "reference (none)"
    pick = ref if ref.any() else pred
    if image.ndim == 2:
        im, r, p = (display_slice(a, two_d=True) for a in (image, ref, pred))
    else:
        area = (np.moveaxis(pick, axis, 0) > 0).reshape(pick.shape[axis], -1).sum(1)
        k = int(np.argmax(area))
        im, r, p = (display_slice(np.take(a, k, axis=axis), two_d=False) for a in (image, ref, pred))
    pixel_aspect = 1.0
    if zooms is not None:  # displayed rows run along the slice's second axis (2D: the picture's), columns its first
        first, second = (zooms[0], zooms[1]) if image.ndim == 2 else [z for i, z in enumerate(zooms) if i != axis]
        pixel_aspect = float(second) / float(first)
    fig = overlay_figure(im, r, p, title=title, n_labels=n_labels, structures=structures, ref_title=ref_title,
                         pixel_aspect=pixel_aspect)
    save_figure(fig, path)


def evaluate(settings: Settings, site: str, method: str, *, seed: int | None = None, n_overlays: int = 3,
             split: str = "test") -> Path:
    s = settings
    task = s.task_of(site)
    if task.kind == "classification":
        return evaluate_classification(settings, site, method, seed=seed, split=split)
    structures = task.structures
    prep = s.paths.prepared / site / "subjects.json"
    if not prep.is_file():
        raise InputError(prep, f"site {site} is not preprocessed")
    subjects = [r for r in json.loads(prep.read_text())["subjects"] if r["split"] == split]

    pred_dir = s.paths.predictions / site / run_name(s, method, seed)
    _check_references(s, site, subjects, structures, split)
    reports, used, shapes, n_drawn = [], [], [], 0
    overlay_dir = s.paths.reports / site_task(s, site) / "overlays" / site / run_name(s, method, seed)
    for r in subjects:
        pred_path = pred_dir / f"{r['id']}.nii.gz"
        if not pred_path.is_file():
            raise InputError(pred_path, f"no prediction for subject {r['id']}: run `siteadapt predict --site {site} "
                                        f"--method {method}`")
        pred_img = nib.load(str(pred_path))
        pred = np.asanyarray(pred_img.dataobj)
        shapes.append(shape_checks(pred, structures))  # label-free checks on the raw prediction
        if not r.get("label"):
            if n_drawn < n_overlays:
                _overlay_unlabeled(s, task, r, pred_img, overlay_dir / f"{r['id']}.png",
                                   overlay_title(site, method, r["id"]), 1 + max(structures.values()))
                n_drawn += 1
            continue
        ref_img = nib.load(str(s.paths.ingested / r["label"]))
        ref = np.asanyarray(ref_img.dataobj)
        if pred.shape != ref.shape or np.abs(pred_img.affine - ref_img.affine).max() > 1e-3:
            raise InputError(pred_path, f"prediction grid {pred.shape} differs from the reference grid {ref.shape}")
        pp = task.postprocess
        pred = postprocess(pred, structures, largest_cc=pp.largest_cc, fill_holes=pp.fill_holes)
        spacing = tuple(float(v) for v in np.linalg.norm(ref_img.affine[:3, :ref.ndim], axis=0))
        rep = segmentation_metrics(pred, ref, structures, spacing=spacing)
        reports.append(rep)
        used.append(r["id"])
        if n_drawn < n_overlays:
            img = nib.load(str(s.paths.ingested / r["image"]))
            if ref.ndim == 3:
                img_c, ref_c = _canonical(img), _canonical(ref_img)
                pred_c = _canonical(nib.Nifti1Image(pred.astype(np.uint8), ref_img.affine))
                axis = AXES[task.preprocess.slice_axis]
            else:
                img_c, ref_c, pred_c, axis = np.asanyarray(img.dataobj), ref, pred, 0
            save_overlay(img_c, ref_c, pred_c, axis, overlay_dir / f"{r['id']}.png",
                         overlay_title(site, method, r["id"], rep["dice"]["mean"]),
                         1 + max(structures.values()), structures, _zooms(ref_img, canonical=ref.ndim == 3))
            n_drawn += 1
    if not shapes:
        raise InputError(prep, f"site {site} has no subjects in its {split} split to evaluate on")
    plausibility = {**summarize_plausibility(shapes), "per_subject": [
        {"id": r["id"], **sh} for r, sh in zip(subjects, shapes)]}
    head = {
        "task": site_task(s, site), "site": site, "method": method,
        "seed": s.seed if seed is None else seed, "split": split, "n_subjects": len(reports),
        "labeled": bool(reports), "structures": list(structures), "source_site": _source_of(s, site),
    }
    path = metrics_path(s, site, method, seed)
    if not reports:  # a site without labels: only the label-free checks (the report's tables skip such files)
        write_json(path, _nan_to_none({**head, "plausibility": plausibility}))
        log.info("%s/%s: no labeled %s subjects; label-free checks only (empty %.2f, fragmented %s) -> %s", site,
                 method, split, plausibility["empty_fraction"], plausibility["fragmented_fraction"], path)
        return path
    summary = summarize(reports)
    out = {
        **head, "units": {"distances": "mm"},
        "postprocess": task.postprocess.model_dump(),
        # per metric: structure -> value (mean over subjects), and "mean" over structures
        **{m: {k: v["mean"] for k, v in per.items()} for m, per in summary["metrics"].items()},
        "summary": summary,
        "per_subject": [{"id": i, **{m: v for m, v in rep.items()}} for i, rep in zip(used, reports)],
        "plausibility": plausibility,
    }
    write_json(path, _nan_to_none(out))
    log.info("%s/%s: mean Dice %.3f, ASSD %.2f mm over %d subjects -> %s", site, method, out["dice"]["mean"],
             out["assd"]["mean"], len(reports), path)
    return path


def _check_references(s: Settings, site: str, subjects: list[dict], structures: dict[str, int], split: str) -> None:
    """A labelled site whose reference label maps (of the ``split`` subjects) hold no voxel of any structure gets no
    metrics: every Dice would be NaN (or 0), which reads as a result. EmptyReferenceError (exit 4) before anything is
    written; checked up front so that no overlay or metrics file is left. Some empty references among non-empty ones
    are scored as usual (their NaNs are counted in the summary)."""
    labelled = [r for r in subjects if r.get("label")]
    if not labelled:
        return  # an unlabeled site: label-free checks only
    ids = list(structures.values())
    for r in labelled:
        if np.isin(np.asanyarray(nib.load(str(s.paths.ingested / r["label"])).dataobj), ids).any():
            return
    raise EmptyReferenceError(
        f"site {site}: none of the {len(labelled)} labelled {split} subjects' reference label maps holds a voxel of "
        f"any structure ({', '.join(f'{k}={v}' for k, v in structures.items())}): every Dice would be undefined. "
        f"Check the label export (values, empty masks) and sites.{site}.label_map, then re-run ingest")


def threshold_then_metrics(val_labels, val_scores, test_labels, test_scores) -> dict:
    """The classification protocol: Youden threshold from the validation set only, metrics on the test set at it."""
    chosen = youden_threshold(val_labels, val_scores, return_details=True)
    out = classification_metrics(test_labels, test_scores, chosen["threshold"])
    out["youden_on_val"] = chosen
    return out


def evaluate_classification(settings: Settings, site: str, method: str, *, seed: int | None = None,
                            split: str = "test", threshold_split: str = "val") -> Path:
    s = settings
    task = s.task_of(site)

    pred_dir = s.paths.predictions / site / run_name(s, method, seed)
    scores_path = pred_dir / "scores.json"
    if not scores_path.is_file():
        raise InputError(scores_path, f"no class scores: run `siteadapt predict --site {site} --method {method}`")
    scores = json.loads(scores_path.read_text())
    mpath = s.paths.ingested / site / "manifest.json"
    if not mpath.is_file():
        raise InputError(mpath, f"site {site} is not ingested")
    truth = {it["id"]: it.get("class_label") for it in json.loads(mpath.read_text())["items"]}

    def rows(sp: str) -> list[dict]:
        return [dict(r, label=truth[r["id"]]) for r in scores["images"]
                if r["split"] == sp and truth.get(r["id"]) is not None]

    val, test = rows(threshold_split), rows(split)
    head = {"task": site_task(s, site), "kind": "classification", "site": site, "method": method,
            "seed": s.seed if seed is None else seed, "split": split, "classes": list(task.classes),
            "positive_class": task.classes[1], "source_site": _source_of(s, site)}
    path = metrics_path(s, site, method, seed)
    overlay = s.paths.reports / site_task(s, site) / "overlays" / site / run_name(s, method, seed) / "examples.png"
    if not test:  # a site without labels: the scores' distribution only (no table row; label-free registry gate)
        unl = [r for r in scores["images"] if r["split"] == split]
        if not unl:
            raise InputError(scores_path, f"site {site} has no images with scores in its {split} split")
        sc = np.array([r["score"] for r in unl], dtype=float)
        out = {**head, "labeled": False, "n_test": len(unl), "score_mean": float(sc.mean()),
               "score_std": float(sc.std()), "positive_fraction_at_0.5": float((sc >= 0.5).mean()),
               "per_image": [{"id": r["id"], "split": r["split"], "score": r["score"]} for r in unl]}
        save_examples(s, site, unl, None, overlay, examples_title(site, method, split))
        write_json(path, _nan_to_none(out))
        log.info("%s/%s: no labeled %s images; score distribution only (mean P(%s) %.3f over %d images) -> %s",
                 site, method, split, task.classes[1], out["score_mean"], len(unl), path)
        return path
    if not val:
        raise InputError(scores_path, f"site {site} has no labeled images with scores in its {threshold_split} split "
                                      "(the operating threshold is chosen there)")
    res = threshold_then_metrics([r["label"] for r in val], [r["score"] for r in val],
                                 [r["label"] for r in test], [r["score"] for r in test])
    out = {
        **head, "labeled": True, "threshold_split": threshold_split,
        "protocol": f"threshold = Youden's J maximum on the {threshold_split} split's labels; metrics on the "
                    f"{split} split at that threshold",
        "n_val": len(val), "n_test": len(test), **res,
        "per_image": [{"id": r["id"], "split": r["split"], "score": r["score"], "label": r["label"]}
                      for r in val + test],
    }
    save_examples(s, site, test, res["threshold"], overlay,
                  examples_title(site, method, split, res["auc"], res["threshold"], threshold_split))
    write_json(path, _nan_to_none(out))
    log.info("%s/%s: AUC %.3f, accuracy %.3f, sensitivity %.3f, specificity %.3f, F1 %.3f (threshold %.3f from %d "
             "%s images) over %d %s images -> %s", site, method, res["auc"], res["accuracy"], res["sensitivity"],
             res["specificity"], res["f1"], res["threshold"], len(val), threshold_split, len(test), split, path)
    return path


def _pick_examples(rows: list[dict], threshold: float | None, n: int) -> list[dict]:
    """Up to ``n`` rows to show. With labels: per class the most confident correct image and the worst errors
    (a normal image scored highest, a positive one scored lowest), alternating; without: the highest and lowest
    scores."""
    by = sorted(rows, key=lambda r: r["score"])
    if threshold is None:
        k = n // 2
        return (by[::-1][:n - k] + by[:k]) if len(by) > n else by[::-1]
    neg = [r for r in by if r["label"] == 0]
    pos = [r for r in by if r["label"] == 1]
    queues = [pos[::-1], neg, neg[::-1], pos]  # confident TP, confident TN, worst FP, worst FN (then the next ones)
    picked, seen = [], set()
    while len(picked) < min(n, len(rows)) and any(queues):
        for q in queues:
            while q and q[0]["id"] in seen:
                q.pop(0)
            if q and len(picked) < n:
                r = q.pop(0)
                picked.append(r)
                seen.add(r["id"])
    return picked


def save_examples(s: Settings, site: str, rows: list[dict], threshold: float | None, path: Path, title: str,
                  n: int = 8) -> Path | None:
    """Classification overlays: a grid of test images (preprocessed, as the model saw them) with their score
    P(positive), the reference class and the decision at ``threshold`` (without labels: the score only); drawn by
    :func:`siteadapt.figures.examples_figure` (panels sized to the images, one caption line each where it fits)."""
    from ..data.shards import load_slices
    from ..figures import SEP, examples_figure, save_figure

    shown = _pick_examples(rows, threshold, n)
    if not shown:
        return None
    data = load_slices(s.paths.prepared, site, "test", labels=False)
    index = {data.subjects[int(j)]["id"]: i for i, j in enumerate(data.subject)}
    classes = s.task_of(site).classes
    panels = []
    for r in shown:
        # a prepared 2D image keeps the (column, row) indexing of the picture as exported: shown upright
        img = display_slice(data.images[index[r["id"]]], two_d=True) if r["id"] in index else None
        parts, color = [f"P({classes[1]}) {r['score']:.2f}"], "black"
        if threshold is not None:
            said = int(r["score"] >= threshold)
            parts += [f"ref {classes[r['label']]}", "correct" if said == r["label"] else "WRONG"]
            color = "darkgreen" if said == r["label"] else "darkred"
        panels.append((img, SEP.join(parts), color))
    save_figure(examples_figure(panels, title), path)
    return path


def _overlay_unlabeled(s: Settings, task, r: dict, pred_img, path: Path, title: str, n_labels: int) -> None:
    img = nib.load(str(s.paths.ingested / r["image"]))
    pred = np.asanyarray(pred_img.dataobj)
    if pred.ndim == 3:
        img_c = _canonical(img)
        pred_c = _canonical(nib.Nifti1Image(pred.astype(np.uint8), pred_img.affine))
        axis = AXES[task.preprocess.slice_axis]
    else:
        img_c, pred_c, axis = np.asanyarray(img.dataobj), pred, 0
    save_overlay(img_c, None, pred_c, axis, path, title, n_labels, getattr(task, "structures", None),
                 _zooms(pred_img, canonical=pred.ndim == 3))


def _zooms(img, canonical: bool) -> tuple[float, ...]:
    """Voxel sizes along the array axes of ``img`` (of its canonical RAS reorientation when ``canonical``)."""
    if canonical:
        img = nib.as_closest_canonical(img)
    n = len(img.shape)
    return tuple(float(v) for v in np.linalg.norm(img.affine[:3, :n], axis=0))


def site_task(s: Settings, site: str) -> str:
    return s.site(site).task


def _source_of(s: Settings, site: str) -> str | None:
    ds = [d.source for d in s.task_of(site).directions if d.target == site]
    return ds[0] if len(ds) == 1 else None


def _nan_to_none(o):
    """JSON has no NaN: write null (documented as 'not defined', e.g. distance to an empty mask)."""
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o
