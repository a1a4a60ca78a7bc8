"""Figures fill their page (issue 28, item 7): panels sized to their images, short titles with site, method and
Dice (AUC and scores for classification), a colour key on the title's line, and no empty bands.

The measure: the fraction of a PNG's pixel rows (and, separately, columns) that are nothing but the figure's
facecolor. Before this change the evaluation overlays had about 40 % empty rows (tiny run; more with real images),
the report's stacked overlays 43 %, the translation grid 31 %."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siteadapt import figures
from siteadapt.figures import SEP, overlay_figure, overlay_title, save_figure
from siteadapt.steps.evaluate import evaluate
from siteadapt.steps.report import _roc_figure, report

MAX_EMPTY = 0.10


def empty_fraction(png: Path, background=(255, 255, 255), tol: int = 2) -> tuple[float, float]:
    """(fraction of rows, fraction of columns) of the PNG that are entirely ``background`` (the facecolor)."""
    a = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    blank = np.abs(a - np.asarray(background)).max(-1) <= tol
    return float(blank.all(1).mean()), float(blank.all(0).mean())


def _assert_fills(png: Path) -> None:
    rows, cols = empty_fraction(png)
    assert rows < MAX_EMPTY and cols < MAX_EMPTY, (png.name, rows, cols)


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")) if t.get_text()]


@pytest.fixture
def recorded(monkeypatch):
    """Texts of every figure written through :func:`siteadapt.figures.save_figure`, by output file name."""
    seen: dict[str, list[str]] = {}
    real = figures.save_figure

    def spy(fig, path, *a, **k):
        seen[Path(path).name] = _texts(fig)
        return real(fig, path, *a, **k)

    monkeypatch.setattr(figures, "save_figure", spy)
    return seen


def test_segmentation_overlays_fill_the_page_and_name_method_site_dice(evaluated, recorded):
    s = evaluated
    for method in ("histmatch", "noadapt"):
        evaluate(s, "tgt", method)
        m = json.loads((s.paths.metrics / "heart" / "tgt" / f"{method}.json").read_text())
        sub = m["per_subject"][0]
        png = s.paths.reports / "heart" / "overlays" / "tgt" / method / f"{sub['id']}.png"
        _assert_fills(png)
        texts = recorded[png.name]
        title = next(t for t in texts if method in t)
        assert "tgt" in title and sub["id"] in title and f"Dice {sub['dice']['mean']:.3f}" in title, texts
        assert {"image", "reference", "prediction"} <= set(texts)
        assert {"A", "B"} <= set(texts)  # the colour key names the structures
    # the report's figure of every method's overlay for one subject: stacked without gaps or resampling
    report(s)
    stacked = s.paths.reports / "heart" / "figures" / "overlays_tgt.png"
    _assert_fills(stacked)
    one = Image.open(png)
    assert Image.open(stacked).size[0] <= one.size[0] + 8


@pytest.mark.parametrize("shape", [(64, 64), (120, 300), (300, 150), (40, 60)])
def test_overlay_panels_follow_the_image_aspect(tmp_path, shape):
    rng = np.random.default_rng(0)
    im = rng.normal(0, 1, shape)
    lab = np.zeros(shape, np.uint8)
    lab[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2] = 1
    lab[shape[0] // 2: 3 * shape[0] // 4, shape[1] // 4: shape[1] // 2] = 2
    title = overlay_title("siteX", "cyclegan", "sub-0123", 0.71234)
    fig = overlay_figure(im, lab, np.roll(lab, 2, 0), title=title, n_labels=3,
                         structures={"right_lung": 1, "left_lung": 2})
    assert "cyclegan" in title and "siteX" in title and "Dice 0.712" in title
    for ax in fig.axes:
        bb = ax.get_position()
        w, h = fig.get_size_inches()
        assert bb.width * w / (bb.height * h) == pytest.approx(shape[1] / shape[0], rel=0.01)
    png = save_figure(fig, tmp_path / "o.png")
    _assert_fills(png)


def test_classification_examples_and_roc_fill_the_page(cls_env, tmp_path, recorded):
    from siteadapt.figures import examples_title
    from siteadapt.steps.evaluate import save_examples
    from siteadapt.steps.preprocess import preprocess

    s = cls_env[0]
    preprocess(s, "ped")
    subjects = json.loads((s.paths.prepared / "ped" / "subjects.json").read_text())["subjects"]
    rows = [{"id": r["id"], "score": 0.1 + 0.1 * i, "label": i % 2}
            for i, r in enumerate(r for r in subjects if r["split"] == "test")]
    title = examples_title("ped", "noadapt", "test", 0.713, 0.5, "val")
    out = save_examples(s, "ped", rows, 0.5, tmp_path / "examples.png", title)
    _assert_fills(out)
    texts = recorded["examples.png"]
    assert any("noadapt" in t and "ped" in t and "AUC 71.3" in t for t in texts), texts
    assert any("P(pneumonia) 0.10" in t for t in texts), texts
    out = save_examples(s, "ped", [{"id": r["id"], "score": r["score"]} for r in rows], None,
                        tmp_path / "examples_unlabeled.png", examples_title("ped", "noadapt", "test"))
    _assert_fills(out)
    methods = {"noadapt": [{"auc": 0.75, "split": "test", "per_image": [{**r, "split": "test"} for r in rows]}]}
    roc = _roc_figure("ped", methods, tmp_path)
    _assert_fills(roc)


def test_training_curves_and_translations_fill_the_page(evaluated, tmp_path):
    import torch

    from siteadapt.data.shards import SliceSet
    from siteadapt.steps.train import save_translations

    s = evaluated
    s = s.model_copy(update={"paths": s.paths.model_copy(update={"models": tmp_path / "models"})})
    d = s.paths.models / "heart" / "tgt" / "sifa"
    d.mkdir(parents=True)
    with open(d / "losses.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["iteration", "seg", "adv", "it_per_s"])
        for i in range(1, 100, 5):
            w.writerow([i, 1.0 / i, 0.5, 3.0])
    report(s)
    _assert_fills(s.paths.reports / "heart" / "figures" / "curves_tgt_sifa.png")

    class Identity(torch.nn.Module):
        def translations(self, sx, tx):
            return {"source -> target-like": sx}

    pics = np.random.default_rng(0).uniform(-1, 1, (4, 48, 32)).astype(np.float32)
    sets = [SliceSet(site=k, split="train", images=pics, labels=None, subject=np.zeros(4, np.int32),
                     slice=np.arange(4, dtype=np.int32), subjects=[{"id": "s"}]) for k in ("a", "b")]
    out = save_translations(Identity(), sets[0], sets[1], tmp_path / "translations.png", two_d=True)
    _assert_fills(out)


def test_empty_fraction_measures_background_bands(tmp_path):
    a = np.full((100, 50, 3), 255, np.uint8)
    a[10:60, 5:45] = 80  # 50 of 100 rows and 40 of 50 columns drawn on
    Image.fromarray(a).save(tmp_path / "x.png")
    assert empty_fraction(tmp_path / "x.png") == pytest.approx((0.5, 0.2))
    assert SEP.strip()  # titles' separator is visible


def test_anisotropic_slice_keeps_its_physical_proportions(tmp_path, recorded, monkeypatch):
    """A coronal slice of 2 x 4 mm voxels (80 columns, 32 rows) is drawn 160 mm wide by 128 mm tall."""
    from siteadapt.steps import evaluate as ev

    shapes = []
    real = figures.overlay_figure

    def spy(*a, **k):
        fig = real(*a, **k)
        shapes.append([ax.get_position() for ax in fig.axes] + [fig.get_size_inches()])
        return fig

    monkeypatch.setattr(figures, "overlay_figure", spy)
    vol = np.random.default_rng(0).normal(0, 1, (80, 10, 32))
    ref = np.zeros(vol.shape, np.uint8)
    ref[20:60, 5, 8:24] = 1
    ev.save_overlay(vol, ref, ref, 1, tmp_path / "a.png", overlay_title("s", "m", "x", 1.0), 2, {"A": 1},
                    zooms=(2.0, 2.0, 4.0))
    *boxes, (w, h) = shapes[0]
    assert boxes[0].width * w / (boxes[0].height * h) == pytest.approx(160 / 128, rel=0.01)
    _assert_fills(tmp_path / "a.png")
