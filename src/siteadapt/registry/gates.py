"""Gate measurements of an adapted model (target Dice/AUC from its evaluation, shape plausibility, regression on
the source site) and the check of those measurements against ``registry.gates``."""

from __future__ import annotations

import logging

import numpy as np

from ..config import Gates, Settings
from ..errors import InputError, RegistryError
from ..layout import metrics_path, read_metrics
from ..metrics.segmentation import label_dice

log = logging.getLogger("siteadapt.register")


def source_regression(settings: Settings, site: str, method: str, seed: int | None = None) -> dict:
    """Segmentation: Dice on the source site's labeled test slices (per subject, mean over structures, then over
    subjects) of the source segmenter and of the adapted model; ``source_dice_drop`` = source segmenter - adapted.
    Classification: AUC on the source site's labeled test images of both; ``source_auc_drop`` = source - adapted.

    The source segmenter is the one the adapted model was built from (its seed). An adapted model that carries the
    target's batch-norm statistics (``site_statistics``: AdaBN, TENT, self-training with AdaBN, FDA) is measured as
    it would run on the source site, its statistics re-estimated on the source test images
    (:meth:`~siteadapt.methods.base.Method.for_site`; label-free): with the target's statistics on source images
    every such model "drops" by design, which says nothing about whether its weights still solve the task."""
    import torch

    from ..data.shards import load_slices
    from ..layout import model_dir, source_model_path
    from ..methods.build import load_for_prediction, load_model

    adapted = load_for_prediction(settings, site, method, seed)
    payload = torch.load(model_dir(settings, site, method, seed) / "model.pt", map_location="cpu", weights_only=False)
    source = payload.get("source_site")
    if not source:
        return {}
    try:
        data = load_slices(settings.paths.prepared, source, "test", labels=True)
    except InputError as e:
        log.warning("source regression not measured: %s", e)
        return {}
    src_model, _ = load_model(source_model_path(settings, source, payload.get("seed", seed)))
    adapted = adapted.for_site(torch.from_numpy(np.ascontiguousarray(data.images)).unsqueeze(1))
    if settings.task_of(site).kind == "classification":
        return _source_auc(src_model, adapted, data)
    ids = sorted(settings.task_of(site).structures.values())
    d_src, d_ad = [], []
    with torch.no_grad():
        for subj in np.unique(data.subject):
            rows = data.subject == subj
            x = torch.from_numpy(np.ascontiguousarray(data.images[rows])).unsqueeze(1)
            ref = data.labels[rows]
            a = label_dice(src_model.predict_subject(x).argmax(1).numpy(), ref, ids)
            b = label_dice(adapted.predict_subject(x).argmax(1).numpy(), ref, ids)
            if a is not None and b is not None:
                d_src.append(a)
                d_ad.append(b)
    if not d_src:
        return {}
    return {"source_dice_source_model": float(np.mean(d_src)), "source_dice_adapted": float(np.mean(d_ad)),
            "source_dice_drop": float(np.mean(d_src) - np.mean(d_ad))}


def _source_auc(src_model, adapted, data) -> dict:
    """AUC of the source classifier and of the adapted model on the source site's labeled test images."""
    import torch

    from ..metrics import auc

    if data.labels is None or len(data) == 0 or len(np.unique(data.labels)) < 2:
        log.warning("source AUC not measured: the source site's test split needs images of both classes")
        return {}
    x = torch.from_numpy(np.ascontiguousarray(data.images)).unsqueeze(1)
    with torch.no_grad():
        s_src = torch.softmax(src_model.predict_subject(x).float(), 1)[:, 1].numpy()
        s_ad = torch.softmax(adapted.predict_subject(x).float(), 1)[:, 1].numpy()
    a_src, a_ad = auc(data.labels, s_src), auc(data.labels, s_ad)
    if not (np.isfinite(a_src) and np.isfinite(a_ad)):
        return {}
    return {"source_auc_source_model": float(a_src), "source_auc_adapted": float(a_ad),
            "source_auc_drop": float(a_src - a_ad)}


def gate_values(settings: Settings, site: str, method: str, seed: int | None = None) -> dict[str, float | None]:
    """What the gates threshold, measured now: segmentation: target Dice (labeled sites), plausibility, source
    Dice regression; classification: target AUC (labeled sites), source AUC regression."""
    mp = metrics_path(settings, site, method, seed)
    if not mp.is_file():
        raise InputError(mp, f"no evaluation of {method} on {site}: run `siteadapt evaluate --site {site} --method "
                             f"{method} --predict` first")
    m = read_metrics(mp)
    if settings.task_of(site).kind == "classification":
        vals: dict[str, float | None] = {"target_auc": None}
        if m.get("labeled", True) and m.get("auc") is not None:
            vals.update({"target_auc": m["auc"], "target_accuracy": m.get("accuracy"),
                         "target_sensitivity": m.get("sensitivity"), "target_specificity": m.get("specificity"),
                         "target_n_images": m.get("n_test")})
        vals.update(source_regression(settings, site, method, seed))
        return vals
    vals = {"target_dice": None}
    if m.get("labeled", True) and m.get("dice"):
        vals["target_dice"] = m["dice"].get("mean")
        vals["target_assd"] = (m.get("assd") or {}).get("mean")
        vals["target_n_subjects"] = m.get("n_subjects")
    pl = m.get("plausibility") or {}
    vals["empty_fraction"] = pl.get("empty_fraction")
    vals["fragmented_fraction"] = pl.get("fragmented_fraction")
    vals.update(source_regression(settings, site, method, seed))
    return vals


GATES = [  # (gate = params key, measurement, comparison, label-free, task kind)
    ("min_target_dice", "target_dice", ">=", False, "segmentation"),
    ("max_source_dice_drop", "source_dice_drop", "<=", True, "segmentation"),
    ("max_empty_fraction", "empty_fraction", "<=", True, "segmentation"),
    ("max_fragmented_fraction", "fragmented_fraction", "<=", True, "segmentation"),
    ("min_target_auc", "target_auc", ">=", False, "classification"),
    ("max_source_auc_drop", "source_auc_drop", "<=", True, "classification"),
]
TARGET_MEASURE = {"segmentation": "target_dice", "classification": "target_auc"}  # present = a labeled site


def check_gates(cfg: Gates, values: dict[str, float | None], kind: str | None = None) -> list[dict]:
    """The gates of ``registry.gates`` that apply to a model of task kind ``kind`` (None: read from the
    measurements, ``target_auc`` only exists for classification) with measurements ``values``."""
    if kind is None:
        kind = "classification" if "target_auc" in values or "source_auc_drop" in values else "segmentation"
    if kind not in TARGET_MEASURE:
        raise RegistryError(f"unknown task kind {kind!r} (segmentation or classification)")
    labeled = values.get(TARGET_MEASURE[kind]) is not None
    out = []
    for name, key, op, label_free, gate_kind in GATES:
        threshold = getattr(cfg, name)
        if threshold is None or gate_kind != kind:
            continue
        if label_free and labeled and cfg.label_free == "auto":
            continue
        if not label_free and not labeled:
            continue
        v = values.get(key)
        passed = v is not None and (v >= threshold if op == ">=" else v <= threshold)
        out.append({"name": name, "value": v, "threshold": threshold, "passed": bool(passed)})
    return out


def format_gate(g: dict) -> str:
    op = ">=" if g["name"].startswith("min_") else "<="
    v = "missing" if g["value"] is None else f"{g['value']:.4f}"
    return f"{g['name']}: {v} (needs {op} {g['threshold']}) {'passed' if g['passed'] else 'FAILED'}"
