"""Loading preprocessed slices (``<prepared>/<site>/<split>.npz``) for training and prediction.

Adaptation code asks for a target site's images with ``labels=False``: the label shards of a target are opened only
by the supervised upper bound and by evaluation, never by an adaptation method.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError


@dataclass
class SliceSet:
    site: str
    split: str
    images: np.ndarray  # (N, H, W) float32 in [-1, 1]
    labels: np.ndarray | None  # (N, H, W) uint8 label maps, (N,) class ids (classification), or None
    subject: np.ndarray  # (N,) index into subjects
    slice: np.ndarray  # (N,)
    subjects: list[dict]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> str:
        """SHA-256 of the slices (and labels, when loaded) this set holds: what a training run learned from."""
        h = hashlib.sha256()
        for a in (self.images, self.labels):
            if a is not None:
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(memoryview(a).cast("B"))
        return h.hexdigest()


def load_slices(prepared: Path, site: str, split: str | tuple[str, ...] = "train", *, labels: bool) -> SliceSet:
    d = Path(prepared) / site
    meta_path = d / "subjects.json"
    if not meta_path.is_file():
        raise InputError(meta_path, f"site {site} is not preprocessed: run `siteadapt preprocess --site {site}`")
    meta = json.loads(meta_path.read_text())
    splits = (split,) if isinstance(split, str) else tuple(split)
    imgs, labs, subj, sl = [], [], [], []
    for sp in splits:
        z = np.load(d / f"{sp}.npz")
        imgs.append(z["images"])
        subj.append(z["subject"])
        sl.append(z["slice"])
        if labels:
            lp = d / f"{sp}_labels.npz"
            if not lp.is_file():
                raise InputError(lp, f"site {site} has no labels for split {sp}")
            labs.append(np.load(lp)["labels"])
    images = np.concatenate(imgs)
    lab = np.concatenate(labs) if labels else None
    if lab is not None:
        keep = ~(lab.reshape(len(lab), -1) == 255).all(axis=1)  # slices (images) of unlabeled subjects
        images, lab = images[keep], lab[keep]
        subj = [np.concatenate(subj)[keep]]
        sl = [np.concatenate(sl)[keep]]
    return SliceSet(site=site, split="+".join(splits), images=images, labels=lab, subject=np.concatenate(subj),
                    slice=np.concatenate(sl), subjects=meta["subjects"])
