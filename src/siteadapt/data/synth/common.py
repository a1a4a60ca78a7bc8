"""What the synthetic-site generators of every task share: seeded random streams, small geometry helpers, invented
patient identifiers (so that de-identification downstream has something to remove) and the plumbing that writes a
site (a hidden temporary folder renamed at the end, worker processes, value ranges for ``site.json``).

Nothing here draws from a random stream the caller did not hand in, so moving code between the task modules leaves
every generated file unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

# ====================================================================================================================
# random streams and geometry


def _key(*parts) -> list[int]:
    """Stable integer entropy for SeedSequence from ints and strings (no Python hash randomisation)."""
    out = []
    for p in parts:
        out.append(int(p) & 0xFFFFFFFF if isinstance(p, (int, np.integer)) else zlib.crc32(str(p).encode()))
    return out


def _rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_key(seed, *parts)))


def _side_rng(rng: np.random.Generator) -> np.random.Generator:
    """A generator spawned from ``rng``'s seed sequence without drawing from ``rng``: what is added with it leaves every
    other random draw of a rendering as it was (the artifacts of generator 1.4 on the images of 1.3)."""
    return np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotation(axis, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix."""
    k = _unit(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * (K @ K)


def _random_rotation(rng, max_deg: float) -> np.ndarray:
    return _rotation(rng.normal(size=3), np.radians(rng.uniform(0, max_deg)))


# ====================================================================================================================
# fake patient identifiers (so that de-identification downstream is exercised); all invented


_GIVEN_F = ("JANE", "MARY", "ANNA", "LINDA", "SUSAN", "KAREN", "NANCY", "LISA", "BETTY", "HELEN", "SANDRA", "DONNA",
            "CAROL", "RUTH", "SHARON", "MICHELLE", "LAURA", "SARAH", "KIMBERLY", "DEBORAH", "JESSICA", "SHIRLEY",
            "CYNTHIA", "ANGELA", "MELISSA", "BRENDA", "AMY", "EMMA", "OLIVIA", "SOFIA", "MAYA", "INGRID", "YUKI")
_GIVEN_M = ("JOHN", "ROBERT", "MICHAEL", "WILLIAM", "DAVID", "RICHARD", "JOSEPH", "THOMAS", "CHARLES", "DANIEL",
            "MATTHEW", "ANTHONY", "MARK", "DONALD", "STEVEN", "PAUL", "ANDREW", "JOSHUA", "KENNETH", "KEVIN", "BRIAN",
            "GEORGE", "EDWARD", "RONALD", "TIMOTHY", "JASON", "JEFFREY", "RYAN", "OMAR", "HIROSHI", "LARS", "RAJ")
_FAMILY = ("DOE", "ROE", "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ",
           "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
           "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON",
           "WALKER", "YOUNG", "ALLEN", "KING", "WRIGHT", "SCOTT", "TORRES", "NGUYEN", "HILL", "FLORES", "GREEN",
           "ADAMS", "NELSON", "BAKER", "HALL", "RIVERA", "CAMPBELL", "MITCHELL", "CARTER", "ROBERTS", "OKAFOR",
           "KOWALSKI", "LINDQVIST", "TANAKA", "PATEL", "MUELLER", "ROSSI", "DUBOIS", "NOVAK", "SILVA", "IVANOVA")
_INSTITUTION = {
    "ct": ("Saint Elsewhere General Hospital", "1 Elsewhere Plaza^Springfield^XX^00001"),
    "cxr_a": ("Lakeside County Medical Center", "400 Shore Drive^Lakeside^XX^00002"),
}


def _fake_patients(rng, n: int, site: str) -> list[dict]:
    """``n`` invented but realistic patient/study identifiers, unique per subject (names, IDs, accession numbers)."""
    inst, addr = _INSTITUTION[site]
    used = set()
    out = []
    while len(out) < n:
        female = rng.uniform() < 0.5
        given = str(rng.choice(_GIVEN_F if female else _GIVEN_M))
        family = str(rng.choice(_FAMILY))
        middle = str(rng.choice(list("ABCDEFGHJKLMNPRSTW"))) if rng.uniform() < 0.3 else ""
        name = f"{family}^{given}" + (f"^{middle}" if middle else "")
        pid = f"HSP{int(rng.integers(1_000_000, 9_999_999))}"
        acc = f"ACC{int(rng.integers(10_000_000, 99_999_999))}"
        if name in used or pid in used or acc in used:
            continue
        used.update((name, pid, acc))
        by = int(rng.integers(1935, 2004))
        birth = f"{by}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        sy = int(rng.integers(2016, 2025))
        study = f"{sy}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        ref_f = str(rng.choice(_FAMILY))
        ref_g = str(rng.choice(_GIVEN_F + _GIVEN_M))
        out.append({
            "PatientName": name, "PatientID": pid, "PatientBirthDate": birth, "PatientSex": "F" if female else "M",
            "PatientAge": f"{sy - by:03d}Y", "InstitutionName": inst, "InstitutionAddress": addr,
            "ReferringPhysicianName": f"{ref_f}^{ref_g}^^DR", "AccessionNumber": acc, "StudyDate": study,
            "SeriesDate": study, "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}"
                                            f"{int(rng.integers(0, 60)):02d}",
            "OperatorsName": f"{str(rng.choice(_FAMILY))}^{str(rng.choice(_GIVEN_F + _GIVEN_M))}",
            "StudyDescription": "CT CARDIAC ANGIO" if site == "ct" else "CHEST PA",
        })
    return out


def _opaque(rng, used: set, n: int = 8) -> str:
    while True:
        name = "".join(rng.choice(list("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"), n))
        if name not in used:
            used.add(name)
            return name


# ====================================================================================================================
# writing sites


@contextlib.contextmanager
def _atomic_dir(final: Path):
    """Yield a fresh folder beside ``final``; on success it replaces ``final`` by a rename (a killed run leaves only a
    hidden ``.<name>.tmp-*`` folder, removed by the next run)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in list(final.parent.glob(f".{final.name}.tmp-*")) + list(final.parent.glob(f".{final.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _quiet_encoders():
    """The JPEG 2000 encoder logs one INFO line per tile; keep the user's log readable while we encode."""
    import logging

    lg = logging.getLogger("openjpeg")
    old = lg.level
    lg.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        lg.setLevel(old)


def _run_jobs(fn, jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        return list(ex.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def _default_workers() -> int:
    env = os.environ.get("SITEADAPT_SYNTH_WORKERS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def _range(values) -> list:
    a = np.asarray(values)
    if a.dtype.kind in "iu":
        return [a.min(0).tolist(), a.max(0).tolist()]
    a = a.astype(np.float64)
    return [a.min(0).round(3).tolist(), a.max(0).round(3).tolist()]
