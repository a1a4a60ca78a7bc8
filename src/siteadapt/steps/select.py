"""Select step: which adapted model of a target site becomes the registry's ``candidate``.

One step for every front door: ``siteadapt select`` (the CLI and the per-target DVC stage) and the Kubeflow
registration component (:func:`siteadapt.kfp.runtime.run_register`) call :func:`select`; the result is written to
``<registry>/<task>/<site>/selection.json`` (:func:`write_selection`) and recorded as ``selection.*`` tags on the
registered version (:func:`selection_tags`, through :func:`siteadapt.steps.register.register_model`).

Who competes: the methods of the task that has the site as a target (``tasks.<task>.methods``), or the ones given.
Methods that train on the target's labels (``supervised``, ``stl``; a named variant is judged by its ``method:``) are
references, never candidates: they are listed under ``excluded``.

Evidence per method (:func:`evidence`), all of it label-free except the last item:

- source regression (:func:`siteadapt.steps.register.source_regression`): segmentation, Dice on the source site's
  labeled test slices of the source segmenter minus the adapted model's (``source_dice_drop``); classification, the
  AUC counterpart (``source_auc_drop``);
- shape plausibility of the predicted structures on the target's test subjects (segmentation; ``empty_fraction``,
  ``fragmented_fraction`` from the evaluation's ``plausibility``, :mod:`siteadapt.metrics.plausibility`);
- ``entropy``: mean Shannon entropy of the predicted class probabilities on the target's test images, per pixel
  (per image for a classifier), divided by log K so that it lies in [0, 1], averaged per subject then over subjects.
  Target entropy as an unsupervised validation criterion for domain adaptation follows Morerio et al., "Minimal-
  Entropy Correlation Alignment for Unsupervised Deep Domain Adaptation" (ICLR 2018), who pick hyper-parameters by
  it; pixel-wise entropy of segmentation outputs is ADVENT's (Vu et al., CVPR 2019); Saito et al., "Tune it the Right
  Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood Density" (ICCV 2021) use it as a baseline
  of unsupervised validation and show that it favours over-confident models (e.g. a model trained longer on the
  source alone): it is recorded and breaks ties, it does not order the methods.
- ``consistency``: agreement of the prediction of a target image with the prediction of a shifted copy, shifted
  back (test-time augmentation agreement; Wang et al., "Aleatoric uncertainty estimation with test-time augmentation
  for medical image segmentation with convolutional neural networks", Neurocomputing 2019). The copies are the image
  shifted by (+s, +s) and (-s, -s) pixels, s = 1/16 of the image size (at least 1 pixel), borders replicated;
  agreement is measured where both predictions see original pixels. Segmentation: Dice of the label maps (mean over
  the structures present in either map; per subject, then over subjects); classification: 1 - total-variation
  distance of the class probabilities. A spatial shift needs no labels and keeps the anatomy (a flip would not:
  left and right structures differ).
- with labels (only for the ``labels`` rule and for the audit record): mean target Dice (segmentation) or AUC
  (classification) of the evaluation (``metrics/<task>/<site>/<method>.json``).

How they are combined (:func:`rank`):

- rule ``label_free`` (``registry.selection: label_free``, the default: a new site has no labels): a method passes
  when every label-free gate of ``registry.gates`` that is on passes (``max_source_dice_drop``,
  ``max_empty_fraction``, ``max_fragmented_fraction``; classification ``max_source_auc_drop``; a missing measurement
  fails, as at promotion). The survivors are ordered by their shift consistency (the ranking ``score``), highest
  first; equal consistency: lower entropy first; a method without a consistency (no structure predicted on any test
  subject) comes last. When no method passes, every eligible method is ranked by the number of gates it fails
  (fewest first), then as above; the result says ``fallback: true`` and the promotion gates, which are checked
  again at ``siteadapt promote``, will refuse it.
- rule ``labels`` (``registry.selection: labels``): mean target Dice / AUC, highest first; every compared method
  needs a labeled evaluation. ``auto`` uses ``labels`` when every compared method has one, else ``label_free``.
- ties: the order of the methods given (the task's ``methods``).

When the site has labels, the result also says which method the labels pick (``labeled_best``) and how much Dice (AUC)
the chosen method gives away against it (``regret_dice`` / ``regret_auc``), whatever the rule.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ..config import Settings
from ..errors import InputError, SiteadaptError

log = logging.getLogger("siteadapt.select")

SCHEMA = "siteadapt.selection/1"
SETTINGS = ("label_free", "labels", "auto")
MEASURE = {"segmentation": "dice", "classification": "auc"}  # the labeled measure of a task kind
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


def candidates(settings: Settings, site: str, methods: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """(the methods that compete, in order; the ones excluded with the reason). Default: the methods of the task
    that has ``site`` as a target."""
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


def label_dice(a: np.ndarray, b: np.ndarray, ids) -> float | None:
    """Mean Dice over the structures ``ids`` present in either map (None when none is)."""
    vals = []
    for i in ids:
        x, y = a == i, b == i
        s = int(x.sum() + y.sum())
        if s:
            vals.append(2.0 * int((x & y).sum()) / s)
    return float(np.mean(vals)) if vals else None


def shifts_for(size: int) -> tuple[tuple[int, int], ...]:
    s = max(1, int(round(size * SHIFT_FRACTION)))
    return ((s, s), (-s, -s))


def unsupervised_scores(model, images: np.ndarray, groups: list[np.ndarray], kind: str, ids=()) -> dict:
    """Entropy and shift consistency of ``model`` (a method: ``predict_subject`` gives logits) on target images
    ``(N, H, W)``; ``groups`` are the row indices of each subject (a subject is predicted as a whole, as
    ``siteadapt predict`` does). ``ids``: the structure label ids (segmentation)."""
    import torch

    ent, cons = [], []
    shifts = shifts_for(images.shape[-1])
    with torch.no_grad():
        for rows in groups:
            x = torch.from_numpy(np.ascontiguousarray(images[rows], dtype=np.float32)).unsqueeze(1)
            p = torch.softmax(model.predict_subject(x).float(), 1).numpy()
            ent.append(float(normalized_entropy(p, 1).mean()))
            agree = []
            for dy, dx in shifts:
                q = torch.softmax(model.predict_subject(shift(x, dy, dx)).float(), 1).numpy()
                if kind == "classification":
                    agree.append(float(1.0 - 0.5 * np.abs(p - q).sum(1).mean()))
                else:
                    a, b = overlap(p.argmax(1), q.argmax(1), dy, dx)
                    d = label_dice(a, b, ids)
                    if d is not None:
                        agree.append(d)
            if agree:
                cons.append(float(np.mean(agree)))
    return {"entropy": float(np.mean(ent)) if ent else None,
            "consistency": float(np.mean(cons)) if cons else None}


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


# ---- evidence -------------------------------------------------------------------------------------------------------
def _finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def evidence(settings: Settings, site: str, method: str, seed: int | None = None, images=None) -> dict:
    """What :func:`rank` needs about one method (see the module docstring). Reads the method's ``model.pt`` and its
    evaluation; raises :class:`InputError` naming the file that is missing."""
    from .evaluate import metrics_path
    from .register import source_regression
    from .train import load_for_prediction, model_dir

    kind = settings.task_of(site).kind
    mpath = model_dir(settings, site, method, seed) / "model.pt"
    if not mpath.is_file():
        raise InputError(mpath, f"no model of {method} for {site}: run `siteadapt adapt --site {site} --method "
                                f"{method}` first")
    epath = metrics_path(settings, site, method, seed)
    if not epath.is_file():
        raise InputError(epath, f"no evaluation of {method} on {site}: run `siteadapt evaluate --site {site} "
                                f"--method {method} --predict` first")
    metrics = json.loads(epath.read_text())
    model = load_for_prediction(settings, site, method, seed)
    imgs, groups = images if images is not None else target_images(settings, site)
    ids = sorted(settings.task_of(site).structures.values()) if kind == "segmentation" else ()
    scores = unsupervised_scores(model, imgs, groups, kind, ids)
    row = {"method": method, "base_method": base_method(settings, method), "model": str(mpath),
           "metrics": str(epath), **scores}
    reg = source_regression(settings, site, method, seed)
    if kind == "classification":
        row.update({k: _finite(reg.get(k)) for k in ("source_auc_drop", "source_auc_adapted",
                                                     "source_auc_source_model")})
        labeled = metrics.get("labeled", True) and metrics.get("auc") is not None
        row["target_auc"] = _finite(metrics.get("auc")) if labeled else None
    else:
        row.update({k: _finite(reg.get(k)) for k in ("source_dice_drop", "source_dice_adapted",
                                                     "source_dice_source_model")})
        pl = metrics.get("plausibility") or {}
        row["empty_fraction"] = _finite(pl.get("empty_fraction"))
        row["fragmented_fraction"] = _finite(pl.get("fragmented_fraction"))
        labeled = metrics.get("labeled", True) and metrics.get("dice")
        row["target_dice"] = _finite((metrics.get("dice") or {}).get("mean")) if labeled else None
    return row


# ---- ranking --------------------------------------------------------------------------------------------------------
LABEL_FREE_KEYS = {"segmentation": ("source_dice_drop", "empty_fraction", "fragmented_fraction"),
                   "classification": ("source_auc_drop",)}


def label_free_gates(gates, row: dict, kind: str) -> list[dict]:
    """The label-free gates of ``registry.gates`` that are on, applied to one method's evidence."""
    from .register import check_gates

    return check_gates(gates, {k: row.get(k) for k in LABEL_FREE_KEYS[kind]}, kind)


def rule_for(setting: str, rows: list[dict], kind: str) -> str:
    if setting not in SETTINGS:
        raise SelectionError(f"unknown selection {setting!r} (one of {', '.join(SETTINGS)})")
    if setting != "auto":
        return setting
    key = f"target_{MEASURE[kind]}"
    return "labels" if rows and all(r.get(key) is not None for r in rows) else "label_free"


def rank(rows: list[dict], gates, kind: str, setting: str = "label_free") -> dict:
    """Order the methods' evidence ``rows`` (in the order of the methods given: it breaks ties) by the rule that
    ``setting`` gives; see the module docstring. Returns the selection without site facts (see :func:`select`)."""
    if not rows:
        raise SelectionError("no method to select from")
    rule = rule_for(setting, rows, kind)
    measure = MEASURE[kind]
    key = f"target_{measure}"
    order = {r["method"]: i for i, r in enumerate(rows)}
    out_rows = []
    for r in rows:
        g = label_free_gates(gates, r, kind)
        out_rows.append({**r, "gates": g, "gates_passed": all(x["passed"] for x in g),
                         "gates_failed": sum(not x["passed"] for x in g)})
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
    else:
        for r in out_rows:
            r["score"] = r.get("consistency")
        fallback = not any(r["gates_passed"] for r in out_rows)

        def key_lf(r):
            s, e = r["score"], r.get("entropy")
            return (0 if r["gates_passed"] else 1, r["gates_failed"], -(s if s is not None else -math.inf),
                    e if e is not None else math.inf, order[r["method"]])

        ranked = sorted(out_rows, key=key_lf)
        text = ("label_free: methods that pass every label-free gate of registry.gates, by shift consistency on the "
                "target's test images (highest first; ties: lower entropy)")
        if fallback:
            text += "; no method passed the gates: all ranked by gates failed (fewest first), then as above"
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    winner = ranked[0]
    res = {"schema": SCHEMA, "kind": kind, "setting": setting, "rule": rule, "rule_text": text,
           "winner": winner["method"], "score": winner["score"], "fallback": fallback,
           "ranking": [r["method"] for r in ranked], "methods": ranked}
    labeled = [r for r in out_rows if r.get(key) is not None]
    res["labeled"] = bool(labeled) and len(labeled) == len(out_rows)
    best = max(labeled, key=lambda r: (r[key], -order[r["method"]])) if res["labeled"] else None
    res["labeled_best"] = best["method"] if best else None
    res[f"labeled_best_{measure}"] = best[key] if best else None
    res[f"winner_{measure}"] = winner.get(key) if best else None
    res[f"regret_{measure}"] = float(best[key] - winner[key]) if best else None
    return res


# ---- the step -------------------------------------------------------------------------------------------------------
def select(settings: Settings, site: str, methods: list[str] | None = None, selection: str | None = None,
           seed: int | None = None) -> dict:
    """Measure every competing method's evidence on ``site`` and rank them (``selection``: ``label_free``,
    ``labels`` or ``auto``; default ``registry.selection``). Returns the selection record (the content of
    ``selection.json``, see :func:`write_selection`)."""
    setting = selection or settings.registry.selection
    if setting not in SETTINGS:
        raise SelectionError(f"unknown selection {setting!r} (one of {', '.join(SETTINGS)})")
    keep, excluded = candidates(settings, site, methods)
    kind = settings.task_of(site).kind
    imgs = target_images(settings, site)
    rows = [evidence(settings, site, m, seed, images=imgs) for m in keep]
    res = rank(rows, settings.registry.gates, kind, setting)
    d = settings.direction_to(site)
    res = {"task": settings.site(site).task, "site": site, "source_site": d.source,
           "seed": settings.seed if seed is None else seed, **res, "excluded": excluded}
    log.info("%s: candidate %s (rule %s, ranking %s)", site, res["winner"], res["rule"], ", ".join(res["ranking"]))
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
    """The ``selection.*`` tags of the registered version: why it won (values are method names and numbers)."""
    measure = MEASURE[result["kind"]]
    winner = next(r for r in result["methods"] if r["method"] == result["winner"])
    compact = {r["method"]: {k: r.get(k) for k in ("rank", "score", "entropy", "consistency", "gates_passed",
                                                   *LABEL_FREE_KEYS[result["kind"]], f"target_{measure}")}
               for r in result["methods"]}
    tags = {
        "selection.rule": result["rule"],
        "selection.setting": result["setting"],
        "selection.score": _num(result["score"]),
        "selection.rank": f"{winner['rank']} of {len(result['methods'])}",
        "selection.ranking": ",".join(result["ranking"]),
        "selection.fallback": str(bool(result["fallback"])).lower(),
        "selection.entropy": _num(winner.get("entropy")),
        "selection.consistency": _num(winner.get("consistency")),
        "selection.compared": json.dumps(compact, sort_keys=True, default=str)[:5000],
        "selection.excluded": ",".join(e["method"] for e in result.get("excluded", [])) or "none",
        "selection.labeled_best": result.get("labeled_best") or "none",
        f"selection.regret_{measure}": _num(result.get(f"regret_{measure}")),
    }
    return tags
