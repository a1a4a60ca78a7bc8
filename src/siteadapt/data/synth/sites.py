"""Writing the segmentation tasks' sites (``cardiac``, ``chestxray``): the per-site plan (invented patients, opaque
folder names, transfer syntaxes) drawn from its own stream, one job per subject, and ``site.json``.
"""

from __future__ import annotations

from pathlib import Path

from .cardiac import CARDIAC_LABELS, _cardiac_subject, _ct_transfer_syntax
from .chestxray import CXR_LABELS, CXR_STYLES, _cxr_subject
from .common import _atomic_dir, _fake_patients, _opaque, _range, _rng, _run_jobs

GENERATOR_VERSION = "1.4.0"


def _write_site(task: str, site: str, final: Path, seed: int, n: int, scale: float, workers: int) -> dict:
    from ...io.atomic import write_json

    plan_rng = _rng(seed, task, site, "plan")
    with _atomic_dir(final) as root:
        (root / "images").mkdir()
        (root / "labels").mkdir()
        jobs = [{"site": site, "seed": seed, "i": i, "scale": scale, "root": str(root)} for i in range(n)]
        if site in ("ct", "cxr_a"):
            people = _fake_patients(plan_rng, n, site)
            used: set = set()
            for i, (job, person) in enumerate(zip(jobs, people)):
                plan = {"patient": person, "study": _opaque(plan_rng, used), "series": _opaque(plan_rng, used)}
                if site == "ct":
                    plan.update(ts=_ct_transfer_syntax(i), series_number=int(plan_rng.integers(2, 9)))
                else:
                    plan.update(ts={2: "rle", 6: "jpeg2000_lossless"}.get(i % 9, "explicit_le"),
                                photometric="MONOCHROME1" if i % 8 == 5 else "MONOCHROME2")
                job["plan"] = plan
        fn = _cardiac_subject if task == "cardiac" else _cxr_subject
        facts = _run_jobs(fn, jobs, workers)
        info = {
            "task": task, "site": site, "n": n, "seed": seed, "scale": scale,
            "generator": "siteadapt.data.synth", "generator_version": GENERATOR_VERSION, "synthetic": True,
            "images": "images", "labels": "labels",
        }
        if task == "cardiac":
            info["structures"] = dict(CARDIAC_LABELS)
            info["shape_range"] = _range([f["shape"] for f in facts])
            info["spacing_mm_range"] = _range([f["spacing"] for f in facts])
            info["label_ml_range"] = {k: _range([f["label_ml"][k] for f in facts]) for k in CARDIAC_LABELS}
            if site == "ct":
                info.update(format="dicom", modality="CT", units="HU", orientation="LPS (axial)",
                            label_naming="<AccessionNumber>.nii.gz on the CT grid",
                            transfer_syntaxes=sorted({_ct_transfer_syntax(i) for i in range(n)}),
                            contains_phi=True)
            else:
                info.update(format="nifti", modality="MR", units="arbitrary (black-blood FSE-like)",
                            orientation="LIA (coronal)", label_naming="same file name as the image")
        else:
            st = CXR_STYLES[site]
            info["structures"] = dict(CXR_LABELS)
            info["shape_range"] = _range([f["shape"] for f in facts])
            info["pixel_spacing_mm"] = facts[0]["pixel_mm"] if facts else None
            info["label_cm2_range"] = {k: _range([f["label_cm2"][k] for f in facts]) for k in CXR_LABELS}
            info["bits"] = st["bits"]
            if site == "cxr_a":
                info.update(format="dicom", modality=st["modality"], contains_phi=True,
                            label_naming="<AccessionNumber>.png (rows x cols of the image)",
                            photometric=["MONOCHROME2", "MONOCHROME1"] if n > 5 else ["MONOCHROME2"])
            else:
                info.update(format="png", modality=st["modality"], label_naming="same file name as the image")
        write_json(root / "site.json", info)
    return {"n": n, "format": info["format"], "path": str(final)}
