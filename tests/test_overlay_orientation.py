"""Overlays are drawn the right way up (issue 20, item 8).

2D: a PNG (and a DICOM radiograph) with a bright block at its top-left and a dark block at its bottom-right goes
through ingest (the code path the overlays read: the ingested NIfTI) and the overlay writers; the written PNG's image
panel is read back and its quadrants compared; likewise the adapt step's translation grid of prepared 2D slices.
3D: a volume with an LPS affine (as ingested DICOM) and a bright block at the patient's right-superior corner: the
coronal overlay shows superior at the top and the patient's right on the image's right (the neurological convention
of RAS display), which is what the 3D overlays did before and still do.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from siteadapt.steps.evaluate import _overlay_unlabeled, display_slice, save_overlay

REPO = Path(__file__).resolve().parents[1]
ROWS, COLS = 40, 60  # not square: a transposed picture would not fit the panel the same way
GRAY = 100  # background; maps to mid-gray with the overlay's 1-99 percentile window (0 .. 255)


def _picture() -> np.ndarray:
    """rows x cols picture: bright block top-left, dark block bottom-right, gray elsewhere."""
    a = np.full((ROWS, COLS), GRAY, np.uint8)
    a[: ROWS // 4 + 2, : COLS // 4 + 3] = 255
    a[-(ROWS // 4 + 2):, -(COLS // 4 + 3):] = 0
    return a


def _image_panel(png, gray: float = GRAY, width: float = 1 / 3, height: float = 1.0) -> np.ndarray:
    """The top-left panel's image pixels (grayscale 0..255) of a figure PNG: the bounding box of the picture's
    mid-gray background (drawn as ``gray``) within the figure's left ``width`` and top ``height`` fractions."""
    fig = np.asarray(Image.open(png).convert("L"), dtype=float)
    part = fig[: int(fig.shape[0] * height), : int(fig.shape[1] * width)]
    mask = np.abs(part - gray) <= 8
    rows = np.flatnonzero(mask.sum(1) >= 20)  # titles' anti-aliased text never has that many in one line
    cols = np.flatnonzero(mask.sum(0) >= 20)
    assert rows.size and cols.size, "no image panel found in the figure"
    return part[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def _quadrant_means(panel: np.ndarray) -> dict[str, float]:
    h, w = panel.shape
    q = {"top_left": panel[: h // 5, : w // 5], "top_right": panel[: h // 5, -w // 5:],
         "bottom_left": panel[-h // 5:, : w // 5], "bottom_right": panel[-h // 5:, -w // 5:]}
    return {k: float(v.mean()) for k, v in q.items()}


def test_display_slice_2d_is_the_input_picture():
    pic = _picture()
    stored = np.ascontiguousarray(pic.T)  # how io/files.py stores a PNG: [column, row]
    assert np.array_equal(display_slice(stored, two_d=True), pic)


@pytest.mark.parametrize("fmt", ["png", "dicom"])
def test_2d_overlay_after_ingest_shows_the_input_upright(tmp_path, deid_key, fmt):
    from siteadapt.io.dicom_write import write_2d
    from siteadapt.steps.ingest import ingest

    src = tmp_path / "site"
    src.mkdir()
    if fmt == "png":
        Image.fromarray(_picture()).save(src / "img001.png")
    else:  # a radiograph: pixel data in DICOM order (rows, columns), first row at the top
        write_2d(src / "img001.dcm", _picture().astype(np.uint16), patient={"PatientID": "PID-4711"})
    res = ingest(src, "cxr_t", tmp_path / "ingested")
    assert len(res.items) == 1
    item = res.items[0]
    site_dir = tmp_path / "ingested" / "cxr_t"  # manifest paths are relative to the site's folder
    img = nib.load(str(site_dir / item["image"]))
    assert img.shape == (COLS, ROWS)
    pred = np.zeros(img.shape, np.uint8)
    pred[:5, :5] = 1  # a prediction at the picture's top-left corner
    s = SimpleNamespace(paths=SimpleNamespace(ingested=site_dir))
    task = SimpleNamespace(preprocess=SimpleNamespace(slice_axis="coronal"))
    out = tmp_path / "unlabeled.png"
    _overlay_unlabeled(s, task, {"image": item["image"]}, nib.Nifti1Image(pred, img.affine), out, "t", 3)
    q = _quadrant_means(_image_panel(out))
    assert q["top_left"] > 230, q  # the bright block, where the PNG has it (upside down: bottom-left)
    assert q["bottom_right"] < 25, q  # the dark block
    assert 70 < q["bottom_left"] < 130 and 70 < q["top_right"] < 130, q  # background gray
    # the labeled path of evaluate() hands the same arrays to save_overlay
    out2 = tmp_path / "labeled.png"
    save_overlay(np.asanyarray(img.dataobj), pred, pred, 0, out2, "t", 3)
    q2 = _quadrant_means(_image_panel(out2))
    assert q2["top_left"] > 230 and q2["bottom_right"] < 25, q2
    manifest = json.loads((tmp_path / "ingested" / "cxr_t" / "manifest.json").read_text())
    assert "img001" not in json.dumps(manifest)


def test_3d_overlay_keeps_superior_up_and_patient_right_on_the_right(tmp_path):
    # LPS-flipped voxel axes as ingested DICOM has (affine diag(-1, -1, 1)): voxel i grows toward the patient's
    # left, j toward posterior, k toward superior
    shape = (30, 8, 20)
    data = np.full(shape, GRAY, np.int16)
    data[:8, :, -6:] = 255  # low i = patient's right; high k = superior
    data[-8:, :, :6] = 0  # patient's left, inferior
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(vol))
    pred = np.zeros(shape, np.uint8)
    pred[10:14, 4, 8:12] = 1  # the coronal slice with the largest prediction: j = 4
    s = SimpleNamespace(paths=SimpleNamespace(ingested=tmp_path))
    task = SimpleNamespace(preprocess=SimpleNamespace(slice_axis="coronal"))
    out = tmp_path / "vol.png"
    _overlay_unlabeled(s, task, {"image": "vol.nii.gz"}, nib.Nifti1Image(pred, affine), out, "t", 3)
    q = _quadrant_means(_image_panel(out))
    assert q["top_right"] > 230, q  # superior at the top, the patient's right on the image's right (neurological)
    assert q["bottom_left"] < 25, q
    assert 70 < q["top_left"] < 130 and 70 < q["bottom_right"] < 130, q


@pytest.mark.parametrize("axis_name,first,second", [("coronal", "R", "S"), ("axial", "R", "A"), ("sagittal", "A", "S")])
def test_display_slice_3d_axes(axis_name, first, second):
    # a canonical slice [first, second]: the second axis's positive end goes to the top, the first's to the right
    sl = np.zeros((5, 7))
    sl[4, 6] = 1  # positive end of both axes
    shown = display_slice(sl, two_d=False)
    assert shown.shape == (7, 5)
    assert shown[0, 4] == 1, (axis_name, first, second)


def test_translation_grid_shows_2d_slices_upright(tmp_path):
    """The adapt step's translations.png (prepared slices: a 2D picture keeps its (column, row) indexing)."""
    import torch

    from siteadapt.data.shards import SliceSet
    from siteadapt.steps.train import save_translations

    pic = np.zeros((32, 32), np.float32)  # prepared intensities in [-1, 1]: background 0 -> mid-gray
    pic[:10, :12] = 1.0  # top-left bright
    pic[-10:, -12:] = -1.0  # bottom-right dark
    prepared = np.repeat(pic.T[None], 4, axis=0)

    class Identity(torch.nn.Module):
        def translations(self, sx, tx):
            return {"source -> target-like": sx}

    sets = [SliceSet(site=k, split="train", images=prepared, labels=None, subject=np.zeros(4, np.int32),
                     slice=np.arange(4, dtype=np.int32), subjects=[{"id": "s"}]) for k in ("a", "b")]
    out = save_translations(Identity(), sets[0], sets[1], tmp_path / "translations.png", two_d=True)
    q = _quadrant_means(_image_panel(out, gray=128, width=1 / 4, height=1 / 3))
    assert q["top_left"] > 230 and q["bottom_right"] < 25, q
    assert 100 < q["bottom_left"] < 156 and 100 < q["top_right"] < 156, q


def test_classification_examples_after_preprocess_are_upright(tmp_path, deid_key):
    """ingest + preprocess of a 2D classification site keep the picture's (column, row) indexing (2D images are
    not canonicalised), so the prepared slices and the examples figure show the PNG the way up it was saved."""
    from siteadapt.config import parse_settings
    from siteadapt.steps.evaluate import save_examples
    from siteadapt.steps.ingest import ingest
    from siteadapt.steps.preprocess import preprocess

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp_path / k) for k in raw["paths"]}
    raw["sites"]["ped_t"] = {"task": "pneumonia", "images": str(tmp_path / "src"), "pixel_spacing_mm": 1.0}
    s = parse_settings(raw)
    for c in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(5):
            pic = _picture()
            pic[ROWS // 2, COLS // 2] = i + 1  # distinct images
            Image.fromarray(pic).save(tmp_path / "src" / c / f"{c.lower()}{i}.png")
    ingest(tmp_path / "src", "ped_t", s.paths.ingested, classes=["normal", "pneumonia"], pixel_spacing_mm=1.0)
    preprocess(s, "ped_t")
    z = np.load(s.paths.prepared / "ped_t" / "test.npz")
    shown = display_slice(z["images"][0], two_d=True)
    n = shown.shape[0]
    # the 40 x 60 picture is padded to a square: its rows lie in the middle two thirds
    top, bottom = shown[n // 6 + 2: n // 3, 2: n // 5], shown[2 * n // 3: 5 * n // 6 - 2, -n // 5: -2]
    assert top.mean() > 0.9 and bottom.mean() < -0.9, (top.mean(), bottom.mean())
    background = float(np.median(shown[n // 2 - 3: n // 2 + 3, n // 3: n // 2]))
    subjects = json.loads((s.paths.prepared / "ped_t" / "subjects.json").read_text())["subjects"]
    rows = [{"id": r["id"], "score": 0.9} for r in subjects if r["split"] == "test"][:1]
    out = save_examples(s, "ped_t", rows, None, tmp_path / "examples.png", "t")
    q = _quadrant_means(_image_panel(out, gray=(background + 1) / 2 * 255, width=1.0))
    assert q["top_left"] > 230 and q["bottom_right"] < 25, q
