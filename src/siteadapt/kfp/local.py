"""``siteadapt pipeline run-local``: the whole Kubeflow pipeline on this machine, on tiny synthetic sites.

The pipeline gets ``params_yaml`` = the project's params plus a ``tiny`` profile (32x32 slices, a few dozen
iterations), so that every step -- including GPU steps, which run on the CPU here -- finishes in seconds. The sites are
the task's synthetic ones, written at a small scale; the target is registered under a new site name, as a new hospital
would be.
"""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_PROFILE = {"image_size": 32, "batch_size": 2, "iterations": 20, "width": 0.25, "synth_scale": 0.25,
                "synth_subjects": 6, "synth_images": 12, "slice_spacing_mm": 6.0}
CXR_B_SPACING_AT_SCALE_1 = 1.4  # mm per pixel of the synthetic PNG site at synth scale 1 (see params.yaml)
PEDIATRIC_SPACING_AT_SCALE_1 = 0.9  # the synthetic pediatric PNG site (pneumonia), likewise
PNEUMONIA_IMAGES = 60  # per site: the classification metrics need both classes in small val/test splits


def tiny_params(params_path: str | Path = "params.yaml", profile: str = "tiny") -> str:
    """The project's params with the ``tiny`` profile added (a params file may define its own ``tiny``)."""
    data = yaml.safe_load(Path(params_path).read_text()) or {}
    data.setdefault("profiles", {}).setdefault(profile, dict(TINY_PROFILE))
    data["profile"] = profile
    return yaml.safe_dump(data, sort_keys=False)


def demo_sites(task: str, root: str | Path, *, scale: float = TINY_PROFILE["synth_scale"],
               n: int | None = None, seed: int = 0) -> dict:
    """Write the task's synthetic sites under ``root`` and return the pipeline arguments of the first direction
    (source site and location; target location and the facts a PNG site cannot carry)."""
    from ..data.synth import synthesize

    root = Path(root)
    if task == "chestxray":
        synthesize(task, root, seed=seed, n_images=n or TINY_PROFILE["synth_images"], scale=scale, workers=1)
        return {"task": task, "source_site": "cxr_a", "source_uri": str(root / "chestxray" / "cxr_a"),
                "target_uri": str(root / "chestxray" / "cxr_b"), "target_modality": "DX",
                "target_pixel_spacing_mm": CXR_B_SPACING_AT_SCALE_1 / scale}
    if task == "cardiac":
        synthesize(task, root, seed=seed, n_subjects=n or TINY_PROFILE["synth_subjects"], scale=scale, workers=1)
        return {"task": task, "source_site": "cardiac_mr", "source_uri": str(root / "cardiac" / "mr"),
                "target_uri": str(root / "cardiac" / "ct"), "target_modality": "", "target_pixel_spacing_mm": 0.0}
    if task == "pneumonia":  # classification: adult DICOM + labels.csv, pediatric PNG in one folder per class
        synthesize(task, root, seed=seed, n_images=n or PNEUMONIA_IMAGES, scale=scale, workers=1)
        return {"task": task, "source_site": "adult", "source_uri": str(root / "pneumonia" / "adult"),
                "target_uri": str(root / "pneumonia" / "pediatric"), "target_modality": "DX",
                "target_pixel_spacing_mm": PEDIATRIC_SPACING_AT_SCALE_1 / scale}
    raise ValueError(f"no synthetic sites for task {task!r} (cardiac, chestxray, pneumonia)")
