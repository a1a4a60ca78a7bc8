"""Issue 27 items 5 and 6: inputs that used to end a site with a traceback (dangling or looping symbolic links, file
names that are not UTF-8) or pass silently (a series one edge slice short, an all-zero image, a 1x1 image) are each
refused by name in the manifest while the good inputs of the site are ingested; no path component of the site (a
folder named after the patient, file names) reaches stdout, stderr, the logs, the manifest or any output file; a
site where every input is bad exits 3 without a traceback.

The CLI runs in a subprocess (``python -m siteadapt.cli``), so that stderr is the real one: library warnings that
would be printed there (pydicom quoting a header value) are seen as a user would see them.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from siteadapt.io.deid import input_ref
from siteadapt.io.dicom_write import write_series

REPO = Path(__file__).resolve().parents[1]
KEY = "bad-inputs-test-key-not-secret"
PATIENT = {"PatientName": "DOE^JOHN", "PatientID": "MRN48213977"}
PATIENT_DIR = "DOE^JOHN_MRN48213977"  # the folder above the site root, named after the patient
SITE_DIR = "JOHN_DOE_scans"
NOT_UTF8 = b"DOE\xff\xfeJOHN.png"
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _png(path: Path, data: np.ndarray) -> None:
    Image.fromarray(data).save(path)


def _series(folder: Path, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_series(folder, np.round(rng.normal(100, 10, (12, 10, 6))), AFFINE, modality="CT",
                            patient=PATIENT, seed=seed)


def _by_position(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def _truncate_last_slice(files: list[Path]) -> Path:
    """Cut the pixel data of the slice at the top of the stack (the last by position): the series' edge."""
    last = _by_position(files)[-1]
    last.write_bytes(last.read_bytes()[:-60])
    return last


def _bad_entries(site: Path) -> dict[str, int]:
    """Every bad case of issue 27 item 6 (and a few more of the same kind) under ``site``; returns the number of
    refusals expected per reason head."""
    rng = np.random.default_rng(7)
    os.symlink(site / "nowhere.png", site / "DOE^JOHN_dangling.png")  # dangling
    os.symlink(site / "DOE^JOHN_loop.png", site / "DOE^JOHN_loop.png")  # a link to itself
    (site / "DOE^JOHN_a.dcm").symlink_to("DOE^JOHN_b.dcm")  # two links to each other
    (site / "DOE^JOHN_b.dcm").symlink_to("DOE^JOHN_a.dcm")
    (site / "DOE^JOHN_folder_link").symlink_to(site.parent, target_is_directory=True)  # would walk in circles
    os.mkfifo(site / "DOE^JOHN.fifo")  # reading it would block the step forever
    _png(Path(os.fsdecode(os.fsencode(str(site)) + b"/" + NOT_UTF8)),  # a good image with a non-UTF-8 name
         rng.integers(0, 255, (24, 20), dtype=np.uint8))
    _png(site / "DOE^JOHN_zero.png", np.zeros((24, 20), np.uint8))  # no signal
    _png(site / "DOE^JOHN_tiny.png", np.full((1, 1), 7, np.uint8))  # 1 x 1
    _truncate_last_slice(_series(site / "DOE^JOHN_ct_edge", seed=2))  # one slice short at the top, silently
    return {"symbolic link loop": 3, "dangling symbolic link": 1, "symbolic link to a folder": 1,
            "file or folder name is not valid UTF-8": 1, "not a regular file (device, FIFO or socket)": 1,
            "image carries no signal": 1, "image too small": 1, "edge slice unreadable": 1,
            "truncated or unreadable DICOM": 1}


@pytest.fixture
def bad_site(tmp_path):
    """A site under a folder named after the patient: 3 good PNGs and a good CT series (whose header makes pydicom
    warn, quoting a value that holds the patient's name), plus every bad case of :func:`_bad_entries`."""
    site = tmp_path / PATIENT_DIR / SITE_DIR
    site.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(site / f"DOE^JOHN_MRN48213977_{i}.png", rng.integers(0, 255, (24, 20), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in _series(site / "DOE^JOHN_ct", seed=1):
            ds = pydicom.dcmread(f)
            ds.InstitutionName = "DOE^JOHN_MRN48213977 " + "x" * 60  # too long for LO: pydicom warns on reading
            ds.FrameOfReferenceUID = "1.2.DOE^JOHN.48213977"  # not a UID: pydicom quotes it in its warning
            ds.save_as(f)
    expected = _bad_entries(site)
    return tmp_path, site, expected


def _run_cli(tmp_path: Path, site: Path, site_name: str = "cxr_b") -> subprocess.CompletedProcess:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "SITEADAPT_DEID_KEY": KEY, "SITEADAPT_TRACKING": "off", "OMP_NUM_THREADS": "1",
           "SITEADAPT_UID_MAP_DIR": str(tmp_path / "keys")}  # the UID map is key material, kept apart
    env.pop("SITEADAPT_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "siteadapt.cli", "--params", str(REPO / "params.yaml"), "ingest",
                           str(site), "--site", site_name, "--no-labels", "--data-root", str(tmp_path / "out")],
                          cwd=work, env=env, capture_output=True, timeout=120)


def _names_under(root: Path) -> set[bytes]:
    """Every folder and file name from the patient's folder down (with stems, and the patient's name and id), as
    bytes: what must not show up anywhere."""
    names = {os.fsencode(root.name), b"DOE", b"JOHN", b"48213977"}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for n in dirnames + filenames:
            names.add(n)
            names.add(n.rsplit(b".", 1)[0])
    return {n for n in names if len(n) >= 3}


def _assert_nothing_leaks(names: set[bytes], texts: dict[str, bytes]) -> None:
    for where, blob in texts.items():
        for n in names:
            assert n not in blob, f"{n!r} found in {where}"


def _written(out: Path) -> dict[str, bytes]:
    """Every file under the data root, gzip files also decompressed."""
    got = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            raw = p.read_bytes()
            got[str(p.relative_to(out))] = raw + (gzip.decompress(raw) if p.name.endswith(".gz") else b"")
    return got


def test_bad_files_refused_by_name_good_ones_ingested_nothing_leaks(bad_site):
    tmp_path, site, expected = bad_site
    proc = _run_cli(tmp_path, site)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    manifest = json.loads((tmp_path / "out" / "cxr_b" / "manifest.json").read_text())

    # the good inputs: 3 PNGs and the CT series, each once
    assert sorted(it["kind"] for it in manifest["items"]) == ["dicom", "image2d", "image2d", "image2d"]
    ct = next(it for it in manifest["items"] if it["kind"] == "dicom")
    assert ct["shape"] == [12, 10, 6]

    # each bad case refused once, with its reason
    heads = {}
    for r in manifest["rejected"]:
        head = next((h for h in expected if r["reason"].startswith(h)), r["reason"])
        heads[head] = heads.get(head, 0) + 1
    assert heads == expected
    assert len(manifest["rejected"]) == sum(expected.values()) == 11
    edge = next(r for r in manifest["rejected"] if r["reason"].startswith("edge slice unreadable"))
    assert edge["reason"] == ("edge slice unreadable: 1 slice file beyond the first or last readable slice is "
                              "truncated or unreadable; refused rather than written 1 slice short")
    assert edge["depth"] == 1
    tiny = next(r for r in manifest["rejected"] if r["reason"].startswith("image too small"))
    assert tiny["reason"] == "image too small: 1 x 1 pixels, the minimum is 8 pixels along each in-plane axis"
    zero = next(r for r in manifest["rejected"] if r["reason"].startswith("image carries no signal"))
    assert zero["reason"] == "image carries no signal: every voxel holds the same value (0)"
    # the non-UTF-8 name has a stable reference: its bytes on disk, hashed with the key
    rel = os.fsdecode(NOT_UTF8)
    odd = next(r for r in manifest["rejected"] if r["reason"].startswith("file or folder name is not valid"))
    assert odd["file"] == input_ref(KEY.encode(), "cxr_b", "input", rel)
    # and `ingest --explain` (terminal only) maps it back to a printable name
    from siteadapt.steps.ingest import explain

    shown = {r["file"]: r["path"] for r in explain(site, "cxr_b", tmp_path / "out", key=KEY.encode())}
    assert shown[odd["file"]] == "input/DOE\\xff\\xfeJOHN.png"
    assert sum(v is None for v in shown.values()) == 0 and len(shown) == 11

    # the pydicom warnings about the CT series' header: reported under the file's reference, cleaned
    err = proc.stderr.decode("utf-8", "replace")
    reader = [ln for ln in err.splitlines() if "reader warning on input" in ln]
    assert len(reader) == 2, err
    assert all(f"item {ct['id']}" in ln for ln in reader)
    assert sum("Invalid value for VR UI: '...'" in ln for ln in reader) == 1
    assert sum("exceeds the maximum length of 64 allowed for VR LO" in ln for ln in reader) == 1
    # each refusal logged once, by reference
    assert sum(ln.count(" not used: input in-") for ln in err.splitlines()) == 11

    names = _names_under(tmp_path / PATIENT_DIR)
    assert {b"DOE^JOHN_ct_edge", NOT_UTF8, b"DOE^JOHN_MRN48213977", SITE_DIR.encode()} <= names
    _assert_nothing_leaks(names, {"stdout": proc.stdout, "stderr": proc.stderr,
                                  **{f"output {k}": v for k, v in _written(tmp_path / "out").items()}})

    # a second run reads nothing again and refuses the same inputs the same way
    again = _run_cli(tmp_path, site)
    assert again.returncode == 0 and b"Traceback" not in again.stderr
    assert b"4 items (0 written, 4 unchanged), 11 inputs not used" in again.stdout
    assert json.loads((tmp_path / "out" / "cxr_b" / "manifest.json").read_text()) == manifest


def test_every_input_bad_exits_3_without_traceback(tmp_path):
    site = tmp_path / PATIENT_DIR / SITE_DIR
    site.mkdir(parents=True)
    expected = _bad_entries(site)
    proc = _run_cli(tmp_path, site)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    assert "nothing usable: all 11 inputs were refused" in err
    assert "3 x input: symbolic link loop" in err and "1 x input: edge slice unreadable" in err
    manifest = json.loads((tmp_path / "out" / "cxr_b" / "manifest.json").read_text())
    assert manifest["items"] == [] and len(manifest["rejected"]) == sum(expected.values())
    _assert_nothing_leaks(_names_under(tmp_path / PATIENT_DIR),
                          {"stdout": proc.stdout, "stderr": proc.stderr,
                           **{f"output {k}": v for k, v in _written(tmp_path / "out").items()}})


def test_missing_input_folder_is_not_named(tmp_path):
    missing = tmp_path / PATIENT_DIR / "gone"
    proc = _run_cli(tmp_path, missing)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err
    assert "site cxr_b: the input folder does not exist" in err
    assert "DOE" not in err and "gone" not in err


def test_unreadable_file_refused_the_others_ingested(tmp_path, deid_key, monkeypatch):
    """A file this process may not read (permission): refused by name, the rest ingested. As root every file is
    readable, so os.access is made to answer as for another user."""
    from siteadapt.steps.ingest import ingest

    site = tmp_path / PATIENT_DIR / SITE_DIR
    site.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(2):
        _png(site / f"DOE^JOHN_{i}.png", rng.integers(0, 255, (24, 20), dtype=np.uint8))
    locked = site / "DOE^JOHN_locked.png"
    _png(locked, rng.integers(0, 255, (24, 20), dtype=np.uint8))
    locked.chmod(0)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked else
                        real_access(p, mode, *a, **k))
    res = ingest(site, "locked", tmp_path / "out")
    assert len(res.items) == 2
    assert [r["reason"] for r in res.rejected] == ["file cannot be read: permission denied"]
    assert res.rejected[0]["position"] == "3 of 3"


def test_middle_slice_truncated_is_still_missing_slices(tmp_path, deid_key):
    """A truncated slice between readable ones leaves a gap: refused as missing slices (the rule before), not as an
    edge slice; the series' truncated file is refused on its own."""
    from siteadapt.steps.ingest import ingest

    files = _by_position(_series(tmp_path / "in" / "s", seed=4))
    files[2].write_bytes(files[2].read_bytes()[:-60])
    with pytest.raises(Exception, match="nothing usable"):
        ingest(tmp_path / "in", "mid", tmp_path / "out")
    man = json.loads((tmp_path / "out" / "mid" / "manifest.json").read_text())
    reasons = sorted(r["reason"].split(":")[0] for r in man["rejected"])
    assert reasons == ["missing slices", "truncated or unreadable DICOM"]
