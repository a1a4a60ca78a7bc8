"""Making a method object: from params (a fresh one to train) or from a saved ``model.pt`` (a trained one).

Every layer that needs a method instance goes through here: the training and adaptation steps, prediction,
selection and registration (which load trained models), and ``siteadapt dvc-gen`` (which asks a method which of
its options it reads). It sits below the steps so that none of those has to reach up into a step module.

``model.pt`` holds the method name, its options, the task context, the source/target sites, the training summary
and the weights (without the source segmenter's, which has its own file); :func:`load_model` rebuilds the method
from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Settings
from ..errors import InputError
from ..io.atomic import atomic_path
from ..layout import model_dir, source_model_path
from . import get_method
from .base import Context, Method


def context_for(settings: Settings, site: str) -> Context:
    """The task facts a method is built with for ``site``: number of classes, image size, width, task kind."""
    task = settings.task_of(site)
    n = len(task.classes) if task.kind == "classification" else 1 + max(task.structures.values())
    prof = settings.profile_for(settings.site(site).task)
    return Context(n_classes=n, image_size=prof.image_size, width=prof.width, kind=task.kind)


def method_options(settings: Settings, name: str, site: str) -> tuple[type[Method], dict, list[str], dict[str, str]]:
    """(method class, raw options, the params keys they come from, option -> the key that set it) of method or
    named variant ``name`` for ``site``: ``methods.<name>`` (a named variant's ``method:`` picks the class), then the
    site's task's overrides ``tasks.<task>.method_options.<base method>``, then ``.<name>``. The keys are what a DVC
    stage of this method lists as its params."""
    raw = dict(settings.methods.get(name) or {})
    base = raw.pop("method", name)
    origins = {k: f"methods.{name}" for k in raw}
    task = settings.site(site).task
    per_task = settings.tasks[task].method_options
    keys = [f"methods.{name}"]
    for k in dict.fromkeys([base, name]):
        if k in per_task:
            key = f"tasks.{task}.method_options.{k}"
            raw |= per_task[k] or {}
            origins |= {opt: key for opt in per_task[k] or {}}
            keys.append(key)
    return get_method(base), raw, keys, origins


def resolved_options(settings: Settings, name: str, site: str) -> tuple[str, dict]:
    """(base method, validated options) of a method or named variant as it runs on ``site`` (with its task's
    ``method_options``), without building its networks (what a training run records as its params)."""
    cls, raw, keys, origins = method_options(settings, name, site)
    return cls.name, cls.parse_options(raw, keys[0], origins).model_dump()


def build_method(settings: Settings, name: str, site: str, seed: int | None = None) -> Method:
    """``name`` is a method, or a named variant in params: ``methods: {sifa_prior: {method: sifa,
    deep_supervision: false}}`` (an ablation row = a flag on the method, never a copy of it). The site's task may
    override options: ``tasks.<task>.method_options.<base method>``, then ``.<name>``.

    The networks' initial weights are drawn from ``seed`` (default: params' ``seed``) in a forked RNG: PyTorch seeds
    its default generator differently in every process, so without this two runs of one stage with one seed started
    from other weights (and gave other tables)."""
    cls, raw, keys, origins = method_options(settings, name, site)
    opts = cls.parse_options(raw, keys[0], origins)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed if seed is None else seed)
        m = cls(context_for(settings, site), opts)
    m.variant = name
    return m


def save_model(method: Method, path: Path, **info) -> None:
    """Write ``model.pt``: the method's name, options, context and weights plus ``info`` (sites, summary, seed)."""
    payload = {"method": method.name, "options": method.opts.model_dump(), "context": method.ctx.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in method.state_dict().items()
                              if not k.startswith("source_model.")},  # the source segmenter has its own file
               **info}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Path, device: str = "cpu") -> tuple[Method, dict]:
    """(the method rebuilt from ``model.pt`` in eval mode, the file's payload)."""
    if not Path(path).is_file():
        raise InputError(path, "model not found (train or adapt it first)")
    payload = torch.load(path, map_location=device, weights_only=False)
    cls = get_method(payload["method"])
    ctx = payload["context"]
    ctx = Context(**{**ctx, "class_weights": tuple(ctx["class_weights"]) if ctx.get("class_weights") else None})
    m = cls(ctx, cls.Options.model_validate(payload["options"]))
    m.load_state_dict(payload["state_dict"], strict=False)
    m.eval()
    return m, payload


def load_for_prediction(settings: Settings, target: str, method_name: str, seed: int | None = None) -> Method:
    """The trained model of ``method_name`` on ``target``, with the source model attached when it applies one."""
    method, payload = load_model(model_dir(settings, target, method_name, seed) / "model.pt")
    if method.needs_source_model:
        src, _ = load_model(source_model_path(settings, payload["source_site"], payload.get("seed")))
        method.source_model = src
    return method
