"""Synthetic pneumonia sites: layout, class balance, determinism, the anatomy and acquisition shift, and ingest of both
label layouts (adult: DICOM + labels.csv by PatientID; pediatric: PNG, one folder per class)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from siteadapt.data import synth as S
from siteadapt.data.synth import pneumonia as P
from siteadapt.steps.ingest import ingest

N = 12
SCALE = 0.25


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pn")
    summary = S.synthesize("pneumonia", out, seed=0, n_images=N, scale=SCALE, workers=2)
    assert set(summary) == {"adult", "pediatric"}
    assert summary["adult"]["format"] == "dicom" and summary["pediatric"]["format"] == "png"
    return out / "pneumonia"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_balance_of_the_papers_data_sets():
    for site, n_pos in (("adult", 40), ("pediatric", 74)):  # 6993/4659 and 1349/3883
        y = P.class_plan(0, site, 100)
        assert int(y.sum()) == n_pos
        assert np.array_equal(y, P.class_plan(0, site, 100)) and not np.array_equal(y, P.class_plan(1, site, 100))


def test_layout_labels_and_site_facts(sites):
    adult, ped = sites / "adult", sites / "pediatric"
    rows = list(csv.DictReader((adult / "labels.csv").open()))
    assert len(rows) == N and {r["label"] for r in rows} == {"normal", "pneumonia"}
    info = json.loads((adult / "site.json").read_text())
    assert info["counts"] == {"normal": 7, "pneumonia": 5} and info["kind"] == "classification"
    files = sorted((adult / "images").rglob("IM0001"))
    assert len(files) == N
    ids = {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in files}
    assert ids == {r["stem"] for r in rows}  # the CSV's stems are the DICOM PatientIDs
    assert pydicom.dcmread(files[0], stop_before_pixels=True).Modality == "CR"
    normal = sorted((ped / "images" / "NORMAL").glob("*.png"))
    pneu = sorted((ped / "images" / "PNEUMONIA").glob("*.png"))
    assert (len(normal), len(pneu)) == (3, 9)  # 74 % of 12 -> 9
    pinfo = json.loads((ped / "site.json").read_text())
    assert pinfo["counts"] == {"normal": 3, "pneumonia": 9} and pinfo["labels"] is None
    assert sum(pinfo["findings"].values()) == 9 and sum(info["findings"].values()) == 5
    # anatomy: the children's hearts are relatively larger, their chests smaller
    assert pinfo["ctr_range"][0] >= 0.5 > info["ctr_range"][0]
    assert pinfo["thorax_mm_range"][1] < info["thorax_mm_range"][0]


def test_deterministic_whatever_the_workers(sites, tmp_path):
    again = S.synthesize("pneumonia", tmp_path, seed=0, n_images=N, scale=SCALE, workers=1)
    assert again["adult"]["n"] == N
    assert _files(tmp_path / "pneumonia") == _files(sites)


def test_pneumonia_is_brighter_lung_and_acquisition_differs():
    """The same child with and without a finding: the opacity only brightens (replaces lung air); the two sites'
    equipment differs in bit depth and noise."""
    rng = S._rng(3, "x")
    ph = P.phantom_adult(rng)
    f = P.draw_finding(np.random.default_rng(5), "adult") | {"type": "lobar", "lobe": "RLL", "density": 0.9,
                                                              "extent": 1.0, "fissure": 0.4}
    a, fa = P.render(ph, "adult", S._rng(3, "img"), 0.25, None)
    b, fb = P.render(ph, "adult", S._rng(3, "img"), 0.25, f)
    assert fa["opacified_lung_fraction"] == 0 and fb["opacified_lung_fraction"] > 0.1
    assert float((b - a).mean()) > 0
    img_a, _ = P.make_image(0, "adult", 0, 0, SCALE)
    img_p, _ = P.make_image(0, "pediatric", 0, 0, SCALE)
    assert img_a.max() > 255 and img_p.max() <= 255  # 12-bit CR vs 8-bit PNG


def test_ingest_both_label_layouts(sites, tmp_path, deid_key):
    res_a = ingest(sites / "adult" / "images", "adult", tmp_path / "ing", labels=sites / "adult" / "labels.csv",
                   classes=["normal", "pneumonia"])
    assert len(res_a.items) == N and not res_a.rejected
    assert sorted(it["class_label"] for it in res_a.items) == [0] * 7 + [1] * 5
    assert all(it["modality"] == "CR" and it["class_source"] == "csv" for it in res_a.items)
    res_p = ingest(sites / "pediatric" / "images", "pediatric", tmp_path / "ing", modality="DX",
                   pixel_spacing_mm=3.6, classes=["normal", "pneumonia"])
    assert len(res_p.items) == N and not res_p.rejected
    assert sorted(it["class_label"] for it in res_p.items) == [0] * 3 + [1] * 9
    text = (tmp_path / "ing" / "adult" / "manifest.json").read_text()
    rows = list(csv.DictReader((sites / "adult" / "labels.csv").open()))
    assert not any(r["stem"] in text for r in rows)  # PatientIDs never reach the manifest


def test_pediatric_site_has_a_heel_effect():
    """The pediatric DX exposure falls off along the vertical axis (either way, generator 1.1): the same child drawn
    with and without the heel effect differs by a top-to-bottom ramp after the site's processing."""
    import copy

    st = P.STYLES["pediatric"]
    assert P.STYLES["adult"].get("heel") is None
    slopes = []
    for i in range(4):
        imgs = []
        ph = P.phantom_pediatric(S._rng(1, "ph", i))
        for heel in (st["heel"], None):
            P.STYLES["pediatric"] = dict(st, heel=heel)
            try:
                imgs.append(P.render(copy.deepcopy(ph), "pediatric", S._rng(1, "img", i), SCALE, None)[0] / 255.0)
            finally:
                P.STYLES["pediatric"] = st
        diff = (imgs[0] - imgs[1])[:, imgs[0].shape[1] // 4: -imgs[0].shape[1] // 4].mean(1)
        rows = np.arange(diff.size)
        slopes.append(np.polyfit(rows / rows[-1], diff, 1)[0])
        assert abs(np.corrcoef(rows, diff)[0, 1]) > 0.7, i
    assert min(abs(s) for s in slopes) > 0.05, slopes
