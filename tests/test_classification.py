"""Classification through the pipeline: image-level labels at ingest (CSV, folder per class), stratified split and
class shards, class scores, the metric protocol (threshold from validation, never from test) and the Table 1 report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from siteadapt.config import parse_settings
from siteadapt.data.shards import load_slices
from siteadapt.errors import ConfigError, InputError
from siteadapt.metrics import classification_metrics, youden_threshold
from siteadapt.steps.evaluate import evaluate, threshold_then_metrics
from siteadapt.steps.ingest import ingest
from siteadapt.steps.preprocess import preprocess, split_subjects
from siteadapt.steps.report import report
from siteadapt.steps.train import adapt, predict, train_source

from helpers.sites import PNEUMONIA_CLASSES, pneumonia_settings

def _manifest(s, site) -> dict:
    return json.loads((s.paths.ingested / site / "manifest.json").read_text())


def test_config_classification_task_rules(tmp_path):
    s = pneumonia_settings(tmp_path)
    assert s.tasks["pn"].classes == PNEUMONIA_CLASSES and s.tasks["pn"].structures == {}
    with pytest.raises(ConfigError, match="exactly two distinct classes"):
        parse_settings({"profiles": {"q": {"image_size": 8, "batch_size": 1, "iterations": 1, "width": 1,
                                           "synth_scale": 1, "synth_subjects": 3, "synth_images": 5,
                                           "slice_spacing_mm": 1}}, "profile": "q",
                        "tasks": {"t": {"kind": "classification", "dims": 2, "classes": ["only"]}}, "sites": {}})
    with pytest.raises(ConfigError, match="segmentation task needs at least one structure"):
        parse_settings({"profiles": {"q": {"image_size": 8, "batch_size": 1, "iterations": 1, "width": 1,
                                           "synth_scale": 1, "synth_subjects": 3, "synth_images": 5,
                                           "slice_spacing_mm": 1}}, "profile": "q",
                        "tasks": {"t": {"dims": 2}}, "sites": {}})


def test_ingest_labels_csv(cls_env):
    s, res, ys_ad, _ = cls_env
    r = res["ad"]
    assert len(r.items) == 20
    assert all(it["class_source"] == "csv" and it["label"] is None for it in r.items)
    counts = np.bincount([it["class_label"] for it in r.items])
    assert counts.tolist() == np.bincount(ys_ad).tolist()
    assert {it["class_name"] for it in r.items} == set(PNEUMONIA_CLASSES)
    reasons = sorted(x["reason"] for x in r.rejected)
    assert any("label row matches no image" in x for x in reasons)  # ghost
    assert any("a second label for the image of line 2" in x for x in reasons)  # a000 twice
    assert any("unknown class 'effusion'" in x for x in reasons)
    assert any("missing stem or label" in x for x in reasons)
    assert all(x["in"] == "labels" and x["position"] == "the labels CSV" for x in r.rejected)
    assert not any("ghost" in x["reason"] for x in r.rejected)  # rows are named by line, never by stem


def test_ingest_folder_per_class_and_relabel(cls_env, tmp_path):
    s, res, _, ys_ped = cls_env
    r = res["ped"]
    assert len(r.items) == 41 and not r.rejected
    labeled = [it for it in r.items if it["class_label"] is not None]
    assert len(labeled) == 40 and all(it["class_source"] == "folder" for it in labeled)
    assert sum(it["class_label"] for it in labeled) == sum(ys_ped)
    # a changed label in the CSV re-records only that image
    site = s.sites["ad"]
    csv = site.labels.read_text().replace("a004,0", "a004,1")
    assert csv != site.labels.read_text()
    site.labels.write_text(csv)
    again = ingest(site.images, "ad", s.paths.ingested, labels=site.labels, modality="CR", pixel_spacing_mm=1.0,
                   classes=PNEUMONIA_CLASSES)
    assert len(again.written) == 1 and len(again.skipped) == 19


def test_classification_labels_must_be_a_csv(cls_env, tmp_path):
    s, *_ = cls_env
    with pytest.raises(InputError, match="must be a CSV file"):
        ingest(s.sites["ped"].images, "ped2", s.paths.ingested, labels=s.sites["ped"].images, classes=PNEUMONIA_CLASSES)
    with pytest.raises(InputError, match="belongs to a classification task"):  # a CSV for a segmentation site
        ingest(s.sites["ad"].images, "ad2", s.paths.ingested, labels=s.sites["ad"].labels)


def test_stratified_split_and_class_shards(cls_env):
    s, _, _, ys_ped = cls_env
    out = preprocess(s, "ped")["out_dir"]
    subj = json.loads((out / "subjects.json").read_text())
    assert subj["kind"] == "classification" and subj["classes"] == PNEUMONIA_CLASSES
    assert not any("class" in k for r in subj["subjects"] for k in r)  # methods never see classes through it
    truth = {it["id"]: it["class_label"] for it in _manifest(s, "ped")["items"]}
    for split in ("train", "val", "test"):
        lab = np.load(out / f"{split}_labels.npz")["labels"]
        img = np.load(out / f"{split}.npz")["images"]
        assert lab.shape == (img.shape[0],) and img.shape[1:] == (32, 32)
        ids = [r["id"] for r in subj["subjects"] if r["split"] == split]
        assert [255 if truth[i] is None else truth[i] for i in ids] == lab.tolist()
        if split != "train":  # 10 normal / 30 pneumonia, 20 % each: 2 / 6
            assert np.bincount(lab, minlength=2).tolist() == [2, 6]
    tr = load_slices(s.paths.prepared, "ped", "train", labels=True)
    assert tr.labels.ndim == 1 and 255 not in tr.labels  # the unlabeled image is dropped from labeled training
    assert len(load_slices(s.paths.prepared, "ped", "train", labels=False)) == len(tr) + 1
    # the stratified split keeps each class's proportion, deterministically
    strata = {f"i{k}": k % 4 == 0 for k in range(40)}
    a = split_subjects(list(strata), 0, "x", 0.2, 0.2, strata=strata)
    assert a == split_subjects(list(reversed(list(strata))), 0, "x", 0.2, 0.2, strata=strata)
    assert sum(1 for k, v in a.items() if v == "test" and strata[k]) == 2


def _write_scores(s, site, method, scores: dict[str, float]):
    d = s.paths.predictions / site / method
    d.mkdir(parents=True, exist_ok=True)
    subj = json.loads((s.paths.prepared / site / "subjects.json").read_text())["subjects"]
    rows = [{"id": r["id"], "split": r["split"], "score": scores[r["id"]]} for r in subj if r["split"] != "train"]
    (d / "scores.json").write_text(json.dumps({"images": rows}))


def _set_classes(s, site, new: dict[str, int]):
    p = s.paths.ingested / site / "manifest.json"
    m = json.loads(p.read_text())
    for it in m["items"]:
        if it["id"] in new:
            it["class_label"] = new[it["id"]]
    p.write_text(json.dumps(m))


def test_threshold_comes_from_validation_never_from_test(cls_env):
    """Scores whose best Youden cut on val (~0.3) differs from the best cut on test (~0.7): the evaluation uses the
    val cut; changing the test labels changes the metrics but not the threshold; changing val labels moves it."""
    s, *_ = cls_env
    preprocess(s, "ped")
    subj = json.loads((s.paths.prepared / "ped" / "subjects.json").read_text())["subjects"]
    truth = {it["id"]: it["class_label"] for it in _manifest(s, "ped")["items"]}
    rng = np.random.default_rng(0)
    scores = {}
    for r in subj:
        y = truth[r["id"]]
        centre = (0.3 if r["split"] == "val" else 0.7)  # the class boundary sits elsewhere in each split
        scores[r["id"]] = float(centre + (0.1 if y else -0.1) + rng.uniform(-0.05, 0.05)) if y is not None else 0.5
    _write_scores(s, "ped", "m", scores)
    m = json.loads(evaluate(s, "ped", "m").read_text())
    val = [r for r in subj if r["split"] == "val"]
    test = [r for r in subj if r["split"] == "test"]
    t_val = youden_threshold([truth[r["id"]] for r in val], [scores[r["id"]] for r in val])
    t_test = youden_threshold([truth[r["id"]] for r in test], [scores[r["id"]] for r in test])
    assert abs(t_val - t_test) > 0.2
    assert m["threshold"] == pytest.approx(t_val) and m["threshold_split"] == "val" and m["split"] == "test"
    assert m["n_val"] == len(val) and m["n_test"] == len(test)
    direct = classification_metrics([truth[r["id"]] for r in test], [scores[r["id"]] for r in test], t_val)
    for k in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
        assert m[k] == pytest.approx(direct[k])
    assert m["specificity"] == pytest.approx(0.0)  # every test normal (~0.6) lies above the val threshold
    # flip every test label: metrics change, the threshold does not
    _set_classes(s, "ped", {r["id"]: 1 - truth[r["id"]] for r in test})
    m2 = json.loads(evaluate(s, "ped", "m").read_text())
    assert m2["threshold"] == pytest.approx(m["threshold"]) and m2["auc"] != pytest.approx(m["auc"])
    # val labels are what sets it
    _set_classes(s, "ped", {r["id"]: int(scores[r["id"]] > 0.35) for r in val[:3]} |
                 {r["id"]: 1 - truth[r["id"]] for r in val[3:]})
    m3 = json.loads(evaluate(s, "ped", "m").read_text())
    assert m3["threshold"] != pytest.approx(m["threshold"])


def test_unlabeled_classification_site_gets_the_score_distribution_only(cls_env):
    """Without labels there is no threshold and no AUC: the metrics file says ``labeled: false`` (no table row), with
    the scores' distribution, and the examples figure (the DVC out beside the metrics) still shows the images."""
    from siteadapt.steps.report import collect

    s, *_ = cls_env
    preprocess(s, "ped")
    subj = json.loads((s.paths.prepared / "ped" / "subjects.json").read_text())["subjects"]
    scores = {r["id"]: 0.1 + 0.8 * i / len(subj) for i, r in enumerate(subj)}
    _write_scores(s, "ped", "m", scores)
    _set_classes(s, "ped", {r["id"]: None for r in subj})
    m = json.loads(evaluate(s, "ped", "m").read_text())
    test = [scores[r["id"]] for r in subj if r["split"] == "test"]
    assert m["labeled"] is False and m["kind"] == "classification" and "auc" not in m
    assert m["n_test"] == len(test) and m["score_mean"] == pytest.approx(np.mean(test))
    assert (s.paths.reports / "pn" / "overlays" / "ped" / "m" / "examples.png").is_file()
    assert "pn" not in collect(s.paths.metrics)


def test_protocol_function_and_missing_scores(cls_env):
    res = threshold_then_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], [0.15, 0.35, 0.5, 0.6])
    assert res["threshold"] == pytest.approx(0.25) and res["youden_on_val"]["j"] == pytest.approx(1.0)
    assert res["specificity"] == pytest.approx(0.5) and res["sensitivity"] == pytest.approx(1.0)
    s, *_ = cls_env
    preprocess(s, "ped")
    with pytest.raises(InputError, match="no class scores"):
        evaluate(s, "ped", "noadapt")


def test_train_predict_evaluate_report_end_to_end(cls_env):
    """Tiny runs of the source classifier, noadapt and supervised through the real steps, then Table 1."""
    s, *_ = cls_env
    torch.set_num_threads(1)
    for site in ("ad", "ped"):
        preprocess(s, site)
    train_source(s, "ad")
    for m in ("noadapt", "supervised"):
        adapt(s, "ped", m)
        out = predict(s, "ped", m)
        sc = json.loads((out / "scores.json").read_text())
        assert {r["split"] for r in sc["images"]} == {"val", "test"}  # val always, for the threshold
        assert all(0 <= r["score"] <= 1 and len(r["probs"]) == 2 for r in sc["images"])
        assert (out / "scores.csv").read_text().startswith("id,split,score")
        m_json = json.loads(evaluate(s, "ped", m).read_text())
        assert m_json["kind"] == "classification" and m_json["source_site"] == "ad"
    # another seed varies the whole chain: noadapt with seed 3 is the source model trained with seed 3
    with pytest.raises(InputError, match="train-source --site ad --seed 3"):
        adapt(s, "ped", "noadapt", seed=3)
    train_source(s, "ad", seed=3)
    adapt(s, "ped", "noadapt", seed=3)
    src3 = s.paths.models / "pn" / "ad" / "source.seed3" / "model.pt"
    uses = json.loads((s.paths.models / "pn" / "ped" / "noadapt.seed3" / "uses.json").read_text())
    assert Path(uses["source_model"]) == src3
    w0 = torch.load(s.paths.models / "pn" / "ad" / "source" / "model.pt", weights_only=False)["state_dict"]
    w3 = torch.load(src3, weights_only=False)["state_dict"]
    assert not all(torch.equal(w0[k], w3[k]) for k in w0)  # the pipeline's source model is left as it was
    predict(s, "ped", "noadapt", seed=3)
    evaluate(s, "ped", "noadapt", seed=3)
    written = report(s)
    md = written["pn"].read_text()
    assert "| Model | AUC (%) | Acc. (%) | Sen. (%) | Spec. (%) | F1 | n seeds |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Model")]
    assert [r.split("|")[1].strip() for r in rows] == ["Supervised (upper bound)", "W/o adaptation"]
    assert rows[1].rstrip(" |").endswith("2") and "±" in rows[1]  # two seeds: mean ± std over seeds
    assert (s.paths.reports / "pn" / "figures" / "roc_ped.png").is_file()
    assert "\\toprule" in (s.paths.reports / "pn" / "table.tex").read_text()
