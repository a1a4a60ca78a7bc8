"""``siteadapt site add``: register a new site in params.yaml (and its adaptation direction), then regenerate dvc.yaml.

What it does, in this order, writing nothing until every check has passed:

1. Checks the request: the site name (letters, digits and ``_``, starting with a letter, at most 40 characters, no run
   of 5 or more digits, which would look like a record number or a date; ``-`` and ``@`` are refused because
   dvc.yaml's stage names use them as separators), that it is new, that the task exists, that ``--target-of`` names
   a labeled site of the same task, that the images (and labels, patients) paths exist or are URIs the settings
   accept (``s3://``; for images also ``dicomweb+http(s)://``). A URI that carries credentials (``user:password@``,
   or a token-like query parameter such as ``access_token``, ``api_key`` or a presigned URL's ``X-Amz-Signature``)
   is refused first, with a message that names the option and says where credentials go (the environment: the
   ``SITEADAPT_DICOMWEB_*`` variables for a PACS, the AWS credential chain for ``s3://``), never the secret.
2. Scans the images folder quickly (a bounded sample of files, headers only) for images of the task's kind: 2D
   images (PNG/JPEG/TIFF/BMP, 2D NIfTI, single-frame DICOM) for a 2D task, volumes (3D NIfTI, multi-slice DICOM) for
   a 3D task. URIs are not scanned here (ingest checks what they hold).
3. Builds the new params.yaml text. Choice: the original text is kept byte for byte and the new lines are inserted
   into it (the site at the end of ``sites:``, the direction after the task's last direction). ruamel.yaml's
   round-trip parser gives the positions of the entries; a full round-trip dump would keep the comments but reflow
   hand-wrapped flow mappings, so it is only the fallback for layouts the insertion does not handle (flow-style
   ``sites``/``directions``). The inserted text is checked by re-parsing: the result must equal the original data
   plus exactly the new entries.
4. Validates the candidate file with the project's settings loader and renders dvc.yaml from it (as ``siteadapt
   dvc-gen`` does), then replaces params.yaml (atomic rename) and writes dvc.yaml (atomic).

No message names an input file or prints an input path: errors say which option is wrong (``--images``) and counts of
what the scan found, so a folder or file named after a patient does not end up in a terminal log or CI output.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError, SiteRefused

NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
MODALITY_RE = re.compile(r"[A-Z]{2,4}")
SCAN_MAX_FILES = 400  # files looked at by the quick scan (headers only)
SCAN_ENOUGH = 3  # usable images that end the scan early
IMAGE_SCHEMES = ("s3://", "dicomweb+http://", "dicomweb+https://")  # what the settings accept for `images`
ASSUMED_SPACING_MM = 1.0  # what ingest uses for a 2D image without spacing (io/files.py)


@dataclass
class ScanResult:
    """What the quick scan of an images folder found (counts only, never names)."""

    files: int = 0
    image2d: int = 0  # readable 2D image files (PNG, JPEG, ...)
    nifti2d: int = 0
    nifti3d: int = 0
    dicom2d: int = 0  # single-frame DICOM series (radiographs, or a lone slice)
    dicom3d: int = 0  # DICOM series with two or more frames
    unreadable: int = 0

    def usable(self, dims: int) -> int:
        return self.image2d + self.nifti2d + self.dicom2d if dims == 2 else self.nifti3d + self.dicom3d

    def describe(self) -> str:
        return (f"{self.files} files scanned: {self.image2d} 2D image files (PNG/JPEG/TIFF/BMP), {self.nifti2d} 2D "
                f"NIfTI, {self.nifti3d} 3D NIfTI, {self.dicom2d} single-frame DICOM, {self.dicom3d} multi-frame DICOM "
                f"series, {self.unreadable} unreadable or other files")


@dataclass
class SiteAdded:
    name: str
    entry: dict
    direction: dict | None
    dvc_changed: bool
    scan: ScanResult | None
    warnings: list[str] = field(default_factory=list)


def _is_uri(p: str) -> bool:
    return "://" in str(p)


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name or ""):
        raise SiteRefused("site name: use 1-40 letters, digits or '_', starting with a letter ('-' and '@' separate "
                          "parts of dvc.yaml stage names)")
    if re.search(r"\d{5,}", name):
        raise SiteRefused("site name: a run of 5 or more digits looks like a record number or a date; name the site "
                          "after the hospital or scanner, never after a patient or study")


def scan_images(root: Path, dims: int, *, max_files: int = SCAN_MAX_FILES, enough: int = SCAN_ENOUGH) -> ScanResult:
    """Count the images of each kind in a bounded, sorted sample of ``root``'s files (headers only).

    Stops once ``enough`` usable images of the task's kind (``dims``) are found. DICOM files are grouped into
    series by the project's own scanner (:func:`siteadapt.io.dicom.scan_dicom_files`), so a series of many slices
    counts as one volume."""
    import nibabel as nib
    from PIL import Image

    from ..io import files as F
    from .ingest import _scan_tree

    res = ScanResult()
    other: list[Path] = []
    entries, problems = _scan_tree(root)
    for p in entries[:max_files]:
        res.files += 1
        if p in problems:  # a link that leads nowhere or to a folder, a FIFO, an unreadable file: never opened
            res.unreadable += 1
            continue
        kind = F.kind_of(p)
        if kind == "image2d":
            try:
                with Image.open(p) as im:
                    w, h = im.size
                res.image2d += int(w > 1 and h > 1)
            except Exception:  # PIL raises many types for unreadable files
                res.unreadable += 1
        elif kind == "nifti":
            try:
                shape = nib.load(str(p)).shape
            except Exception:
                res.unreadable += 1
                continue
            if len(shape) >= 3 and shape[2] > 1:
                res.nifti3d += 1
            elif len(shape) >= 2:
                res.nifti2d += 1
        else:
            other.append(p)
        if res.usable(dims) >= enough:
            return res
    if other:
        from ..io.dicom import scan_dicom_files

        series, skipped = scan_dicom_files(other)
        res.unreadable += len(skipped)
        for s in series:
            if s.n_frames >= 2:
                res.dicom3d += 1
            else:
                res.dicom2d += 1
    return res


def _is_labeled(settings, site: str) -> bool:
    """A site whose labels can train a source model: ``labels`` set, or (classification) class folders."""
    entry = settings.sites[site]
    if entry.labels is not None:
        return True
    task = settings.tasks[entry.task]
    if task.kind == "classification" and not _is_uri(str(entry.images)) and Path(entry.images).is_dir():
        names = {p.name.lower() for p in Path(entry.images).iterdir() if p.is_dir()}
        return all(c.lower() in names for c in task.classes)
    return False


# ---- inserting lines into the original text ----------------------------------------------------------------------
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], last_line: int, col: int) -> int:
    """Index of the last line of the block entry that starts at ``last_line`` (entries of its container at column
    ``col``): content lines and comments indented deeper than ``col`` belong to it; the block ends at the first
    content line at column ``col`` or less. Blank lines and shallower comments after the entry (the next section's
    heading) stay after the inserted text."""
    end = last_line
    for i in range(last_line + 1, len(lines)):
        ln = lines[i]
        if not ln.strip():
            continue
        if ln.lstrip().startswith("#"):
            if _indent(ln) > col:
                end = i
            continue
        if _indent(ln) <= col:
            break
        end = i
    return end


def _dump_fragment(data: dict, col: int, step: int) -> list[str]:
    from ruamel.yaml import YAML

    y = YAML()
    y.indent(mapping=step, sequence=step + 2, offset=step)
    y.width = 4096
    buf = io.StringIO()
    y.dump(data, buf)
    return [" " * col + ln if ln.strip() else ln for ln in buf.getvalue().splitlines(keepends=True)]


def _insert_text(text: str, name: str, entry: dict, task: str, direction: dict | None) -> str | None:
    """The original text with the site (and direction) inserted, or None when the layout is not a block mapping /
    block sequence the insertion handles."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    doc = YAML().load(text)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    sites = doc.get("sites")
    if not isinstance(sites, CommentedMap) or not sites or sites.fa.flow_style():
        return None
    keys = list(sites)
    col = sites.lc.key(keys[0])[1]
    step = 2
    first = sites[keys[0]]
    if isinstance(first, CommentedMap) and first and not first.fa.flow_style():
        step = max(1, first.lc.key(next(iter(first)))[1] - col)
    inserts: list[tuple[int, list[str]]] = []
    site_end = _block_end(lines, sites.lc.key(keys[-1])[0], col)
    inserts.append((site_end + 1, _dump_fragment({name: entry}, col, step)))
    if direction is not None:
        t = doc["tasks"][task]
        dirs = t.get("directions") if isinstance(t, CommentedMap) else None
        line_text = "{source: %s, target: %s}\n" % (direction["source"], direction["target"])
        if not isinstance(t, CommentedMap) or t.fa.flow_style():
            return None
        if dirs is None:
            tkeys = list(t)
            tcol = t.lc.key(tkeys[0])[1]
            end = _block_end(lines, t.lc.key(tkeys[-1])[0], tcol)
            inserts.append((end + 1, [" " * tcol + "directions:\n", " " * (tcol + step) + "- " + line_text]))
        elif isinstance(dirs, CommentedSeq) and dirs and not dirs.fa.flow_style():
            dline, dcol = dirs.lc.item(len(dirs) - 1)
            dash = dcol - 2  # ruamel gives the item's column, after "- "
            if lines[dline][dash:dash + 2] != "- ":
                return None
            end = _block_end(lines, dline, dash)
            inserts.append((end + 1, [" " * dash + "- " + line_text]))
        else:
            return None
    for at, new in sorted(inserts, key=lambda x: x[0], reverse=True):
        lines[at:at] = new
    return "".join(lines)


def _roundtrip_text(text: str, name: str, entry: dict, task: str, direction: dict | None) -> str:
    """Fallback: ruamel.yaml round trip (comments and order kept; long flow collections may be re-wrapped)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), lambda r, d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = y.load(text)
    if doc.get("sites") is None:
        doc["sites"] = CommentedMap()
    doc["sites"][name] = CommentedMap(entry)
    if direction is not None:
        t = doc["tasks"][task]
        if t.get("directions") is None:
            t["directions"] = CommentedSeq()
        item = CommentedMap(direction)
        item.fa.set_flow_style()
        t["directions"].append(item)
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue()


def new_params_text(text: str, name: str, entry: dict, task: str, direction: dict | None) -> str:
    """params.yaml's text with the site and direction added; refuses a result that is not exactly the original data
    plus the new entries."""
    before = yaml.safe_load(text) or {}
    expected = dict(before)
    expected["sites"] = {**(before.get("sites") or {}), name: entry}
    if direction is not None:
        tasks = dict(before["tasks"])
        tasks[task] = {**tasks[task], "directions": [*(tasks[task].get("directions") or []), direction]}
        expected["tasks"] = tasks
    for build in (_insert_text, _roundtrip_text):
        out = build(text, name, entry, task, direction)
        if out is not None and yaml.safe_load(out) == expected:
            return out
    raise ConfigError("params.yaml: could not add the site without changing other entries; add it by hand "
                      "(see README, Add your own site)")


# ---- the command -------------------------------------------------------------------------------------------------
def add_site(params: str | Path, name: str, *, task: str, images: str, labels: str | None = None,
             pixel_spacing_mm: float | None = None, target_of: str | None = None, modality: str | None = None,
             patients: str | None = None, dvc_out: str | Path | None = None, profile: str | None = None) -> SiteAdded:
    """Add site ``name`` to ``params`` (and the direction ``{source: target_of, target: name}``), then write dvc.yaml
    (default: beside params.yaml). Raises :class:`SiteRefused` (or ConfigError) before writing anything when a check
    fails. Paths are written as given; relative ones are checked from the current folder, as every step reads them."""
    from .. import dvcgen
    from ..config import load_settings
    from ..io.atomic import atomic_path, write_text
    from ..redact import inline_secret_message

    for opt, value in (("--images", images), ("--labels", labels), ("--patients", patients)):
        refused = inline_secret_message(opt, value) if value is not None and _is_uri(value) else None
        if refused:  # first of all: a secret must not reach params.yaml, dvc.yaml or any message
            raise SiteRefused(refused)
    params = Path(params)
    dvc_out = Path(dvc_out) if dvc_out is not None else params.parent / "dvc.yaml"
    settings = load_settings(params, profile=profile)
    check_name(name)
    same = [n for n in settings.sites if n.lower() == name.lower()]  # folders per site: one per name on any disk
    if same:
        raise SiteRefused(f"site {name!r} already exists in params.yaml (sites.{same[0]}); pick a new name")
    if task not in settings.tasks:
        raise SiteRefused(f"--task {task!r}: unknown task (tasks: {', '.join(sorted(settings.tasks))})")
    t = settings.tasks[task]
    warnings: list[str] = []
    direction = None
    if target_of is not None:
        if target_of not in settings.sites:
            raise SiteRefused(f"--target-of {target_of!r}: unknown site (sites: {', '.join(sorted(settings.sites))})")
        if settings.sites[target_of].task != task:
            raise SiteRefused(f"--target-of {target_of!r}: that site belongs to task "
                              f"{settings.sites[target_of].task!r}, not {task!r}")
        if not _is_labeled(settings, target_of):
            raise SiteRefused(f"--target-of {target_of!r}: a source site needs labels (sites.{target_of}.labels"
                              + (" or one image folder per class" if t.kind == "classification" else "") + ")")
        direction = {"source": target_of, "target": name}
    if modality is not None:
        modality = modality.upper()
        if not MODALITY_RE.fullmatch(modality):
            raise SiteRefused("--modality: expected a DICOM modality code such as CT, MR, CR, DX, MG")
    if pixel_spacing_mm is not None and not (pixel_spacing_mm > 0 and pixel_spacing_mm < 100):
        raise SiteRefused("--pixel-spacing: expected a pixel size in mm, greater than 0 and below 100")
    checks = (("--images", images, "dir", IMAGE_SCHEMES), ("--labels", labels, "any", ("s3://",)),
              ("--patients", patients, "file", ()))
    for opt, value, want, schemes in checks:
        if value is None or _is_uri(value):
            if value is not None and not value.startswith(schemes):
                raise SiteRefused(f"{opt}: only local paths" + "".join(f", {x}..." for x in schemes)
                                  + " are supported here")
            continue
        p = Path(value)
        if not p.exists():
            raise SiteRefused(f"{opt}: no such folder or file (paths are read from the current folder)")
        if want == "dir" and not p.is_dir():
            raise SiteRefused(f"{opt}: expected a folder of images")
        if want == "file" and not p.is_file():
            raise SiteRefused(f"{opt}: expected a CSV file (stem,patient)")
    if labels is not None and not _is_uri(labels):
        if t.kind == "segmentation" and not Path(labels).is_dir():
            raise SiteRefused("--labels: a segmentation site's labels are a folder of label maps")
        if t.kind == "classification" and not (Path(labels).is_file() and labels.lower().endswith(".csv")):
            raise SiteRefused("--labels: a classification site's labels are a CSV file (stem,label)")
    scan = None
    if _is_uri(images):
        warnings.append("--images is not a local folder: not scanned here; ingest checks the images")
    else:
        scan = scan_images(Path(images), t.dims)
        if not scan.usable(t.dims):
            kind = ("2D images (PNG/JPEG/TIFF/BMP, 2D NIfTI or single-frame DICOM)" if t.dims == 2
                    else "volumes (DICOM series or 3D NIfTI)")
            raise SiteRefused(f"--images: no usable {kind} for the {t.dims}D task {task!r} ({scan.describe()})")
    if t.dims == 2 and pixel_spacing_mm is None and (scan is None or scan.image2d or scan.nifti2d):
        warnings.append(f"no --pixel-spacing for a 2D site: {ASSUMED_SPACING_MM} mm per pixel will be assumed for "
                        "its images without spacing (PNG/JPEG/TIFF/BMP carry none), so every size in mm (crops, "
                        "surface distances) is in pixels; re-run with --pixel-spacing MM if you know the pixel size")
    if task not in settings.pipeline_tasks() and settings.pipeline.tasks is not None:
        warnings.append(f"task {task!r} is not in pipeline.tasks: dvc.yaml gets no stages for this site until you "
                        "add the task there and run `siteadapt dvc-gen`")

    entry: dict = {"task": task, "images": images}
    if labels is not None:
        entry["labels"] = labels
    if modality is not None:
        entry["modality"] = modality
    if pixel_spacing_mm is not None:
        entry["pixel_spacing_mm"] = float(pixel_spacing_mm)
    if patients is not None:
        entry["patients"] = patients

    text = params.read_text()
    new_text = new_params_text(text, name, entry, task, direction)
    with atomic_path(params) as tmp:  # replaces params.yaml only when the candidate passed both checks
        tmp.write_text(new_text)
        os.chmod(tmp, params.stat().st_mode & 0o777)  # mkstemp's 0600 would hide params.yaml from other users
        try:  # the project's loader on the candidate file: it refuses what every step would refuse
            new_settings = load_settings(tmp, profile=profile)
            dvc_text = dvcgen.render(new_settings, dvcgen.load_raw(tmp), dvc_out.resolve().parent)
        except ConfigError as e:  # name the file the user knows, not the temporary one
            raise ConfigError(str(e).replace(str(tmp), f"{params} with site {name}")) from None
    changed = not (dvc_out.is_file() and dvc_out.read_text() == dvc_text)
    if changed:
        write_text(dvc_out, dvc_text)
    return SiteAdded(name=name, entry=entry, direction=direction, dvc_changed=changed, scan=scan, warnings=warnings)
