"""Report step: every evaluated method -> paper-style tables (Markdown, CSV, LaTeX) and figures, per task.

Layout (as the papers' tables): one table per adaptation direction (source -> target); methods as rows in the
papers' order (upper bounds first, then no adaptation, then the baselines, then the papers' methods); structures as
columns plus the average; a Dice block and an ASD block (``assd``, mm). Each cell is the mean over test subjects;
with several seeds of a method, mean ± std over the seeds' means; with one seed, ± is the std over subjects. The best
value of each column among the adaptation methods (reference rows excluded) is marked (bold in Markdown/LaTeX, ``*``
in CSV). Segmentation tasks with 2D data (chest X-ray) also get recall and precision blocks, as in the SeUDA table.

Figures under ``<reports>/<task>/figures/``: training curves of every trained run (from the engine's ``losses.csv``),
translated-image grids that adapting methods wrote (``translations.png``), and per target site a side-by-side overlay
of every method's prediction for the same subject.

Classification tasks get TUNA-Net's Table 1 instead: one row per method, columns AUC (%), Acc. (%), Sen. (%),
Spec. (%) and F1 on the target's test images at the threshold chosen on its validation images (see
:mod:`.evaluate`); mean ± std over seeds (one seed: the value alone, ``n seeds`` says 1); and a ROC figure per
direction (``figures/roc_<target>.png``, first seed of each method).

Measured results live in generated files, not in the code or the README: besides the per-task files under
``<reports>``, the report writes ``docs/results.md`` (:func:`write_results`): one page with every task's table, its
seed study and ablation rows, the sites' synthetic generator versions and where the figures are, under a stamp (date,
git commit, package versions). Its folder is ``docs/`` beside the reports folder (``<reports>/../docs``: the project
root for the default ``paths.reports: reports``), or ``docs_dir``. The page below the stamp depends only on the
metrics files and params.yaml; when it is unchanged the file is left as it is, stamp included.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..config import Settings
from ..io.atomic import write_text
from ..layout import read_metrics
from .ablation import variant_table, write_ablation

log = logging.getLogger("siteadapt.report")

# The papers' order of rows; unknown methods (new files, ablation variants) follow in name order.
METHOD_ORDER = [
    "supervised", "stl", "noadapt", "histmatch", "dann", "adda", "adaoutput", "cyclegan", "cycada", "cyuda", "seuda",
    "sifa_prior", "sifa", "dsan", "tunanet", "tunanet_nofeat", "tunanet_norec", "tunanet_offline",
]
REFERENCE_ROWS = {"supervised", "stl", "source"}  # upper bounds and the source model on its own site: never marked best
LABELS = {
    "supervised": "Supervised (upper bound)", "stl": "STL (fine-tuned, labeled target)", "noadapt": "W/o adaptation",
    "source": "Source model (its own site)",
    "histmatch": "HistM", "dann": "DANN (FeatDA)", "adda": "ADDA", "adaoutput": "AdaOutput", "cyclegan": "CycleGAN",
    "cycada": "CyCADA", "cyuda": "CyUDA", "seuda": "SeUDA", "sifa_prior": "Prior SIFA (AAAI)", "sifa": "SIFA (TMI)",
    "dsan": "DSAN", "tunanet": "TUNA-Net", "tunanet_nofeat": "a) w/o feature loss",
    "tunanet_norec": "b) w/o F_A on rec.", "tunanet_offline": "c) w/o F_P, offline",
}
# TUNA-Net Table 1: (metrics-JSON key, column title, scale, decimals)
CLASSIFICATION_COLUMNS = [("auc", "AUC (%)", 100.0, 1), ("accuracy", "Acc. (%)", 100.0, 1),
                          ("sensitivity", "Sen. (%)", 100.0, 1), ("specificity", "Spec. (%)", 100.0, 1),
                          ("f1", "F1", 1.0, 2)]
HIGHER_IS_BETTER = {"dice": True, "recall": True, "precision": True, "assd": False, "asd": False, "hd95": False}
BLOCK_TITLES = {"dice": "Dice (%)", "assd": "ASD (mm)", "recall": "Recall (%)", "precision": "Precision (%)",
                "hd95": "HD95 (mm)"}


def _order_key(name: str):
    base = name.split("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), name)


def collect(metrics_root: Path) -> dict[str, dict[tuple[str | None, str], dict[str, list[dict]]]]:
    """{task: {(source, target): {method: [metrics json per seed]}}}."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for p in sorted(Path(metrics_root).glob("*/*/*.json")):
        try:
            m = read_metrics(p)
        except json.JSONDecodeError:
            log.warning("%s: not valid JSON, skipped", p)
            continue
        if "method" not in m or "site" not in m or m.get("labeled") is False:  # unlabeled sites: no table row
            continue
        out[m["task"]][(m.get("source_site"), m["site"])][m["method"]].append(m)
    return out


def _cell(runs: list[dict], metric: str, structure: str, scale: float) -> tuple[float, float]:
    if len(runs) > 1:  # mean ± std over seeds of the per-seed means
        vals = [r.get(metric, {}).get(structure) for r in runs]
        vals = np.array([v for v in vals if v is not None], dtype=float) * scale
        return (float(vals.mean()), float(vals.std())) if vals.size else (math.nan, math.nan)
    st = runs[0].get("summary", {}).get("metrics", {}).get(metric, {}).get(structure, {})
    mean, std = st.get("mean"), st.get("std")
    return (math.nan if mean is None else mean * scale, math.nan if std is None else std * scale)


def build_tables(task: str, directions: dict, blocks: list[str]) -> tuple[str, list[list[str]], str]:
    md, rows_csv, tex = [], [], []
    md.append(f"# {task}: results on the target sites' test subjects\n")
    md.append("Cells: mean ± std over test subjects (one seed) or over seeds' means (several seeds; `n seeds` column). "
              "ASD = average symmetric surface distance in mm on the original grid. **Bold**: best adaptation method "
              "per column (upper-bound rows excluded).\n")
    for (source, target), methods in sorted(directions.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        names = sorted(methods, key=_order_key)
        structures = methods[names[0]][0]["structures"]
        cols = structures + ["mean"]
        title = f"{source} → {target}" if source else target
        md.append(f"\n## {title}\n")
        tex.append(f"% {title}\n\\begin{{tabular}}{{l{'c' * (len(cols) * len(blocks))}r}}\n\\toprule")
        head = ["Method"] + [f"{BLOCK_TITLES.get(b, b)} {c if c != 'mean' else 'Avg'}" for b in blocks for c in cols]
        head += ["n seeds"]
        rows_csv.append(["direction"] + head)
        md.append("| " + " | ".join(head) + " |")
        md.append("|" + "---|" * len(head))
        tex.append(" & ".join(h.replace("%", "\\%") for h in head) + " \\\\ \\midrule")
        values = {}
        for n in names:
            for b in blocks:
                scale = 100.0 if b in ("dice", "recall", "precision") else 1.0
                for c in cols:
                    values[(n, b, c)] = _cell(methods[n], b, c, scale)
        best = {}
        for b in blocks:
            for c in cols:
                cands = [(values[(n, b, c)][0], n) for n in names
                         if n.split("@")[0] not in REFERENCE_ROWS and not math.isnan(values[(n, b, c)][0])]
                if cands:
                    best[(b, c)] = (max if HIGHER_IS_BETTER.get(b, True) else min)(cands)[1]
        for n in names:
            label = LABELS.get(n, n)
            cells_md, cells_csv, cells_tex = [label], [title, label], [label]
            for b in blocks:
                for c in cols:
                    mean, std = values[(n, b, c)]
                    txt = "n/a" if math.isnan(mean) else (f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f}±{std:.1f}")
                    is_best = best.get((b, c)) == n
                    cells_md.append(f"**{txt}**" if is_best else txt)
                    cells_csv.append(txt + ("*" if is_best else ""))
                    cells_tex.append(("\\textbf{%s}" % txt.replace("±", "$\\pm$")) if is_best
                                     else txt.replace("±", "$\\pm$"))
            k = str(len(methods[n]))
            md.append("| " + " | ".join(cells_md + [k]) + " |")
            rows_csv.append(cells_csv + [k])
            tex.append(" & ".join(cells_tex + [k]) + " \\\\")
        tex.append("\\bottomrule\n\\end{tabular}\n")
    buf = io.StringIO()
    csv.writer(buf).writerows(rows_csv)
    return "\n".join(md) + "\n", rows_csv, "\n".join(tex)


def stability_table(directions: dict) -> str:
    """The seed study (SeUDA's stability test, §3): for every method with several seeds, the std over seeds of the
    per-seed mean Dice and mean ASD (structures averaged), as in "Dice std: 0.25% v.s. 2.03%, ASD std: 0.16 v.s. 1.19
    mm". Empty when no method has more than one seed."""
    md = []
    for (source, target), methods in sorted(directions.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        names = [n for n in sorted(methods, key=_order_key) if len(methods[n]) > 1]
        if not names:
            continue
        title = f"{source} → {target}" if source else target
        md.append(f"\n### {title}\n")
        md.append("| Method | seeds | Dice (%) mean | Dice std over seeds | Dice min–max | ASD (mm) mean | "
                  "ASD std over seeds |")
        md.append("|---|---|---|---|---|---|---|")
        for n in names:
            runs = sorted(methods[n], key=lambda r: r.get("seed", 0))
            dice = np.array([r.get("dice", {}).get("mean", math.nan) for r in runs], dtype=float) * 100
            asd = np.array([r.get("assd", {}).get("mean", math.nan) for r in runs], dtype=float)
            seeds = ",".join(str(r.get("seed")) for r in runs)
            md.append(f"| {LABELS.get(n, n)} | {seeds} | {np.nanmean(dice):.1f} | {np.nanstd(dice):.2f} | "
                      f"{np.nanmin(dice):.1f}–{np.nanmax(dice):.1f} | {np.nanmean(asd):.2f} | {np.nanstd(asd):.2f} |")
    if not md:
        return ""
    return ("\n## Stability over seeds\n\nThe same method trained with different seeds (same data, same settings, "
            "same source model): std over seeds of each seed's mean Dice and ASD (population std). SeUDA's claim: "
            "its std is below CyUDA's.\n" + "\n".join(md) + "\n")


def build_classification_tables(task: str, directions: dict) -> tuple[str, list[list[str]], str]:
    """TUNA-Net's Table 1 layout: methods x (AUC, Acc., Sen., Spec., F1), mean ± std over seeds."""
    md = [f"# {task}: classification on the target sites' test images\n",
          "AUC, accuracy (Acc.), sensitivity (Sen.), specificity (Spec.) and F1 of the positive class on the target's "
          "test split, at the threshold that maximises Youden's J on its validation split (validation labels pick the "
          "operating point only). Cells: mean ± std over seeds (one seed: the value). **Bold**: best adaptation method "
          "per column (upper-bound rows excluded).\n"]
    rows_csv, tex = [], []
    for (source, target), methods in sorted(directions.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        names = sorted(methods, key=_order_key)
        title = f"{source} → {target}" if source else target
        head = ["Model"] + [c[1] for c in CLASSIFICATION_COLUMNS] + ["n seeds"]
        md += [f"\n## {title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows_csv.append(["direction"] + head)
        tex += [f"% {title}\n\\begin{{tabular}}{{l{'c' * len(CLASSIFICATION_COLUMNS)}r}}\n\\toprule",
                " & ".join(h.replace("%", "\\%") for h in head) + " \\\\ \\midrule"]
        values = {}
        for n in names:
            for key, _, scale, _ in CLASSIFICATION_COLUMNS:
                vals = np.array([r[key] for r in methods[n] if r.get(key) is not None], dtype=float) * scale
                values[(n, key)] = ((float(vals.mean()), float(vals.std()) if vals.size > 1 else math.nan)
                                    if vals.size else (math.nan, math.nan))
        best = {}
        for key, *_ in CLASSIFICATION_COLUMNS:
            cands = [(values[(n, key)][0], n) for n in names
                     if n.split("@")[0] not in REFERENCE_ROWS and not math.isnan(values[(n, key)][0])]
            if cands:
                best[key] = max(cands)[1]
        for n in names:
            label = LABELS.get(n, n)
            cells_md, cells_csv, cells_tex = [label], [title, label], [label]
            for key, _, _, dec in CLASSIFICATION_COLUMNS:
                mean, std = values[(n, key)]
                txt = "n/a" if math.isnan(mean) else (f"{mean:.{dec}f}" if math.isnan(std)
                                                      else f"{mean:.{dec}f}±{std:.{dec}f}")
                is_best = best.get(key) == n
                cells_md.append(f"**{txt}**" if is_best else txt)
                cells_csv.append(txt + ("*" if is_best else ""))
                t = txt.replace("±", "$\\pm$")
                cells_tex.append("\\textbf{%s}" % t if is_best else t)
            k = str(len(methods[n]))
            md.append("| " + " | ".join(cells_md + [k]) + " |")
            rows_csv.append(cells_csv + [k])
            tex.append(" & ".join(cells_tex + [k]) + " \\\\")
        tex.append("\\bottomrule\n\\end{tabular}\n")
    return "\n".join(md) + "\n", rows_csv, "\n".join(tex)


def _roc_figure(target: str, methods: dict, fig_dir: Path) -> Path | None:
    """ROC curves of every method on the target's test images (first seed of each)."""
    from ..figures import close_figure, plot_figure, save_figure

    fig, ax = plot_figure(3.6, 3.4)
    drawn = 0
    for n in sorted(methods, key=_order_key):
        run = methods[n][0]
        rows = [r for r in run.get("per_image", []) if r.get("split") == run.get("split", "test")]
        y = np.array([r["label"] for r in rows], dtype=int)
        sc = np.array([r["score"] for r in rows], dtype=float)
        if y.size == 0 or y.min() == y.max():
            continue
        order = np.argsort(-sc, kind="stable")
        tpr = np.concatenate([[0.0], np.cumsum(y[order] == 1) / max(int((y == 1).sum()), 1)])
        fpr = np.concatenate([[0.0], np.cumsum(y[order] == 0) / max(int((y == 0).sum()), 1)])
        auc = run.get("auc")
        ax.plot(fpr, tpr, lw=1.2, label=f"{LABELS.get(n, n)}" + (f" ({100 * auc:.1f})" if auc is not None else ""))
        drawn += 1
    if not drawn:
        close_figure(fig)
        return None
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC on {target} (test), AUC %", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    return save_figure(fig, fig_dir / f"roc_{target}.png")


def _training_curves(settings: Settings, task: str, fig_dir: Path) -> list[Path]:
    from ..figures import plot_figure, save_figure

    written = []
    for log_csv in sorted((settings.paths.models / task).glob("*/*/losses.csv")):
        site, method = log_csv.parent.parent.name, log_csv.parent.name
        with open(log_csv) as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("iteration", "it_per_s")]
        it = [int(r["iteration"]) for r in rows]
        fig, ax = plot_figure(5.0, 3.0)
        for k in keys:
            # a term logged in some phases only (blank elsewhere) is drawn where it was logged
            ax.plot(it, [float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows], label=k, lw=1)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.set_title(f"{method} on {site}", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
        written.append(save_figure(fig, fig_dir / f"curves_{site}_{method}.png"))
    return written


def _side_by_side(settings: Settings, task: str, target: str, methods: list[str], fig_dir: Path) -> Path | None:
    """One subject, every method's overlay one under the other (the evaluate step's overlay PNGs, cropped to their
    content and stacked pixel for pixel: :func:`siteadapt.figures.stack_pngs`)."""
    from ..figures import stack_pngs

    base = settings.paths.reports / task / "overlays" / target
    firsts = {m: sorted((base / m).glob("*.png")) for m in methods}
    common = set.intersection(*(set(p.name for p in v) for v in firsts.values())) if firsts else set()
    if not common:
        return None
    name = sorted(common)[0]
    return stack_pngs([base / m / name for m in methods], fig_dir / f"overlays_{target}.png")


def report(settings: Settings, docs_dir: Path | None = None) -> dict[str, Path]:
    """Every task's tables and figures under ``<reports>/<task>/`` ({task: its ``table.md``}), and
    ``docs/results.md`` (see the module docstring; ``docs_dir`` overrides its folder)."""
    data = collect(settings.paths.metrics)
    written = {}
    tables: dict[str, str] = {}
    for task, directions in data.items():
        dims = settings.tasks[task].dims if task in settings.tasks else 3
        kind = settings.tasks[task].kind if task in settings.tasks else "segmentation"
        if kind == "classification":
            md, rows, tex = build_classification_tables(task, directions)
        else:
            blocks = ["dice", "assd"] + (["recall", "precision"] if dims == 2 else [])
            md, rows, tex = build_tables(task, directions, blocks)
            md += stability_table(directions)
        tables[task] = md
        out = settings.paths.reports / task
        write_text(out / "table.md", md)
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        write_text(out / "table.csv", buf.getvalue())
        write_text(out / "table.tex", tex)
        fig_dir = out / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        _training_curves(settings, task, fig_dir)
        for (source, target), methods in directions.items():
            if kind == "classification":
                _roc_figure(target, methods, fig_dir)
            else:
                _side_by_side(settings, task, target, sorted(methods, key=_order_key), fig_dir)
            for m in methods:
                tr = settings.paths.models / task / target / m / "translations.png"
                if tr.is_file():
                    shutil.copyfile(tr, fig_dir / f"translations_{target}_{m}.png")
        write_ablation(settings, task, directions)
        written[task] = out / "table.md"
        log.info("%s: table -> %s", task, out / "table.md")
    _placeholders(settings, written)
    write_results(settings, data, tables, docs_dir)
    return written


def _placeholders(settings: Settings, written: dict) -> None:
    """Tasks in the pipeline (``pipeline.tasks``) without any labeled result still get their files (DVC declares
    them as outputs)."""
    for task in settings.pipeline_tasks():
        t = settings.tasks[task]
        if task in written or not (t.directions and t.methods):
            continue
        out = settings.paths.reports / task
        write_text(out / "table.md", f"# {task}\n\nNo labeled evaluation results: the targets have no labeled test "
                                     "subjects, or nothing was evaluated yet.\n")
        write_text(out / "table.csv", "")
        write_text(out / "table.tex", "")
        write_ablation(settings, task, {})
        (out / "figures").mkdir(parents=True, exist_ok=True)


# ---- docs/results.md ----------------------------------------------------------------------------------------------
STAMP_END = "<!-- end of stamp: everything below is generated from the metrics files and params.yaml -->"


def results_path(settings: Settings, docs_dir: Path | None = None) -> Path:
    """``<docs_dir>/results.md``; by default ``docs/`` beside the reports folder (the project root's ``docs/``)."""
    return Path(docs_dir if docs_dir is not None else Path(settings.paths.reports).resolve().parent / "docs") \
        / "results.md"


def _stamp(root: Path) -> str:
    """The header: what generated the page, when, at which commit, with which packages (changes on every write)."""
    import platform
    from importlib import metadata

    from ..tracking import git_info

    git = git_info(root)
    commit = git.get("git_commit", "unknown") + (" (uncommitted changes)" if git.get("git_dirty") == "true" else "")
    versions = []
    for pkg in ("siteadapt", "torch", "numpy", "scipy"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return ("<!-- Generated by `siteadapt report`: do not edit, the next report overwrites it. -->\n"
            "# Measured results\n\n"
            f"Generated by `siteadapt report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, git commit "
            f"{commit}; Python {platform.python_version()}, {', '.join(versions)} (the environment of the report; "
            "each training or evaluation run records its own as `env.*` tags of its MLflow run).\n\n" + STAMP_END
            + "\n")


def _generator(settings: Settings, site: str) -> str:
    """How a site's images were made: the synthetic generator and its version (from the site's ``site.json``)."""
    spec = settings.sites.get(site)
    if spec is None or not spec.synthetic:
        return "not synthetic" if spec is not None else "not in params.yaml"
    info_path = Path(settings.paths.raw) / spec.synthetic / "site.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "synthetic (no site.json)"
    return f"synthetic, {info.get('generator', '?')} {info.get('generator_version', '?')}"


def _demote(md: str) -> str:
    """Markdown headings one level down (a task's ``# title`` becomes a section of the results page)."""
    return "\n".join("#" + ln if ln.startswith("#") else ln for ln in md.splitlines())


def results_page(settings: Settings, data: dict, tables: dict[str, str], docs: Path) -> str:
    """The part of ``docs/results.md`` below the stamp: deterministic for the same metrics files and settings."""
    known = list(settings.tasks)
    planned = {t for t in settings.pipeline_tasks() if settings.tasks[t].directions and settings.tasks[t].methods}
    tasks = sorted(planned | set(data), key=lambda t: (known.index(t) if t in known else len(known), t))
    parts = [f"Profile `{settings.profile}` and base seed {settings.seed} (params.yaml when the report ran). The "
             "same tables are in `<reports>/<task>/table.md` (.csv, .tex) and `ablation.md`.\n"]
    if not tasks:
        parts.append("\nNo tasks and no evaluated methods yet.\n")
    for task in tasks:
        directions = data.get(task, {})
        declared = settings.tasks[task].directions if task in settings.tasks else []
        sites = sorted({s for d in directions for s in d if s} | {s for d in declared for s in (d.source, d.target)})
        runs = [r for methods in directions.values() for rs in methods.values() for r in rs]
        seeds = sorted({r.get("seed") for r in runs if r.get("seed") is not None})
        fig = Path(os.path.relpath(Path(settings.paths.reports).resolve() / task / "figures", docs.resolve()))
        meta = []
        if sites:
            meta.append("- Sites: " + "; ".join(f"`{s}` ({_generator(settings, s)})" for s in sites) + ".")
        if seeds:
            meta.append(f"- Seeds evaluated: {', '.join(str(k) for k in seeds)}.")
        meta.append(f"- Figures: `{fig.as_posix()}/` (training curves, translated images, overlays side by side or "
                    "ROC curves).")
        if task not in tables:
            parts += [f"\n## {task}\n\n", "\n".join(meta) + "\n",
                      "\nNo labeled evaluation results: the targets have no labeled test subjects, or nothing was "
                      "evaluated yet.\n"]
            continue
        title, _, rest = _demote(tables[task]).strip().partition("\n")
        parts += [f"\n{title}\n\n", "\n".join(meta) + "\n", "\n" + rest.strip() + "\n"]
        ablation = variant_table(settings, task, directions)
        if ablation:
            parts.append("\n### Ablations (named variants in params.yaml)\n" + _demote(_demote(ablation)).rstrip()
                         + "\n")
    return "".join(parts)


def write_results(settings: Settings, data: dict, tables: dict[str, str], docs_dir: Path | None = None) -> Path:
    """Write ``docs/results.md`` atomically, unless the page below its stamp is unchanged."""
    path = results_path(settings, docs_dir)
    body = results_page(settings, data, tables, path.parent)
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if STAMP_END in old and old.split(STAMP_END, 1)[1].lstrip("\n") == body:
            log.info("results unchanged: %s kept", path)
            return path
    write_text(path, _stamp(path.parent.parent) + "\n" + body)
    log.info("results -> %s", path)
    return path
