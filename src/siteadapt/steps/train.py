"""Train, adapt and predict steps (the functions behind ``siteadapt train-source | adapt | predict``).

Paths (all under params ``paths``)::

    models/<task>/<site>/source/model.pt       the source segmenter (classifier) trained on <site>'s labels
    models/<task>/<target>/<method>/model.pt   a method adapted to <target> (from the direction's source)
    models/.../checkpoint.pt                   the engine's resumable checkpoint beside it (not in a DVC stage)
    .siteadapt/checkpoints/<key>/checkpoint.pt in a DVC stage: DVC deletes the stage's outputs before it runs
                                               the stage, so the checkpoint waits here (git-ignored, no stage's
                                               dependency or output), keyed by the run folder and the engine's
                                               signature of the stage's inputs; deleted once model.pt is written
    data/predictions/<target>/<method>/<id>.nii.gz   label maps on each subject's original grid
    data/predictions/<target>/<method>/scores.json   classification: class probabilities of every val and test image
                                                     (+ scores.csv); evaluation needs val for the threshold

``model.pt`` holds the method name, its options, the task context, the source/target sites, the training summary
and the weights (:mod:`siteadapt.methods.build` writes, reads and builds methods; :mod:`siteadapt.layout` names the
folders). These are the untracked work functions; :mod:`siteadapt.steps.api` runs them as tracked steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..config import Settings
from ..data.geometry import to_original
from ..data.shards import load_slices
from ..errors import InputError
from ..io.atomic import atomic_path, write_json  # noqa: F401
from ..io.volume import save_nifti
from ..layout import model_dir, predictions_dir, run_name, source_model_path  # noqa: F401 (run_name: callers)
from ..methods.base import Method
from ..methods.build import build_method, load_for_prediction, load_model, save_model

log = logging.getLogger("siteadapt.steps")


def _train_config(settings: Settings, site: str, method: Method, seed: int | None = None) -> TrainConfig:  # noqa: F821
    from ..train.engine import TrainConfig  # the training loop: not imported by prediction (evaluate, register)

    t, prof = settings.train, settings.profile_for(settings.site(site).task)
    base = prof.iterations
    if method.needs_target_images and not method.trains_on_target_labels and prof.adapt_iterations:
        base = prof.adapt_iterations  # adaptation methods (GANs) get the profile's adaptation schedule
    return TrainConfig(iterations=max(1, int(round(base * method.opts.iterations_factor))),
                       batch_size=prof.batch_size, seed=settings.seed if seed is None else seed,
                       checkpoint_every=t.checkpoint_every, log_every=t.log_every, device=t.device, amp=t.amp,
                       threads=t.threads, channels_last=t.channels_last,
                       augment=(prof.augment.rotate_deg, prof.augment.scale, prof.augment.shear_deg)
                       if prof.augment.enabled else None)


CHECKPOINT_CACHE = Path(".siteadapt") / "checkpoints"


def checkpoint_cache() -> Path | None:
    """Where training keeps its checkpoints: ``<DVC project>/.siteadapt/checkpoints`` inside a DVC stage
    (``$DVC_STAGE`` is set; ``$DVC_ROOT`` names the project), else None: the model folder, which nothing deletes
    outside DVC and where Kubeflow's object-store copy restores its checkpoint (:mod:`siteadapt.kfp.checkpoints`)."""
    import os

    if not os.environ.get("DVC_STAGE"):
        return None
    return Path(os.environ.get("DVC_ROOT") or ".") / CHECKPOINT_CACHE


def _fit(method: Method, train_set, target_set, cfg, out: Path, tracker, on_checkpoint) -> dict:
    from ..train.engine import fit

    return fit(method, train_set, target_set, cfg, out, tracker=tracker, on_checkpoint=on_checkpoint,
               checkpoint_cache=checkpoint_cache())


def _release(out: Path) -> None:
    """The model is written: the run's cached checkpoints are no longer needed."""
    cache = checkpoint_cache()
    if cache is not None:
        from ..train.engine import release_checkpoints

        release_checkpoints(cache, out)


def train_source(settings: Settings, site: str, tracker=None, seed: int | None = None, on_checkpoint=None) -> Path:
    """Train the source model of ``site`` in its model folder (resuming from the checkpoint there);
    ``on_checkpoint(path, step)`` runs after each checkpoint (Kubeflow copies it to the object store)."""
    method = build_method(settings, "source", site, seed)
    data = load_slices(settings.paths.prepared, site, "train", labels=True)
    out = model_dir(settings, site, "source", seed)  # another seed: source.seed<k>, beside the pipeline's model
    cfg = _train_config(settings, site, method, seed)
    method.total_iterations = cfg.iterations
    summary = _fit(method, data, None, cfg, out, tracker, on_checkpoint)
    save_model(method, out / "model.pt", site=site, source_site=site, target_site=None, summary=summary,
               seed=settings.seed if seed is None else seed)
    _release(out)
    log.info("source model for %s: %d iterations in %.0f s", site, summary["iterations"], summary["seconds"])
    return out / "model.pt"


def adapt(settings: Settings, target: str, method_name: str, *, source: str | None = None, tracker=None,
          seed: int | None = None, on_checkpoint=None) -> Path:
    """Adapt ``method_name`` to ``target`` in its model folder (resuming from the checkpoint there);
    ``on_checkpoint(path, step)`` runs after each checkpoint."""
    d = settings.direction_to(target, source)
    method = build_method(settings, method_name, target, seed)
    src_model = None
    src_path = source_model_path(settings, d.source, seed)
    if method.needs_source_model:
        if not src_path.is_file():
            raise InputError(src_path, f"{method_name} with seed {seed} needs the source model of {d.source} "
                                       f"trained with that seed: `siteadapt train-source --site {d.source} --seed "
                                       f"{seed}` (`siteadapt study` trains it)")
        src_model, _ = load_model(src_path)
    out = model_dir(settings, target, method_name, seed)
    if method.trains_on_target_labels:  # upper-bound references only
        train_set = load_slices(settings.paths.prepared, target, "train", labels=True)
        target_set = None
    else:
        train_set = load_slices(settings.paths.prepared, d.source, "train", labels=True)
        target_set = load_slices(settings.paths.prepared, target, "train", labels=False)
    cfg = _train_config(settings, target, method, seed)
    method.total_iterations = cfg.iterations
    method.prepare(train_set, target_set, source_model=src_model)
    summary = {"iterations": 0, "seconds": 0.0}
    if method.trains:
        summary = _fit(method, train_set, target_set, cfg, out, tracker, on_checkpoint)
    method.finish(train_set, target_set)
    method.eval()
    save_model(method, out / "model.pt", source_site=d.source, target_site=target, summary=summary,
               seed=settings.seed if seed is None else seed, variant=method_name)
    if target_set is not None:
        save_translations(method, train_set, target_set, out / "translations.png",
                          two_d=settings.task_of(target).dims == 2)
    if src_model is not None:  # methods that apply the source segmenter keep a reference to its file
        write_json(out / "uses.json", {"source_model": str(src_path)})
    _release(out)
    return out / "model.pt"


def save_translations(method: Method, source, target, path: Path, n: int = 4, two_d: bool = False) -> Path | None:
    """Grid of a few source and target slices and what the method translates them into (if it translates).
    ``two_d``: the slices are 2D pictures indexed (column, row) (drawn transposed, the way up the input file shows
    them); otherwise canonical 3D slices (rotated: superior or anterior up), as the evaluation overlays."""
    method.eval()
    dev = next(method.parameters()).device if any(True for _ in method.parameters()) else torch.device("cpu")
    idx_s = np.linspace(0, len(source) - 1, n).astype(int)
    idx_t = np.linspace(0, len(target) - 1, n).astype(int)
    sx = torch.from_numpy(source.images[idx_s]).unsqueeze(1).to(dev)
    tx = torch.from_numpy(target.images[idx_t]).unsqueeze(1).to(dev)
    with torch.no_grad():
        tr = method.translations(sx, tx)
    if not tr:
        return None
    from ..figures import save_figure, translations_figure

    rows = [("source", sx), ("target", tx)] + list(tr.items())
    grid = []
    for title, imgs in rows:
        arrs = [imgs[c, 0].float().cpu().numpy() for c in range(n)]
        grid.append((title, [a.T if two_d else np.rot90(a) for a in arrs]))
    return save_figure(translations_figure(grid), path)


def predict(settings: Settings, target: str, method_name: str, splits=("test",), seed: int | None = None) -> Path:
    """Segment the target's subjects of ``splits`` and write label maps on their original grids (classification:
    class probabilities of every image of ``splits`` plus val and test, see :func:`predict_classes`)."""
    method = load_for_prediction(settings, target, method_name, seed)
    task = settings.task_of(target)
    out_dir = predictions_dir(settings, target, method_name, seed)
    if task.kind == "classification":
        return predict_classes(settings, method, target, method_name, splits, out_dir)
    written = []
    for split in splits:
        for rec, back in original_label_maps(settings, method, target, split):
            save_nifti(back, out_dir / f"{rec['id']}.nii.gz", np.array(rec["orig_affine"]))
            written.append(rec["id"])
    write_json(out_dir / "predictions.json", {"site": target, "method": method_name, "splits": list(splits),
                                              "subjects": written})
    log.info("%s/%s: %d label maps -> %s", target, method_name, len(written), out_dir)
    return out_dir


def original_label_maps(settings: Settings, method: Method, site: str, split: str):
    """(subject record, uint8 label map on the subject's original grid) for each subject of ``split`` of the site:
    ``method`` segments the subject's prepared slices as a whole, and the argmax is mapped back through the crop
    grid (what ``siteadapt predict`` writes; reads no label)."""
    ids = sorted(settings.task_of(site).structures.values())
    data = load_slices(settings.paths.prepared, site, split, labels=False)
    for rec in data.subjects:
        if rec["split"] != split:
            continue
        start, n = rec["rows"]
        x = torch.from_numpy(np.ascontiguousarray(data.images[start:start + n])).unsqueeze(1)
        with torch.no_grad():
            lab = method.predict_subject(x).argmax(1).numpy().astype(np.uint8)  # (n, H, W) slices
        grid = np.moveaxis(lab, 0, rec["slice_axis"])
        back = to_original(grid, np.array(rec["grid_affine"]), rec["orig_shape"], np.array(rec["orig_affine"]),
                           ids=ids)
        yield rec, back.astype(np.uint8)


def predict_classes(settings: Settings, method: Method, target: str, method_name: str, splits, out_dir: Path) -> Path:
    """Class probabilities of the target's images -> ``scores.json`` / ``scores.csv``. Always covers val and test:
    evaluation picks the operating threshold on val (Youden) and applies it to test. No label is read here."""
    task = settings.task_of(target)
    order = ("train", "val", "test")
    splits = sorted(set(splits) | {"val", "test"}, key=lambda sp: order.index(sp) if sp in order else len(order))
    rows = []
    for split in splits:
        data = load_slices(settings.paths.prepared, target, split, labels=False)
        if not len(data):
            continue
        x = torch.from_numpy(data.images).unsqueeze(1)
        with torch.no_grad():
            probs = torch.softmax(method.predict_subject(x).float(), 1).numpy()
        if probs.ndim != 2 or probs.shape[1] != len(task.classes):
            raise InputError(None, f"{method_name} returned outputs of shape {probs.shape}, not class logits "
                                   f"(N, {len(task.classes)}): is it a segmentation method?")
        for i in range(len(data)):
            rec = data.subjects[int(data.subject[i])]
            rows.append({"id": rec["id"], "split": split, "score": float(probs[i, 1]),
                         "probs": [round(float(p), 6) for p in probs[i]]})
    write_json(out_dir / "scores.json", {"site": target, "method": method_name, "classes": list(task.classes),
                                         "positive_class": task.classes[1], "score": f"P({task.classes[1]})",
                                         "splits": splits, "images": rows})
    lines = ["id,split,score"] + [f"{r['id']},{r['split']},{r['score']:.6f}" for r in rows]
    from ..io.atomic import write_text

    write_text(out_dir / "scores.csv", "\n".join(lines) + "\n")
    write_json(out_dir / "predictions.json", {"site": target, "method": method_name, "splits": splits,
                                              "subjects": [r["id"] for r in rows]})
    log.info("%s/%s: class scores of %d images -> %s", target, method_name, len(rows), out_dir / "scores.json")
    return out_dir
