"""Evaluate (metrics JSON, overlays) and report (paper-layout tables) on predictions made here."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from siteadapt.metrics import segmentation_metrics
from siteadapt.steps.evaluate import evaluate
from siteadapt.steps.report import report


def test_metrics_json_layout_and_values(evaluated):
    s = evaluated
    m = json.loads((s.paths.metrics / "heart" / "tgt" / "histmatch.json").read_text())
    assert m["structures"] == ["A", "B"] and m["source_site"] == "src" and m["n_subjects"] == 1
    for metric in ("dice", "recall", "precision", "asd", "assd", "hd95", "hd"):
        assert set(m[metric]) == {"A", "B", "mean"}
        assert set(m["summary"]["metrics"][metric]["mean"]) == {"mean", "std", "n", "n_nan"}
    # the JSON equals a direct computation on the same files
    sub = m["per_subject"][0]
    lab_img = nib.load(s.paths.ingested / "tgt" / "labels" / f"{sub['id']}.nii.gz")
    pred = np.asanyarray(nib.load(s.paths.predictions / "tgt" / "histmatch" / f"{sub['id']}.nii.gz").dataobj)
    from siteadapt.postprocess import postprocess

    direct = segmentation_metrics(postprocess(pred, {"A": 1, "B": 2}), np.asanyarray(lab_img.dataobj),
                                  {"A": 1, "B": 2}, spacing=(1.5, 1.5, 3.0))
    assert sub["dice"]["A"] == pytest.approx(direct["dice"]["A"])
    assert sub["assd"]["mean"] == pytest.approx(direct["assd"]["mean"])
    perfect = json.loads((s.paths.metrics / "heart" / "tgt" / "supervised.json").read_text())
    assert perfect["dice"]["mean"] == pytest.approx(1.0) and perfect["assd"]["mean"] == pytest.approx(0.0)
    assert (s.paths.reports / "heart" / "overlays" / "tgt" / "histmatch" / f"{sub['id']}.png").is_file()


def test_missing_prediction_is_a_named_error(evaluated):
    with pytest.raises(Exception, match="no prediction for subject"):
        evaluate(evaluated, "tgt", "cyclegan")


def test_report_tables_in_paper_order_with_best_marked(evaluated):
    s = evaluated
    report(s)
    md, _, stability = (s.paths.reports / "heart" / "table.md").read_text().partition("## Stability over seeds")
    assert "| SIFA (TMI) | 0,7 |" in stability  # the method run with two seeds (and only it) is in the seed study
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["Supervised (upper bound)", "W/o adaptation", "HistM", "SIFA (TMI)"]
    sifa = rows[3]
    assert sifa.rstrip(" |").endswith("2")  # two seeds -> mean ± std over seeds
    assert "**" in sifa and "**" not in rows[0]  # best among adaptation methods; the upper bound is never marked
    csv_text = (s.paths.reports / "heart" / "table.csv").read_text()
    assert "src → tgt" in csv_text and "*" in csv_text
    tex = (s.paths.reports / "heart" / "table.tex").read_text()
    assert "\\textbf{" in tex and "\\toprule" in tex
    assert (s.paths.reports / "heart" / "figures" / "overlays_tgt.png").is_file()


def test_stability_table_std_over_seeds():
    """The seed study's numbers: population std over seeds of each seed's mean Dice / ASD, methods with one seed
    left out (SeUDA's stability test)."""
    from siteadapt.steps.report import stability_table

    def run(m, seed, dice, asd):
        return {"method": m, "seed": seed, "dice": {"mean": dice}, "assd": {"mean": asd}}

    directions = {("a", "b"): {
        "noadapt": [run("noadapt", 0, 0.5, 9.0)],
        "cyuda": [run("cyuda", k, d, a) for k, (d, a) in enumerate([(0.70, 4.0), (0.80, 2.0), (0.90, 3.0)])],
        "seuda": [run("seuda", k, 0.8, 2.5) for k in range(2)],
    }}
    md = stability_table(directions)
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "seeds" not in ln}
    assert "W/o adaptation" not in lines and set(lines) == {"CyUDA", "SeUDA"}
    cy = [c.strip() for c in lines["CyUDA"].split("|")[1:-1]]
    assert cy[1] == "0,1,2" and cy[2] == "80.0" and cy[3] == f"{np.std([70, 80, 90]):.2f}" and cy[4] == "70.0–90.0"
    assert cy[5] == "3.00" and cy[6] == f"{np.std([4.0, 2.0, 3.0]):.2f}"
    se = [c.strip() for c in lines["SeUDA"].split("|")[1:-1]]
    assert se[3] == "0.00"
    assert stability_table({("a", "b"): {"noadapt": [run("noadapt", 0, 0.5, 9.0)]}}) == ""


def test_study_seed_list():
    from siteadapt.cli import _seed_list
    from siteadapt.errors import ConfigError

    assert _seed_list("0-4") == [0, 1, 2, 3, 4] and _seed_list("0,3,7") == [0, 3, 7] and _seed_list("2") == [2]
    for bad in ("a-b", "1,1", ""):
        with pytest.raises(ConfigError):
            _seed_list(bad)


def test_report_writes_results_page_with_the_tables_numbers(evaluated):
    """`siteadapt report` also writes docs/results.md (docs/ beside the reports folder): a stamp, then every task's
    table with the same numbers as the metrics files, its seed study and where the figures are; unchanged results
    leave the file as it was (stamp included), changed ones rewrite it."""
    from siteadapt.steps.report import STAMP_END, results_path

    s = evaluated
    report(s)
    path = results_path(s)
    assert path == s.paths.reports.resolve().parent / "docs" / "results.md"
    text = path.read_text()
    stamp, _, page = text.partition(STAMP_END)
    assert "do not edit" in stamp and "`siteadapt report`" in stamp and "numpy " in stamp
    assert "## heart: results" in page and "### src → tgt" in page and "- Seeds evaluated: 0, 7." in page
    assert "Figures: `../reports/heart/figures/`" in page and f"Profile `{s.profile}`" in page
    rows = {ln.split("|")[1].strip(): [c.strip().strip("*") for c in ln.split("|")[2:-1]]
            for ln in page.split("Stability over seeds")[0].splitlines() if ln.startswith("| ")}
    head = rows.pop("Method")
    col = {h: i for i, h in enumerate(head)}

    def metrics(method):
        return json.loads((s.paths.metrics / "heart" / "tgt" / f"{method}.json").read_text())

    for method, label in (("histmatch", "HistM"), ("noadapt", "W/o adaptation")):  # one seed: mean ± std over subjects
        st = metrics(method)["summary"]["metrics"]
        for structure in ("A", "B"):
            dice = st["dice"][structure]
            assert rows[label][col[f"Dice (%) {structure}"]] == f"{100 * dice['mean']:.1f}±{100 * dice['std']:.1f}"
        asd = st["assd"]["mean"]
        assert rows[label][col["ASD (mm) Avg"]] == f"{asd['mean']:.1f}±{asd['std']:.1f}"
    sifa_runs = [m for m in (json.loads(p.read_text()) for p in (s.paths.metrics / "heart" / "tgt").glob("*.json"))
                 if m["method"] == "sifa"]
    assert sorted(r["seed"] for r in sifa_runs) == [0, 7]  # two seeds: mean ± std over the seeds' means
    per_seed = np.array([100 * r["dice"]["A"] for r in sifa_runs])
    assert rows["SIFA (TMI)"][col["Dice (%) A"]] == f"{per_seed.mean():.1f}±{per_seed.std():.1f}"
    assert rows["SIFA (TMI)"][-1] == "2"
    stability = [ln for ln in page.split("Stability over seeds")[1].splitlines() if ln.startswith("| SIFA (TMI)")]
    mean_dice = np.array([100 * r["dice"]["mean"] for r in sifa_runs])
    assert len(stability) == 1 and f"| 0,7 | {mean_dice.mean():.1f} | {mean_dice.std():.2f} |" in stability[0]

    report(s)  # same results: the file is kept byte for byte (no new stamp)
    assert path.read_text() == text
    (s.paths.metrics / "heart" / "tgt" / "noadapt.json").unlink()
    report(s)
    again = path.read_text()
    assert STAMP_END in again and "W/o adaptation" not in again and "HistM" in again
