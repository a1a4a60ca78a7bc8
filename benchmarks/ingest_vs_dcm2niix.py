"""Wall time of ``siteadapt ingest`` on a one-file DICOM series against dcm2niix on the same folder.

Usage: ``python benchmarks/ingest_vs_dcm2niix.py [--runs 5] [--series DIR ...]``

The series measured by default is made here (one 2D CR radiograph written by the project's DICOM writer), so the
script runs on any machine; the one-file Siemens mosaic under ``../shared/data/dicom`` is added when that folder
exists beside the checkout, and ``--series`` adds any other folders. Each command runs ``--runs`` times, alternating
between the two tools, in fresh processes (start-up and imports included, as a user sees them); the table gives the
median wall time of each and their ratio. Two more rows give the floor a Python ingest cannot go under: the bare
interpreter and the import of the three libraries the DICOM -> NIfTI path needs (numpy, pydicom, nibabel).

dcm2niix is taken from the PATH or from beside the running interpreter (PyPI ``dcm2niix``); without it only the
ingest column is filled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_MOSAIC = REPO.parent / "shared" / "data" / "dicom" / "siemens_mosaic_uncompressed"


def _one_file_radiograph(folder: Path) -> Path:
    """A CR radiograph, 320 x 264, 12 bit, written as the only file of its series."""
    import numpy as np

    sys.path.insert(0, str(REPO / "src"))
    from siteadapt.io.dicom_write import write_2d

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(2000, 300, (320, 264)), 0, 4095)
    patient = {"PatientName": "BENCH^ONE", "PatientID": "BENCH1", "AccessionNumber": "ACC1", "StudyDate": "20240101"}
    folder.mkdir(parents=True)
    write_2d(folder / "IM0001", img, modality="CR", pixel_spacing=(1.3, 1.3), patient=patient, seed="bench")
    return folder


def _wall(cmd: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr.decode()[-2000:]}")
    return dt


def _dcm2niix() -> str | None:
    here = Path(sys.executable).parent / "dcm2niix"
    return shutil.which("dcm2niix") or (str(here) if here.exists() else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--series", type=Path, nargs="*", default=[], help="more one-series folders to measure")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        env = {**os.environ, "SITEADAPT_DEID_KEY": "0" * 32 + "bench", "SITEADAPT_TRACKING": "off",
               "SITEADAPT_UID_MAP_DIR": str(tmp / "keys"), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("SITEADAPT_PROFILE", None)
        cases = [("synthetic CR radiograph (1 file)", _one_file_radiograph(tmp / "series" / "cr"), "cxr_a")]
        if SHARED_MOSAIC.is_dir():
            cases.append(("siemens_mosaic_uncompressed (1 file)", SHARED_MOSAIC, "cardiac_mr"))
        cases += [(p.name, p, "cardiac_mr") for p in args.series]
        work = tmp / "work"
        work.mkdir()
        exe = _dcm2niix()
        py = sys.executable
        floor = {"python -c pass": [py, "-c", "pass"],
                 "python: import numpy, pydicom, nibabel": [py, "-c", "import numpy, pydicom, nibabel"]}

        rows = []
        for label, cmd in floor.items():
            rows.append((label, statistics.median(_wall(cmd, env, work) for _ in range(args.runs)), None))
        for label, folder, site in cases:
            ours, theirs = [], []
            for i in range(args.runs):
                out = tmp / f"out-{len(rows)}-{i}"
                ours.append(_wall([py, "-m", "siteadapt.cli", "--params", str(REPO / "params.yaml"), "ingest",
                                   str(folder), "--site", site, "--no-labels", "--data-root", str(out)], env, work))
                if exe:
                    d = tmp / f"d-{len(rows)}-{i}"
                    d.mkdir()
                    theirs.append(_wall([exe, "-z", "y", "-b", "y", "-ba", "y", "-f", "%s_%p", "-o", str(d),
                                         str(folder)], env, work))
            rows.append((f"ingest: {label}", statistics.median(ours), statistics.median(theirs) if theirs else None))

        print(f"median of {args.runs} runs, wall seconds (fresh processes)")
        print(f"{'case':58s} {'siteadapt':>10s} {'dcm2niix':>10s} {'ratio':>7s}")
        for label, a, b in rows:
            print(f"{label:58s} {a:10.3f} {'' if b is None else f'{b:10.3f}':>10s} "
                  f"{'' if not b else f'{a / b:6.1f}x':>7s}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
