"""Command line: ``siteadapt <step> ...``, one thin command per pipeline step.

Each pipeline command parses its options and calls one step function of :mod:`siteadapt.steps.api` (the same
function the Kubeflow components and ``siteadapt demo`` call; the tracked steps open their MLflow run there). The DVC
stages in dvc.yaml (``siteadapt dvc-gen``) call these commands.

Settings come from params.yaml (``--params``), with the profile from ``--profile`` / ``$SITEADAPT_PROFILE`` / the file.
Errors that siteadapt raises on purpose are printed as one clear line (file and reason); the exit status is the
error's ``exit_code`` (2 unless the error class has its own: the scheme is in :mod:`siteadapt.errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import redact
from .errors import ConfigError, SiteadaptError
from .redact import error_line

log = logging.getLogger("siteadapt")


def _settings(args):
    from .config import load_settings

    if os.environ.get("DVC_STAGE") and (args.profile or os.environ.get("SITEADAPT_PROFILE")):
        # DVC tracks params.yaml's `profile`; another profile here would make its records lie
        raise ConfigError(f"DVC stage {os.environ['DVC_STAGE']}: the profile comes from params.yaml under DVC; unset "
                          "SITEADAPT_PROFILE / --profile and use `dvc exp run -S profile=NAME` (or edit params.yaml)")
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
    """Ingest a site; label maps are checked against the task's ids after the site's ``label_map`` (exit 4 when one
    holds other values), and a site with nothing usable exits 3 after writing its manifest (errors.py: exit codes)."""
    from .steps import api

    s = _settings(args)
    site = s.site(args.site)
    labels = None if args.no_labels else (args.labels if args.labels else api.FROM_PARAMS)
    if args.explain:  # local lookup of refused inputs: printed here, never written anywhere
        from .steps.ingest import explain

        source, labels = api.ingest_inputs(s, args.site, args.source, labels)
        data_root = Path(args.data_root) if args.data_root else s.paths.ingested
        for r in explain(source, args.site, data_root, labels=labels, patients=site.patients):
            print(f"{r['file']}  {r['in']} {r['position']}  {r['path'] or '(no local file with this reference)'}  "
                  f"{r['reason']}")
        return 0
    res = api.ingest(s, args.site, images=args.source, labels=labels, modality=args.modality,
                     data_root=args.data_root)
    print(f"{args.site}: {len(res.items)} items ({len(res.written)} written, {len(res.skipped)} unchanged), "
          f"{len(res.rejected)} inputs not used -> {res.out_dir / 'manifest.json'}")
    return 0


def cmd_pull(args) -> int:
    """Mirror a site's images (and labels) held on a PACS (``dicomweb+http(s)://``) or an object store into
    ``paths.remote/<site>/`` without ingesting: only series/objects not fetched before (the DVC ``pull`` stage)."""
    from . import storage

    s = _settings(args)
    site = s.site(args.site)
    if not storage.is_uri(str(site.images)) and not str(site.images).startswith("dicomweb+"):
        raise ConfigError(f"sites.{args.site}.images: a local folder; pull is for PACS and object-store sites")
    got = storage.materialize(site.images, s.paths.remote / args.site / "images")
    n = sum(1 for p in got.rglob("*") if p.is_file())
    if site.labels is not None and str(site.labels) != str(site.images):
        storage.materialize(site.labels, s.paths.remote / args.site / "labels")
    print(f"{args.site}: {n} files in the local mirror {got}")
    return 0


def cmd_preprocess(args) -> int:
    from .steps import api

    res = api.preprocess(_settings(args), args.site, roi_rule=args.roi_rule)
    print(f"{args.site}: {res['summary']}")
    return 0


def cmd_train_source(args) -> int:
    from .steps import api

    path = api.train_source(_settings(args), args.site, seed=args.seed)
    print(f"source model -> {path}")
    return 0


def cmd_adapt(args) -> int:
    from .steps import api

    path = api.adapt(_settings(args), args.site, args.method, source=args.source, seed=args.seed)
    print(f"{args.method} adapted to {args.site} -> {path}")
    return 0


def cmd_predict(args) -> int:
    from .steps import api

    out = api.predict(_settings(args), args.site, args.method, splits=tuple(args.splits.split(",")), seed=args.seed)
    print(f"predictions -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .steps import api

    path = api.evaluate(_settings(args), args.site, args.method, seed=args.seed, predict=args.predict)
    print(f"metrics -> {path}")
    return 0


def _seed_list(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "0,3,7" -> [0, 3, 7]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a list like 0-4 or 0,1,2") from None
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"--seeds {text!r}: expected distinct seeds")
    return out


def cmd_study(args) -> int:
    """The seed study: adapt + evaluate each method with each seed (runs whose metrics exist are kept unless
    --force), then the report (its "Stability over seeds" section). A method built on the source model uses the
    source model trained with the same seed (trained here when missing), so `noadapt` gets a spread too."""
    from .layout import metrics_path, source_model_path
    from .methods.build import build_method
    from .steps import api

    s = _settings(args)
    seeds = _seed_list(args.seeds)
    methods = [m for m in args.methods.split(",") if m]
    t_all = time.perf_counter()
    for m in methods:
        for k in seeds:
            done = metrics_path(s, args.site, m, k)
            if done.is_file() and not args.force:
                print(f"{m} seed {k}: kept ({done})")
                continue
            t0 = time.perf_counter()
            src = s.direction_to(args.site, args.source).source
            if build_method(s, m, args.site).needs_source_model and not source_model_path(s, src, k).is_file():
                api.train_source(s, src, seed=k)  # seed k varies the whole chain: source model, then the method
            api.adapt(s, args.site, m, source=args.source, seed=k)
            api.evaluate(s, args.site, m, seed=k, predict=True)
            print(f"{m} seed {k}: {time.perf_counter() - t0:.0f} s -> {done}", flush=True)
    written = api.report(s)
    print(f"study finished in {time.perf_counter() - t_all:.0f} s; tables: "
          + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_report(args) -> int:
    from .steps import api

    s = _settings(args)
    written = api.report(s)
    for task, path in written.items():
        print(f"{task}: {path}")
    if not written:
        print("no evaluated methods found")
    if args.experiments:
        from .steps.ablation import dvc_experiments, write_experiment_tables

        for task, path in write_experiment_tables(s, dvc_experiments()).items():
            print(f"{task} experiments: {path}")
    return 0


def cmd_register(args) -> int:
    from .steps import api

    res = api.register(_settings(args), args.site, args.method, seed=args.seed)
    print(f"{res['name']} version {res['version']} (alias {res['alias']}), run {res['run_id']}")
    return 0


def cmd_select(args) -> int:
    """Rank the target's adapted models (label-free by default), write registry/<task>/<site>/selection.json and,
    with --register, register the winner as the site's candidate with the selection tags."""
    from .steps import api
    from .steps.select import MEASURE, selection_path

    s = _settings(args)
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    res = api.select(s, args.site, methods=methods, selection=args.selection, score=args.score, margin=args.margin,
                     seed=args.seed, register=args.register)
    measure = MEASURE[res["kind"]]
    print(f"{args.site}: rule {res['rule']} ({res['rule_text']})")
    for r in res["methods"]:
        drop = r.get(f"source_{measure}_drop")
        gates = "passed" if r["gates_passed"] else "FAILED " + ",".join(g["name"] for g in r["gates"]
                                                                         if not g["passed"])
        labeled = r.get(f"target_{measure}")
        print(f"  {r['rank']}. {r['method']:24s} score {_fmt(r['score'])}  entropy {_fmt(r.get('entropy'))}  "
              f"consistency {_fmt(r.get('consistency'))}  agreement {_fmt(r.get('agreement'))}  "
              f"source {measure} drop {_fmt(drop)}  gates {gates}"
              + (f"  (target {measure} {_fmt(labeled)})" if labeled is not None else ""))
    for e in res["excluded"]:
        print(f"  -  {e['method']:24s} excluded: {e['reason']}")
    if res.get("labeled_best"):
        print(f"labels would pick {res['labeled_best']}; regret of the choice: "
              f"{_fmt(res[f'regret_{measure}'])} {measure}")
    if res.get("decision"):
        print(f"why: {res['decision']['reason']}")
    path = selection_path(s, args.site)
    reg = res.get("registered")
    if reg:
        print(f"{reg['name']} version {reg['version']} (alias {reg['alias']}): {res['winner']}")
    print(f"candidate: {res['winner']}" + (" (no method passed the label-free gates)" if res["fallback"] else "")
          + f" -> {path}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def cmd_promote(args) -> int:
    """Promote the site's candidate (exit 0 promoted, 1 refused by a gate, 2 a gate policy that does not verify, 5
    the version's recorded gates looser than the gate policy, or gates looser than recorded without an override),
    or with --check verify the champion's promotion record and its policy (exit 0 verified, 6 not)."""
    from .errors import UnverifiedChampionError
    from .registry.gates import format_gate
    from .registry.policy import policy_label
    from .registry.promote import promote
    from .registry.verify import verify_champion

    s = _settings(args)
    if args.check:
        v = verify_champion(s, args.site, task=args.task)
        if not v["verified"]:
            raise UnverifiedChampionError(f"{v['name']} champion (version {v['version']}) is NOT verified: "
                                          + "; ".join(v["problems"]))
        r = v["record"]
        print(f"{v['name']} champion version {v['version']} verified: promoted by {r['by']} ({r['identity_source']}) "
              f"at {r['at']}" + (" with a gate override" if r.get("override") else "")
              + (f" under {policy_label(r['policy'])}" if r.get("policy") else ""))
        return 0
    res = promote(s, args.site, task=args.task, actor=args.actor, reason=args.reason,
                  override_gates=args.override_gates)
    task = args.task or s.site(args.site).task
    if res.get("policy"):
        print(f"  policy: {policy_label(res['policy'])}")
    if res.get("override"):
        print("  gates OVERRIDDEN (recorded on the version): " + ", ".join(
            f"{g['gate']} {g['recorded']} -> {g['requested']}" for g in res["override"]["gates"])
              if isinstance(res["override"]["gates"], list) else "  no recorded gates: OVERRIDDEN (recorded)")
    for g in res["gates"]:
        print(f"  gate {format_gate(g)}")
    if not res["gates"]:
        print("  (no gate applies: every gate that applies is off in registry.gates)")
    if res["promoted"]:
        print(f"siteadapt-{task}-{args.site} version {res['version']} is now 'champion'")
        return 0
    failed = [g for g in res["gates"] if not g["passed"]]
    for g in failed:
        v = "missing" if g["value"] is None else f"{g['value']:.4f}"
        print(f"siteadapt promote: refused: gate {g['name']} failed with value {v} (threshold {g['threshold']})",
              file=sys.stderr)
    print(f"siteadapt-{task}-{args.site} version {res['version']} stays 'candidate'"
          + (f" (under {policy_label(res['policy'])})" if res.get("policy") else ""), file=sys.stderr)
    return 1


def cmd_policy(args) -> int:
    """Admin gate policy of a site's registered model: ``set`` writes params.yaml's registry.gates as the next policy
    version (HMAC-signed with $SITEADAPT_PROMOTION_KEY when set), ``show`` prints the policy promote applies now
    (exit 2 when it does not verify)."""
    import json

    from .errors import RegistryError
    from .registry.policy import policy_in_force, policy_label, set_policy

    s = _settings(args)
    if args.action == "set":
        doc = set_policy(s, args.site, task=args.task)
        print(f"{doc['name']}: gate policy v{doc['version']} set by {doc['set_by']} ({doc['identity_source']}) at "
              f"{doc['set_at']}, {doc['digest_alg']} {doc['digest'][:12]}")
        if doc["previous"] is not None:
            changed = {k: (doc["previous"].get(k), v) for k, v in doc["gates"].items() if doc["previous"].get(k) != v}
            print("  changed: " + (", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "nothing"))
        print("  gates: " + json.dumps(doc["gates"], sort_keys=True))
        return 0
    p = policy_in_force(s, args.site, task=args.task)
    print(f"{p['name']}: {policy_label(p)}" + (f", set by {p['set_by']} at {p['set_at']}" if p.get("set_by") else "")
          + ("" if p["source"] == "admin" else " (no admin policy: promote applies the promoter's registry.gates)"))
    print("  gates: " + json.dumps(p["gates"], sort_keys=True))
    if p["problem"]:
        raise RegistryError(f"{p['name']}: {p['problem']}")
    return 0


def cmd_dvc_gen(args) -> int:
    from . import dvcgen

    s = _settings(args)
    if args.check:
        msg = dvcgen.check(s, args.params, args.out)
        if msg:
            print(f"siteadapt dvc-gen: {msg}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date with {args.params}")
        return 0
    changed = dvcgen.write(s, args.params, args.out)
    print(f"{args.out} {'written' if changed else 'unchanged'}")
    return 0


def cmd_site_add(args) -> int:
    """Add a site (and its direction with --target-of) to params.yaml, then regenerate dvc.yaml; nothing is written
    when a check fails (steps/site.py)."""
    from .steps.site import add_site

    res = add_site(args.params, args.name, task=args.task, images=args.images, labels=args.labels,
                   pixel_spacing_mm=args.pixel_spacing, target_of=args.target_of, modality=args.modality,
                   patients=args.patients, dvc_out=args.out, profile=args.profile)
    for w in res.warnings:
        print(f"siteadapt site add: warning: {w}", file=sys.stderr)
    found = f" ({res.scan.describe()})" if res.scan is not None else ""
    print(f"site {res.name} added to {args.params}{found}"
          + (f"; direction {res.direction['source']} -> {res.name}" if res.direction else ""))
    print(f"dvc.yaml {'written' if res.dvc_changed else 'unchanged'}; next: `dvc repro` (or `siteadapt ingest --site "
          f"{res.name}`)")
    return 0


def cmd_summary(args) -> int:
    """Where the demo's results are (tables, figures, metrics, MLflow)."""
    from .tracking import ui_command

    s = _settings(args)
    tables = sorted(s.paths.reports.glob("*/table.md"))
    for t in tables:
        print(f"\n--- {t} ---")
        print(t.read_text())
    print("== where to look ==")
    print(f"tables:    {s.paths.reports}/<task>/table.md (.csv, .tex); ablations: {s.paths.reports}/<task>/ablation.md")
    print(f"figures:   {s.paths.reports}/<task>/figures/ (curves, translations, overlays side by side) and "
          f"{s.paths.reports}/<task>/overlays/")
    print(f"metrics:   {s.paths.metrics}/<task>/<site>/<method>.json   (dvc metrics show)")
    print(f"registry:  {s.paths.registry}/<task>/<site>/<method>.json, the candidate choice in "
          f"{s.paths.registry}/<task>/<site>/selection.json; promote with `siteadapt promote --site SITE`")
    print(f"MLflow:    {ui_command()}   (then http://127.0.0.1:5000)")
    if not tables:
        print("no tables yet: run `dvc repro` (or `make demo`)")
    return 0


def cmd_export(args) -> int:
    from .steps.export import export

    refused = redact.inline_secret_message("--stow", args.stow, "dicomweb") if args.stow else None
    if refused:  # before any work: the URI would reach the HTTP client, messages and logs
        raise ConfigError(refused)
    s = _settings(args)
    res = export(s, args.site, args.method, fmt=args.format, out=args.out, stow=args.stow,
                 model_version=args.model_version, seed=args.seed)
    stored = f", {res['stored']} stored over STOW-RS" if args.stow else ""
    print(f"{args.site}/{args.method}: {len(res['subjects'])} DICOM SEG ({res['version']}) -> {res['out']}{stored}")
    return 0


def cmd_sync(args) -> int:
    from .storage import sync

    res = sync(args.src, args.dst)
    print(redact.redact_text(f"{args.src} -> {args.dst}: {res}"))
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded synthetic sites: every stage of the tasks of ``pipeline.tasks`` (or
    ``--tasks``), then the tables."""
    from .steps.pipeline import run_all

    s = _settings(args)
    t0 = time.perf_counter()
    out = run_all(s, tasks=args.tasks.split(",") if args.tasks else None)
    total = time.perf_counter() - t0
    print("\n== siteadapt demo finished in %.0f s (profile %s) ==" % (total, s.profile))
    for name, secs in out["timings"].items():
        print(f"  {name:40s} {secs:7.1f} s")
    for site, reg in out["registered"].items():
        print(f"  candidate of {site}: " + (f"{reg['name']} version {reg['version']} (alias {reg['alias']})"
                                            if "version" in reg else f"{reg['winner']} (tracking off: not registered)"))
    for task, table in out["reports"].items():
        print(f"\n--- {table} ---")
        print(table.read_text())
    print(f"tables:   {s.paths.reports}/<task>/table.md (.csv, .tex)")
    print(f"figures:  {s.paths.reports}/<task>/figures/ and overlays/")
    print(f"metrics:  {s.paths.metrics}/<task>/<site>/<method>.json")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors redacted (they quote the offending argument, which may be a URI with
    credentials); subcommand parsers are of the same class."""

    def error(self, message):
        super().error(redact.redact_text(message))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="siteadapt", description=__doc__.splitlines()[0])
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
    sp.add_argument("--explain", action="store_true",
                    help="ingest nothing: print the manifest's refused inputs with their local file (re-hashed with "
                         "the de-identification key); for this machine's terminal only")
    sp.set_defaults(func=cmd_ingest)

    sp = sub.add_parser("pull", help="mirror a PACS (dicomweb+http://...) or object-store site locally, no ingest")
    sp.add_argument("--site", required=True)
    sp.set_defaults(func=cmd_pull)

    sp = sub.add_parser("preprocess", help="reorient, resample, crop, normalize, slice, split")
    sp.add_argument("--site", required=True)
    sp.add_argument("--roi-rule", default=None, choices=["labels", "foreground"],
                    help="the crop rule the caller expects for this site (dvc.yaml passes it); a different rule from "
                         "params.yaml is an error (the site's source/target role changed: regenerate dvc.yaml)")
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
    sp.add_argument("--predict", action="store_true", help="write the predictions first (what the DVC stage does)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("study", help="seed study: adapt + evaluate methods with several seeds, then the report")
    sp.add_argument("--site", required=True, help="target site")
    sp.add_argument("--methods", required=True, help="comma-separated methods or variants, e.g. cyuda,seuda")
    sp.add_argument("--seeds", default="0-4", help="seeds: 0-4 (default) or 0,1,2")
    sp.add_argument("--source", default=None, help="source site when several directions end at --site")
    sp.add_argument("--force", action="store_true", help="re-run seeds whose metrics exist")
    sp.set_defaults(func=cmd_study)

    sp = sub.add_parser("register", help="register an adapted model in the MLflow registry (alias 'candidate')")
    sp.add_argument("--site", required=True, help="target site")
    sp.add_argument("--method", required=True)
    sp.add_argument("--seed", type=int, default=None)
    sp.set_defaults(func=cmd_register)

    sp = sub.add_parser("select", help="rank a target's adapted models and pick its candidate (label-free by "
                                       "default); --register registers it")
    sp.add_argument("--site", required=True, help="target site")
    sp.add_argument("--methods", default=None, help="comma-separated methods or variants (default: the task's "
                                                    "methods; label-trained references are never candidates)")
    sp.add_argument("--selection", choices=("label_free", "labels", "auto"), default=None,
                    help="rule (default: params registry.selection)")
    sp.add_argument("--register", action="store_true", help="register the winner (alias 'candidate') with the "
                                                            "selection as tags")
    sp.add_argument("--score", choices=("consistency", "entropy", "agreement", "tta_entropy"), default=None,
                    help="label-free score that ranks the candidates (default: params registry.selection_score)")
    sp.add_argument("--margin", type=float, default=None,
                    help="how much an adapted model's score must beat no adaptation's (default: params "
                         "registry.selection_margin)")
    sp.add_argument("--seed", type=int, default=None, help="seed of the runs compared (default: params seed)")
    sp.set_defaults(func=cmd_select)

    sp = sub.add_parser("promote", help="move alias 'champion' to the site's candidate if the gates pass")
    sp.add_argument("--site", required=True)
    sp.add_argument("--task", default=None, help="task of the registered model (default: the site's task)")
    sp.add_argument("--actor", default=None, help="a display note recorded beside the identity "
                                                  "(promotion.actor_note; default: $SITEADAPT_ACTOR); the identity "
                                                  "is $MLFLOW_TRACKING_USERNAME, else the OS user")
    sp.add_argument("--reason", default=None, help="why (recorded as a tag; required with --override-gates)")
    sp.add_argument("--override-gates", action="store_true",
                    help="promote with gates looser than those recorded at registration (needs --reason; who, when, "
                         "which gates and why are recorded on the version)")
    sp.add_argument("--check", action="store_true", help="promote nothing: verify that the champion carries a "
                                                         "matching siteadapt promotion record (exit 6 if not)")
    sp.set_defaults(func=cmd_promote)

    sp = sub.add_parser("policy", help="admin: the gate policy of a site's registered model (`set` from params.yaml "
                                       "registry.gates, `show`)")
    sp.add_argument("action", choices=["set", "show"])
    sp.add_argument("--site", required=True)
    sp.add_argument("--task", default=None, help="task of the registered model (default: the site's task)")
    sp.set_defaults(func=cmd_policy)

    sp = sub.add_parser("report", help="paper-style tables and figures from every evaluated method")
    sp.add_argument("--experiments", action="store_true",
                    help="also tabulate DVC experiments (`dvc exp show`) into <reports>/<task>/experiments.md")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("dvc-gen", help="write dvc.yaml from params.yaml (sites x methods stages)")
    sp.add_argument("--out", default="dvc.yaml")
    sp.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is not what params.yaml gives")
    sp.set_defaults(func=cmd_dvc_gen)

    sp = sub.add_parser("site", help="manage the sites of params.yaml (`site add NAME ...`)")
    site_sub = sp.add_subparsers(dest="site_command", required=True)
    sp = site_sub.add_parser("add", help="add a site (and its adaptation direction) to params.yaml, then regenerate "
                                         "dvc.yaml; checks everything first and writes nothing on an error")
    sp.add_argument("name", help="site name: letters, digits, '_' (never a patient's name or id)")
    sp.add_argument("--task", required=True, help="task of the site (tasks: in params.yaml)")
    sp.add_argument("--images", required=True, help="folder of DICOM/NIfTI/2D images, or s3://bucket/prefix")
    sp.add_argument("--labels", default=None, help="label folder (classification: stem,label CSV)")
    sp.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                    help="pixel size of 2D images without one (PNG/JPEG); 1.0 mm is assumed when absent")
    sp.add_argument("--target-of", default=None, metavar="SOURCE",
                    help="add the direction {source: SOURCE, target: NAME} (SOURCE: a labeled site of the task)")
    sp.add_argument("--modality", default=None, help="CT, MR, CR, DX, ... (read from DICOM when absent)")
    sp.add_argument("--patients", default=None, metavar="CSV", help="stem,patient CSV: split by patient")
    sp.add_argument("--out", default=None, help="dvc.yaml to regenerate (default: beside params.yaml)")
    sp.set_defaults(func=cmd_site_add)

    sp = sub.add_parser("summary", help="print the tables and where results, figures and MLflow runs are")
    sp.set_defaults(func=cmd_summary)

    sp = sub.add_parser("export", help="a method's label maps as DICOM SEG per subject (highdicom), optionally "
                                       "STOW-RS to a PACS")
    sp.add_argument("--site", required=True)
    sp.add_argument("--method", required=True)
    sp.add_argument("--format", default="seg", choices=["seg"])
    sp.add_argument("--stow", default=None, help="DICOMweb root (http(s)://host/dicom-web or the site's dicomweb+ URI)"
                                                 " to store the SEGs in")
    sp.add_argument("--out", default=None, help="folder of the SEG files (default: <data>/export/<site>/<method>)")
    sp.add_argument("--model-version", default=None, help="model registry version recorded in the SEG (default: "
                                                          "the registry's champion/candidate version of the method)")
    sp.add_argument("--seed", type=int, default=None)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("sync", help="copy a folder to/from an S3-compatible store (s3://bucket/prefix)")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.set_defaults(func=cmd_sync)

    sp = sub.add_parser("demo", help="run the main job on the embedded synthetic sites")
    sp.add_argument("--tasks", "--task", default=None, help="comma-separated tasks, e.g. `--task pneumonia` "
                                                              "(default: params.yaml's pipeline.tasks)")
    sp.set_defaults(func=cmd_demo)

    from .kfp.cli import add_commands as add_kubeflow_commands  # pipeline compile|run-local|submit, watch (S3, PACS)

    add_kubeflow_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    redact.install()  # log records and uncaught tracebacks: no credential of a URI is printed
    try:
        return args.func(args)
    except SiteadaptError as e:
        print(error_line(args.command, e), file=sys.stderr)
        return int(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
