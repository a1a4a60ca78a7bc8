"""Binary classification metrics (TUNA-Net protocol): AUC, accuracy, sensitivity, specificity, F1.

Conventions
===========
* ``y_true``: 0 = negative (normal), 1 = positive (pneumonia). Booleans are accepted. Any other value, a
  length mismatch or a non-1D input is a programming error and raises ``ValueError`` before anything is computed.
* ``scores``: larger = more likely positive. A sample is predicted positive when ``score >= threshold``.
* AUC is rank based (Mann-Whitney U): ``(sum of the mid-ranks of the positives - n1 (n1 + 1) / 2) / (n1 n0)``;
  tied scores get their average rank, which equals counting every positive/negative tie as 1/2 and equals the
  trapezoidal area under the ROC curve (what ``sklearn.metrics.roc_auc_score`` returns).
* sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), accuracy = (TP + TN) / n,
  F1 = 2 TP / (2 TP + FP + FN).
* Degenerate cases give NaN, never an exception, and :func:`classification_metrics` says why in
  ``"nan_reasons"``: AUC needs both classes; sensitivity needs a positive, specificity a negative; F1 is
  undefined when there is no positive sample and no positive prediction; everything is NaN for an empty set or
  when a score is NaN or infinite (the run that produced it is broken, and no number should hide that).

Threshold (TUNA-Net: "the validation set is only used to optimize the threshold using Youden's index")
    :func:`youden_threshold` is computed on the **validation** set and then passed unchanged to
    :func:`classification_metrics` on the test set; no function here looks at test labels to choose it.
    Candidates are the cuts between consecutive distinct validation scores ``u_j < u_(j+1)``; the threshold of a
    cut is the midpoint ``(u_j + u_(j+1)) / 2`` (any value in ``(u_j, u_(j+1)]`` gives the same validation
    result; the midpoint is the one least sensitive to small score shifts on new data; ``placement="upper"``
    returns ``u_(j+1)`` instead, the value ``sklearn.metrics.roc_curve`` would list). The trivial cuts (all
    positive / all negative, J = 0) are not candidates. The cut maximising J = sensitivity + specificity - 1
    wins; among equal J, the one with the higher sensitivity (lower threshold). One class only, or fewer than
    two distinct scores, or non-finite scores -> NaN.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "auc",
    "confusion_counts",
    "youden_threshold",
    "classification_metrics",
]

_NAN = float("nan")


def _prepare(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and scores must be 1D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.dtype == np.bool_:
        y = y.astype(np.int8)
    else:
        if y.size and not np.all(np.isin(y, (0, 1))):
            raise ValueError("y_true must contain only 0 (negative) and 1 (positive)")
        y = y.astype(np.int8)
    return y, s


def _auc_reason(y: np.ndarray, s: np.ndarray) -> str | None:
    if y.size == 0:
        return "empty set"
    if not np.all(np.isfinite(s)):
        return "non-finite scores"
    n1 = int(y.sum())
    if n1 == 0 or n1 == y.size:
        return "only one class present (AUC needs positives and negatives)"
    return None


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    ranks = rankdata(s, method="average")
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def auc(y_true, scores) -> float:
    """Area under the ROC curve by ranks (ties count 1/2); NaN with one class only or non-finite scores."""
    y, s = _prepare(y_true, scores)
    return _NAN if _auc_reason(y, s) else _auc(y, s)


def confusion_counts(y_true, scores, threshold: float) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` for the rule ``score >= threshold`` -> positive."""
    y, s = _prepare(y_true, scores)
    pos = s >= float(threshold)
    return {
        "tp": int(np.count_nonzero(pos & (y == 1))),
        "fp": int(np.count_nonzero(pos & (y == 0))),
        "tn": int(np.count_nonzero(~pos & (y == 0))),
        "fn": int(np.count_nonzero(~pos & (y == 1))),
    }


def youden_threshold(y_true, scores, *, placement: str = "midpoint", return_details: bool = False):
    """Threshold maximising Youden's J on a validation set (see the module docstring for the rules).

    Returns the threshold (float, NaN when undefined). With ``return_details=True`` returns
    ``{"threshold", "j", "sensitivity", "specificity", "reason"}`` (``reason`` None unless NaN).
    """
    if placement not in ("midpoint", "upper"):
        raise ValueError(f"placement must be 'midpoint' or 'upper', got {placement!r}")
    y, s = _prepare(y_true, scores)
    reason = _auc_reason(y, s)
    u = np.unique(s) if reason is None else np.empty(0)
    if reason is None and u.size < 2:
        reason = "fewer than two distinct scores (no non-trivial threshold)"
    if reason is not None:
        details = {"threshold": _NAN, "j": _NAN, "sensitivity": _NAN, "specificity": _NAN, "reason": reason}
        return details if return_details else _NAN
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    # positives / negatives with score <= u_j, for every distinct value u_j
    idx = np.searchsorted(u, s)
    pos_le = np.cumsum(np.bincount(idx[y == 1], minlength=u.size))
    neg_le = np.cumsum(np.bincount(idx[y == 0], minlength=u.size))
    # cut j (0-based, j < m-1): positive iff score > u_j
    sens = (n1 - pos_le[:-1]) / n1
    spec = neg_le[:-1] / n0
    j_stat = sens + spec - 1.0
    # lowest cut = highest sensitivity among (numerically) equal J
    best = int(np.flatnonzero(j_stat >= j_stat.max() - 1e-12)[0])
    lo, hi = float(u[best]), float(u[best + 1])
    if placement == "upper":
        t = hi
    else:
        t = lo + (hi - lo) / 2.0
        if not lo < t <= hi:  # adjacent floats: the midpoint rounds onto lo
            t = hi
    if return_details:
        return {"threshold": t, "j": float(j_stat[best]), "sensitivity": float(sens[best]),
                "specificity": float(spec[best]), "reason": None}
    return t


def classification_metrics(y_true, scores, threshold: float) -> dict:
    """AUC, accuracy, sensitivity, specificity and F1 at a *given* threshold (chosen beforehand, e.g. by
    :func:`youden_threshold` on validation data).

    Returns ``{"auc", "accuracy", "sensitivity", "specificity", "f1", "threshold", "n", "n_pos", "n_neg",
    "tp", "fp", "tn", "fn", "nan_reasons": {metric: reason}}``.
    """
    y, s = _prepare(y_true, scores)
    thr = float(threshold)
    n = int(y.size)
    n1 = int(y.sum())
    n0 = n - n1
    reasons: dict[str, str] = {}
    out: dict = {"threshold": thr, "n": n, "n_pos": n1, "n_neg": n0}
    broken = None
    if n == 0:
        broken = "empty set"
    elif not np.all(np.isfinite(s)):
        broken = "non-finite scores"
    elif math.isnan(thr):
        broken = "threshold is NaN"
    if broken is not None:
        for k in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
            out[k] = _NAN
            reasons[k] = broken
        out.update({"tp": 0, "fp": 0, "tn": 0, "fn": 0})
        if broken == "threshold is NaN" and _auc_reason(y, s) is None:
            out["auc"] = _auc(y, s)  # AUC does not depend on the threshold
            del reasons["auc"]
        out["nan_reasons"] = reasons
        return out
    c = confusion_counts(y, s, thr)
    out.update(c)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    r = _auc_reason(y, s)
    out["auc"] = _NAN if r else _auc(y, s)
    if r:
        reasons["auc"] = r
    out["accuracy"] = (tp + tn) / n
    out["sensitivity"] = tp / n1 if n1 else _NAN
    if not n1:
        reasons["sensitivity"] = "no positive samples"
    out["specificity"] = tn / n0 if n0 else _NAN
    if not n0:
        reasons["specificity"] = "no negative samples"
    den = 2 * tp + fp + fn
    out["f1"] = 2 * tp / den if den else _NAN
    if not den:
        reasons["f1"] = "no positive samples and no positive predictions"
    out["nan_reasons"] = reasons
    return out
