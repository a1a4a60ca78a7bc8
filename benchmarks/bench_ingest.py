"""Ingest speed: dcm2niix vs siteadapt vs a plain pydicom loop, on one CT-like series.

    python benchmarks/bench_ingest.py                 # builds a 300-slice 512x512 int16 series in a temp folder
    python benchmarks/bench_ingest.py --dir SERIES    # times an existing single-series folder instead

Each contender goes from the DICOM folder to a .nii.gz on disk:
  (a) ``dcm2niix -z y -b n``;
  (b) siteadapt ``scan_tree`` + ``read_series`` + ``save_nifti``;
  (c) ``pydicom.dcmread(f).pixel_array`` for every file, sorted by ImagePositionPatient, stacked, the same save.
Timings are the best of ``--repeat`` runs (the files are in the page cache after the first build/run).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from siteadapt.io.dicom import read_series, scan_tree
from siteadapt.io.dicom_write import write_series
from siteadapt.io.volume import save_nifti


def dcm2niix_bin() -> str:
    cand = Path(sys.executable).parent / "dcm2niix"
    if cand.exists():
        return str(cand)
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except ImportError:
        found = shutil.which("dcm2niix")
        if not found:
            raise SystemExit("dcm2niix not found (pip install dcm2niix)")
        return found


def build_series(folder: Path, n_slices: int = 300, size: int = 512) -> None:
    rng = np.random.default_rng(0)
    # CT-like: a body ellipse of soft tissue with noise, air outside, some bone; HU stored with intercept -1024
    y, x = np.mgrid[0:size, 0:size]
    body = ((x - size / 2) / (0.42 * size)) ** 2 + ((y - size / 2) / (0.33 * size)) ** 2 < 1
    bone = ((x - size / 2) / (0.05 * size)) ** 2 + ((y - size * 0.65) / (0.05 * size)) ** 2 < 1
    base = np.where(body, 40, -1000).astype(np.int16)
    base[bone] = 900
    data = np.empty((size, size, n_slices), dtype=np.int16)
    for k in range(n_slices):
        data[:, :, k] = (base + rng.normal(0, 12, base.shape).astype(np.int16)).T
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    affine[:3, 3] = [180.0, 180.0, -150.0]
    # InstanceNumber-ordered names: dcm2niix relies on InstanceNumber (with shuffled numbers it drops slices)
    write_series(folder, data, affine, modality="CT", patient={"PatientID": "BENCH"}, rescale=(1.0, -1024.0),
                 file_names="instance")


def run_dcm2niix(src: Path, out: Path) -> tuple:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run([dcm2niix_bin(), "-z", "y", "-b", "n", "-f", "%s", "-o", str(out), str(src)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import nibabel as nib

    outs = sorted(out.glob("*.nii.gz"))
    return tuple(nib.load(str(outs[0])).shape) if len(outs) == 1 else tuple(len(outs) * [0])


SPLIT: dict[str, float] = {}


def run_siteadapt(src: Path, out: Path) -> tuple:
    t0 = time.perf_counter()
    series, _ = scan_tree(src)
    if len(series) != 1:
        raise SystemExit(f"expected one series in {src}, found {len(series)}")
    t1 = time.perf_counter()
    vol = read_series(series[0])
    t2 = time.perf_counter()
    save_nifti(vol, out / "siteadapt.nii.gz")
    t3 = time.perf_counter()
    if not SPLIT or t3 - t0 < sum(SPLIT.values()):
        SPLIT.update(scan=t1 - t0, read=t2 - t1, save=t3 - t2)
    return vol.data.shape


def run_plain(src: Path, out: Path) -> tuple:
    slices = []
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        ds = pydicom.dcmread(f)
        slices.append(ds)
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=float), normal)))
    stack = np.stack([d.pixel_array for d in slices], axis=-1)
    slope, icpt = float(slices[0].get("RescaleSlope", 1)), float(slices[0].get("RescaleIntercept", 0))
    vals = stack.astype(np.int16) if slope == 1 else stack.astype(np.float32) * slope
    vals = vals + np.int16(icpt) if slope == 1 else vals + icpt
    data = np.swapaxes(vals, 0, 1)  # (cols, rows, slices)
    ps = [float(v) for v in slices[0].PixelSpacing]
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * ps[1]
    lps[:3, 1] = iop[3:] * ps[0]
    p0 = np.array(slices[0].ImagePositionPatient, dtype=float)
    p1 = np.array(slices[-1].ImagePositionPatient, dtype=float)
    lps[:3, 2] = (p1 - p0) / max(1, len(slices) - 1)
    lps[:3, 3] = p0
    save_nifti(data, out / "plain.nii.gz", np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    return data.shape


def best_of(fn, repeat: int, *args):
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="an existing folder holding one series (default: build one)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        tmp = Path(tmp)
        src = args.dir
        if src is None:
            src = tmp / "series"
            t0 = time.perf_counter()
            build_series(src, args.slices, args.size)
            print(f"built {args.slices} x {args.size}x{args.size} int16 CT series in {time.perf_counter() - t0:.1f} s")
        n_files = sum(1 for p in src.iterdir() if p.is_file())
        mb = sum(p.stat().st_size for p in src.iterdir() if p.is_file()) / 1e6
        print(f"series: {src} ({n_files} files, {mb:.0f} MB)")
        outs = {k: tmp / f"out_{k}" for k in ("dcm2niix", "siteadapt", "plain")}
        for o in outs.values():
            o.mkdir()
        t_d, shape_d = best_of(run_dcm2niix, args.repeat, src, outs["dcm2niix"])
        t_s, shape = best_of(run_siteadapt, args.repeat, src, outs["siteadapt"])
        t_p, shape_p = best_of(run_plain, args.repeat, src, outs["plain"])
        print(f"volume shape: siteadapt {shape}, dcm2niix {shape_d}, plain {shape_p}")
        if tuple(shape_d[:3]) != tuple(shape[:3]):
            print("WARNING: dcm2niix did not produce the same volume; its time is not comparable")
        print(f"(a) dcm2niix -z y                        {t_d:7.2f} s")
        print(f"(b) siteadapt scan+read+save_nifti       {t_s:7.2f} s   (scan {SPLIT['scan']:.2f}, read "
              f"{SPLIT['read']:.2f}, save_nifti {SPLIT['save']:.2f})")
        print(f"(c) plain pydicom loop + save_nifti      {t_p:7.2f} s")
        print(f"ours / dcm2niix = {t_s / t_d:.2f}   (target <= 3)")
        print(f"ours / plain    = {t_s / t_p:.2f}   (target < 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
