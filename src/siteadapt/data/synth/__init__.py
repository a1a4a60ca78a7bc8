"""Synthetic hospital sites with a real domain shift (the embedded data of the demo and of every training test).

Two tasks, two sites each (``synthesize(task, out_dir, seed=..., n_subjects=..., n_images=..., scale=...)``)::

    <out>/cardiac/mr/images/case_0001.nii.gz ...      labels/case_0001.nii.gz ...           site.json
    <out>/cardiac/ct/images/<opaque>/<opaque>/IM0001 ...  labels/<AccessionNumber>.nii.gz   site.json
    <out>/chestxray/cxr_a/images/<opaque>/<opaque>/IM0001 labels/<AccessionNumber>.png      site.json
    <out>/chestxray/cxr_b/images/case_0001.png ...    labels/case_0001.png ...              site.json

``cardiac`` (3D, cross-modality MR <-> CT, the SIFA / DSAN setting; 20 subjects per site by default)
    ``mr``: black-blood (double-inversion-recovery fast spin echo-like) whole-heart MR, coronal acquisition
    (orientation LIA), 96 x 96 x 48 voxels of
    ~1.5-1.7 mm x 1.5-1.7 mm x 2.6-3.0 mm, smooth multiplicative bias field (coil profile), a faint N/2 ghost,
    Rician noise; int16 NIfTI. Since generator 1.4: slow-flow signal (blood the double inversion did not null, near
    the myocardium's level) in patches along the walls of every chamber but the aorta, amount drawn per scan.
    ``ct``: contrast-enhanced cardiac CT in Hounsfield units, axial (LPS), 160 x 160 x 64 voxels of
    ~1.05-1.2 mm x 1.05-1.2 mm x 2.0-2.5 mm (a larger field of view than the MR), in-plane correlated Gaussian noise;
    since generator 1.4 incompletely mixed contrast (filling defects in the left atrium and right heart) and residual
    cardiac motion (the heart's edges doubled by 0-4 mm in a random in-plane direction), both drawn per scan;
    one DICOM series per subject (rescale slope 1, intercept -1024) in a PACS-like tree with opaque folder names, mixed
    transfer syntaxes (explicit/implicit little endian, RLE, JPEG 2000 lossless) and invented but realistic patient
    identifiers, unique per subject; labels on exactly the grid the series describes.
    Labels (ids of SIFA's released MMWHS data): 1 MYO, 2 LAC, 3 LVC, 4 AA. Unlabelled: right heart, pericardial
    fat, other vessels, lungs, bones, liver dome, airways.

``chestxray`` (2D, cross-site, the SeUDA setting: Montgomery -> JSRT; 100 images per site by default)
    ``cxr_a``: CR radiographs, 12-bit DICOM with invented identifiers, 320 x 264 (portrait), sharp, edge-enhanced,
    white collimation borders, lead "R" marker, a burned-in text stripe; about one in eight is MONOCHROME1.
    ``cxr_b``: digitised-film look, 8-bit PNG, 256 x 256, more scatter, blurrier, noisier, film grain, a sigmoid
    tone curve centred on a dark film (overexposed for the film's speed), a heel effect (exposure falling off along
    the vertical tube axis, by 10-25% of the log-exposure range end to end), black film margins, an "L" marker.
    Since generator 1.3 the film is darker and has the heel effect: before, site B was too close to site A (a
    segmenter trained on A lost far less on B than the SeUDA paper reports for Montgomery -> JSRT).
    Labels: 1 right lung (on the image's left, radiological convention), 2 left lung (the heart is cut out).

``scale`` multiplies every matrix size (scale 0.5 halves it) and keeps the anatomy and field of view in millimetres.

The anatomy is a parametric phantom in world millimetres (:func:`phantom_cardiac`, :func:`phantom_cxr`); imaging is a
separate step that evaluates the phantom on a scanner grid (:func:`ct_grid` / :func:`mr_grid` with
:func:`render_ct` / :func:`render_mr`, and :func:`render_cxr`), so tests can check anatomy and contrast without writing
files. Subjects of different sites are different random people (independent random streams).

Tissue-to-intensity mappings differ non-monotonically between MR and CT (fat: dark in CT, bright in MR; bone:
brightest in CT, darkest in MR; marrow and CSF swap places too), so that histogram matching cannot undo the shift.

Why generator 1.4 added per-scan flow and motion artifacts: up to 1.3 every appearance difference between the sites
was a function of tissue and anatomy, which an image translator (CycleGAN) can learn exactly; SIFA's feature
alignment exists for what translation leaves open. Slow flow, contrast mixing and motion are real, frequent, and drawn
per scan, independent of the anatomy and of the other modality, so a deterministic translator cannot make them from a
source image. They are drawn from a generator spawned beside the rendering's own (:func:`_side_rng`): every other
random draw, hence every 1.3 image outside the artifacts, is unchanged.

Everything is deterministic for a seed (independent of the number of worker processes); files are byte-identical on
re-run. A site is written into a hidden temporary folder beside its final place and renamed at the end, so a killed
run leaves no half site behind (and keeps the previous one).

Modules: :mod:`.common` (random streams, invented identifiers, site-writing plumbing), :mod:`.cardiac` and
:mod:`.chestxray` (each task's phantom, imaging and per-subject writer), :mod:`.sites` (the two segmentation tasks'
sites and ``site.json``), :mod:`.pneumonia` (the classification task, imported only when asked for). The manifests
keep naming the generators ``siteadapt.data.synth`` and ``siteadapt.data.synth_pneumonia``, as before the split.
"""


from pathlib import Path

from .cardiac import (AIR, BLOOD, BLOOD_R, CARDIAC_LABELS, CARTILAGE, CORTICAL, CSF, FAT, LIVER, LUNG, MARROW,
                      MUSCLE, MYOCARD, TISSUES, VESSEL, CardiacPhantom, _evaluate_grid, _slow_flow, _spacing, ct_grid,
                      mr_grid, phantom_cardiac, render_ct, render_mr)
from .chestxray import (CXR_LABELS, CXR_STYLES, _cxr_subject, expose_radiograph, heel_ramp, phantom_cxr, render_cxr,
                        write_radiograph_dicom)
from .common import _default_workers, _rng
from .sites import GENERATOR_VERSION, _write_site

TASKS = ("cardiac", "chestxray", "pneumonia")  # pneumonia: image-level labels, see pneumonia.py
SITES = {"cardiac": ("mr", "ct"), "chestxray": ("cxr_a", "cxr_b"), "pneumonia": ("adult", "pediatric")}
DEFAULT_SUBJECTS = 20
DEFAULT_IMAGES = 100



def synthesize(task: str, out_dir: Path, *, seed: int = 0, n_subjects: int | None = None,
               n_images: int | None = None, scale: float = 1.0, workers: int | None = None) -> dict:
    """Write the synthetic sites of ``task`` under ``out_dir/<task>/<site>/`` and return
    ``{site: {"n": ..., "format": ..., "path": ...}}``.

    ``n_subjects`` (cardiac, default 20 per site) / ``n_images`` (chestxray, default 100 per site) set the counts;
    ``scale`` shrinks (or grows) every matrix while keeping the anatomy and field of view in millimetres;
    ``workers`` processes render subjects in parallel (default: the usable CPUs, at most 4; results do not depend
    on it). Deterministic for a seed: a re-run writes byte-identical files.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    if not (0.1 <= float(scale) <= 4.0):
        raise ValueError(f"scale must lie in [0.1, 4], got {scale}")
    n = (n_subjects or DEFAULT_SUBJECTS) if task == "cardiac" else (n_images or DEFAULT_IMAGES)
    if n < 1:
        raise ValueError("need at least one subject/image per site")
    workers = _default_workers() if workers is None else max(1, int(workers))
    if task == "pneumonia":  # classification sites (adult DICOM + labels.csv, pediatric PNG folder per class)
        from .pneumonia import synthesize_pneumonia

        return synthesize_pneumonia(out_dir, seed=int(seed), n_images=int(n), scale=float(scale), workers=workers)
    base = Path(out_dir) / task
    return {site: _write_site(task, site, base / site, int(seed), int(n), float(scale), workers)
            for site in SITES[task]}
