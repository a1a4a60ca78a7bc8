"""Time ASSD + HD95 on a 256x256x128 pair of label maps (4 structures): siteadapt vs medpy vs MONAI.

Run:  .venv/bin/python benchmarks/bench_metrics.py [--repeat 3] [--spacing 0.8 0.8 1.6] [--shape 256 256 128]

The masks imitate a cardiac CT crop (MMWHS-like labels 1 MYO, 2 LAC, 3 LVC, 4 AA): smooth, irregular
ellipsoids (the myocardium a thick shell), the prediction a shifted, differently roughened copy plus a false
positive island. Every implementation gets the same label maps and spacing, and computes both metrics for all
four structures; the per-structure masks (medpy) and the one-hot tensors (MONAI) are built inside the timed
region for medpy, outside it for MONAI (the MONAI timing is therefore favourable to MONAI; the one-hot
time is printed separately). Reported: seconds (best and median of --repeat runs; medpy runs once by default),
ratios, and the largest absolute difference between the results where the definitions coincide:
ASSD (pooled) against medpy >= 0.5 and MONAI; HD95 (max of directed 95th percentiles) against MONAI; and our
``hd95_pooling="pooled"`` against medpy's pooled HD95.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from siteadapt.metrics import segmentation_metrics  # noqa: E402

LABELS = {"MYO": 1, "LAC": 2, "LVC": 3, "AA": 4}
# centre (voxels), radii (voxels); the myocardium is hollowed out below
STRUCTURES = {
    1: ((128, 120, 64), (46, 42, 34)),
    2: ((96, 160, 74), (28, 30, 22)),
    3: ((130, 118, 62), (30, 26, 24)),
    4: ((86, 96, 84), (12, 12, 40)),
}


def _noise(shape, rng, factor=4, sigma=1.5):
    """Smooth unit-variance noise: filtered at 1/factor resolution, linearly upsampled to ``shape``."""
    small = tuple(max(2, s // factor) for s in shape)
    n = ndi.gaussian_filter(rng.standard_normal(small), sigma)
    n /= n.std() + 1e-12
    up = ndi.zoom(n, [s / t for s, t in zip(shape, small)], order=1, grid_mode=False)
    out = np.zeros(shape)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(shape, up.shape))
    out[sl] = up[sl]
    return out


def _blob(shape, centre, radii, rng, rough):
    """Ellipsoid whose boundary is pushed in and out by smooth noise (computed in its bounding box only)."""
    box = tuple(slice(max(0, int(c - 1.5 * r)), min(s, int(c + 1.5 * r) + 1)) for c, r, s in zip(centre, radii, shape))
    grids = np.ogrid[box]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    noise = _noise(tuple(b.stop - b.start for b in box), rng)
    out = np.zeros(shape, bool)
    out[box] = r2 < 1.0 + rough * noise
    return out


def make_pair(shape=(256, 256, 128), seed=0):
    rng = np.random.default_rng(seed)
    scale = np.asarray(shape, float) / np.asarray((256, 256, 128), float)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for lab, (centre, radii) in STRUCTURES.items():
        c = tuple(np.asarray(centre) * scale)
        r = tuple(np.asarray(radii) * scale)
        c_pred = tuple(x + rng.uniform(-2.0, 2.0) for x in c)
        for target, cc, rough in ((ref, c, 0.15), (pred, c_pred, 0.22)):
            m = _blob(shape, cc, r, rng, rough)
            if lab == 1:
                m &= ~_blob(shape, cc, tuple(x * 0.72 for x in r), rng, rough)
            target[m & (target == 0)] = lab
    # a false-positive island of the LVC label
    i, j, k = (int(x) for x in np.asarray((200, 30, 10)) * scale)
    pred[i:i + 6, j:j + 6, k:k + 4] = 3
    return pred, ref


def _time(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.6))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--medpy-repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape, spacing = tuple(args.shape), tuple(args.spacing)

    t0 = time.perf_counter()
    pred, ref = make_pair(shape, args.seed)
    print(f"shape {shape}, spacing {spacing}, generated in {time.perf_counter() - t0:.1f} s")
    for name, k in LABELS.items():
        print(f"  {name}: ref {int((ref == k).sum())} voxels, pred {int((pred == k).sum())} voxels")

    names = list(LABELS)
    results: dict[str, dict] = {}
    times: dict[str, list[float]] = {}

    def ours():
        rep = segmentation_metrics(pred, ref, LABELS, spacing, metrics=("assd", "hd95"))
        return {"assd": [rep["assd"][n] for n in names], "hd95": [rep["hd95"][n] for n in names]}

    ours()  # warm-up (imports, caches)
    results["siteadapt"], times["siteadapt"] = _time(ours, args.repeat)
    pooled = segmentation_metrics(pred, ref, LABELS, spacing, metrics=("hd95",), hd95_pooling="pooled")
    ours_hd95_pooled = [pooled["hd95"][n] for n in names]

    try:
        from medpy.metric import binary as mb
    except ImportError:
        mb = None
    if mb is not None:
        def run_medpy():
            a, h = [], []
            for k in LABELS.values():
                p, r = pred == k, ref == k
                a.append(mb.assd(p, r, spacing))
                h.append(mb.hd95(p, r, spacing))
            return {"assd": a, "hd95": h}

        results["medpy"], times["medpy"] = _time(run_medpy, args.medpy_repeat)
    else:
        print("medpy not installed: skipped")

    try:
        import torch
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    except ImportError:
        torch = None
        print("monai not installed: skipped")
    if torch is not None:
        t0 = time.perf_counter()
        ids = [0] + list(LABELS.values())
        oh_p = torch.from_numpy(np.stack([pred == k for k in ids])[None])
        oh_r = torch.from_numpy(np.stack([ref == k for k in ids])[None])
        t_onehot = time.perf_counter() - t0

        def run_monai():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = compute_average_surface_distance(oh_p, oh_r, symmetric=True, spacing=spacing)
                h = compute_hausdorff_distance(oh_p, oh_r, percentile=95, spacing=spacing)
            return {"assd": a[0].tolist(), "hd95": h[0].tolist()}

        run_monai()  # warm-up
        results["monai"], times["monai"] = _time(run_monai, args.repeat)
        print(f"(MONAI one-hot tensors built in {t_onehot:.2f} s, not timed)")

    print("\nseconds for ASSD + HD95, 4 structures (best / median of runs):")
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:10s} {min(v):8.3f} / {statistics.median(v):8.3f}   ({len(v)} run(s))")
    print("ratios (their best time / ours):")
    for k in best:
        if k != "siteadapt":
            print(f"  {k:10s} {best[k] / best['siteadapt']:8.1f}x")

    print("\nper structure:", ", ".join(names))
    for k, res in results.items():
        print(f"  {k:10s} assd " + " ".join(f"{x:8.4f}" for x in res["assd"])
              + "   hd95 " + " ".join(f"{x:8.4f}" for x in res["hd95"]))
    print(f"  {'ours-pool':10s} hd95 (pooled, medpy's definition) " + " ".join(f"{x:8.4f}" for x in ours_hd95_pooled))

    print("\nmax |difference| to siteadapt:")
    o = results["siteadapt"]
    if "medpy" in results:
        m = results["medpy"]
        print(f"  medpy  assd            {np.max(np.abs(np.subtract(o['assd'], m['assd']))):.3e}")
        print(f"  medpy  hd95 (pooled)   {np.max(np.abs(np.subtract(ours_hd95_pooled, m['hd95']))):.3e}")
        print(f"  medpy  hd95 (default; definitions differ) "
              f"{np.max(np.abs(np.subtract(o['hd95'], m['hd95']))):.3e}")
    if "monai" in results:
        m = results["monai"]
        print(f"  monai  assd            {np.max(np.abs(np.subtract(o['assd'], m['assd']))):.3e}  (MONAI is float32)")
        print(f"  monai  hd95            {np.max(np.abs(np.subtract(o['hd95'], m['hd95']))):.3e}  (MONAI is float32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
