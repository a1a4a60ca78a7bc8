"""``siteadapt site add`` (issue 20, item 8): a new site in a temporary copy of the project's params.yaml.

Checks: the site and its direction are written, every original line (comments included) is kept in order and only the
new lines are added, dvc.yaml gets the new site's stages and is what ``siteadapt dvc-gen`` gives; bad requests exit
2 (SiteRefused) with params.yaml and dvc.yaml byte-identical and no file left behind; the assumed-spacing warning.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from siteadapt import dvcgen
from siteadapt.cli import main
from siteadapt.config import load_settings
from siteadapt.errors import ConfigError, SiteRefused
from siteadapt.steps.site import add_site, new_params_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A project folder: the repository's params.yaml, dvc.yaml generated from it, a folder of three PNGs (and
    their label PNGs) and a folder with one small NIfTI volume (built once; each test works on a copy)."""
    root = tmp_path_factory.mktemp("template")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SITEADAPT_PROFILE", raising=False)
        mp.chdir(root)
        dvcgen.write(load_settings("params.yaml"), "params.yaml", "dvc.yaml")
    (root / "pngs").mkdir()
    (root / "pngs_labels").mkdir()
    for i in range(3):
        Image.fromarray(np.full((24, 32), 40 * (i + 1), np.uint8)).save(root / "pngs" / f"x{i}.png")
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "pngs_labels" / f"x{i}.png")
    (root / "vols").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.int16), np.eye(4)), str(root / "vols" / "v0.nii.gz"))
    from siteadapt.io.dicom_write import write_2d, write_series

    patient = {"PatientName": "Doe^Jane", "PatientID": "PID-4711"}
    for i in range(2):  # two radiographs (CR, with PixelSpacing) and one 4-slice CT series
        write_2d(root / "dcm2d" / f"r{i}.dcm", np.full((20, 16), 100 * (i + 1)), patient=patient, seed=i)
    write_series(root / "dcm3d", np.zeros((8, 8, 4), np.int16), np.diag([-1.0, -1.0, 2.0, 1.0]), modality="CT",
                 patient=patient)
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch):
    """A copy of the template project; the current folder is the project."""
    root = tmp_path / "project"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("SITEADAPT_PROFILE", raising=False)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _only_inserted(before: str, after: str) -> list[str]:
    """The lines ``after`` adds to ``before``; fails when any line of ``before`` was changed, moved or dropped."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    added = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        assert op in ("equal", "insert"), f"{op}: {a[i1:i2]!r} -> {b[j1:j2]!r}"
        if op == "insert":
            added += b[j1:j2]
    return added


def test_site_add_2d_target(project, capsys):
    before = (project / "params.yaml").read_text()
    rc = main(["site", "add", "cxr_c", "--task", "chestxray", "--images", "pngs", "--labels", "pngs_labels",
               "--target-of", "cxr_a", "--pixel-spacing", "0.7", "--modality", "dx"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "warning" not in out.err  # spacing given: nothing assumed
    after = (project / "params.yaml").read_text()
    added = _only_inserted(before, after)
    assert [ln.strip() for ln in added] == ["- {source: cxr_a, target: cxr_c}", "cxr_c:", "task: chestxray",
                                            "images: pngs", "labels: pngs_labels", "modality: DX",
                                            "pixel_spacing_mm: 0.7"]
    comments = [ln for ln in before.splitlines() if ln.lstrip().startswith("#") or "#" in ln]
    assert len(comments) > 50 and all(c in after.splitlines() for c in comments)
    assert sum("#" in ln for ln in after.splitlines()) == len(comments)  # no comment added or lost
    data = yaml.safe_load(after)
    assert data["sites"]["cxr_c"] == {"task": "chestxray", "images": "pngs", "labels": "pngs_labels",
                                      "modality": "DX", "pixel_spacing_mm": 0.7}
    assert data["tasks"]["chestxray"]["directions"][-1] == {"source": "cxr_a", "target": "cxr_c"}
    assert list(data["sites"])[-1] == "cxr_c"
    s = load_settings("params.yaml")
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "cxr_c" in stages["ingest"]["foreach"] and "cxr_c" in stages["preprocess"]["foreach"]
    assert stages["preprocess"]["foreach"]["cxr_c"]["roi_rule"] == "foreground"  # a target: label-free crop
    methods = s.tasks["chestxray"].methods
    assert [k for k in stages["adapt"]["foreach"] if k.startswith("cxr_c-")] == [f"cxr_c-{m}" for m in methods]
    assert [k for k in stages["evaluate"]["foreach"] if k.startswith("cxr_c-")] == [f"cxr_c-{m}" for m in methods]
    assert "cxr_c" in stages["select"]["foreach"]
    assert dvcgen.check(s, "params.yaml", "dvc.yaml") is None  # exactly what `siteadapt dvc-gen` writes
    assert not list(project.glob(".params.yaml.*"))


def test_site_add_3d_direction_goes_after_the_last_direction(project, capsys):
    before = (project / "params.yaml").read_text()
    rc = main(["site", "add", "hospital_x", "--task", "cardiac", "--images", "vols", "--target-of", "cardiac_mr",
               "--modality", "CT"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "pixel" not in err  # no spacing warning for a 3D site
    after = (project / "params.yaml").read_text().splitlines()
    last = "      - {source: cardiac_ct, target: cardiac_mr}"
    i, j = before.splitlines().index(last), after.index(last)
    assert after[j + 1] == "      - {source: cardiac_mr, target: hospital_x}"
    assert after[j + 2] == before.splitlines()[i + 1]  # what followed the list (a comment) still follows it
    assert len(_only_inserted(before, "\n".join(after) + "\n")) == 5
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "hospital_x-sifa" in stages["adapt"]["foreach"] and "hospital_x" in stages["ingest"]["foreach"]


def test_site_add_warns_when_spacing_is_assumed(project, capsys):
    assert main(["site", "add", "cxr_d", "--task", "chestxray", "--images", "pngs"]) == 0
    err = capsys.readouterr().err
    assert "warning: no --pixel-spacing for a 2D site: 1.0 mm per pixel will be assumed" in err
    data = yaml.safe_load((project / "params.yaml").read_text())
    assert data["sites"]["cxr_d"] == {"task": "chestxray", "images": "pngs"}  # no direction: ingest/preprocess only
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "cxr_d" in stages["ingest"]["foreach"]
    assert not any(k.startswith("cxr_d-") for k in stages["adapt"]["foreach"])


PHI_DIR = "Doe^Jane_MRN99887766"


@pytest.mark.parametrize("argv,message", [
    (["cxr_c", "--task", "nosuchtask", "--images", "pngs"], "--task 'nosuchtask': unknown task"),
    (["cxr_c", "--task", "chestxray", "--images", "missing"], "--images: no such folder or file"),
    (["cxr_b", "--task", "chestxray", "--images", "pngs"], "site 'cxr_b' already exists"),
    (["CXR_B", "--task", "chestxray", "--images", "pngs"], "site 'CXR_B' already exists in params.yaml (sites.cxr_b)"),
    (["hospital_x", "--task", "cardiac", "--images", "pngs"],
     "--images: no usable volumes (DICOM series or 3D NIfTI) for the 3D task 'cardiac' (3 files scanned: 3 2D image "
     "files"),
    (["cxr_c", "--task", "chestxray", "--images", "vols"], "--images: no usable 2D images"),
    (["cxr-c", "--task", "chestxray", "--images", "pngs"], "site name: use 1-40 letters"),
    (["Doe^Jane", "--task", "chestxray", "--images", "pngs"], "site name: use 1-40 letters"),
    (["mrn99887766", "--task", "chestxray", "--images", "pngs"], "site name: a run of 5 or more digits"),
    (["cxr_c", "--task", "chestxray", "--images", "pngs", "--target-of", "nosite"], "--target-of 'nosite': unknown"),
    (["cxr_c", "--task", "chestxray", "--images", "pngs", "--target-of", "cardiac_mr"],
     "--target-of 'cardiac_mr': that site belongs to task 'cardiac'"),
    (["cxr_c", "--task", "chestxray", "--images", "pngs", "--labels", "missing"], "--labels: no such folder"),
    (["cxr_c", "--task", "chestxray", "--images", "pngs", "--pixel-spacing", "0"], "--pixel-spacing: expected"),
    (["cxr_c", "--task", "chestxray", "--images", "gs://bucket/x"],
     "--images: only local paths, s3://..., dicomweb+http://..."),
    (["cxr_c", "--task", "chestxray", "--images", "pngs", "--patients", "s3://b/p.csv"],
     "--patients: only local paths are supported here"),
    (["cxr_c", "--task", "chestxray", "--images", PHI_DIR], "--images: no such folder or file"),
    (["hospital_x", "--task", "cardiac", "--images", f"{PHI_DIR}_pngs"], "--images: no usable volumes"),
])
def test_site_add_refusals_change_nothing(project, capsys, argv, message):
    shutil.copytree(project / "pngs", project / f"{PHI_DIR}_pngs")
    before = _snapshot(project)
    rc = main(["site", "add", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert "Doe" not in err and "99887766" not in err or argv[0] in ("Doe^Jane", "mrn99887766")
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert _snapshot(project) == before  # params.yaml, dvc.yaml byte-identical; no temporary file left


def test_unlabeled_site_is_no_source(project, capsys):
    assert main(["site", "add", "cxr_d", "--task", "chestxray", "--images", "pngs", "--pixel-spacing", "1"]) == 0
    before = _snapshot(project)
    with pytest.raises(SiteRefused, match="a source site needs labels"):
        add_site("params.yaml", "cxr_e", task="chestxray", images="pngs", target_of="cxr_d")
    assert _snapshot(project) == before


def test_dvc_failure_leaves_params_unchanged(project, monkeypatch):
    """dvc.yaml is rendered from the candidate before params.yaml is replaced: a failure there changes nothing."""
    before = _snapshot(project)

    def refuse(*a, **k):
        raise ConfigError("params.yaml: dvc.yaml needs these keys to exist")

    monkeypatch.setattr(dvcgen, "render", refuse)
    with pytest.raises(ConfigError, match="needs these keys"):
        add_site("params.yaml", "cxr_c", task="chestxray", images="pngs", pixel_spacing_mm=1.0)
    assert _snapshot(project) == before


def test_loader_refusal_leaves_params_unchanged(project, monkeypatch):
    """The candidate file goes through the project's settings loader first: an entry it refuses (here a misspelt
    key slipped into the entry) leaves params.yaml and dvc.yaml as they were."""
    import siteadapt.steps.site as site_mod

    before = _snapshot(project)
    orig = site_mod.new_params_text
    monkeypatch.setattr(site_mod, "new_params_text",
                        lambda text, name, entry, task, d: orig(text, name, {**entry, "patiens": "x"}, task, d))
    with pytest.raises(ConfigError, match=r"^params\.yaml with site cxr_c: sites\.cxr_c\.patiens: unknown key"):
        add_site("params.yaml", "cxr_c", task="chestxray", images="pngs", pixel_spacing_mm=1.0)
    assert _snapshot(project) == before


def test_insertion_keeps_hand_wrapped_lines_and_trailing_comments():
    text = (
        "# top\n"
        "tasks:\n"
        "  t:\n"
        "    dims: 2\n"
        "    directions:\n"
        "    - {source: a, target: b}   # indentless list\n"
        "    # a comment between keys\n"
        "    methods: [m]\n"
        "  u:\n"
        "    dims: 3\n"
        "sites:\n"
        "  a: {task: t, images: x, labels: y,\n"
        "      modality: CT}   # hand-wrapped flow mapping\n"
        "  b:\n"
        "    task: t\n"
        "    images: 'z'\n"
        "    # last site's own note\n"
        "\n"
        "# next section\n"
        "other: 1\n")
    out = new_params_text(text, "c", {"task": "t", "images": "p: q"}, "t", {"source": "a", "target": "c"})
    added = _only_inserted(text, out)
    assert added == ["    - {source: a, target: c}\n", "  c:\n", "    task: t\n", "    images: 'p: q'\n"]
    lines = out.splitlines()
    assert lines.index("  c:") == lines.index("    # last site's own note") + 1
    out2 = new_params_text(text, "c", {"task": "u", "images": "p"}, "u", {"source": "a", "target": "c"})
    assert yaml.safe_load(out2)["tasks"]["u"]["directions"] == [{"source": "a", "target": "c"}]
    _only_inserted(text, out2)


@pytest.mark.parametrize("task,folder,ok,message", [
    ("chestxray", "dcm2d", True, None),
    ("cardiac", "dcm3d", True, None),
    ("cardiac", "dcm2d", False, "--images: no usable volumes (DICOM series or 3D NIfTI) for the 3D task 'cardiac' (2 "
                                "files scanned: 0 2D image files (PNG/JPEG/TIFF/BMP), 0 2D NIfTI, 0 3D NIfTI, 2 "
                                "single-frame DICOM, 0 multi-frame DICOM series"),
    ("chestxray", "dcm3d", False, "--images: no usable 2D images (PNG/JPEG/TIFF/BMP, 2D NIfTI or single-frame DICOM) "
                                  "for the 2D task 'chestxray' (4 files scanned: 0 2D image files (PNG/JPEG/TIFF/BMP), "
                                  "0 2D NIfTI, 0 3D NIfTI, 0 single-frame DICOM, 1 multi-frame DICOM series"),
])
def test_site_add_scans_dicom(project, capsys, task, folder, ok, message):
    before = _snapshot(project)
    rc = main(["site", "add", "new_site", "--task", task, "--images", folder])
    err = capsys.readouterr().err
    if ok:
        assert rc == 0, err
        assert "pixel" not in err  # DICOM radiographs carry their spacing: nothing to warn about
        assert yaml.safe_load((project / "params.yaml").read_text())["sites"]["new_site"]["images"] == folder
    else:
        assert rc == 2 and message in err, err
        assert _snapshot(project) == before


def test_site_add_uri_images_are_accepted_unscanned(project, capsys):
    assert main(["site", "add", "cloud_site", "--task", "cardiac", "--images", "s3://bucket/site/images",
                 "--target-of", "cardiac_mr"]) == 0
    assert "warning: --images is not a local folder: not scanned here" in capsys.readouterr().err
    s = load_settings("params.yaml")
    assert s.sites["cloud_site"].images == "s3://bucket/site/images"


def test_scan_never_opens_a_fifo_or_follows_a_bad_link(tmp_path):
    """A FIFO would block ``open`` forever and a dangling link cannot be read: the scan counts both as unreadable
    without opening them (an alarm turns a hang into a failure) and still counts the images beside them."""
    import os
    import signal

    from siteadapt.steps.site import scan_images

    for i in range(2):  # fewer than the scan's "enough", so that it reaches every entry
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)).save(tmp_path / f"im{i}.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("scan blocked")))
    import time

    signal.alarm(20)
    t0 = time.perf_counter()
    try:
        res = scan_images(tmp_path, dims=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < 10  # the alarm (caught as an unreadable image) would take 20 s
    assert (res.files, res.image2d, res.unreadable) == (4, 2, 2)
