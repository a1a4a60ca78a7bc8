"""Command line: ``siteadapt <step> ...``. Each step is a thin wrapper over a function in :mod:`siteadapt.steps`.

Settings come from params.yaml (``--params``), with the profile from ``--profile`` / ``$SITEADAPT_PROFILE`` / the file.
Errors that siteadapt raises on purpose are printed as one clear line (file and reason) with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import SiteadaptError

log = logging.getLogger("siteadapt")


def _settings(args):
    from .config import load_settings

    return load_settings(args.params, profile=args.profile)


def cmd_synth(args) -> int:
    from .data.synth import TASKS, synthesize

    s = _settings(args)
    tasks = TASKS if args.task == "all" else [args.task]
    out = Path(args.out) if args.out else s.paths.raw
    for task in tasks:
        t0 = time.perf_counter()
        summary = synthesize(task, out, seed=s.seed if args.seed is None else args.seed,
                             n_subjects=args.subjects or s.active.synth_subjects,
                             n_images=args.images or s.synth_images(task),
                             scale=args.scale or s.active.synth_scale)
        parts = ", ".join(f"{k}: {v.get('n')} {v.get('format')}" for k, v in summary.items())
        log.info("synth %s -> %s/%s (%s) in %.1f s", task, out, task, parts, time.perf_counter() - t0)
    return 0


def cmd_ingest(args) -> int:
    from .steps.ingest import ingest

    s = _settings(args)
    site = s.site(args.site)
    source = Path(args.source) if args.source else site.images
    labels = Path(args.labels) if args.labels else site.labels
    if args.no_labels:
        labels = None
    task = s.task_of(args.site)
    res = ingest(source, args.site, Path(args.data_root) if args.data_root else s.paths.ingested,
                 labels=labels, modality=args.modality or site.modality, pixel_spacing_mm=site.pixel_spacing_mm,
                 classes=task.classes if task.kind == "classification" else None)
    print(f"{args.site}: {len(res.items)} items ({len(res.written)} written, {len(res.skipped)} unchanged), "
          f"{len(res.rejected)} inputs not used -> {res.out_dir / 'manifest.json'}")
    return 0


def cmd_preprocess(args) -> int:
    from .steps.preprocess import preprocess

    s = _settings(args)
    res = preprocess(s, args.site)
    print(f"{args.site}: {res['summary']}")
    return 0


def cmd_train_source(args) -> int:
    from .steps.train import train_source

    path = train_source(_settings(args), args.site, seed=args.seed)
    print(f"source model -> {path}")
    return 0


def cmd_adapt(args) -> int:
    from .steps.train import adapt

    path = adapt(_settings(args), args.site, args.method, source=args.source, seed=args.seed)
    print(f"{args.method} adapted to {args.site} -> {path}")
    return 0


def cmd_predict(args) -> int:
    from .steps.train import predict

    out = predict(_settings(args), args.site, args.method, splits=tuple(args.splits.split(",")), seed=args.seed)
    print(f"predictions -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .steps.evaluate import evaluate

    path = evaluate(_settings(args), args.site, args.method, seed=args.seed)
    print(f"metrics -> {path}")
    return 0


def cmd_report(args) -> int:
    from .steps.report import report

    written = report(_settings(args))
    for task, path in written.items():
        print(f"{task}: {path}")
    if not written:
        print("no evaluated methods found")
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded synthetic sites: every stage, every task, then the tables."""
    from .steps.pipeline import run_all

    s = _settings(args)
    t0 = time.perf_counter()
    out = run_all(s, tasks=args.tasks.split(",") if args.tasks else None)
    total = time.perf_counter() - t0
    print("\n== siteadapt demo finished in %.0f s (profile %s) ==" % (total, s.profile))
    for name, secs in out["timings"].items():
        print(f"  {name:40s} {secs:7.1f} s")
    for task, table in out["reports"].items():
        print(f"\n--- {table} ---")
        print(table.read_text())
    print(f"tables:   {s.paths.reports}/<task>/table.md (.csv, .tex)")
    print(f"figures:  {s.paths.reports}/<task>/figures/ and overlays/")
    print(f"metrics:  {s.paths.metrics}/<task>/<site>/<method>.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siteadapt", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="settings file (default: ./params.yaml)")
    p.add_argument("--profile", default=None, help="settings profile (quick, paper, ...)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("synth", help="write the embedded synthetic hospital sites of a task")
    sp.add_argument("--task", required=True, choices=["cardiac", "chestxray", "pneumonia", "all"])
    sp.add_argument("--out", default=None, help="output folder (default: paths.raw)")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--subjects", type=int, default=None, help="3D subjects per site (default: profile)")
    sp.add_argument("--images", type=int, default=None, help="2D images per site (default: profile)")
    sp.add_argument("--scale", type=float, default=None, help="matrix-size factor (default: profile)")
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("ingest", help="DICOM/NIfTI/2D images -> de-identified NIfTI + manifest")
    sp.add_argument("source", nargs="?", default=None, help="input folder (default: the site's `images` in params)")
    sp.add_argument("--site", required=True)
    sp.add_argument("--labels", default=None, help="label folder, or labels CSV (stem,label) of a classification "
                                                   "site (default: the site's `labels` in params)")
    sp.add_argument("--no-labels", action="store_true", help="ingest images only")
    sp.add_argument("--data-root", default=None, help="output root (default: paths.ingested)")
    sp.add_argument("--modality", default=None, help="modality for NIfTI/2D inputs (CT, MR, CR, DX, ...)")
    sp.set_defaults(func=cmd_ingest)

    sp = sub.add_parser("preprocess", help="reorient, resample, crop, normalize, slice, split")
    sp.add_argument("--site", required=True)
    sp.set_defaults(func=cmd_preprocess)

    sp = sub.add_parser("train-source", help="train the source segmenter (or classifier) on a labeled site")
    sp.add_argument("--site", required=True)
    sp.add_argument("--seed", type=int, default=None)
    sp.set_defaults(func=cmd_train_source)

    sp = sub.add_parser("adapt", help="adapt to a target site with a method (no target labels)")
    sp.add_argument("--site", required=True, help="target site")
    sp.add_argument("--method", required=True)
    sp.add_argument("--source", default=None, help="source site, when several directions end at the target")
    sp.add_argument("--seed", type=int, default=None)
    sp.set_defaults(func=cmd_adapt)

    sp = sub.add_parser("predict", help="write label maps on each target subject's original grid (classification: "
                                        "class scores of the val and test images)")
    sp.add_argument("--site", required=True)
    sp.add_argument("--method", required=True)
    sp.add_argument("--splits", default="test", help="comma-separated splits to predict (default: test)")
    sp.add_argument("--seed", type=int, default=None)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("evaluate", help="metrics of a method's predictions on a site's labeled test subjects")
    sp.add_argument("--site", required=True)
    sp.add_argument("--method", required=True)
    sp.add_argument("--seed", type=int, default=None, help="seed tag of the run (default: params seed)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("report", help="paper-style tables and figures from every evaluated method")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("demo", help="run the main job on the embedded synthetic sites")
    sp.add_argument("--tasks", default=None, help="comma-separated tasks (default: all with sites)")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except SiteadaptError as e:
        print(f"siteadapt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
