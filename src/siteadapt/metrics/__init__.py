"""Evaluation metrics: per-structure segmentation metrics (Dice, recall, precision, ASD, ASSD, HD95, HD) and
binary classification metrics (AUC, accuracy, sensitivity, specificity, F1, Youden threshold).

Definitions are documented in :mod:`siteadapt.metrics.segmentation` and :mod:`siteadapt.metrics.classification`.
"""

from .classification import auc, classification_metrics, confusion_counts, youden_threshold
from .segmentation import (
    SEGMENTATION_METRICS,
    asd,
    assd,
    dice,
    hd,
    hd95,
    precision,
    recall,
    segmentation_metrics,
    summarize,
    surface_distances,
)

__all__ = [
    "SEGMENTATION_METRICS",
    "asd",
    "assd",
    "auc",
    "classification_metrics",
    "confusion_counts",
    "dice",
    "hd",
    "hd95",
    "precision",
    "recall",
    "segmentation_metrics",
    "summarize",
    "surface_distances",
    "youden_threshold",
]
