"""Training speed of SIFA (and its peers in the same run): iterations/s and the projected time of a schedule.

Measures ``train_step`` on random data (speed does not depend on the values) for
- CPU, the quick-profile shapes: 64x64, batch 4, width 0.25 and 0.125 (SIFA simultaneous and sequential update
  order, prior SIFA, CycleGAN, and the source segmenter as the unit everything is compared with);
- CPU, the papers' shapes: 256x256, batch 8, width 1.0 (a few iterations; slow on a laptop);
- CUDA, if available: the papers' shapes with bf16 autocast + channels_last, as the engine runs them.
It prints ms/iteration, iterations/s, the ratio to the source segmenter measured in the same run, and the projected
hours for 20k iterations (the papers' schedule) or minutes for the quick profile's iterations.

    .venv/bin/python benchmarks/bench_train.py [--quick-only] [--paper-iters 2] [--threads N] [--iters 10]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations at the quick shapes")
    ap.add_argument("--paper-iters", type=int, default=2, help="timed iterations at the paper shapes on CPU")
    ap.add_argument("--quick-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick-iterations", type=int, default=600, help="quick-profile schedule to project")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
