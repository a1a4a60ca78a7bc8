"""Select step: which model of a target site becomes the registry's ``candidate``.

One step for every front door: ``siteadapt select`` (the CLI and the per-target DVC stage), the Kubeflow
registration component (:func:`siteadapt.kfp.runtime.run_register`) and ``siteadapt demo`` call
:func:`siteadapt.steps.api.select`, which runs :func:`select` and registers the winner when asked; the result is written to
``<registry>/<task>/<site>/selection.json`` (:func:`write_selection`) and recorded as ``selection.*`` tags on the
registered version (:func:`selection_tags`, through :func:`siteadapt.registry.register.register_model`).

The aim is a choice that never does harm: no adaptation (``noadapt``, the source model applied as is) is always a
candidate and the baseline, and an adapted model replaces it only on clear label-free evidence.

Who competes (:func:`candidates`): the methods of the task that has the site as a target (``tasks.<task>.methods``),
or the ones given, plus ``noadapt`` when they do not list it (``baseline_added`` in the record). Methods that train on
the target's labels (``supervised``, ``stl``; a named variant is judged by its ``method:``) are references, never
candidates: they are listed under ``excluded``. ``noadapt`` needs no run of its own: when its model folder or its
evaluation is missing for the site and seed, its evidence is measured on the source model of the direction's source
with that seed (:func:`siteadapt.steps.train.source_model_path`; ``from_source_model: true`` on its row).

Evidence per method (:func:`candidate_evidence`, :func:`ensemble_scores`), all of it label-free except the last item:

- source regression (:func:`siteadapt.registry.gates.source_regression`): segmentation, Dice on the source site's
  labeled test slices of the source segmenter minus the adapted model's (``source_dice_drop``); classification, the
  AUC counterpart (``source_auc_drop``). For ``noadapt`` both are 0 by definition (it is the source model);
- shape plausibility of the predicted structures on the target's test subjects (segmentation; ``empty_fraction``,
  ``fragmented_fraction`` from the evaluation's ``plausibility``, :mod:`siteadapt.metrics.plausibility`; for
  ``noadapt`` without an evaluation, measured the way ``siteadapt predict`` and ``evaluate`` do, on the subjects'
  original grids);
- four label-free scores on the target's test images, all recorded for every candidate (``scores`` holds them
  oriented so that higher is better; :func:`score_correlations` measures, on a labeled site, how well each of them
  orders the candidates):

  - ``entropy``: mean Shannon entropy of the predicted class probabilities, per pixel (per image for a classifier),
    divided by log K so that it lies in [0, 1], averaged per subject then over subjects; its score is the negation.
    Target entropy as an unsupervised validation criterion for domain adaptation follows Morerio et al., "Minimal-
    Entropy Correlation Alignment for Unsupervised Deep Domain Adaptation" (ICLR 2018), who pick hyper-parameters by
    it; pixel-wise entropy of segmentation outputs is ADVENT's (Vu et al., CVPR 2019); Saito et al., "Tune it the
    Right Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood Density" (ICCV 2021) use it as a
    baseline of unsupervised validation and show that it favours over-confident models (e.g. a model trained longer
    on the source alone). It also breaks ties of every score.
  - ``consistency``: agreement of the prediction of a target image with the prediction of a shifted copy, shifted
    back (test-time augmentation agreement; Wang et al., "Aleatoric uncertainty estimation with test-time
    augmentation for medical image segmentation with convolutional neural networks", Neurocomputing 2019). The copies
    are the image shifted by (+s, +s) and (-s, -s) pixels, s = 1/16 of the image size (at least 1 pixel), borders
    replicated (:func:`shifts_for`); agreement is measured where both predictions see original pixels. Segmentation:
    Dice of the label maps (mean over the structures present in either map; per subject, then over subjects);
    classification: 1 - total-variation distance of the class probabilities. A spatial shift needs no labels and
    keeps the anatomy (a flip would not: left and right structures differ).
  - ``tta_entropy``: normalised entropy of the mean of the class probabilities of the image and of its two shifted
    copies (shifted back, on the pixels that every copy sees; the test-time augmentation prediction of Wang et al.),
    averaged like ``entropy``; its score is the negation.
  - ``agreement``: agreement with the candidates' consensus. Per target test subject, the consensus label map is the
    argmax of the mean of the class probabilities of every candidate (``noadapt`` included); a candidate's agreement
    is the Dice of its label map with the consensus (mean over the structures present in either), averaged over
    subjects; classification: 1 - total-variation distance of its class probabilities to the candidates' mean,
    averaged over images. The consensus of several raters as a pseudo-reference that rates each of them without
    labels is STAPLE's idea (Warfield et al., "Simultaneous truth and performance level estimation (STAPLE): an
    algorithm for the validation of image segmentation", IEEE TMI 2004); agreement with an ensemble as an estimate of
    a model's accuracy on unlabeled shifted data is studied by Chen et al., "Detecting Errors and Estimating Accuracy
    on Unlabeled Data with Self-training Ensembles" (NeurIPS 2021). The form here (mean softmax of all candidates,
    Dice with its argmax) is the project's choice. It depends on who competes: adding or removing a candidate moves
    the consensus. Each candidate's model is loaded once and the scores are computed subject by subject (of one
    subject, only each candidate's label map, or class probabilities for a classifier, and a running sum of the
    probabilities are held).

- with labels (only for the ``labels`` rule and for the audit record): mean target Dice (segmentation) or AUC
  (classification) of the evaluation (``metrics/<task>/<site>/<method>.json``).

How they are combined (:func:`rank`):

- rule ``label_free`` (``registry.selection: label_free``, the default: a new site has no labels): a method passes
  when every label-free gate of ``registry.gates`` that is on passes (``max_source_dice_drop``,
  ``max_empty_fraction``, ``max_fragmented_fraction``; classification ``max_source_auc_drop``; a missing measurement
  fails, as at promotion). ``noadapt`` is exempt from the source drop gate (its drop is 0; ``gates_exempt`` on its
  row) but not from the shape gates. The candidates are ordered by the score ``registry.selection_score`` (the
  ranking ``score``; default ``consistency``), those passing the gates first, highest score first; equal score: lower
  entropy first; a candidate without a score comes last among its group. Then the baseline rule: the best adapted
  candidate passing the gates is chosen only when its score beats ``noadapt``'s by at least
  ``registry.selection_margin`` (units of the score); otherwise ``noadapt`` is chosen and moved to the top of the
  ranking. An adapted candidate also wins when ``noadapt`` fails a gate or has no score. When no candidate passes
  the gates, every one (``noadapt`` included) is ranked by the number of gates it fails (fewest first), then as
  above, and the first is chosen; the result says ``fallback: true`` and the promotion gates, which are checked
  again at ``siteadapt promote``, will refuse it.
- rule ``labels`` (``registry.selection: labels``): mean target Dice / AUC, highest first; every compared method
  needs a labeled evaluation. ``auto`` uses ``labels`` when every compared method has one, else ``label_free``. No
  margin applies. A ``noadapt`` that was added (not listed) and has no labeled evaluation is left out of a ranking by
  labels (listed under ``excluded``) rather than failing it.
- ties: the order of the methods given (the task's ``methods``; an added ``noadapt`` last).

Why the winner won is the record's ``decision``: the baseline and its score, the best adapted candidate and its
score, the margin, the choice and a one-sentence ``reason``.

When the site has labels, the result also says which method the labels pick (``labeled_best``), how much Dice (AUC)
the chosen method gives away against it (``regret_dice`` / ``regret_auc``) and what it gains over no adaptation
(``regret_vs_noadapt_dice`` / ``_auc``: the winner's minus ``noadapt``'s; negative means the choice did harm),
whatever the rule.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import get_args

import numpy as np

from ..config import Registry, Settings
from ..errors import InputError, SiteadaptError
from ..layout import metrics_path, model_dir, read_metrics, source_model_path
from ..metrics.segmentation import label_dice

log = logging.getLogger("siteadapt.select")

SCHEMA = "siteadapt.selection/1"
SETTINGS = ("label_free", "labels", "auto")
SCORES: tuple[str, ...] = get_args(Registry.model_fields["selection_score"].annotation)  # the label-free scores
NEGATED = ("entropy", "tta_entropy")  # lower is better: their score is the negation
BASELINE = "noadapt"  # the source model as is: always a candidate, the baseline of the label-free rule
MEASURE = {"segmentation": "dice", "classification": "auc"}  # the labeled measure of a task kind
SOURCE_DROP = {"segmentation": ("source_dice_drop", "max_source_dice_drop"),
               "classification": ("source_auc_drop", "max_source_auc_drop")}  # (measurement, gate) per task kind
SHIFT_FRACTION = 1 / 16


class SelectionError(SiteadaptError):
    """No method can be a candidate (every one a label-trained reference), or a rule cannot be applied."""


# ---- who competes ---------------------------------------------------------------------------------------------------
def base_method(settings: Settings, name: str) -> str:
    """The method a name builds: a named variant's ``methods.<name>.method``, else the name itself."""
    return (settings.methods.get(name) or {}).get("method", name)


def is_reference(settings: Settings, name: str) -> bool:
    """Whether ``name`` (a method or a named variant) trains on the target's labels (an upper-bound reference)."""
    from ..methods import get_method

    return bool(get_method(base_method(settings, name)).trains_on_target_labels)


def candidates(settings: Settings, site: str, methods: list[str] | None = None,
               baseline: bool = True) -> tuple[list[str], list[dict]]:
    """(the methods that compete, in order; the ones excluded with the reason). Default: the methods of the task
    that has ``site`` as a target. ``baseline``: ``noadapt`` is added (last) when not listed; a list of references
    only is still an error (nothing of what was asked for can compete)."""
    settings.direction_to(site)  # the site must be a target of its task (names the task's directions otherwise)
    names = list(dict.fromkeys(methods if methods else settings.task_of(site).methods))
    keep, excluded = [], []
    for m in names:
        if is_reference(settings, m):
            excluded.append({"method": m, "reason": "trains on the target's labels (a reference, never a candidate)"})
        else:
            keep.append(m)
    if not keep:
        raise SelectionError(f"no method of {', '.join(names) or '(none)'} can be a candidate for {site}: every one "
                             "trains on the target's labels (pass adaptation methods with --methods)")
    if baseline and BASELINE not in keep:
        keep.append(BASELINE)
    return keep, excluded


# ---- label-free scores ----------------------------------------------------------------------------------------------
def normalized_entropy(probs, axis: int = 1) -> np.ndarray:
    """Shannon entropy of class probabilities along ``axis``, divided by log K (0: one-hot, 1: uniform)."""
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[axis]
    if k < 2:
        return np.zeros(np.delete(p.shape, axis))
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis)
    return h / math.log(k)


def shift(x, dy: int, dx: int):
    """Images ``(N, C, H, W)`` moved by ``dy`` rows and ``dx`` columns; the pixels moved in replicate the border."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    p = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    return p[..., max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]


def overlap(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of ``a`` (on the original image) and ``b`` (on the image shifted by ``dy``, ``dx``) that show the
    same original pixels, aligned: ``a[..., i, j]`` with ``b[..., i + dy, j + dx]``."""
    h, w = a.shape[-2:]
    ra, rb = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
    ca, cb = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
    return a[..., ra, ca], b[..., rb, cb]


def common_overlap(a: np.ndarray, bs: list[np.ndarray], shifts) -> list[np.ndarray]:
    """``a`` (on the original image) and each ``bs[k]`` (on the image shifted by ``shifts[k]``) cut to the original
    pixels that every copy sees, aligned as in :func:`overlap`. Empty list when no pixel is seen by all."""
    h, w = a.shape[-2:]
    r0 = max([max(-dy, 0) for dy, _ in shifts] + [0])
    r1 = h - max([max(dy, 0) for dy, _ in shifts] + [0])
    c0 = max([max(-dx, 0) for _, dx in shifts] + [0])
    c1 = w - max([max(dx, 0) for _, dx in shifts] + [0])
    if r1 <= r0 or c1 <= c0:
        return []
    return [a[..., r0:r1, c0:c1]] + [b[..., r0 + dy:r1 + dy, c0 + dx:c1 + dx] for b, (dy, dx) in zip(bs, shifts)]


def shifts_for(size: int) -> tuple[tuple[int, int], ...]:
    s = max(1, int(round(size * SHIFT_FRACTION)))
    return ((s, s), (-s, -s))


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def ensemble_scores(models: dict, images: np.ndarray, groups: list[np.ndarray], kind: str, ids=(),
                    agreement: bool = True) -> dict[str, dict[str, float | None]]:
    """The label-free scores (``entropy``, ``consistency``, ``tta_entropy`` and, with ``agreement``, ``agreement``
    with the consensus of all of ``models``; see the module docstring) of every model of ``models`` (name -> a method:
    ``predict_subject`` gives logits) on target images ``(N, H, W)``. ``groups`` are the row indices of each subject
    (a subject is predicted as a whole, as ``siteadapt predict`` does); ``ids``: the structure label ids
    (segmentation). Subject by subject: every model predicts the subject and its shifted copies before the next."""
    import torch

    def probs(model, x) -> np.ndarray:
        return torch.softmax(model.predict_subject(x).float(), 1).numpy()

    acc = {m: {k: [] for k in SCORES} for m in models}
    shifts = shifts_for(images.shape[-1])
    with torch.no_grad():
        for rows in groups:
            x = torch.from_numpy(np.ascontiguousarray(images[rows], dtype=np.float32)).unsqueeze(1)
            total, labels, kept = None, {}, {}
            for name, model in models.items():
                a = acc[name]
                p = probs(model, x)
                qs = [probs(model, shift(x, dy, dx)) for dy, dx in shifts]
                a["entropy"].append(float(normalized_entropy(p, 1).mean()))
                agree = []
                if kind == "classification":
                    agree = [float(1.0 - 0.5 * np.abs(p - q).sum(1).mean()) for q in qs]
                    a["tta_entropy"].append(float(normalized_entropy((p + sum(qs)) / (1 + len(qs)), 1).mean()))
                    kept[name] = p
                else:
                    for (dy, dx), q in zip(shifts, qs):
                        u, v = overlap(p.argmax(1), q.argmax(1), dy, dx)
                        d = label_dice(u, v, ids)
                        if d is not None:
                            agree.append(d)
                    cut = common_overlap(p, qs, shifts) or [p]
                    a["tta_entropy"].append(float(normalized_entropy(sum(cut) / len(cut), 1).mean()))
                    labels[name] = p.argmax(1).astype(np.int16)
                if agree:
                    a["consistency"].append(float(np.mean(agree)))
                if agreement:  # a running sum: one subject's probabilities, not one per model
                    if total is None:
                        total = p.copy()
                    else:
                        total += p
            if not agreement or total is None:
                continue
            mean = total / len(models)
            if kind == "classification":
                for name, p in kept.items():  # per image
                    acc[name]["agreement"].extend((1.0 - 0.5 * np.abs(p - mean).sum(1)).tolist())
            else:
                consensus = mean.argmax(1)
                for name, lab in labels.items():
                    d = label_dice(lab, consensus, ids)
                    if d is not None:
                        acc[name]["agreement"].append(d)
    return {m: {k: _mean(v) for k, v in a.items() if agreement or k != "agreement"} for m, a in acc.items()}


def unsupervised_scores(model, images: np.ndarray, groups: list[np.ndarray], kind: str, ids=()) -> dict:
    """Entropy, shift consistency and TTA entropy of one ``model`` (see :func:`ensemble_scores`; the agreement with
    the candidates' consensus needs the other candidates)."""
    return ensemble_scores({"model": model}, images, groups, kind, ids, agreement=False)["model"]


def target_images(settings: Settings, site: str, split: str = "test") -> tuple[np.ndarray, list[np.ndarray]]:
    """The site's prepared images of ``split`` (no labels are read) and the row indices of each subject."""
    from ..data.shards import load_slices

    data = load_slices(settings.paths.prepared, site, split, labels=False)
    if not len(data):
        raise InputError(settings.paths.prepared / site, f"site {site} has no {split} images to score methods on")
    kind = settings.task_of(site).kind
    if kind == "classification":  # images are independent: batches of 64
        rows = np.arange(len(data))
        return data.images, [rows[i:i + 64] for i in range(0, len(rows), 64)]
    return data.images, [np.flatnonzero(data.subject == k) for k in np.unique(data.subject)]


def oriented(row: dict, name: str) -> float | None:
    """Label-free score ``name`` of an evidence row, higher is better (entropies negated); None when unmeasured."""
    if name not in SCORES:
        raise SelectionError(f"unknown selection score {name!r} (one of {', '.join(SCORES)})")
    v = _finite(row.get(name))
    return None if v is None else (-v if name in NEGATED else v)


# ---- evidence -------------------------------------------------------------------------------------------------------
def _finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _evaluation_fields(metrics: dict, kind: str) -> dict:
    """Plausibility (segmentation) and the labeled target measure of an evaluation file's content."""
    if kind == "classification":
        labeled = metrics.get("labeled", True) and metrics.get("auc") is not None
        return {"target_auc": _finite(metrics.get("auc")) if labeled else None}
    pl = metrics.get("plausibility") or {}
    labeled = metrics.get("labeled", True) and metrics.get("dice")
    return {"empty_fraction": _finite(pl.get("empty_fraction")),
            "fragmented_fraction": _finite(pl.get("fragmented_fraction")),
            "target_dice": _finite((metrics.get("dice") or {}).get("mean")) if labeled else None}


def plausibility_of(settings: Settings, site: str, model, split: str = "test") -> dict:
    """Shape plausibility (:mod:`siteadapt.metrics.plausibility`) of ``model``'s raw label maps of the site's
    ``split`` subjects, mapped to their original grids as ``siteadapt predict`` writes them and ``siteadapt
    evaluate`` checks them (for a ``noadapt`` that was never predicted)."""
    from ..metrics.plausibility import shape_checks, summarize_plausibility
    from .train import original_label_maps

    structures = settings.task_of(site).structures
    return summarize_plausibility([shape_checks(back, structures)
                                   for _, back in original_label_maps(settings, model, site, split)])


def candidate_evidence(settings: Settings, site: str, method: str, seed: int | None = None) -> tuple[dict, object]:
    """(what :func:`rank` needs about one method except the label-free scores, its model ready to predict). Reads
    the method's ``model.pt`` and its evaluation; raises :class:`InputError` naming the file that is missing. For
    ``noadapt`` without a model folder or an evaluation: :func:`noadapt_evidence`."""
    from ..methods.build import load_for_prediction
    from ..registry.gates import source_regression

    kind = settings.task_of(site).kind
    mpath = model_dir(settings, site, method, seed) / "model.pt"
    epath = metrics_path(settings, site, method, seed)
    if method == BASELINE and not (mpath.is_file() and epath.is_file()):
        return noadapt_evidence(settings, site, seed)
    if not mpath.is_file():
        raise InputError(mpath, f"no model of {method} for {site}: run `siteadapt adapt --site {site} --method "
                                f"{method}` first")
    if not epath.is_file():
        raise InputError(epath, f"no evaluation of {method} on {site}: run `siteadapt evaluate --site {site} "
                                f"--method {method} --predict` first")
    metrics = read_metrics(epath)
    model = load_for_prediction(settings, site, method, seed)
    row = {"method": method, "base_method": base_method(settings, method), "model": str(mpath),
           "metrics": str(epath), "from_source_model": False}
    reg = source_regression(settings, site, method, seed)
    keys = ("source_auc_drop", "source_auc_adapted", "source_auc_source_model") if kind == "classification" else \
        ("source_dice_drop", "source_dice_adapted", "source_dice_source_model")
    row.update({k: _finite(reg.get(k)) for k in keys})
    row.update(_evaluation_fields(metrics, kind))
    return row, model


def noadapt_evidence(settings: Settings, site: str, seed: int | None = None) -> tuple[dict, object]:
    """``noadapt``'s evidence measured on the source model itself (source model of the direction's source with
    ``seed``): source drop 0 by definition; plausibility and the labeled target measure from ``noadapt``'s evaluation
    when there is one, else plausibility measured here and no target measure."""
    from ..methods.build import load_model

    kind = settings.task_of(site).kind
    d = settings.direction_to(site)
    src = source_model_path(settings, d.source, seed)
    if not src.is_file():
        raise InputError(src, f"noadapt on {site} is the source model of {d.source}, which is missing: run "
                              f"`siteadapt train-source --site {d.source}` first")
    model, _ = load_model(src)
    epath = metrics_path(settings, site, BASELINE, seed)
    row = {"method": BASELINE, "base_method": BASELINE, "model": str(src),
           "metrics": str(epath) if epath.is_file() else None, "from_source_model": True}
    drop = SOURCE_DROP[kind][0]
    row.update({drop: 0.0, drop.replace("_drop", "_adapted"): None, drop.replace("_drop", "_source_model"): None})
    if epath.is_file():
        row.update(_evaluation_fields(read_metrics(epath), kind))
    elif kind == "classification":
        row["target_auc"] = None
    else:
        pl = plausibility_of(settings, site, model)
        row.update(empty_fraction=_finite(pl.get("empty_fraction")),
                   fragmented_fraction=_finite(pl.get("fragmented_fraction")), target_dice=None)
    log.info("%s: noadapt measured on the source model %s (no noadapt run%s)", site, src,
             "" if epath.is_file() else " or evaluation")
    return row, model


# ---- ranking --------------------------------------------------------------------------------------------------------
LABEL_FREE_KEYS = {"segmentation": ("source_dice_drop", "empty_fraction", "fragmented_fraction"),
                   "classification": ("source_auc_drop",)}


def label_free_gates(gates, row: dict, kind: str, exempt: tuple[str, ...] = ()) -> list[dict]:
    """The label-free gates of ``registry.gates`` that are on, applied to one method's evidence (but the gates named
    in ``exempt``)."""
    from ..registry.gates import check_gates

    return [g for g in check_gates(gates, {k: row.get(k) for k in LABEL_FREE_KEYS[kind]}, kind)
            if g["name"] not in exempt]


def rule_for(setting: str, rows: list[dict], kind: str) -> str:
    if setting not in SETTINGS:
        raise SelectionError(f"unknown selection {setting!r} (one of {', '.join(SETTINGS)})")
    if setting != "auto":
        return setting
    key = f"target_{MEASURE[kind]}"
    return "labels" if rows and all(r.get(key) is not None for r in rows) else "label_free"


def _f(v) -> str:
    return "none" if v is None else f"{v:.3f}"


def _decide(ranked: list[dict], base: dict | None, score: str, margin: float, fallback: bool,
            baseline: str = BASELINE) -> tuple[dict, str]:
    """The label-free choice among ``ranked`` (gates first, then score) against the baseline row ``base``:
    (winner, reason)."""
    if base is None:
        w = ranked[0]
        return w, (f"no {baseline} among the candidates: {w['method']} ranks first by {score} ({_f(w['score'])})"
                   + ("; no candidate passes the label-free gates" if fallback else ""))
    adapted = [r for r in ranked if r is not base]
    if fallback:
        w = ranked[0]
        return w, (f"no candidate passes the label-free gates: {w['method']} fails the fewest "
                   f"({w['gates_failed']}; {score} {_f(w['score'])})")
    passing = [r for r in adapted if r["gates_passed"]]
    best = passing[0] if passing else None
    if not base["gates_passed"]:
        failed = ",".join(g["name"] for g in base["gates"] if not g["passed"])
        return best, f"{baseline} fails the label-free gates ({failed}): {best['method']} is chosen ({score} " \
                     f"{_f(best['score'])})"
    if best is None:
        return base, "no adapted model passes the label-free gates: no adaptation kept"
    b, n = best["score"], base["score"]
    if b is None:
        return base, f"{best['method']} has no {score}: no adaptation kept"
    if n is None:
        return best, f"{baseline} has no {score}: {best['method']} is chosen ({score} {_f(b)})"
    diff = b - n
    if diff >= margin - 1e-12:
        return best, (f"{best['method']}'s {score} {_f(b)} beats {baseline}'s {_f(n)} by {_f(diff)} >= margin "
                      f"{margin:g}")
    if diff >= 0:
        return base, (f"{best['method']}'s {score} {_f(b)} beats {baseline}'s {_f(n)} by {_f(diff)} < margin "
                      f"{margin:g}: no adaptation kept")
    return base, (f"{best['method']}'s {score} {_f(b)} is below {baseline}'s {_f(n)} (margin {margin:g}): no "
                  "adaptation kept")


def rank(rows: list[dict], gates, kind: str, setting: str = "label_free", *, score: str = "consistency",
         margin: float | None = None, baseline: str = BASELINE) -> dict:
    """Order the methods' evidence ``rows`` (in the order of the methods given: it breaks ties) by the rule that
    ``setting`` gives, the label-free rule by ``score`` with ``baseline`` (the row of that method, if any) kept
    unless an adapted method beats its score by ``margin`` (default: ``registry.selection_margin``'s default); see
    the module docstring. Returns the selection without site facts (see :func:`select`)."""
    if not rows:
        raise SelectionError("no method to select from")
    if score not in SCORES:
        raise SelectionError(f"unknown selection score {score!r} (one of {', '.join(SCORES)})")
    margin = Registry.model_fields["selection_margin"].default if margin is None else float(margin)
    if not (math.isfinite(margin) and margin >= 0):
        raise SelectionError(f"the selection margin must be a number >= 0, got {margin!r}")
    rule = rule_for(setting, rows, kind)
    measure = MEASURE[kind]
    key = f"target_{measure}"
    order = {r["method"]: i for i, r in enumerate(rows)}
    exempt_gate = SOURCE_DROP[kind][1]
    out_rows = []
    for r in rows:
        exempt = (exempt_gate,) if r["method"] == baseline else ()
        g = label_free_gates(gates, r, kind, exempt)
        out_rows.append({**r, "scores": {n: oriented(r, n) for n in SCORES}, "gates": g,
                         "gates_passed": all(x["passed"] for x in g), "gates_failed": sum(not x["passed"] for x in g),
                         **({"gates_exempt": list(exempt)} if exempt else {})})
    base = next((r for r in out_rows if r["method"] == baseline), None)
    fallback = False
    if rule == "labels":
        missing = [r for r in out_rows if r.get(key) is None]
        if missing:
            raise SelectionError(f"selection by labels needs a labeled evaluation of every method; "
                                 f"{', '.join(r.get('metrics') or r['method'] for r in missing)} has none (use "
                                 "--selection label_free)")
        for r in out_rows:
            r["score"] = r[key]
        ranked = sorted(out_rows, key=lambda r: (-r["score"], order[r["method"]]))
        text = f"labels: highest target {measure} first"
        winner = ranked[0]
        reason = f"labels: {winner['method']} has the highest target {measure} ({_f(winner['score'])})"
        used_margin = None
    else:
        for r in out_rows:
            r["score"] = r["scores"][score]
        fallback = not any(r["gates_passed"] for r in out_rows)

        def key_lf(r):
            s, e = r["score"], r.get("entropy")
            return (0 if r["gates_passed"] else 1, r["gates_failed"], -(s if s is not None else -math.inf),
                    e if e is not None else math.inf, order[r["method"]])

        ranked = sorted(out_rows, key=key_lf)
        text = (f"label_free: methods that pass every label-free gate of registry.gates ({baseline} exempt from "
                f"{exempt_gate}), by {score} on the target's test images (highest first; ties: lower entropy); an "
                f"adapted method replaces {baseline} only when its {score} beats {baseline}'s by >= {margin:g}")
        if fallback:
            text += "; no method passed the gates: all ranked by gates failed (fewest first), then as above"
        winner, reason = _decide(ranked, base, score, margin, fallback, baseline)
        ranked = [winner] + [r for r in ranked if r is not winner]
        used_margin = margin
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    adapted = [r for r in ranked if r is not base]  # in rank order
    best_adapted = next((r for r in adapted if rule == "labels" or fallback or r["gates_passed"]), None)
    decision = {"baseline": baseline if base is not None else None,
                "baseline_score": base["score"] if base is not None else None,
                "best_adapted": best_adapted["method"] if best_adapted else None,
                "best_adapted_score": best_adapted["score"] if best_adapted else None,
                "margin": used_margin, "score": score if rule == "label_free" else f"target_{measure}",
                "chosen": winner["method"], "reason": reason}
    res = {"schema": SCHEMA, "kind": kind, "setting": setting, "rule": rule, "rule_text": text,
           "selection_score": score, "margin": used_margin,
           "winner": winner["method"], "score": winner["score"], "fallback": fallback, "decision": decision,
           "ranking": [r["method"] for r in ranked], "methods": ranked}
    labeled = [r for r in out_rows if r.get(key) is not None]
    res["labeled"] = bool(labeled) and len(labeled) == len(out_rows)
    best = max(labeled, key=lambda r: (r[key], -order[r["method"]])) if res["labeled"] else None
    res["labeled_best"] = best["method"] if best else None
    res[f"labeled_best_{measure}"] = best[key] if best else None
    res[f"winner_{measure}"] = winner.get(key) if best else None
    res[f"regret_{measure}"] = float(best[key] - winner[key]) if best else None
    res[f"regret_vs_noadapt_{measure}"] = float(winner[key] - base[key]) if best and base is not None else None
    return res


# ---- measuring the scores -------------------------------------------------------------------------------------------
def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of ``values``, ties given the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson correlation of the average ranks); None with fewer than 3 pairs or
    when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else None


def score_correlations(result: dict) -> dict[str, float | None]:
    """For a selection record whose candidates have a labeled target measure (Dice, AUC): per label-free score (of
    :data:`SCORES`, oriented higher-is-better), the Spearman rank correlation between it and the target measure over
    the candidates (``noadapt`` included; candidates without the score or the measure left out). None for a score
    with fewer than 3 such candidates or constant values."""
    key = f"target_{MEASURE[result['kind']]}"
    out: dict[str, float | None] = {}
    for name in SCORES:
        pairs = [(oriented(r, name), _finite(r.get(key))) for r in result["methods"]]
        pairs = [(s, t) for s, t in pairs if s is not None and t is not None]
        out[name] = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
    return out


# ---- the step -------------------------------------------------------------------------------------------------------
def select(settings: Settings, site: str, methods: list[str] | None = None, selection: str | None = None,
           seed: int | None = None, *, score: str | None = None, margin: float | None = None) -> dict:
    """Measure every competing method's evidence on ``site`` (``noadapt`` always among them) and rank them
    (``selection``: ``label_free``, ``labels`` or ``auto``; default ``registry.selection``; ``score``: the label-free
    score, default ``registry.selection_score``; ``margin``: what an adapted model must beat ``noadapt``'s score by,
    default ``registry.selection_margin``). Returns the selection record (the content of ``selection.json``, see
    :func:`write_selection`)."""
    setting = selection or settings.registry.selection
    if setting not in SETTINGS:
        raise SelectionError(f"unknown selection {setting!r} (one of {', '.join(SETTINGS)})")
    score = score or settings.registry.selection_score
    if score not in SCORES:
        raise SelectionError(f"unknown selection score {score!r} (one of {', '.join(SCORES)})")
    margin = settings.registry.selection_margin if margin is None else margin
    listed = list(methods if methods else settings.task_of(site).methods)
    keep, excluded = candidates(settings, site, methods)
    kind = settings.task_of(site).kind
    ids = sorted(settings.task_of(site).structures.values()) if kind == "segmentation" else ()
    imgs, groups = target_images(settings, site)
    loaded = [candidate_evidence(settings, site, m, seed) for m in keep]  # every model once, up front
    scores = ensemble_scores({row["method"]: model for row, model in loaded}, imgs, groups, kind, ids)
    rows = []
    for row, _ in loaded:
        head = {k: row[k] for k in ("method", "base_method", "model", "metrics", "from_source_model")}
        rows.append({**head, **scores[row["method"]], **{k: v for k, v in row.items() if k not in head}})
    del loaded
    base = next(r for r in rows if r["method"] == BASELINE)
    others = [r for r in rows if r is not base]
    if (BASELINE not in listed and base.get(f"target_{MEASURE[kind]}") is None and others
            and rule_for(setting, others, kind) == "labels"):  # labels cannot judge a noadapt that was never evaluated
        rows = others
        excluded.append({"method": BASELINE, "reason": "added as the baseline, but has no labeled evaluation: not "
                                                       "compared by labels"})
    res = rank(rows, settings.registry.gates, kind, setting, score=score, margin=margin)
    d = settings.direction_to(site)
    res = {"task": settings.site(site).task, "site": site, "source_site": d.source,
           "seed": settings.seed if seed is None else seed, **res, "excluded": excluded,
           "baseline_added": BASELINE not in listed}
    log.info("%s: candidate %s (rule %s, ranking %s): %s", site, res["winner"], res["rule"],
             ", ".join(res["ranking"]), res["decision"]["reason"])
    return res


def selection_path(settings: Settings, site: str) -> Path:
    return settings.paths.registry / settings.site(site).task / site / "selection.json"


def write_selection(settings: Settings, site: str, result: dict) -> Path:
    from ..io.atomic import write_json

    path = selection_path(settings, site)
    write_json(path, result)
    return path


def _num(v) -> str:
    return "none" if v is None else repr(round(float(v), 6))


def selection_tags(result: dict) -> dict[str, str]:
    """The ``selection.*`` tags of the registered version: why it won (values are method names and numbers, and the
    decision's one-sentence reason)."""
    measure = MEASURE[result["kind"]]
    winner = next(r for r in result["methods"] if r["method"] == result["winner"])
    compact = {r["method"]: {k: r.get(k) for k in ("rank", "score", *SCORES, "gates_passed",
                                                   *LABEL_FREE_KEYS[result["kind"]], f"target_{measure}")}
               for r in result["methods"]}
    decision = result.get("decision") or {}
    tags = {
        "selection.rule": result["rule"],
        "selection.setting": result["setting"],
        "selection.score": _num(result["score"]),
        "selection.score_name": str(result.get("selection_score") or "none"),
        "selection.margin": _num(decision.get("margin")),
        "selection.reason": str(decision.get("reason") or "none")[:5000],
        "selection.rank": f"{winner['rank']} of {len(result['methods'])}",
        "selection.ranking": ",".join(result["ranking"]),
        "selection.fallback": str(bool(result["fallback"])).lower(),
        "selection.entropy": _num(winner.get("entropy")),
        "selection.consistency": _num(winner.get("consistency")),
        "selection.compared": json.dumps(compact, sort_keys=True, default=str)[:5000],
        "selection.excluded": ",".join(e["method"] for e in result.get("excluded", [])) or "none",
        "selection.labeled_best": result.get("labeled_best") or "none",
        f"selection.regret_{measure}": _num(result.get(f"regret_{measure}")),
        f"selection.regret_vs_noadapt_{measure}": _num(result.get(f"regret_vs_noadapt_{measure}")),
    }
    return tags
