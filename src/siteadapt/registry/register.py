"""Registration: an adapted model logged as an MLflow pyfunc model into its training run, registered as a new
version of ``siteadapt-<task>-<site>`` with its gate measurements and the registrant's thresholds, alias
``candidate`` moved to it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from .. import __version__
from ..config import Settings
from ..errors import InputError
from ..layout import model_dir
from .gates import gate_values
from .naming import CANDIDATE, CHAMPION, float_tag, model_name, tag_value
from .policy import (GATES_DIGEST, GATES_DIGEST_ALG, digest_problem, gate_policy, loose_against, loosened_gates,
                     policy_label, policy_tags, read_policy, recorded_policy, stricter_policy)
from .pyfunc import WRAPPERS

log = logging.getLogger("siteadapt.register")


def weights_sha256(path: Path, h=None):
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=False)
    h = h or hashlib.sha256()
    h.update(json.dumps({"method": payload["method"], "options": payload["options"]}, sort_keys=True,
                        default=str).encode())
    for k in sorted(payload["state_dict"]):
        h.update(k.encode())
        h.update(payload["state_dict"][k].numpy().tobytes())
    return h


def register_model(settings: Settings, site: str, method: str, seed: int | None = None,
                   extra_tags: dict[str, str] | None = None) -> dict:
    """Register the model of ``method`` adapted to ``site`` as a new version of ``siteadapt-<task>-<site>`` with alias
    ``candidate``. ``extra_tags`` are set on the version as well (``siteadapt select`` records why the method won:
    :func:`siteadapt.steps.select.selection_tags`). Returns ``{"name", "version", "alias": "candidate", "run_id"}``.

    The registrant's gate thresholds (all of ``registry.gates``) are recorded on the version (``gates.<name>`` tags
    and their digest, :func:`policy_tags`): :func:`promote` refuses a promotion with looser ones, and refuses the
    version when they are looser than the gate policy in force (a warning says so here). Registering the same
    weights again keeps per gate the stricter of the recorded and the current threshold."""
    import torch

    from .. import tracking

    task = settings.site(site).task
    kind = settings.tasks[task].kind
    mdir = model_dir(settings, site, method, seed)
    mpath = mdir / "model.pt"
    if not mpath.is_file():
        raise InputError(mpath, f"no model: run `siteadapt adapt --site {site} --method {method}` first")
    client = tracking.connect()  # fail fast (naming the URI) before measuring anything
    payload = torch.load(mpath, map_location="cpu", weights_only=False)
    source = payload.get("source_site")
    artifacts = {"model": str(mpath)}
    h = weights_sha256(mpath)
    from ..methods.build import load_model

    built, _ = load_model(mpath)  # whether it applies the source model can depend on its options and the task's
    cls = type(built)             # kind (e.g. CycleGAN classifies with the source classifier), not only its class
    if built.needs_source_model or payload["options"].get("init_from_source"):
        src = model_dir(settings, source, "source") / "model.pt"
        artifacts["source_model"] = str(src)
        h = weights_sha256(src, h)
    sha = h.hexdigest()
    values = gate_values(settings, site, method, seed)
    policy = gate_policy(settings.registry.gates)

    name = model_name(task, site)
    in_force, problem = read_policy(client, name, settings)
    below = loose_against(in_force["gates"], policy)
    if problem or below:
        log.warning("%s: %s", name, problem or (
            f"registry.gates are looser than {policy_label(in_force)} ({', '.join(below)}): `siteadapt promote` "
            "will refuse this version"))
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get("model_sha256") == sha:
            for k, v in values.items():  # the evaluation may have changed (e.g. post-processing): fresh measurements
                client.set_model_version_tag(name, mv.version, f"gate.{k}", tag_value(v))
            old = recorded_policy(mv.tags)
            merged = policy if old is None else stricter_policy(old, policy)
            if old is not None and loosened_gates(old, settings.registry.gates):
                log.warning("%s version %s: registry.gates are looser than the recorded gates; the recorded (stricter)"
                            " thresholds stay", name, mv.version)
            if merged != old or digest_problem(merged, mv.tags.get(GATES_DIGEST_ALG), mv.tags.get(GATES_DIGEST),
                                                 "the gate record"):
                for k, v in policy_tags(merged).items():
                    client.set_model_version_tag(name, mv.version, k, v)
            client.set_model_version_tag(name, mv.version, "kind", kind)
            for k, v in (extra_tags or {}).items():
                client.set_model_version_tag(name, mv.version, k, tag_value(v))
            client.set_registered_model_alias(name, CANDIDATE, mv.version)
            log.info("%s: same weights as version %s; alias %s moved to it", name, mv.version, CANDIDATE)
            return {"name": name, "version": str(mv.version), "alias": CANDIDATE, "run_id": mv.run_id}

    exp = tracking.experiment_id(client, task)
    rid = tracking.existing_run_id(client, mdir)
    if rid is None:
        rid = client.create_run(exp, run_name=f"register/{site}/{method}",
                                tags={"siteadapt.stage": "register", "task": task, "site": site,
                                      "method": method}).info.run_id
    git = tracking.git_info()
    hashes = tracking.data_hashes(settings, {"source": source, "target": site})
    size = int(payload["context"]["image_size"])
    example = np.random.default_rng(0).uniform(-1, 1, (2, 1, size, size)).astype(np.float32)
    wrapper_cls, code_file = WRAPPERS[kind]
    wrapper = wrapper_cls()
    from mlflow.models import infer_signature

    class _Ctx:
        pass

    ctx = _Ctx()
    ctx.artifacts = artifacts
    wrapper.load_context(ctx)
    signature = infer_signature(example, wrapper.predict(ctx, example))
    with mlflow.start_run(run_id=rid):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).resolve().parents[1] / code_file),
            artifacts=artifacts, input_example=example, signature=signature, registered_model_name=name,
            pip_requirements=[f"siteadapt=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"])
        mlflow.log_metrics({f"gate/{k}": float(v) for k, v in values.items() if v is not None})
    version = str(info.registered_model_version)
    tags = {
        "method": payload["method"], "variant": payload.get("variant", method), "task": task, "kind": kind,
        "source_site": source, "target_site": site, "seed": payload.get("seed", settings.seed),
        "profile": settings.profile, "params": json.dumps(payload["options"], sort_keys=True, default=str),
        "model_sha256": sha, "uses_target_labels": str(cls.trains_on_target_labels).lower(), **git, **hashes,
        **{f"gate.{k}": v for k, v in values.items()}, **policy_tags(policy), **(extra_tags or {}),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, tag_value(v))
    client.set_registered_model_alias(name, CANDIDATE, version)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=f"siteadapt models of task {task} for site {site} "
                                                         f"(alias {CHAMPION}: serving, {CANDIDATE}: newest)")
    log.info("%s: registered %s as version %s (alias %s), run %s", name, method, version, CANDIDATE, rid)
    return {"name": name, "version": version, "alias": CANDIDATE, "run_id": rid}


def version_gates(name: str, version: str) -> dict[str, float | None]:
    """The gate measurements recorded on a registered version (its ``gate.*`` tags)."""
    from .. import tracking

    mv = tracking.connect().get_model_version(name, version)
    return {k.removeprefix("gate."): float_tag(v) for k, v in mv.tags.items() if k.startswith("gate.")}


def recorded_gates(name: str, version: str) -> dict:
    """``{"thresholds": <policy>, "digest", "digest_alg"}`` recorded on a registered version (thresholds None when
    it has none)."""
    from .. import tracking

    tags = tracking.connect().get_model_version(name, version).tags
    return {"thresholds": recorded_policy(tags), "digest": tags.get(GATES_DIGEST),
            "digest_alg": tags.get(GATES_DIGEST_ALG)}
