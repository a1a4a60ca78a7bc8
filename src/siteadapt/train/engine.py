"""One training engine for every method: iterations, seeds, device, mixed precision, checkpoints, resume, logging.

- Iteration-based (the papers count iterations, not epochs). Each iteration draws a source batch and, for methods that
  use them, a target batch of *images*, uniformly with replacement, from a seeded ``torch.Generator``.
- Checkpoints (``<run>/checkpoint.pt``, written atomically) hold the method's parameters and extra state (image
  pools), every optimizer, the sampler generator and the global RNG states. A killed run restarted with the same
  settings resumes from the last checkpoint and reaches the same state as an uninterrupted run (bit-identical on CPU;
  on CUDA up to non-deterministic kernels).
- Checkpoints outside the run folder (``checkpoint_cache``): DVC deletes a stage's outputs before it runs the stage,
  so a checkpoint in the model folder would not survive a killed ``dvc repro``. Given a cache folder, the checkpoint
  goes to ``<cache>/<key>/checkpoint.pt`` instead, ``key`` being a digest of the run folder's name and the run's
  signature (the settings and data digests below: what the stage's inputs determine), with a copy of the loss curve
  and a ``run.json`` that names the run folder. The run folder still gets the curve and, from the caller, the model;
  :func:`release_checkpoints` deletes the cache entries of a run folder once its model is written.
- Augmentation (the profile's ``augment``; off by default): each drawn slice, source image with its label map and
  target image alike, gets its own random rotation, scaling and shear (:func:`random_affine`), drawn from the same
  seeded generator, so resume stays exact. Every trained method sees the same augmentation.
- On CUDA, automatic mixed precision runs in bfloat16 (no loss scaling needed). Networks and batches use the
  channels_last memory format on CUDA and on the CPU (``channels_last``, on by default): oneDNN's convolutions with
  few channels (the generators' 1-4-channel 7x7 layers, the quick profile's narrow networks) run faster in it than
  in the default layout (benchmarks/bench_train.py compares both). ``channels_last: false`` keeps the default.
- A checkpoint made with other settings (method options, widths, batch size, seed, sites) or from other data (a
  hash of the slices and labels it trained on: a site preprocessed again with other settings) is not resumed: the
  run starts afresh (the iteration count may differ: a longer run continues a shorter one).
- Checkpoint choice: the final iteration. The papers picked "the best model within 20k iterations", which needs
  target labels; we never look at target labels during training, and a fixed schedule is the choice that is both
  label-free and reproducible. (Label-free selection criteria such as the discriminator loss plateau or prediction
  entropy on target images are poorly correlated with target Dice in adversarial training, so we do not pretend.)
- Progress goes to stderr every ``log_every`` iterations (iteration, it/s, the method's losses); a ``tracker`` (e.g.
  MLflow) receives the same numbers. A tracker may also have ``begin(start)`` (told the iteration the run starts
  from, 0 or the resumed checkpoint's, before the first point) and ``checkpointed(step)`` (called after each
  checkpoint is written: MLflow flushes its buffered points then, so that a run killed later has every point up to
  its last checkpoint and a resumed run neither misses nor repeats a step). ``on_checkpoint(path, step)`` is called
  after each checkpoint too (Kubeflow copies it to the object store, :mod:`siteadapt.kfp.checkpoints`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shards import SliceSet
from ..io.atomic import atomic_path
from ..methods.base import Batch, Method

log = logging.getLogger("siteadapt.train")


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass(frozen=True)
class TrainConfig:
    iterations: int
    batch_size: int
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 20
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    threads: int | None = None  # torch CPU threads (None: leave as is)
    channels_last: bool = True  # networks and batches in channels_last memory format (CPU and CUDA)
    augment: tuple[float, float, float] | None = None  # (rotate_deg, scale, shear_deg) of random_affine; None: off


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class _Sampler:
    def __init__(self, data: SliceSet, device: torch.device, with_labels: bool):
        self.x = torch.from_numpy(np.ascontiguousarray(data.images)).unsqueeze(1)
        self.y = torch.from_numpy(data.labels.astype(np.int64)) if with_labels and data.labels is not None else None
        self.device = device

    def draw(self, n: int, gen: torch.Generator):
        idx = torch.randint(len(self.x), (n,), generator=gen)
        x = self.x[idx].to(self.device, non_blocking=True)
        y = self.y[idx].to(self.device, non_blocking=True) if self.y is not None else None
        return x, y


def random_affine(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, rotate_deg: float, scale: float,
                  shear_deg: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image of ``x`` (B, C, H, W) rotated, scaled and sheared about its centre by its own random amounts from
    ``gen``; label maps ``y`` (B, H, W) move with their images (nearest neighbour, background outside), image-level
    labels (B,) do not. Images are resampled bilinearly, the border value continuing outside the image."""
    b = x.shape[0]

    def uniform(half: float) -> torch.Tensor:
        return (torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1) * half

    ang, sh = torch.deg2rad(uniform(rotate_deg)), torch.deg2rad(uniform(shear_deg))
    s = 1 + uniform(scale)
    cos, sin, tan = torch.cos(ang), torch.sin(ang), torch.tan(sh)
    # output -> input coordinates: rotation @ shear (x += tan * y) / scale
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos / s, (cos * tan - sin) / s
    theta[:, 1, 0], theta[:, 1, 1] = sin / s, (sin * tan + cos) / s
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    if y is not None and y.dim() == 3:
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].to(y.dtype)
    return x, y


CHECKPOINT = "checkpoint.pt"
CURVE = "losses.csv"
RUN_RECORD = "run.json"  # in a cache entry: which run folder it belongs to


def signature(method: Method, source: SliceSet, target: SliceSet | None, cfg: TrainConfig) -> dict:
    """What a checkpoint must have been made with to be resumed: the method, its options and context, the batch
    size, seed, augmentation, the sites and digests of the data (the iteration count is left out on purpose: a
    longer run continues a shorter one)."""
    return {"method": method.name, "options": method.opts.model_dump(), "context": method.ctx.to_dict(),
            "batch_size": cfg.batch_size, "seed": cfg.seed, "augment": cfg.augment, "source": source.site,
            "target": target.site if target is not None else None,
            "data": [source.fingerprint(), target.fingerprint() if target is not None else None]}


def _run_name(run_dir: Path, cache: Path) -> str:
    """The run folder as a cache entry records it: relative to the project that holds the cache
    (``<project>/.siteadapt/checkpoints``) when it lies inside, else absolute."""
    run, project = Path(run_dir).resolve(), Path(cache).resolve().parents[1]
    return run.relative_to(project).as_posix() if run.is_relative_to(project) else run.as_posix()


def cached_checkpoint(cache: Path, run_dir: Path, sig: dict) -> Path:
    """``<cache>/<key>/checkpoint.pt`` of a run: key = sha256 of the run folder's name and the run's signature, so
    other settings or data (a changed input of the stage) never find it, and two run folders never share one."""
    what = json.dumps({"run": _run_name(run_dir, cache), "signature": sig}, sort_keys=True, default=str)
    return Path(cache) / hashlib.sha256(what.encode()).hexdigest()[:32] / CHECKPOINT


def release_checkpoints(cache: Path, run_dir: Path) -> int:
    """Delete every cache entry of ``run_dir`` (its ``run.json`` names it): the current settings' entry once the
    model is written, and entries of earlier settings that were never resumed. Returns how many were deleted."""
    cache = Path(cache)
    if not cache.is_dir():
        return 0
    name, n = _run_name(run_dir, cache), 0
    for rec in cache.glob(f"*/{RUN_RECORD}"):
        try:
            mine = json.loads(rec.read_text()).get("run") == name
        except (OSError, ValueError):
            mine = False
        if mine:
            shutil.rmtree(rec.parent, ignore_errors=True)
            n += 1
    return n


def fit(method: Method, source: SliceSet, target: SliceSet | None, cfg: TrainConfig, run_dir: Path,
        tracker: Tracker | None = None, stop_after: int | None = None,
        on_checkpoint: Callable[[Path, int], None] | None = None, checkpoint_cache: Path | None = None) -> dict:
    """Train ``method`` for ``cfg.iterations`` iterations, resuming from ``run_dir/checkpoint.pt`` when present.

    ``checkpoint_cache``: keep the checkpoint in that folder instead (:func:`cached_checkpoint`; a DVC stage, whose
    outputs DVC deletes before it runs); the loss curve is copied there at each checkpoint and restored into the
    run folder on resume when the run folder lost it. The caller deletes the entry once the model is written
    (:func:`release_checkpoints`).
    ``stop_after`` (tests) returns after that many iterations of *this call*, like a kill after a checkpoint.
    ``on_checkpoint(path, step)`` runs after each checkpoint is written (the file at ``path`` holds iteration
    ``step``).
    Returns a summary: iterations done, seconds, iterations/s and the last losses.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        method.amp_dtype = torch.bfloat16 if cfg.amp else None
        torch.backends.cudnn.benchmark = True
    optims = method.attach_optimizers()
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    sig = signature(method, source, target, cfg)
    curve = run_dir / CURVE
    if checkpoint_cache is None:
        ckpt, kept_curve = run_dir / CHECKPOINT, None
    else:
        ckpt = cached_checkpoint(checkpoint_cache, run_dir, sig)
        kept_curve = ckpt.with_name(CURVE)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        from ..io.atomic import write_json

        write_json(ckpt.with_name(RUN_RECORD), {"run": _run_name(run_dir, checkpoint_cache), "method": method.name})
    state = torch.load(ckpt, map_location=device, weights_only=False) if ckpt.exists() else None
    if state is not None and state.get("signature") != sig:
        log.warning("%s: checkpoint %s was made with other settings; starting afresh", method.name, ckpt)
        state = None
    if state is not None:
        method.load_state_dict(state["model"])
        method.load_extra_state(state.get("extra", {}))
        for name, opt in optims.items():
            opt.load_state_dict(state["optim"][name])
        gen.set_state(state["sampler"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
        log.info("resuming %s from iteration %d", method.name, start)
        if kept_curve is not None and kept_curve.is_file() and not curve.is_file():
            shutil.copyfile(kept_curve, curve)  # the stage's outputs were deleted: the curve up to the checkpoint
    if hasattr(tracker, "begin"):
        tracker.begin(start)

    src = _Sampler(source, device, with_labels=True)
    tgt = _Sampler(target, device, with_labels=method.trains_on_target_labels) \
        if (target is not None and method.needs_target_images) else None

    def save(step: int) -> None:
        state = {"step": step, "signature": sig, "model": method.state_dict(), "extra": method.extra_state(),
                 "optim": {n: o.state_dict() for n, o in optims.items()}, "sampler": gen.get_state(),
                 "rng": _rng_state()}
        if kept_curve is not None and curve.is_file():  # before the checkpoint: never a curve behind it
            with atomic_path(kept_curve) as tmp:
                shutil.copyfile(curve, tmp)
        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)

    _truncate_curve(curve, start)
    method.train()
    losses: dict[str, float] = {}
    t0 = time.perf_counter()
    done_here = 0
    last_log_t, last_log_step = t0, start
    for step in range(start, cfg.iterations):
        sx, sy = src.draw(cfg.batch_size, gen)
        tx, ty = tgt.draw(cfg.batch_size, gen) if tgt is not None else (None, None)
        if cfg.augment:
            sx, sy = random_affine(sx, sy, gen, *cfg.augment)
            if tx is not None:
                tx, ty = random_affine(tx, ty, gen, *cfg.augment)
        if cfg.channels_last:
            sx = sx.contiguous(memory_format=torch.channels_last)
            tx = tx.contiguous(memory_format=torch.channels_last) if tx is not None else None
        losses = method.train_step(Batch(sx, sy, tx, ty))
        done_here += 1
        it = step + 1
        if it % cfg.log_every == 0 or it == cfg.iterations:
            now = time.perf_counter()
            ips = (it - last_log_step) / max(now - last_log_t, 1e-9)
            last_log_t, last_log_step = now, it
            bad = [k for k, v in losses.items() if not np.isfinite(v)]
            if bad:
                raise FloatingPointError(f"{method.name}: non-finite losses at iteration {it}: {bad}")
            msg = " ".join(f"{k}={v:.3f}" for k, v in sorted(losses.items()))
            print(f"[{method.name}] {it}/{cfg.iterations} {ips:.2f} it/s {msg}", file=sys.stderr, flush=True)
            _append_curve(curve, it, ips, losses)
            if tracker is not None:
                tracker.log_metrics({f"train/{k}": v for k, v in losses.items()} | {"train/it_per_s": ips}, it)
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save(it)
            if hasattr(tracker, "checkpointed"):
                tracker.checkpointed(it)
            if on_checkpoint is not None:
                on_checkpoint(ckpt, it)
        if stop_after is not None and done_here >= stop_after:
            break
    secs = time.perf_counter() - t0
    return {"iterations": start + done_here, "seconds": secs, "it_per_s": done_here / max(secs, 1e-9),
            "losses": losses, "device": str(device)}


def _truncate_curve(path: Path, start: int) -> None:
    """On resume, drop curve rows past the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if not lines:
        return
    keep = [lines[0]] + [ln for ln in lines[1:] if ln and int(ln.split(",")[0]) <= start]
    path.write_text("\n".join(keep) + "\n")


def _append_curve(path: Path, it: int, ips: float, losses: dict[str, float]) -> None:
    """One row of ``losses.csv``. A method whose phases log different terms (TUNA-Net with F_P trained offline, say)
    gets a column per term ever logged: when a new term appears the file is rewritten with the extra column, earlier
    rows blank in it (as are later rows in the columns of terms no longer logged)."""
    row = {"iteration": str(it), "it_per_s": f"{ips:.4f}", **{k: f"{v:.6g}" for k, v in losses.items()}}
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
    if not header:
        header = ["iteration", "it_per_s", *sorted(losses)]
        path.write_text(",".join(header) + "\n")
    extra = sorted(set(row) - set(header))
    if extra:
        with open(path, newline="") as fh:
            old = list(csv.DictReader(fh))
        header += extra
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header, restval="", lineterminator="\n")
            w.writeheader()
            w.writerows(old)
    with open(path, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=header, restval="", lineterminator="\n").writerow(row)
