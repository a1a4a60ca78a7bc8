"""Small raw sites on disk and their settings, shared by the step tests (preprocess, evaluate/report,
classification, tracking/registry); the fixtures built from them (``prepared_env``, ``cls_env``) are in conftest.py.

- ``heart_xr_settings`` + ``write_volume_site`` / ``write_xr_site``: a 3D two-structure task with an MR-like source
  and a CT-like target (NIfTI), and a 2D lungs task (PNG).
- ``pneumonia_settings`` + ``write_png_site_csv`` / ``write_png_site_folders``: a two-class classification task, with
  labels in a CSV beside the images or one folder per class.
- ``fake_predictions``: label maps written as a method's predictions (perfect, eroded or shifted).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from siteadapt.config import parse_settings
from siteadapt.io.volume import save_nifti
from siteadapt.layout import run_name


# ---- segmentation: a 3D heart-like task and a 2D lungs task ------------------------------------------------------
def heart_xr_settings(tmp: Path, seed=0, roi_rule="auto", target_of=None):
    sites = {
        "src": {"task": "heart", "images": str(tmp / "raw/src/images"), "labels": str(tmp / "raw/src/labels"),
                "modality": "MR"},
        "tgt": {"task": "heart", "images": str(tmp / "raw/tgt/images"), "labels": str(tmp / "raw/tgt/labels"),
                "modality": "CT"},
        "xa": {"task": "xr", "images": str(tmp / "raw/xa/images"), "labels": str(tmp / "raw/xa/labels"),
               "modality": "DX", "pixel_spacing_mm": 0.5},
    }
    return parse_settings({
        "profile": "t", "seed": seed,
        "paths": {"ingested": str(tmp / "ing"), "prepared": str(tmp / "prep")},
        "profiles": {"t": {"image_size": 24, "batch_size": 2, "iterations": 2, "width": 0.25, "synth_scale": 0.5,
                           "synth_subjects": 3, "synth_images": 5, "slice_spacing_mm": 4.0}},
        "tasks": {
            "heart": {"dims": 3, "structures": {"A": 1, "B": 2},
                      "directions": [{"source": "src", "target": "tgt"}],
                      "preprocess": {"slice_axis": "coronal", "roi_mm": [48, 48, 48], "roi_rule": roi_rule,
                                     "split": {"val": 0.2, "test": 0.2}}},
            "xr": {"dims": 2, "structures": {"right_lung": 1, "left_lung": 2}},
        },
        "sites": sites,
    }, source="test")


def write_volume_site(root: Path, n: int, modality: str, seed: int):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        shape = (40, 36, 24)
        # an oblique-free but LPS-flipped affine for the CT-like site, RAS for the MR-like one
        sp = (1.5, 1.5, 3.0)
        aff = np.diag([*sp, 1.0]) if modality == "MR" else np.diag([-sp[0], -sp[1], sp[2], 1.0])
        aff[:3, 3] = rng.uniform(-20, 20, 3)
        body = np.zeros(shape, bool)
        zz, yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
        body = ((zz - 20) / 17) ** 2 + ((yy - 18) / 15) ** 2 < 1
        lab = np.zeros(shape, np.uint8)
        c = np.array([20, 18, 12]) + rng.integers(-3, 4, 3)
        ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + ((xx - c[2]) * 2) ** 2) < 36
        lab[ball] = 1
        lab[ball & (zz > c[0])] = 2
        base = {"MR": (300.0, 600.0), "CT": (-1000.0, 40.0)}[modality]
        img = np.where(body, base[1], base[0]) + rng.normal(0, 10, shape)
        img[lab == 1] += 200
        img[lab == 2] += 400
        img = img.astype(np.int16 if modality == "CT" else np.float32)
        nib.save(nib.Nifti1Image(img, aff), root / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / "labels" / f"c{i}.nii.gz")


def write_xr_site(root: Path, n: int):
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        m = np.zeros((50, 40), np.uint8)
        m[10:40, 4:17] = 1
        m[10:40, 23:36] = 2
        im = (rng.normal(120, 5, (50, 40)) - 60 * (m > 0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(im).save(root / "images" / f"x{i}.png")
        Image.fromarray(m).save(root / "labels" / f"x{i}.png")



# ---- classification: normal vs pneumonia on PNG radiographs ----------------------------------------------------
PNEUMONIA_CLASSES = ["normal", "pneumonia"]


def pneumonia_png(rng, positive: bool) -> np.ndarray:
    a = rng.normal(100, 8, (40, 36))
    if positive:  # a bright "opacity"
        a[10:22, 8:18] += 60
    return a.clip(0, 255).astype(np.uint8)


def write_png_site_csv(root: Path, n: int, seed: int) -> list[int]:
    """PNG images + labels.csv beside the folder (plus rows that must be rejected)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    ys = [int(i % 5 < 2) for i in range(n)]  # 40 % positive
    lines = ["stem,label"]
    for i, y in enumerate(ys):
        Image.fromarray(pneumonia_png(rng, bool(y))).save(root / "images" / f"a{i:03d}.png")
        lines.append(f"a{i:03d}.png,{PNEUMONIA_CLASSES[y].upper()}" if i % 3 == 0 else f"a{i:03d},{y}")
    lines += ["ghost,normal", "a000,pneumonia", "a001,effusion", "short"]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return ys


def write_png_site_folders(root: Path, n: int, seed: int) -> list[int]:
    """One folder per class (as the public pediatric set): train/NORMAL/*.png, train/PNEUMONIA/*.png."""
    rng = np.random.default_rng(seed)
    ys = [int(i % 4 != 0) for i in range(n)]  # 75 % positive
    for i, y in enumerate(ys):
        d = root / "images" / "train" / ("PNEUMONIA" if y else "NORMAL")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pneumonia_png(rng, bool(y))).save(d / f"p{i:03d}.png")
    (root / "images" / "unsorted").mkdir()
    Image.fromarray(pneumonia_png(rng, False)).save(root / "images" / "unsorted" / "extra.png")  # no class: unlabeled
    return ys


def pneumonia_settings(tmp: Path, **task_extra) -> object:
    return parse_settings({
        "profile": "t", "seed": 0,
        "paths": {"raw": str(tmp / "raw"), "ingested": str(tmp / "ing"), "prepared": str(tmp / "prep"),
                  "predictions": str(tmp / "pred"), "models": str(tmp / "models"), "metrics": str(tmp / "metrics"),
                  "reports": str(tmp / "reports")},
        "profiles": {"t": {"image_size": 32, "batch_size": 4, "iterations": 3, "width": 0.125, "synth_scale": 0.5,
                           "synth_subjects": 3, "synth_images": 5, "slice_spacing_mm": 4.0}},
        "tasks": {"pn": {"kind": "classification", "dims": 2, "classes": PNEUMONIA_CLASSES,
                         "directions": [{"source": "ad", "target": "ped"}], **task_extra}},
        "sites": {"ad": {"task": "pn", "images": str(tmp / "raw/ad/images"), "labels": str(tmp / "raw/ad/labels.csv"),
                         "modality": "CR", "pixel_spacing_mm": 1.0},
                  "ped": {"task": "pn", "images": str(tmp / "raw/ped/images"), "modality": "DX",
                          "pixel_spacing_mm": 1.0}},
    }, source="test")



# ---- predictions written by hand ----------------------------------------------------------------------------------
def fake_predictions(s, site, method, seed=None, erode=0, shift=0):
    subj = json.loads((s.paths.prepared / site / "subjects.json").read_text())["subjects"]
    out = s.paths.predictions / site / run_name(s, method, seed)
    for r in subj:
        if r["split"] != "test":
            continue
        img = nib.load(s.paths.ingested / r["label"])
        lab = np.asanyarray(img.dataobj).copy()
        if erode:
            for k in (1, 2):
                m = ndimage.binary_erosion(lab == k, iterations=erode)
                lab[(lab == k) & ~m] = 0
        lab = np.roll(lab, shift, axis=0)
        save_nifti(lab.astype(np.uint8), out / f"{r['id']}.nii.gz", img.affine)

