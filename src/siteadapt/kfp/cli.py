"""``siteadapt pipeline compile | run-local | submit`` and ``siteadapt watch`` (added to the main parser by
:func:`add_commands`; the one watch command, for S3/folder prefixes and PACS sites alike). KFP is imported only when one of these commands runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("siteadapt.kfp")

DEFAULT_PIPELINE_YAML = "pipelines/site-adaptation.yaml"
DEFAULT_COMPONENTS_DIR = "components"


def _methods(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _gates(items: list[str] | None) -> dict:
    """``--gate min_target_dice=0.6 --gate max_empty_fraction=null`` -> registry.gates overrides."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--gate {item!r}: expected NAME=VALUE (a registry.gates key of params.yaml)")
        value = value.strip()
        out[key.strip()] = None if value.lower() in ("null", "none", "off") else (
            value if value in ("auto", "always") else float(value))
    return out


def _run_arguments(args, **extra) -> dict:
    """Pipeline arguments from the common options; options left unset keep the pipeline's defaults."""
    out = {}
    for opt, name in (("task", "task"), ("source_site", "source_site"), ("source_uri", "source_uri"),
                      ("profile", "profile"), ("target_modality", "target_modality"),
                      ("target_pixel_spacing_mm", "target_pixel_spacing_mm"), ("pacs_uri", "pacs_uri")):
        v = getattr(args, opt, None)
        if v is not None:
            out[name] = v
    if getattr(args, "methods", None):
        out["methods"] = _methods(args.methods)
    if getattr(args, "params_file", None):
        out["params_yaml"] = Path(args.params_file).read_text()
    if getattr(args, "gate", None):
        out["gate_thresholds"] = _gates(args.gate)
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def cmd_compile(args) -> int:
    from .pipeline import compile_components, compile_pipeline

    out = compile_pipeline(args.out, args.image, args.gpu_image)
    print(f"pipeline -> {out}")
    if args.components_dir:
        written = compile_components(args.components_dir, args.image, args.gpu_image)
        print(f"components -> {args.components_dir}/ ({', '.join(p.name for p in written)})")
    return 0


def cmd_run_local(args) -> int:
    from .local import demo_sites, tiny_params
    from .runtime import check_site_name
    from .submit import LocalSubmitter

    root = Path(args.root).resolve()
    if args.source_uri and args.target_uri:
        if not (args.source_site and args.task):
            print("siteadapt pipeline run-local: --task and --source-site are needed with --source-uri",
                  file=sys.stderr)
            return 2
        sites = {"task": args.task, "source_site": args.source_site, "source_uri": args.source_uri,
                 "target_uri": args.target_uri}
    else:
        sites = demo_sites(args.task or "chestxray", root / "raw")
        print(f"synthetic sites ({sites['task']}) -> {root / 'raw'}")
    site = check_site_name(args.site or Path(sites["target_uri"]).name.replace("cardiac_", "") + "_local")
    arguments = {**sites, "site": site, "profile": args.profile or "tiny",
                 "methods": _methods(args.methods) or (["noadapt", "tunanet"] if sites["task"] == "pneumonia"
                                                       else ["noadapt", "histmatch"]),
                 "params_yaml": Path(args.params_file).read_text() if args.params_file
                 else tiny_params(args.params)}
    if args.gate:
        arguments["gate_thresholds"] = _gates(args.gate)
    arguments.update({k: v for k, v in (("target_modality", args.target_modality),
                                         ("target_pixel_spacing_mm", args.target_pixel_spacing_mm),
                                         ("pacs_uri", args.pacs_uri))
                      if v is not None})
    submitter = LocalSubmitter(root / "kfp", cache=not args.no_cache)
    submitter.submit(f"siteadapt-{site}-local", arguments)
    out = submitter.outputs.get(f"siteadapt-{site}-local", {}).get("Output")
    if out:
        cand = json.loads(out)
        reg = cand.get("registered", {})

        def fmt(v):
            return "n/a" if v is None else f"{v:.3f}"

        print(f"\ncandidate: {cand['method']} -> {reg.get('name')} version {reg.get('version')} "
              f"(alias {reg.get('alias')}); scores " + ", ".join(f"{c['method']}={fmt(c['score'])}"
                                                                  for c in cand["compared"]))
        runs = sorted((root / "kfp").glob("siteadapt-site-adaptation-*"))  # kfp.local: one folder per run
        if runs:
            gate = runs[-1] / "gates" / "executor_output.json"
            promo = runs[-1] / "promote" / "executor_output.json"
            if promo.is_file():
                res = json.loads(json.loads(promo.read_text())["parameterValues"]["Output"])
                print(f"gates passed: version {res.get('version')} "
                      + ("promoted to champion" if res.get("promoted") else "refused by the registry"))
            elif gate.is_file():
                print("gates failed: not promoted (the gates step's log above lists each gate; the tiny profile "
                      "trains for seconds, so its models rarely pass; --gate NAME=VALUE overrides a threshold)")
    from ..tracking import ui_command

    print(f"artifacts: {root / 'kfp'}\nMLflow:    {ui_command()}")
    return 0


def cmd_submit(args) -> int:
    from .runtime import check_site_name
    from .submit import KfpSubmitter

    site = check_site_name(args.site)
    arguments = _run_arguments(args, site=site, target_uri=args.target_uri)
    missing = [k for k in ("source_uri",) if k not in arguments]
    if missing:
        print("siteadapt pipeline submit: --source-uri is required", file=sys.stderr)
        return 2
    sub = KfpSubmitter(args.host, experiment=args.experiment, namespace=args.namespace, cpu_image=args.image,
                       gpu_image=args.gpu_image, service_account=args.service_account)
    run_id = sub.submit(args.run_name or f"siteadapt-{site}", arguments)
    print(f"run {run_id} submitted for site {site}")
    return 0


def cmd_watch(args) -> int:
    """``siteadapt watch``: one run per new site under an S3 prefix or a folder, or, with a ``dicomweb+http(s)://``
    prefix, the new series of one PACS site (``--site``) pulled into ``--stage`` before its run
    (:class:`siteadapt.kfp.watch.Watcher` either way)."""
    from .. import redact
    from ..errors import ConfigError
    from ..io.dicomweb import is_dicomweb
    from . import locations
    from .watch import Watcher

    for opt, value in (("--prefix", args.prefix), ("--stage", args.stage), ("--state", args.state)):
        refused = redact.inline_secret_message(opt, value) if value else None
        if refused:  # the watcher records its locations in the state file and the runs' arguments
            raise ConfigError(refused)
    pacs = is_dicomweb(args.prefix)
    if not pacs and (args.site or args.stage):
        raise ConfigError("--site and --stage are for a DICOMweb source (--prefix dicomweb+http(s)://...)")
    if args.submitter == "kfp":
        from .submit import KfpSubmitter

        submitter = KfpSubmitter(args.host, experiment=args.experiment, namespace=args.namespace,
                                 cpu_image=args.image, gpu_image=args.gpu_image,
                                 service_account=args.service_account)
    else:
        from .submit import LocalSubmitter

        submitter = LocalSubmitter(Path(args.local_root).resolve())
    if pacs:
        if not args.stage:
            raise ConfigError("a DICOMweb source needs --stage (folder or s3:// prefix that receives <site>/images/)")
        state = args.state or locations.child(args.stage if not locations.is_s3(args.stage)
                                              else locations.as_prefix(args.stage),
                                              f".siteadapt-watch-{args.site}.json")
        w = Watcher(args.prefix, state, submitter, defaults=_run_arguments(args), settle_s=args.settle,
                    site=args.site, stage=args.stage)
    else:
        state = args.state or locations.child(locations.as_prefix(args.prefix) if locations.is_s3(args.prefix)
                                              else args.prefix, ".siteadapt-watch.json")
        w = Watcher(args.prefix, state, submitter, defaults=_run_arguments(args), marker=args.marker,
                    settle_s=args.settle)
    for site in args.resubmit or []:
        w.resubmit(site)
        print(f"{site}: forgotten; the next poll submits it again")
    w.run(interval_s=args.interval, once=args.once)
    return 0


def _run_options(sp: argparse.ArgumentParser, *, with_images: bool = True) -> None:
    sp.add_argument("--task", default=None, help="task of the site (pipeline default: cardiac)")
    sp.add_argument("--source-site", default=None, help="labeled source site (pipeline default: cardiac_mr)")
    sp.add_argument("--source-uri", default=None, help="location of the source site (folder or s3://...)")
    sp.add_argument("--methods", default=None, help="comma-separated methods, adapted in parallel")
    sp.add_argument("--profile", default=None, help="settings profile of the run (pipeline default: paper)")
    sp.add_argument("--params-file", default=None, help="send this params.yaml with the run (default: the image's)")
    sp.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                    help="override a promotion gate of params.yaml registry.gates for this run (repeatable), "
                         "e.g. min_target_dice=0.6")
    sp.add_argument("--target-modality", default=None, help="modality of NIfTI/2D target images (CT, MR, DX, ...)")
    sp.add_argument("--target-pixel-spacing-mm", type=float, default=None, help="for 2D target images without one")
    sp.add_argument("--pacs-uri", default=None, help="the site's PACS (dicomweb+http(s)://...?query): the promoted "
                                                     "champion's SEGs are stored back there (watch: its DICOMweb "
                                                     "source by default)")
    if with_images:
        sp.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                        help="Kubeflow Pipelines API (default: $KF_PIPELINES_ENDPOINT, else in-cluster)")
        sp.add_argument("--experiment", default="siteadapt")
        sp.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
        sp.add_argument("--service-account", default=None, help="service account of the run's pods")
        sp.add_argument("--image", default=None, help="CPU image of the steps (default: $SITEADAPT_IMAGE)")
        sp.add_argument("--gpu-image", default=None, help="CUDA image of the training steps "
                                                          "(default: $SITEADAPT_GPU_IMAGE)")


def add_commands(sub) -> None:
    """Add ``pipeline`` (compile, run-local, submit) and ``watch`` to the main parser's subcommands."""
    p = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit to a cluster")
    psub = p.add_subparsers(dest="pipeline_command", required=True)

    sp = psub.add_parser("compile", help="write the pipeline YAML (and one YAML per component)")
    sp.add_argument("--out", default=DEFAULT_PIPELINE_YAML)
    sp.add_argument("--components-dir", default=DEFAULT_COMPONENTS_DIR, help="'' to skip the component YAMLs")
    sp.add_argument("--image", default=None, help="CPU image (default: $SITEADAPT_IMAGE or this version's tag)")
    sp.add_argument("--gpu-image", default=None, help="CUDA image (default: $SITEADAPT_GPU_IMAGE or this "
                                                      "version's tag)")
    sp.set_defaults(func=cmd_compile)

    sp = psub.add_parser("run-local", help="run the whole pipeline here with kfp.local (tiny synthetic sites by "
                                           "default)")
    _run_options(sp, with_images=False)
    sp.add_argument("--site", default=None, help="name of the target site (default: <synthetic target>_local)")
    sp.add_argument("--target-uri", default=None, help="target site location (default: synthetic)")
    sp.add_argument("--root", default="runs/kfp-local", help="synthetic sites, artifacts and the local cache")
    sp.add_argument("--no-cache", action="store_true", help="rerun every step")
    sp.set_defaults(func=cmd_run_local)

    sp = psub.add_parser("submit", help="submit one run to a Kubeflow Pipelines server")
    _run_options(sp)
    sp.add_argument("--site", required=True, help="name of the target site")
    sp.add_argument("--target-uri", required=True, help="target site location (s3://bucket/sites/<site>/)")
    sp.add_argument("--run-name", default=None)
    sp.set_defaults(func=cmd_submit)

    sp = sub.add_parser("watch", help="submit one run per new site under a prefix (s3://bucket/sites/ or a folder)")
    _run_options(sp)
    sp.add_argument("--prefix", required=True)
    sp.add_argument("--state", default=None, help="state file, local or s3:// (default: <prefix>/"
                                                  ".siteadapt-watch.json)")
    sp.add_argument("--submitter", choices=["kfp", "local"], default="kfp")
    sp.add_argument("--local-root", default="runs/kfp-local", help="artifacts of the local submitter")
    sp.add_argument("--marker", default=None, help="a site is ready once this file exists in it (e.g. _READY)")
    sp.add_argument("--settle", type=float, default=0.0,
                    help="a site is ready once its files did not change for this many seconds")
    sp.add_argument("--interval", type=float, default=60.0, help="seconds between polls")
    sp.add_argument("--once", action="store_true", help="poll once and exit (for a CronJob)")
    sp.add_argument("--resubmit", action="append", default=[], metavar="SITE",
                    help="forget SITE first, so that it is submitted again")
    sp.add_argument("--site", default=None, help="with --prefix dicomweb+http(s)://host/dicom-web?Modality=CT...: the "
                                                 "site its studies form")
    sp.add_argument("--stage", default=None, help="with a DICOMweb --prefix: folder or s3:// prefix that receives "
                                                  "<site>/images/ (the run's target location)")
    sp.set_defaults(func=cmd_watch)
