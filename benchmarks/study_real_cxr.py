"""The real chest X-ray study (issue 26): both directions of the real two-hospital kit, every method, several seeds,
the label-free choice and its regret -> ``docs/study-real-cxr.md``.

    .venv/bin/python benchmarks/study_real_cxr.py [--kit ../shared/data/cxr_lungs] [--seeds 0-2] [--methods ...]
        [--profile real2d] [--work runs/study-real-cxr] [--out docs/study-real-cxr.md] [--render-only]

What it does, as a new user would:

1. One workspace per direction (``<work>/<source>_to_<target>/``): a copy of the repository's params.yaml (the one
   settings file: profiles, methods, gates, selection), then ``siteadapt site add <source> --labels ...`` and
   ``siteadapt site add <target> --labels ... --target-of <source>`` (the target's labels are for evaluation only:
   no adaptation method reads them; ``supervised`` is the upper-bound reference that does), pixel spacing 1.4 mm
   (the kit's PNGs carry none; 256 px over ~36 cm). Then ``ingest`` and ``preprocess`` of both sites.
2. Per seed: the source segmenter of that seed, then every method with that seed (adapt, predict, evaluate), kept
   when its metrics file exists (a rerun continues where it stopped).
3. Per seed: ``siteadapt select``'s label-free choice among the adapted candidates (``noadapt`` always among them),
   with every label-free score recorded; the labels only audit it (regret).
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
DEFAULT_METHODS = ("supervised,noadapt,histmatch,adabn,tent,fda,selftrain,selftrain_hm,"
                   "cyclegan,seuda,cyuda,sifa,adaoutput")


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
    ws = work / (f"{source}_to_{target}" + ("_robust" if robust else ""))
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


def run_direction(ws: Path, source: str, target: str, methods: list[str], seeds: list[int], force: bool) -> None:
    """Train, adapt, evaluate and select in ``ws`` (in-process, with the workspace as the current folder)."""
    from siteadapt import tracking
    from siteadapt.config import load_settings
    from siteadapt.steps.evaluate import metrics_path
    from siteadapt.steps.select import select, write_selection
    from siteadapt.steps.train import build_method, method_options, model_dir, source_model_path

    os.chdir(ws)
    s = load_settings("params.yaml")
    times_path = ws / "times.json"
    times = _load_json(times_path, {})
    prof = s.profile_for("chestxray").model_dump()

    def fingerprint(name: str, site: str) -> str:
        _, raw, _, _ = method_options(s, name, site)
        return json.dumps({"options": raw, "profile": prof}, sort_keys=True, default=str)

    for k in seeds:
        src = source_model_path(s, source, k)
        src_fp = fingerprint("source", source)
        stale_source = (times.get("source_fp", {}).get(str(k)) != src_fp)
        if not src.is_file() or stale_source or force:
            if src.is_file():
                shutil.rmtree(src.parent)  # other settings: the chain of this seed starts again
            t0 = time.perf_counter()
            tracking.train_source(s, source, seed=k)
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
            tracking.adapt(s, target, m, source=source, seed=k)
            t_adapt = time.perf_counter() - t0
            tracking.evaluate(s, target, m, seed=k, predict=True)
            times.setdefault(m, {})[str(k)] = {"adapt_s": t_adapt, "total_s": time.perf_counter() - t0,
                                               "fingerprint": fp}
            _save_json(times_path, times)
            d = json.loads(done.read_text())["dice"]["mean"]
            print(f"[{source}->{target}] {m} seed {k}: Dice {100 * d:.1f} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        adapted = [m for m in methods if not build_method(s, m, target).trains_on_target_labels]
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


def render(directions: list[tuple[str, str, dict]], methods: list[str], seeds: list[int], profile: str,
           settings_note: str) -> str:
    from siteadapt.steps.select import SCORES, score_correlations

    lines = ["# Real chest X-ray study: Shenzhen <-> Montgomery (issue 26)", "",
             f"Generated by `benchmarks/study_real_cxr.py` on {_dt.date.today().isoformat()} "
             f"(git {_git()}, Python {platform.python_version()}, {os.cpu_count()} CPU cores), profile "
             f"`{profile}`, seeds {', '.join(map(str, seeds))}. Rebuild: `make study-real-cxr` (needs "
             "`../shared/data/cxr_lungs`). Aggregates over the target's test subjects only: no image, case id or "
             "mask of the kit is in this file.", "", settings_note, ""]
    for source, target, data in directions:
        M = data["metrics"]
        sup = {k: v["dice"] for k, v in M.get("supervised", {}).items()}
        noa = {k: v["dice"] for k, v in M.get("noadapt", {}).items()}

        def share(k, d):
            if k not in sup or k not in noa or d is None or sup[k] - noa[k] <= 1e-9:
                return None
            return (d - noa[k]) / (sup[k] - noa[k])

        lines += [f"## {source.capitalize()} -> {target.capitalize()}", "",
                  "Dice and share of the gap: % (mean ± std over seeds); ASSD, HD95: mm; gap share: "
                  "(method - no adaptation) / (supervised - no adaptation), per seed, then the mean; minutes: "
                  "adapt + predict + evaluate per seed on this machine (the source segmenter's training is counted "
                  "once, in its own row).", "",
                  "| method | seeds | Dice | ASSD | HD95 | gap share | minutes |",
                  "|---|---|---|---|---|---|---|"]
        for m in methods:
            rows = M.get(m, {})
            if not rows:
                continue
            ks = sorted(rows)
            t = data["times"].get(m, {})
            mins = [t[str(k)]["total_s"] / 60 for k in ks if str(k) in t]
            lines.append(f"| {m} | {len(ks)} | {_ms([rows[k]['dice'] for k in ks], 100)} | "
                         f"{_ms([rows[k]['assd'] for k in ks], 1, 2)} | {_ms([rows[k]['hd95'] for k in ks], 1, 1)} | "
                         f"{_ms([share(k, rows[k]['dice']) for k in ks], 100, 0)} | {_ms(mins, 1, 1)} |")
        st = data["times"].get("source", {})
        if st:
            lines.append(f"| (source segmenter training) | {len(st)} | | | | | {_ms([v / 60 for v in st.values()], 1, 1)} |")
        lines += ["", "Label-free choice (`siteadapt select`, the settings of params.yaml: score "
                  f"`{_first(data, 'score')}`, margin {_first(data, 'margin')} over no adaptation) per seed, "
                  "audited with the target's labels:", "",
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
        lines += ["", f"Mean share of the gap recovered by the label-free choice: **{_pc(_mean(shares), 0)}%**; "
                  f"lowest seed: {_pc(min([s for s in shares if s is not None], default=None), 0)}%.", ""]
        lines += ["Rank correlation (Spearman) of each label-free score with the true target Dice over the "
                  "candidates (no adaptation included), per seed:", "",
                  "| score | " + " | ".join(f"seed {k}" for k in sorted(data["selection"])) + " | mean |",
                  "|---|" + "---|" * (len(data["selection"]) + 1)]
        for sc in SCORES:
            vals = [score_correlations(sel).get(sc) for _, sel in sorted(data["selection"].items())]
            lines.append(f"| {sc} | " + " | ".join(_num(v) for v in vals) + f" | {_num(_mean(vals))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", type=Path, default=DEFAULT_KIT)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "study-real-cxr")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "study-real-cxr.md")
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--profile", default="real2d")
    ap.add_argument("--directions", default="shenzhen:montgomery,montgomery:shenzhen")
    ap.add_argument("--force", action="store_true", help="re-run cells whose metrics exist")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the report from the workspaces")
    ap.add_argument("--track", action="store_true", help="log every stage to MLflow (slower)")
    ap.add_argument("--robust-source", action="store_true",
                    help="the arm whose source segmenter trains with BigAug (its own workspaces and report section)")
    args = ap.parse_args(argv)
    kit, work = args.kit.resolve(), args.work.resolve()
    if not (kit / "shenzhen" / "images").is_dir() or not (kit / "montgomery" / "images").is_dir():
        print(f"study: the real kit is not at {kit} (needs shenzhen/ and montgomery/)", file=sys.stderr)
        return 2
    seeds = _seeds(args.seeds)
    methods = [m for m in args.methods.split(",") if m]
    os.environ["SITEADAPT_PROFILE"] = args.profile
    if not args.track:
        os.environ["SITEADAPT_TRACKING"] = "off"
    env = dict(os.environ)
    dirs = [tuple(d.split(":")) for d in args.directions.split(",") if d]
    done = []
    for source, target in dirs:
        ws = workspace(work, kit, source, target, env, robust=args.robust_source)
        if not args.render_only:
            run_direction(ws, source, target, methods, seeds, args.force)
        done.append((source, target, collect(ws, target, methods, seeds)))
    os.chdir(REPO)
    from siteadapt.config import load_settings

    s = load_settings(REPO / "params.yaml", profile=args.profile)
    p = s.active
    note = (f"Profile `{args.profile}`: {p.image_size} px, width {p.width}, batch {p.batch_size}, {p.iterations} "
            f"iterations for segmenters, {p.adapt_iterations} for adaptation methods (times each method's "
            "`iterations_factor`); method options as in params.yaml (`methods:` and `tasks.chestxray.method_options`)"
            "; the same settings for both directions.")
    text = render(done, methods, seeds, args.profile, note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"study report -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
