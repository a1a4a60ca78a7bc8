"""Ablation tables: a method against its own variants, and DVC experiments against their baseline.

Two sources of rows, kept apart from the paper tables of :mod:`siteadapt.steps.report`:

1. **Named variants** in params.yaml, e.g. ``methods: {sifa_prior: {method: sifa, deep_supervision: false}}`` with
   ``sifa_prior`` in a task's ``methods`` list: the report stage writes ``<reports>/<task>/ablation.md`` with one
   table per direction, rows = the base method and each variant, the options where a row differs from the method's
   defaults (with the task's ``method_options``), and mean Dice / ASSD (classification tasks: AUC).
2. **DVC experiments**: ``dvc exp run -S 'methods.sifa.deep_supervision=false'`` re-runs only that method's stages;
   afterwards ``siteadapt report --experiments`` reads ``dvc exp show --json`` and writes
   ``<reports>/<task>/experiments.md``: rows = the baseline commit, the workspace and every experiment, columns =
   the parameters that differ from the baseline, then mean Dice of every (target, method) whose Dice differs
   between rows (classification tasks: AUC). (It is not a DVC stage output: experiments are made after the pipeline
   ran.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import Settings
from ..io.atomic import write_text

log = logging.getLogger("siteadapt.ablation")


def _base_and_diff(settings: Settings, name: str, task: str | None = None) -> tuple[str, dict]:
    """(base method, options that differ from the base method's defaults) of a method or named variant, as it runs
    for ``task`` (with the task's ``method_options``)."""
    from ..methods import get_method

    raw = dict(settings.methods.get(name) or {})
    try:
        cls = get_method(raw.pop("method", name))
    except Exception:  # noqa: BLE001 - a metrics file of a method that no longer exists
        return name, {}
    per_task = settings.tasks[task].method_options if task in settings.tasks else {}
    for k in dict.fromkeys([cls.name, name]):
        raw |= per_task.get(k) or {}
    opts = cls.parse_options(raw, f"methods.{name}").model_dump()
    defaults = cls.Options().model_dump()
    return cls.name, {k: v for k, v in opts.items() if defaults.get(k) != v}


def _fmt(v, scale=1.0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.1f}"


def variant_table(settings: Settings, task: str, directions: dict) -> str:
    """Markdown: per direction, each base method that has variants, with its variants (empty when none)."""
    parts = []
    classification = task in settings.tasks and settings.tasks[task].kind == "classification"
    for (source, target), methods in sorted(directions.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        groups: dict[str, list[tuple[str, dict]]] = {}
        for name in methods:
            base, diff = _base_and_diff(settings, name, task)
            groups.setdefault(base, []).append((name, diff))
        for base, rows in sorted(groups.items()):
            if len(rows) < 2 and rows[0][0] == base:
                continue  # a method without variants is no ablation
            rows.sort(key=lambda r: (r[0] != base, r[0]))
            parts.append(f"\n## {base}: {source} → {target}\n")
            if classification:
                parts.append("| Row | Options differing from the defaults | AUC (%) | n seeds |")
                parts.append("|---|---|---|---|")
            else:
                parts.append("| Row | Options differing from the defaults | Dice (%) Avg | ASD (mm) Avg | n seeds |")
                parts.append("|---|---|---|---|---|")
            for name, diff in rows:
                runs = methods[name]
                opts = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(diff.items())) or "(defaults)"
                if classification:  # mean over seeds
                    aucs = [r["auc"] for r in runs if r.get("auc") is not None]
                    parts.append(f"| {name} | {opts} | {_fmt(sum(aucs) / len(aucs) if aucs else None, 100)} | "
                                 f"{len(runs)} |")
                    continue
                dice = [r.get("dice", {}).get("mean") for r in runs]
                assd = [r.get("assd", {}).get("mean") for r in runs]
                dice = [d for d in dice if d is not None]
                assd = [a for a in assd if a is not None]
                parts.append(f"| {name} | {opts} | {_fmt(sum(dice) / len(dice) if dice else None, 100)} | "
                             f"{_fmt(sum(assd) / len(assd) if assd else None)} | {len(runs)} |")
    return "\n".join(parts)


def write_ablation(settings: Settings, task: str, directions: dict) -> Path:
    body = variant_table(settings, task, directions)
    text = f"# {task}: ablations (named variants in params.yaml)\n"
    text += body + "\n" if body else ("\nNo variants evaluated. Add e.g. `methods: {sifa_prior: {method: sifa, "
                                      "deep_supervision: false}}` and list `sifa_prior` in the task's methods, or run "
                                      "`dvc exp run -S ...` and `siteadapt report --experiments`.\n")
    path = settings.paths.reports / task / "ablation.md"
    write_text(path, text)
    return path


# ---- DVC experiments ------------------------------------------------------------------------------------------------
def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.is_file() else (shutil.which("dvc") or "dvc")


def dvc_experiments(cwd: str | Path = ".") -> list[dict]:
    """Rows from ``dvc exp show --json``: ``{"name", "rev", "params": {dotted: value}, "metrics": {path: dict}}`` for
    the workspace, the baseline commit and every experiment on it."""
    res = subprocess.run([_dvc(), "exp", "show", "--json"], cwd=str(cwd), capture_output=True, text=True,
                         env={**os.environ})
    if res.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {res.stderr.strip()[-500:]}")
    rows = []

    def add(entry: dict, kind: str, name: str) -> None:
        data = entry.get("data") or {}
        params = {}
        for _file, blob in (data.get("params") or {}).items():
            params.update(_flatten((blob or {}).get("data") or {}))
        metrics = {p: (blob or {}).get("data") or {} for p, blob in (data.get("metrics") or {}).items()}
        rows.append({"name": name, "kind": kind, "rev": entry.get("rev"), "params": params, "metrics": metrics})

    for top in json.loads(res.stdout or "[]"):
        rev = top.get("rev") or ""
        if rev == "workspace":
            add(top, "workspace", "workspace")
        else:
            add(top, "baseline", f"baseline ({top.get('name') or rev[:7]})")
        for ex in top.get("experiments") or []:
            for r in ex.get("revs") or []:
                add(r, "experiment", ex.get("name") or r.get("name") or (r.get("rev") or "")[:7])
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_experiment_tables(settings: Settings, rows: list[dict]) -> dict[str, Path]:
    """``<reports>/<task>/experiments.md`` per task that has metrics in the experiments."""
    if not rows:
        return {}
    base = next((r for r in rows if r.get("kind") == "baseline"), rows[0])
    changed_keys = sorted({k for r in rows for k, v in r["params"].items() if base["params"].get(k) != v})
    written = {}
    metrics_root = settings.paths.metrics.as_posix().rstrip("/") + "/"
    by_task: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in rows:
        for path, m in r["metrics"].items():
            rel = Path(path).as_posix()
            if not rel.startswith(metrics_root) or not isinstance(m, dict):
                continue
            task = m.get("task") or rel[len(metrics_root):].split("/")[0]
            col = f"{m.get('site', '?')}/{m.get('method', Path(rel).stem)}"
            if m.get("kind") == "classification":  # the classification tasks' main number: AUC
                value = m.get("auc") if isinstance(m.get("auc"), (int, float)) else None
            else:
                value = (m.get("dice") or {}).get("mean") if isinstance(m.get("dice"), dict) else None
            by_task.setdefault(task, {}).setdefault(col, {})[r["name"]] = value
    for task, cols in by_task.items():
        varying = [c for c, vals in sorted(cols.items()) if len({None if v is None else round(v, 6)
                                                                  for v in vals.values()}) > 1]
        shown = varying or sorted(cols)
        measure = "AUC" if task in settings.tasks and settings.tasks[task].kind == "classification" else "Dice"
        head = ["Experiment", "Changed parameters"] + [f"{measure} (%) {c}" for c in shown]
        lines = [f"# {task}: DVC experiments (`dvc exp show`)\n",
                 "Rows: the baseline commit, the workspace and each experiment; parameters as they differ from the "
                 f"baseline; {measure} columns: (target site/method) whose mean {measure} differs between rows"
                 + (" (none differ: all shown)" if not varying else "") + ".\n",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            ch = ", ".join(f"{k}={json.dumps(r['params'].get(k))}" for k in changed_keys
                           if r["params"].get(k) != base["params"].get(k)) or "-"
            lines.append("| " + " | ".join([r["name"], ch] + [_fmt(cols[c].get(r["name"]), 100) for c in shown])
                         + " |")
        path = settings.paths.reports / task / "experiments.md"
        write_text(path, "\n".join(lines) + "\n")
        written[task] = path
    return written
