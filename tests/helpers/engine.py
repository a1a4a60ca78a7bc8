"""Tiny 2D training data and model-state helpers for the engine and resume tests."""

from __future__ import annotations

import numpy as np

from siteadapt.data.shards import SliceSet
from siteadapt.methods.base import Context

# three classes on 32x32 slices with the narrowest network: fast enough for a few iterations on a CPU
CTX = Context(n_classes=3, image_size=32, width=0.125)


def slices(n=12, seed=0, labels=True, shift=0.0) -> SliceSet:
    """``n`` 32x32 slices, each a label-1 square with a label-2 core, in 4-slice subjects; ``shift`` moves the
    intensities (a domain shift), ``labels=False`` drops the labels (a target site)."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        c = rng.integers(10, 22, 2)
        y[i, c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5] = 1
        y[i, c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2] = 2
    x = (rng.normal(0, 0.1, y.shape) + 0.4 * y - 0.5 + shift).clip(-1, 1).astype(np.float32)
    return SliceSet("s", "train", x, y if labels else None, np.repeat(np.arange(n // 4), 4), np.tile(np.arange(4), n // 4),
                    [])


def state_copy(model) -> dict:
    """A detached copy of a model's state dict (to compare two runs' final weights exactly)."""
    return {k: v.clone() for k, v in model.state_dict().items()}
