"""Candidate selection (siteadapt.steps.select, ``siteadapt select``): the label-free scores' values, the gates and
the references in the ranking, the selection record and tags on the registered version, and the issue's acceptance
test on small synthetic chest X-ray sites: the label-free choice lands within 3 Dice points of the labels' choice."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dvc_project as dp
from siteadapt.cli import main
from siteadapt.config import Gates, parse_settings
from siteadapt.errors import ConfigError
from siteadapt.steps import select as S


# ---- the scores, on toy models --------------------------------------------------------------------------------------
class _PerPixel:
    """A segmenter that labels each pixel from its own intensity alone (equivariant to any shift)."""

    def predict_subject(self, x):
        v = x[:, 0]
        return torch.stack([-4 * v, 4 * v - 2, 4 * v + 1], 1)  # class 2 where bright, 1 in between, 0 where dark


class _FixedBox:
    """A segmenter that ignores the image: class 1 in rows and columns 8..23 of a 32 x 32 image, 0 elsewhere."""

    def predict_subject(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 0] = 5.0
        out[:, 1, 8:24, 8:24] = 10.0
        return out


class _Constant:
    """Logits whose softmax is ``probs`` for every pixel (segmentation) or image (classification)."""

    def __init__(self, probs, kind):
        self.logits = torch.log(torch.tensor(probs, dtype=torch.float32))
        self.kind = kind

    def predict_subject(self, x):
        n = x.shape[0]
        if self.kind == "classification":
            return self.logits.expand(n, -1).clone()
        return self.logits[None, :, None, None].expand(n, -1, *x.shape[-2:]).clone()


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size)).astype(np.float32)


def test_entropy_equals_its_closed_form():
    assert S.normalized_entropy([[0.25, 0.25, 0.25, 0.25]])[0] == pytest.approx(1.0)
    assert S.normalized_entropy([[1.0, 0.0, 0.0]])[0] == pytest.approx(0.0, abs=1e-9)
    assert S.normalized_entropy([[0.5, 0.5, 0.0, 0.0]])[0] == pytest.approx(math.log(2) / math.log(4))
    p = [0.7, 0.2, 0.1]
    want = -sum(q * math.log(q) for q in p) / math.log(3)
    imgs = _images()
    seg = S.unsupervised_scores(_Constant(p, "segmentation"), imgs, [np.arange(3)], "segmentation", [1, 2])
    assert seg["entropy"] == pytest.approx(want, rel=1e-5)
    cls = S.unsupervised_scores(_Constant([0.9, 0.1], "classification"), imgs, [np.arange(2), np.arange(2, 3)],
                                "classification")
    assert cls["entropy"] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2), rel=1e-5)
    assert cls["consistency"] == pytest.approx(1.0)  # the same probabilities for every copy


def test_shift_consistency_amounts():
    imgs = _images()
    assert S.shifts_for(32) == ((2, 2), (-2, -2)) and S.shifts_for(8) == ((1, 1), (-1, -1))
    eq = S.unsupervised_scores(_PerPixel(), imgs, [np.arange(3)], "segmentation", [1, 2])
    assert eq["consistency"] == 1.0
    # a model blind to the image: its 16 x 16 box stays put while the image moves 2 pixels along both axes; compared
    # where both copies see original pixels, the boxes overlap on 14 x 14 pixels: Dice 2 * 14^2 / (2 * 16^2)
    box = S.unsupervised_scores(_FixedBox(), imgs, [np.arange(3)], "segmentation", [1])
    assert box["consistency"] == pytest.approx(2 * 14 ** 2 / (2 * 16 ** 2))
    # shifting moves content and replicates the border; overlap() aligns the two predictions again
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = S.shift(x, 1, -1)
    assert y[0, 0, 1, 0] == x[0, 0, 0, 1] and y[0, 0, 0, 0] == x[0, 0, 0, 1] and y[0, 0, 3, 3] == x[0, 0, 2, 3]
    a, b = S.overlap(x.numpy(), y.numpy(), 1, -1)
    assert np.array_equal(a, b) and a.shape[-2:] == (3, 3)


# ---- the ranking ----------------------------------------------------------------------------------------------------
def _row(method, consistency, entropy=0.5, drop=0.0, empty=0.0, fragmented=0.0, dice=None):
    return {"method": method, "consistency": consistency, "entropy": entropy, "source_dice_drop": drop,
            "empty_fraction": empty, "fragmented_fraction": fragmented, "target_dice": dice}


def test_label_free_rank_filters_by_the_gates_then_orders_by_consistency():
    gates = Gates()  # max_source_dice_drop 0.1, max_empty_fraction 0.1, max_fragmented_fraction 0.25
    rows = [_row("noadapt", 0.60, dice=0.55), _row("histmatch", 0.90, empty=0.5, dice=0.40),
            _row("sifa", 0.70, dice=0.70), _row("dann", 0.80, drop=0.3, dice=0.60)]
    res = S.rank(rows, gates, "segmentation", "label_free")
    assert res["rule"] == "label_free" and res["winner"] == "sifa" and not res["fallback"]
    assert res["ranking"] == ["sifa", "noadapt", "histmatch", "dann"]  # the two over a gate last, by consistency
    by = {r["method"]: r for r in res["methods"]}
    assert [g["name"] for g in by["histmatch"]["gates"] if not g["passed"]] == ["max_empty_fraction"]
    assert [g["name"] for g in by["dann"]["gates"] if not g["passed"]] == ["max_source_dice_drop"]
    assert res["score"] == 0.70 and by["sifa"]["rank"] == 1
    # every method labeled: the record says what labels would pick and the Dice given away
    assert res["labeled_best"] == "sifa" and res["regret_dice"] == 0.0
    # a gate switched off no longer filters
    res2 = S.rank(rows, gates.model_copy(update={"max_empty_fraction": None}), "segmentation")
    assert res2["winner"] == "histmatch" and res2["regret_dice"] == pytest.approx(0.30)
    # equal consistency: lower entropy first, then the order of the methods given
    tie = S.rank([_row("a", 0.5, entropy=0.4), _row("b", 0.5, entropy=0.3), _row("c", 0.5, entropy=0.3)], gates,
                 "segmentation")
    assert tie["ranking"] == ["b", "c", "a"] and tie["labeled_best"] is None and tie["regret_dice"] is None


def test_no_method_passing_the_gates_falls_back_and_says_so():
    rows = [_row("a", 0.9, empty=0.5, drop=0.5), _row("b", 0.2, empty=0.5),
            _row("c", None, empty=1.0, drop=1.0, fragmented=None)]  # c: a missing measurement fails its gate
    res = S.rank(rows, Gates(), "segmentation", "label_free")
    assert res["fallback"] and res["ranking"] == ["b", "a", "c"]  # fewest failed gates first: 1, 2, 3
    assert [r["gates_failed"] for r in res["methods"]] == [1, 2, 3] and res["winner"] == "b"
    assert "no method passed" in res["rule_text"]


def test_label_rules_and_auto():
    rows = [_row("noadapt", 0.9, dice=0.5), _row("sifa", 0.1, dice=0.8)]
    assert S.rank(rows, Gates(), "segmentation", "labels")["winner"] == "sifa"
    assert S.rank(rows, Gates(), "segmentation", "auto")["rule"] == "labels"
    lf = S.rank(rows, Gates(), "segmentation", "label_free")
    assert lf["winner"] == "noadapt" and lf["labeled_best"] == "sifa" and lf["regret_dice"] == pytest.approx(0.3)
    part = [_row("noadapt", 0.9, dice=0.5), {**_row("sifa", 0.1), "metrics": "metrics/t/s/sifa.json"}]
    assert S.rank(part, Gates(), "segmentation", "auto")["rule"] == "label_free"
    with pytest.raises(S.SelectionError, match="metrics/t/s/sifa.json"):
        S.rank(part, Gates(), "segmentation", "labels")
    cls = [{"method": "noadapt", "consistency": 0.99, "entropy": 0.2, "source_auc_drop": 0.2, "target_auc": 0.8},
           {"method": "tunanet", "consistency": 0.95, "entropy": 0.6, "source_auc_drop": 0.05, "target_auc": 0.7}]
    res = S.rank(cls, Gates(), "classification")
    assert res["winner"] == "tunanet" and res["labeled_best"] == "noadapt"  # noadapt fails max_source_auc_drop
    assert res["regret_auc"] == pytest.approx(0.1) and "regret_dice" not in res


def test_label_trained_references_are_never_candidates():
    p = dp.tiny_params(["supervised", "noadapt", "histmatch", "stl", "sup_variant"])
    p["methods"]["sup_variant"] = {"method": "supervised"}
    s = parse_settings(p)
    keep, excluded = S.candidates(s, "cxr_b")
    assert keep == ["noadapt", "histmatch"]
    assert [e["method"] for e in excluded] == ["supervised", "stl", "sup_variant"]
    with pytest.raises(S.SelectionError, match="trains on the target's labels"):
        S.candidates(s, "cxr_b", ["supervised", "stl"])
    with pytest.raises(ConfigError, match="no adaptation direction"):
        S.candidates(s, "cxr_a")  # a source site is nobody's target
    with pytest.raises(ConfigError, match="registry.selection"):
        parse_settings({**p, "registry": {"selection": "by_vibes"}})


# ---- the acceptance test: synthetic sites, trained models, the CLI --------------------------------------------------
METHODS = ["supervised", "noadapt", "histmatch", "dann_short", "dann_half"]


@pytest.fixture(scope="module")
def synthetic_site(tmp_path_factory):
    """Small synthetic chest X-ray sites (30 images each, 32 px) with a source segmenter and four adapted models of
    clearly different quality, each evaluated against the target's labels: noadapt, histmatch, DANN from scratch for
    3 iterations (a model that predicts almost nothing) and for 75 (half the source's training). The label-trained
    upper bound is listed among the task's methods but never trained: selection must not need it."""
    from siteadapt.data.synth import synthesize
    from siteadapt.steps.evaluate import evaluate
    from siteadapt.steps.ingest import ingest
    from siteadapt.steps.preprocess import preprocess
    from siteadapt.steps.train import adapt, predict, train_source

    root = tmp_path_factory.mktemp("select")
    p = dp.tiny_params(METHODS)
    p["profiles"]["test"].update(iterations=150, synth_images=30)
    p["paths"] = {k: str(root / v) for k, v in p["paths"].items()}
    for name in ("cxr_a", "cxr_b"):
        p["sites"][name] = {**p["sites"][name], "images": str(root / p["sites"][name]["images"]),
                            "labels": str(root / p["sites"][name]["labels"])}
    p["methods"]["dann_short"] = {"method": "dann", "iterations_factor": 0.02}
    p["methods"]["dann_half"] = {"method": "dann", "iterations_factor": 0.5}
    p["train"]["device"] = "cpu"
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(p, sort_keys=False))
    s = parse_settings(p)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SITEADAPT_DEID_KEY", "test-key-not-secret")
        synthesize("chestxray", s.paths.raw, seed=0, n_images=30, scale=0.25, workers=1)
        for name in ("cxr_a", "cxr_b"):
            site = s.sites[name]
            ingest(site.images, name, s.paths.ingested, labels=site.labels, modality=site.modality,
                   pixel_spacing_mm=site.pixel_spacing_mm)
            preprocess(s, name)
        train_source(s, "cxr_a")
        for m in METHODS[1:]:
            adapt(s, "cxr_b", m)
            predict(s, "cxr_b", m)
            evaluate(s, "cxr_b", m, n_overlays=0)
    torch.set_num_threads(threads)
    return s, root / "params.yaml"


def test_label_free_choice_is_within_3_dice_points_of_the_labels_choice(synthetic_site, tmp_path, monkeypatch,
                                                                        capsys):
    from mlflow import MlflowClient

    s, params = synthetic_site
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)

    assert main(["--params", str(params), "select", "--site", "cxr_b", "--register"]) == 0
    out = capsys.readouterr().out
    path = Path(s.paths.registry) / "chestxray" / "cxr_b" / "selection.json"
    assert f"-> {path}" in out
    res = json.loads(path.read_text())
    assert res["schema"] == "siteadapt.selection/1" and res["rule"] == "label_free" and res["setting"] == "label_free"
    assert res["task"] == "chestxray" and res["site"] == "cxr_b" and res["source_site"] == "cxr_a"
    assert [e["method"] for e in res["excluded"]] == ["supervised"]
    assert sorted(res["ranking"]) == sorted(METHODS[1:]) and res["winner"] == res["ranking"][0]
    by = {r["method"]: r for r in res["methods"]}
    assert not by["dann_short"]["gates_passed"] and by["dann_short"]["rank"] == 4  # barely trained: filtered
    assert by["noadapt"]["source_dice_drop"] == 0.0  # the source segmenter itself
    assert by[res["winner"]]["gates_passed"] and not res["fallback"]

    # the labels' choice (the issue's acceptance criterion: within 3 Dice points)
    dice = {m: r["target_dice"] for m, r in by.items()}
    best = max(dice, key=dice.get)
    assert res["labeled"] and res["labeled_best"] == best and res["labeled_best_dice"] == dice[best]
    assert res["regret_dice"] == pytest.approx(dice[best] - dice[res["winner"]])
    assert res["regret_dice"] <= 0.03, (res["winner"], dice)
    assert dice[best] - dice["dann_short"] > 0.3  # the candidates do differ in quality

    # the winner is the registry's candidate, with why it won as tags
    reg = res["registered"]
    client = MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("siteadapt-chestxray-cxr_b", "candidate")
    assert str(mv.version) == str(reg["version"]) and mv.tags["variant"] == res["winner"]
    t = mv.tags
    assert t["selection.rule"] == "label_free" and t["selection.rank"] == "1 of 4"
    assert float(t["selection.score"]) == pytest.approx(by[res["winner"]]["consistency"], abs=1e-6)
    assert t["selection.ranking"] == ",".join(res["ranking"]) and t["selection.excluded"] == "supervised"
    assert t["selection.labeled_best"] == best
    assert float(t["selection.regret_dice"]) == pytest.approx(res["regret_dice"], abs=1e-6)
    compared = json.loads(t["selection.compared"])
    assert set(compared) == set(METHODS[1:]) and compared["dann_short"]["gates_passed"] is False

    # selection by labels picks the best Dice; a method without a model is a named error (exit 2)
    assert main(["--params", str(params), "select", "--site", "cxr_b", "--selection", "labels"]) == 0
    assert json.loads(path.read_text())["winner"] == best
    capsys.readouterr()
    assert main(["--params", str(params), "select", "--site", "cxr_b", "--methods", "cyclegan,noadapt"]) == 2
    err = capsys.readouterr().err
    assert os.path.join("chestxray", "cxr_b", "cyclegan", "model.pt") in err and "siteadapt adapt" in err
    assert main(["--params", str(params), "select", "--site", "cxr_b", "--methods", "supervised"]) == 2
    assert "trains on the target's labels" in capsys.readouterr().err
