"""Label-free plausibility of predicted label maps: what can be checked on a site that has no labels.

For every (subject, structure) pair of a method's raw predictions (before post-processing, so that the numbers
describe the model, not the clean-up):

- ``empty``: the structure is absent from the prediction (every structure of the task is present in every subject of
  the supported anatomy, so an empty structure is a failure);
- ``largest_share``: the share of the structure's voxels in its largest connected component (1.0 = one piece);
  a structure is ``fragmented`` when that share is below :data:`FRAGMENT_SHARE`.

:func:`summarize_plausibility` turns the per-pair records into the fractions that the label-free promotion gates
threshold (``registry.gates.max_empty_fraction`` / ``max_fragmented_fraction``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FRAGMENT_SHARE = 0.9  # largest component below 90% of the structure = fragmented


def shape_checks(pred: np.ndarray, structures: dict[str, int]) -> dict[str, dict]:
    """Per structure: voxel count, number of connected components (face connectivity), largest component's share."""
    out = {}
    conn = ndimage.generate_binary_structure(pred.ndim, 1)
    for name, lab in structures.items():
        m = pred == lab
        n = int(m.sum())
        if n == 0:
            out[name] = {"voxels": 0, "components": 0, "largest_share": None, "empty": True, "fragmented": False}
            continue
        cc, k = ndimage.label(m, structure=conn)
        sizes = np.bincount(cc.ravel())[1:]
        share = float(sizes.max() / n)
        out[name] = {"voxels": n, "components": int(k), "largest_share": share, "empty": False,
                     "fragmented": share < FRAGMENT_SHARE}
    return out


def summarize_plausibility(per_subject: list[dict[str, dict]]) -> dict:
    """Fractions over all (subject, structure) pairs: empty, and fragmented among the non-empty ones."""
    pairs = [v for subj in per_subject for v in subj.values()]
    non_empty = [v for v in pairs if not v["empty"]]
    return {
        "n_subjects": len(per_subject),
        "n_pairs": len(pairs),
        "empty_fraction": (sum(v["empty"] for v in pairs) / len(pairs)) if pairs else None,
        "fragmented_fraction": (sum(v["fragmented"] for v in non_empty) / len(non_empty)) if non_empty else None,
        "fragment_share": FRAGMENT_SHARE,
    }
