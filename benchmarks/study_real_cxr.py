"""The real chest X-ray study (issue 26): both directions of the real two-hospital kit, the methods over seeds, the
label-free choice and its regret -> ``docs/study-real-cxr.md``.

    make study-real-cxr            # = .venv/bin/python benchmarks/study_real_cxr.py
    .venv/bin/python benchmarks/study_real_cxr.py [--arms main,robust,gan] [--seeds 0-2] [--methods ...]
        [--directions shenzhen:montgomery,montgomery:shenzhen] [--kit ../shared/data/cxr_lungs]
        [--work runs/study-real-cxr] [--out docs/study-real-cxr.md] [--render-only] [--track]

Arms (``ARMS``): ``main``, the ``real2d`` profile with the test-time, source-model and self-training methods over
three seeds; ``robust``, the same profile with the BigAug source segmenter; ``gan``, the papers' GAN and adversarial
baselines at the ``quick`` profile (at ``real2d`` they cost 15-25 minutes per run on 2 cores each, see the note in
the report), with that profile's own no-adaptation and supervised rows for their gap shares.

What it does, as a new user would:

1. One workspace per direction and arm (``<work>/<source>_to_<target>[_robust][_<profile>]/``): the repository's
   params.yaml copied afresh (the one settings file: profiles, methods, gates, selection), then ``siteadapt site add
   <source> --labels ...`` and ``siteadapt site add <target> --labels ... --target-of <source>`` (the target's labels
   are for evaluation only: no adaptation method reads them; ``supervised`` is the upper-bound reference that does),
   pixel spacing 1.4 mm (the kit's PNGs carry none). Then ``ingest`` and ``preprocess`` of both sites.
2. Per seed: the source segmenter of that seed, then every method with that seed (adapt, predict, evaluate). A cell
   whose metrics exist and whose settings (method options, profile, source model) have not changed is kept, so a
   rerun continues where it stopped and redoes what a settings change made stale.
3. Per seed: ``siteadapt select``'s label-free choice among the adapted candidates (``noadapt`` always among them),
   with every label-free score recorded; the labels only audit it (regret, share of the gap, rank correlations).
4. ``docs/study-real-cxr.md``: aggregates only (means, standard deviations, shares, times, rank correlations): no
   image, no case id, no mask, no per-case number. The workspaces (models, predictions, per-subject metrics) stay
   under ``--work`` (git-ignored ``runs/``).

Tracking (MLflow) is off by default for the study (``SITEADAPT_TRACKING=off``; ``--track`` turns it on): the study
measures methods, and the per-stage store round-trips would add minutes to the times it reports.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KIT = REPO.parent / "shared" / "data" / "cxr_lungs"
SITES = ("shenzhen", "montgomery")
PIXEL_SPACING_MM = 1.4
DEFAULT_METHODS = "supervised,noadapt,histmatch,adabn,tent,fda,selftrain,selftrain_hm"


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def _cli(ws: Path, *args: str, env: dict) -> None:
    """Run ``siteadapt ARGS`` in workspace ``ws``; a failure stops the study with the command's own message."""
    exe = Path(sys.executable).with_name("siteadapt")
    r = subprocess.run([str(exe), *args], cwd=ws, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
        raise SystemExit(f"study: `siteadapt {' '.join(args[:3])} ...` failed in {ws.name} (exit {r.returncode})")


ROBUST_LINE = "      source: {bigaug: true}   # study arm: the robust (BigAug) source segmenter\n"


def with_robust_source(text: str) -> str:
    """params.yaml's text with ``tasks.chestxray.method_options.source: {bigaug: true}`` (the robust source arm)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, ln in enumerate(lines) if ln.split("#")[0].rstrip() == "  chestxray:")
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("    method_options:"):
            return "".join(lines[:i + 1] + [ROBUST_LINE] + lines[i + 1:])
        if lines[i].strip() and not lines[i].startswith("    "):
            break
    raise SystemExit("study: params.yaml has no tasks.chestxray.method_options block to add the robust source to")


def workspace(work: Path, kit: Path, source: str, target: str, env: dict, robust: bool = False) -> Path:
    """The direction's workspace with both sites added, ingested and preprocessed (idempotent). ``robust``: the arm
    whose source segmenter trains with BigAug (workspace ``<source>_to_<target>_robust``)."""
    profile = env.get("SITEADAPT_PROFILE", "real2d")
    ws = work / (f"{source}_to_{target}" + ("_robust" if robust else "") + ("" if profile == "real2d" else
                                                                            f"_{profile}"))
    ws.mkdir(parents=True, exist_ok=True)
    # params.yaml is made afresh from the repository's each time (the study measures the current settings); runs
    # made with other settings are redone (see run_direction's fingerprints)
    text = (REPO / "params.yaml").read_text()
    (ws / "params.yaml").write_text(with_robust_source(text) if robust else text)
    _cli(ws, "site", "add", source, "--task", "chestxray", "--images", str(kit / source / "images"),
         "--labels", str(kit / source / "labels"), "--pixel-spacing", str(PIXEL_SPACING_MM), env=env)
    _cli(ws, "site", "add", target, "--task", "chestxray", "--images", str(kit / target / "images"),
         "--labels", str(kit / target / "labels"), "--pixel-spacing", str(PIXEL_SPACING_MM),
         "--target-of", source, env=env)
    for site in (source, target):
        if not (ws / "data" / "prepared" / site / "subjects.json").is_file():
            _cli(ws, "ingest", "--site", site, env=env)
            _cli(ws, "preprocess", "--site", site, env=env)
    return ws


def _load_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _save_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.rename(path)


def run_direction(ws: Path, source: str, target: str, methods: list[str], seeds: list[int], force: bool,
                  select_only: bool = False) -> None:
    """Train, adapt, evaluate and select in ``ws`` (in-process, with the workspace as the current folder).
    ``select_only``: no training; the label-free choice of each seed among the methods evaluated with that seed."""
    from siteadapt.config import load_settings
    from siteadapt.layout import metrics_path, model_dir, source_model_path
    from siteadapt.methods.build import build_method, method_options
    from siteadapt.steps import api

    os.chdir(ws)
    s = load_settings("params.yaml")
    times_path = ws / "times.json"
    times = _load_json(times_path, {})
    prof = s.profile_for("chestxray").model_dump()

    def fingerprint(name: str, site: str) -> str:
        _, raw, _, _ = method_options(s, name, site)
        return json.dumps({"options": raw, "profile": prof}, sort_keys=True, default=str)

    for k in seeds:
        if select_only:
            done_here = [m for m in methods if metrics_path(s, target, m, k).is_file()]
            adapted = [m for m in done_here if not build_method(s, m, target).trains_on_target_labels]
            if adapted:
                _select(ws, s, source, target, adapted, k)
            continue
        src = source_model_path(s, source, k)
        src_fp = fingerprint("source", source)
        stale_source = (times.get("source_fp", {}).get(str(k)) != src_fp)
        if not src.is_file() or stale_source or force:
            if src.is_file():
                shutil.rmtree(src.parent)  # other settings: the chain of this seed starts again
            t0 = time.perf_counter()
            api.train_source(s, source, seed=k)
            times.setdefault("source", {})[str(k)] = time.perf_counter() - t0
            times.setdefault("source_fp", {})[str(k)] = src_fp
            _save_json(times_path, times)
        for m in methods:
            done = metrics_path(s, target, m, k)
            fp = fingerprint(m, target) + src_fp
            cell = times.get(m, {}).get(str(k), {})
            if done.is_file() and not force and not stale_source and cell.get("fingerprint") == fp:
                continue
            mdir = model_dir(s, target, m, k)
            if mdir.is_dir():
                shutil.rmtree(mdir)  # never resume a checkpoint of other settings or of another source model
            t0 = time.perf_counter()
            api.adapt(s, target, m, source=source, seed=k)
            t_adapt = time.perf_counter() - t0
            api.evaluate(s, target, m, seed=k, predict=True)
            times.setdefault(m, {})[str(k)] = {"adapt_s": t_adapt, "total_s": time.perf_counter() - t0,
                                               "fingerprint": fp}
            _save_json(times_path, times)
            d = json.loads(done.read_text())["dice"]["mean"]
            print(f"[{source}->{target}] {m} seed {k}: Dice {100 * d:.1f} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        adapted = [m for m in methods if not build_method(s, m, target).trains_on_target_labels]
        _select(ws, s, source, target, adapted, k)


def _select(ws: Path, s, source: str, target: str, adapted: list[str], k: int) -> None:
    """``siteadapt select``'s label-free choice of seed ``k`` (the settings of params.yaml), kept per seed."""
    from siteadapt.steps.select import select, write_selection

    res = select(s, target, methods=adapted, selection="label_free", seed=k)
    write_selection(s, target, res)  # the product's record of the pipeline seed; the study keeps its own
    (ws / "selection").mkdir(exist_ok=True)
    _save_json(ws / "selection" / f"seed{k}.json", res)
    print(f"[{source}->{target}] seed {k}: label-free choice {res['winner']} ({res['decision']['reason']})",
          flush=True)


# ---- the report -------------------------------------------------------------------------------------------------------
def _ms(vals: list[float], scale: float = 1.0, nd: int = 1) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    m = sum(vals) / len(vals) * scale
    if len(vals) == 1:
        return f"{m:.{nd}f}"
    sd = math.sqrt(sum((v * scale - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{nd}f} ± {sd:.{nd}f}"


def _mean(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def collect(ws: Path, target: str, methods: list[str], seeds: list[int]) -> dict:
    """Per method and seed: mean Dice, ASSD, HD95 over the target's test subjects; times; selections."""
    met = ws / "metrics" / "chestxray" / target
    out = {"metrics": {}, "times": _load_json(ws / "times.json", {}), "selection": {}}
    for m in methods:
        for k in seeds:
            p = met / (f"{m}.json" if k == 0 else f"{m}.seed{k}.json")
            if p.is_file():
                d = json.loads(p.read_text())
                out["metrics"].setdefault(m, {})[k] = {x: (d.get(x) or {}).get("mean") for x in
                                                       ("dice", "assd", "hd95")}
    for k in seeds:
        sel = _load_json(ws / "selection" / f"seed{k}.json", None)
        if sel is not None:
            out["selection"][k] = sel
    return out


def render_arm(title: str, note: str, directions: list[tuple[str, str, dict]], methods: list[str],
               upper: dict | None = None) -> list[str]:
    """One arm of the study (a profile / source-model setting): per direction, the method table, the label-free
    choice per seed and the rank correlation of each label-free score with the true Dice. ``upper``: per direction,
    the supervised rows of another arm of the same profile, for an arm that does not train its own (the upper bound
    does not depend on the source model)."""
    from siteadapt.steps.select import SCORES, score_correlations

    lines = [f"## {title}", "", note, ""]
    for source, target, data in directions:
        M = data["metrics"]
        if not M:
            continue
        if "supervised" not in M and (upper or {}).get((source, target)):
            M["supervised"] = upper[(source, target)]
            lines += [f"(Supervised rows of {source} -> {target}: the main arm's, same profile and seeds.)", ""]
        sup = {k: v["dice"] for k, v in M.get("supervised", {}).items()}
        noa = {k: v["dice"] for k, v in M.get("noadapt", {}).items()}

        def share(k, d):
            if k not in sup or k not in noa or d is None or sup[k] - noa[k] <= 1e-9:
                return None
            return (d - noa[k]) / (sup[k] - noa[k])

        lines += [f"### {source.capitalize()} -> {target.capitalize()}", "",
                  "| method | seeds | Dice | ASSD | HD95 | gap share | minutes |",
                  "|---|---|---|---|---|---|---|"]
        for m in methods:
            rows = M.get(m, {})
            if not rows:
                continue
            ks = sorted(rows)
            t = data["times"].get(m, {})
            mins = [t[str(k)]["total_s"] / 60 for k in ks if isinstance(t.get(str(k)), dict)]
            lines.append(f"| {m} | {len(ks)} | {_ms([rows[k]['dice'] for k in ks], 100)} | "
                         f"{_ms([rows[k]['assd'] for k in ks], 1, 2)} | {_ms([rows[k]['hd95'] for k in ks], 1, 1)} | "
                         f"{_ms([share(k, rows[k]['dice']) for k in ks], 100, 0)} | {_ms(mins, 1, 1)} |")
        st = data["times"].get("source", {})
        if st:
            lines.append(f"| (source segmenter training) | {len(st)} | | | | | "
                         f"{_ms([v / 60 for v in st.values()], 1, 1)} |")
        if not data["selection"]:
            lines.append("")
            continue
        lines += ["", f"Label-free choice (`siteadapt select`: score `{_first(data, 'score')}`, margin "
                  f"{_first(data, 'margin')} over no adaptation), audited with the target's labels:", "",
                  "| seed | chosen | its Dice | no adaptation | labels' best | regret | gap share | why |",
                  "|---|---|---|---|---|---|---|---|"]
        shares = []
        for k, sel in sorted(data["selection"].items()):
            w = sel["winner"]
            wd = M.get(w, {}).get(k, {}).get("dice")
            best = sel.get("labeled_best")
            bd = M.get(best, {}).get(k, {}).get("dice") if best else None
            sh = share(k, wd)
            shares.append(sh)
            lines.append(f"| {k} | {w} | {_pc(wd)} | {_pc(noa.get(k))} | {best} ({_pc(bd)}) | "
                         f"{_pc(None if bd is None or wd is None else bd - wd)} | {_pc(sh, 0)} | "
                         f"{sel['decision']['reason']} |")
        data["chosen_shares"] = shares
        lines += ["", f"Share of the gap recovered by the label-free choice: mean **{_pc(_mean(shares), 0)}%**, "
                  f"lowest seed {_pc(min([x for x in shares if x is not None], default=None), 0)}%.", "",
                  "Spearman rank correlation of each label-free score with the true target Dice over the candidates "
                  "(no adaptation included):", "",
                  "| score | " + " | ".join(f"seed {k}" for k in sorted(data["selection"])) + " | mean |",
                  "|---|" + "---|" * (len(data["selection"]) + 1)]
        for sc in SCORES:
            vals = [score_correlations(sel).get(sc) for _, sel in sorted(data["selection"].items())]
            lines.append(f"| {sc} | " + " | ".join(_num(v) for v in vals) + f" | {_num(_mean(vals))} |")
        lines.append("")
    return lines


def summarize(directions: list[tuple[str, str, dict]]) -> list[str]:
    """The main arm in one table per direction: the label-free choice against no adaptation and the upper bound
    (what the issue's acceptance asks: share of the gap, never below no adaptation)."""
    lines = ["## Summary (main arm)", "",
             "| direction | seeds | no adaptation | supervised | label-free choice | gap share: mean (lowest seed) | "
             "choice - no adaptation, lowest seed | best method by mean Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for source, target, data in directions:
        M, sels = data["metrics"], data["selection"]
        ks = sorted(k for k in sels if k in M.get("noadapt", {}) and k in M.get("supervised", {}))
        if not ks:
            continue
        noa = [M["noadapt"][k]["dice"] for k in ks]
        sup = [M["supervised"][k]["dice"] for k in ks]
        ch = [M.get(sels[k]["winner"], {}).get(k, {}).get("dice") for k in ks]
        shares = [(c - n) / (s_ - n) if c is not None and s_ - n > 1e-9 else None for c, n, s_ in zip(ch, noa, sup)]
        gains = [c - n for c, n in zip(ch, noa) if c is not None]
        means = {m: _mean([v["dice"] for k, v in rows.items()]) for m, rows in M.items()
                 if m != "supervised" and len(rows) == len(ks)}
        best = max(means, key=lambda m: means[m]) if means else None
        chosen = ", ".join(sorted({sels[k]["winner"] for k in ks}))
        lines.append(f"| {source} -> {target} | {len(ks)} | {_ms(noa, 100)} | {_ms(sup, 100)} | {_ms(ch, 100)} "
                     f"({chosen}) | {_pc(_mean(shares), 0)}% ({_pc(min([x for x in shares if x is not None], default=None), 0)}%) | "
                     f"{_pc(min(gains) if gains else None)} | {best} ({_pc(means.get(best))}) |")
    return lines + [""]


def score_table(selections: list[tuple[str, int, dict]]) -> list[str]:
    """How well each label-free score orders the candidates by their true Dice, over every selection of the study
    (each arm, direction and seed): what ``registry.selection_score`` is picked by."""
    from siteadapt.steps.select import SCORES, score_correlations

    if not selections:
        return []
    rho = {sc: [score_correlations(sel).get(sc) for _, _, sel in selections] for sc in SCORES}
    lines = ["## Which label-free score (registry.selection_score)", "",
             f"Spearman rank correlation with the true target Dice over the candidates of each of the study's "
             f"{len(selections)} selections (every arm, direction and seed; per-selection values in the sections "
             "below):", "", "| score | mean | lowest | selections with rho >= 0.8 |", "|---|---|---|---|"]
    for sc in SCORES:
        v = [x for x in rho[sc] if x is not None]
        lines.append(f"| {sc} | {_num(_mean(v))} | {_num(min(v) if v else None)} | "
                     f"{sum(x >= 0.8 for x in v)} of {len(v)} |")
    return lines + [""]


def _first(data: dict, key: str):
    for sel in data["selection"].values():
        return sel.get("decision", {}).get(key)
    return "—"


def _pc(v, nd: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{nd}f}"


def _num(v) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _git() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# the study's arms: (key, title, profile, robust source, methods, seeds)
ARMS = {
    "main": ("Main arm: the `real2d` profile", "real2d", False, DEFAULT_METHODS, "0-2"),
    "robust": ("Robust source arm: BigAug source segmenter, `real2d`", "real2d", True,
               "noadapt,histmatch,adabn,tent", "0"),
    "gan": ("GAN and adversarial baselines at the `quick` profile (64 px, width 0.125)", "quick", False,
            "supervised,noadapt,histmatch,adabn,adaoutput,cyclegan,seuda,cyuda,sifa", "0"),
}
DIRECTIONS = "shenzhen:montgomery,montgomery:shenzhen"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", type=Path, default=DEFAULT_KIT)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "study-real-cxr")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "study-real-cxr.md")
    ap.add_argument("--arms", default="main,robust,gan", help=f"arms to run: {', '.join(ARMS)}")
    ap.add_argument("--seeds", default=None, help="override the arms' seeds, e.g. 0-2")
    ap.add_argument("--methods", default=None, help="override the arms' methods (comma-separated)")
    ap.add_argument("--directions", default=DIRECTIONS)
    ap.add_argument("--force", action="store_true", help="re-run cells whose metrics exist")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the report from the workspaces")
    ap.add_argument("--select-only", action="store_true",
                    help="train nothing: redo each seed's label-free choice among the methods evaluated with it")
    ap.add_argument("--track", action="store_true", help="log every stage to MLflow (slower)")
    args = ap.parse_args(argv)
    kit, work = args.kit.resolve(), args.work.resolve()
    if not (kit / "shenzhen" / "images").is_dir() or not (kit / "montgomery" / "images").is_dir():
        print(f"study: the real kit is not at {kit} (needs shenzhen/ and montgomery/)", file=sys.stderr)
        return 2
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"study: unknown arm(s) {unknown} (arms: {', '.join(ARMS)})", file=sys.stderr)
        return 2
    if not args.track:
        os.environ["SITEADAPT_TRACKING"] = "off"
    dirs = [tuple(d.split(":")) for d in args.directions.split(",") if d]
    from siteadapt.config import load_settings

    sections, seeds_all, upper, summary, all_selections = [], set(), {}, [], []
    for key in ARMS:  # the report shows every arm with results, in this order; only the chosen arms run
        title, profile, robust, methods, seeds = ARMS[key]
        methods = [m for m in (args.methods or methods).split(",") if m]
        seeds = _seeds(args.seeds or seeds)
        env = {**os.environ, "SITEADAPT_PROFILE": profile}
        os.environ["SITEADAPT_PROFILE"] = profile
        done = []
        for source, target in dirs:
            run_it = key in arms and not args.render_only
            if not run_it and not (work / (f"{source}_to_{target}" + ("_robust" if robust else "")
                                          + ("" if profile == "real2d" else f"_{profile}"))).is_dir():
                continue
            ws = workspace(work, kit, source, target, env, robust=robust)
            if run_it:
                run_direction(ws, source, target, methods, seeds, args.force, args.select_only)
            done.append((source, target, collect(ws, target, methods, seeds)))
            seeds_all |= set(seeds)
        os.chdir(REPO)
        if not done:
            continue
        p = load_settings(REPO / "params.yaml", profile=profile).profile_for("chestxray")
        note = (f"Profile `{profile}`: {p.image_size} px, width {p.width}, batch {p.batch_size}, {p.iterations} "
                f"iterations for segmenters, {p.adapt_iterations} for adaptation methods (times each method's "
                "`iterations_factor`); method options as in params.yaml (`methods:`, `tasks.chestxray.method_options`)"
                + ("; the source segmenter with `bigaug: true`" if robust else "")
                + "; the same settings for both directions. Dice and gap share in % (mean ± std over seeds); ASSD "
                "and HD95 in mm; gap share = (method - no adaptation) / (supervised - no adaptation) per seed, then "
                "the mean; minutes = adapt + predict + evaluate per seed on this machine (2 CPU cores shared by the "
                "two directions' runs), the source segmenter's training in its own row.")
        if key == "main":
            upper = {(a, b): d["metrics"].get("supervised", {}) for a, b, d in done}
            summary = summarize(done)
        sections += render_arm(title, note, done, methods, upper if profile == "real2d" else None)
        all_selections += [(f"{key}: {a} -> {b}", k, sel) for a, b, d in done for k, sel in sorted(d["selection"].items())]
    head = ["# Real chest X-ray study: Shenzhen <-> Montgomery (issue 26)", "",
            f"Generated by `benchmarks/study_real_cxr.py` (`make study-real-cxr`; needs `../shared/data/cxr_lungs`) "
            f"on {_dt.date.today().isoformat()}, git {_git()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores. Each direction is a workspace made as a new user would: a copy of "
            "params.yaml, `siteadapt site add` of both hospitals (1.4 mm pixels), ingest, preprocess, then the "
            "methods. Aggregates over the target's test subjects only: no image, case id or mask of the kit is in "
            "this file.", ""]
    text = "\n".join(head + summary + score_table(all_selections) + sections) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"study report -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
