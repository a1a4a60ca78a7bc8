"""Training speed of SIFA (and its peers in the same run): iterations/s and the projected time of a schedule.

Measures ``train_step`` on random data (speed does not depend on the values) for
- CPU, the quick-profile shapes: 64x64, batch 4, width 0.25 and 0.125 (SIFA simultaneous and sequential update
  order, prior SIFA, CycleGAN, and the source segmenter as the unit everything is compared with);
- CPU, the papers' shapes: 256x256, batch 8, width 1.0 (a few iterations; slow on a laptop);
- CUDA, if available: the papers' shapes with bf16 autocast + channels_last, as the engine runs them.
It prints ms/iteration, iterations/s, the ratio to the source segmenter measured in the same run, and the projected
hours for 20k iterations (the papers' schedule) or minutes for the quick profile's iterations.

    .venv/bin/python benchmarks/bench_train.py [--quick-only] [--paper-iters 2] [--threads N] [--iters 10]

``--before-after`` instead compares, at the quick shapes, each method's train step in the engine's old CPU set-up
(default memory layout) with the current one (channels_last networks and batches, ``train.channels_last``),
interleaving the two so that a loaded machine slows both alike, and prints it/s (wall clock) and ms of CPU time per
iteration for each, their ratio, and the cardiac demo's schedule before (3000 iterations from scratch) and after
(``tasks.cardiac.method_options.sifa`` in params.yaml: warm start from the source segmenter, shorter schedule)::

    .venv/bin/python benchmarks/bench_train.py --before-after [--threads 2] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from siteadapt.methods import get_method
from siteadapt.methods.base import Batch, Context


def make(name: str, ctx: Context, opts: dict, device: torch.device, amp: bool):
    cls = get_method(name)
    torch.manual_seed(0)
    m = cls(ctx, cls.Options(**opts)).to(device)
    if device.type == "cuda":
        m.to(memory_format=torch.channels_last)
        m.amp_dtype = torch.bfloat16 if amp else None
        torch.backends.cudnn.benchmark = True
    m.attach_optimizers()
    m.train()
    return m


def data(ctx: Context, b: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    s = ctx.image_size
    xs = torch.rand(b, 1, s, s, generator=g) * 2 - 1
    ys = torch.randint(0, ctx.n_classes, (b, s, s), generator=g)
    xt = torch.rand(b, 1, s, s, generator=g) * 2 - 1
    if device.type == "cuda":
        xs = xs.to(device).contiguous(memory_format=torch.channels_last)
        xt = xt.to(device).contiguous(memory_format=torch.channels_last)
        ys = ys.to(device)
    return Batch(xs, ys, xt)


def time_steps(m, b: Batch, iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds per train_step over ``iters`` steps after ``warmup`` steps."""
    for _ in range(warmup):
        m.train_step(b)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m.train_step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


CANDIDATES = [  # (label, method, options)
    ("source segmenter", "source", {}),
    ("sifa (simultaneous)", "sifa", {}),
    ("sifa (sequential)", "sifa", {"update_order": "sequential"}),
    ("prior sifa (AAAI)", "sifa", {"deep_supervision": False}),
    ("cyclegan", "cyclegan", {}),
]


def run_block(title: str, size: int, batch: int, width: float, device: torch.device, iters: int, warmup: int,
              amp: bool, which: list[tuple[str, str, dict]], schedule: int) -> None:
    ctx = Context(n_classes=5, image_size=size, width=width)
    print(f"\n{title}: {size}x{size}, batch {batch}, width {width}, {device.type}"
          f"{' bf16 channels_last' if device.type == 'cuda' and amp else ''}, threads {torch.get_num_threads()}")
    print(f"{'method':24s} {'ms/it':>9s} {'it/s':>7s} {'x source':>9s} {'projected':>22s}")
    unit = None
    for label, name, opts in which:
        m = make(name, ctx, opts, device, amp)
        sec = time_steps(m, data(ctx, batch, device), iters, warmup, device)
        unit = unit or (sec if name == "source" else None)
        ratio = f"{sec / unit:9.2f}" if unit else f"{'-':>9s}"
        total = sec * schedule
        proj = f"{total / 3600:7.2f} h / {schedule} it" if total > 3600 else f"{total / 60:7.1f} min / {schedule} it"
        print(f"{label:24s} {sec * 1000:9.1f} {1 / sec:7.2f} {ratio} {proj:>22s}", flush=True)
        del m


def _interleaved(models: dict, rounds: int, per_round: int) -> dict:
    """Median wall and CPU seconds per train_step of each (model, batch) in ``models``, timed in turns."""
    wall: dict = {k: [] for k in models}
    cpu: dict = {k: [] for k in models}
    for r in range(rounds + 1):
        for k, (m, b) in models.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                m.train_step(b)
            if r:  # the first round warms up
                wall[k].append((time.perf_counter() - t) / per_round)
                cpu[k].append((time.process_time() - c) / per_round)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in models}


def before_after(rounds: int, schedule_before: int, schedule_after: int) -> None:
    """The engine's CPU set-up before (default layout) and after (channels_last) on the quick shapes."""
    cpu = torch.device("cpu")
    ctx = Context(n_classes=5, image_size=64, width=0.125)
    print(f"quick shapes 64x64, batch 4, width 0.125, threads {torch.get_num_threads()}, load "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'method':20s} {'before it/s':>11s} {'after it/s':>10s} {'x':>5s} {'before cpu ms':>13s} "
          f"{'after cpu ms':>12s} {'x':>5s}")
    proj = {}
    for label, name, opts in [CANDIDATES[0], CANDIDATES[1], CANDIDATES[4]]:
        models = {}
        for layout in ("before", "after"):
            m = make(name, ctx, opts, cpu, False)
            b = data(ctx, 4, cpu)
            if layout == "after":
                m.to(memory_format=torch.channels_last)
                b = Batch(b.src_x.contiguous(memory_format=torch.channels_last), b.src_y,
                          b.tgt_x.contiguous(memory_format=torch.channels_last))
            models[layout] = (m, b)
        res = _interleaved(models, rounds, 3)
        (wb, cb), (wa, ca) = res["before"], res["after"]
        print(f"{label:20s} {1 / wb:11.2f} {1 / wa:10.2f} {wb / wa:5.2f} {cb * 1000:13.1f} {ca * 1000:12.1f} "
              f"{cb / ca:5.2f}", flush=True)
        proj[name] = (wb, wa)
    wb, wa = proj["sifa"]
    print(f"\nSIFA per cardiac direction: before {schedule_before} it x {wb * 1000:.0f} ms = "
          f"{schedule_before * wb / 60:.1f} min; after {schedule_after} it x {wa * 1000:.0f} ms = "
          f"{schedule_after * wa / 60:.1f} min ({schedule_before * wb / (schedule_after * wa):.1f}x)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations at the quick shapes")
    ap.add_argument("--paper-iters", type=int, default=2, help="timed iterations at the paper shapes on CPU")
    ap.add_argument("--quick-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick-iterations", type=int, default=600, help="quick-profile schedule to project")
    ap.add_argument("--before-after", action="store_true", help="the engine's CPU set-up before/after (see above)")
    ap.add_argument("--rounds", type=int, default=6, help="--before-after: timed rounds of 3 steps per set-up")
    ap.add_argument("--schedule-before", type=int, default=3000)
    ap.add_argument("--schedule-after", type=int, default=1200)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.before_after:
        before_after(args.rounds, args.schedule_before, args.schedule_after)
        return 0
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    for w in (0.25, 0.125):
        run_block("CPU quick shapes", 64, 4, w, cpu, args.iters, 2, False, CANDIDATES, args.quick_iterations)
    if not args.quick_only:
        run_block("CPU paper shapes", 256, 8, 1.0, cpu, args.paper_iters, 1, False,
                  [CANDIDATES[0], CANDIDATES[1]], 20000)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        run_block("CUDA paper shapes", 256, 8, 1.0, cuda, 20, 5, True, CANDIDATES, 20000)
        run_block("CUDA paper shapes, fp32", 256, 8, 1.0, cuda, 10, 3, False, CANDIDATES[:2], 20000)
    else:
        print("\nCUDA: not available (skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
